"""`scaled_ql.compilation_cache`: the run's persistent compilation cache, in fresh processes (JAX
reads its cache folder once per process, at the first compile)."""
import json
import os
import subprocess
import sys

from scaled_ql import compilation_cache

_PROCESS = '''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from scaled_ql import compilation_cache
assert compilation_cache.describe() is None  # nothing is counted before use_run_cache
folder = compilation_cache.use_run_cache(sys.argv[1])
jax.jit(lambda x: jnp.tanh(x) @ x.T + 1)(np.ones((8, 8), np.float32)).block_until_ready()
print(json.dumps(dict(folder=folder, describe=compilation_cache.describe(),
                      machine=compilation_cache.cache_dir(sys.argv[1]),
                      **compilation_cache.counts())))
'''


def _run(workdir: str, **env) -> dict:
  environment = {k: v for k, v in os.environ.items()
                 if k not in ('JAX_COMPILATION_CACHE_DIR', 'JAX_ENABLE_COMPILATION_CACHE')}
  # (this function compiles in milliseconds: JAX stores only what took the minimum time)
  environment.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', **env)
  out = subprocess.run([sys.executable, '-c', _PROCESS, workdir], env=environment,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_on_a_workdir_loads_what_the_first_compiled(tmp_path):
  """use_run_cache: WORKDIR/compilation_cache/<machine>, written by the first process, loaded by
  the second (what a restarted node does), counted, and described for the learner's log."""
  workdir = str(tmp_path / 'run')
  first = _run(workdir)
  machine = first['machine']  # WORKDIR/compilation_cache/<machine_key of its devices>
  assert os.path.dirname(machine) == os.path.join(workdir, compilation_cache.FOLDER)
  assert first['folder'] == machine, first
  assert (first['loaded'], first['compiled']) == (0, 1), first
  assert any(name.endswith('-cache') for name in os.listdir(machine)), os.listdir(machine)
  second = _run(workdir)
  assert (second['loaded'], second['compiled']) == (1, 0), second
  assert second['describe'] == (f'compilation cache {machine}: 1 executable(s) loaded, 0 '
                                'compiled for it'), second
  # Another workdir starts empty: it compiles again.
  assert _run(str(tmp_path / 'other'))['compiled'] == 1
  # An entry cut short (a kill, a full disk; its `-atime` written by a read since, as JAX does
  # even for an entry it cannot read) is removed before JAX reads the folder, and compiled
  # again: left, it failed to load at every start and was never rewritten.
  entry = os.path.join(machine, next(n for n in os.listdir(machine) if n.endswith('-cache')))
  size = os.path.getsize(entry)
  with open(entry, 'r+b') as f:
    f.truncate(size // 2)
  third = _run(workdir)
  assert (third['loaded'], third['compiled']) == (0, 1), third
  assert os.path.getsize(entry) > size // 2  # written whole again
  assert _run(workdir)['loaded'] == 1


def test_the_environments_cache_folder_or_its_off_switch_wins(tmp_path):
  """JAX's own variables: a folder the caller chose is kept, and the off switch is obeyed."""
  chosen = str(tmp_path / 'chosen')
  kept = _run(str(tmp_path / 'run'), JAX_COMPILATION_CACHE_DIR=chosen)
  assert kept['folder'] == chosen and kept['compiled'] == 1, kept
  assert not os.path.exists(tmp_path / 'run' / compilation_cache.FOLDER)
  off = _run(str(tmp_path / 'run'), JAX_ENABLE_COMPILATION_CACHE='false')
  assert off['folder'] is None and off['describe'] == 'no compilation cache', off
  assert (off['loaded'], off['compiled']) == (0, 0), off
  assert not os.path.exists(tmp_path / 'run' / compilation_cache.FOLDER)


def test_the_machine_key_separates_what_xla_compiles_for(monkeypatch):
  key = compilation_cache.machine_key()
  assert key == compilation_cache.machine_key()  # stable
  arch, digest = key.rsplit('-', 1)
  assert arch and len(digest) == 12 and int(digest, 16) >= 0
  # Another accelerator, or none, is another folder; the order of the devices does not matter.
  gpus = compilation_cache.machine_key(('NVIDIA H100 80GB HBM3', 'NVIDIA H100 80GB HBM3'))
  assert gpus != key
  assert gpus == compilation_cache.machine_key(('NVIDIA H100 80GB HBM3',))
  assert compilation_cache.machine_key(('NVIDIA H200',)) != gpus
  # Another CPU (its model, or one instruction-set flag more) is another folder.
  cpu = compilation_cache._cpu_description()
  assert 'flags' in cpu or 'features' in cpu or 'isa' in cpu, cpu  # (this Linux: /proc/cpuinfo)
  monkeypatch.setattr(compilation_cache, '_cpu_description', lambda: cpu + ' avx512_bf16')
  assert compilation_cache.machine_key() != key
  monkeypatch.setattr(compilation_cache, '_cpu_description', lambda: '')  # no /proc/cpuinfo
  assert compilation_cache.machine_key() not in (key, gpus)  # the host's name instead


_COMPILED_FIRST = '''
import sys, warnings
import jax, jax.numpy as jnp, numpy as np
from scaled_ql import compilation_cache
jax.jit(jnp.sin)(np.ones(3, np.float32)).block_until_ready()  # JAX sets up its cache here
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  assert compilation_cache.use_run_cache(sys.argv[1]) is None
assert 'is not used by this process' in str(caught[-1].message), caught
assert compilation_cache.describe() == 'no compilation cache'
print('ok')
'''


def test_a_process_that_compiled_before_is_told_the_run_cache_is_not_used(tmp_path):
  """JAX reads its cache folder once, at the first compile: set later, the folder is not used,
  and use_run_cache says so instead of reporting a cache that does nothing."""
  environment = {k: v for k, v in os.environ.items()
                 if k not in ('JAX_COMPILATION_CACHE_DIR', 'JAX_ENABLE_COMPILATION_CACHE')}
  out = subprocess.run([sys.executable, '-c', _COMPILED_FIRST, str(tmp_path)], env=environment,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-3000:]


def test_entries_jax_cannot_read_are_removed_with_their_atime(tmp_path):
  """`_drop_unreadable`, on entries compressed as JAX's cache writes them."""
  from jax._src.compilation_cache import compress_executable
  whole = compress_executable(os.urandom(3000))
  (tmp_path / 'good-cache').write_bytes(whole)
  (tmp_path / 'good-atime').write_bytes(b'12345678')
  (tmp_path / 'never_read-cache').write_bytes(whole)  # (its atime not written yet)
  (tmp_path / 'cut-cache').write_bytes(whole[:len(whole) // 2])
  (tmp_path / 'cut-atime').write_bytes(b'12345678')  # a read wrote it, as JAX does
  (tmp_path / 'empty-cache').write_bytes(b'')  # killed right after the file was made
  assert compilation_cache._drop_unreadable(str(tmp_path)) == 2
  assert sorted(os.listdir(tmp_path)) == ['good-atime', 'good-cache', 'never_read-cache']
  assert compilation_cache._drop_unreadable(str(tmp_path / 'none')) == 0  # no folder yet

"""JAX's persistent compilation cache in the run's workdir: a restarted node loads what it compiled.

A node that Ray restarts (a crash, a preemption, the driver following a moved replay) builds
its learner or policy again, and XLA compiled the same update and the same policy shapes again.
With JAX's own persistent cache (`jax_compilation_cache_dir`) the executables compiled by a
node's first start are loaded by its later ones; tracing and lowering remain (JAX computes its
key from the lowered program). What it saves is measured in BUILD_NOTES ("Measured on
2026-12-07 beside the targets"; `benchmarks/compilation_cache_restore.py --startup`).

The folder is WORKDIR/compilation_cache/<machine> (`cache_dir`). XLA compiles for the CPU it
runs on (its instruction set) and JAX's cache key does not include the CPU: the machine part is
a hash of the CPU's model and flags (and of the accelerators' kinds, which JAX's key has too,
and of JAX's compression, with which `_drop_unreadable` reads the entries),
so that hosts of a cluster whose CPUs differ never load each other's executables and identical
hosts share them.

JAX's own switches win: JAX_COMPILATION_CACHE_DIR set (the test suite sets one) keeps that
folder; JAX_ENABLE_COMPILATION_CACHE=false turns the cache off. JAX stores only what took at
least `jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile. The folder has
no size limit (`jax_compilation_cache_max_size` -1: no eviction, and no lock between the
processes) and may be deleted at any time. JAX writes an entry in place and never rewrites one
that exists, so an entry cut short (a kill, a full disk) would be read with a warning and
compiled again at every start: `use_run_cache` removes the entries JAX cannot read first
(`_drop_unreadable`).

`counts()` says what the cache did in this process (the learner logs it at its first step; the
learner, evaluator and actor nodes show it in their status).
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
import zlib
from typing import Optional

FOLDER = 'compilation_cache'  # WORKDIR/FOLDER/<machine>

# Events JAX records (jax.monitoring), counted from the first `use_run_cache` of the process.
_HIT = '/jax/compilation_cache/cache_hits'
_MISS = '/jax/compilation_cache/cache_misses'  # (recorded when JAX goes to write an executable)
_lock = threading.Lock()
_counts = dict(loaded=0, compiled=0)
_listening = False
_in_use: Optional[str] = None  # the folder `use_run_cache` gave JAX (or found set)


def _cpu_description() -> str:
  """The first processor's model name and flags from /proc/cpuinfo ('' where there is none)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      text = f.read().split('\n\n', 1)[0]
  except OSError:
    return ''
  keep = ('model name', 'flags', 'features', 'cpu model', 'isa')  # x86, arm, others
  return '\n'.join(line for line in text.splitlines()
                   if line.split(':', 1)[0].strip().lower() in keep)


def machine_key(device_kinds: tuple[str, ...] = ()) -> str:
  """'<arch>-<12 hex>': the CPU architecture, then a hash of the CPU's model and flags and of
  `device_kinds` (the accelerators'). Without /proc/cpuinfo, the host's name is hashed
  instead: such hosts never share."""
  cpu = _cpu_description() or f'host {platform.node()}'
  digest = hashlib.sha256('\n'.join((cpu, *sorted(set(device_kinds)))).encode()).hexdigest()
  return f'{platform.machine() or "cpu"}-{digest[:12]}'


def cache_dir(workdir: str) -> str:
  """WORKDIR/compilation_cache/<machine_key of this process's devices and of JAX's compression
  (zstd where `zstandard` is installed, else zlib: `_drop_unreadable` reads entries with it)>."""
  import jax
  from jax._src import compilation_cache as jax_cache
  kinds = tuple(d.device_kind for d in jax.devices() if d.platform != 'cpu')
  compression = 'zstd' if getattr(jax_cache, 'zstandard', None) is not None else 'zlib'
  return os.path.join(workdir, FOLDER, machine_key(kinds + (f'compression {compression}',)))


def size_bytes(workdir: str) -> int:
  """What the run's cache holds on disk (WORKDIR/compilation_cache, every machine's folder);
  0 where there is none."""
  size = 0
  for root, _, files in os.walk(os.path.join(workdir, FOLDER)):
    for name in files:
      try:
        size += os.path.getsize(os.path.join(root, name))
      except OSError:  # removed meanwhile
        pass
  return size


def _count(event: str, **_) -> None:
  with _lock:
    if event == _HIT:
      _counts['loaded'] += 1
    elif event == _MISS:
      _counts['compiled'] += 1


def _drop_unreadable(folder: str) -> int:
  """Removes the entries of `folder` that JAX cannot read (a write cut short by a kill or a full
  disk, or one still under way in another process: then it is only compiled again later), with
  their `-atime` files; returns how many. JAX writes an entry in place, never rewrites one that
  exists, and writes its `-atime` at every read, readable or not: such an entry would fail to
  load at every start. Readable = JAX's own decompression of it succeeds (a cut stream fails);
  where this JAX has no `decompress_executable`, nothing is checked."""
  try:
    from jax._src.compilation_cache import decompress_executable
  except ImportError:
    return 0
  unreadable: tuple = (zlib.error,)  # what a cut stream raises (JAX: zstd if installed, or zlib)
  try:
    import zstandard  # pylint: disable=import-outside-toplevel
    unreadable += (zstandard.ZstdError,)
  except ImportError:
    pass
  try:
    names = [name for name in os.listdir(folder) if name.endswith('-cache')]
  except OSError:  # not there yet
    return 0
  dropped = 0
  for name in names:
    path = os.path.join(folder, name)
    try:
      with open(path, 'rb') as f:
        decompress_executable(f.read())
      continue
    except OSError:  # removed meanwhile by another process
      continue
    except unreadable:
      pass
    except Exception as e:  # pylint: disable=broad-except  (not a cut stream: left as it is)
      warnings.warn(f'compilation cache: {path} was not checked ({type(e).__name__}: {e})')
      continue
    for stale in (path, path[:-len('-cache')] + '-atime'):
      try:
        os.remove(stale)
      except OSError:
        pass
    dropped += 1
  return dropped


def _jax_cache_settled() -> bool:
  """Whether JAX has already set up its cache in this process (at its first compile): a folder
  set after that is not used. (A private flag of jax._src.compilation_cache; False where a JAX
  version lacks it.)"""
  from jax._src import compilation_cache as jax_cache
  return bool(getattr(jax_cache, '_cache_initialized', False))


def use_run_cache(workdir: Optional[str]) -> Optional[str]:
  """Points this process's JAX cache at `cache_dir(workdir)`, unless the environment chose a
  folder or turned the cache off, and starts `counts()`. Returns the folder in use (None: no
  cache). Call it before the process compiles anything: JAX reads the folder at its first
  compile, and a process that compiled before keeps what it had (a warning says so, and None
  is returned unless that was this folder). No workdir: the environment's cache, if any."""
  import jax
  global _listening, _in_use
  with _lock:
    if not _listening:
      jax.monitoring.register_event_listener(_count)
      _listening = True
  folder = jax.config.jax_compilation_cache_dir or None
  if jax.config.jax_enable_compilation_cache and folder is None and workdir is not None:
    wanted = cache_dir(workdir)
    if _jax_cache_settled():
      warnings.warn(f'JAX compiled before the run\'s compilation cache was set: {wanted} is not '
                    'used by this process')
    else:
      dropped = _drop_unreadable(wanted)
      if dropped:
        print(f'compilation cache {wanted}: removed {dropped} entr{"y" if dropped == 1 else "ies"} '
              'JAX cannot read (cut short; compiled again when needed)', file=sys.stderr,
              flush=True)
      jax.config.update('jax_compilation_cache_dir', wanted)
      folder = wanted
  _in_use = folder if jax.config.jax_enable_compilation_cache else None
  return _in_use


def counts() -> dict:
  """{'loaded': executables loaded from the cache, 'compiled': compiled for it (not found there,
  and slow enough to compile, `jax_persistent_cache_min_compile_time_secs`, for JAX to write;
  a write that fails only warns)} in this process since its first `use_run_cache`."""
  with _lock:
    return dict(_counts)


def describe() -> Optional[str]:
  """What the cache `use_run_cache` set up did in this process, for a log line (None where it
  was not called: nothing is counted there)."""
  if not _listening:
    return None
  if _in_use is None:
    return 'no compilation cache'
  c = counts()
  return (f'compilation cache {_in_use}: {c["loaded"]} executable(s) loaded, {c["compiled"]} '
          'compiled for it')

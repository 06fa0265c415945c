"""host_memory: a scaled_ql process keeps freed heap memory, so re-allocating a step's buffers does
not page-fault fresh pages; SCALED_QL_KEEP_FREED_MEMORY=0 turns it off (glibc; each case in its
own process, since malloc's settings are process-wide)."""
import os
import subprocess
import sys
import textwrap

import pytest

from scaled_ql import host_memory

# Imports scaled_ql, then allocates and frees buffers of 3-17 MiB from a worker thread and from
# the main thread (XLA's pattern: several threads, sizes around glibc's dynamic mmap threshold)
# and prints the minor page faults that took.
SCRIPT = textwrap.dedent('''
    import resource, threading
    import numpy as np
    import scaled_ql
    def work():
      for _ in range(30):
        buffers = [np.ones(size // 8) for size in (3 << 20, 9 << 20, 17 << 20, 5 << 20)]
        del buffers
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    work()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
''')


def faults(setting: str) -> int:
  env = dict(os.environ, **{host_memory.ENV_VAR: setting})
  out = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True, env=env,
                       timeout=120, check=True).stdout
  return int(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_importing_scaled_ql_keeps_freed_memory_and_the_variable_turns_it_off():
  assert host_memory.keep_freed_memory()  # this (glibc) process has it
  on, off = faults('1'), faults('0')
  # 60 rounds x 34 MiB of buffers: ~65k faults when each is fresh, ~5k when the heap is reused.
  assert off > 20_000, off
  assert on < off / 4, (on, off)


def test_a_bad_setting_names_the_variable(monkeypatch):
  monkeypatch.setenv(host_memory.ENV_VAR, 'yes')
  with pytest.raises(ValueError, match='SCALED_QL_KEEP_FREED_MEMORY'):
    host_memory.enabled()
  monkeypatch.setenv(host_memory.ENV_VAR, '0')
  assert host_memory.apply_from_environment() is False


def test_ray_nodes_get_glibc_variables_unless_turned_off(monkeypatch):
  monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
  env = host_memory.malloc_environment()
  assert env == {'MALLOC_MMAP_THRESHOLD_': str(32 << 20), 'MALLOC_TRIM_THRESHOLD_': str(1 << 30),
                 'MALLOC_TOP_PAD_': str(64 << 20)}
  monkeypatch.setenv(host_memory.ENV_VAR, '0')
  assert host_memory.malloc_environment() == {host_memory.ENV_VAR: '0'}

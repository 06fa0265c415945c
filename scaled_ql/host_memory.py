"""Keep freed heap memory in the process: the learner's buffers stop being page-faulted every step.

XLA on the CPU allocates a step's temporary buffers (activations, gradients: a few MB to tens of
MB each) with malloc, from several threads, and frees them at the end of the step. With glibc's
defaults, the big ones are fresh `mmap`s, freed memory above the trim threshold goes back to the
OS, and a thread arena's heap is unmapped once it is empty; either way the next step touches new
pages, which the kernel faults in and zeroes 4 KiB at a time. Measured on `cpu_small` (2 cores,
docs/history/performance_log.md "Host memory"): about 92k minor page faults per second, plus a
kernel reclaim worker busy beside the learner.

The SETTINGS: buffers up to 32 MiB (glibc's largest mmap threshold) come from the heap, up to
1 GiB of freed heap stays mapped (trim threshold), and thread-arena heaps keep a 64 MiB pad (top
pad: an empty heap is then not unmapped). Same learner: 92k -> 3-5k faults/s, +7-12% steps/s. The
cost is resident memory: a process keeps its peak heap instead of returning it.

They must be in place before the process's heavy allocations. Set late, with `mallopt`, they did
not take effect after TensorFlow had read data, nor in a Ray worker (faults stayed at 87-94k/s);
set through glibc's environment variables at process start they always did. Hence two ways in:
- this process: `scaled_ql` calls `apply_from_environment()` when it is imported, before any
  TensorFlow or XLA work of a CLI command, benchmark or test;
- Ray nodes: `launch.run.init_ray` puts `malloc_environment()` (glibc's MALLOC_* variables, in
  `launch.run.node_environment()`) into every node's environment.
`SCALED_QL_KEEP_FREED_MEMORY=0` leaves malloc's defaults everywhere. On other C libraries (musl,
macOS) glibc's knobs do not exist: nothing changes.
"""
from __future__ import annotations

import ctypes
import os

ENV_VAR = 'SCALED_QL_KEEP_FREED_MEMORY'
# (mallopt parameter number in glibc's malloc.h, glibc's environment variable, value).
SETTINGS = ((-3, 'MALLOC_MMAP_THRESHOLD_', 32 << 20),  # glibc's maximum on 64-bit
            (-1, 'MALLOC_TRIM_THRESHOLD_', 1 << 30),
            (-2, 'MALLOC_TOP_PAD_', 64 << 20))

_applied = False


def keep_freed_memory() -> bool:
  """Sets the SETTINGS with glibc's mallopt for this process; returns whether they are in effect
  (False without glibc). Idempotent."""
  global _applied
  if not _applied:
    try:  # the process's own symbols: no library search (find_library runs ldconfig, ~12 ms)
      mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
      return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all([mallopt(param, value) == 1 for param, _, value in SETTINGS])
  return _applied


def enabled() -> bool:
  """Whether the environment asks for it (SCALED_QL_KEEP_FREED_MEMORY, default 1)."""
  value = os.environ.get(ENV_VAR, '1').strip().lower()
  if value not in ('0', '1', 'false', 'true'):
    raise ValueError(f'{ENV_VAR}={value!r}: expected 0 or 1')
  return value in ('1', 'true')


def malloc_environment() -> dict[str, str]:
  """Environment variables for a child process (a Ray node): glibc's MALLOC_* variables of the
  SETTINGS when enabled, and SCALED_QL_KEEP_FREED_MEMORY as set here."""
  env = {name: str(value) for _, name, value in SETTINGS} if enabled() else {}
  if ENV_VAR in os.environ:
    env[ENV_VAR] = os.environ[ENV_VAR]
  return env


def apply_from_environment() -> bool:
  """`keep_freed_memory()` unless SCALED_QL_KEEP_FREED_MEMORY=0; returns whether it is in effect."""
  return keep_freed_memory() if enabled() else False

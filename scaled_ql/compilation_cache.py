"""JAX's persistent compilation cache in the run's workdir: a restarted node loads what it compiled.

A node that Ray restarts (a crash, a preemption, the driver following a moved replay) builds
its learner or policy again, and XLA compiled the same update and the same policy shapes again:
cpu_small's learner took ~12 s to its first step, a ResNet-101 update compiles in 25-55 s on
this CPU. With JAX's own persistent cache (`jax_compilation_cache_dir`) the executables compiled
by a node's first start are loaded by its later ones; what is left is tracing and lowering.
Measured on cpu_small (`benchmarks/compilation_cache_restore.py --config cpu_small --startup`,
BUILD_NOTES): a restarted learner's construction, restore and first step took 12.8 s without
the cache and 7.1 s with it (medians of 3, load 0.8-1.1).

The folder is WORKDIR/compilation_cache/<machine> (`cache_dir`). XLA compiles for the machine's
CPU (its instruction set) and JAX's cache key does not include it, nor a GPU's model: the
machine part is a hash of the CPU's model and flags and of the accelerators' kinds, so that the
hosts of a cluster that differ never load each other's executables and identical hosts share.

JAX's own switches win: JAX_COMPILATION_CACHE_DIR set (the test suite sets one) keeps that
folder; JAX_ENABLE_COMPILATION_CACHE=false turns the cache off. JAX caches only what took at
least `jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile.

`counts()` says what the cache did in this process (the learner logs it at its first step and
shows it in its status).
"""
from __future__ import annotations

import hashlib
import os
import platform
import threading
from typing import Optional

FOLDER = 'compilation_cache'  # WORKDIR/FOLDER/<machine>

# Events and durations JAX records (jax.monitoring), counted from the first `use_run_cache`.
_HIT = '/jax/compilation_cache/cache_hits'
_MISS = '/jax/compilation_cache/cache_misses'
_SAVED = '/jax/compilation_cache/compile_time_saved_sec'
_lock = threading.Lock()
_counts = dict(loaded=0, stored=0, saved_s=0.0)
_listening = False


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
  """WORKDIR/compilation_cache/<machine_key of this process's devices>."""
  import jax
  kinds = tuple(d.device_kind for d in jax.devices() if d.platform != 'cpu')
  return os.path.join(workdir, FOLDER, machine_key(kinds))


def _count(event: str, **_) -> None:
  with _lock:
    if event == _HIT:
      _counts['loaded'] += 1
    elif event == _MISS:
      _counts['stored'] += 1


def _count_duration(event: str, seconds: float, **_) -> None:
  if event == _SAVED:
    with _lock:
      _counts['saved_s'] += max(0.0, float(seconds))


def use_run_cache(workdir: Optional[str]) -> Optional[str]:
  """Points this process's JAX cache at `cache_dir(workdir)`, unless the environment chose a
  folder or turned the cache off, and starts `counts()`. Returns the folder in use (None: no
  cache). Call it before the process compiles anything: JAX reads the folder at its first
  compile (a later change is ignored). No workdir: only the environment's cache, if any."""
  import jax
  global _listening
  with _lock:
    if not _listening:
      jax.monitoring.register_event_listener(_count)
      jax.monitoring.register_event_duration_secs_listener(_count_duration)
      _listening = True
  if not jax.config.jax_enable_compilation_cache:
    return None
  if jax.config.jax_compilation_cache_dir or workdir is None:
    return jax.config.jax_compilation_cache_dir or None
  folder = cache_dir(workdir)
  jax.config.update('jax_compilation_cache_dir', folder)
  return folder


def counts() -> dict:
  """{'loaded': executables loaded from the cache, 'stored': compiled and written to it (JAX
  writes only those that took the minimum compile time), 'saved_s': the compile time of the
  loaded ones, less their loading} in this process since `use_run_cache`."""
  with _lock:
    return dict(_counts)


def describe() -> str:
  """Where this process's cache is and what it did, for a log line."""
  import jax
  folder = jax.config.jax_compilation_cache_dir
  if not (jax.config.jax_enable_compilation_cache and folder):
    return 'no compilation cache'
  c = counts()
  return (f'compilation cache {folder}: {c["loaded"]} executable(s) loaded '
          f'({c["saved_s"]:.1f} s of compiling saved), {c["stored"]} compiled and stored')

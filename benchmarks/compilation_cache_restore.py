"""Is a learner restored from a checkpoint exact when its update comes from JAX's persistent
compilation cache, and how much of a restart's start-up does the cache save? (`Learner.restore`,
`scaled_ql/compilation_cache.py`; tests/test_checkpoint_faults.py runs the first part.)

    .venv/bin/python benchmarks/compilation_cache_restore.py [--config cpu_tiny] [--out DIR]
    flock /tmp/scaled_ql_heavy.lock .venv/bin/python benchmarks/compilation_cache_restore.py \
        --config cpu_small --startup

Processes on one workdir, each using the run's cache as a node does
(`compilation_cache.use_run_cache`: WORKDIR/compilation_cache/<machine>, empty at the start):
(1) a fresh learner steps 3 times, saves, writes its compiled update to the cache, and steps 3
more times (the reference); (2) a learner restored from that checkpoint steps the same 3 more
times, on the same batches, its update loaded from the cache. (2) must exit 0 with the metrics of
(1) (the update is deterministic on the CPU).
With `--startup` (every process then stores what a run stores: JAX's default minimum compile
time, 1 s, where the exactness check alone lowers it to 0.5 s), (3) the same restore with the
cache off (JAX_ENABLE_COMPILATION_CACHE=false), and then (2) and (3) again, alternating,
`--repeats` times: a restart's start-up (the learner built and restored, and its first step;
TensorFlow imported before, as in a node) with the cache and without, medians, the load average
beside them.
Before `Learner.restore` copied the restored state into buffers of XLA's own, (2) did not, with
jaxlib 0.4.34 on the CPU: it aborted ('corrupted double-linked list', 'double free or
corruption') or segfaulted, and in a Ray program the restarted learner stepped to
grad_norm=nan (BUILD_NOTES "Tests", 2026-12-01 evening).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Optional

PHASE = '''
import itertools, json, sys, time
started = time.perf_counter()
import jax
import tensorflow  # (imported by a node before its learner: Reverb's client; rlax's first trace
                   # imports it too, through distrax and TensorFlow Probability)
from scaled_ql import compilation_cache, loggers
from scaled_ql.agents import learner as learner_lib, runner as runner_lib
from scaled_ql.configs import get_config
from scaled_ql.types import random_frame_windows
cfg = get_config(sys.argv[1]); workdir = sys.argv[2]; restore = sys.argv[3] == 'restore'
folder = compilation_cache.use_run_cache(workdir)
imported = time.perf_counter()
# Batch k is the same in both processes: the restored learner starts at step 3.
batches = (random_frame_windows(cfg, seed=k) for k in itertools.count(3 if restore else 0))
runner = runner_lib.LearnerRunner(
    learner_lib.Learner(cfg, batches, devices=jax.local_devices()[:1]), workdir,
    logger=loggers.MultiLogger([]), handle_signals=False)
if restore:
  assert runner.restore() and runner.steps == 3, runner.steps
else:
  for _ in range(3):
    runner.step()
  runner.save()
metrics = runner.step()
first_step = time.perf_counter()
for _ in range(2):
  metrics = runner.step()
runner.close()
print(json.dumps(dict(step=int(runner.steps), cache=folder, **compilation_cache.counts(),
                      startup_s=round(first_step - imported, 2),
                      imports_s=round(imported - started, 2),
                      loss=float(metrics['loss']), grad_norm=float(metrics['grad_norm']))))
'''


def phase(config: str, workdir: str, mode: str, cache: bool = True,
          min_compile_s: Optional[str] = '0.5') -> dict:
  """One process (PHASE). `min_compile_s`: JAX's minimum compile time of what it stores (None:
  JAX's default, 1 s, as in a run; 0.5 stores cpu_tiny's update on a fast machine too)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')}
  env['JAX_ENABLE_COMPILATION_CACHE'] = 'true' if cache else 'false'
  if min_compile_s is not None:
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = min_compile_s
  out = subprocess.run([sys.executable, '-c', PHASE, config, workdir, mode], env=env,
                       capture_output=True, text=True, timeout=600)
  lines = [line for line in out.stdout.splitlines() if line.startswith('{')]
  error = [line for line in out.stderr.splitlines() if line and line[:1] not in 'WI'][-1:]
  return dict(returncode=out.returncode, **(json.loads(lines[-1]) if lines else {}),
              **({} if out.returncode == 0 else dict(last_error_line=error)))


def _same(a: dict, b: dict) -> bool:
  return a.get('returncode') == b.get('returncode') == 0 and all(
      a.get(k) == b.get(k) for k in ('step', 'loss', 'grad_norm'))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='cpu_tiny')
  parser.add_argument('--out', default=None, help='working folder (default: a temporary one)')
  parser.add_argument('--startup', action='store_true',
                      help="also time a restart's start-up with the cache and without")
  parser.add_argument('--repeats', type=int, default=3, help='restarts of each kind (--startup)')
  args = parser.parse_args()
  workdir = os.path.join(args.out or tempfile.mkdtemp(prefix='compilation_cache_restore_'), 'run')
  min_compile_s = None if args.startup else '0.5'  # timing: what a run stores
  fresh = phase(args.config, workdir, 'fresh', min_compile_s=min_compile_s)
  print('1. fresh learner (writes the cache), 3 steps, save, 3 more:', fresh, flush=True)
  cache = fresh.get('cache')
  if not (cache and os.path.dirname(cache) == os.path.join(workdir, 'compilation_cache')
          and os.path.isdir(cache) and os.listdir(cache)):
    sys.exit(f'the run\'s compilation cache (WORKDIR/compilation_cache/<machine>) stayed empty '
             f'or was elsewhere ({cache}): nothing was tested')
  restored = phase(args.config, workdir, 'restore', min_compile_s=min_compile_s)
  print('2. restored learner, update from the cache, the same 3 steps:', restored, flush=True)
  same = _same(fresh, restored) and restored.get('loaded', 0) > 0
  print('verdict:', 'exact: the restored learner with a cached update equals the reference'
        if same else 'NOT EXACT (or nothing loaded from the cache): the restored learner with a '
        'cached update crashed or differs')
  if same and args.startup:
    times = dict(cached=[restored['startup_s']], uncached=[])
    for i in range(args.repeats * 2 - 1):
      kind = 'uncached' if i % 2 == 0 else 'cached'
      row = phase(args.config, workdir, 'restore', cache=kind == 'cached', min_compile_s=None)
      load = os.getloadavg()[0]
      print(f'3. restore, cache {"on" if kind == "cached" else "off"}: start-up '
            f'{row.get("startup_s")} s (load {load:.2f}); {row}', flush=True)
      same = same and _same(fresh, row)
      if (row.get('loaded', 0) > 0) != (kind == 'cached'):  # the cache did what the arm says
        sys.exit(f'a restore with the cache {"on" if kind == "cached" else "off"} loaded '
                 f'{row.get("loaded")} executable(s): the timing compares nothing')
      times[kind].append(row.get('startup_s', float('nan')))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"start-up of a restart ({args.config}: the learner built and restored, and its first "
          f"step; imports before it excluded): {med['cached']:.2f} s with the cache, "
          f"{med['uncached']:.2f} s without (medians of {len(times['cached'])} / "
          f"{len(times['uncached'])}), {med['uncached'] - med['cached']:.2f} s saved; load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
  sys.exit(0 if same else 1)


if __name__ == '__main__':
  main()

"""Is a learner restored from a checkpoint exact when its update comes from JAX's persistent
compilation cache? (`Learner.restore`; tests/test_checkpoint_faults.py runs this.)

    .venv/bin/python benchmarks/compilation_cache_restore.py [--config cpu_tiny] [--out DIR]

Two processes sharing one JAX_COMPILATION_CACHE_DIR (empty at the start): (1) a fresh learner
steps 3 times, saves, writes its compiled update to the cache, and steps 3 more times (the
reference); (2) a learner restored from that checkpoint steps the same 3 more times, on the same
batches, its update loaded from the cache. (2) must exit 0 with the metrics of (1) (the update is
deterministic on the CPU).
Before `Learner.restore` copied the restored state into buffers of XLA's own, (2) did not, with
jaxlib 0.4.34 on the CPU: it aborted ('corrupted double-linked list', 'double free or
corruption') or segfaulted, and in a Ray program the restarted learner stepped to
grad_norm=nan (BUILD_NOTES "Tests", 2026-12-01 evening).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

PHASE = '''
import itertools, json, sys, jax
from scaled_ql import loggers
from scaled_ql.agents import learner as learner_lib, runner as runner_lib
from scaled_ql.configs import get_config
from scaled_ql.types import random_frame_windows
cfg = get_config(sys.argv[1]); workdir = sys.argv[2]; restore = sys.argv[3] == 'restore'
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
for _ in range(3):
  metrics = runner.step()
runner.close()
print(json.dumps(dict(step=int(runner.steps), cache=jax.config.jax_enable_compilation_cache,
                      loss=float(metrics['loss']), grad_norm=float(metrics['grad_norm']))))
'''


def phase(config: str, workdir: str, mode: str, cache_dir: str) -> dict:
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5', JAX_ENABLE_COMPILATION_CACHE='true')
  out = subprocess.run([sys.executable, '-c', PHASE, config, workdir, mode], env=env,
                       capture_output=True, text=True, timeout=600)
  lines = [line for line in out.stdout.splitlines() if line.startswith('{')]
  error = [line for line in out.stderr.splitlines() if line and line[:1] not in 'WI'][-1:]
  return dict(returncode=out.returncode, **(json.loads(lines[-1]) if lines else {}),
              **({} if out.returncode == 0 else dict(last_error_line=error)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='cpu_tiny')
  parser.add_argument('--out', default=None, help='working folder (default: a temporary one)')
  args = parser.parse_args()
  root = args.out or tempfile.mkdtemp(prefix='compilation_cache_restore_')
  cache, workdir = os.path.join(root, 'cache'), os.path.join(root, 'run')
  fresh = phase(args.config, workdir, 'fresh', cache)
  print('1. fresh learner (writes the cache), 3 steps, save, 3 more:', fresh, flush=True)
  if not (os.path.isdir(cache) and os.listdir(cache)):
    sys.exit('the compilation cache stayed empty: nothing was tested')
  restored = phase(args.config, workdir, 'restore', cache)
  print('2. restored learner, update from the cache, the same 3 steps:', restored, flush=True)
  same = fresh.get('returncode') == restored.get('returncode') == 0 and all(
      restored.get(k) == fresh.get(k) for k in ('step', 'loss', 'grad_norm'))
  print('verdict:', 'exact: the restored learner with a cached update equals the reference'
        if same else 'NOT EXACT: the restored learner with a cached update crashed or differs')
  sys.exit(0 if same else 1)


if __name__ == '__main__':
  main()

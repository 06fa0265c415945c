"""Learner steps/s inside the distributed program divided by the standalone learner's (goal >= 0.9).

    .venv/bin/python benchmarks/program_throughput.py --config cpu_small --data-dir data/generated \
        [--seconds 60] [--evaluators 1] [--eval-every-seconds S]

Standalone: `Learner` in this process on one pre-made batch repeated (no data path, no Ray): the
learner's own ceiling. Program: `program.build` + `program.run` (Reverb server, inserters, learner
fed by stratified batches, variable server publishing every `publish_every_steps`, evaluators on
their own clock); its rate is measured from the learner node's step counter over `--seconds` after
the first `--warmup-steps` steps (compilation and replay fill excluded). On a machine with few
cores the evaluators and inserters compete with the learner for CPU; `--eval-every-seconds` large
shows the cost of the distribution machinery alone.
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import numpy as np


def standalone_steps_per_s(cfg, seconds: float, warmup_steps: int = 5) -> float:
  from scaled_ql.agents.learner import Learner
  from scaled_ql.types import Transition
  b = cfg.agent.batch_size
  rng = np.random.default_rng(0)
  game_id = rng.integers(0, len(cfg.games), b).astype(np.int32)
  batch = Transition(
      observation=rng.integers(0, 255, (b, 84, 84, 4), dtype=np.uint8),
      action=np.zeros((b,), np.int32), reward=rng.standard_normal(b).astype(np.float32),
      discount=np.full((b,), 0.97, np.float32),
      next_observation=rng.integers(0, 255, (b, 84, 84, 4), dtype=np.uint8), game_id=game_id)
  learner = Learner(cfg, itertools.repeat(batch), workdir=None, handle_signals=False)
  for _ in range(warmup_steps):
    learner.step()
  start, steps = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    learner.step()
    steps += 1
  return steps / (time.perf_counter() - start)


def program_steps_per_s(cfg, seconds: float, evaluators: int, warmup_steps: int) -> dict:
  import ray
  from scaled_ql.launch import program, run
  workdir = tempfile.mkdtemp(prefix='program_throughput_')
  run.prepare_workdir(cfg, workdir)
  run.init_ray(None, None, cfg)
  marks = {}

  def measure(status):
    s = status.learner
    if not s:
      return False
    now = time.time()
    if 'start' not in marks and s['steps'] >= warmup_steps:
      marks['start'] = (now, s['steps'])
    if 'start' in marks and now - marks['start'][0] >= seconds:
      marks['end'] = (now, s['steps'])
      marks['skipped_publishes'] = s['publishes_skipped']
      return True
    return False

  try:
    prog = program.build(cfg, workdir, evaluators, num_steps=10**9)
    program.run(prog, log=lambda line: print(line, flush=True), stop_when=measure,
                final_eval_timeout_s=None, status_every_s=1.0)
  finally:
    ray.shutdown()
  (t0, s0), (t1, s1) = marks['start'], marks['end']
  return dict(steps_per_s=(s1 - s0) / (t1 - t0), steps=s1 - s0,
              skipped_publishes=marks['skipped_publishes'], workdir=workdir)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='cpu_small')
  parser.add_argument('--data-dir', default='data/generated')
  parser.add_argument('--seconds', type=float, default=60.0)
  parser.add_argument('--warmup-steps', type=int, default=20)
  parser.add_argument('--evaluators', type=int, default=1)
  parser.add_argument('--eval-every-seconds', type=float, default=None)
  args = parser.parse_args()
  from scaled_ql.launch import run
  cfg = run.resolve_config(args.config, args.data_dir, evaluators=max(1, args.evaluators))
  if args.eval_every_seconds is not None:
    cfg = cfg.replace(eval=dict(eval_every_seconds=args.eval_every_seconds))
  run.check_data(cfg)
  print(f'config {cfg.name}, batch {cfg.agent.batch_size}, cores {os.cpu_count()}', flush=True)
  alone = standalone_steps_per_s(cfg, args.seconds)
  print(f'standalone learner: {alone:.2f} steps/s', flush=True)
  inside = program_steps_per_s(cfg, args.seconds, args.evaluators, args.warmup_steps)
  print(f'learner inside the program: {inside["steps_per_s"]:.2f} steps/s over '
        f'{inside["steps"]} steps ({inside["skipped_publishes"]} publishes skipped)')
  print(f'| config | evaluators | eval_every_s | standalone steps/s | in-program steps/s | ratio |')
  print(f'| {cfg.name} | {args.evaluators} | {cfg.eval.eval_every_seconds:g} | {alone:.2f} | '
        f'{inside["steps_per_s"]:.2f} | {inside["steps_per_s"] / alone:.2f} |')


if __name__ == '__main__':
  main()

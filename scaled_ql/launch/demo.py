"""`scaled-ql demo`: generate a small local dataset, train `cpu_small` for a few minutes on the
local machine and print human-normalized scores."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

from scaled_ql.configs import ConfigError
from scaled_ql.launch import run

DEMO_CONFIG = 'cpu_small'
DEMO_DATA_DIR = os.path.join('data', 'generated')
DEMO_WORKDIR = os.path.join('runs', 'demo')
# Local dataset for the demo: 10 "checkpoints" (the `suboptimal` selection reads 00..09) of
# DEMO_STEPS_PER_CHECKPOINT agent steps per game, played by the generator's heuristic policies.
DEMO_CHECKPOINTS = 10
DEMO_STEPS_PER_CHECKPOINT = 500
DEMO_TRAIN_MINUTES = 6.0


def ensure_demo_data(cfg) -> None:
  """Generates the demo dataset into `cfg.data.data_dir` unless it already holds every game."""
  from scaled_ql.datasets import generate
  try:
    run.check_data(cfg)
    return
  except ConfigError:
    pass
  print(f'[demo] generating a local dataset for {", ".join(cfg.games)} into '
        f'{cfg.data.data_dir} ({DEMO_CHECKPOINTS} checkpoints x {DEMO_STEPS_PER_CHECKPOINT} steps '
        'per game) ...', flush=True)
  generate.generate(cfg.games, cfg.data.data_dir, run=cfg.data.run,
                    num_checkpoints=DEMO_CHECKPOINTS,
                    steps_per_checkpoint=DEMO_STEPS_PER_CHECKPOINT, seed=cfg.train.seed,
                    if_exists='skip')
  run.check_data(cfg)


def demo(workdir: str = DEMO_WORKDIR, data_dir: str = DEMO_DATA_DIR,
         minutes: float = DEMO_TRAIN_MINUTES, steps: Optional[int] = None, *,
         games: Optional[str] = None, overrides: Sequence[str] = (),
         allow_config_change: bool = False) -> int:
  """Runs the demo; returns the exit code (raises ConfigError on bad input, before the data is
  generated). `games`/`overrides`: as `run.resolve_config`'s."""
  from scaled_ql.eval import evaluator
  cfg = run.resolve_config(DEMO_CONFIG, data_dir, steps, 1, games=games, overrides=overrides)
  run.check_resume(cfg, workdir, allow_config_change)
  started = time.time()
  ensure_demo_data(cfg)
  print(f'[demo] data ready in {time.time() - started:.0f}s; training {cfg.name} '
        f'({", ".join(cfg.games)}) for at most {minutes:g} minutes ...', flush=True)
  status = run.train(cfg, workdir, timeout_s=minutes * 60,
                     allow_config_change=allow_config_change)
  # The program ends with its evaluator evaluating the final params (the last checkpoint).
  scores = status.latest_scores() if status else {}
  if not scores:
    print('[demo] no evaluation finished; see the logs above', file=sys.stderr)
    return 1
  learner_steps = status.learner['steps'] if status.learner else '?'
  print(f'\nScaled QL ({cfg.name}) after {learner_steps} learner steps, '
        f'{time.time() - started:.0f}s in all; human-normalized scores '
        f'(a budget of {cfg.eval.steps_per_game} agent steps per game, every episode started '
        f'played to its end, epsilon {cfg.eval.epsilon}):')
  run.print_scores(status)
  # Over the games with a completed episode only; the others are named, never counted.
  print(f'  {evaluator.aggregate_line(scores)}')
  print(f'report: scaled-ql report run {workdir}  (learning curves + summary)')
  return 0

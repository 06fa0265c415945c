"""`scaled-ql train` (the distributed program on Ray) and `scaled-ql demo` (see scaled_ql/cli.py).

Everything that can be checked without starting a process (config name, games, agent settings,
data directory and the games' datasets in it, evaluator count) is checked first, so a bad run
fails in a second with a message naming the flag at fault.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

DEMO_CONFIG = 'cpu_small'
DEMO_DATA_DIR = os.path.join('data', 'generated')
DEMO_WORKDIR = os.path.join('runs', 'demo')
# Local dataset for the demo: 10 "checkpoints" (the `suboptimal` selection reads 00..09) of
# DEMO_STEPS_PER_CHECKPOINT agent steps per game, played by the generator's heuristic policies.
DEMO_CHECKPOINTS = 10
DEMO_STEPS_PER_CHECKPOINT = 500
DEMO_TRAIN_MINUTES = 6.0


class LaunchError(ValueError):
  """Bad input for a launch command; the message names the flag/file/game at fault."""


def register(subparsers) -> None:
  p = subparsers.add_parser(
      'train', help='run the distributed program (Reverb, inserters, learner, variable server, '
      'evaluators) on Ray', description=_TRAIN_DESCRIPTION,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_train_args(p)
  p.set_defaults(handler=_train)

  p = subparsers.add_parser(
      'demo', help='generate a small local dataset, train cpu_small for a few minutes, print '
      'human-normalized scores')
  p.add_argument('--workdir', default=DEMO_WORKDIR)
  p.add_argument('--data-dir', default=DEMO_DATA_DIR)
  p.add_argument('--minutes', type=float, default=DEMO_TRAIN_MINUTES,
                 help='training time budget (default %(default)s)')
  p.add_argument('--steps', type=int, default=None,
                 help='learner steps (default: the config\'s; the time budget usually ends first)')
  p.set_defaults(handler=_demo)


_TRAIN_DESCRIPTION = """\
Runs the whole program as Ray actors: a Reverb server (one table per game), inserters streaming
the RLDS data into it, the learner (checkpoints in WORKDIR/checkpoints), a sharded variable server
and E evaluators (WORKDIR/eval/evaluator_<i>.jsonl, TensorBoard in WORKDIR/tb). Without --address
Ray is started locally (ray.init(num_cpus=...)); --address auto|ray://host:port runs the same
program on an existing cluster. Ctrl-C/SIGTERM: final checkpoint, every actor stopped.
Report afterwards: scaled-ql report run WORKDIR."""


def _add_train_args(p: argparse.ArgumentParser) -> None:
  p.add_argument('--config', required=True, help='config name (see scaled_ql/configs)')
  p.add_argument('--data-dir', default=None, help='TFDS data dir (default: the config\'s)')
  p.add_argument('--workdir', required=True)
  p.add_argument('--evaluators', type=int, default=None,
                 help='evaluator nodes, each owning a share of the games (default: config)')
  p.add_argument('--steps', type=int, default=None, help='learner steps (default: config)')
  p.add_argument('--address', default=None,
                 help='Ray cluster to join: auto | ray://host:port (default: start Ray locally)')
  p.add_argument('--num-cpus', type=int, default=None,
                 help='local Ray only: logical CPUs (default: enough for every node)')
  p.add_argument('--learner-gpus', type=float, default=0,
                 help='GPUs the learner node asks Ray for (1 on a GPU cluster; default 0)')
  p.add_argument('--timeout-minutes', type=float, default=None,
                 help='stop (with a final checkpoint) after this much wall-clock time')


# --------------------------------------------------------------------------------- validation

def resolve_config(config: str, data_dir: Optional[str] = None, steps: Optional[int] = None,
                   evaluators: Optional[int] = None):
  """The run's ExperimentConfig with the command-line overrides; raises LaunchError."""
  from scaled_ql import configs, games as games_lib
  try:
    cfg = configs.get_config(config)
  except configs.UnknownConfigError as e:
    raise LaunchError(f'--config: {e}') from e
  overrides: dict = {}
  if data_dir is not None:
    overrides['data'] = dict(data_dir=data_dir)
  if steps is not None:
    if steps < 1:
      raise LaunchError(f'--steps must be >= 1, got {steps}')
    overrides['train'] = dict(num_steps=steps)
  if evaluators is not None:
    overrides['eval'] = dict(num_evaluators=evaluators)
  cfg = cfg.replace(**overrides)
  try:
    games_lib.check_games(cfg.games, f'config {cfg.name!r} games')
  except ValueError as e:
    raise LaunchError(str(e)) from e
  if not 1 <= cfg.eval.num_evaluators <= len(cfg.games):
    raise LaunchError(f'--evaluators must be between 1 and the {len(cfg.games)} games of '
                      f'{cfg.name!r}, got {cfg.eval.num_evaluators}')
  if cfg.train.variable_server_shards < 1:
    raise LaunchError(f'train.variable_server_shards must be >= 1, got '
                      f'{cfg.train.variable_server_shards}')
  if not 1 <= cfg.data.num_inserters <= len(cfg.games):
    raise LaunchError(f'data.num_inserters must be between 1 and the {len(cfg.games)} games, got '
                      f'{cfg.data.num_inserters}')
  from scaled_ql.agents import builder  # the agent's own checks (loss, atoms, batch, ...)
  try:
    builder.check_agent_config(cfg)
  except ValueError as e:
    raise LaunchError(f'config {cfg.name!r}: {e}') from e
  return cfg


def check_data(cfg) -> None:
  """The data dir exists and holds every game's dataset (local dirs; gs:// is checked lazily)."""
  from scaled_ql.datasets import tfds_layout
  data_dir = cfg.data.data_dir
  if '://' in data_dir:
    return
  if not os.path.isdir(data_dir):
    raise LaunchError(f'--data-dir {data_dir!r} does not exist (generate one with '
                      f'`scaled-ql data generate --games {",".join(cfg.games)} --out {data_dir}`)')
  root = os.path.join(data_dir, cfg.data.builder)
  missing = [g for g in cfg.games
             if not os.path.isdir(os.path.join(root, tfds_layout.config_name(g, cfg.data.run)))]
  if missing:
    have = sorted(os.listdir(root)) if os.path.isdir(root) else []
    raise LaunchError(f'--data-dir {data_dir!r} has no {cfg.data.builder} data for game(s) '
                      f'{missing} (run {cfg.data.run}); it has: {have or "nothing"}')


def prepare_workdir(cfg, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(cfg.to_json())


# ------------------------------------------------------------------------------------ running

def init_ray(address: Optional[str], num_cpus: Optional[int], cfg) -> bool:
  """Connects to `address` or starts a local Ray sized for the program; True if started here."""
  import ray
  from scaled_ql.launch import program
  env = {'TF_CPP_MIN_LOG_LEVEL': '2'}
  if address:
    ray.init(address=address, runtime_env={'env_vars': env}, log_to_driver=True)
    return False
  needed = program.required_cpus(cfg)
  ray.init(num_cpus=max(num_cpus or 0, needed, os.cpu_count() or 1), include_dashboard=False,
           runtime_env={'env_vars': env}, log_to_driver=True, configure_logging=False)
  return True


def train(cfg, workdir: str, address: Optional[str] = None, num_cpus: Optional[int] = None,
          timeout_s: Optional[float] = None, learner_gpus: float = 0, log=None):
  """Runs the program to the end and returns its last `ProgramStatus` (Ray stopped after, when
  it was started here)."""
  import ray
  from scaled_ql.launch import program
  check_data(cfg)
  prepare_workdir(cfg, workdir)
  started_here = init_ray(address, num_cpus, cfg)
  try:
    prog = program.build(cfg, workdir, cfg.eval.num_evaluators, cfg.train.num_steps,
                         learner_gpus=learner_gpus)
    return program.run(prog, log=log or (lambda line: print(line, flush=True)),
                       timeout_s=timeout_s)
  finally:
    if started_here:
      ray.shutdown()


def _fail(e: Exception) -> int:
  print(f'error: {e}', file=sys.stderr)
  return 2


def _train(args) -> int:
  try:
    cfg = resolve_config(args.config, args.data_dir, args.steps, args.evaluators)
    check_data(cfg)
  except LaunchError as e:
    return _fail(e)
  timeout = args.timeout_minutes * 60 if args.timeout_minutes else None
  status = train(cfg, args.workdir, args.address, args.num_cpus, timeout, args.learner_gpus)
  _print_scores(status)
  print(f'report: scaled-ql report run {args.workdir}')
  return 0


def _print_scores(status) -> None:
  if status is None:
    return
  scores = status.latest_scores()
  if not scores:
    print('no evaluation finished yet')
    return
  for game, r in sorted(scores.items()):
    print(f"  {game:<16} score {r['score']:9.1f}  human-normalized {100 * r['normalized']:7.1f}%"
          f"  (params of step {r['param_version']})")


def _demo(args) -> int:
  import numpy as np
  from scaled_ql.eval import metrics
  try:
    cfg = resolve_config(DEMO_CONFIG, args.data_dir, args.steps, 1)
  except LaunchError as e:
    return _fail(e)
  started = time.time()
  _ensure_demo_data(cfg)
  print(f'[demo] data ready in {time.time() - started:.0f}s; training {cfg.name} '
        f'({", ".join(cfg.games)}) for at most {args.minutes:g} minutes ...', flush=True)
  status = train(cfg, args.workdir, timeout_s=args.minutes * 60)
  # The program ends with its evaluator evaluating the final params (the last checkpoint).
  scores = status.latest_scores() if status else {}
  if not scores:
    print('[demo] no evaluation finished; see the logs above', file=sys.stderr)
    return 1
  steps = status.learner['steps'] if status.learner else '?'
  print(f'\nScaled QL ({cfg.name}) after {steps} learner steps, {time.time() - started:.0f}s in '
        f'all; human-normalized scores ({cfg.eval.steps_per_game} agent steps per game, '
        f'epsilon {cfg.eval.epsilon}):')
  _print_scores(status)
  norm = np.asarray([r['normalized'] for r in scores.values()])
  print(f'  aggregate: IQM {100 * metrics.iqm(norm[None]):.1f}%  median '
        f'{100 * np.median(norm):.1f}%  mean {100 * np.mean(norm):.1f}%')
  print(f'report: scaled-ql report run {args.workdir}  (learning curves + summary)')
  return 0


def _ensure_demo_data(cfg) -> None:
  from scaled_ql.datasets import generate
  try:
    check_data(cfg)
    return
  except LaunchError:
    pass
  print(f'[demo] generating a local dataset for {", ".join(cfg.games)} into '
        f'{cfg.data.data_dir} ({DEMO_CHECKPOINTS} checkpoints x {DEMO_STEPS_PER_CHECKPOINT} steps '
        'per game) ...', flush=True)
  generate.generate(cfg.games, cfg.data.data_dir, run=cfg.data.run,
                    num_checkpoints=DEMO_CHECKPOINTS,
                    steps_per_checkpoint=DEMO_STEPS_PER_CHECKPOINT, seed=cfg.train.seed,
                    if_exists='skip')
  check_data(cfg)

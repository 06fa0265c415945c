"""Running a config: resolve it (with the command line's overrides), check its data and workdir,
start Ray and run the distributed program. The library behind `scaled-ql train`, `learn`,
`finetune` and `demo` (their `commands.py` modules only parse flags and call these).

Everything that can be checked without starting a process (config name, games, agent settings,
data directory and the games' datasets in it, evaluator count) is checked first, so a bad run
fails in a second with a `ConfigError` naming the flag/file/game at fault.
"""
from __future__ import annotations

import os
from typing import Optional

from scaled_ql.configs import ConfigError


def resolve_config(config: str, data_dir: Optional[str] = None, steps: Optional[int] = None,
                   evaluators: Optional[int] = None):
  """The run's ExperimentConfig with the command-line overrides; raises ConfigError."""
  from scaled_ql import configs, games as games_lib
  try:
    cfg = configs.get_config(config)
  except configs.UnknownConfigError as e:
    raise ConfigError(f'--config: {e}') from e
  overrides: dict = {}
  if data_dir is not None:
    overrides['data'] = dict(data_dir=data_dir)
  if steps is not None:
    if steps < 1:
      raise ConfigError(f'--steps must be >= 1, got {steps}')
    overrides['train'] = dict(num_steps=steps)
  if evaluators is not None:
    overrides['eval'] = dict(num_evaluators=evaluators)
  cfg = cfg.replace(**overrides)
  try:
    games_lib.check_games(cfg.games, f'config {cfg.name!r} games')
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if not 1 <= cfg.eval.num_evaluators <= len(cfg.games):
    raise ConfigError(f'--evaluators must be between 1 and the {len(cfg.games)} games of '
                      f'{cfg.name!r}, got {cfg.eval.num_evaluators}')
  if cfg.train.variable_server_shards < 1:
    raise ConfigError(f'train.variable_server_shards must be >= 1, got '
                      f'{cfg.train.variable_server_shards}')
  if not 1 <= cfg.data.num_inserters <= len(cfg.games):
    raise ConfigError(f'data.num_inserters must be between 1 and the {len(cfg.games)} games, got '
                      f'{cfg.data.num_inserters}')
  from scaled_ql.agents import builder  # the agent's own checks (loss, atoms, batch, ...)
  try:
    builder.check_agent_config(cfg)
  except ValueError as e:
    raise ConfigError(f'config {cfg.name!r}: {e}') from e
  return cfg


def check_data(cfg) -> None:
  """The data dir exists and holds every game's dataset (local dirs; gs:// is checked lazily)."""
  from scaled_ql.datasets import tfds_layout
  data_dir = cfg.data.data_dir
  if '://' in data_dir:
    return
  if not os.path.isdir(data_dir):
    raise ConfigError(f'--data-dir {data_dir!r} does not exist (generate one with '
                      f'`scaled-ql data generate --games {",".join(cfg.games)} --out {data_dir}`)')
  root = os.path.join(data_dir, cfg.data.builder)
  missing = [g for g in cfg.games
             if not os.path.isdir(os.path.join(root, tfds_layout.config_name(g, cfg.data.run)))]
  if missing:
    have = sorted(os.listdir(root)) if os.path.isdir(root) else []
    raise ConfigError(f'--data-dir {data_dir!r} has no {cfg.data.builder} data for game(s) '
                      f'{missing} (run {cfg.data.run}); it has: {have or "nothing"}')


def prepare_workdir(cfg, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(cfg.to_json())


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
          timeout_s: Optional[float] = None, learner_gpus: float = 0, log=None,
          initial_params=None):
  """Runs the program to the end and returns its last `ProgramStatus` (Ray stopped after, when
  it was started here). `initial_params`: the learner's start (offline fine-tuning)."""
  import ray
  from scaled_ql.launch import program
  check_data(cfg)
  prepare_workdir(cfg, workdir)
  started_here = init_ray(address, num_cpus, cfg)
  try:
    prog = program.build(cfg, workdir, cfg.eval.num_evaluators, cfg.train.num_steps,
                         learner_gpus=learner_gpus, initial_params=initial_params)
    return program.run(prog, log=log or (lambda line: print(line, flush=True)),
                       timeout_s=timeout_s)
  finally:
    if started_here:
      ray.shutdown()


def print_scores(status) -> None:
  """The latest evaluation of every game in a `ProgramStatus` (None: nothing to print)."""
  if status is None:
    return
  scores = status.latest_scores()
  if not scores:
    print('no evaluation finished yet')
    return
  from scaled_ql.eval import evaluator
  for game, r in sorted(scores.items()):  # 'no completed episode' instead of a score
    print(f'  {evaluator.format_row(game, r)}')

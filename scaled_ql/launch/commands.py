"""`scaled-ql train` (the distributed program on Ray), `demo` and `finetune` (see scaled_ql/cli.py).

Flags only: the library is `scaled_ql.launch.run` (resolve, check, train), `launch.demo` and
`launch.finetune`. Bad input raises `configs.ConfigError` before anything starts (exit 2).
"""
from __future__ import annotations

import argparse
import sys

from scaled_ql.configs import ConfigError
from scaled_ql.launch import demo
from scaled_ql.launch.run import check_data, print_scores, resolve_config, train


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
  p.add_argument('--workdir', default=demo.DEMO_WORKDIR)
  p.add_argument('--data-dir', default=demo.DEMO_DATA_DIR)
  p.add_argument('--minutes', type=float, default=demo.DEMO_TRAIN_MINUTES,
                 help='training time budget (default %(default)s)')
  p.add_argument('--steps', type=int, default=None,
                 help='learner steps (default: the config\'s; the time budget usually ends first)')
  p.set_defaults(handler=_demo)

  _register_finetune(subparsers)


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


def _fail(e: Exception) -> int:
  print(f'error: {e}', file=sys.stderr)
  return 2


def _train(args) -> int:
  try:
    cfg = resolve_config(args.config, args.data_dir, args.steps, args.evaluators)
    check_data(cfg)
  except ConfigError as e:
    return _fail(e)
  timeout = args.timeout_minutes * 60 if args.timeout_minutes else None
  status = train(cfg, args.workdir, args.address, args.num_cpus, timeout, args.learner_gpus)
  print_scores(status)
  print(f'report: scaled-ql report run {args.workdir}')
  return 0


def _demo(args) -> int:
  try:
    return demo.demo(args.workdir, args.data_dir, args.minutes, args.steps)
  except ConfigError as e:
    return _fail(e)


# ------------------------------------------------------------------ finetune (transfer, issue 6)

_FINETUNE_DESCRIPTION = """\
Transfer from a multi-game checkpoint (paper Section 5.2, Appendix B.4). The encoder of the
checkpoint in --pretrained (a learner workdir) initializes a fresh network of the same
architecture; the MLP trunk and the heads are re-initialized. --from-scratch runs the same
configuration from a random init (the baseline).
  offline: the training program on the new game's data (--selection, default 1%% of the run:
           uniform:1), batch 32, lr 5e-5, CQL alpha 0.05, 300k steps, final evaluation.
  online:  C51 (n-step 3, no CQL, Dopamine's settings) in a new game mode: actors collect
           experience into Reverb, the learner trains on it, the evaluator plays the same mode."""


def _register_finetune(subparsers) -> None:
  p = subparsers.add_parser('finetune', help='fine-tune a multi-game checkpoint: offline to a new '
                            'game, online to a new game mode', description=_FINETUNE_DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='finetune_command', required=True)

  def common(q):
    q.add_argument('--pretrained', default=None,
                   help='learner workdir (or its checkpoints/) of the multi-game run')
    q.add_argument('--config', default=None,
                   help='config whose network/sizes to use (default: the checkpoint\'s); its '
                   'encoder must match the checkpoint\'s')
    q.add_argument('--game', required=True)
    q.add_argument('--from-scratch', action='store_true',
                   help='same configuration, random init (needs --pretrained or --config for '
                   'the network)')
    q.add_argument('--encoder', choices=('train', 'frozen'), default='train',
                   help='fine-tune the transferred encoder or keep it frozen (default train)')
    q.add_argument('--steps', type=int, default=None, help='learner (gradient) steps')
    q.add_argument('--learning-rate', type=float, default=5e-5)
    q.add_argument('--eval-steps', type=int, default=None,
                   help='evaluation agent steps per round (default: the config\'s)')
    q.add_argument('--workdir', required=True)
    q.add_argument('--address', default=None)
    q.add_argument('--num-cpus', type=int, default=None)
    q.add_argument('--timeout-minutes', type=float, default=None)

  q = sub.add_parser('offline', help='offline fine-tuning to a new (held-out) game')
  common(q)
  q.add_argument('--data-dir', default=None, help='TFDS data dir with the game\'s data')
  q.add_argument('--selection', default='uniform:1', help='episodes used (default %(default)s)')
  q.add_argument('--cql-alpha', type=float, default=0.05)
  q.add_argument('--batch-size', type=int, default=32)
  q.set_defaults(handler=_finetune_offline)

  q = sub.add_parser('online', help='online C51 fine-tuning in a new game mode')
  common(q)
  q.add_argument('--mode', type=int, default=None, help='ALE game mode (e.g. Breakout 12)')
  q.add_argument('--actors', type=int, default=1, help='fine-tuning actor nodes (default 1)')
  q.add_argument('--scale', type=float, default=1.0,
                 help='shrink replay capacity, warm-up, epsilon decay and target period by this '
                 'factor for small machines (default 1 = Dopamine C51)')
  q.set_defaults(handler=_finetune_online)


def _finetune_base(args):
  """(base config, pretrained params or None) from --pretrained/--config; raises ConfigError."""
  from scaled_ql import configs, games as games_lib
  try:
    games_lib.check_games([args.game], '--game')
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if args.steps is not None and args.steps < 1:
    raise ConfigError(f'--steps must be >= 1, got {args.steps}')
  if args.learning_rate <= 0:
    raise ConfigError(f'--learning-rate must be > 0, got {args.learning_rate}')
  if args.eval_steps is not None and args.eval_steps < 1:
    raise ConfigError(f'--eval-steps must be >= 1, got {args.eval_steps}')
  if args.pretrained is None and not (args.from_scratch and args.config):
    raise ConfigError('--pretrained is required (or --from-scratch with --config NAME)')
  if args.from_scratch and args.encoder == 'frozen':
    raise ConfigError('--encoder frozen needs a pretrained encoder (drop --from-scratch)')
  base = params = None
  if args.config is not None:
    try:
      base = configs.get_config(args.config)
    except configs.UnknownConfigError as e:
      raise ConfigError(f'--config: {e}') from e
  if args.pretrained is not None:
    from scaled_ql.agents import transfer
    try:
      saved_cfg, params, step = transfer.load_pretrained(args.pretrained)
    except FileNotFoundError as e:
      raise ConfigError(f'--pretrained: {e}') from e
    print(f'[finetune] pretrained checkpoint {args.pretrained} step {step} ({saved_cfg.name}, '
          f'games {", ".join(saved_cfg.games)})', flush=True)
    if args.game in saved_cfg.games:
      print(f'[finetune] warning: {args.game} is one of the pre-training games (not held out)',
            file=sys.stderr, flush=True)
    base = base or saved_cfg
  if args.from_scratch:
    params = None
  return base, params


def _finetune_params(cfg, args, pretrained_params):
  from scaled_ql.agents import builder, transfer
  try:
    builder.check_agent_config(cfg)
    if pretrained_params is None:
      return None  # from scratch: the learner's own random init
    return transfer.finetune_params(cfg, args.pretrained, pretrained_params)
  except ValueError as e:  # incl. transfer.EncoderMismatchError
    raise ConfigError(str(e)) from e


def _finetune_offline(args) -> int:
  from scaled_ql import configs
  try:
    base, pretrained_params = _finetune_base(args)
    if args.batch_size < 1:
      raise ConfigError(f'--batch-size must be >= 1, got {args.batch_size}')
    cfg = configs.finetune_offline(
        base, args.game, pretrained=None if args.from_scratch else args.pretrained,
        freeze_encoder=args.encoder == 'frozen', data_dir=args.data_dir,
        selection=args.selection, learning_rate=args.learning_rate, cql_alpha=args.cql_alpha,
        batch_size=args.batch_size,
        **({} if args.steps is None else dict(num_steps=args.steps)))
    if args.eval_steps is not None:
      cfg = cfg.replace(eval=dict(steps_per_game=args.eval_steps))
    check_data(cfg)
    initial_params = _finetune_params(cfg, args, pretrained_params)
  except ConfigError as e:
    return _fail(e)
  print(f'[finetune] offline {cfg.name}: {cfg.train.num_steps} steps, batch '
        f'{cfg.agent.batch_size}, lr {cfg.agent.learning_rate:g}, alpha {cfg.agent.cql_alpha:g}, '
        f'data {cfg.data.data_dir} ({cfg.data.selection})', flush=True)
  timeout = args.timeout_minutes * 60 if args.timeout_minutes else None
  status = train(cfg, args.workdir, args.address, args.num_cpus, timeout,
                 initial_params=initial_params)
  print_scores(status)
  print(f'report: scaled-ql report run {args.workdir}')
  return 0


def _finetune_online(args) -> int:
  from scaled_ql import configs
  from scaled_ql.envs.atari import AtariEnv
  try:
    base, pretrained_params = _finetune_base(args)
    if args.actors < 1:
      raise ConfigError(f'--actors must be >= 1, got {args.actors}')
    try:
      AtariEnv(args.game, mode=args.mode).close()  # the mode exists for this game
      cfg = configs.finetune_online(
          base, args.game, args.mode, pretrained=None if args.from_scratch else args.pretrained,
          learning_rate=args.learning_rate, freeze_encoder=args.encoder == 'frozen',
          scale=args.scale, **({} if args.steps is None else dict(num_steps=args.steps)))
    except ValueError as e:
      raise ConfigError(f'--mode/--scale: {e}') from e
    cfg = cfg.replace(finetune=dict(num_actors=args.actors))
    if args.eval_steps is not None:
      cfg = cfg.replace(eval=dict(steps_per_game=args.eval_steps))
    initial_params = _finetune_params(cfg, args, pretrained_params)
  except ConfigError as e:
    return _fail(e)
  from scaled_ql.launch import finetune
  print(f'[finetune] online {cfg.name}: {cfg.train.num_steps} gradient steps (1 per '
        f'{cfg.finetune.update_period} env steps after a warm-up of '
        f'{cfg.data.min_fill_per_game}), lr {cfg.agent.learning_rate:g}, {args.actors} actor(s)',
        flush=True)
  timeout = args.timeout_minutes * 60 if args.timeout_minutes else None
  status = finetune.run_online(cfg, args.workdir, initial_params, address=args.address,
                               num_cpus=args.num_cpus, timeout_s=timeout)
  print_scores(status)
  if status is not None and status.actors:
    print('  actors: ' + finetune.format_actors(status))
  print(f'report: scaled-ql report run {args.workdir}')
  return 0

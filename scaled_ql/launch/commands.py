"""`scaled-ql train` (the distributed program on Ray), `demo` and `finetune` (see scaled_ql/cli.py).

Flags only: the library is `scaled_ql.launch.run` (resolve, check, train, fine-tuning configs),
`launch.demo` and `launch.finetune`. Bad input raises `ConfigError` before anything starts (exit 2).
"""
from __future__ import annotations

import argparse
import sys
import time

from scaled_ql.configs import FINETUNE_OFFLINE, FINETUNE_ONLINE, overrides
from scaled_ql.configs.overrides import ConfigError
from scaled_ql.launch import demo, run


def register(subparsers) -> None:
  p = subparsers.add_parser(
      'train', help='run the distributed program (Reverb, inserters, learner, variable server, '
      'evaluators) on Ray', description=_TRAIN_DESCRIPTION,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  overrides.add_flags(p)
  p.add_argument('--data-dir', default=None, help='TFDS data dir (default: the config\'s)')
  p.add_argument('--workdir', required=True)
  p.add_argument('--evaluators', type=int, default=None,
                 help='evaluator nodes, each owning a share of the games (default: config)')
  p.add_argument('--steps', type=int, default=None, help='learner steps (default: config)')
  _add_ray_args(p)
  p.add_argument('--learner-gpus', type=float, default=0,
                 help='GPUs the learner node asks Ray for (1 on a GPU cluster; default 0)')
  p.add_argument('--evaluator-gpus', type=float, default=None,
                 help='GPUs each evaluator node asks Ray for (eval.gpus_per_evaluator); > 0 runs '
                 'its policy there, batched over eval.num_envs environments per call; a fraction '
                 'shares a GPU (0.25: 4 evaluators per GPU). Default: the config\'s (0, the CPU)')
  p.set_defaults(handler=_train)

  p = subparsers.add_parser(
      'demo', help='generate a small local dataset, train cpu_small for a few minutes, print '
      'human-normalized scores beside the data\'s',
      description=f'Games: {",".join(demo.DEMO_GAMES)} unless --games says otherwise; data: '
      f'{demo.DEMO_CHECKPOINTS} x {demo.DEMO_STEPS_PER_CHECKPOINT} agent steps per game with '
      f'--weak-episodes {demo.DEMO_WEAK_EPISODES} (scaled-ql data generate --help).')
  p.add_argument('--workdir', default=demo.DEMO_WORKDIR)
  p.add_argument('--data-dir', default=demo.DEMO_DATA_DIR)
  p.add_argument('--minutes', type=_positive_minutes, default=demo.DEMO_MINUTES,
                 help='wall-clock budget of the whole demo: data generation, training and the '
                 'final evaluation; training gets what the other two leave (default '
                 '%(default)s)')
  p.add_argument('--steps', type=int, default=None,
                 help='learner steps (default: the config\'s; the time budget usually ends first)')
  overrides.add_flags(p, config=False)
  p.set_defaults(handler=_demo)

  _register_finetune(subparsers)


_TRAIN_DESCRIPTION = """\
Runs the whole program as Ray actors: a Reverb server (one table per game), inserters streaming
the RLDS data into it, the learner (checkpoints in WORKDIR/checkpoints), a sharded variable server
and E evaluators (WORKDIR/eval/evaluator_<i>.jsonl, TensorBoard in WORKDIR/tb). Without --address
a new Ray is started locally (even beside a `ray start` cluster); --address auto|ray://host:port
runs the same program on an existing cluster. Ctrl-C/SIGTERM: final checkpoint, every actor stopped.
A WORKDIR that ran before is resumed (a changed game/network/agent/data/seed is refused unless
--allow-config-change); every start is appended to WORKDIR/config_history.jsonl.
Report afterwards: scaled-ql report run WORKDIR."""


def _add_ray_args(p: argparse.ArgumentParser) -> None:
  p.add_argument('--address', default=None,
                 help='Ray cluster to join: auto | ray://host:port (default: start Ray locally)')
  p.add_argument('--num-cpus', type=int, default=None,
                 help='local Ray only: logical CPUs (default: enough for every node)')
  p.add_argument('--timeout-minutes', type=_positive_minutes, default=None,
                 help='stop training (with a final checkpoint) after this much wall-clock time; '
                 'the final evaluation comes on top')
  p.add_argument('--budget-minutes', type=_positive_minutes, default=None,
                 help='wall-clock budget of the whole run, the final evaluation included: '
                 'training stops when what is left only covers the final evaluation (estimated '
                 'from the evaluators\' latest rounds)')


def _positive_minutes(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = float('nan')
  if not value > 0:
    raise argparse.ArgumentTypeError(f'minutes must be a number > 0, got {text!r}')
  return value


def _fail(e: Exception) -> int:
  print(f'error: {e}', file=sys.stderr)
  return 2


def _node_lost_ends_run(handler):
  """A node that used up its restart budget ends the run: its traceback and exit 1, no Python
  traceback of the driver (`program.NodeLost`; program.py imports Ray, so it is imported late)."""
  import functools

  @functools.wraps(handler)
  def wrapped(args) -> int:
    try:
      return handler(args)
    except Exception as e:  # pylint: disable=broad-except
      from scaled_ql.launch import program
      if not isinstance(e, program.NodeLost):
        raise
      print(f'error: the run ended: {e}', file=sys.stderr)
      return 1
  return wrapped


def _timeout(args):
  return args.timeout_minutes * 60 if args.timeout_minutes else None


def _deadline(args):
  """The `time.time()` by which a run with --budget-minutes ends: called first in its handler, so
  that the budget's clock starts with the command."""
  return time.time() + args.budget_minutes * 60 if args.budget_minutes else None


@_node_lost_ends_run
def _train(args) -> int:
  deadline = _deadline(args)
  try:
    cfg = run.resolve_config(args.config, args.data_dir, args.steps, args.evaluators,
                             games=args.games, overrides=args.set,
                             evaluator_gpus=args.evaluator_gpus)
    run.check_data(cfg)
    run.check_resume(cfg, args.workdir, args.allow_config_change)
    init = run.initial_params(cfg)  # a fine-tuning config.json: its pretrained encoder
    status = run.train(cfg, args.workdir, args.address, args.num_cpus, _timeout(args),
                       args.learner_gpus, initial_params=init,
                       allow_config_change=args.allow_config_change, deadline=deadline)
  except ConfigError as e:  # raised before anything started
    return _fail(e)
  run.print_scores(status)
  print(f'report: scaled-ql report run {args.workdir}')
  return 0


@_node_lost_ends_run
def _demo(args) -> int:
  try:
    return demo.demo(args.workdir, args.data_dir, args.minutes, args.steps, games=args.games,
                     overrides=args.set, allow_config_change=args.allow_config_change)
  except ConfigError as e:
    return _fail(e)


# ------------------------------------------------------------------ finetune (transfer, issue 6)

_B4 = FINETUNE_OFFLINE
_FINETUNE_DESCRIPTION = f"""\
Transfer from a multi-game checkpoint (paper Section 5.2, Appendix B.4). The encoder of the
checkpoint in --pretrained (a learner workdir) initializes a fresh network of the same
architecture; the MLP trunk and the heads are re-initialized. --from-scratch runs the same
configuration from a random init (the baseline).
  offline: the training program on the new game's data (--selection, default
           {_B4['selection']}), batch {_B4['batch_size']}, lr {_B4['learning_rate']:g}, CQL alpha
           {_B4['cql_alpha']:g}, {_B4['num_steps']:,} steps, final evaluation.
  online:  C51 (n-step {FINETUNE_ONLINE['n_step']}, no CQL, Dopamine's settings, lr
           {FINETUNE_ONLINE['learning_rate']:g}) in a new game mode: actors collect experience
           into Reverb, the learner trains on it, the evaluator plays the same mode.
Any other value: --set, e.g. --set agent.learning_rate=1e-5 (the paper's sweep: 1e-5, 5e-5)."""


def _register_finetune(subparsers) -> None:
  p = subparsers.add_parser('finetune', help='fine-tune a multi-game checkpoint: offline to a new '
                            'game, online to a new game mode', description=_FINETUNE_DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='finetune_command', required=True)

  def common(q):
    q.add_argument('--pretrained', default=None,
                   help='learner workdir (or its checkpoints/) of the multi-game run')
    q.add_argument('--config', default=None, metavar='NAME|CONFIG.json',
                   help='config whose network/sizes to use (default: the checkpoint\'s); its '
                   'encoder must match the checkpoint\'s')
    q.add_argument('--game', required=True)
    q.add_argument('--from-scratch', action='store_true',
                   help='same configuration, random init (needs --pretrained or --config for '
                   'the network)')
    q.add_argument('--encoder', choices=('train', 'frozen'), default='train',
                   help='fine-tune the transferred encoder or keep it frozen (default train)')
    q.add_argument('--online-params', action='store_true',
                   help="transfer the encoder of the pretrained run's online params, not of the "
                   'moving average its evaluators used (runs with agent.policy_params_ema > 0, '
                   'e.g. cpu_small; finetune.pretrained_online_params)')
    q.add_argument('--steps', type=int, default=None, help='learner (gradient) steps')
    q.add_argument('--eval-steps', type=int, default=None,
                   help='evaluation agent steps per round (default: the config\'s)')
    q.add_argument('--workdir', required=True)
    overrides.add_flags(q, config=False, games=False)
    _add_ray_args(q)

  q = sub.add_parser('offline', help='offline fine-tuning to a new (held-out) game')
  common(q)
  q.add_argument('--data-dir', default=None, help='TFDS data dir with the game\'s data')
  q.add_argument('--selection', default=None,
                 help=f'episodes used (default {_B4["selection"]}: 1%% of the run, Appendix B.4)')
  q.set_defaults(handler=_finetune_offline)

  q = sub.add_parser('online', help='online C51 fine-tuning in a new game mode')
  common(q)
  q.add_argument('--mode', type=int, default=None, help='ALE game mode (e.g. Breakout 12)')
  q.add_argument('--actors', type=int, default=None, help='fine-tuning actor nodes (default 1)')
  q.add_argument('--scale', type=float, default=1.0,
                 help='shrink replay capacity, warm-up, epsilon decay and target period by this '
                 'factor for small machines (default 1 = Dopamine C51)')
  q.set_defaults(handler=_finetune_online)


def _finetune_config(args, kind: str, **kwargs):
  return run.finetune_config(
      kind, args.game, pretrained=args.pretrained, config=args.config,
      from_scratch=args.from_scratch, frozen_encoder=args.encoder == 'frozen', steps=args.steps,
      eval_steps=args.eval_steps, online_params=args.online_params, overrides=args.set, **kwargs)


@_node_lost_ends_run
def _finetune_offline(args) -> int:
  deadline = _deadline(args)
  try:
    cfg, initial_params = _finetune_config(args, 'offline', data_dir=args.data_dir,
                                           selection=args.selection)
    run.check_resume(cfg, args.workdir, args.allow_config_change)
    print(f'[finetune] offline {cfg.name}: {cfg.train.num_steps} steps, batch '
          f'{cfg.agent.batch_size}, lr {cfg.agent.learning_rate:g}, alpha '
          f'{cfg.agent.cql_alpha:g}, data {cfg.data.data_dir} ({cfg.data.selection})', flush=True)
    status = run.train(cfg, args.workdir, args.address, args.num_cpus, _timeout(args),
                       initial_params=initial_params,
                       allow_config_change=args.allow_config_change, deadline=deadline)
  except ConfigError as e:  # raised before anything started
    return _fail(e)
  run.print_scores(status)
  print(f'report: scaled-ql report run {args.workdir}')
  return 0


@_node_lost_ends_run
def _finetune_online(args) -> int:
  deadline = _deadline(args)
  try:
    cfg, initial_params = _finetune_config(args, 'online', mode=args.mode, actors=args.actors,
                                           scale=args.scale)
    run.check_resume(cfg, args.workdir, args.allow_config_change)
    from scaled_ql.launch import finetune
    print(f'[finetune] online {cfg.name}: {cfg.train.num_steps} gradient steps (1 per '
          f'{cfg.finetune.update_period} env steps after a warm-up of '
          f'{cfg.data.min_fill_per_game}), lr {cfg.agent.learning_rate:g}, '
          f'{cfg.finetune.num_actors} actor(s)', flush=True)
    status = finetune.run_online(cfg, args.workdir, initial_params, address=args.address,
                                 num_cpus=args.num_cpus, timeout_s=_timeout(args),
                                 allow_config_change=args.allow_config_change,
                                 deadline=deadline)
  except ConfigError as e:  # raised before anything started
    return _fail(e)
  run.print_scores(status)
  if status is not None and status.actors:
    print('  actors: ' + finetune.format_actors(status))
  print(f'report: scaled-ql report run {args.workdir}')
  return 0

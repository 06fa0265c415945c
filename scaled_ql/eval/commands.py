"""Sub-commands of this area (see scaled_ql/cli.py):

  scaled-ql eval --checkpoint DIR --games Pong,Breakout --steps N [--step S|S,S|all] [--out CSV]
  scaled-ql report aggregate SCORES.csv [--out DIR] [--reps N] [--seed S]
  scaled-ql report run WORKDIR [--out DIR]
  scaled-ql report compare RUN_OR_CSV ... [--table c1|c2] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional


def register(subparsers) -> None:
  p = subparsers.add_parser(
      'eval', help='evaluate a checkpoint on the ALE (paper protocol: no sticky actions, '
      'epsilon 0.001, 108K-frame episodes)',
      description='Loads the latest checkpoint of a learner workdir (or its checkpoints/ folder), '
      'plays each game for --steps agent steps and prints raw and human-normalized scores.')
  p.add_argument('--checkpoint', required=True, help='learner workdir or its checkpoints/ folder')
  p.add_argument('--games', default=None,
                 help='comma-separated games (default: all games of the checkpoint\'s config)')
  p.add_argument('--steps', type=int, default=None,
                 help='agent-step budget per game; every episode started is played to its end '
                 '(default: the config\'s eval.steps_per_game; paper: 125000)')
  p.add_argument('--epsilon', type=float, default=None,
                 help='epsilon-greedy epsilon (default: the config\'s eval.epsilon, paper 0.001)')
  p.add_argument('--num-envs', type=int, default=None,
                 help='environments per game stepped together (default: eval.num_envs)')
  p.add_argument('--games-at-once', type=int, default=None, metavar='N',
                 help='games played together, batched in the same policy calls; the scores of '
                 'each set are printed when it ends (default: eval.games_at_once, all the games; '
                 '1: one game after another)')
  p.add_argument('--step', default=None, metavar='S|S,S,...|all',
                 help='checkpoint step(s) to evaluate, one after the other: a step, a list, or '
                 '"all" the workdir holds, oldest first (default: the latest); keep a run\'s '
                 'history with --set train.keep_checkpoint_every_steps=N')
  p.add_argument('--online-params', action='store_true',
                 help="evaluate the online params of a run with agent.policy_params_ema > 0 "
                 "(default: the moving average, what the run's evaluators used)")
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--device', choices=('cpu', 'gpu', 'tpu'), default=None,
                 help='where the policy runs, batched over --num-envs environments per call '
                 '(default: a GPU if the config\'s eval.gpus_per_evaluator > 0, else the CPU)')
  p.add_argument('--out', default=None, help='CSV to append one row per game to')
  p.add_argument('--jsonl', default=None,
                 help='also append evaluation-log records (schema: scaled_ql/eval/report.py)')
  p.set_defaults(handler=_eval)

  r = subparsers.add_parser('report', help='aggregate scores (rliable) and plot learning curves')
  rsub = r.add_subparsers(dest='report_command', metavar='{aggregate,run,compare}',
                          required=True)
  a = rsub.add_parser(
      'aggregate', help='IQM/median/mean/optimality gap with bootstrap CIs + performance profile',
      description='Reads a CSV with columns method, game, score and optionally seed (several '
      'seeds of a method = several runs), prints human-normalized aggregates with 95%% '
      'stratified-bootstrap CIs, and writes aggregate.md, aggregate.csv and '
      'performance_profile.png. SCORES may be paper:c1 or paper:c2 (the paper\'s Tables C.1/C.2).')
  a.add_argument('scores', metavar='SCORES.csv')
  a.add_argument('--out', default=None, help='output folder (default: ./<csv name>_aggregate)')
  a.add_argument('--reps', type=int, default=2000, help='bootstrap replications (default 2000)')
  a.add_argument('--seed', type=int, default=0, help='bootstrap seed')
  a.add_argument('--tau-max', type=float, default=4.0,
                 help='largest normalized score of the performance profile (default 4 = 400%%)')
  a.add_argument('--methods', default=None,
                 help='comma-separated methods to keep (default: all in the file)')
  a.add_argument('--task-bootstrap', choices=('auto', 'yes', 'no'), default='auto',
                 help='also resample games (auto: for the methods with a single run, '
                      'shown in a table of their own)')
  a.set_defaults(handler=_aggregate)

  w = rsub.add_parser(
      'run', help='learning curves + Markdown summary from WORKDIR/eval/*.jsonl',
      description='Plots the human-normalized score of every game and the IQM/median/mean over '
      'games against the learner step, from the evaluator logs of a run.')
  w.add_argument('workdir', metavar='WORKDIR')
  w.add_argument('--out', default=None, help='output folder (default: WORKDIR/report)')
  w.set_defaults(handler=_run_report)

  c = rsub.add_parser(
      'compare', help="runs or score CSVs side by side with the paper's Table C.1/C.2, with CIs",
      description='Compares run workdirs (final evaluation per game from eval/*.jsonl), '
      'evaluator CSVs (scaled-ql eval --out) and scores CSVs (method, game, score[, seed]) with '
      "the paper's Table C.1 or C.2 rows for the same games: raw and human-normalized scores per "
      'game, and IQM/median/mean/optimality gap with 95% stratified-bootstrap CIs. Games '
      'without a completed episode are left out and named.')
  c.add_argument('inputs', nargs='+', metavar='RUN_OR_CSV')
  c.add_argument('--table', choices=('c1', 'c2'), default=None,
                 help='c1: Table C.1 (sub-optimal data), c2: Table C.2 (near-optimal data); '
                 "default: from the runs' config.json data.selection")
  c.add_argument('--out', default=None, help='also write compare.md and compare.csv here')
  c.add_argument('--reps', type=int, default=2000, help='bootstrap replications (default 2000)')
  c.add_argument('--seed', type=int, default=0, help='bootstrap seed')
  c.add_argument('--dqn-reference', default=None, metavar='CSV',
                 help='DQN-Replay reference scores (game, dqn_score, source) for DQN-normalized '
                 'columns (default: scaled_ql/eval/data/dqn_replay_reference.csv: Dopamine\'s '
                 'published DQN, the last iteration averaged over its 5 runs)')
  c.set_defaults(handler=_compare)


def _fail(msg: str) -> int:
  print(f'error: {msg}', file=sys.stderr)
  return 2


def _aggregate(args: argparse.Namespace) -> int:
  from scaled_ql.eval import metrics, report
  if args.reps < 1:
    return _fail(f'--reps must be >= 1, got {args.reps}')
  tb = {'auto': None, 'yes': True, 'no': False}[args.task_bootstrap]
  try:
    text, paths = report.aggregate_report(args.scores, args.out, reps=args.reps, seed=args.seed,
                                          tau_max=args.tau_max, task_bootstrap=tb,
                                          methods=_split(args.methods))
  except (metrics.ScoresFileError, ValueError) as e:
    return _fail(str(e))
  print(text)
  for p in paths.values():
    print(f'wrote {p}')
  return 0


def _compare(args: argparse.Namespace) -> int:
  from scaled_ql.eval import compare
  try:
    text, paths = compare.compare_report(args.inputs, args.table, args.out, reps=args.reps,
                                         seed=args.seed, dqn_reference=args.dqn_reference)
  except (ValueError, FileNotFoundError) as e:
    return _fail(str(e))
  print(text)
  for p in paths.values():
    print(f'wrote {p}')
  return 0


def _split(text):
  return None if text is None else [t.strip() for t in text.split(',') if t.strip()]


def _run_report(args: argparse.Namespace) -> int:
  from scaled_ql.eval import report
  try:
    paths = report.run_report(args.workdir, args.out)
  except report.EvalLogError as e:
    return _fail(str(e))
  with open(paths['summary_md']) as f:
    print(f.read())
  for p in paths.values():
    print(f'wrote {p}')
  return 0


def parse_games(text: str | None, available: tuple[str, ...], where: str) -> tuple[str, ...]:
  """--games value -> games, each of which must be one of `available` (else a clear error)."""
  from scaled_ql import games as games_lib
  if text is None:
    return available
  games = tuple(g.strip() for g in text.split(',') if g.strip())
  games_lib.check_games(games, '--games')
  missing = [g for g in games if g not in available]
  if missing:
    raise ValueError(f'--games: {missing} not in {where}; its games are: {", ".join(available)}')
  return games


def parse_steps(text: Optional[str], saved: list[int]) -> list[Optional[int]]:
  """`eval --step`: None -> [None] (the latest that loads); 'all' -> every saved step, oldest
  first; 'S[,S...]' -> those steps. ValueError naming a step the workdir does not hold."""
  if text is None:
    return [None]
  if text.strip().lower() == 'all':
    if not saved:
      raise ValueError('--step all: the workdir holds no checkpoint')
    return list(saved)
  try:
    steps = [int(t) for t in text.split(',') if t.strip()]
  except ValueError:
    raise ValueError(f'--step {text!r}: expected a step, a comma-separated list or "all"') from None
  missing = [s for s in steps if s not in saved]
  if not steps or missing:
    raise ValueError(f'--step {text!r}: no checkpoint at step(s) {missing or text!r}; the '
                     f'workdir holds {saved or "none"}')
  return steps


def _workdir_config(checkpoint: str):
  """The ExperimentConfig of WORKDIR/config.json beside a checkpoint, or None if there is none."""
  import json
  import os

  from scaled_ql.configs.base import ExperimentConfig
  path = os.path.abspath(checkpoint).rstrip('/')
  dirs = [path] + ([os.path.dirname(path)] if os.path.basename(path) == 'checkpoints' else [])
  for d in dirs:
    f = os.path.join(d, 'config.json')
    if os.path.isfile(f):
      try:
        with open(f, encoding='utf-8') as fh:
          return ExperimentConfig.from_dict(json.load(fh))
      except (ValueError, KeyError, TypeError):
        return None  # unreadable: the checkpoint's own config is checked after loading
  return None


def _eval(args: argparse.Namespace) -> int:
  import os

  from scaled_ql import games as games_lib
  if args.steps is not None and args.steps < 1:
    return _fail(f'--steps must be >= 1, got {args.steps}')
  if args.num_envs is not None and args.num_envs < 1:
    return _fail(f'--num-envs must be >= 1, got {args.num_envs}')
  if args.games_at_once is not None and args.games_at_once < 1:
    return _fail(f'--games-at-once must be >= 1, got {args.games_at_once}')
  if args.epsilon is not None and not 0.0 <= args.epsilon <= 1.0:
    return _fail(f'--epsilon must be in [0, 1], got {args.epsilon}')
  from scaled_ql.configs.overrides import ConfigError
  from scaled_ql.eval import report
  from scaled_ql.launch import run
  try:  # the output files can be written: checked before the (slow) evaluation, nothing created
    for flag, path in (('--out', args.out), ('--jsonl', args.jsonl)):
      if path:
        run.check_output_file(path, flag)
    if args.out and os.path.isfile(args.out) and os.path.getsize(args.out) > 0:
      report.upgrade_csv(args.out)  # records are appended to it
  except (ConfigError, report.EvalLogError) as e:
    return _fail(str(e))
  if args.games is not None:  # names checked before the (slow) checkpoint load
    try:
      games_lib.check_games([g.strip() for g in args.games.split(',') if g.strip()], '--games')
    except games_lib.UnknownGameError as e:
      return _fail(str(e))
  # The learner writes WORKDIR/config.json: check the games against it before loading params.
  early = _workdir_config(args.checkpoint)
  if early is not None:
    try:
      parse_games(args.games, early.games, f'the checkpoint {args.checkpoint} '
                  f'(config {early.name!r})')
    except ValueError as e:
      return _fail(str(e))
  from scaled_ql.agents import actors, builder, checkpointing
  from scaled_ql.eval import evaluator
  try:
    steps = parse_steps(args.step, checkpointing.saved_steps(args.checkpoint))
  except ValueError as e:
    return _fail(str(e))
  policy, history = None, []
  for wanted in steps:  # rows carry the step (param_version): --out/--jsonl collect a curve
    try:
      cfg, params, step = checkpointing.load_params(args.checkpoint, step=wanted,
                                                    online=args.online_params)
    except FileNotFoundError as e:
      return _fail(str(e))
    if policy is None:
      try:
        games = parse_games(args.games, cfg.games, f'the checkpoint {args.checkpoint} '
                            f'(config {cfg.name!r})')
      except ValueError as e:
        return _fail(str(e))
      epsilon = cfg.eval.epsilon if args.epsilon is None else args.epsilon
      try:
        device = evaluator.policy_device(cfg.eval, args.device)  # a missing GPU fails here
      except ValueError as e:
        return _fail(str(e))
      policy = actors.make_policy(cfg, epsilon)
    print(f'evaluating {cfg.name} step {step} '
          f'({builder.policy_params_label(cfg.agent, args.online_params)}) on '
          f'{", ".join(games)}: a budget of {args.steps or cfg.eval.steps_per_game} steps/game '
          f'(every episode started is played to its end), epsilon {epsilon}, sticky actions '
          f'{cfg.eval.sticky_action_prob}, max {cfg.eval.max_episode_frames} frames/episode')
    results = evaluator.evaluate(
        policy, params, games, cfg.eval, model_games=cfg.games, steps_per_game=args.steps,
        num_envs=args.num_envs, games_at_once=args.games_at_once, seed=args.seed,
        param_version=step, evaluator='scaled-ql-eval', epsilon=epsilon, csv_path=args.out,
        jsonl_path=args.jsonl, device=device.platform,
        log=lambda line: print(line, flush=True))  # a line per game as its set of games ends
    print(evaluator.aggregate_line(results))
    history.append((step, results))
  if len(history) > 1:
    print(f'scores by checkpoint step ("-": no completed episode):\n'
          f'{evaluator.history_table(history)}')
  for p in (args.out, args.jsonl):
    if p:
      print(f'wrote {os.path.abspath(p)}')
  return 0

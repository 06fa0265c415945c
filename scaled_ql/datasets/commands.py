"""`scaled-ql data generate | inspect | convert-dopamine` (see BUILD_NOTES.md, data section)."""
from __future__ import annotations

import argparse
import functools
import sys


def _games(text: str) -> list[str]:
  return [g.strip() for g in text.split(',') if g.strip()]


def _user_errors(fn):
  """Bad input (unknown game, missing data, existing output) -> one clear line and exit code 2."""
  @functools.wraps(fn)
  def wrapper(args):
    try:
      return fn(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
      print(f'scaled-ql data {args.data_command}: error: {e}', file=sys.stderr)
      return 2
  return wrapper


def register(subparsers) -> None:
  data = subparsers.add_parser('data', help='offline datasets: generate, inspect, convert')
  sub = data.add_subparsers(dest='data_command', metavar='DATA_COMMAND', required=True)

  gen = sub.add_parser(
      'generate', help='play the emulator with scripted policies of rising quality and write an '
      'rlu_atari_checkpoints_ordered TFDS dataset')
  gen.add_argument('--games', type=_games, required=True, help='comma-separated, e.g. Pong,Breakout')
  gen.add_argument('--out', required=True, help='TFDS data dir to write into')
  gen.add_argument('--run', type=int, default=1, help='config {Game}_run_{run} (1..5)')
  gen.add_argument('--checkpoints', type=int, default=10, help='number of checkpoint_XX splits')
  budget = gen.add_mutually_exclusive_group()
  budget.add_argument('--steps-per-checkpoint', type=int, default=None,
                      help='agent steps per split (default 5000)')
  budget.add_argument('--episodes-per-checkpoint', type=int, default=None,
                      help='whole episodes per split instead of a step budget')
  gen.add_argument('--max-episode-frames', type=int, default=108_000,
                   help='emulator frames per episode before truncation (108K = DQN-Replay)')
  gen.add_argument('--seed', type=int, default=0)
  # The values of policies.WEAK_EPISODES, written out: importing scaled_ql.datasets loads
  # TensorFlow (~10 s), too slow for building the parser (tests/test_generate.py checks them).
  gen.add_argument('--weak-episodes', choices=('noisy', 'flawed'), default='noisy',
                   help='how the episodes below the late policy play: noisy = epsilon-greedy '
                   'over the script, epsilon up to 1; flawed = mostly the script with one '
                   'consistent mistake, at epsilon 0.05, like a poor DQN checkpoint '
                   '(docs/data_generation.md)')
  gen.add_argument('--workers', type=int, default=None,
                   help='processes, one game each at a time (default: one per core, at most one '
                   'per game and one per GB of available memory); the data does not depend on it')
  exists = gen.add_mutually_exclusive_group()
  exists.add_argument('--overwrite', action='store_true', help='replace games already generated')
  exists.add_argument('--skip-existing', action='store_true',
                      help='keep games already generated with the same settings (other '
                      'settings: an error naming the game and what differs)')
  gen.add_argument('--no-progress', action='store_true')
  gen.add_argument('--verbose', action='store_true',
                   help="debug logging, with TensorFlow Datasets' own lines (one per split)")
  gen.set_defaults(handler=_user_errors(_generate))

  ins = sub.add_parser('inspect', help='episodes, steps and mean return per game and split')
  ins.add_argument('--data-dir', required=True, help='TFDS data dir (local or gs://)')
  ins.add_argument('--games', type=_games, default=None, help='default: every game present')
  ins.add_argument('--run', type=int, default=1)
  ins.add_argument('--builder', default='rlu_atari_checkpoints_ordered',
                   choices=('rlu_atari_checkpoints_ordered', 'rlu_atari'))
  ins.add_argument('--max-episodes-per-split', type=int, default=None,
                   help='stop counting a split after this many episodes (for big real data)')
  ins.set_defaults(handler=_user_errors(_inspect))

  dl = sub.add_parser(
      'download', help='copy the RL Unplugged shards a data selection needs (resumable, verified)',
      description='Copies only the rlu_atari_checkpoints_ordered shards that --selection needs '
      '(suboptimal: the first 20% of the splits) from the RL Unplugged bucket or a mirror into '
      'a local TFDS data dir, showing bytes and ETA; an interrupted copy resumes; every file is '
      'verified (size, TFRecord CRCs, record count). See README "Getting the data".')
  dl.add_argument('--games', type=_games, required=True, help='comma-separated, e.g. Pong,Breakout')
  dl.add_argument('--selection', default='suboptimal',
                  help='suboptimal (default) | near_optimal | uniform:P | checkpoints:A-B')
  dl.add_argument('--out', required=True, help='local TFDS data dir to copy into')
  dl.add_argument('--source', default=None,
                  help='TFDS data dir to copy from: a mirror (a local path or any URL '
                  'tf.io.gfile reads); default: the RL Unplugged bucket '
                  'gs://rl_unplugged/tensorflow_datasets')
  dl.add_argument('--run', type=int, default=1, help='config {Game}_run_{run} (1..5)')
  dl.add_argument('--dry-run', action='store_true',
                  help='print the files, sizes and free space needed; copy nothing')
  dl.add_argument('--no-progress', action='store_true')
  dl.set_defaults(handler=_user_errors(_download))

  conv = sub.add_parser(
      'convert-dopamine', help='convert DQN-Replay (Dopamine replay_logs) files into the '
      'rlu_atari_checkpoints_ordered TFDS layout')
  conv.add_argument('--dopamine-dir', required=True,
                    help='root holding {Game}/{run}/replay_logs/$store$_*_ckpt.N.gz')
  conv.add_argument('--games', type=_games, required=True)
  conv.add_argument('--run', type=int, default=1)
  conv.add_argument('--out', required=True, help='TFDS data dir to write into')
  conv.add_argument('--checkpoints', default=None,
                    help='A-B: only these replay checkpoints (default: all found)')
  conv.add_argument('--overwrite', action='store_true')
  conv.set_defaults(handler=_user_errors(_convert_dopamine))


def _generate(args: argparse.Namespace) -> int:
  import logging
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  if args.verbose:
    logging.getLogger('scaled_ql').setLevel(logging.DEBUG)
  from scaled_ql import games as games_lib
  games_lib.check_games(args.games)  # before importing TF
  from scaled_ql.datasets import generate, policies
  steps = args.steps_per_checkpoint
  if steps is None and args.episodes_per_checkpoint is None:
    steps = 5_000
  if_exists = 'overwrite' if args.overwrite else ('skip' if args.skip_existing else 'error')
  workers = generate.default_workers() if args.workers is None else args.workers
  dirs = generate.generate(args.games, args.out, run=args.run, num_checkpoints=args.checkpoints,
                           steps_per_checkpoint=steps, seed=args.seed,
                           episodes_per_checkpoint=args.episodes_per_checkpoint,
                           max_episode_frames=args.max_episode_frames, if_exists=if_exists,
                           progress=not args.no_progress, workers=workers,
                           skill=policies.SkillSchedule(weak=args.weak_episodes))
  for game, path in dirs.items():
    print(f'{game}: {path}')
  return 0


def _inspect(args: argparse.Namespace) -> int:
  import os
  import re

  from scaled_ql import games as games_lib
  if args.games:
    games_lib.check_games(args.games)
  from scaled_ql.datasets import generate, rlds_reader, tfds_layout
  games = args.games
  if not games:
    configs = rlds_reader.list_configs(args.data_dir, args.builder)
    games = sorted({m.group(1) for c in configs
                    if (m := re.fullmatch(rf'(\w+)_run_{args.run}', c))})
    if not games:
      raise rlds_reader.DatasetNotFoundError(
          f'no {args.builder} configs for run {args.run} in {args.data_dir}; present: '
          f'{configs or "none"}')
  infos = {}
  for game in games:
    summary = rlds_reader.summarize(args.data_dir, game, args.run, args.builder,
                                    args.max_episodes_per_split)
    b = rlds_reader.load_builder(args.data_dir, game, args.run, args.builder)
    gen = generate.read_info(os.fspath(b.data_path)) or {}
    print(f'{game} run {args.run} ({b.data_path})' +
          (f'  generated, policy: {gen["policy"]}' if gen else '') +
          (f'; weak episodes: flawed ({gen["flawed_policy"]})' if gen.get('flawed_policy') else ''))
    header = f'  {"split":<14}{"episodes":>9}{"steps":>10}{"mean return":>13}'
    generated = gen.get('generator') == generate.GENERATOR
    split_scores = {}
    if generated:
      header += f'{"epsilon":>9}{"raw score":>11}{"human-norm":>12}'
      split_scores = generate.behaviour(game, gen['splits'])['splits']
    print(header)
    total = rlds_reader.SplitSummary(-1)
    for c, s in summary.items():
      line = f'  {tfds_layout.split_name(c):<14}{s.episodes:>9}{s.steps:>10}{s.mean_return:>13.2f}'
      split_gen = gen.get('splits', {}).get(tfds_layout.split_name(c))
      score = split_scores.get(tfds_layout.split_name(c))
      if split_gen and score and score['score'] is not None:
        line += (f'{split_gen["epsilon"]:>9.2f}{score["score"]:>11.2f}'
                 f'{100 * score["normalized"]:>11.1f}%')
      print(line)
      total.episodes += s.episodes
      total.steps += s.steps
      total.return_sum += s.return_sum
    print(f'  {"all":<14}{total.episodes:>9}{total.steps:>10}{total.mean_return:>13.2f}')
    absent = [tfds_layout.split_name(c) for c in rlds_reader.available_checkpoints(b)
              if c not in summary] if args.builder == tfds_layout.ORDERED_BUILDER else []
    if absent:
      print(f'  not on disk (a partial download?): {len(absent)} splits, {", ".join(absent)}')
    if generated:
      print('\n'.join(generate.behaviour_lines(game, gen)))
      infos[game] = gen
  for line in generate.aggregate_lines(infos):
    print(line)
  return 0


def _download(args: argparse.Namespace) -> int:
  from scaled_ql.datasets import download
  try:
    download.download_selection(args.games, args.selection, args.out, args.source, args.run,
                                dry_run=args.dry_run, progress=not args.no_progress)
  except download.DownloadError as e:
    print(f'scaled-ql data download: error: {e}', file=sys.stderr)
    return 1
  return 0


def _convert_dopamine(args: argparse.Namespace) -> int:
  import logging
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  from scaled_ql.datasets import dopamine_convert, tfds_layout
  checkpoints = None
  if args.checkpoints:
    a, sep, b = args.checkpoints.partition('-')
    try:
      checkpoints = (int(a), int(b if sep else a))
    except ValueError:
      raise ValueError(f'--checkpoints {args.checkpoints!r}: expected A-B (or A), two replay '
                       'checkpoint numbers') from None
  run = tfds_layout.check_run(args.run)
  from scaled_ql.datasets import generate
  # Every game's replay files and output are checked before any is converted (a game takes
  # hours): an output that exists, without --overwrite, fails here, not after the games before.
  for game in args.games:
    dopamine_convert.source_checkpoints(args.dopamine_dir, game, run, checkpoints)
    if not args.overwrite:  # (generate's own rule; it removes nothing without --overwrite)
      generate.handle_existing(generate.builder_for(game, run, args.out,
                                                    tfds_layout.ORDERED_BUILDER), game, 'error',
                               remedy=dopamine_convert.OVERWRITE_REMEDY)
  for game in args.games:
    path = dopamine_convert.convert(args.dopamine_dir, game, run, args.out,
                                    checkpoints=checkpoints, overwrite=args.overwrite)
    print(f'{game}: {path}')
  return 0

"""Sub-commands of this area (see scaled_ql/cli.py): `scaled-ql describe`."""
from __future__ import annotations

import sys


def _describe(args) -> int:
  from scaled_ql import games as games_lib
  from scaled_ql.configs.overrides import ConfigError
  from scaled_ql.launch import run
  try:
    cfg = run.resolve_config(args.config, overrides=args.set)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  games = tuple(cfg.games)
  if args.games is not None:
    # The config's games first, then the paper's training games, then the rest of RL Unplugged.
    pool = games + tuple(g for g in games_lib.TRAINING_GAMES_40 + games_lib.ALL_GAMES
                         if g not in games)
    pool = tuple(dict.fromkeys(pool))
    if not 1 <= args.games <= len(pool):
      print(f'--games: {args.games} is out of range 1..{len(pool)}', file=sys.stderr)
      return 2
    games = pool[:args.games]
  from scaled_ql.networks import analysis  # heavy: JAX
  num_atoms = cfg.agent.num_atoms if cfg.agent.loss == 'c51' else 1
  print(f'config {cfg.name}: {len(games)} games, num_atoms {num_atoms}, network {cfg.network}')
  print(analysis.describe(cfg.network, games, num_atoms, max_depth=args.depth))
  return 0


def register(subparsers) -> None:
  p = subparsers.add_parser(
      'describe', help='print the Q-network of a config: modules, shapes, params, FLOPs',
      description='Print the Q-network of a config: modules and output shapes, parameter counts '
                  '(encoder/trunk/heads) and forward FLOPs per example. Nothing is initialised.')
  p.add_argument('--config', required=True, metavar='NAME|CONFIG.json',
                 help='config name, e.g. atari40_suboptimal_resnet101, or a config.json')
  from scaled_ql.configs import overrides  # light: the dataclasses only
  overrides.add_flags(p, config=False, games=False, resume=False)
  p.add_argument('--games', type=int, default=None,
                 help="number of games (heads); default: the config's games. Beyond the "
                      "config's games, the paper's 40 training games are added in order")
  p.add_argument('--depth', type=int, default=2, help='module nesting depth to list (default 2)')
  p.set_defaults(handler=_describe)

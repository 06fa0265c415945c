"""`scaled-ql config show NAME [--set ...]` and `scaled-ql config list` (see scaled_ql/cli.py)."""
from __future__ import annotations

import sys

from scaled_ql.configs import overrides


def register(subparsers) -> None:
  p = subparsers.add_parser('config', help='list the named configs; show one resolved, with '
                            'every field\'s doc and paper reference')
  sub = p.add_subparsers(dest='config_command', metavar='{show,list}', required=True)
  q = sub.add_parser('show', help='print a resolved config: every field, its value, its doc and '
                     'the paper reference', description='Prints the config NAME (or a '
                     'config.json / workdir) with the --set/--games changes applied, as `train` '
                     'and `learn` would run it.')
  q.add_argument('config', metavar='NAME|CONFIG.json')
  overrides.add_flags(q, config=False, resume=False)
  q.add_argument('--json', action='store_true', help='print config.json instead')
  q.set_defaults(handler=_show)
  q = sub.add_parser('list', help='the named configs (each also takes a variant suffix)')
  q.set_defaults(handler=_list)


def _show(args) -> int:
  from scaled_ql.launch import run
  try:
    cfg = run.resolve_config(args.config, games=args.games, overrides=args.set)
  except overrides.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(cfg.to_json() if args.json else overrides.describe(cfg))
  return 0


def _list(args) -> int:
  del args
  from scaled_ql import configs
  for name in configs.list_configs():
    print(name)
  print(f'variant suffixes (baselines/ablations, e.g. cpu_small_no_cql): '
        f'{", ".join("_" + v for v in configs.VARIANTS)}')
  return 0

"""The `scaled-ql` command line. Each area registers its own sub-commands in `<area>/commands.py`
(argument parsing only; heavy imports happen inside the handlers so `--help` stays fast)."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    'scaled_ql.configs.commands',    # config show | list
    'scaled_ql.networks.commands',   # describe
    'scaled_ql.agents.commands',     # learn (standalone offline learner)
    'scaled_ql.datasets.commands',   # data generate | inspect
    'scaled_ql.eval.commands',       # eval, report aggregate | run
    'scaled_ql.launch.commands',     # train, finetune, demo
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='scaled-ql',
      description='Scaled offline Q-learning on multi-game Atari (Kumar et al., ICLR 2023).')
  sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
  for name in COMMAND_MODULES:
    importlib.import_module(name).register(sub)
  return parser


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return int(args.handler(args) or 0)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())

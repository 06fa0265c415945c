"""Sub-commands of this area (see scaled_ql/cli.py)."""
from __future__ import annotations


def register(subparsers) -> None:
  del subparsers  # no commands yet

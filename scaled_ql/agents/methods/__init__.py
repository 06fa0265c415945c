"""The training methods, one file each, registered under the names `cfg.agent.loss` takes.

    method = methods.get(cfg.agent.loss)
    terms = method.batch_loss(nets, params, behaviour_params, target_params, batch, cfg.agent)

Adding a method: write `methods/<name>.py` with its `batch_loss` and a `METHOD = base.Method(...)`
record (see base.py for the fields and their defaults), then add it to `METHODS` below.
"""
from __future__ import annotations

from scaled_ql.agents.methods import bc, bcq, c51, mse
from scaled_ql.agents.methods.base import Method

METHODS: dict[str, Method] = {m.name: m for m in (c51.METHOD, mse.METHOD, bc.METHOD, bcq.METHOD)}


def get(name: str) -> Method:
  """The method `cfg.agent.loss` names; ValueError naming the field otherwise."""
  if name not in METHODS:
    raise ValueError(f'agent.loss={name!r} is not one of {tuple(METHODS)}')
  return METHODS[name]

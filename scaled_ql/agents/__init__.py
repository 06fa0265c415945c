"""Scaled QL's losses, learner, checkpoints and policies.

    from scaled_ql.agents import losses, learner, checkpointing, actors
    learner.Learner(cfg, iterator, workdir)          # step / get_variables / save / restore
    checkpointing.load_params(workdir) -> (cfg, params, step)
    actors.make_policy(cfg, epsilon)                  # jitted epsilon-greedy policy

Submodules are imported lazily (attribute access), so `scaled-ql --help`, which imports
`scaled_ql.agents.commands`, does not pay for JAX/Orbax.
"""
import importlib

_SUBMODULES = ('actors', 'builder', 'checkpointing', 'learner', 'losses')
__all__ = list(_SUBMODULES) + ['Learner', 'load_params', 'make_policy']


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f'scaled_ql.agents.{name}')
  if name == 'Learner':
    return importlib.import_module('scaled_ql.agents.learner').Learner
  if name == 'load_params':
    return importlib.import_module('scaled_ql.agents.checkpointing').load_params
  if name == 'make_policy':
    return importlib.import_module('scaled_ql.agents.actors').make_policy
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

"""Scaled QL's losses, learner, checkpoints and policies.

    from scaled_ql.agents import losses, methods, learner, runner, checkpointing, actors
    methods.get(cfg.agent.loss)                       # the method: loss, Q values, allowed actions
    learner.Learner(cfg, iterator)                    # step / get_variables / save / restore
    runner.LearnerRunner(learner, workdir)            # + checkpoints, NaN checks, metrics, signals
    checkpointing.load_params(workdir) -> (cfg, params, step)
    actors.make_policy(cfg, epsilon)                  # jitted epsilon-greedy policy

Imports go one way: losses <- methods <- builder <- learner <- checkpointing <- transfer, runner
(`packing`, a tree as flat buffers, imports none of them).

Submodules are imported lazily (attribute access), so `scaled-ql --help`, which imports
`scaled_ql.agents.commands`, does not pay for JAX/Orbax.
"""
import importlib

_SUBMODULES = ('actors', 'builder', 'checkpointing', 'learner', 'losses', 'methods', 'packing',
               'runner', 'transfer')
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

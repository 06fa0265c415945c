"""Makes what the learner and the actors share from one config (Acme's builder habit).

`agent_networks(cfg)` is cached per (hashable, frozen) config, so every jitted function that is
traced with the same config sees the very same network objects. `make_optimizer` is Adam with the
params of `agent.frozen_modules` labelled FROZEN (`frozen_labels`: zero updates, no Adam state;
transfer with a frozen encoder). `check_same_structure` compares two params trees by name and
shape (initial params, transferred encoders).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from scaled_ql import games as games_lib
from scaled_ql.agents import methods
from scaled_ql.configs.base import AgentConfig, ExperimentConfig
from scaled_ql.networks import make_q_network, q_network

MODULES = ('encoder', 'trunk', 'heads')  # top-level modules of `networks.make_q_network`
TRAINABLE = 'trainable'
FROZEN = 'frozen'


@dataclasses.dataclass(frozen=True, eq=False)
class AgentNetworks:
  q: hk.Transformed  # Q-network (or the policy network for 'bc')
  behaviour: Optional[hk.Transformed]  # the method's behaviour model (num_atoms=1; BCQ), else None
  num_atoms: int  # atoms of `q`: cfg.agent.num_atoms for a distributional method (c51/bcq), else 1
  action_mask: np.ndarray  # bool [G, A_max]: valid actions of each game of cfg.games
  atoms: np.ndarray  # f32 [num_atoms]: the C51 support on [v_min, v_max] (empty-ish for mse/bc)


def check_agent_config(cfg: ExperimentConfig) -> None:
  """Raises ValueError naming the field at fault (before anything expensive happens)."""
  a: AgentConfig = cfg.agent
  games_lib.check_games(cfg.games, 'config games')
  method = methods.get(a.loss)
  for name in ('cql_alpha', 'v_min', 'v_max', 'learning_rate', 'adam_eps', 'bcq_tau',
               'policy_params_ema') + (('max_grad_norm',) if a.max_grad_norm is not None else ()):
    if not math.isfinite(getattr(a, name)):  # NaN passes every comparison below
      raise ValueError(f'agent.{name}={getattr(a, name)} must be finite')
  if a.n_step < 1:
    raise ValueError(f'agent.n_step={a.n_step} must be >= 1')
  if not 0.0 <= a.discount <= 1.0:
    raise ValueError(f'agent.discount={a.discount} must be in [0, 1]')
  if not a.reward_clip > 0:  # (inf: no clipping)
    raise ValueError(f'agent.reward_clip={a.reward_clip} must be > 0')
  if method.distributional and a.num_atoms < 2:
    raise ValueError(f'agent.num_atoms={a.num_atoms} must be >= 2 for loss {a.loss!r}')
  if not a.v_min < a.v_max:
    raise ValueError(f'agent.v_min={a.v_min} must be < agent.v_max={a.v_max}')
  if a.cql_alpha < 0:
    raise ValueError(f'agent.cql_alpha={a.cql_alpha} must be >= 0')
  method.check_config(a)
  if not 0.0 <= a.bcq_tau <= 1.0:
    raise ValueError(f'agent.bcq_tau={a.bcq_tau} must be in [0, 1]')
  if a.learning_rate <= 0 or a.adam_eps <= 0:
    raise ValueError(f'agent.learning_rate={a.learning_rate} and agent.adam_eps={a.adam_eps} '
                     'must be > 0')
  if a.max_grad_norm is not None and a.max_grad_norm <= 0:
    raise ValueError(f'agent.max_grad_norm={a.max_grad_norm} must be > 0 or None')
  if a.target_update_period < 1:
    raise ValueError(f'agent.target_update_period={a.target_update_period} must be >= 1')
  if a.batch_size < 1:
    raise ValueError(f'agent.games_per_batch x agent.transitions_per_game = {a.batch_size} < 1')
  check_frozen_modules(a.frozen_modules)
  if not 0.0 <= a.policy_params_ema < 1.0:
    raise ValueError(f'agent.policy_params_ema={a.policy_params_ema} must be in [0, 1) '
                     '(0: actors and evaluators use the online params)')
  if not isinstance(a.random_shift, int) or not 0 <= a.random_shift < 42:
    raise ValueError(f'agent.random_shift={a.random_shift} must be an int in [0, 42) pixels '
                     '(0: no augmentation)')
  if not cfg.train.xla_cpu_use_thunk_runtime and q_network.has_strided_convolutions(cfg.network):
    raise ValueError('train.xla_cpu_use_thunk_runtime=False: this network has strided '
                     'convolutions, and XLA\'s classic CPU runtime aborts the process on their '
                     'gradients (jaxlib 0.4.34); set it to True for this network')


@functools.lru_cache(maxsize=None)
def agent_networks(cfg: ExperimentConfig) -> AgentNetworks:
  check_agent_config(cfg)
  method = methods.get(cfg.agent.loss)
  num_atoms = cfg.agent.num_atoms if method.distributional else 1
  q = make_q_network(cfg.network, cfg.games, num_atoms)
  behaviour = make_q_network(cfg.network, cfg.games, 1) if method.behaviour_model else None
  atoms = np.linspace(cfg.agent.v_min, cfg.agent.v_max, num_atoms, dtype=np.float32)
  return AgentNetworks(q=q, behaviour=behaviour, num_atoms=num_atoms,
                       action_mask=games_lib.action_mask(cfg.games), atoms=atoms)


def make_optimizer(agent: AgentConfig) -> optax.GradientTransformation:
  """Adam (Appendix B.3), optionally after global-norm clipping; the params of
  `agent.frozen_modules` get zero updates and no Adam state (`frozen_labels`). With
  `agent.policy_params_ema` > 0, `params_ema` last: its state holds the averaged params."""
  optimizer = optax.adam(agent.learning_rate, eps=agent.adam_eps)
  if agent.max_grad_norm is not None:
    optimizer = optax.chain(optax.clip_by_global_norm(agent.max_grad_norm), optimizer)
  if agent.frozen_modules:
    optimizer = optax.multi_transform(
        {TRAINABLE: optimizer, FROZEN: optax.set_to_zero()},
        functools.partial(frozen_labels, frozen_modules=agent.frozen_modules))
  if agent.policy_params_ema > 0:
    optimizer = optax.chain(optimizer, params_ema(agent.policy_params_ema))
  return optimizer


class ParamsEmaState(NamedTuple):
  average: Any  # the moving average of the params after each update


def params_ema(decay: float) -> optax.GradientTransformation:
  """Keeps avg <- decay * avg + (1 - decay) * (params + updates) in its state; the updates pass
  through unchanged. Last in the chain, so that `params + updates` are the new params. Like
  optax's schedule-free optimizers, the optimizer state holds the params to evaluate; kept there,
  the average is checkpointed with the Adam state, and runs without it keep their state layout."""

  def init(params):
    return ParamsEmaState(jax.tree_util.tree_map(jnp.copy, params))  # own buffers: donated

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('params_ema needs the params: optimizer.update(grads, state, params)')
    new_params = optax.apply_updates(params, updates)
    return updates, ParamsEmaState(
        optax.incremental_update(new_params, state.average, step_size=1.0 - decay))

  return optax.GradientTransformation(init, update)


def policy_trainable(agent: AgentConfig, trainable: Any, opt_state: Any) -> Any:
  """The (params, behaviour_params) that actors and evaluators use: `trainable` (the online
  ones), or with `agent.policy_params_ema` > 0 their moving average from `opt_state`."""
  if agent.policy_params_ema <= 0:
    return trainable
  if not isinstance(opt_state, tuple) or not isinstance(opt_state[-1], ParamsEmaState):
    raise ValueError('agent.policy_params_ema > 0 but the optimizer state holds no average '
                     '(a state made by another config?)')
  return opt_state[-1].average


def policy_params_label(agent: AgentConfig, online: bool = False) -> str:
  """Which params `policy_trainable` (or `online`) gives, for what a command prints."""
  if online or agent.policy_params_ema <= 0:
    return 'the online params'
  return f"the params' moving average (decay {agent.policy_params_ema:g})"


def check_frozen_modules(frozen_modules: Sequence[str]) -> None:
  unknown = [m for m in frozen_modules if m not in MODULES]
  if unknown:
    raise ValueError(f'agent.frozen_modules={tuple(frozen_modules)!r}: unknown module(s) '
                     f'{unknown}; valid: {MODULES}')


def frozen_labels(params: Any, frozen_modules: Sequence[str]) -> Any:
  """The tree of `params` with FROZEN for leaves of `frozen_modules` and TRAINABLE otherwise.

  Works on any tree holding haiku params dicts ({module_name: {name: array}}), e.g. the learner's
  (params, behaviour_params) tuple: a leaf's module is the first component of the module name.
  """
  frozen = frozenset(frozen_modules)

  def label(path, _):
    module = _module_name(path)
    return FROZEN if module is not None and module.split('/', 1)[0] in frozen else TRAINABLE
  return jax.tree_util.tree_map_with_path(label, params)


def trained_only(tree: Any, frozen_modules: Sequence[str]) -> Any:
  """`tree` (e.g. the gradients) with the leaves of `frozen_modules` replaced by a 0 scalar, so
  that nothing reads them: XLA then drops their computation (a frozen encoder's backward pass)."""
  if not frozen_modules:
    return tree
  labels = frozen_labels(tree, frozen_modules)
  return jax.tree_util.tree_map(
      lambda x, label: x if label == TRAINABLE else jnp.zeros((), x.dtype), tree, labels)


def _module_name(path) -> Optional[str]:
  """The haiku module name of a leaf path (the dict key just above the leaf name)."""
  keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
  return keys[-2] if len(keys) >= 2 else None


def param_shapes(params: Any) -> dict[str, tuple]:
  """'module/name' -> shape for a haiku params dict."""
  return {f'{m}/{n}': tuple(np.shape(v)) for m, d in params.items() for n, v in d.items()}


def param_differences(got: dict, want: dict, got_name: str, want_name: str, limit: int = 8
                      ) -> list[str]:
  """What differs between two `param_shapes`: shapes, then missing, then extra names."""
  problems = [f'{k}: {got_name} {list(got[k])} vs {want_name} {list(want[k])}'
              for k in sorted(got.keys() & want.keys()) if got[k] != want[k]]
  problems += [f'{k}: missing from the {got_name} params' for k in sorted(want.keys() - got.keys())]
  problems += [f'{k}: not in the {want_name}' for k in sorted(got.keys() - want.keys())]
  if len(problems) > limit:
    problems = problems[:limit] + [f'... and {len(problems) - limit} more']
  return problems


def check_same_structure(params: Any, reference: Any, what: str) -> None:
  """Raises ValueError naming the params of `params` missing from / extra to / shaped unlike
  those of `reference` (both haiku params dicts)."""
  problems = param_differences(param_shapes(params), param_shapes(reference), 'given', 'network')
  if problems:
    raise ValueError(f'{what} do not fit the network: {"; ".join(problems)}')


def dummy_inputs(batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
  return (jnp.zeros((batch_size, 84, 84, 4), jnp.uint8), jnp.zeros((batch_size,), jnp.int32))


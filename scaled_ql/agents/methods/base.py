"""`Method`: all that the learner, the actors, checkpoints and transfer need to know about one
training method (Acme's `LossFn` habit: the loss is an object, not a string switched on).

A method file (c51.py, mse.py, bc.py, bcq.py) defines its per-batch loss and builds one `Method`
record; `methods/__init__.py` registers it under the name `cfg.agent.loss` uses. The per-transition
maths stays in `agents/losses.py`; a method's `batch_loss` applies the networks and vmaps it.

`nets` below is the `builder.AgentNetworks` of the config (q, behaviour, action_mask, atoms).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from scaled_ql.agents import losses
from scaled_ql.configs.base import AgentConfig
from scaled_ql.types import Transition

Array = chex.Array
# (nets, params, behaviour_params, target_params, batch, agent config) -> per-transition terms
# {name: [B]}; `terms['loss']` is what the learner minimises (its batch mean).
LossFn = Callable[[Any, Any, Any, Any, Transition, AgentConfig], dict[str, Array]]
# (network logits [B, A, K], atoms [K]) -> Q [B, A]
QValuesFn = Callable[[Array, Array], Array]
# (nets, policy params, observation [E,84,84,4], game_id [E], valid bool [E, A], agent config)
#   -> bool [E, A]: the actions a greedy policy may pick
AllowedActionsFn = Callable[[Any, Any, Array, Array, Array, AgentConfig], Array]


def valid_actions(nets: Any, game_id: Array) -> Array:
  """bool [B, A_max]: the minimal action set of each example's game (padding is False)."""
  return jnp.asarray(nets.action_mask)[game_id]


def expected_q_values(logits: Array, atoms: Array) -> Array:
  """Q [B, A] of a distributional network: the mean of each action's categorical return."""
  return jax.vmap(losses.expected_q, in_axes=(0, None))(logits, atoms)


def scalar_q_values(logits: Array, atoms: Array) -> Array:
  """Q [B, A] of a network with one output per action (num_atoms = 1)."""
  del atoms
  return logits[..., 0]


def all_valid_actions(nets, policy_params, observation, game_id, valid, agent) -> Array:
  """The greedy policy may pick any valid action of the game."""
  del nets, policy_params, observation, game_id, agent
  return valid


def no_config_checks(agent: AgentConfig) -> None:
  del agent


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method. Only `name`, `label`, `distributional` and `batch_loss` have no
  default."""

  name: str  # the value of `cfg.agent.loss`
  label: str  # what reports call it, e.g. 'Scaled QL' (the demo's summary line)
  distributional: bool  # the Q-network outputs cfg.agent.num_atoms logits per action (else 1)
  batch_loss: LossFn
  q_values: QValuesFn = scalar_q_values  # what a greedy policy (and the MC probe) ranks
  allowed_actions: AllowedActionsFn = all_valid_actions
  # A second network trained alongside the Q-network (discrete BCQ's behaviour model): it lives
  # in the train state's `behaviour_params` and policies get {'q': ..., 'behaviour': ...}.
  behaviour_model: bool = False
  outputs_q: bool = True  # False for 'bc': its outputs are policy logits, not Q values
  check_config: Callable[[AgentConfig], None] = no_config_checks  # raises ValueError

  def policy_params(self, params: Any, behaviour_params: Any) -> Any:
    """What `actors.make_policy` takes (and `checkpointing.load_params` returns)."""
    return {'q': params, 'behaviour': behaviour_params} if self.behaviour_model else params

  def q_params(self, policy_params: Any) -> Any:
    """The Q-network's params inside `policy_params`."""
    return policy_params['q'] if self.behaviour_model else policy_params

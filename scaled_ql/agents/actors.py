"""Acting with a learned network: epsilon-greedy over the valid actions of each example's game."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from scaled_ql.agents import builder, losses, methods
from scaled_ql.configs.base import ExperimentConfig

Policy = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def make_policy(cfg: ExperimentConfig, epsilon: float) -> Policy:
  """Jitted `policy(params, rng, observation uint8 [E,84,84,4], game_id int32 [E]) -> int32 [E]`.

  Greedy action: argmax of the method's Q values (`Method.q_values`: the expected value of the
  C51 distribution; the scalar output for 'mse'; the logits for 'bc') over its allowed actions
  (`Method.allowed_actions`: the game's valid actions; for 'bcq' only those the behaviour model
  finds likely, Fujimoto et al. 2019). `params` is `Method.policy_params` (for 'bcq'
  {'q': ..., 'behaviour': ...}) as returned by `Learner.get_variables()` / `load_params`. With
  probability `epsilon` the action is uniform over the game's valid actions instead.
  """
  if not 0.0 <= epsilon <= 1.0:
    raise ValueError(f'epsilon={epsilon} must be in [0, 1]')
  method = methods.get(cfg.agent.loss)
  nets = builder.agent_networks(cfg)
  mask = jnp.asarray(nets.action_mask)
  atoms = jnp.asarray(nets.atoms)

  def policy(params, rng, observation, game_id):
    logits = nets.q.apply(method.q_params(params), observation, game_id).logits  # [E, A, K]
    valid = mask[game_id]
    q = method.q_values(logits, atoms)
    allowed = method.allowed_actions(nets, params, observation, game_id, valid, cfg.agent)
    greedy = jax.vmap(losses.masked_argmax)(q, allowed)
    explore_rng, action_rng = jax.random.split(rng)
    uniform_valid = jax.random.categorical(action_rng, jnp.where(valid, 0.0, -jnp.inf))
    explore = jax.random.uniform(explore_rng, greedy.shape) < epsilon
    return jnp.where(explore, uniform_valid, greedy).astype(jnp.int32)

  return jax.jit(policy)

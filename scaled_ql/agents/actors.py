"""Acting with a learned network: epsilon-greedy over the valid actions of each example's game."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from scaled_ql.agents import builder, losses
from scaled_ql.configs.base import ExperimentConfig

Policy = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def make_policy(cfg: ExperimentConfig, epsilon: float) -> Policy:
  """Jitted `policy(params, rng, observation uint8 [E,84,84,4], game_id int32 [E]) -> int32 [E]`.

  Greedy action: argmax over the game's valid actions of Q (the expected value of the C51
  distribution; the scalar output for 'mse'; the logits for 'bc'). For 'bcq' the argmax is also
  restricted to the behaviour model's allowed actions (Fujimoto et al. 2019) and `params` is
  {'q': ..., 'behaviour': ...} as returned by `Learner.get_variables()` / `load_params`. With
  probability `epsilon` the action is uniform over the game's valid actions instead.
  """
  if not 0.0 <= epsilon <= 1.0:
    raise ValueError(f'epsilon={epsilon} must be in [0, 1]')
  nets = builder.agent_networks(cfg)
  mask = jnp.asarray(nets.action_mask)
  atoms = jnp.asarray(nets.atoms)
  loss = cfg.agent.loss

  def policy(params, rng, observation, game_id):
    q_params = params['q'] if loss == 'bcq' else params
    logits = nets.q.apply(q_params, observation, game_id).logits  # [E, A, K]
    valid = mask[game_id]
    if loss in builder.DISTRIBUTIONAL_LOSSES:
      q = jax.vmap(losses.expected_q, in_axes=(0, None))(logits, atoms)
    else:
      q = logits[..., 0]
    allowed = valid
    if loss == 'bcq':
      behaviour = nets.behaviour.apply(params['behaviour'], observation, game_id).logits[..., 0]
      allowed = jax.vmap(losses.bcq_action_filter, in_axes=(0, 0, None))(
          behaviour, valid, cfg.agent.bcq_tau)
    greedy = jax.vmap(losses.masked_argmax)(q, allowed)
    explore_rng, action_rng = jax.random.split(rng)
    uniform_valid = jax.random.categorical(action_rng, jnp.where(valid, 0.0, -jnp.inf))
    explore = jax.random.uniform(explore_rng, greedy.shape) < epsilon
    return jnp.where(explore, uniform_valid, greedy).astype(jnp.int32)

  return jax.jit(policy)

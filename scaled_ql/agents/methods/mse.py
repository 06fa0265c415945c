"""The MSE TD ablation (Table 1): 0.5 * (y - Q(s, a))^2 plus alpha * CQL, on scalar Q."""
from __future__ import annotations

import jax

from scaled_ql.agents import losses
from scaled_ql.agents.methods import base


def batch_loss(nets, params, behaviour_params, target_params, batch, agent):
  del behaviour_params
  valid = base.valid_actions(nets, batch.game_id)
  q = nets.q.apply(params, batch.observation, batch.game_id).logits[..., 0]
  target_q = nets.q.apply(target_params, batch.next_observation, batch.game_id).logits[..., 0]
  return jax.vmap(losses.mse_cql_loss, in_axes=(0, 0, 0, 0, 0, 0, None))(
      q, batch.action, batch.reward, batch.discount, target_q, valid, agent.cql_alpha)


METHOD = base.Method(name='mse', label='Scaled QL with MSE TD', distributional=False,
                     batch_loss=batch_loss)

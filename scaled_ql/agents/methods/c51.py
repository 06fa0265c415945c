"""Scaled QL (Eq. 1): the C51 cross-entropy TD error plus alpha * CQL, on distributional Q."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from scaled_ql.agents import losses
from scaled_ql.agents.methods import base


def c51_cql_terms(logits, target_logits, batch, valid, bootstrap_valid, atoms, cql_alpha):
  """`losses.c51_cql_loss` over a batch: logits [B, A, K] at s and target logits at s'."""
  return jax.vmap(losses.c51_cql_loss, in_axes=(0, 0, 0, 0, 0, 0, 0, None, None))(
      logits, batch.action, batch.reward, batch.discount, target_logits, valid, bootstrap_valid,
      atoms, cql_alpha)


def batch_loss(nets, params, behaviour_params, target_params, batch, agent):
  del behaviour_params
  valid = base.valid_actions(nets, batch.game_id)
  logits = nets.q.apply(params, batch.observation, batch.game_id).logits
  target_logits = nets.q.apply(target_params, batch.next_observation, batch.game_id).logits
  return c51_cql_terms(logits, target_logits, batch, valid, valid, jnp.asarray(nets.atoms),
                       agent.cql_alpha)


METHOD = base.Method(name='c51', label='Scaled QL', distributional=True, batch_loss=batch_loss,
                     q_values=base.expected_q_values)

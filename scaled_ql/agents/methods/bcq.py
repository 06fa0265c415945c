"""Discrete BCQ (Appendix A.2; Fujimoto et al. 2019): C51 whose backup maximises only over the
actions a behaviour model finds likely at s'; the model is trained alongside by NLL on the data."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from scaled_ql.agents import losses
from scaled_ql.agents.methods import base, c51


def _filter(behaviour_logits, valid, tau):
  return jax.vmap(losses.bcq_action_filter, in_axes=(0, 0, None))(behaviour_logits, valid, tau)


def batch_loss(nets, params, behaviour_params, target_params, batch, agent):
  valid = base.valid_actions(nets, batch.game_id)
  logits = nets.q.apply(params, batch.observation, batch.game_id).logits
  target_logits = nets.q.apply(target_params, batch.next_observation, batch.game_id).logits
  # The filter at s' does not train the behaviour model; the NLL at s below does.
  behaviour_next = nets.behaviour.apply(
      jax.lax.stop_gradient(behaviour_params), batch.next_observation, batch.game_id)
  bootstrap_valid = _filter(behaviour_next.logits[..., 0], valid, agent.bcq_tau)
  terms = c51.c51_cql_terms(logits, target_logits, batch, valid, bootstrap_valid,
                            jnp.asarray(nets.atoms), agent.cql_alpha)
  behaviour_logits = nets.behaviour.apply(behaviour_params, batch.observation,
                                          batch.game_id).logits[..., 0]
  nll = jax.vmap(losses.bc_loss)(behaviour_logits, batch.action, valid)
  terms['loss'] = terms['loss'] + nll['loss']
  terms['behaviour_nll'] = nll['loss']
  terms['behaviour_accuracy'] = nll['bc_accuracy']
  terms['bcq_allowed_actions'] = jnp.sum(bootstrap_valid, axis=-1).astype(jnp.float32)
  return terms


def allowed_actions(nets, policy_params, observation, game_id, valid, agent):
  """Acting too picks only among the behaviour model's likely actions."""
  behaviour = nets.behaviour.apply(policy_params['behaviour'], observation, game_id).logits[..., 0]
  return _filter(behaviour, valid, agent.bcq_tau)


METHOD = base.Method(name='bcq', label='discrete BCQ', distributional=True, batch_loss=batch_loss,
                     q_values=base.expected_q_values, allowed_actions=allowed_actions,
                     behaviour_model=True)

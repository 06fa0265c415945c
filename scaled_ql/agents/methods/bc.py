"""Behaviour cloning (the BC baseline): -log pi(a_data | s); the network outputs policy logits."""
from __future__ import annotations

import jax

from scaled_ql.agents import losses
from scaled_ql.agents.methods import base


def batch_loss(nets, params, behaviour_params, target_params, batch, agent):
  del behaviour_params, target_params, agent
  valid = base.valid_actions(nets, batch.game_id)
  logits = nets.q.apply(params, batch.observation, batch.game_id).logits[..., 0]
  return jax.vmap(losses.bc_loss)(logits, batch.action, valid)


def check_config(agent) -> None:
  if agent.cql_alpha != 0:
    raise ValueError(f'agent.cql_alpha={agent.cql_alpha} has no meaning for loss "bc"; set it to 0')


# The greedy action is the most likely one: ranking the logits is ranking the probabilities.
METHOD = base.Method(name='bc', label='BC', distributional=False, batch_loss=batch_loss,
                     outputs_q=False, check_config=check_config)

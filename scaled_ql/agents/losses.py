"""The training objectives of Scaled QL, as per-transition pure functions (rlax style).

Every function here takes ONE transition (no batch dimension); the learner `jax.vmap`s them. Read
top to bottom:

1. helpers over the game's valid actions: `masked_argmax`, `masked_logsumexp`, `masked_log_softmax`
   (a padded action, i.e. an index >= the game's minimal action-set size, never wins an argmax,
   never enters a logsumexp/softmax and never becomes the bootstrap action);
2. C51's TD error is rlax's (`rlax.categorical_double_q_learning`, whose projection is
   `rlax.categorical_l2_project`) with the target network's Q, masked, as the action selector;
3. `cql_penalty`: the CQL regulariser of Eq. 1, logsumexp_a' Q(s,a') - Q(s,a_data);
   `q_diagnostics`: what a researcher watches (Q(s, a_data), action gap, greedy = data action);
4. the losses, each returning a dict of per-transition terms (`loss` is what is minimised):
   `c51_cql_loss` (Scaled QL, Eq. 1 with the C51 cross-entropy TD error), `mse_cql_loss` (the MSE
   TD ablation, Table 1), `bc_loss` (behaviour cloning baseline), and for discrete BCQ (Appendix
   A.2) `bcq_action_filter` + `c51_cql_loss` with the filtered bootstrap set + `bc_loss` for the
   behaviour model.

`methods/` applies the networks and vmaps these over a batch, one file per method.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = chex.Array

_NEG_INF = -1e30  # finite "minus infinity": keeps gradients of masked entries exactly zero


# ---------------------------------------------------------------------------------------------
# 1. Valid-action helpers.
# ---------------------------------------------------------------------------------------------
def masked_argmax(values: Array, valid: Array) -> Array:
  """argmax over the valid entries of `values` [A]; ties go to the lowest index."""
  chex.assert_rank([values, valid], 1)
  chex.assert_type(valid, bool)
  return jnp.argmax(jnp.where(valid, values, -jnp.inf)).astype(jnp.int32)


def masked_logsumexp(values: Array, valid: Array) -> Array:
  """log sum_{a valid} exp(values[a]) for `values` [A]."""
  chex.assert_rank([values, valid], 1)
  chex.assert_type(valid, bool)
  return jax.nn.logsumexp(jnp.where(valid, values, _NEG_INF))


def masked_log_softmax(logits: Array, valid: Array) -> Array:
  """log-probabilities of a softmax restricted to the valid actions (invalid ones get ~-1e30)."""
  chex.assert_rank([logits, valid], 1)
  chex.assert_type(valid, bool)
  return jax.nn.log_softmax(jnp.where(valid, logits, _NEG_INF))


def action_gap(q_values: Array, valid: Array) -> Array:
  """Q of the best valid action minus Q of the second best (0 for a game with one action).

  A diagnostic: a gap near 0 everywhere means Q is flat across actions (nothing learned to act on).
  """
  chex.assert_rank([q_values, valid], 1)
  chex.assert_type(valid, bool)
  masked = jnp.where(valid, q_values, -jnp.inf)
  best = masked_argmax(q_values, valid)
  second = jnp.max(jnp.where(jnp.arange(q_values.shape[0]) == best, -jnp.inf, masked))
  return jnp.where(jnp.isfinite(second), masked[best] - second, 0.0)


def select(values: Array, index: Array) -> Array:
  """`values[index]` along the first axis ([A] -> [], [A, N] -> [N]) as a one-hot contraction.

  Equal to indexing (one 1 and zeros times finite values), but its gradient is dense: the
  gradient of a dynamic index is a scatter-add, which XLA:CPU runs as a serial loop over the
  batch (see `networks.q_network.MultiGameHeads`).
  """
  chex.assert_rank(index, 0)
  one_hot = jax.nn.one_hot(index, values.shape[0], dtype=values.dtype)
  return jnp.tensordot(one_hot, values, axes=1)


def expected_q(logits: Array, atoms: Array) -> Array:
  """Q(s, .) [A] as the expectation of the per-action categorical return distribution [A, N]."""
  chex.assert_rank([logits, atoms], [2, 1])
  return jnp.sum(jax.nn.softmax(logits, axis=-1) * atoms, axis=-1)


# ---------------------------------------------------------------------------------------------
# 2. The CQL regulariser (Eq. 1; Kumar et al. 2020, CQL(H)).
# ---------------------------------------------------------------------------------------------
def cql_penalty(q_values: Array, action: Array, valid: Array) -> Array:
  """logsumexp over the game's valid actions of Q(s, .) minus Q(s, a_data)."""
  chex.assert_rank([q_values, action, valid], [1, 0, 1])
  return masked_logsumexp(q_values, valid) - select(q_values, action)


def q_diagnostics(q_values: Array, action: Array, valid: Array) -> dict[str, Array]:
  """Monitoring terms of a Q-learning loss (never minimised): `q_data` = Q(s, a_data),
  `action_gap` (best minus second-best valid Q) and `greedy_is_data_action` (1 when the greedy
  action is the dataset's: the Q-learner's "BC accuracy")."""
  return dict(q_data=select(q_values, action), action_gap=action_gap(q_values, valid),
              greedy_is_data_action=(masked_argmax(q_values, valid) == action).astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# 3. Losses.
# ---------------------------------------------------------------------------------------------
def c51_cql_loss(
    logits_tm1: Array,
    a_tm1: Array,
    r_t: Array,
    discount_t: Array,
    target_logits_t: Array,
    valid: Array,
    bootstrap_valid: Array,
    atoms: Array,
    cql_alpha: float,
) -> dict[str, Array]:
  """Scaled QL's objective for one transition: C51 cross-entropy TD error + alpha * CQL.

  Args:
    logits_tm1: online network logits at s_t, [A, N].
    a_tm1: dataset action (int).
    r_t: n-step discounted sum of clipped rewards.
    discount_t: gamma^K, or 0 if the episode terminated within the K steps (no bootstrap).
    target_logits_t: TARGET network logits at s_{t+K}, [A, N].
    valid: the game's valid actions, bool [A] (used by the CQL logsumexp).
    bootstrap_valid: actions the bootstrap may pick, bool [A]: `valid` for C51, the BCQ filter
      (`bcq_action_filter`) for discrete BCQ.
    atoms: the fixed support, [N] (51 atoms on [v_min, v_max]).
    cql_alpha: weight of the CQL regulariser (0.05 in the paper; 0 = plain offline Q-learning).
  Returns:
    dict with `loss` (minimised), `td_loss`, `cql_loss` (the unweighted regulariser), and for
    monitoring `td_loss_over_log_atoms` and the terms of `q_diagnostics`.
  """
  chex.assert_rank([logits_tm1, a_tm1, r_t, discount_t, target_logits_t, valid, bootstrap_valid,
                    atoms], [2, 0, 0, 0, 2, 1, 1, 1])
  chex.assert_type([logits_tm1, a_tm1, r_t, discount_t, target_logits_t, valid, bootstrap_valid],
                   [float, int, float, float, float, bool, bool])
  chex.assert_equal_shape([logits_tm1, target_logits_t])
  # Bootstrap: the target network's distribution at its own greedy action among the allowed ones
  # (the selector's disallowed actions are -inf), shifted to r + discount * atoms (discount 0:
  # every atom collapses onto r), projected onto `atoms`; cross-entropy with the online logits.
  target_q_t = expected_q(target_logits_t, atoms)
  selector = jnp.where(bootstrap_valid, target_q_t, -jnp.inf)
  # Imported here, when a loss is traced, not with this module: rlax -> distrax -> TFP imports
  # TensorFlow whenever it is installed (+5 s and +460 MB per process, measured), which the
  # processes that only act (evaluators, `scaled-ql eval`; they use the helpers above through
  # `actors.make_policy`) must not pay. The learner's process has TensorFlow already (Reverb).
  import rlax  # pylint: disable=g-import-not-at-top
  # rlax indexes `logits_tm1[a_tm1]`; handing it the data action's row (`select`) as a one-action
  # table keeps that index constant, so no scatter-add appears in the gradient.
  td_loss = rlax.categorical_double_q_learning(atoms, select(logits_tm1, a_tm1)[None],
                                               jnp.zeros((), a_tm1.dtype), r_t, discount_t,
                                               atoms, target_logits_t, selector)

  q_tm1 = expected_q(logits_tm1, atoms)
  cql_loss = cql_penalty(q_tm1, a_tm1, valid)
  return dict(loss=td_loss + cql_alpha * cql_loss, td_loss=td_loss, cql_loss=cql_loss,
              # Cross-entropy / log(N): 1.0 is what a uniform prediction scores on any target.
              td_loss_over_log_atoms=td_loss / jnp.log(atoms.shape[0]),
              **q_diagnostics(q_tm1, a_tm1, valid))


def mse_cql_loss(
    q_tm1: Array,
    a_tm1: Array,
    r_t: Array,
    discount_t: Array,
    target_q_t: Array,
    valid: Array,
    cql_alpha: float,
) -> dict[str, Array]:
  """The MSE TD ablation (Table 1; Kumar et al. 2021): 0.5 * (y - Q(s,a))^2 + alpha * CQL.

  `q_tm1` [A] online Q at s_t; `target_q_t` [A] target-network Q at s_{t+K}; the bootstrap is
  max over the game's valid actions of the target Q (DQN's target), y = r + discount * max.
  """
  chex.assert_rank([q_tm1, a_tm1, r_t, discount_t, target_q_t, valid], [1, 0, 0, 0, 1, 1])
  chex.assert_type([q_tm1, a_tm1, r_t, discount_t, target_q_t, valid],
                   [float, int, float, float, float, bool])
  a_t = masked_argmax(target_q_t, valid)
  y = jax.lax.stop_gradient(r_t + discount_t * target_q_t[a_t])
  td_loss = 0.5 * jnp.square(y - select(q_tm1, a_tm1))
  cql_loss = cql_penalty(q_tm1, a_tm1, valid)
  return dict(loss=td_loss + cql_alpha * cql_loss, td_loss=td_loss, cql_loss=cql_loss,
              **q_diagnostics(q_tm1, a_tm1, valid))


def bc_loss(logits: Array, action: Array, valid: Array) -> dict[str, Array]:
  """Behaviour cloning: -log pi(a_data | s) with pi a softmax over the game's valid actions.

  Also the negative log-likelihood of discrete BCQ's behaviour model (Appendix A.2).
  """
  chex.assert_rank([logits, action, valid], [1, 0, 1])
  chex.assert_type([logits, action, valid], [float, int, bool])
  log_probs = masked_log_softmax(logits, valid)
  nll = -select(log_probs, action)
  accuracy = (masked_argmax(logits, valid) == action).astype(jnp.float32)
  return dict(loss=nll, bc_loss=nll, bc_accuracy=accuracy)


def bcq_action_filter(behaviour_logits: Array, valid: Array, tau: float) -> Array:
  """Discrete BCQ's allowed actions (Appendix A.2; Fujimoto et al. 2019), bool [A].

  An action is allowed when it is valid for the game and its behaviour-model probability is at
  least `tau` times that of the most likely valid action. The most likely action is always allowed.
  """
  chex.assert_rank([behaviour_logits, valid], 1)
  chex.assert_type(valid, bool)
  probs = jnp.exp(masked_log_softmax(behaviour_logits, valid))
  max_prob = jnp.max(jnp.where(valid, probs, 0.0))
  return valid & (probs >= tau * max_prob)

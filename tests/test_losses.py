"""Tests of scaled_ql/agents/losses.py: hand-computed examples, rlax agreement, action masking."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from scaled_ql.agents import losses

VARIANTS = [pytest.param(lambda f: f, id='eager'), pytest.param(jax.jit, id='jit')]
ATOMS = jnp.linspace(-10.0, 10.0, 51)


def reference_l2_project(z_p, probs, z_q):
  """Our spec of C51's projection (Bellemare et al. 2017, Algorithm 1), which the loss now takes
  from rlax: each source atom, clipped into [z_q[0], z_q[-1]], splits its mass between the two
  neighbouring target atoms in proportion to closeness (a triangular kernel whose half-width is the
  gap to the neighbour on that side)."""
  z_p = jnp.clip(z_p, z_q[0], z_q[-1])
  gap_above = jnp.concatenate([z_q[1:] - z_q[:-1], jnp.ones((1,), z_q.dtype)])
  gap_below = jnp.concatenate([jnp.ones((1,), z_q.dtype), z_q[1:] - z_q[:-1]])
  dist = z_p[:, None] - z_q[None, :]  # [N, M]: source atom minus target atom
  gap = jnp.where(dist >= 0, gap_above[None, :], gap_below[None, :])
  weight = jnp.clip(1.0 - jnp.abs(dist) / gap, 0.0, 1.0)  # [N, M]
  return jnp.sum(probs[:, None] * weight, axis=0)


@pytest.mark.parametrize('n,m,uniform', [(51, 51, True), (7, 13, True), (9, 5, False)])
def test_projection_matches_rlax(n, m, uniform):
  rng = np.random.default_rng(n * m)
  for _ in range(5):
    z_p = np.sort(rng.normal(0, 8, size=n)).astype(np.float32)
    probs = rng.dirichlet(np.ones(n)).astype(np.float32)
    if uniform:
      z_q = np.linspace(-10, 10, m, dtype=np.float32)
    else:
      z_q = np.sort(rng.uniform(-10, 10, size=m)).astype(np.float32)
    ours = reference_l2_project(z_p, probs, z_q)
    theirs = rlax.categorical_l2_project(z_p, probs, z_q)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(np.sum(ours), 1.0, atol=1e-5)


def test_projection_splits_mass_between_neighbours():
  z_q = jnp.array([-1.0, 0.0, 1.0])
  out = rlax.categorical_l2_project(jnp.array([0.25, 5.0]), jnp.array([0.6, 0.4]), z_q)
  np.testing.assert_allclose(out, [0.0, 0.6 * 0.75, 0.6 * 0.25 + 0.4], atol=1e-6)


@pytest.mark.parametrize('variant', VARIANTS)
def test_cql_penalty_hand_computed(variant):
  q = jnp.array([1.0, 2.0, 100.0])  # the third action is padding: must be ignored
  valid = jnp.array([True, True, False])
  got = variant(losses.cql_penalty)(q, jnp.int32(0), valid)
  np.testing.assert_allclose(got, math.log(math.e + math.e ** 2) - 1.0, rtol=1e-6)


def test_masked_helpers_ignore_invalid_actions():
  values = jnp.array([0.5, -1.0, 1e6, 3.0])
  valid = jnp.array([True, True, False, False])
  assert int(losses.masked_argmax(values, valid)) == 0
  np.testing.assert_allclose(losses.masked_logsumexp(values, valid),
                             np.log(np.exp(0.5) + np.exp(-1.0)), rtol=1e-6)
  probs = np.exp(losses.masked_log_softmax(values, valid))
  np.testing.assert_allclose(probs[2:], 0.0)
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
  # No gradient flows into padded actions through the CQL logsumexp.
  grad = jax.grad(lambda q: losses.cql_penalty(q, jnp.int32(1), valid))(values)
  np.testing.assert_array_equal(grad[2:], 0.0)


def _one_hot_logits(index_per_action, num_atoms=51, scale=30.0):
  return scale * jax.nn.one_hot(jnp.asarray(index_per_action), num_atoms)


@pytest.mark.parametrize('variant', VARIANTS)
def test_c51_terminal_does_not_bootstrap(variant):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 51)), jnp.float32)
  valid = jnp.array([True, True, True])
  fn = variant(losses.c51_cql_loss)
  outs = [fn(logits, jnp.int32(1), jnp.float32(2.0), jnp.float32(0.0),
             jnp.asarray(rng.normal(size=(3, 51)) * 5, jnp.float32), valid, valid, ATOMS, 0.05)
          for _ in range(2)]
  np.testing.assert_allclose(outs[0]['td_loss'], outs[1]['td_loss'], rtol=1e-6)
  # Reward 2.0 is exactly atom 30 of linspace(-10, 10, 51): the target is a one-hot there.
  np.testing.assert_allclose(outs[0]['td_loss'], -jax.nn.log_softmax(logits[1])[30], rtol=1e-5)


@pytest.mark.parametrize('variant', VARIANTS)
def test_c51_bootstrap_never_uses_invalid_action(variant):
  # Target: action 0 -> atom 25 (0.0), action 1 -> atom 35 (+4.0), action 2 (padding) -> +10.
  target_logits = _one_hot_logits([25, 35, 50])
  online = jnp.zeros((3, 51))
  valid = jnp.array([True, True, False])
  out = variant(losses.c51_cql_loss)(online, jnp.int32(0), jnp.float32(0.0), jnp.float32(0.5),
                                     target_logits, valid, valid, ATOMS, 0.0)
  # Bootstrap from action 1 (Q=+4): target atom 0.5*4 = 2.0 = index 30; uniform online -> log 51.
  np.testing.assert_allclose(out['td_loss'], math.log(51), rtol=1e-5)
  # And the result equals that of the same problem without the padded action.
  out2 = losses.c51_cql_loss(online[:2], jnp.int32(0), jnp.float32(0.0), jnp.float32(0.5),
                             target_logits[:2], valid[:2], valid[:2], ATOMS, 0.0)
  np.testing.assert_allclose(out['loss'], out2['loss'], rtol=1e-6)


def test_c51_target_distribution_matches_rlax_categorical_q_learning():
  # With alpha = 0 and the target net's greedy action, our TD term is rlax's categorical Q-learning
  # where q_t_selector is the target net's own Q.
  rng = np.random.default_rng(3)
  logits_tm1 = jnp.asarray(rng.normal(size=(4, 51)), jnp.float32)
  logits_t = jnp.asarray(rng.normal(size=(4, 51)), jnp.float32)
  valid = jnp.ones(4, bool)
  ours = losses.c51_cql_loss(logits_tm1, jnp.int32(2), jnp.float32(0.7), jnp.float32(0.97),
                             logits_t, valid, valid, ATOMS, 0.0)
  theirs = rlax.categorical_double_q_learning(
      ATOMS, logits_tm1, jnp.int32(2), jnp.float32(0.7), jnp.float32(0.97), ATOMS, logits_t,
      losses.expected_q(logits_t, ATOMS))
  np.testing.assert_allclose(ours['td_loss'], theirs, rtol=1e-5)


@pytest.mark.parametrize('variant', VARIANTS)
def test_c51_td_loss_is_the_masked_projection_spec(variant):
  # The TD term (rlax's categorical double Q-learning with a masked selector) against the spec
  # written out: bootstrap at the target net's best ALLOWED action, shift, project, cross-entropy.
  rng = np.random.default_rng(7)
  for trial in range(5):
    logits_tm1 = jnp.asarray(rng.normal(size=(5, 51)) * 3, jnp.float32)
    logits_t = jnp.asarray(rng.normal(size=(5, 51)) * 3, jnp.float32)
    valid = jnp.array([True, True, True, True, False])
    allowed = valid & jnp.asarray(rng.random(5) < 0.5).at[trial % 4].set(True)
    r, d = jnp.float32(rng.normal()), jnp.float32([0.0, 0.97][trial % 2])

    def ours(logits):
      return variant(losses.c51_cql_loss)(logits, jnp.int32(1), r, d, logits_t, valid, allowed,
                                          ATOMS, 0.0)['td_loss']

    def spec(logits):
      a_t = losses.masked_argmax(losses.expected_q(logits_t, ATOMS), allowed)
      target = reference_l2_project(r + d * ATOMS, jax.nn.softmax(logits_t[a_t]), ATOMS)
      return -jnp.sum(target * jax.nn.log_softmax(logits[1]))
    np.testing.assert_allclose(ours(logits_tm1), spec(logits_tm1), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(ours)(logits_tm1), jax.grad(spec)(logits_tm1), atol=1e-6)


def test_c51_cql_term_and_weighting():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, 51)), jnp.float32)
  valid = jnp.array([True, True, False])
  out = losses.c51_cql_loss(logits, jnp.int32(1), jnp.float32(0.0), jnp.float32(0.9), logits,
                            valid, valid, ATOMS, 0.05)
  q = np.asarray(losses.expected_q(logits, ATOMS))
  expected_cql = np.log(np.exp(q[0]) + np.exp(q[1])) - q[1]
  np.testing.assert_allclose(out['cql_loss'], expected_cql, rtol=1e-5)
  np.testing.assert_allclose(out['q_data'], q[1], rtol=1e-6)
  np.testing.assert_allclose(out['loss'], out['td_loss'] + 0.05 * expected_cql, rtol=1e-5)


@pytest.mark.parametrize('variant', VARIANTS)
def test_mse_cql_hand_computed(variant):
  q = jnp.array([1.0, 2.0, 50.0])
  target_q = jnp.array([3.0, -1.0, 99.0])  # padded action 2 must not be the bootstrap
  valid = jnp.array([True, True, False])
  out = variant(losses.mse_cql_loss)(q, jnp.int32(0), jnp.float32(1.0), jnp.float32(0.5),
                                     target_q, valid, 0.1)
  y = 1.0 + 0.5 * 3.0
  np.testing.assert_allclose(out['td_loss'], 0.5 * (y - 1.0) ** 2, rtol=1e-6)
  cql = math.log(math.e + math.e ** 2) - 1.0
  np.testing.assert_allclose(out['cql_loss'], cql, rtol=1e-6)
  np.testing.assert_allclose(out['loss'], 0.5 * (y - 1.0) ** 2 + 0.1 * cql, rtol=1e-6)
  terminal = losses.mse_cql_loss(q, jnp.int32(0), jnp.float32(1.0), jnp.float32(0.0), target_q,
                                 valid, 0.0)
  np.testing.assert_allclose(terminal['td_loss'], 0.0)


def test_bc_loss_hand_computed():
  logits = jnp.array([0.0, math.log(3.0), 10.0])
  valid = jnp.array([True, True, False])
  out = losses.bc_loss(logits, jnp.int32(0), valid)
  np.testing.assert_allclose(out['loss'], math.log(4.0), rtol=1e-6)  # p(a=0) = 1/(1+3)
  assert float(out['bc_accuracy']) == 0.0
  assert float(losses.bc_loss(logits, jnp.int32(1), valid)['bc_accuracy']) == 1.0


@pytest.mark.parametrize('variant', VARIANTS)
def test_bcq_action_filter_hand_computed(variant):
  f = variant(losses.bcq_action_filter)
  logits = jnp.log(jnp.array([0.5, 0.3, 0.1, 0.1]))
  np.testing.assert_array_equal(f(logits, jnp.ones(4, bool), 0.3), [True, True, False, False])
  np.testing.assert_array_equal(f(logits, jnp.ones(4, bool), 0.15), [True, True, True, True])
  # A padded action is never allowed, however likely the model thinks it is; renormalising over
  # the valid actions gives [0.3, 0.1, 0.1] / 0.5 = [0.6, 0.2, 0.2]: tau 0.3 -> threshold 0.18
  # keeps all three, tau 0.4 -> threshold 0.24 keeps only action 1.
  valid = jnp.array([False, True, True, True])
  np.testing.assert_array_equal(f(logits, valid, 0.3), [False, True, True, True])
  np.testing.assert_array_equal(f(logits, valid, 0.4), [False, True, False, False])


def test_bcq_backup_maximises_only_over_filtered_actions():
  target_logits = _one_hot_logits([25, 35, 40])  # Q = 0, 4, 6
  valid = jnp.ones(3, bool)
  allowed = losses.bcq_action_filter(jnp.log(jnp.array([0.6, 0.39, 0.01])), valid, 0.3)
  np.testing.assert_array_equal(allowed, [True, True, False])
  out = losses.c51_cql_loss(jnp.zeros((3, 51)), jnp.int32(0), jnp.float32(0.0), jnp.float32(1.0),
                            target_logits, valid, allowed, ATOMS, 0.0)
  # The backup uses action 1 (Q=4 -> atom 35), not the filtered-out action 2.
  target_logits_no2 = _one_hot_logits([25, 35, 0])
  ref = losses.c51_cql_loss(jnp.zeros((3, 51)), jnp.int32(0), jnp.float32(0.0), jnp.float32(1.0),
                            target_logits_no2, valid, valid, ATOMS, 0.0)
  np.testing.assert_allclose(out['td_loss'], ref['td_loss'], rtol=1e-6)


def test_rank_and_dtype_checks():
  with pytest.raises(AssertionError):
    losses.cql_penalty(jnp.zeros((2, 3)), jnp.int32(0), jnp.ones(3, bool))
  with pytest.raises(AssertionError):  # float action
    losses.bc_loss(jnp.zeros(3), jnp.float32(0.0), jnp.ones(3, bool))


# ---- diagnostics (issue 11: what a researcher looks at) -----------------------------------------
@pytest.mark.parametrize('variant', VARIANTS)
def test_action_gap_hand_computed(variant):
  gap = variant(losses.action_gap)
  # Padded action 3 (Q 99) is ignored: best 2.0, second 1.5.
  np.testing.assert_allclose(gap(jnp.array([1.5, 2.0, -1.0, 99.0]),
                                 jnp.array([True, True, True, False])), 0.5, rtol=1e-6)
  np.testing.assert_allclose(gap(jnp.array([3.0, 3.0]), jnp.array([True, True])), 0.0)
  np.testing.assert_allclose(gap(jnp.array([3.0, 7.0]), jnp.array([True, False])), 0.0)


def test_c51_diagnostics():
  rng = np.random.default_rng(2)
  valid = jnp.array([True, True, True, False])
  target = jnp.asarray(rng.normal(size=(4, 51)), jnp.float32)
  # A uniform prediction scores exactly log(N) on any target: the ratio is 1.
  out = losses.c51_cql_loss(jnp.zeros((4, 51)), jnp.int32(0), jnp.float32(0.3),
                            jnp.float32(0.9), target, valid, valid, ATOMS, 0.05)
  np.testing.assert_allclose(out['td_loss_over_log_atoms'], 1.0, rtol=1e-5)
  assert float(out['action_gap']) == 0.0
  logits = jnp.asarray(rng.normal(size=(4, 51)) * 3, jnp.float32)
  out = losses.c51_cql_loss(logits, jnp.int32(1), jnp.float32(0.3), jnp.float32(0.9), target,
                            valid, valid, ATOMS, 0.05)
  np.testing.assert_allclose(out['td_loss_over_log_atoms'], out['td_loss'] / math.log(51),
                             rtol=1e-6)
  q = np.sort(np.asarray(losses.expected_q(logits, ATOMS))[:3])
  np.testing.assert_allclose(out['action_gap'], q[-1] - q[-2], rtol=1e-5)
  greedy = int(np.argmax(np.asarray(losses.expected_q(logits, ATOMS))[:3]))
  assert float(out['greedy_is_data_action']) == float(greedy == 1)


def test_mse_diagnostics():
  q = jnp.array([1.0, 4.0, 2.5])
  valid = jnp.ones(3, bool)
  out = losses.mse_cql_loss(q, jnp.int32(1), jnp.float32(0.0), jnp.float32(0.0), q, valid, 0.1)
  assert float(out['q_data']) == 4.0
  np.testing.assert_allclose(out['action_gap'], 1.5)
  assert float(out['greedy_is_data_action']) == 1.0
  out = losses.mse_cql_loss(q, jnp.int32(2), jnp.float32(0.0), jnp.float32(0.0), q, valid, 0.1)
  assert float(out['greedy_is_data_action']) == 0.0


def test_select_is_indexing_with_a_dense_gradient():
  values = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
  for a in range(5):
    np.testing.assert_array_equal(losses.select(values, jnp.int32(a)), values[a])
    np.testing.assert_array_equal(losses.select(values[:, 0], jnp.int32(a)), values[a, 0])
  grad = jax.grad(lambda v: losses.select(v, jnp.int32(2)).sum())(values)
  np.testing.assert_array_equal(grad, np.eye(5, dtype=np.float32)[2][:, None].repeat(3, 1))
  masked = jnp.asarray([0.0, -1e30, 2.0])  # masked log-probabilities stay finite
  assert losses.select(masked, jnp.int32(2)) == 2.0

"""Dopamine's own JAX C51 training step, rewritten in Haiku: the baseline of learner_step.py.

Issue 13 asks that our learner reach more FLOP/s than Dopamine's C51 step on the same machine.
This module is that step, so `benchmarks/learner_step.py` can compile and time it beside ours.
It follows google/dopamine at commit 9f616b924451cc5c23800c49e8907ebc67f8498b (read, not copied):

- `dopamine/jax/networks.py`, `RainbowNetwork` (NatureDQN torso): uint8 input as float32 / 255;
  Conv 32 8x8 stride 4, Conv 64 4x4 stride 2, Conv 64 3x3 stride 1 (flax's default 'SAME'
  padding, so 84 -> 21 -> 11 -> 11), ReLUs, flatten (11*11*64 = 7744), Dense 512, ReLU,
  Dense A*51 -> logits [A, 51], softmax, q = sum(support * p). Kernels: variance scaling
  (1/sqrt(3), fan_in, uniform); biases zero. It is applied to ONE state and `jax.vmap`ped.
- `dopamine/jax/agents/rainbow/rainbow_agent.py`: `train` (vmapped online forward, logits of
  the taken action, softmax cross-entropy against the target, mean of loss_weights * loss,
  value_and_grad, optax update), `target_distribution` (vmapped target forward, argmax of q,
  projection) and `project_distribution` (Bellemare et al. 2017, Eq. 7).
- `dopamine/jax/losses.py`, `softmax_cross_entropy_loss_with_logits`.
- `dopamine/jax/agents/dqn/dqn_agent.py`, `create_optimizer`: optax.adam(b1 0.9, b2 0.999).
- `dopamine/jax/agents/rainbow/configs/c51.gin`: 51 atoms, vmax 10 (vmin -10), gamma 0.99,
  update_horizon 1, uniform replay (loss_weights all 1), Adam lr 0.00025 eps 0.0003125,
  batch 32. update_period 4 and target_update_period 8000 act outside `train`: they decide
  when it is called and when `target_network_params = online_params` (a Python reference copy,
  no device work), so neither is part of the timed step.

What differs from Dopamine: Haiku instead of flax.linen (same layers, padding, initializers and
dtypes, so the same XLA computation up to op order), and the step's state is one NamedTuple and
its outputs a metrics dict, so `learner_step.py` times it with the same loop as our `update`.
Like Dopamine's `train`, nothing is donated and everything is float32.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

NUM_ATOMS = 51
VMAX = 10.0
GAMMA = 0.99
UPDATE_HORIZON = 1
LEARNING_RATE = 0.00025
ADAM_EPS = 0.0003125
BATCH_SIZE = 32
OBSERVATION_SHAPE = (84, 84, 4)
# (features, kernel, stride) of the NatureDQN torso; flax's nn.Conv pads 'SAME' by default.
CONVS = ((32, 8, 4), (64, 4, 2), (64, 3, 1))
HIDDEN = 512


class RainbowOutput(NamedTuple):
  q_values: jax.Array       # [A]
  logits: jax.Array         # [A, num_atoms]
  probabilities: jax.Array  # [A, num_atoms]


class C51State(NamedTuple):
  online_params: hk.Params
  target_params: hk.Params
  optimizer_state: optax.OptState


class C51Batch(NamedTuple):
  """One replay sample, as Dopamine's `_sample_from_replay_buffer` hands it to `train`."""
  states: np.ndarray        # [B, 84, 84, 4] uint8
  actions: np.ndarray       # [B] int32
  next_states: np.ndarray   # [B, 84, 84, 4] uint8
  rewards: np.ndarray       # [B] float32
  terminals: np.ndarray     # [B] uint8
  loss_weights: np.ndarray  # [B] float32, all 1 (uniform replay)


def rainbow_network(num_actions: int, num_atoms: int, x: jax.Array,
                    support: jax.Array) -> RainbowOutput:
  """RainbowNetwork on one unbatched uint8 state [84, 84, 4] (Dopamine vmaps it)."""
  init = hk.initializers.VarianceScaling(scale=1.0 / np.sqrt(3.0), mode='fan_in',
                                         distribution='uniform')
  x = x.astype(jnp.float32) / 255.0
  for features, kernel, stride in CONVS:
    x = jax.nn.relu(hk.Conv2D(features, kernel, stride=stride, padding='SAME', w_init=init)(x))
  x = x.reshape(-1)
  x = jax.nn.relu(hk.Linear(HIDDEN, w_init=init)(x))
  x = hk.Linear(num_actions * num_atoms, w_init=init)(x)
  logits = x.reshape((num_actions, num_atoms))
  probabilities = jax.nn.softmax(logits)
  q_values = jnp.sum(support * probabilities, axis=1)
  return RainbowOutput(q_values, logits, probabilities)


def project_distribution(supports: jax.Array, weights: jax.Array,
                         target_support: jax.Array) -> jax.Array:
  """Eq. 7 of Bellemare et al. (2017): (supports, weights) onto the evenly spaced target_support."""
  v_min, v_max = target_support[0], target_support[-1]
  delta_z = (v_max - v_min) / (target_support.shape[0] - 1)
  clipped = jnp.clip(supports, v_min, v_max)
  quotient = 1 - jnp.abs(clipped - target_support[:, None]) / delta_z
  return jnp.squeeze(jnp.sum(jnp.clip(quotient, 0, 1) * weights, -1))


def target_distribution(q_target: Callable[[jax.Array], RainbowOutput], next_state: jax.Array,
                        reward: jax.Array, terminal: jax.Array, support: jax.Array,
                        cumulative_gamma: float) -> jax.Array:
  """The C51 target of one transition: greedy next distribution projected onto the support."""
  gamma_with_terminal = cumulative_gamma * (1.0 - terminal.astype(jnp.float32))
  target_support = reward + gamma_with_terminal * support
  out = q_target(next_state)
  next_probabilities = jnp.squeeze(out.probabilities)[jnp.argmax(jnp.squeeze(out.q_values))]
  return jax.lax.stop_gradient(project_distribution(target_support, next_probabilities, support))


def softmax_cross_entropy(labels: jax.Array, logits: jax.Array) -> jax.Array:
  return -jnp.sum(labels * jax.nn.log_softmax(logits))


def train(network: hk.Transformed, optimizer: optax.GradientTransformation, state: C51State,
          batch: C51Batch, support: jax.Array, cumulative_gamma: float):
  """Dopamine's `rainbow_agent.train`: one gradient step; the target params are not touched."""

  def loss_fn(params, target, loss_multipliers):
    logits = jax.vmap(lambda s: network.apply(params, s, support))(batch.states).logits
    chosen_action_logits = jax.vmap(lambda x, y: x[y])(logits, batch.actions)
    loss = jax.vmap(softmax_cross_entropy)(target, chosen_action_logits)
    return jnp.mean(loss_multipliers * loss), loss

  def q_target(s):
    return network.apply(state.target_params, s, support)

  target = jax.vmap(target_distribution, in_axes=(None, 0, 0, 0, None, None))(
      q_target, batch.next_states, batch.rewards, batch.terminals, support, cumulative_gamma)
  (mean_loss, loss), grad = jax.value_and_grad(loss_fn, has_aux=True)(
      state.online_params, target, batch.loss_weights)
  updates, optimizer_state = optimizer.update(grad, state.optimizer_state,
                                              params=state.online_params)
  online_params = optax.apply_updates(state.online_params, updates)
  return state._replace(online_params=online_params, optimizer_state=optimizer_state), loss, \
      mean_loss


def random_batch(batch: int, num_actions: int, seed: int = 0) -> C51Batch:
  """A replay-like batch of random pixels (the step's cost does not depend on their values)."""
  rng = np.random.default_rng(seed)
  return C51Batch(
      states=rng.integers(0, 256, (batch,) + OBSERVATION_SHAPE, dtype=np.uint8),
      actions=rng.integers(0, num_actions, batch).astype(np.int32),
      next_states=rng.integers(0, 256, (batch,) + OBSERVATION_SHAPE, dtype=np.uint8),
      rewards=rng.normal(size=batch).astype(np.float32),
      terminals=(rng.random(batch) < 0.05).astype(np.uint8),
      loss_weights=np.ones(batch, np.float32))


def make_step(num_actions: int, batch: int = BATCH_SIZE, seed: int = 0):
  """(jitted step(state, batch) -> (state, metrics), initial C51State, batch maker(seed)).

  The step is Dopamine's `train` with the c51.gin settings; metrics has 'loss' (the mean loss
  Dopamine logs) and 'loss_per_example' (what it would use for priorities).
  """
  network = hk.without_apply_rng(hk.transform(
      functools.partial(rainbow_network, num_actions, NUM_ATOMS)))
  optimizer = optax.adam(LEARNING_RATE, b1=0.9, b2=0.999, eps=ADAM_EPS)
  support = jnp.linspace(-VMAX, VMAX, NUM_ATOMS)
  cumulative_gamma = GAMMA ** UPDATE_HORIZON

  @jax.jit
  def step(state: C51State, data: C51Batch):
    state, loss, mean_loss = train(network, optimizer, state, data, support, cumulative_gamma)
    return state, dict(loss=mean_loss, loss_per_example=loss)

  params = network.init(jax.random.PRNGKey(seed), jnp.zeros(OBSERVATION_SHAPE, jnp.uint8),
                        support)
  state = C51State(online_params=params, target_params=params,
                   optimizer_state=optimizer.init(params))
  return step, state, functools.partial(random_batch, batch, num_actions)

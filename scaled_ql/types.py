"""Data types shared across layers (rlax/Acme style: plain NamedTuples of arrays)."""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

Array = Any


class Transition(NamedTuple):
  """A batch of n-step transitions as the learner consumes them (leading dim = batch).

  observation:      uint8   [B, 84, 84, 4]  four stacked grey frames at time t
  action:           int32   [B]             index into the game's minimal action set
  reward:           float32 [B]             sum_{k<K} gamma^k clip(r_{t+k}), K = min(n, steps left)
  discount:         float32 [B]             multiplier of the bootstrap value: gamma^K, or 0 if the
                                            episode terminated within the K steps
  next_observation: uint8   [B, 84, 84, 4]  stacked frames at t+K
  game_id:          int32   [B]             index into `ExperimentConfig.games`
  """
  observation: Array
  action: Array
  reward: Array
  discount: Array
  next_observation: Array
  game_id: Array


class FrameWindows(NamedTuple):
  """The same batch of transitions as frame windows: what the Reverb path sends to the learner.

  A transition's window of n+4 single frames (steps t-3 .. t+n) holds both its observation
  (window frames 0..3) and its next observation (frames K..K+3), so each frame crosses to the
  device once and is stacked there, inside the jitted update (`to_transition`), instead of being
  copied twice into channel-last stacks by the host (datasets/transitions.py explains windows).

  frames:     uint8   [B, n+4, 84, 84]  grey frames of steps t-3 .. t+n (zeros: padding)
  next_start: int32   [B]               K = min(n, steps left): next_observation = frames K..K+3
  action, reward, discount, game_id:    as in `Transition`
  """
  frames: Array
  next_start: Array
  action: Array
  reward: Array
  discount: Array
  game_id: Array

  def to_transition(self) -> Transition:
    """The `Transition` of these windows, with jax.numpy (jittable; on the arrays' device)."""
    import jax.numpy as jnp
    frames = jnp.asarray(self.frames)
    stack = 4
    observation = jnp.moveaxis(frames[:, :stack], 1, -1)
    index = jnp.asarray(self.next_start, jnp.int32)[:, None] + jnp.arange(stack)[None]
    next_frames = jnp.take_along_axis(frames, index[:, :, None, None], axis=1)
    return Transition(observation=observation, action=self.action, reward=self.reward,
                      discount=self.discount, next_observation=jnp.moveaxis(next_frames, 1, -1),
                      game_id=self.game_id)


class McProbe(NamedTuple):
  """A fixed set of dataset transitions with their discounted Monte-Carlo returns.

  The learner logs Q(s, a_data) on it against `mc_return` (`probe_q_data`, `probe_mc_return`,
  `probe_q_minus_mc_return`, `probe_q_mc_corr`): a Q far above the data's returns overestimates,
  one that stays at 0 has learned nothing. Built from terminated episodes only (a truncated
  episode's return is unknown) by `scaled_ql.datasets.mc_probe`.
  """
  observation: np.ndarray  # uint8 [P, 84, 84, 4]
  action: np.ndarray  # int32 [P]
  game_id: np.ndarray  # int32 [P]
  mc_return: np.ndarray  # float32 [P]: sum_k gamma^k clip(r_{t+k}) to the episode's end

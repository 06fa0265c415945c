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
  With P = `DataConfig.transitions_per_item` > 1 one item's frames hold the windows of P
  consecutive transitions: transition b is in item b // P, its window starting at `start[b]`.

  frames:     uint8   [B/P, n+3+P, 84, 84]  grey frames of steps t0-3 .. t0+P-1+n (zeros: padding)
  next_start: int32   [B]   K = min(n, steps left): next_observation = frames start+K .. start+K+3
  start:      int32   [B]   first frame of the transition's window in its item (0 when P = 1)
  action, reward, discount, game_id:    as in `Transition`
  """
  frames: Array
  next_start: Array
  action: Array
  reward: Array
  discount: Array
  game_id: Array
  start: Array

  def item_index(self):
    """int32 [B]: the item (row of `frames`) of each transition, with jax.numpy (jittable)."""
    import jax.numpy as jnp
    batch, items = self.start.shape[0], self.frames.shape[0]
    if batch % items:
      raise ValueError(f'{batch} transitions cannot come from {items} items')
    return jnp.arange(batch, dtype=jnp.int32) // (batch // items)

  def next_first(self):
    """int32 [B]: the first frame of each next observation in its item (start + K)."""
    import jax.numpy as jnp
    return jnp.asarray(self.start, jnp.int32) + jnp.asarray(self.next_start, jnp.int32)

  def split(self, parts: int) -> list['FrameWindows']:
    """`parts` batches of B / parts transitions each, in order (views of these arrays, not
    copies): what `data.batches_per_fetch` > 1 fetches in one go, cut into learner batches."""
    batch, items = self.start.shape[0], self.frames.shape[0]
    if parts < 1 or items % parts:
      raise ValueError(f'{items} items of frame windows cannot be split into {parts} batches')
    # Rows per part: `frames` has one per item, every other field one per transition.
    rows = {name: (items if name == 'frames' else batch) // parts for name in self._fields}
    return [FrameWindows(*(x[i * rows[name]:(i + 1) * rows[name]]
                           for name, x in zip(self._fields, self)))
            for i in range(parts)]

  def to_transition(self) -> Transition:
    """The `Transition` of these windows, with jax.numpy (jittable; on the arrays' device)."""
    import jax.numpy as jnp
    frames = jnp.asarray(self.frames)
    item = self.item_index()[:, None]
    offsets = jnp.arange(4)[None]

    def stacks(first):  # [B] -> [B, 84, 84, 4]: frames first .. first+3 of each item
      return jnp.moveaxis(frames[item, first[:, None] + offsets], 1, -1)

    return Transition(observation=stacks(jnp.asarray(self.start, jnp.int32)), action=self.action,
                      reward=self.reward, discount=self.discount,
                      next_observation=stacks(self.next_first()), game_id=self.game_id)


def random_frame_windows(cfg, batch: int | None = None, seed: int = 0) -> FrameWindows:
  """An in-memory batch shaped like the Reverb path's for `cfg` (random frames, valid actions,
  `cfg.data.transitions_per_item` per item): the learner-alone baseline of the benchmarks."""
  from scaled_ql import games as games_lib
  rng = np.random.default_rng(seed)
  b = cfg.agent.batch_size if batch is None else batch
  n, per_item = cfg.agent.n_step, cfg.data.transitions_per_item
  if b % per_item:
    raise ValueError(f'batch {b} is not a whole number of items of {per_item} transitions')
  counts = np.asarray(games_lib.action_counts(cfg.games))
  game_id = np.repeat(rng.integers(0, len(cfg.games), b // per_item), per_item).astype(np.int32)
  return FrameWindows(
      frames=rng.integers(0, 256, (b // per_item, n + 3 + per_item, 84, 84), dtype=np.uint8),
      next_start=rng.integers(1, n + 1, b).astype(np.int32),
      action=(rng.integers(0, 1000, b) % counts[game_id]).astype(np.int32),
      reward=rng.normal(size=b).astype(np.float32),
      discount=np.full(b, 0.99 ** n, np.float32), game_id=game_id,
      start=np.tile(np.arange(per_item, dtype=np.int32), b // per_item))


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

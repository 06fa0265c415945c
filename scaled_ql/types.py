"""Data types shared across layers (rlax/Acme style: plain NamedTuples of arrays)."""
from __future__ import annotations

from typing import Any, NamedTuple

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

"""The Monte-Carlo probe of the learner's diagnostics, read from the run's own offline data.

A fixed set of dataset transitions (`scaled_ql.types.McProbe`) with their discounted Monte-Carlo
returns: the learner logs Q(s, a_data) on it against the return (agents/learner.py). Building it
reads TFDS episodes, so it lives in the data layer; the wiring (`scaled-ql learn`, the
LearnerNode) hands it to the Learner.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import numpy as np

from scaled_ql import games as games_lib
from scaled_ql.configs.base import ExperimentConfig
from scaled_ql.datasets import rlds_reader
from scaled_ql.datasets import transitions as transitions_lib
from scaled_ql.types import McProbe

log = logging.getLogger(__name__)


def discounted_returns(rewards: np.ndarray, discount: float, clip: float) -> np.ndarray:
  """Return-to-go of every step: G_t = clip(r_t) + discount * G_{t+1}, G after the last = 0."""
  out = np.zeros(len(rewards), np.float64)
  running = 0.0
  for t in range(len(rewards) - 1, -1, -1):
    running = float(np.clip(rewards[t], -clip, clip)) + discount * running
    out[t] = running
  return out.astype(np.float32)


def mc_probe_from_episodes(cfg: ExperimentConfig, episodes: Iterable[tuple[int, dict]],
                           per_game: int) -> Optional[McProbe]:
  """Up to `per_game` transitions per game (at most a quarter from one episode), spread evenly
  over terminated episodes; stops reading once every game of `cfg.games` has its share.

  `episodes` yields (game_id, RLDS steps as numpy arrays [T, ...]); truncated episodes (no
  is_terminal on the last step) are skipped, and so are malformed ones (warned about; raised
  with `cfg.data.strict`), as the inserters skip them. None when no terminated episode was seen.
  """
  a = cfg.agent
  parts: dict[int, list] = {}
  for game_id, steps in episodes:
    if not bool(np.asarray(steps['is_terminal'])[-1]):
      continue
    have = sum(len(p.action) for p in parts.get(game_id, []))
    if have >= per_game:
      continue
    try:
      tr = transitions_lib.episode_transitions(
          steps, a.n_step, a.discount, a.reward_clip, game_id,
          num_actions=games_lib.num_actions(cfg.games[game_id]))
    except transitions_lib.MalformedEpisodeError as e:
      if cfg.data.strict:
        raise
      log.warning('the MC probe skips a malformed episode of %s: %s', cfg.games[game_id], e)
      continue
    # Transition t starts at step t; the last step only carries the final observation.
    returns = discounted_returns(np.asarray(steps['reward'])[:-1], a.discount, a.reward_clip)
    take = min(per_game - have, len(tr.action), max(1, per_game // 4))
    idx = np.linspace(0, len(tr.action) - 1, take).round().astype(int)
    parts.setdefault(game_id, []).append(McProbe(tr.observation[idx], tr.action[idx],
                                                 tr.game_id[idx], returns[idx]))
    if all(sum(len(p.action) for p in parts.get(g, [])) >= per_game
           for g in range(len(cfg.games))):
      break  # every game has its share: read no further
  flat = [p for ps in parts.values() for p in ps]
  if not flat:
    return None
  return McProbe(*(np.concatenate(x) for x in zip(*flat)))


def load_mc_probe(cfg: ExperimentConfig, per_game: int = 64,
                  max_episodes_per_game: int = 100) -> Optional[McProbe]:
  """`mc_probe_from_episodes` over the run's own data (cfg.data: dir, selection), reading at most
  `max_episodes_per_game` episodes per game. None when no game has a terminated episode."""

  def episodes():
    for game_id, game in enumerate(cfg.games):
      ds = rlds_reader.episodes_from_config(cfg.data, game, seed=cfg.train.seed)
      for ep in ds.take(max_episodes_per_game):
        steps = next(iter(ep['steps'].batch(1 << 20)))  # the whole episode as one batch
        yield game_id, {k: np.asarray(v) for k, v in steps.items()}
  return mc_probe_from_episodes(cfg, episodes(), per_game)

"""Random and human reference scores of the 46 RL Unplugged Atari games, and human normalization.

    human_normalized(game, score) = (score - RANDOM_SCORES[game]) / (HUMAN_SCORES[game] - RANDOM_SCORES[game])

so 0 is a uniformly random policy and 1 a professional human tester (Mnih et al. 2015). The paper
reports it in percent; this module returns fractions (x100 is the caller's formatting).

Sources (every value is named in `SOURCES`):
- 44 games: the Atari-57 random/human table of Badia et al. 2020 (Agent57, appendix), which
  collects the human-tester scores of Mnih et al. 2015 / van Hasselt et al. 2016 and random-agent
  scores with 30 no-op starts. These are also the numbers of DQN Zoo's `atari_data.py`, with one
  difference: DQN Zoo keeps Mnih et al. 2015's random Video Pinball score 16256.9, Badia et al.
  2020 list 0.0; both reproduce the paper's aggregates within 0.3 points (16256.9 gives DT (200M)
  30.50% IQM on Table C.1, 0.0 gives 30.66%; the paper says 30.6%), and we keep Badia et al.'s
  table whole (it is also the one whose human column, 17667.9, the paper's Table C.1 prints).
- Carnival and Pooyan are not Atari-57 games. Their human scores, 3800.0 and 4000.0, are the
  'Human' column of the paper's Table C.1/C.2, which it takes from Lee et al. 2022 (Multi-Game
  Decision Transformers). No published random score for them is used by the paper; a random
  score of 0.0 for both reproduces every aggregate the paper states (Table C.1: Scaled QL IQM
  77.92% vs 77.8%, DT (200M) IQM 30.66% vs 30.6%; Table C.2: Scaled QL IQM 114.19% vs 114.1%,
  median 98.92% vs 98.9%, DT (200M) IQM 111.94% vs 111.8%, median 78.25% vs 78.2%), whereas the
  random-agent scores of Machado et al. 2018 (Carnival 700.8, Pooyan 371.2) give DT (200M) 29.45%
  IQM on Table C.1 and 77.49% median on Table C.2, 1.2 and 0.7 points off. See BUILD_NOTES.md, eval section.

DQN-normalized scores (the paper's Figure 7, "following Lee et al. 2022"; Agarwal et al. 2020 define
them for the DQN-Replay data) put 0 at the random score and 1 at the score of the DQN agent whose
replay is the dataset. Agarwal et al. 2020 take the min and max of the two, as DQN scores below
random on a few games:

    dqn_normalized(game, score) = (score - min(random, dqn)) / (max(random, dqn) - min(random, dqn))

The DQN reference scores live in `data/dqn_replay_reference.csv` (game, dqn_score, source; `#` lines
are comments), each row with its source. They are Dopamine's published DQN baseline (sticky
actions, the DQN-Replay logging agent's hyperparameters): the 5-run mean of the last iteration's
average return, as tabulated by dojeon-ai/Atari-PB and recomputed here from Dopamine's own files
for the five Figure 7 games. They are not the references of Figure 7 itself: Lee et al. 2022 use
"the best DQN scores seen in the training dataset", which no one has published per game
(docs/evaluation.md, "DQN-normalized scores: reference table"). Another table (same columns) can
be given to `load_dqn_reference` / `dqn_normalized(reference=)`, or to
`scaled-ql report compare --dqn-reference FILE`; `dqn_score=` overrides a single game.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Mapping, Optional, Union

import numpy as np

from scaled_ql import games as games_lib

_BADIA = 'Badia et al. 2020 (Agent57) Atari-57 table (human: Mnih et al. 2015 testers)'
_LEE = ('human: Lee et al. 2022 (Multi-Game DT), as printed in Table C.1 of Kumar et al. 2023; '
        'random: 0.0, the value that reproduces Kumar et al. 2023\'s aggregates (BUILD_NOTES.md, eval section)')

# game: (random, human)
_REFERENCE: dict[str, tuple[float, float]] = {
    'Alien': (227.8, 7127.7),
    'Amidar': (5.8, 1719.5),
    'Assault': (222.4, 742.0),
    'Asterix': (210.0, 8503.3),
    'Atlantis': (12850.0, 29028.1),
    'BankHeist': (14.2, 753.1),
    'BattleZone': (2360.0, 37187.5),
    'BeamRider': (363.9, 16926.5),
    'Boxing': (0.1, 12.1),
    'Breakout': (1.7, 30.5),
    'Carnival': (0.0, 3800.0),
    'Centipede': (2090.9, 12017.0),
    'ChopperCommand': (811.0, 7387.8),
    'CrazyClimber': (10780.5, 35829.4),
    'DemonAttack': (152.1, 1971.0),
    'DoubleDunk': (-18.6, -16.4),
    'Enduro': (0.0, 860.5),
    'FishingDerby': (-91.7, -38.7),
    'Freeway': (0.0, 29.6),
    'Frostbite': (65.2, 4334.7),
    'Gopher': (257.6, 2412.5),
    'Gravitar': (173.0, 3351.4),
    'Hero': (1027.0, 30826.4),
    'IceHockey': (-11.2, 0.9),
    'Jamesbond': (29.0, 302.8),
    'Kangaroo': (52.0, 3035.0),
    'Krull': (1598.0, 2665.5),
    'KungFuMaster': (258.5, 22736.3),
    'MsPacman': (307.3, 6951.6),
    'NameThisGame': (2292.3, 8049.0),
    'Phoenix': (761.4, 7242.6),
    'Pong': (-20.7, 14.6),
    'Pooyan': (0.0, 4000.0),
    'Qbert': (163.9, 13455.0),
    'Riverraid': (1338.5, 17118.0),
    'RoadRunner': (11.5, 7845.0),
    'Robotank': (2.2, 11.9),
    'Seaquest': (68.4, 42054.7),
    'SpaceInvaders': (148.0, 1668.7),
    'StarGunner': (664.0, 10250.0),
    'TimePilot': (3568.0, 5229.2),
    'UpNDown': (533.4, 11693.2),
    'VideoPinball': (0.0, 17667.9),
    'WizardOfWor': (563.5, 4756.5),
    'YarsRevenge': (3092.9, 54576.9),
    'Zaxxon': (32.5, 9173.3),
}

RANDOM_SCORES: dict[str, float] = {g: r for g, (r, _) in _REFERENCE.items()}
HUMAN_SCORES: dict[str, float] = {g: h for g, (_, h) in _REFERENCE.items()}
SOURCES: dict[str, str] = {g: (_LEE if g in ('Carnival', 'Pooyan') else _BADIA)
                           for g in _REFERENCE}

ArrayLike = Union[float, np.ndarray]


def human_normalized(game: str, score: ArrayLike) -> ArrayLike:
  """(score - random) / (human - random) for `game`: a float for a float, an array for an array.

  Raises `scaled_ql.games.UnknownGameError` naming the game (and listing the valid ones) when the
  game is not one of the 46 RL Unplugged games.
  """
  games_lib.check_games([game], 'game')
  random, human = _REFERENCE[game]
  return _rescale(game, score, random, human)


def _rescale(game: str, score: ArrayLike, zero: float, one: float) -> ArrayLike:
  """(score - zero) / (one - zero), refusing non-finite scores (named by game)."""
  if isinstance(score, (int, float, np.floating, np.integer)):
    if not math.isfinite(float(score)):
      raise ValueError(f'{game}: score {score!r} is not finite')
    return (float(score) - zero) / (one - zero)
  score = np.asarray(score, dtype=np.float64)
  if not np.all(np.isfinite(score)):
    raise ValueError(f'{game}: non-finite scores {score[~np.isfinite(score)][:5]}')
  return (score - zero) / (one - zero)


def raw_score(game: str, normalized: ArrayLike) -> ArrayLike:
  """The inverse of `human_normalized`."""
  games_lib.check_games([game], 'game')
  random, human = _REFERENCE[game]
  if isinstance(normalized, (int, float, np.floating, np.integer)):
    return random + float(normalized) * (human - random)
  return random + np.asarray(normalized, np.float64) * (human - random)


# ---- DQN normalization ---------------------------------------------------------------------------
DQN_REFERENCE_CSV = os.path.join(os.path.dirname(__file__), 'data', 'dqn_replay_reference.csv')


class MissingReferenceError(ValueError):
  """No DQN reference score for a game (the message names the game and where to add one)."""


def load_dqn_reference(path: str = DQN_REFERENCE_CSV) -> dict[str, tuple[Optional[float], str]]:
  """{game: (DQN score or None when the table has none, source)} from a CSV with columns
  game, dqn_score, source. Lines starting with `#` are comments (where a table says what its
  numbers are). Every score needs its source; errors name the file and its line number."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such DQN reference file (columns: game, dqn_score, '
                            'source)')
  with open(path, newline='', encoding='utf-8') as f:
    numbered = [(n, line) for n, line in enumerate(f, 1) if not line.startswith('#')]
  line_numbers = [n for n, _ in numbered]
  reader = csv.DictReader(line for _, line in numbered)
  missing = [c for c in ('game', 'dqn_score', 'source') if c not in (reader.fieldnames or [])]
  if missing:
    raise ValueError(f'{path}: missing column(s) {missing}; need game, dqn_score, source')
  out: dict[str, tuple[Optional[float], str]] = {}
  for row in reader:
    i = line_numbers[reader.line_num - 1]
    game, text = row['game'].strip(), (row['dqn_score'] or '').strip()
    source = (row['source'] or '').strip()
    if game not in _REFERENCE:
      raise ValueError(f'{path}: line {i}: unknown game {game!r}')
    if game in out:
      raise ValueError(f'{path}: line {i}: {game} given twice')
    value = None
    if text:
      try:
        value = float(text)
      except ValueError:
        raise ValueError(f'{path}: line {i}: {game}: dqn_score {text!r} is not a number') from None
      if not math.isfinite(value):
        raise ValueError(f'{path}: line {i}: {game}: dqn_score {text!r} is not finite')
      if not source:
        raise ValueError(f'{path}: line {i}: {game}: a dqn_score needs its source')
      if value == RANDOM_SCORES[game]:
        raise ValueError(f'{path}: line {i}: {game}: dqn_score equals the random score '
                         f'{value}; the normalization would divide by zero')
    out[game] = (value, source)
  return out


def dqn_normalized(game: str, score: ArrayLike, dqn_score: Optional[float] = None,
                   reference: Optional[Mapping[str, tuple[Optional[float], str]]] = None
                   ) -> ArrayLike:
  """(score - min(random, dqn)) / (max(random, dqn) - min(random, dqn)) for `game`.

  The DQN score is `dqn_score` if given, else `reference[game]` (default: the shipped
  `data/dqn_replay_reference.csv`). Raises MissingReferenceError naming the game when there is
  none, UnknownGameError for an unknown game, ValueError for a non-finite score.
  """
  games_lib.check_games([game], 'game')
  if dqn_score is None:
    table = load_dqn_reference() if reference is None else reference
    dqn_score, source = table.get(game, (None, 'not in the table'))
    if dqn_score is None:
      raise MissingReferenceError(
          f'{game}: no DQN reference score ({source}); pass one with its source '
          f'(a CSV like {DQN_REFERENCE_CSV}: game, dqn_score, source)')
  dqn_score = float(dqn_score)
  if not math.isfinite(dqn_score):
    raise ValueError(f'{game}: DQN reference score {dqn_score!r} is not finite')
  lo, hi = sorted((RANDOM_SCORES[game], dqn_score))
  if hi == lo:
    raise ValueError(f'{game}: DQN reference score equals the random score {lo}')
  return _rescale(game, score, lo, hi)

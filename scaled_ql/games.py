"""Static facts about the Atari games of RL Unplugged / DQN-Replay.

This module has no dependencies so that every layer (networks, agents, datasets, envs, eval) can
use it. `tests/test_games.py` checks the action-set sizes against the installed ale-py.
"""
from __future__ import annotations

from typing import Sequence

# (ALE ROM id, size of the minimal action set). DQN-Replay logs actions as indices into the
# game's minimal action set (Agarwal et al. 2020; Dopamine's `full_action_space=False`).
GAME_INFO: dict[str, tuple[str, int]] = {
    'Alien': ('alien', 18), 'Amidar': ('amidar', 10), 'Assault': ('assault', 7),
    'Asterix': ('asterix', 9), 'Atlantis': ('atlantis', 4), 'BankHeist': ('bank_heist', 18),
    'BattleZone': ('battle_zone', 18), 'BeamRider': ('beam_rider', 9), 'Boxing': ('boxing', 18),
    'Breakout': ('breakout', 4), 'Carnival': ('carnival', 6), 'Centipede': ('centipede', 18),
    'ChopperCommand': ('chopper_command', 18), 'CrazyClimber': ('crazy_climber', 9),
    'DemonAttack': ('demon_attack', 6), 'DoubleDunk': ('double_dunk', 18),
    'Enduro': ('enduro', 9), 'FishingDerby': ('fishing_derby', 18), 'Freeway': ('freeway', 3),
    'Frostbite': ('frostbite', 18), 'Gopher': ('gopher', 8), 'Gravitar': ('gravitar', 18),
    'Hero': ('hero', 18), 'IceHockey': ('ice_hockey', 18), 'Jamesbond': ('jamesbond', 18),
    'Kangaroo': ('kangaroo', 18), 'Krull': ('krull', 18), 'KungFuMaster': ('kung_fu_master', 14),
    'MsPacman': ('ms_pacman', 9), 'NameThisGame': ('name_this_game', 6),
    'Phoenix': ('phoenix', 8), 'Pong': ('pong', 6), 'Pooyan': ('pooyan', 6),
    'Qbert': ('qbert', 6), 'Riverraid': ('riverraid', 18), 'RoadRunner': ('road_runner', 18),
    'Robotank': ('robotank', 18), 'Seaquest': ('seaquest', 18),
    'SpaceInvaders': ('space_invaders', 6), 'StarGunner': ('star_gunner', 18),
    'TimePilot': ('time_pilot', 10), 'UpNDown': ('up_n_down', 6),
    'VideoPinball': ('video_pinball', 9), 'WizardOfWor': ('wizard_of_wor', 10),
    'YarsRevenge': ('yars_revenge', 18), 'Zaxxon': ('zaxxon', 18),
}

ALL_GAMES: tuple[str, ...] = tuple(GAME_INFO)  # the 46 RL Unplugged Atari games

# The 40 training games of Lee et al. (2022), used by the paper (Section 3, Figure 4, Table C.1).
TRAINING_GAMES_40: tuple[str, ...] = (
    'Amidar', 'Assault', 'Asterix', 'Atlantis', 'BankHeist', 'BattleZone', 'BeamRider', 'Boxing',
    'Breakout', 'Carnival', 'Centipede', 'ChopperCommand', 'CrazyClimber', 'DemonAttack',
    'DoubleDunk', 'Enduro', 'FishingDerby', 'Freeway', 'Frostbite', 'Gopher', 'Gravitar', 'Hero',
    'IceHockey', 'Jamesbond', 'Kangaroo', 'Krull', 'KungFuMaster', 'NameThisGame', 'Phoenix',
    'Pooyan', 'Qbert', 'Riverraid', 'Robotank', 'Seaquest', 'TimePilot', 'UpNDown',
    'VideoPinball', 'WizardOfWor', 'YarsRevenge', 'Zaxxon',
)
# Held-out games for offline fine-tuning (Section 5.2, Figure 7).
HELD_OUT_GAMES: tuple[str, ...] = ('Alien', 'MsPacman', 'Pong', 'SpaceInvaders', 'StarGunner')
# The six-game ablation setting (Section 5.3 Table 2 names five; Table A.2 adds Qbert).
ABLATION_GAMES_6: tuple[str, ...] = (
    'Asterix', 'Breakout', 'Pong', 'Qbert', 'Seaquest', 'SpaceInvaders')
# Runs with 49 instead of 50 checkpoints in rlu_atari_checkpoints_ordered.
GAMES_WITH_49_CHECKPOINTS: tuple[str, ...] = ('Carnival', 'Gravitar', 'StarGunner')

MAX_NUM_ACTIONS = 18


class UnknownGameError(ValueError):
  pass


def check_games(games: Sequence[str], what: str = '--games') -> tuple[str, ...]:
  """Returns `games` as a tuple, or raises naming the unknown ones and listing the valid ones."""
  games = tuple(games)
  unknown = [g for g in games if g not in GAME_INFO]
  if unknown:
    raise UnknownGameError(
        f'{what}: unknown game(s) {unknown}. Valid games (RL Unplugged Atari): '
        f'{", ".join(ALL_GAMES)}')
  if not games:
    raise UnknownGameError(f'{what}: no games given')
  if len(set(games)) != len(games):
    raise UnknownGameError(f'{what}: duplicate games in {list(games)}')
  return games


def num_actions(game: str) -> int:
  check_games([game], 'game')
  return GAME_INFO[game][1]


def rom_id(game: str) -> str:
  check_games([game], 'game')
  return GAME_INFO[game][0]


def num_checkpoints(game: str) -> int:
  return 49 if game in GAMES_WITH_49_CHECKPOINTS else 50


def action_counts(games: Sequence[str]) -> tuple[int, ...]:
  """Minimal-action-set size of each game, in the order given."""
  return tuple(num_actions(g) for g in check_games(games))


def action_mask(games: Sequence[str], max_actions: int | None = None):
  """bool numpy array [len(games), max_actions]: True where the action index is valid for the game.

  `max_actions` defaults to the largest action set among `games`; padded entries are False.
  """
  import numpy as np  # local import keeps this module dependency-free at import time
  counts = action_counts(games)
  width = max(counts) if max_actions is None else max_actions
  return np.arange(width)[None, :] < np.asarray(counts)[:, None]

"""Static game facts agree with the installed emulator."""
import ale_py
import numpy as np
import pytest
from ale_py import roms

from scaled_ql import games


@pytest.mark.parametrize('game', games.ALL_GAMES)
def test_minimal_action_set_matches_ale(game):
  ale = ale_py.ALEInterface()
  ale.setLoggerMode(ale_py.LoggerMode.Error)
  ale.loadROM(roms.get_rom_path(games.rom_id(game)))
  assert len(ale.getMinimalActionSet()) == games.num_actions(game)


def test_game_sets():
  assert len(games.ALL_GAMES) == 46
  assert len(games.TRAINING_GAMES_40) == 40
  assert not set(games.TRAINING_GAMES_40) & set(games.HELD_OUT_GAMES)
  assert set(games.TRAINING_GAMES_40) | set(games.HELD_OUT_GAMES) | {'RoadRunner'} == set(
      games.ALL_GAMES)


def test_action_mask():
  mask = games.action_mask(['Breakout', 'Pong', 'Freeway'])
  assert mask.shape == (3, 6)
  np.testing.assert_array_equal(mask.sum(1), [4, 6, 3])
  assert not mask[2, 3:].any()


def test_unknown_game_lists_valid_ones():
  with pytest.raises(games.UnknownGameError, match=r"'Pongg'.*Valid games.*Pong"):
    games.check_games(['Pongg', 'Breakout'], '--games')

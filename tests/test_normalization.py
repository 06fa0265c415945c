"""Reference scores and human normalization (scaled_ql.eval.normalization)."""
import csv
import os

import numpy as np
import pytest

from scaled_ql import games as games_lib
from scaled_ql.eval import normalization
from scaled_ql.eval.metrics import DATA_DIR


def test_every_rl_unplugged_game_has_sourced_references():
  for table in (normalization.RANDOM_SCORES, normalization.HUMAN_SCORES, normalization.SOURCES):
    assert set(table) == set(games_lib.ALL_GAMES)
  for g in games_lib.ALL_GAMES:
    assert normalization.HUMAN_SCORES[g] > normalization.RANDOM_SCORES[g], g
    assert normalization.SOURCES[g]


@pytest.mark.parametrize('game,random,human', [
    ('Breakout', 1.7, 30.5), ('Pong', -20.7, 14.6), ('Seaquest', 68.4, 42054.7),
    ('DoubleDunk', -18.6, -16.4), ('VideoPinball', 0.0, 17667.9), ('Carnival', 0.0, 3800.0),
    ('Pooyan', 0.0, 4000.0), ('StarGunner', 664.0, 10250.0)])
def test_reference_values(game, random, human):
  assert normalization.RANDOM_SCORES[game] == random
  assert normalization.HUMAN_SCORES[game] == human
  assert normalization.human_normalized(game, random) == pytest.approx(0.0)
  assert normalization.human_normalized(game, human) == pytest.approx(1.0)


def test_normalized_values_and_arrays():
  assert normalization.human_normalized('Breakout', 30.5 + 28.8) == pytest.approx(2.0)
  assert normalization.human_normalized('Pong', 21) == pytest.approx((21 + 20.7) / 35.3)
  arr = normalization.human_normalized('Pong', np.array([-20.7, 14.6, 21.0]))
  assert isinstance(arr, np.ndarray)
  np.testing.assert_allclose(arr, [0.0, 1.0, (21 + 20.7) / 35.3])
  assert normalization.raw_score('Pong', 1.0) == pytest.approx(14.6)
  np.testing.assert_allclose(normalization.raw_score('Hero', normalization.human_normalized(
      'Hero', np.array([0.0, 5e4]))), [0.0, 5e4])


def test_bad_input_is_named():
  with pytest.raises(games_lib.UnknownGameError, match="Brekout.*Valid games"):
    normalization.human_normalized('Brekout', 1.0)
  with pytest.raises(ValueError, match='Pong: score nan'):
    normalization.human_normalized('Pong', float('nan'))
  with pytest.raises(ValueError, match='Pong: non-finite'):
    normalization.human_normalized('Pong', np.array([1.0, np.inf]))


@pytest.mark.parametrize('table', ['table_c1_suboptimal.csv', 'table_c2_near_optimal.csv'])
def test_our_human_scores_are_the_papers_human_column(table):
  with open(os.path.join(DATA_DIR, table)) as f:
    human = {r['game']: float(r['score']) for r in csv.DictReader(f) if r['method'] == 'Human'}
  assert tuple(human) == games_lib.TRAINING_GAMES_40
  for g, h in human.items():
    assert normalization.HUMAN_SCORES[g] == h, g

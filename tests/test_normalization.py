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


# ---- DQN normalization ---------------------------------------------------------------------------
def test_dqn_normalized_against_hand_computed_values():
  # Pong: random -20.7; a DQN reference of 16.61 (given explicitly).
  assert normalization.dqn_normalized('Pong', 0.0, dqn_score=16.61) == pytest.approx(20.7 / 37.31)
  assert normalization.dqn_normalized('Pong', 16.61, dqn_score=16.61) == pytest.approx(1.0)
  assert normalization.dqn_normalized('Pong', -20.7, dqn_score=16.61) == pytest.approx(0.0)
  assert normalization.dqn_normalized('Breakout', 50.0, dqn_score=100.0) == pytest.approx(
      48.3 / 98.3)
  np.testing.assert_allclose(
      normalization.dqn_normalized('Breakout', np.array([1.7, 100.0, 198.3]), dqn_score=100.0),
      [0.0, 1.0, 2.0])
  # DQN below random (Agarwal et al. 2020 take min/max): Boxing random 0.1, DQN -4.9.
  assert normalization.dqn_normalized('Boxing', 0.1, dqn_score=-4.9) == pytest.approx(1.0)
  assert normalization.dqn_normalized('Boxing', -4.9, dqn_score=-4.9) == pytest.approx(0.0)
  assert normalization.dqn_normalized('Boxing', 0.0, dqn_score=-4.9) == pytest.approx(4.9 / 5.0)


def test_shipped_dqn_table_names_every_game_and_invents_nothing():
  ref = normalization.load_dqn_reference()
  assert set(ref) == set(games_lib.ALL_GAMES)
  for game, (value, source) in ref.items():
    assert source, game
    if value is None:  # no published value available: the table says so
      assert source.startswith('none found'), game
  missing = [g for g, (v, _) in ref.items() if v is None]
  if missing:
    with pytest.raises(normalization.MissingReferenceError, match=f'{missing[0]}: no DQN-Replay'):
      normalization.dqn_normalized(missing[0], 1.0)


def test_dqn_reference_csv_is_checked(tmp_path):
  good = tmp_path / 'ref.csv'
  good.write_text('game,dqn_score,source\nPong,16.61,"my table, row 3"\nBreakout,,none\n')
  ref = normalization.load_dqn_reference(str(good))
  assert ref == {'Pong': (16.61, 'my table, row 3'), 'Breakout': (None, 'none')}
  assert normalization.dqn_normalized('Pong', 0.0, reference=ref) == pytest.approx(20.7 / 37.31)
  with pytest.raises(normalization.MissingReferenceError, match='Breakout'):
    normalization.dqn_normalized('Breakout', 0.0, reference=ref)
  with pytest.raises(normalization.MissingReferenceError, match='Alien: .*not in the table'):
    normalization.dqn_normalized('Alien', 0.0, reference=ref)
  for body, message in [('Pong,16.61,\n', 'row 2: Pong: a dqn_score needs its source'),
                        ('Pongg,1,x\n', "row 2: unknown game 'Pongg'"),
                        ('Pong,abc,x\n', "row 2: Pong: dqn_score 'abc' is not a number"),
                        ('Pong,-20.7,x\n', 'equals the random score'),
                        ('Pong,1,x\nPong,2,y\n', 'row 3: Pong given twice')]:
    bad = tmp_path / 'bad.csv'
    bad.write_text('game,dqn_score,source\n' + body)
    with pytest.raises(ValueError, match=message):
      normalization.load_dqn_reference(str(bad))
  with pytest.raises(ValueError, match='missing column'):
    bad.write_text('game,score\nPong,1\n')
    normalization.load_dqn_reference(str(bad))

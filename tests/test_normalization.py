"""Reference scores, human and DQN normalization (scaled_ql.eval.normalization)."""
import csv
import math
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


# The DQN records of the last iteration (198) of Dopamine's baseline files, one value per run, read
# from google/dopamine baselines/atari/data/<game>.json at commit
# 8842298e89cfe42c80ea71f63913017696785f0f (field "Value", "Agent": "DQN").
DOPAMINE_DQN_ITERATION_198 = {
    'Alien': [2454.2035398230087, 2243.3476394849786, 2784.190476190476, 2862.2966507177034,
              2078.4279475982535],
    'MsPacman': [3639.289617486339, 3674.6758241758243, 2933.0434782608695, 3375.132275132275,
                 3389.835164835165],
    'Pong': [17.46078431372549, 16.43617021276596, 17.152380952380952, 13.023255813953488,
             18.976],
    'SpaceInvaders': [1843.1297709923665, 1819.3560606060605, 1740.3649635036497,
                      1772.3880597014925, 1795.9448818897638],
    'StarGunner': [40461.68224299065, 39963.20754716981, 48070.454545454544, 39440.38461538462,
                   42890.38461538462],
}


def test_shipped_dqn_table_covers_every_game_with_a_sourced_value():
  ref = normalization.load_dqn_reference()
  assert tuple(ref) == games_lib.ALL_GAMES
  for game, (value, source) in ref.items():
    assert value is not None and math.isfinite(value), game
    assert 'dojeon-ai/Atari-PB src/envs/atari.py@bd2faa4a' in source, game
  # Spot checks against dojeon-ai/Atari-PB src/envs/atari.py ATARI_DQN50M_SCORE, as printed there.
  assert ref['Breakout'][0] == 96.23 and ref['Atlantis'][0] == 853640.00
  assert ref['DoubleDunk'][0] == -6.54 and ref['VideoPinball'][0] == 63406.11


@pytest.mark.parametrize('game', sorted(DOPAMINE_DQN_ITERATION_198))
def test_figure7_games_equal_the_dopamine_five_run_mean(game):
  runs = DOPAMINE_DQN_ITERATION_198[game]
  assert len(runs) == 5
  value, source = normalization.load_dqn_reference()[game]
  assert value == round(sum(runs) / 5, 2)
  assert f'baselines/atari/data/{game.lower()}.json@8842298e' in source


def test_shipped_table_sets_dqn_to_one_and_random_to_zero():
  # Pong: random -20.7, DQN 16.61 (the shipped value).
  assert normalization.dqn_normalized('Pong', 16.61) == pytest.approx(1.0)
  assert normalization.dqn_normalized('Pong', -20.7) == pytest.approx(0.0)
  assert normalization.dqn_normalized('Pong', 0.0) == pytest.approx(20.7 / 37.31)
  np.testing.assert_allclose(normalization.dqn_normalized('Alien', np.array([227.8, 2484.49])),
                             [0.0, 1.0])


def test_a_user_table_with_comments_overrides_the_shipped_one(tmp_path):
  mine = tmp_path / 'mine.csv'
  mine.write_text('# my DQN-Replay run, best iteration\ngame,dqn_score,source\n'
                  '# Pong from run 3\nPong,20.0,"my run 3, iteration 187"\nAlien,,none yet\n')
  ref = normalization.load_dqn_reference(str(mine))
  assert ref == {'Pong': (20.0, 'my run 3, iteration 187'), 'Alien': (None, 'none yet')}
  assert normalization.dqn_normalized('Pong', 0.0, reference=ref) == pytest.approx(20.7 / 40.7)
  with pytest.raises(normalization.MissingReferenceError,
                     match='Alien: no DQN reference score .*none yet'):
    normalization.dqn_normalized('Alien', 1.0, reference=ref)
  bad = tmp_path / 'bad.csv'
  bad.write_text('# comment\ngame,dqn_score,source\n# another\nPong,1,x\nPong,2,y\n')
  with pytest.raises(ValueError, match='line 5: Pong given twice'):  # file lines, comments counted
    normalization.load_dqn_reference(str(bad))


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
  for body, message in [('Pong,16.61,\n', 'line 2: Pong: a dqn_score needs its source'),
                        ('Pongg,1,x\n', "line 2: unknown game 'Pongg'"),
                        ('Pong,abc,x\n', "line 2: Pong: dqn_score 'abc' is not a number"),
                        ('Pong,-20.7,x\n', 'equals the random score'),
                        ('Pong,1,x\nPong,2,y\n', 'line 3: Pong given twice')]:
    bad = tmp_path / 'bad.csv'
    bad.write_text('game,dqn_score,source\n' + body)
    with pytest.raises(ValueError, match=message):
      normalization.load_dqn_reference(str(bad))
  with pytest.raises(ValueError, match='missing column'):
    bad.write_text('game,score\nPong,1\n')
    normalization.load_dqn_reference(str(bad))

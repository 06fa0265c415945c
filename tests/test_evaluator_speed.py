"""The evaluator benchmark's bound (benchmarks/evaluator_speed.py) on the real emulator."""
import pytest

import benchmark_modules

evaluator_speed = benchmark_modules.load('evaluator_speed')


def test_the_bound_weighs_each_games_emulator_by_its_steps():
  f = evaluator_speed.bound_steps_per_second
  assert f({'Pong': 100}, {'Pong': 2000.0}, 0.0005) == pytest.approx(1 / (1 / 2000 + 0.0005))
  # 300 steps at 1000/s and 100 at 500/s: 0.5 s of emulators, plus 400 network calls of 1 ms.
  assert f({'A': 300, 'B': 100}, {'A': 1000.0, 'B': 500.0}, 0.001) == pytest.approx(400 / 0.9)


def test_raw_emulators_take_turns_and_each_game_is_timed_on_its_own():
  rates = evaluator_speed.raw_steps_per_second(['Pong', 'Freeway'], 120, num_envs=2)
  assert set(rates) == {'Pong', 'Freeway'}
  for wall, cpu in rates.values():
    assert 50 < wall < 1e6 and 50 < cpu < 1e6


def test_a_bracketed_bound_is_the_mean_and_says_how_far_it_moved():
  assert evaluator_speed.bracketed(1000.0, 1200.0) == pytest.approx((1100.0, 1.2))
  with pytest.raises(ValueError, match='> 0'):
    evaluator_speed.bracketed(0.0, 1000.0)


def test_the_steady_median_keeps_the_rounds_whose_bound_moved_little():
  ratios = [0.9, 1.16, 0.68, 0.92, 0.88]
  moved = [1.02, 1.30, 0.75, 0.96, 1.08]  # the second and third moved by 30% and 25%
  assert evaluator_speed.steady_median(ratios, moved) == (pytest.approx(0.9), 3)
  assert evaluator_speed.steady_median(ratios, moved, tolerance=0.05) == (pytest.approx(0.91), 2)
  median, n = evaluator_speed.steady_median([1.0], [2.0])
  assert n == 0 and median != median  # nan: no steady round


def test_the_split_tells_slower_calls_from_smaller_batches_and_the_rest_from_the_emulators():
  """`--split`: 10 calls at batch 4 of 0.14 s (0.12 back to back: an observation costs 0.03 s
  there) and 5 at batch 1 of 0.07 s (0.05 back to back): 10 x 0.02 + 5 x 0.02 = 0.3 s slower in
  the loop; the 5 small calls cost 5 x (0.05 - 0.03) = 0.1 s more than their observations at
  batch 4; the loop's other 1.25 s against 1.0 s of raw emulators."""
  import numpy as np
  calls = [(4, 0.14)] * 10 + [(1, 0.07)] * 5
  line = evaluator_speed.split_line(calls, {4: 0.12, 1: 0.05}, loop_s=3.0, raw_s=1.0,
                                    full_batch=4)
  assert line == ('split: policy 1.75s (batch 1: 5 calls, 70000 us in the loop / 50000 back to '
                  'back, batch 4: 10 calls, 140000 us in the loop / 120000 back to back): calls '
                  'slower in the loop +0.30s, batches under 4 +0.10s; emulators + the loop\'s '
                  'Python 1.25s against the raw emulators\' 1.00s (+0.25s)'), line
  timed = evaluator_speed.TimedPolicy(lambda params, key, obs, game_id: obs.sum(axis=(1, 2, 3)))
  timed(None, None, np.zeros((4, 84, 84, 4), np.uint8), np.zeros(4, np.int32))
  timed(None, None, np.zeros((1, 84, 84, 4), np.uint8), np.zeros(1, np.int32))
  assert [b for b, _ in timed.calls] == [4, 1] and all(s >= 0 for _, s in timed.calls)

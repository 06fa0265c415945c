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

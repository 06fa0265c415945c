"""The in-program benchmark's summary of several programs (benchmarks/program_throughput.py)."""
import numpy as np
import pytest

import benchmark_modules

pt = benchmark_modules.load('program_throughput')


def test_mean_interval_is_students_t_interval_of_the_mean():
  mean, low, high = pt.mean_interval([1.0, 2.0, 3.0])
  # sd 1, n 3: half width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321
  assert mean == pytest.approx(2.0)
  assert high - mean == pytest.approx(mean - low)
  assert high - mean == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
  narrow = pt.mean_interval([0.9, 0.9, 0.9, 0.9])
  assert narrow == pytest.approx((0.9, 0.9, 0.9))
  with pytest.raises(ValueError, match='>= 2 values'):
    pt.mean_interval([0.9])


def test_verdict_needs_the_whole_interval_on_one_side_of_the_target():
  assert pt.verdict(0.86, 0.95) == 'met'
  assert pt.verdict(0.85, 0.95) == 'met'
  assert pt.verdict(0.70, 0.84) == 'not met'
  assert pt.verdict(0.63, 1.30) == 'undecided'  # 0.93, 0.85, 1.12 (2026-12-05): mean 0.967
  assert pt.verdict(*pt.mean_interval([0.93, 0.85, 1.12])[1:]) == 'undecided'
  assert pt.verdict(*pt.mean_interval([0.86, 0.87, 0.86, 0.88])[1:]) == 'met'

"""benchmarks/machine.py: the load and steal time printed beside every benchmark figure."""
import time

import pytest

import benchmark_modules

machine = benchmark_modules.load('machine')


def _stat(path, steal, total_other):
  # user nice system idle iowait irq softirq steal guest guest_nice
  path.write_text(f'cpu  {total_other} 0 0 0 0 0 0 {steal} 7 7\ncpu0 1 2 3 4 5 6 7 8 9 10\n')


def test_steal_is_the_stolen_share_of_the_intervals_cpu_time(tmp_path):
  stat = tmp_path / 'stat'
  _stat(stat, steal=100, total_other=900)
  assert machine.cpu_jiffies(str(stat)) == (100, 1000)  # guest time is not counted twice
  window = machine.Steal(str(stat))
  _stat(stat, steal=130, total_other=1170)  # 300 more jiffies, 30 of them stolen
  assert abs(window.percent() - 10.0) < 1e-9
  assert machine.context(window).endswith('steal 10.0%')


def test_busy_jiffies_are_user_nice_and_system(tmp_path):
  stat = tmp_path / 'stat'
  stat.write_text('cpu  100 20 30 4000 50 6 7 8 9 10\n')
  assert machine.busy_jiffies(str(stat)) == 150  # not idle, iowait, irq, softirq or steal
  stat.write_text('cpu  1 2 3 4\n')
  with pytest.raises(OSError, match='no cpu line with a steal field'):
    machine.busy_jiffies(str(stat))


def test_steal_is_unknown_without_a_steal_field_or_an_interval(tmp_path):
  stat = tmp_path / 'stat'
  stat.write_text('cpu  1 2 3 4\n')  # no steal field
  assert machine.cpu_jiffies(str(stat)) is None
  assert machine.Steal(str(stat)).percent() is None
  assert machine.context(machine.Steal(str(tmp_path / 'missing'))).endswith('steal n/a')
  _stat(stat, steal=5, total_other=95)
  assert machine.Steal(str(stat)).percent() is None  # no time passed between the two reads


def test_steal_of_this_machine_is_a_share():
  window = machine.Steal()  # this machine's /proc/stat (Linux)
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < 0.1:  # a few jiffies of CPU time
    pass
  pct = window.percent()
  assert pct is not None and 0.0 <= pct <= 100.0


def test_pooled_steal_adds_up_its_intervals_only(tmp_path):
  """Two intervals of one arm, with another arm's time between them that must not count."""
  stat = tmp_path / 'stat'
  pool = machine.PooledSteal(str(stat))
  _stat(stat, steal=100, total_other=900)
  with pool.interval():
    _stat(stat, steal=110, total_other=990)  # 100 jiffies, 10 stolen
  _stat(stat, steal=500, total_other=1500)  # between the intervals: 1000 jiffies, 390 stolen
  with pool.interval():
    _stat(stat, steal=530, total_other=1570)  # 100 jiffies, 30 stolen
  assert abs(pool.percent() - 20.0) < 1e-9  # 40 of 200
  assert machine.PooledSteal(str(stat)).percent() is None  # no interval yet
  unknown = machine.PooledSteal(str(tmp_path / 'missing'))
  with unknown.interval():
    pass
  assert unknown.percent() is None

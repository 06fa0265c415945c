"""What else the machine did while a figure was measured: its load average, and the share of
CPU time the VM's host took back from it (steal time).

Inside a VM the load average counts only the VM's own runnable threads. When the host runs other
VMs on the same physical cores, the time it takes back shows up only as steal time in
`/proc/stat`. On this project's 2-core VM it was 4.8-9.8% over 5-10 s windows at 23:58 UTC on
2026-12-05 and 0.1-0.3% minutes later. It does not show everything the neighbours take: on
2026-12-06 at 00:03 UTC cpu_small's mean rate was 37% below its fastest step's at 0.3% steal
(shared caches and memory bandwidth are not counted as steal). So the benchmarks print both
beside each figure, to tell a slow host from a slow change:

    window = machine.Steal()
    ... measure ...
    print(f'... | {machine.context(window)}')   # 'load 1.42, steal 9.8%'
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

PROC_STAT = '/proc/stat'


def _cpu_line(path: str) -> Optional[list[int]]:
  """user nice system idle iowait irq softirq steal jiffies of all CPUs since boot, from the
  `cpu` line of /proc/stat; None where the file or its steal field is missing (not Linux, or a
  kernel before 2.6.11). Guest time, after them, is already counted in user and nice."""
  try:
    with open(path, encoding='ascii') as f:
      fields = f.readline().split()
  except OSError:
    return None
  if not fields or fields[0] != 'cpu' or len(fields) < 9:
    return None
  return [int(v) for v in fields[1:9]]


def cpu_jiffies(path: str = PROC_STAT) -> Optional[tuple[int, int]]:
  """(steal, total) jiffies of all CPUs since boot (`_cpu_line`); None where unknown."""
  values = _cpu_line(path)
  return None if values is None else (values[7], sum(values))


def busy_seconds(path: str = PROC_STAT) -> float:
  """`busy_jiffies` in seconds of CPU time."""
  return busy_jiffies(path) / os.sysconf('SC_CLK_TCK')


def busy_jiffies(path: str = PROC_STAT) -> int:
  """user + nice + system jiffies of all CPUs since boot: the CPU time processes used."""
  values = _cpu_line(path)
  if values is None:
    raise OSError(f'{path}: no cpu line with a steal field (not Linux?)')
  return sum(values[:3])


def _stolen_percent(stolen: int, total: int) -> Optional[float]:
  return 100.0 * stolen / total if total > 0 else None


class Steal:
  """The share of all CPU time stolen by the host between its creation and `percent()`."""

  def __init__(self, path: str = PROC_STAT):
    self._path = path
    self._start = cpu_jiffies(path)

  def percent(self) -> Optional[float]:
    """Percent of the interval's CPU time (all CPUs) that was stolen; None where unknown."""
    end = cpu_jiffies(self._path)
    if self._start is None or end is None:
      return None
    return _stolen_percent(end[0] - self._start[0], end[1] - self._start[1])


class PooledSteal:
  """The share of CPU time stolen over several intervals together (`with pool.interval():`),
  e.g. one arm's phases of a benchmark whose arms take turns."""

  def __init__(self, path: str = PROC_STAT):
    self._path, self._stolen, self._total, self._known = path, 0, 0, True

  @contextlib.contextmanager
  def interval(self) -> Iterator[None]:
    start = cpu_jiffies(self._path)
    yield
    end = cpu_jiffies(self._path)
    if start is None or end is None:
      self._known = False
    else:
      self._stolen += end[0] - start[0]
      self._total += end[1] - start[1]

  def percent(self) -> Optional[float]:
    """Percent of the intervals' CPU time that was stolen; None where unknown."""
    return _stolen_percent(self._stolen, self._total) if self._known else None


def percent_text(pct: Optional[float]) -> str:
  """'9.8%', or 'n/a' for an unknown share (`Steal.percent` returned None)."""
  return 'n/a' if pct is None else f'{pct:.1f}%'


def context(window: Steal) -> str:
  """'load L, steal S%' for the interval `window` covers (the load is the 1-minute average)."""
  return f'load {os.getloadavg()[0]:.2f}, steal {percent_text(window.percent())}'

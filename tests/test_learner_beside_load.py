"""benchmarks/learner_beside_load.py: its burners run at the priority their plan names."""
import multiprocessing as mp
import os
import sys
import time

import benchmark_modules

# Imported by name (not `benchmark_modules.load`): a spawned burner unpickles its function by
# module name, and the child inherits this sys.path.
sys.path.append(benchmark_modules.BENCHMARKS)  # after everything else: shadows nothing
import learner_beside_load as load  # noqa: E402


def _priority_of(pid: int):
  """'idle' for SCHED_IDLE, else the niceness, of process `pid`'s main thread."""
  return 'idle' if os.sched_getscheduler(pid) == os.SCHED_IDLE else os.getpriority(
      os.PRIO_PROCESS, pid)


def test_burner_processes_run_at_their_plans_priority():
  assert {w for *_, w in load.PLANS['priority']} == {
      'process', 'process@10', 'process@19', 'process@idle'}
  ctx = mp.get_context('spawn')
  stop, used = ctx.Event(), ctx.Value('d', 0.0)
  base = os.nice(0)
  wanted = {'process': base, 'process@10': max(10, base), 'process@idle': 'idle'}
  # Never set active: the burners wait without spinning. (Kept referenced: a collected Event's
  # semaphore is gone before the spawned child unpickles it.)
  actives = {where: ctx.Event() for where in wanted}
  workers = {where: load._start_burner(ctx, 0.2, 1, 'spin', where, stop, used, actives[where])
             for where in wanted}
  try:
    deadline = time.monotonic() + 60  # a spawned process imports numpy before it sets it
    while time.monotonic() < deadline:
      got = {where: _priority_of(w.pid) for where, w in workers.items()}
      if got == wanted:
        break
      time.sleep(0.2)
    assert got == wanted
  finally:
    stop.set()
    for w in workers.values():
      w.join(timeout=30)
  assert all(w.exitcode == 0 for w in workers.values())

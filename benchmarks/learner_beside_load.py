"""Does a small CPU load beside the learner cost it more than its share of the cores? (issue 13)

    .venv/bin/python benchmarks/learner_beside_load.py                # ~2.5 min, idle machine
    .venv/bin/python benchmarks/learner_beside_load.py --plan memory  # ~2 min

The learner's update (cpu_small on a random `FrameWindows` batch, compiled once) is timed for
15 s alone, and beside a "burner" process that spins for a burst (0.2-5 ms) and then sleeps, at
a duty cycle d (d of one core; measured, printed as "burner ... cores"). If XLA's parallel ops
waited for a thread the burner preempted (a straggler), the learner would lose much more than
the burner's share of the cores (d / number of cores). Each line: steps/s, the learner process's
cores (os.times), the burner's, and the load average.

`--plan memory` asks the same of a burner that copies memory in its bursts (1 MB blocks of a 64
MB array, like the data path's frame copies and decompression) in its own process, and of a
spinning and a copying burner as threads of the learner's process (the data path's place, and
its GIL): does memory traffic or sharing the process cost more than the CPU time? (A thread's cores
are not separable from the learner's in os.times, so its line shows the learner process's total.)"""
import argparse
import multiprocessing as mp
import os
import threading
import time

import numpy as np


def burner(duty, burst_ms, stop, used, kind='spin'):
  """Spins (or copies memory, `kind='copy'`) for `burst_ms`, then sleeps, at `duty` of one core,
  until `stop`; its cores go to `used` (a process's own; not meaningful for a thread)."""
  t = time
  w0, c0 = t.perf_counter(), os.times()
  burst = burst_ms / 1000
  idle = burst * (1 - duty) / duty
  src = np.ones(64 << 20, np.uint8) if kind == 'copy' else None
  dst = np.empty_like(src) if kind == 'copy' else None
  block, offset = 1 << 20, 0
  while not stop.is_set():
    end = t.perf_counter() + burst
    while t.perf_counter() < end:
      if kind == 'copy':
        np.copyto(dst[offset:offset + block], src[offset:offset + block])
        offset = (offset + block) % src.size
    t.sleep(idle)
  c1 = os.times()
  used.value = (c1.user - c0.user + c1.system - c0.system) / (t.perf_counter() - w0)


PLANS = {  # (duty, burst ms, kind, where)
    'spin': [(0, 0, '', ''), (0.05, 1, 'spin', 'process'), (0.10, 1, 'spin', 'process'),
             (0.20, 1, 'spin', 'process'), (0, 0, '', ''), (0.10, 5, 'spin', 'process'),
             (0.10, 0.2, 'spin', 'process'), (0, 0, '', '')],
    'memory': [(0, 0, '', ''), (0.20, 1, 'copy', 'process'), (0.20, 1, 'spin', 'thread'),
               (0.20, 1, 'copy', 'thread'), (0, 0, '', ''), (0.20, 1, 'copy', 'process'),
               (0.20, 1, 'spin', 'thread'), (0.20, 1, 'copy', 'thread'), (0, 0, '', '')],
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--plan', choices=sorted(PLANS), default='spin')
  args = parser.parse_args()
  import jax
  import sys
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from learner_step import compiled_update  # a sibling module; benchmarks/ is not a package
  from scaled_ql.configs import get_config
  compiled, state, data = compiled_update(get_config('cpu_small'))
  state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)

  def timed(seconds):
    nonlocal state
    n, t0 = 0, time.perf_counter()
    c0 = os.times()
    while time.perf_counter() - t0 < seconds:
      state, metrics = compiled(state, data)
      jax.block_until_ready(metrics)
      n += 1
    wall = time.perf_counter() - t0
    c1 = os.times()
    return n / wall, (c1.user - c0.user + c1.system - c0.system) / wall

  ctx = mp.get_context('spawn')
  for duty, burst, kind, where in PLANS[args.plan]:
    stop, used = ctx.Event(), ctx.Value('d', 0.0)
    p = None
    if duty:
      start = ctx.Process if where == 'process' else threading.Thread
      p = start(target=burner, args=(duty, burst, stop, used, kind), daemon=True)
      p.start()
      time.sleep(1)
    sps, cores = timed(15)
    if p:
      stop.set()
      p.join()
    beside = f'{kind} burner in a {where}, ' if duty else 'alone, '
    burner_cores = f'burner {used.value:.3f} cores, ' if where == 'process' else ''
    print(f'{beside}duty {duty:.2f} burst {burst} ms: {sps:.2f} steps/s, learner process '
          f'{cores:.2f} cores, {burner_cores}load {os.getloadavg()[0]:.2f}', flush=True)


if __name__ == '__main__':
  main()

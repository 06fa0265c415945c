"""Does a small CPU load beside the learner cost it more than its share of the cores? (issue 13)

    .venv/bin/python benchmarks/learner_beside_load.py                # ~2.5 min, idle machine
    .venv/bin/python benchmarks/learner_beside_load.py --plan memory  # ~2 min
    .venv/bin/python benchmarks/learner_beside_load.py --plan memory --interleave 150

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
are not separable from the learner's in os.times, so its line shows the learner process's total.)

`--interleave SECONDS`: the 15-s segments above could not resolve effects under 10-30% (the
learner alone moved by up to 80% between segments on 2026-12-02). This mode starts every burner of
the plan once, paused, and times blocks of 10 steps in turn: alone, then beside each burner (only
it active), round after round for SECONDS. Each line: the median ms/step of its blocks, the
slowdown against alone's median, and the burner's share of the cores (duty / cores) beside it.

`--plan priority --interleave 90`: the same spinning burner (0.2 of a core, 1-ms bursts) at
niceness 0, 10 and 19 and at `SCHED_IDLE`: what its priority changes in what its bursts cost.

`--plan ray --interleave 120`: the neighbour is a running Ray. Phases of `--phase-seconds` (15)
alternate: without Ray; with a local Ray started in this process as `run.init_ray` starts it,
with `--ray-actors` (4) idle actors that the process asks for a status once a second (as the
driver's `program.run` does); and with the same Ray, actors and polls started by another process
(`ray_driver`), this one not connected to it. The last two part Ray's cost into what its threads
in the learner's own process cost and what its daemons (GCS, raylet, the actors' workers) cost
from beside it. A Ray cannot be paused, so it starts and stops for every phase. Each line: the
median ms/step of the phase's blocks of 10 and the slowdown against no Ray."""
import argparse
import multiprocessing as mp
import os
import threading
import time

import numpy as np


def set_priority(priority: str) -> None:
  """The calling thread's (and the threads it starts) priority: '' leaves it, a number is a
  niceness (raised only), 'idle' is Linux's SCHED_IDLE class."""
  if priority == 'idle':
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
  elif priority and int(priority) > os.nice(0):
    os.nice(int(priority) - os.nice(0))


def burner(duty, burst_ms, stop, used, kind='spin', active=None, priority=''):
  """Spins (or copies memory, `kind='copy'`) for `burst_ms`, then sleeps, at `duty` of one core,
  until `stop`, and only while `active` is set if given, at `priority` (`set_priority`); its
  cores go to `used` (a process's own; not meaningful for a thread, nor with `active`)."""
  set_priority(priority)
  t = time
  w0, c0 = t.perf_counter(), os.times()
  burst = burst_ms / 1000
  idle = burst * (1 - duty) / duty
  src = np.ones(64 << 20, np.uint8) if kind == 'copy' else None
  dst = np.empty_like(src) if kind == 'copy' else None
  block, offset = 1 << 20, 0
  while not stop.is_set():
    if active is not None and not active.is_set():
      active.wait(0.05)
      continue
    end = t.perf_counter() + burst
    while t.perf_counter() < end:
      if kind == 'copy':
        np.copyto(dst[offset:offset + block], src[offset:offset + block])
        offset = (offset + block) % src.size
    t.sleep(idle)
  c1 = os.times()
  used.value = (c1.user - c0.user + c1.system - c0.system) / (t.perf_counter() - w0)


PLANS = {  # (duty, burst ms, kind, where): where is 'thread', 'process' or 'process@PRIORITY'
    'priority': [(0.20, 1, 'spin', 'process'), (0.20, 1, 'spin', 'process@10'),
                 (0.20, 1, 'spin', 'process@19'), (0.20, 1, 'spin', 'process@idle')],
    'spin': [(0, 0, '', ''), (0.05, 1, 'spin', 'process'), (0.10, 1, 'spin', 'process'),
             (0.20, 1, 'spin', 'process'), (0, 0, '', ''), (0.10, 5, 'spin', 'process'),
             (0.10, 0.2, 'spin', 'process'), (0, 0, '', '')],
    'memory': [(0, 0, '', ''), (0.20, 1, 'copy', 'process'), (0.20, 1, 'spin', 'thread'),
               (0.20, 1, 'copy', 'thread'), (0, 0, '', ''), (0.20, 1, 'copy', 'process'),
               (0.20, 1, 'spin', 'thread'), (0.20, 1, 'copy', 'thread'), (0, 0, '', '')],
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--plan', choices=sorted(PLANS) + ['ray'], default='spin')
  parser.add_argument('--interleave', type=float, default=0,
                      help='seconds of interleaved blocks (see above); 0: 15-s segments')
  parser.add_argument('--phase-seconds', type=float, default=15.0, help='--plan ray: per phase')
  parser.add_argument('--ray-actors', type=int, default=4, help='--plan ray: idle actors')
  args = parser.parse_args()
  if args.plan == 'ray' and not args.interleave:
    parser.error('--plan ray needs --interleave SECONDS (its phases alternate for that long)')
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
  box = [state]
  if args.plan == 'ray':
    return ray_phases(args, lambda: timed_block(compiled, box, data))
  if args.interleave:
    return interleaved(args, ctx, lambda: timed_block(compiled, box, data))
  for duty, burst, kind, where in PLANS[args.plan]:
    stop, used = ctx.Event(), ctx.Value('d', 0.0)
    p = None
    if duty:
      p = _start_burner(ctx, duty, burst, kind, where, stop, used)
      time.sleep(1)
    sps, cores = timed(15)
    if p:
      stop.set()
      p.join()
    beside = f'{kind} burner in a {where}, ' if duty else 'alone, '
    burner_cores = f'burner {used.value:.3f} cores, ' if where.startswith('process') else ''
    print(f'{beside}duty {duty:.2f} burst {burst} ms: {sps:.2f} steps/s, learner process '
          f'{cores:.2f} cores, {burner_cores}load {os.getloadavg()[0]:.2f}', flush=True)


def _start_burner(ctx, duty, burst, kind, where, stop, used, active=None):
  """A started burner process (`where` 'process' or 'process@PRIORITY') or thread ('thread')."""
  place, _, priority = where.partition('@')
  start = ctx.Process if place == 'process' else threading.Thread
  w = start(target=burner, args=(duty, burst, stop, used, kind, active, priority), daemon=True)
  w.start()
  return w


def start_ray(num_actors: int):
  """A local Ray as `run.init_ray` starts it for cpu_small, and `num_actors` idle actors that
  have answered once; returns the actors."""
  import ray
  from scaled_ql.configs import get_config
  from scaled_ql.launch import run

  @ray.remote(num_cpus=0)
  class Idle:  # defined here: Ray ships a local class by value (this module may be __main__)
    def status(self):
      return {'pid': os.getpid()}

  run.init_ray(None, None, get_config('cpu_small'))
  actors = [Idle.remote() for _ in range(num_actors)]
  ray.get([a.status.remote() for a in actors], timeout=120)
  return actors


def poll_until(actors, stop) -> None:
  """Asks every actor for a status once a second until `stop` (as `program.run` does)."""
  import ray
  while not stop.wait(1.0):
    ray.get([a.status.remote() for a in actors], timeout=60)


def ray_driver(num_actors: int, ready, stop) -> None:
  """`--plan ray`'s other process: starts a Ray with idle actors (`start_ray`), sets `ready`,
  polls them until `stop`, then stops Ray."""
  import ray
  actors = start_ray(num_actors)
  ready.set()
  poll_until(actors, stop)
  ray.shutdown()


def ray_phases(args, block):
  """`--plan ray`: phases without Ray, with a local Ray started in this process, and with one
  started by another process (`ray_driver`; `args.ray_actors` idle actors asked for a status
  once a second in both) alternate for `args.interleave` seconds; medians of the blocks of 10
  steps, the slowdowns and each arm's steal time printed."""
  import machine  # a sibling module (main put benchmarks/ on the path)
  import ray
  ctx = mp.get_context('spawn')
  arms = ('no Ray', 'Ray in this process', 'Ray in another process')
  times = {arm: [] for arm in arms}
  steal = {arm: machine.PooledSteal() for arm in arms}  # over each arm's phases
  block()
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < args.interleave:
    for arm in arms:
      stop, poller, driver = threading.Event(), None, None
      if arm == 'Ray in this process':
        actors = start_ray(args.ray_actors)
        poller = threading.Thread(target=poll_until, args=(actors, stop), daemon=True)
        poller.start()
      elif arm == 'Ray in another process':
        ready, stop = ctx.Event(), ctx.Event()
        driver = ctx.Process(target=ray_driver, args=(args.ray_actors, ready, stop), daemon=True)
        driver.start()
        if not ready.wait(180):
          driver.kill()
          raise RuntimeError('the other process did not start Ray within 180 s')
      if arm != 'no Ray':
        time.sleep(3)  # past Ray's start-up work
      with steal[arm].interval():
        start = time.perf_counter()
        while time.perf_counter() - start < args.phase_seconds:
          times[arm].append(block())
      stop.set()
      if poller:
        poller.join()
        ray.shutdown()
      if driver:
        driver.join(timeout=60)
        if driver.is_alive():  # its Ray must not run into the next arm's phase
          driver.kill()
          driver.join()
      if arm != 'no Ray':
        time.sleep(2)
  alone = float(np.median(times['no Ray']))
  print(f'no Ray: {1e3 * alone:.2f} ms/step (median of {len(times["no Ray"])} blocks of 10), '
        f'steal {machine.percent_text(steal["no Ray"].percent())}')
  for arm in arms[1:]:
    med = float(np.median(times[arm]))
    print(f'{arm}, {args.ray_actors} idle actors polled once a second: {1e3 * med:.2f} ms/step '
          f'(median of {len(times[arm])} blocks of 10), slowdown {med / alone - 1:+.3f}, steal '
          f'{machine.percent_text(steal[arm].percent())}; load {os.getloadavg()[0]:.2f}',
          flush=True)


def timed_block(compiled, state_box, data, steps=10):
  """Seconds per step over `steps` updates (the state threaded through `state_box`)."""
  import jax
  t0 = time.perf_counter()
  for _ in range(steps):
    state_box[0], metrics = compiled(state_box[0], data)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - t0) / steps


def interleaved(args, ctx, block):
  """`--interleave`: every burner of the plan started once, paused; blocks of 10 steps alone and
  beside each burner in turn for `args.interleave` seconds; medians and slowdowns printed."""
  arms = list(dict.fromkeys(a for a in PLANS[args.plan] if a[0]))  # distinct, in plan order
  stop, used = ctx.Event(), ctx.Value('d', 0.0)
  actives, workers = [], []
  for duty, burst, kind, where in arms:
    active = ctx.Event()
    w = _start_burner(ctx, duty, burst, kind, where, stop, used, active)
    actives.append(active)
    workers.append(w)
  time.sleep(2)  # the spawned burners import numpy
  times = {arm: [] for arm in [None] + arms}
  t0 = time.perf_counter()
  try:
    block()
    while time.perf_counter() - t0 < args.interleave:
      for arm, active in zip([None] + arms, [None] + actives):
        if active is not None:
          active.set()
          time.sleep(0.05)
        times[arm].append(block())
        if active is not None:
          active.clear()
  finally:
    stop.set()
    for a in actives:
      a.set()
    for w in workers:
      w.join()
  alone = float(np.median(times[None]))
  cores = os.cpu_count()
  print(f'alone: {1e3 * alone:.2f} ms/step (median of {len(times[None])} blocks of 10)')
  for arm in arms:
    duty, burst, kind, where = arm
    med = float(np.median(times[arm]))
    print(f'{kind} burner in a {where}, duty {duty:.2f} burst {burst} ms: {1e3 * med:.2f} '
          f'ms/step, slowdown {med / alone - 1:+.3f} against its share of the {cores} cores '
          f'{duty / cores:.3f}; load {os.getloadavg()[0]:.2f}', flush=True)


if __name__ == '__main__':
  main()

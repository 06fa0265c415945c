"""Does a small CPU load beside the learner cost it more than its share of the cores? (issue 13)

    .venv/bin/python benchmarks/learner_beside_load.py      # ~2.5 min; run it on an idle machine

The learner's update (cpu_small on a random `FrameWindows` batch, compiled once) is timed for
15 s alone, and beside a "burner" process that spins for a burst (0.2-5 ms) and then sleeps, at
a duty cycle d (d of one core; measured, printed as "burner ... cores"). If XLA's parallel ops
waited for a thread the burner preempted (a straggler), the learner would lose much more than
the burner's share of the cores (d / number of cores). Each line: steps/s, the learner process's
cores (os.times), the burner's, and the load average."""
import multiprocessing as mp
import os
import time


def burner(duty, burst_ms, stop, used):
  """Spins `burst_ms`, sleeps, at `duty` of one core, until `stop`; its cores go to `used`."""
  t = time
  w0, c0 = t.perf_counter(), os.times()
  burst = burst_ms / 1000
  idle = burst * (1 - duty) / duty
  while not stop.is_set():
    end = t.perf_counter() + burst
    while t.perf_counter() < end:
      pass
    t.sleep(idle)
  c1 = os.times()
  used.value = (c1.user - c0.user + c1.system - c0.system) / (t.perf_counter() - w0)


def main():
  import jax
  from scaled_ql.agents import learner as learner_lib
  from scaled_ql.configs import get_config
  from scaled_ql.types import random_frame_windows
  cfg = get_config('cpu_small')
  state = learner_lib.init_state(cfg, jax.random.PRNGKey(0))
  data = jax.device_put(random_frame_windows(cfg, cfg.agent.batch_size))
  compiled = learner_lib.update_from_windows.lower(state, data, cfg=cfg).compile()
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
  plan = [(0, 0), (0.05, 1), (0.10, 1), (0.20, 1), (0, 0), (0.10, 5), (0.10, 0.2), (0, 0)]
  for duty, burst in plan:
    stop, used = ctx.Event(), ctx.Value('d', 0.0)
    p = None
    if duty:
      p = ctx.Process(target=burner, args=(duty, burst, stop, used))
      p.start()
      time.sleep(1)
    sps, cores = timed(15)
    if p:
      stop.set()
      p.join()
    print(f'duty {duty:.2f} burst {burst} ms: {sps:.2f} steps/s, learner {cores:.2f} cores, '
          f'burner {used.value:.3f} cores, load {os.getloadavg()[0]:.2f}', flush=True)


if __name__ == '__main__':
  main()

"""Data path figures, every ratio against a baseline measured alone in the same run (issue 13).

    flock /tmp/scaled_ql_heavy.lock .venv/bin/python benchmarks/data_pipeline.py \
        --config cpu_small --data_dir data/generated [--seconds 20] [--memory]

One command, one table; the 1-minute load average is printed beside every figure (on a shared
machine a figure is only as good as the load it was measured under), and the VM's steal time
since the row before (the CPU time the host took back, which the load does not show;
`machine.py`): a timed rate is measured between its row and the one before, and the rows derived
from it follow at once. In order:
1. matmul peak: best fp32 [n,n]@[n,n] FLOP/s (benchmarks/learner_step.py), measured here.
2. learner alone: `Learner.step()` on one in-memory `FrameWindows` batch (what the pipeline
   delivers, so the same compiled update), before any Reverb process exists.
3. Reverb server + inserters (subprocesses, as in `scaled-ql learn`) fill every table.
4. sampling alone, learner idle: transitions/s delivered by `stratified_batches`, and CPU-us per
   delivered transition of this (the learner's) process, of the server, of the inserters
   (throttled by `DataConfig.samples_per_insert`, so they insert while the learner samples).
5. learner fed by the pipeline: `Learner.step()`/s over (2), with the same CPU accounting.
6. learner alone again (exposes load drift between 2 and 5).
7. storage: server RSS growth per transition held (every table full) against one 84x84 frame.
`--perf PERF_DATA` records (4) with Linux `perf` and prints its top symbols by self time.
`--memory` adds server/inserter RSS after streaming a small and a large selection.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import psutil  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learner_step import matmul_peak  # noqa: E402  (benchmarks/learner_step.py)
import machine  # noqa: E402  (the VM's steal time beside each figure)

from scaled_ql import configs  # noqa: E402
from scaled_ql.configs import overrides  # noqa: E402
from scaled_ql.datasets import reverb_tables as rt  # noqa: E402
from scaled_ql.datasets import transitions as tr  # noqa: E402
from scaled_ql.types import random_frame_windows  # noqa: E402


def load() -> float:
  return os.getloadavg()[0]


def rss(pid: int) -> int:
  return psutil.Process(pid).memory_info().rss


def cpu_s(pids) -> float:
  total = 0.0
  for pid in pids:
    try:
      t = psutil.Process(pid).cpu_times()
      total += t.user + t.system
    except psutil.NoSuchProcess:
      pass
  return total


def held_now(address, cfg) -> int:
  """Transitions held over all tables."""
  return sum(rt.table_sizes(address, cfg.games, per_item=cfg.data.transitions_per_item).values())


def wait_full(address, cfg, timeout_s):
  """Waits until every table of `cfg.games` holds `data.shuffle_buffer_per_game` transitions."""
  size, deadline = cfg.data.shuffle_buffer_per_game, time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    sizes = rt.table_sizes(address, cfg.games, per_item=cfg.data.transitions_per_item)
    if min(sizes.values()) >= size:
      return sizes
    time.sleep(0.5)
  raise TimeoutError(f'tables not full after {timeout_s}s: {sizes}')


def timed_steps(learner, seconds: float) -> tuple[int, float]:
  steps, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    learner.step()
    steps += 1
  return steps, time.perf_counter() - t0


class Meter:
  """CPU seconds of named process groups and wall time over a measured interval."""

  def __init__(self, groups: dict):
    self.groups = groups
    self.start = {k: cpu_s(p) for k, p in groups.items()}
    self.t0 = time.perf_counter()

  def stop(self) -> dict:
    wall = time.perf_counter() - self.t0
    return dict(wall_s=wall, **{f'{k}_cpu_s': cpu_s(p) - self.start[k]
                                for k, p in self.groups.items()})


def start_perf(out: str, seconds: float):
  """`perf record` of this process (the learner's side of the data path) for `seconds`."""
  import subprocess
  return subprocess.Popen(['perf', 'record', '-F', '499', '-g', '-p', str(os.getpid()), '-o', out,
                           '--', 'sleep', str(seconds)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def print_perf_top(perf, out: str, top: int = 15) -> None:
  """Waits for `start_perf`'s recording and prints its top symbols by self time."""
  import subprocess
  _, err = perf.communicate()
  report = subprocess.run(['perf', 'report', '-i', out, '--no-children', '--sort', 'dso,symbol',
                           '--stdio', '-g', 'none'], capture_output=True, text=True).stdout
  rows = [line.rstrip() for line in report.splitlines()
          if line.strip() and not line.startswith('#')][:top]
  if not rows:
    raise RuntimeError(f'perf recorded nothing (exit {perf.returncode}): {err.strip()[-500:]}')
  print(f'perf: the learner process while sampling alone, top {top} symbols by self time '
        f'({out}):', flush=True)
  for line in rows:
    print('  ' + line[:150], flush=True)


def run(cfg, args) -> list[dict]:
  from scaled_ql import loggers
  from scaled_ql.agents.learner import Learner
  from scaled_ql.agents.runner import LearnerRunner
  rows = []
  since = [machine.Steal()]  # each figure is measured between its row and the one before

  def row(name, value, unit, note=''):
    r = dict(figure=name, value=value, unit=unit, load_1min=load(),
             steal_pct_since_previous_row=since[0].percent(), note=note)
    since[0] = machine.Steal()
    rows.append(r)
    steal = machine.percent_text(r['steal_pct_since_previous_row'])
    print(f'{name:<58} {value:12.2f} {unit:<16} load {r["load_1min"]:5.2f} steal {steal:>5}  '
          f'{note}', flush=True)
    return r

  peak = max(matmul_peak(np.float32, n, args.peak_seconds / 3) for n in (1024, 2048, 4096))
  row('matmul peak (fp32, best of n=1024/2048/4096)', peak / 1e9, 'GFLOP/s')
  quiet = dict(log_every_steps=10**9, checkpoint_every_steps=10**9)
  batch = cfg.agent.batch_size
  # One batch, repeated: a fresh random batch per step would charge the baseline ~12 MB of
  # random numbers per step (it did until 2026-12-01, which slowed "alone" and raised the ratio).
  alone = LearnerRunner(Learner(cfg.replace(train=quiet),
                                itertools.repeat(random_frame_windows(cfg))),
                        logger=loggers.MultiLogger([]), handle_signals=False)
  for _ in range(3):
    alone.step()  # compile + warm up
  steps, wall = timed_steps(alone, args.seconds)
  alone_before = steps / wall
  row('learner alone, in-memory FrameWindows (before)', alone_before, 'steps/s',
      f'{alone_before * batch:.0f} transitions/s')

  with rt.start_server_process(cfg) as server:
    rss_empty = rss(server.pid)
    inserters = rt.start_inserter_processes(server.address, cfg)
    ins_pids = [p.pid for p in inserters]
    try:
      while held_now(server.address, cfg) == 0:
        time.sleep(0.2)  # the inserter processes start (imports, reader)
      t0 = time.monotonic()
      wait_full(server.address, cfg, args.timeout_s)
      items = held_now(server.address, cfg)
      row('insert rate while filling (learner idle)', items / (time.monotonic() - t0),
          'transitions/s', f'{cfg.data.num_inserters} inserter(s)')

      batches = rt.stratified_batches(server.address, cfg.games, cfg, seed=1)
      for _ in range(5):
        next(batches)  # warm up
      me = [os.getpid()]
      perf = start_perf(args.perf, args.seconds) if args.perf else None
      meter = Meter(dict(learner=me, server=[server.pid], inserters=ins_pids))
      n = 0
      while time.perf_counter() - meter.t0 < args.seconds:
        next(batches)
        n += 1
      m = meter.stop()
      if perf is not None:
        print_perf_top(perf, args.perf)
      delivered = n * batch
      row('sampling alone (learner idle): delivered', delivered / m['wall_s'], 'transitions/s',
          'target >= 20000 on 2 cores')
      us = lambda cpu: 1e6 * cpu / delivered
      row('  CPU per transition, learner process', us(m['learner_cpu_s']), 'CPU-us',
          'target <= 50')
      row('  CPU per transition, + server + inserters',
          us(m['learner_cpu_s'] + m['server_cpu_s'] + m['inserters_cpu_s']), 'CPU-us',
          f'target <= 100 (server {us(m["server_cpu_s"]):.0f}, inserters '
          f'{us(m["inserters_cpu_s"]):.0f})')

      fed = LearnerRunner(Learner(cfg.replace(train=quiet), batches),
                          logger=loggers.MultiLogger([]), handle_signals=False)
      for _ in range(3):
        fed.step()
      meter = Meter(dict(learner=me, server=[server.pid], inserters=ins_pids))
      steps, wall = timed_steps(fed, args.seconds)
      m = meter.stop()
      fed_rate = steps / wall
      batches.close()
      row('learner fed by the pipeline', fed_rate, 'steps/s',
          f'{fed_rate * batch:.0f} transitions/s')
      row('  server + inserters CPU while the learner runs', (m['server_cpu_s']
          + m['inserters_cpu_s']) / m['wall_s'], 'cores')

      steps, wall = timed_steps(alone, args.seconds)
      alone_after = steps / wall
      row('learner alone, in-memory FrameWindows (after, processes idle)', alone_after, 'steps/s')
      row('pipeline-fed / alone (mean of before and after)',
          fed_rate / (0.5 * (alone_before + alone_after)), 'ratio', 'target >= 0.85')

      held = held_now(server.address, cfg)
      grown = rss(server.pid) - rss_empty
      row('storage: server RSS growth per transition held', grown / held, 'bytes',
          f'{grown / held / tr.FRAME_BYTES:.2f} x one 84x84 frame; {held} held')
    finally:
      rt.stop_processes(inserters)
  return rows


def memory_vs_dataset_size(cfg, args) -> dict:
  out = {}
  for selection in (args.small_selection, args.large_selection):
    c = cfg.replace(data=dict(selection=selection, num_inserters=1,
                              shuffle_buffer_per_game=args.memory_buffer_per_game,
                              min_fill_per_game=1))
    with rt.start_server_process(c) as server:
      inserters = rt.start_inserter_processes(server.address, c, repeat=False)
      peak_server = peak_inserter = 0
      t0 = time.monotonic()
      while inserters[0].poll() is None and time.monotonic() - t0 < args.timeout_s:
        try:
          peak_inserter = max(peak_inserter, rss(inserters[0].pid))
        except psutil.NoSuchProcess:
          break
        peak_server = max(peak_server, rss(server.pid))
        time.sleep(0.2)
      rt.stop_processes(inserters)
      info = rt.table_sizes(server.address, c.games, per_item=c.data.transitions_per_item)
      import reverb
      tables = reverb.Client(server.address).server_info()
      inserted = sum(tables[rt.table_name(g)].rate_limiter_info.insert_stats.completed
                     for g in c.games)
      out[selection] = dict(transitions_streamed=int(inserted), held=sum(info.values()),
                            peak_server_rss_mb=peak_server / 2**20,
                            peak_inserter_rss_mb=peak_inserter / 2**20,
                            stream_s=time.monotonic() - t0)
      print(selection, json.dumps(out[selection]), flush=True)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='cpu_small')
  p.add_argument('--data_dir', default='data/generated')
  p.add_argument('--selection', default='near_optimal')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help="config overrides, as for the CLI (e.g. the demo's games: "
                 "games=BeamRider,Centipede,Freeway,SpaceInvaders)")
  p.add_argument('--buffer_per_game', type=int, default=4000)
  p.add_argument('--num_inserters', type=int, default=1)
  p.add_argument('--chunk_length', type=int, default=None, help='data.reverb_chunk_length')
  p.add_argument('--transitions_per_item', type=int, default=None,
                 help='data.transitions_per_item (default: the config\'s)')
  p.add_argument('--seconds', type=float, default=20.0, help='timed seconds per figure')
  p.add_argument('--peak_seconds', type=float, default=6.0)
  p.add_argument('--memory', action='store_true', help='also the memory-vs-dataset-size runs')
  p.add_argument('--small_selection', default='checkpoints:0-0')
  p.add_argument('--large_selection', default='near_optimal')
  p.add_argument('--memory_buffer_per_game', type=int, default=300,
                 help='smaller than the small selection, so that both fill the tables')
  p.add_argument('--timeout_s', type=float, default=600.0)
  p.add_argument('--out', default=None, help='write the results as JSON here')
  p.add_argument('--perf', default=None, metavar='PERF_DATA',
                 help='record `perf` of the learner process while it samples alone (4), write '
                      'it here and print its top symbols (needs Linux perf)')
  args = p.parse_args(argv)
  if args.perf and shutil.which('perf') is None:
    p.error('--perf: no `perf` command on PATH (Linux perf: e.g. apt install linux-tools-generic)')
  cfg = configs.get_config(args.config)
  cfg = cfg.replace(data=dict(data_dir=args.data_dir, selection=args.selection,
                              shuffle_buffer_per_game=args.buffer_per_game,
                              min_fill_per_game=min(cfg.data.min_fill_per_game,
                                                    args.buffer_per_game),
                              num_inserters=args.num_inserters))
  cfg = overrides.apply(cfg, args.set)
  if args.chunk_length:
    cfg = cfg.replace(data=dict(reverb_chunk_length=args.chunk_length))
  if args.transitions_per_item:
    cfg = cfg.replace(data=dict(transitions_per_item=args.transitions_per_item))
  print(f'config {cfg.name}, batch {cfg.agent.batch_size}, cpus {os.cpu_count()}, chunk '
        f'{cfg.data.reverb_chunk_length}, transitions per item {cfg.data.transitions_per_item}, '
        f'buffer/game {args.buffer_per_game}; '
        f'{os.popen("uptime").read().strip()}', flush=True)
  results = dict(config=args.config, argv=sys.argv[1:], cpu_count=os.cpu_count(),
                 rows=run(cfg, args))
  if args.memory:
    results['memory_vs_dataset_size'] = memory_vs_dataset_size(cfg, args)
  print(f'end: {os.popen("uptime").read().strip()}', flush=True)
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())

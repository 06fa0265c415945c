"""Data pipeline figures: storage per transition, sampling throughput, learner feed ratio, memory.

    .venv/bin/python benchmarks/data_pipeline.py --config cpu_small --data_dir data/generated

Reverb server and inserters run in subprocesses (as in training); this process samples.
1. Storage: server RSS growth / transitions held, with every table full (FIFO steady state),
   against one 84x84 frame (7056 B).
2. Sampling: transitions/s delivered by `stratified_batches` (nothing consumes them), and per
   CPU-second spent by this process + the server process.
3. Learner feed: `Learner.step()`/s fed by the pipeline over steps/s on one pre-made in-memory
   batch (`--learner_steps`, 0 to skip).
4. Memory vs dataset size: server and inserter RSS after streaming a small and a large selection
   of the same data through the same tables (`--small_selection`, `--large_selection`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from scaled_ql import configs  # noqa: E402
from scaled_ql.datasets import reverb_tables as rt  # noqa: E402
from scaled_ql.datasets import transitions as tr  # noqa: E402


def rss(pid: int) -> int:
  return psutil.Process(pid).memory_info().rss


def cpu_s(pid: int) -> float:
  t = psutil.Process(pid).cpu_times()
  return t.user + t.system


def wait_full(address, games, size, timeout_s):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    sizes = rt.table_sizes(address, games)
    if min(sizes.values()) >= size:
      return sizes
    time.sleep(0.5)
  raise TimeoutError(f'tables not full after {timeout_s}s: {rt.table_sizes(address, games)}')


def storage_and_sampling(cfg, args) -> dict:
  out = {}
  with rt.start_server_process(cfg) as server:
    time.sleep(1.0)
    rss_empty = rss(server.pid)
    inserters = rt.start_inserter_processes(server.address, cfg)
    try:
      while sum(rt.table_sizes(server.address, cfg.games).values()) == 0:
        time.sleep(0.2)  # inserter processes start (imports, reader setup)
      t0 = time.monotonic()
      wait_full(server.address, cfg.games, cfg.data.shuffle_buffer_per_game, args.timeout_s)
      fill_s = time.monotonic() - t0
      # A little more streaming so that FIFO eviction (and chunk release) is in steady state.
      time.sleep(args.settle_s)
      sizes = rt.table_sizes(server.address, cfg.games)
      items = sum(sizes.values())
      grown = rss(server.pid) - rss_empty
      out['storage'] = dict(
          transitions_held=items, server_rss_growth_mb=grown / 2**20,
          bytes_per_transition=grown / items,
          ratio_to_one_frame=grown / items / tr.FRAME_BYTES,
          insert_transitions_per_s_during_fill=items / fill_s)
      print(json.dumps(out['storage'], indent=1), flush=True)

      batches = rt.stratified_batches(server.address, cfg.games, cfg, seed=1)
      for _ in range(5):
        next(batches)  # warm up
      me = os.getpid()
      c0, s0, w0 = cpu_s(me), cpu_s(server.pid), time.perf_counter()
      n = 0
      while time.perf_counter() - w0 < args.sample_s:
        next(batches)
        n += 1
      wall = time.perf_counter() - w0
      c1, s1 = cpu_s(me), cpu_s(server.pid)
      batches.close()
      delivered = n * cfg.agent.batch_size
      out['sampling'] = dict(
          batch_size=cfg.agent.batch_size, batches=n, wall_s=wall,
          transitions_per_s=delivered / wall,
          sampler_cpu_s=c1 - c0, server_cpu_s=s1 - s0,
          transitions_per_cpu_s=delivered / ((c1 - c0) + (s1 - s0)),
          note='inserters kept streaming during sampling (their CPU is not counted)')
      print(json.dumps(out['sampling'], indent=1), flush=True)

      if args.learner_steps:
        out['learner'] = learner_ratio(cfg, server.address, args.learner_steps)
        print(json.dumps(out['learner'], indent=1), flush=True)
    finally:
      rt.stop_processes(inserters)
  return out


def learner_ratio(cfg, address, steps, rounds=3) -> dict:
  """Learner steps/s fed by the pipeline vs by one in-memory batch, in alternating rounds (the
  shared machine's load drifts; alternating exposes both to the same drift)."""
  from scaled_ql.agents.learner import Learner
  cfg = cfg.replace(train=dict(log_every_steps=10**9))
  waited = [0.0]

  def timed(iterator):  # time the learner spends blocked on the data
    while True:
      t = time.perf_counter()
      batch = next(iterator)
      waited[0] += time.perf_counter() - t
      yield batch

  with rt.stratified_batches(address, cfg.games, cfg, seed=2) as batches:
    fixed = next(batches)
    piped = Learner(cfg, timed(batches), workdir=None, handle_signals=False)
    in_memory = Learner(cfg, itertools.repeat(fixed), workdir=None, handle_signals=False)
    for learner in (piped, in_memory):
      for _ in range(3):
        learner.step()  # compile + warm up
    waited[0] = 0.0
    wall = {'pipeline': 0.0, 'in_memory': 0.0}
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
      for name, learner in (('pipeline', piped), ('in_memory', in_memory)):
        t0 = time.perf_counter()
        for _ in range(per_round):
          learner.step()
        wall[name] += time.perf_counter() - t0
  n = per_round * rounds
  return dict(steps_each=n, rounds=rounds, learner_steps_per_s_pipeline=n / wall['pipeline'],
              learner_steps_per_s_in_memory=n / wall['in_memory'],
              ratio=wall['in_memory'] / wall['pipeline'],
              fraction_of_pipeline_time_waiting_for_data=waited[0] / wall['pipeline'])


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
      info = rt.table_sizes(server.address, c.games)
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
  p.add_argument('--buffer_per_game', type=int, default=4000)
  p.add_argument('--num_inserters', type=int, default=2)
  p.add_argument('--chunk_length', type=int, default=None, help='data.reverb_chunk_length')
  p.add_argument('--settle_s', type=float, default=5.0)
  p.add_argument('--sample_s', type=float, default=20.0)
  p.add_argument('--learner_steps', type=int, default=30)
  p.add_argument('--small_selection', default='checkpoints:0-0')
  p.add_argument('--large_selection', default='near_optimal')
  p.add_argument('--memory_buffer_per_game', type=int, default=300,
                 help='smaller than the small selection, so that both fill the tables')
  p.add_argument('--timeout_s', type=float, default=600.0)
  p.add_argument('--skip_memory', action='store_true')
  p.add_argument('--out', default=None, help='write the results as JSON here')
  args = p.parse_args(argv)
  cfg = configs.get_config(args.config)
  cfg = cfg.replace(data=dict(data_dir=args.data_dir, selection=args.selection,
                              shuffle_buffer_per_game=args.buffer_per_game,
                              min_fill_per_game=min(cfg.data.min_fill_per_game,
                                                    args.buffer_per_game),
                              num_inserters=args.num_inserters))
  if args.chunk_length:
    cfg = cfg.replace(data=dict(reverb_chunk_length=args.chunk_length))
  results = dict(config=args.config, argv=sys.argv[1:], cpu_count=os.cpu_count(),
                 chunk_length=cfg.data.reverb_chunk_length,
                 load_avg_1min=os.getloadavg()[0])
  results.update(storage_and_sampling(cfg, args))
  if not args.skip_memory:
    results['memory_vs_dataset_size'] = memory_vs_dataset_size(cfg, args)
  results['load_avg_1min_end'] = os.getloadavg()[0]
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)
  print(json.dumps(results, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())

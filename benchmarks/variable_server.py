"""Variable-server fetch latency and bandwidth: 1M and 80M float32 params, 1 and 4 shards.

    .venv/bin/python benchmarks/variable_server.py [--sizes 1e6 8e7] [--shards 1 4] [--repeats 5]

A tree shaped like a ResNet (many leaves of mixed sizes) is published once per repeat with a new
version; the client (this driver process) then fetches it (`update_and_wait`),
while the shards live in their own actor processes, so every fetch crosses process boundaries
through Ray's object store. Reports the median latency of publish (learner side, non-blocking
part only) and of a full fetch (all shards, reassembled), and the fetch bandwidth.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ray

from scaled_ql.launch import run as run_lib
from scaled_ql.launch import variable_server as vs


def make_tree(num_params: int, seed: int = 0) -> dict:
  """~num_params float32 params in leaves of ResNet-like sizes (a few big, many small)."""
  rng = np.random.default_rng(seed)
  tree, remaining, i = {}, int(num_params), 0
  while remaining > 0:
    # Conv/dense kernel sizes of a ResNet, capped so that even a small tree has >= 8 big leaves.
    size = min(remaining, max(64, num_params // 8),
               int(rng.choice([64, 512, 4096, 65_536, 589_824, 2_359_296])))
    tree[f'block_{i}'] = {'w': rng.standard_normal(size).astype(np.float32),
                          'b': np.zeros((64,), np.float32)}
    remaining -= size + 64
    i += 1
  return tree


def run(num_params: int, num_shards: int, repeats: int) -> dict:
  tree = make_tree(num_params)
  nbytes = sum(leaf['w'].nbytes + leaf['b'].nbytes for leaf in tree.values())
  server = vs.VariableServer.create(num_shards)
  publisher = server.publisher()
  client = vs.VariableClient(server)
  publish_s, fetch_s = [], []
  for version in range(repeats + 1):  # the first round warms up actors and the object store
    t0 = time.perf_counter()
    publisher.publish(tree, version)
    t1 = time.perf_counter()
    publisher.flush()
    t2 = time.perf_counter()
    assert client.update_and_wait() and client.version == version
    t3 = time.perf_counter()
    if version:
      publish_s.append(t1 - t0)
      fetch_s.append(t3 - t2)
  server.kill()
  fetch = statistics.median(fetch_s)
  return dict(params=num_params, shards=num_shards, leaves=2 * len(tree), mbytes=nbytes / 1e6,
              publish_ms=1e3 * statistics.median(publish_s), fetch_ms=1e3 * fetch,
              fetch_gb_s=nbytes / fetch / 1e9)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', type=float, nargs='+', default=[1e6, 8e7])
  parser.add_argument('--shards', type=int, nargs='+', default=[1, 4])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--num-cpus', type=int, default=2)
  args = parser.parse_args()
  run_lib.start_local_ray(args.num_cpus, log_to_driver=False)
  print('| params | shards | leaves | MB | publish (ms, learner side) | fetch (ms) | fetch GB/s |')
  print('|---|---|---|---|---|---|---|')
  for size in args.sizes:
    for shards in args.shards:
      r = run(int(size), shards, args.repeats)
      print(f"| {r['params']:,} | {r['shards']} | {r['leaves']} | {r['mbytes']:.1f} | "
            f"{r['publish_ms']:.1f} | {r['fetch_ms']:.1f} | {r['fetch_gb_s']:.2f} |", flush=True)
  ray.shutdown()


if __name__ == '__main__':
  main()

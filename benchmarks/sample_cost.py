"""CPU cost of one Reverb sample against its length: why items hold several transitions.

    .venv/bin/python benchmarks/sample_cost.py [--per-item 1,2,4] [--seconds 8] [--rounds 2]

One Reverb server in a subprocess with one table per item length (n = 3: an item of P
consecutive transitions is n + 3 + P records of the data path's packed format, chunk length
`DataConfig.reverb_chunk_length`), filled with the same 3000 real Pong frames (random play).
Then, in interleaved rounds, `reverb.TrajectoryDataset` samples (batched as the learner's
sampler does) for `--seconds` per table. Printed per item length: CPU-us per sample and per
delivered transition in this (the sampling) process and in the server, samples/s, and the
1-minute load average. Only the data path's Reverb sampling is measured (no tf.data game mixing,
no unpacking); `benchmarks/program_throughput.py` measures the whole program.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from scaled_ql.configs import DataConfig  # noqa: E402
from scaled_ql.datasets import transitions as tr  # noqa: E402

N_STEP = 3
SERVER = '''
import reverb, sys
widths = [int(w) for w in sys.argv[2].split(',')]
tables = [reverb.Table(name=f'w{w}', sampler=reverb.selectors.Uniform(),
                       remover=reverb.selectors.Fifo(), max_size=100_000,
                       rate_limiter=reverb.rate_limiters.MinSize(1)) for w in widths]
reverb.Server(tables, port=int(sys.argv[1])).wait()
'''


def pong_frames(count: int) -> list:
  from scaled_ql.envs.atari import AtariEnv
  env, rng, frames = AtariEnv('Pong'), np.random.default_rng(0), []
  timestep = env.reset()
  while len(frames) < count:
    timestep = env.step(int(rng.integers(env.action_spec().num_values)))
    frames.append(np.asarray(timestep.observation)[..., -1])
    if timestep.last():
      timestep = env.reset()
  return frames


def cpu_s(process: psutil.Process) -> float:
  t = process.cpu_times()
  return t.user + t.system


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--per-item', default='1,2,4', help='transitions per item to compare')
  p.add_argument('--seconds', type=float, default=8.0)
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--chunk-length', type=int, default=DataConfig.reverb_chunk_length)
  p.add_argument('--port', type=int, default=0, help='0: any free port')
  a = p.parse_args(argv)
  import portpicker
  import reverb
  import tensorflow as tf
  per_items = [int(x) for x in a.per_item.split(',')]
  widths = [tr.window_length(N_STEP, k) for k in per_items]
  port = portpicker.pick_unused_port() if a.port == 0 else a.port
  server = subprocess.Popen([sys.executable, '-c', SERVER, str(port),
                             ','.join(map(str, widths))])
  try:
    client = reverb.Client(f'localhost:{port}')
    client.server_info(timeout=60)
    frames = pong_frames(3000)
    for width in widths:
      writer = client.trajectory_writer(num_keep_alive_refs=max(width, a.chunk_length))
      writer.configure(('r',), num_keep_alive_refs=max(width, a.chunk_length),
                       max_chunk_length=a.chunk_length)
      for i, frame in enumerate(frames):
        record = tr.StepRecords(frame=frame, action=np.int32(1), reward=np.float32(0.0),
                                terminal=np.bool_(False), valid=np.bool_(True))
        writer.append({'r': tr.pack_record(record)})
        if i + 1 >= width:
          writer.create_item(table=f'w{width}', priority=1.0,
                             trajectory={'r': writer.history['r'][-width:]})
        if i % 50 == 0:
          writer.flush()
      writer.flush()
      writer.end_episode()
      writer.close()
    me, srv = psutil.Process(), psutil.Process(server.pid)
    print('| round | transitions per item | records per sample | sampler CPU-us / sample | '
          '/ transition | server CPU-us / transition | samples/s | load (1 min) |')
    print('|---|---|---|---|---|---|---|---|')
    for r in range(a.rounds):
      for per_item, width in zip(per_items, widths):
        ds = reverb.TrajectoryDataset(
            server_address=f'localhost:{port}', table=f'w{width}', dtypes={'r': tf.uint8},
            shapes={'r': tf.TensorShape([width, tr.RECORD_BYTES])},
            max_in_flight_samples_per_worker=16, num_workers_per_iterator=1)
        it = ds.batch(4).batch(64).prefetch(2).as_numpy_iterator()
        next(it)
        c0, s0, t0, samples = cpu_s(me), cpu_s(srv), time.time(), 0
        while time.time() - t0 < a.seconds:
          samples += int(np.prod(next(it).data['r'].shape[:2]))
        c1, s1, t1 = cpu_s(me), cpu_s(srv), time.time()
        del it, ds
        us = 1e6 * (c1 - c0) / samples
        print(f'| {r} | {per_item} | {width} | {us:.1f} | {us / per_item:.1f} | '
              f'{1e6 * (s1 - s0) / samples / per_item:.1f} | {samples / (t1 - t0):.0f} | '
              f'{os.getloadavg()[0]:.2f} |', flush=True)
  finally:
    server.kill()
    server.wait()


if __name__ == '__main__':
  main()

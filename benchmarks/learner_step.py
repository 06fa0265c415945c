"""Throughput of the learner's jitted update (`learner.update_from_windows`) vs. the machine.

    .venv/bin/python benchmarks/learner_step.py                       # cpu_tiny, cpu_small
    .venv/bin/python benchmarks/learner_step.py --configs cpu_small,atari6_suboptimal_resnet34 \
        --batch 8 --seconds 20
    .venv/bin/python benchmarks/learner_step.py --bf16                # bfloat16 compute

For each config: steps/s and samples/s of the whole update (observations made from the frame
windows, forward of online + target network, backward, Adam, target copy) on random
`FrameWindows` batches (what the Reverb path delivers; `types.random_frame_windows`) already on
the device(s), compiled as the Learner compiles it (`learner.compile_update`); FLOPs per step
from XLA's cost analysis of the update compiled for the CPU with XLA's default options; achieved
FLOP/s and its fraction of the machine's fp32 (or bf16) matmul peak, measured here with a large
jnp.dot. Uses every local device
(the batch is split over them like the Learner does); on a GPU machine that is the GPU.

The baseline (`--dopamine`, on by default; `--no-dopamine` skips it): Dopamine's own JAX C51
training step (`benchmarks/dopamine_c51.py`, c51.gin: batch 32, 18 actions by default), timed
after our configs in the same process with the same loop and the same cost analysis, on one
device, in float32. Each of our rows then gets ours_FLOP/s / dopamine_FLOP/s.

Beside each row: the 1-minute load average and the VM's steal time over its timed steps (the CPU
time the host took back for other VMs, which the load average does not show; `machine.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dopamine_c51  # noqa: E402  (a sibling module; benchmarks/ is not a package)
import machine  # noqa: E402  (the load and the VM's steal time beside each figure)

from scaled_ql.agents import learner as learner_lib
from scaled_ql.configs import get_config, overrides
from scaled_ql.types import random_frame_windows


def matmul_peak(dtype, size: int, seconds: float) -> float:
  """Best FLOP/s of a [size, size] @ [size, size] product (2 size^3 FLOPs)."""
  x = jnp.ones((size, size), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(x, x).block_until_ready()
  best, end = float('inf'), time.perf_counter() + seconds
  while time.perf_counter() < end:
    t = time.perf_counter()
    f(x, x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * size ** 3 / best


def flops_of(compiled) -> float:
  """FLOPs of a compiled function by XLA's cost analysis. Meaningful for a CPU executable only: on
  a GPU the convolutions and matmuls are cuDNN/cuBLAS custom calls that the analysis counts as 0
  FLOPs (189 GFLOP for a ResNet-101 update of ~5.4 TFLOP on the H200); use `cpu_flops` there."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan')))


def cpu_flops(jitted, *args, **static) -> float:
  """`flops_of` the jitted function compiled for the CPU from the shapes of `args` (arrays or
  pytrees of them, on any device; nothing is copied or run), with `static` keyword arguments: the
  same count on every backend."""
  cpu = SingleDeviceSharding(jax.devices('cpu')[0])
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu)
  return flops_of(jitted.lower(*jax.tree_util.tree_map(spec, args), **static).compile())


def bench_config(name: str, batch: int | None, bf16: bool, sets: Sequence[str] = ()):
  """The named config with the `--set` overrides `sets`, resized to `batch` (stratified games x
  transitions) and in bf16 if asked."""
  cfg = overrides.apply(get_config(name), sets)
  if batch is not None:
    per_game = max(1, batch // cfg.agent.games_per_batch)
    cfg = cfg.replace(agent=dict(games_per_batch=batch // per_game, transitions_per_game=per_game))
  if bf16:
    cfg = cfg.replace(network=dict(compute_dtype='bfloat16'))
  return cfg


def compiled_update(cfg):
  """(`learner.update_from_windows` compiled as the Learner compiles it, `learner.compile_update`
  (with the config's XLA options), a fresh train state (packed with `train.packed_state`), one
  random `FrameWindows` batch), placed like the Learner places them (the batch split over every
  local device). What this benchmark, `update_profile.py` and `learner_beside_load.py` time."""
  mesh = Mesh(np.asarray(jax.local_devices()), ('batch',))
  state = jax.device_put(learner_lib.init_state(cfg, jax.random.PRNGKey(0)),
                         NamedSharding(mesh, PartitionSpec()))
  if cfg.train.packed_state:
    state = learner_lib.pack_state_jit(state, cfg)
  data = jax.device_put(random_frame_windows(cfg, cfg.agent.batch_size),
                        NamedSharding(mesh, PartitionSpec('batch')))
  return learner_lib.compile_update(state, data, cfg), state, data


def bench(name: str, batch: int | None, bf16: bool, seconds: float, peak: float,
          sets: Sequence[str] = ()) -> dict:
  cfg = bench_config(name, batch, bf16, sets)
  b = cfg.agent.batch_size
  t = time.perf_counter()
  compiled, state, data = compiled_update(cfg)
  compile_s = time.perf_counter() - t  # includes the init and the placement (~0.1 s)
  tree = state  # the state as trees: what the params and the FLOPs are counted on
  if cfg.train.packed_state:  # (a packed state steps the same update: the same FLOPs)
    tree = jax.eval_shape(lambda s: learner_lib.unpack_state(s, cfg), state)
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(tree.params))
  # Counted on the update compiled with XLA's default options: the cost analysis of an executable
  # for the classic CPU runtime (cpu_small's `train.xla_cpu_use_thunk_runtime=False`) leaves out
  # the matmuls and convolutions it hands to Eigen (0.21 of cpu_small's 3.76 GFLOP).
  flops = cpu_flops(learner_lib.update_from_windows, tree, data, cfg=cfg)
  return timed_row(compiled, state, data, seconds, peak, flops=flops, config=cfg.name, batch=b,
                   dtype=cfg.network.compute_dtype, params_m=num_params / 1e6,
                   compile_s=compile_s)


def timed_row(compiled, state, data, seconds: float, peak: float, flops: float | None = None,
              **fields) -> dict:
  """Times `compiled(state, data) -> (state, metrics)`; one row of figures for it. `flops` per
  call: `flops_of(compiled)` unless given.

  Our update and Dopamine's step both go through here, so their figures come from one loop and
  one cost analysis. Each step is timed alone (the Learner also waits for every step's metrics).
  On a shared machine the mean measures what we got; the fastest step, like the matmul peak's
  best run, estimates the uncontended speed.
  """
  flops = flops_of(compiled) if flops is None else flops
  state, metrics = compiled(state, data)  # warm-up
  jax.block_until_ready(metrics)
  window = machine.Steal()
  times, t0 = [], time.perf_counter()
  while time.perf_counter() - t0 < seconds or len(times) < 3:
    t = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  jax.block_until_ready(state)
  steal_pct = window.percent()
  steps = len(times)
  steps_per_s = steps / sum(times)
  best_steps_per_s = 1.0 / min(times)
  achieved = flops * steps_per_s
  return dict(fields, steps=steps, steps_per_s=steps_per_s,
              samples_per_s=steps_per_s * fields['batch'], gflops_per_step=flops / 1e9,
              achieved_gflops=achieved / 1e9, peak_gflops=peak / 1e9,
              fraction_of_peak=achieved / peak, best_steps_per_s=best_steps_per_s,
              best_fraction_of_peak=flops * best_steps_per_s / peak,
              load_average=os.getloadavg()[0], steal_pct=steal_pct, loss=float(metrics['loss']))


def bench_dopamine(num_actions: int, batch: int, seconds: float, peak: float) -> dict:
  """Dopamine's C51 `train` step (dopamine_c51.make_step) on one device, as Dopamine runs it."""
  step, state, make_batch = dopamine_c51.make_step(num_actions, batch)
  device = jax.local_devices()[0]
  state, data = jax.device_put((state, make_batch()), device)
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state.online_params))
  t = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t
  return timed_row(compiled, state, data, seconds, peak, config='dopamine_c51', batch=batch,
                   dtype='float32', params_m=num_params / 1e6, compile_s=compile_s,
                   num_actions=num_actions, baseline=True)


def bench_learner(name: str, batch: int | None, bf16: bool, seconds: float,
                  sets: Sequence[str] = ()) -> dict:
  """Learner.step() (host batch checks, device_put, metrics fetch) with its runner's NaN check
  and metric windows (`runner.LearnerRunner`, as in the learner process) on host batches."""
  from scaled_ql import loggers
  from scaled_ql.agents.runner import LearnerRunner
  cfg = bench_config(name, batch, bf16, sets)
  host_batch = random_frame_windows(cfg)
  learner = LearnerRunner(learner_lib.Learner(cfg, iter(lambda: host_batch, None)),
                          logger=loggers.MultiLogger([]))
  learner.step()  # compile
  times, t0 = [], time.perf_counter()
  while time.perf_counter() - t0 < seconds or len(times) < 3:
    t = time.perf_counter()
    learner.step()
    times.append(time.perf_counter() - t)
  learner.close()
  return dict(steps_per_s=len(times) / sum(times), best_steps_per_s=1.0 / min(times))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--configs', default='cpu_tiny,cpu_small',
                 help='comma-separated config names (e.g. atari6_suboptimal_resnet34)')
  p.add_argument('--batch', type=int, default=None,
                 help="override the batch size (default: the config's)")
  p.add_argument('--bf16', action='store_true', help='bfloat16 compute (params stay fp32)')
  p.add_argument('--seconds', type=float, default=10.0, help='timed seconds per config')
  p.add_argument('--peak-sizes', default=None,
                 help='comma-separated matmul sizes; the best FLOP/s over them is the peak '
                 '(default 1024,2048,4096 on CPU, 8192 on GPU)')
  p.add_argument('--peak-gflops', type=float, default=None,
                 help='use this peak instead of measuring it (e.g. one measured on a quiet machine)')
  p.add_argument('--peak-seconds', type=float, default=10.0,
                 help='time spent measuring the matmul peak (its fastest run counts)')
  p.add_argument('--learner', action='store_true',
                 help='also time the whole Learner.step() on the same (host) batch')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='a config override for every config (e.g. train.packed_state=true)')
  p.add_argument('--json', default=None, help='append one JSON line per config to this file')
  p.add_argument('--dopamine', action=argparse.BooleanOptionalAction, default=True,
                 help="time Dopamine's JAX C51 step after our configs, as the baseline")
  p.add_argument('--dopamine-actions', type=int, default=18,
                 help="the baseline's number of actions (18: the full ALE set, the largest head)")
  p.add_argument('--dopamine-batch', type=int, default=dopamine_c51.BATCH_SIZE,
                 help="the baseline's batch (default: c51.gin's 32)")
  args = p.parse_args(argv)

  platform = jax.devices()[0].platform
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  window = machine.Steal()
  if args.peak_gflops:
    peak, how = args.peak_gflops * 1e9, 'given'
  else:
    sizes = [int(x) for x in (args.peak_sizes or ('8192' if platform == 'gpu'
                                                   else '1024,2048,4096')).split(',')]
    peaks = {n: matmul_peak(dtype, n, seconds=args.peak_seconds / len(sizes)) for n in sizes}
    best = max(peaks, key=peaks.get)
    peak = peaks[best] * len(jax.local_devices())
    how = f'best of {jnp.dtype(dtype).name} [n,n]@[n,n], n in {sizes}: n={best}'
  print(f'devices: {len(jax.local_devices())} x {jax.devices()[0].device_kind} ({platform}); '
        f'matmul peak {peak / 1e9:.1f} GFLOP/s ({how}); cpus {os.cpu_count()}; '
        f'{machine.context(window)}', flush=True)
  rows = []
  for name in args.configs.split(','):
    row = bench(name.strip(), args.batch, args.bf16, args.seconds, peak, args.set)
    print(row_line(row), flush=True)
    if args.learner:
      lrow = bench_learner(name.strip(), args.batch, args.bf16, args.seconds, args.set)
      row.update(learner_steps_per_s=lrow['steps_per_s'],
                 learner_best_steps_per_s=lrow['best_steps_per_s'])
      print(f"{'  Learner.step()':<40} {lrow['steps_per_s']:8.2f} steps/s | best step "
            f"{lrow['best_steps_per_s']:.2f} steps/s", flush=True)
    rows.append(row)
  if args.dopamine:
    base = bench_dopamine(args.dopamine_actions, args.dopamine_batch, args.seconds, peak)
    print(row_line(base) + f" | {base['num_actions']} actions (baseline)", flush=True)
    for row in rows:
      row.update(dopamine_flops_ratio=row['achieved_gflops'] / base['achieved_gflops'],
                 dopamine_best_flops_ratio=row['best_fraction_of_peak']
                 / base['best_fraction_of_peak'])
      print(f"  {row['config']:<38} FLOP/s / Dopamine C51's: {row['dopamine_flops_ratio']:.2f}x "
            f"(best steps: {row['dopamine_best_flops_ratio']:.2f}x)", flush=True)
    rows.append(base)
  if args.json:
    with open(args.json, 'a', encoding='utf-8') as f:
      for row in rows:
        f.write(json.dumps(dict(row, device=jax.devices()[0].device_kind)) + '\n')
  return 0


def row_line(row: dict) -> str:
  return (f"{row['config']:<40} B={row['batch']:<4} {row['dtype']:<8} "
          f"{row['params_m']:7.2f}M params | {row['steps_per_s']:8.2f} steps/s | "
          f"{row['samples_per_s']:9.1f} samples/s | {row['gflops_per_step']:8.2f} GFLOP/step | "
          f"{row['achieved_gflops']:8.1f} GFLOP/s = {100 * row['fraction_of_peak']:5.1f}% of peak "
          f"| best step {row['best_steps_per_s']:.2f} steps/s = "
          f"{100 * row['best_fraction_of_peak']:5.1f}% | compile {row['compile_s']:.1f}s "
          f"| load {row['load_average']:.1f}, steal {machine.percent_text(row.get('steal_pct'))}")


if __name__ == '__main__':
  sys.exit(main())

"""Throughput of a jitted learner-like update (fwd+bwd+adam) for Q-network configs, vs matmul peak.

    .venv/bin/python benchmarks/network_step_throughput.py --networks resnet_cpu_small \
        --batch 64 --games 4

The step mimics the Scaled QL update's compute: the online network on `observation` (forward +
backward), the target network on `next_observation` (forward only), a C51 cross-entropy on the
taken action against the target's greedy distribution, a CQL logsumexp term, and an Adam update.
FLOPs are XLA's cost analysis of the compiled step; the peak is a measured f32 2048^3 matmul.
It is a sizing tool for the networks area, not the learner (see scaled_ql/agents for that).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scaled_ql import configs
from scaled_ql import games as games_lib
from scaled_ql.networks import flops_breakdown, make_q_network, param_counts


def matmul_peak_gflops(n: int = 2048, reps: int = 20) -> tuple[float, float]:
  """(best wall-clock GFLOP/s, best GFLOP per CPU-second) of an f32 n^3 matmul: shared machine."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  wall = cpu = float('inf')
  for _ in range(reps):
    t, c = time.perf_counter(), time.process_time()
    f(a, a).block_until_ready()
    wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
  return 2 * n ** 3 / wall / 1e9, 2 * n ** 3 / cpu / 1e9


def make_step(net, num_atoms: int, mask: np.ndarray):
  support = jnp.linspace(-20.0, 20.0, num_atoms)
  opt = optax.adam(2e-4, eps=3.125e-4)
  mask = jnp.asarray(mask)

  def loss_fn(params, target_params, obs, action, next_obs, game_id):
    out = net.apply(params, obs, game_id)
    target = jax.lax.stop_gradient(net.apply(target_params, next_obs, game_id).logits)
    valid = mask[game_id]
    q_next = jnp.where(valid, jnp.sum(jax.nn.softmax(target) * support, -1), -jnp.inf)
    target_probs = jax.nn.softmax(target[jnp.arange(obs.shape[0]), jnp.argmax(q_next, -1)])
    logits_a = out.logits[jnp.arange(obs.shape[0]), action]
    ce = -jnp.sum(target_probs * jax.nn.log_softmax(logits_a), -1)
    q = jnp.where(valid, jnp.sum(jax.nn.softmax(out.logits) * support, -1), -1e9)
    cql = jax.nn.logsumexp(q, -1) - q[jnp.arange(obs.shape[0]), action]
    return jnp.mean(ce + 0.05 * cql)

  @jax.jit
  def step(params, target_params, opt_state, obs, action, next_obs, game_id):
    loss, grads = jax.value_and_grad(loss_fn)(params, target_params, obs, action, next_obs,
                                              game_id)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return opt, step


def bench(net_cfg, games, batch: int, num_atoms: int, seconds: float) -> dict:
  net = make_q_network(net_cfg, games, num_atoms)
  rng = np.random.default_rng(0)
  obs = jnp.asarray(rng.integers(0, 256, (batch, 84, 84, 4), dtype=np.uint8))
  next_obs = jnp.asarray(rng.integers(0, 256, (batch, 84, 84, 4), dtype=np.uint8))
  game_id = jnp.asarray(np.arange(batch) % len(games), jnp.int32)
  counts = np.asarray(games_lib.action_counts(games))
  action = jnp.asarray(rng.integers(0, counts[np.asarray(game_id)]), jnp.int32)
  params = net.init(jax.random.PRNGKey(0), obs, game_id)
  opt, step = make_step(net, num_atoms, games_lib.action_mask(games))
  opt_state = opt.init(params)
  args = (obs, action, next_obs, game_id)
  compiled = step.lower(params, params, opt_state, *args).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  step_flops = float(analysis['flops'])
  p, s, loss = step(params, params, opt_state, *args)
  loss.block_until_ready()
  # The machine is shared: time short windows and keep the fastest (least disturbed) one, by
  # wall clock and by CPU time of this process (all its threads).
  wall = cpu = float('inf')
  t_end = time.perf_counter() + seconds
  while time.perf_counter() < t_end or wall == float('inf'):
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < 0.5 or n < 2:
      p, s, loss = step(p, params, s, *args)
      loss.block_until_ready()
      n += 1
    wall = min(wall, (time.perf_counter() - t0) / n)
    cpu = min(cpu, (time.process_time() - c0) / n)
  dt = wall
  return dict(params=param_counts(params)['total'],
              fwd_gflops=flops_breakdown(net_cfg, games, num_atoms)['total'] / 1e9,
              step_ms=dt * 1e3, steps_per_s=1 / dt, gflops_per_s=step_flops / dt / 1e9,
              step_cpu_ms=cpu * 1e3, gflops_per_cpu_s=step_flops / cpu / 1e9)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--networks', nargs='+', default=['resnet_cpu_small'],
                      help='keys of scaled_ql.configs.NETWORKS')
  parser.add_argument('--override', action='append', default=[],
                      help="NetworkConfig overrides applied to every network, e.g. "
                           "'resnet_width=64' or 'trunk_hidden_dims=(256,256,256)'")
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--games', type=int, default=4, help='first N of cpu_small + 40 games')
  parser.add_argument('--num_atoms', type=int, default=51)
  parser.add_argument('--seconds', type=float, default=5.0)
  args = parser.parse_args()
  pool = tuple(dict.fromkeys(configs.CPU_SMALL_GAMES + games_lib.TRAINING_GAMES_40))
  games = pool[:args.games]
  overrides = {}
  for item in args.override:
    key, value = item.split('=', 1)
    overrides[key] = eval(value, {})  # pylint: disable=eval-used  (a benchmark's own flags)
  peak, peak_cpu = matmul_peak_gflops()
  print(f'f32 matmul 2048^3, best of 20: {peak:.0f} GFLOP/s wall, {peak_cpu:.0f} GFLOP per '
        f'CPU-second; devices {jax.devices()}')
  print(f'{"network":<22} {"params":>10} {"fwd GFLOP/ex":>13} {"step ms":>9} {"steps/s":>8} '
        f'{"GFLOP/s":>8} {"% peak":>7} {"cpu ms":>8} {"% peak(cpu)":>11}')
  for name in args.networks:
    net_cfg = dataclasses.replace(configs.NETWORKS[name], **overrides)
    r = bench(net_cfg, games, args.batch, args.num_atoms, args.seconds)
    print(f'{name:<22} {r["params"]:>10,} {r["fwd_gflops"]:>13.4f} {r["step_ms"]:>9.1f} '
          f'{r["steps_per_s"]:>8.1f} {r["gflops_per_s"]:>8.1f} {100 * r["gflops_per_s"] / peak:>6.1f}% '
          f'{r["step_cpu_ms"]:>8.1f} {100 * r["gflops_per_cpu_s"] / peak_cpu:>10.1f}%')
  if overrides:
    print(f'overrides: {overrides}')
  peak2, peak_cpu2 = matmul_peak_gflops()
  print(f'f32 matmul again after the runs: {peak2:.0f} GFLOP/s wall, {peak_cpu2:.0f} per CPU-s')
  print('% peak(cpu) compares FLOPs per CPU-second of the step with those of the matmul: robust '
        'to other load on a shared machine; % peak is wall-clock and is not.')


if __name__ == '__main__':
  main()

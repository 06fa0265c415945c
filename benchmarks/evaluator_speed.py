"""Evaluator throughput against the bare emulator (goal: ratio >= 0.7).

    .venv/bin/python benchmarks/evaluator_speed.py [--config cpu_small] [--games Pong,Breakout]
        [--steps 4000] [--num-envs 4,16] [--env-groups 1,2] [--cpus 0] [--policy network,random]

raw:       one `AtariEnv` (same DQN preprocessing: 4-frame skip, max-pool, 84x84 resize, stack)
           stepped with uniformly random numpy actions and no network, pinned to ONE core (the
           first of --cpus): agent steps per second.
evaluator: `scaled_ql.eval.evaluator.evaluate_game` (compile excluded, as in `evaluate`) with
           policy 'network' = the config's Q-network, params from init, `actors.make_policy(cfg,
           0.001)`; or 'random' = `evaluator.uniform_random_policy` (a jitted policy without a
           network: the evaluator's own overhead). The process is pinned to --cpus (XLA sizes
           its thread pool from them).
ratio:     evaluator / raw; games alternated so that both see the same mix.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def raw_steps_per_second(game: str, steps: int, seed: int = 0) -> float:
  from scaled_ql.configs.base import EvalConfig
  from scaled_ql.eval.evaluator import make_eval_env
  env = make_eval_env(game, EvalConfig(), seed)
  rng = np.random.default_rng(seed)
  actions = rng.integers(0, env.num_actions, steps)
  env.reset()
  start = time.perf_counter()
  for a in actions:
    ts = env.step(a)
    if ts.last():
      env.reset()
  return steps / (time.perf_counter() - start)


def policy_ms_per_observation(policy, params, batch: int, calls: int = 20) -> float:
  """Wall time of one jitted policy call on a batch, per observation (network cost alone)."""
  import jax
  obs = np.random.default_rng(0).integers(0, 256, (batch, 84, 84, 4), dtype=np.uint8)
  game_id = np.zeros((batch,), np.int32)
  key = np.asarray(jax.random.PRNGKey(0))
  jax.block_until_ready(policy(params, key, obs, game_id))
  start = time.perf_counter()
  for _ in range(calls):
    jax.block_until_ready(policy(params, key, obs, game_id))
  return (time.perf_counter() - start) / calls / batch * 1e3


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='cpu_small')
  parser.add_argument('--games', default='Pong,Breakout')
  parser.add_argument('--steps', type=int, default=4000, help='agent steps per measurement')
  parser.add_argument('--num-envs', default='4,16')
  parser.add_argument('--env-groups', default='1,2')
  parser.add_argument('--policy', default='network,random')
  parser.add_argument('--cpus', default='0', help='comma-separated CPU ids for the evaluator')
  args = parser.parse_args()
  cpus = [int(c) for c in args.cpus.split(',')]
  os.sched_setaffinity(0, set(cpus))  # before JAX starts: XLA sizes its thread pool from it

  import jax

  from scaled_ql.agents import actors, builder
  from scaled_ql.configs import get_config
  from scaled_ql.eval import evaluator

  cfg = get_config(args.config)
  games = [g.strip() for g in args.games.split(',')]
  nets = builder.agent_networks(cfg)
  params = nets.q.init(jax.random.PRNGKey(0), *builder.dummy_inputs())
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  policies = {'network': actors.make_policy(cfg, cfg.eval.epsilon),
              'random': evaluator.uniform_random_policy(cfg.games)}
  print(f'config {cfg.name} ({n_params / 1e6:.2f}M params), games {games}, {args.steps} steps '
        f'per measurement, evaluator cpus {cpus}, raw cpu {cpus[0]}, jax {jax.__version__} '
        f'{jax.default_backend()}, load average {os.getloadavg()[0]:.1f}')

  def raw(game):
    os.sched_setaffinity(0, {cpus[0]})
    try:
      return raw_steps_per_second(game, args.steps)
    finally:
      os.sched_setaffinity(0, set(cpus))

  raw(games[0])  # warm the emulator/cv2 code paths
  for batch in sorted({int(n) // g for n in args.num_envs.split(',')
                       for g in map(int, args.env_groups.split(',')) if int(n) // g}):
    print(f'network alone: policy call at batch {batch:>2}: '
          f'{policy_ms_per_observation(policies["network"], params, batch):.2f} ms/observation')
  for name in args.policy.split(','):
    for num_envs in [int(n) for n in args.num_envs.split(',')]:
      for groups in [int(n) for n in args.env_groups.split(',')]:
        raws, evals = [], []
        for game in games:
          raws.append(raw(game))
          r = evaluator.evaluate_game(policies[name], params, game, cfg.games.index(game),
                                      cfg.eval, args.steps, num_envs, env_groups=groups)
          evals.append(r.steps_per_second)
        raw_sps, ev = float(np.mean(raws)), float(np.mean(evals))
        print(f'policy {name:<8} num_envs {num_envs:>3} env_groups {groups}: raw {raw_sps:6.0f} '
              f'steps/s  evaluator {ev:6.0f} steps/s  ratio {ev / raw_sps:.2f}', flush=True)


if __name__ == '__main__':
  main()

"""Evaluator throughput against the bare emulator (goal: ratio >= 0.7).

    .venv/bin/python benchmarks/evaluator_speed.py [--config cpu_small] [--games Pong,Breakout]
        [--steps 4000] [--num-envs 1,4,8] [--cpus 0]

raw:       one `AtariEnv` (same DQN preprocessing: 4-frame skip, max-pool, 84x84 resize, stack)
           stepped with uniformly random actions and no network: agent steps per second.
evaluator: `scaled_ql.eval.evaluator.evaluate_game` with the config's network (params from init,
           `actors.make_policy(cfg, 0.001)`), `num_envs` environments in lockstep, one jitted
           policy call per step: agent steps per second (compile excluded, as in `evaluate`).
ratio:     evaluator / raw, both measured in this process pinned to `--cpus` (default one core:
           '0'), games alternated so that both see the same mix.
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='cpu_small')
  parser.add_argument('--games', default='Pong,Breakout')
  parser.add_argument('--steps', type=int, default=4000, help='agent steps per measurement')
  parser.add_argument('--num-envs', default='1,4,8')
  parser.add_argument('--cpus', default='0',
                      help="comma-separated CPU ids to pin to ('' = no pinning)")
  args = parser.parse_args()
  if args.cpus:
    os.sched_setaffinity(0, {int(c) for c in args.cpus.split(',')})

  import jax

  from scaled_ql.agents import actors, builder
  from scaled_ql.configs import get_config
  from scaled_ql.eval import evaluator

  cfg = get_config(args.config)
  games = [g.strip() for g in args.games.split(',')]
  nets = builder.agent_networks(cfg)
  params = nets.q.init(jax.random.PRNGKey(0), *builder.dummy_inputs())
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  policy = actors.make_policy(cfg, cfg.eval.epsilon)
  print(f'config {cfg.name} ({n_params / 1e6:.2f}M params), games {games}, {args.steps} steps '
        f'per measurement, cpus {sorted(os.sched_getaffinity(0))}, jax {jax.__version__} '
        f'{jax.default_backend()}')
  raw_steps_per_second(games[0], 200)  # warm the emulator/cv2 code paths
  for num_envs in [int(n) for n in args.num_envs.split(',')]:
    raws, evals = [], []
    for game in games:
      raws.append(raw_steps_per_second(game, args.steps))
      r = evaluator.evaluate_game(policy, params, game, cfg.games.index(game), cfg.eval,
                                  args.steps, num_envs)
      evals.append(r.steps_per_second)
    raw, ev = float(np.mean(raws)), float(np.mean(evals))
    print(f'num_envs {num_envs:>3}: raw {raw:7.0f} steps/s  evaluator {ev:7.0f} steps/s  '
          f'ratio {ev / raw:.2f}')


if __name__ == '__main__':
  main()

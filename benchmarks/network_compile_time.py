"""Compile time and step time of the agents' `learner.update` for a config with network overrides.

    .venv/bin/python benchmarks/network_compile_time.py --config cpu_tiny
    .venv/bin/python benchmarks/network_compile_time.py --config cpu_tiny --override stem_patch=4

Used to size `resnet_cpu_tiny` (the network every area's tests compile): zero batches, 20 steps.
The update is compiled as the Learner compiles it (`learner.compile_update`, with the config's XLA
options: cpu_small's for the classic CPU runtime).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from scaled_ql.agents import learner as learner_lib
from scaled_ql.configs import get_config
from scaled_ql.types import Transition


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='cpu_tiny')
  parser.add_argument('--override', action='append', default=[],
                      help="NetworkConfig override, e.g. 'stem_patch=4' or 'resnet_stage_sizes=(1,)'")
  parser.add_argument('--steps', type=int, default=20)
  args = parser.parse_args()
  overrides = {}
  for item in args.override:
    key, value = item.split('=', 1)
    overrides[key] = eval(value, {})  # pylint: disable=eval-used  (a benchmark's own flags)
  cfg = get_config(args.config).replace(network=overrides)
  b = cfg.agent.batch_size
  t0 = time.perf_counter()
  state = learner_lib.initial_state(cfg, jax.random.PRNGKey(0))
  jax.block_until_ready(state)
  t1 = time.perf_counter()
  obs = jnp.zeros((b, 84, 84, 4), jnp.uint8)
  batch = Transition(observation=obs, action=jnp.zeros((b,), jnp.int32),
                     reward=jnp.zeros((b,)), discount=jnp.ones((b,)), next_observation=obs,
                     game_id=jnp.zeros((b,), jnp.int32))
  update = learner_lib.compile_update(state, batch, cfg)  # as the Learner compiles it
  t2 = time.perf_counter()
  state, _ = update(state, batch)
  jax.block_until_ready(state)
  t3 = time.perf_counter()
  for _ in range(args.steps):
    state, _ = update(state, batch)
  jax.block_until_ready(state)
  t4 = time.perf_counter()
  print(f'{args.config} {overrides or ""}: init {t1 - t0:.2f} s, compile update {t2 - t1:.2f} s, '
        f'step {(t4 - t3) / args.steps * 1e3:.1f} ms (batch {b})')


if __name__ == '__main__':
  main()

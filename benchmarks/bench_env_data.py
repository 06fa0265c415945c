"""Throughput of the emulator path on one core: raw ALE frames/s vs AtariEnv agent steps/s, and
the local generator's steps/s (emulator + policy + PNG encoding + TFDS writing).

    taskset -c 0 .venv/bin/python benchmarks/bench_env_data.py [--game Pong] [--steps 5000]
"""
import argparse
import tempfile
import time

import numpy as np


def raw_ale_frames_per_s(game: str, frames: int) -> float:
  from ale_py import ALEInterface, roms
  from scaled_ql import games
  ale = ALEInterface()
  ale.setInt('random_seed', 0)
  ale.setFloat('repeat_action_probability', 0.25)
  ale.loadROM(roms.get_rom_path(games.rom_id(game)))
  actions = ale.getMinimalActionSet()
  rng = np.random.default_rng(0)
  choice = rng.integers(len(actions), size=frames // 4 + 1)
  start = time.perf_counter()
  for i in range(frames):
    ale.act(actions[choice[i // 4]])
    if ale.game_over():
      ale.reset_game()
  return frames / (time.perf_counter() - start)


def env_steps_per_s(game: str, steps: int) -> float:
  from scaled_ql.envs import AtariEnv
  env = AtariEnv(game, sticky_action_prob=0.25)
  rng = np.random.default_rng(0)
  choice = rng.integers(env.num_actions, size=steps)
  env.reset()
  start = time.perf_counter()
  for i in range(steps):
    env.step(choice[i])
  return steps / (time.perf_counter() - start)


def generator_steps_per_s(game: str, steps: int) -> float:
  from scaled_ql.datasets import generate
  with tempfile.TemporaryDirectory() as d:
    start = time.perf_counter()
    generate.generate([game], d, num_checkpoints=2, steps_per_checkpoint=steps // 2,
                      progress=False)
    return steps / (time.perf_counter() - start)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--game', default='Pong')
  p.add_argument('--steps', type=int, default=5000)
  a = p.parse_args()
  print(f'{a.game}: raw ALE          {raw_ale_frames_per_s(a.game, 4 * a.steps):8.0f} frames/s')
  print(f'{a.game}: AtariEnv         {env_steps_per_s(a.game, a.steps):8.0f} agent steps/s '
        f'(4 frames each)')
  print(f'{a.game}: data generate    {generator_steps_per_s(a.game, a.steps):8.0f} agent steps/s '
        f'(incl. policy, PNG, TFDS write, TF start-up excluded)')


if __name__ == '__main__':
  main()

"""Throughput of the emulator path on one core: raw ALE frames/s vs AtariEnv agent steps/s, and
the local generator's steps/s (emulator + policy + PNG encoding + TFDS writing), and reading the
result back with rlds_reader (steps decoded per second).

Rates are given per second of this process's CPU time (time.process_time) as well as wall time:
on a shared, loaded machine the CPU-time rate is what one free core would do.

    taskset -c 0 .venv/bin/python benchmarks/bench_env_data.py [--game Pong] [--steps 5000]
"""
import argparse
import tempfile
import time

import numpy as np


class _Timer:
  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.wall
    self.cpu = time.process_time() - self.cpu


def _rates(n, t):
  return n / t.wall, n / t.cpu


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
  with _Timer() as t:
    for i in range(frames):
      ale.act(actions[choice[i // 4]])
      if ale.game_over():
        ale.reset_game()
  return _rates(frames, t)


def env_steps_per_s(game: str, steps: int) -> float:
  from scaled_ql.envs import AtariEnv
  env = AtariEnv(game, sticky_action_prob=0.25)
  rng = np.random.default_rng(0)
  choice = rng.integers(env.num_actions, size=steps)
  env.reset()
  with _Timer() as t:
    for i in range(steps):
      env.step(choice[i])
  return _rates(steps, t)


def generator_and_reader_steps_per_s(game: str, steps: int):
  """(generator rates, reader rates): write `steps` steps, then read + decode them back."""
  from scaled_ql.datasets import generate, rlds_reader
  with tempfile.TemporaryDirectory() as d:
    generate.generate([game], d, num_checkpoints=1, steps_per_checkpoint=100,
                      progress=False)  # warm-up: TF/TFDS imports and first-use costs
  with tempfile.TemporaryDirectory() as d:
    with _Timer() as t:
      generate.generate([game], d, num_checkpoints=2, steps_per_checkpoint=steps // 2,
                        progress=False)
    read = 0
    with _Timer() as r:
      for episode in rlds_reader.episodes(d, game, 1, 'near_optimal'):
        for batch in episode['steps'].batch(256).as_numpy_iterator():
          read += len(batch['action'])
  return _rates(steps, t), _rates(read, r)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--game', default='Pong')
  p.add_argument('--steps', type=int, default=5000)
  a = p.parse_args()
  import os
  print(f'load average {os.getloadavg()[0]:.1f}; rates as wall / CPU-time')
  w, c = raw_ale_frames_per_s(a.game, 4 * a.steps)
  print(f'{a.game}: raw ALE        {w:8.0f} / {c:8.0f} frames/s')
  w, c = env_steps_per_s(a.game, a.steps)
  print(f'{a.game}: AtariEnv       {w:8.0f} / {c:8.0f} agent steps/s (x4 frames: '
        f'{4 * w:.0f} / {4 * c:.0f} frames/s)')
  (w, c), (rw, rc) = generator_and_reader_steps_per_s(a.game, a.steps)
  print(f'{a.game}: data generate  {w:8.0f} / {c:8.0f} agent steps/s (policy, PNG, TFDS write; '
        f'imports excluded)')
  print(f'{a.game}: rlds_reader    {rw:8.0f} / {rc:8.0f} steps/s (read + PNG decode, batched)')


if __name__ == '__main__':
  main()

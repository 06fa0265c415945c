"""Scripted behaviour policies for the local data generator (`generate.py`).

The real DQN-Replay data was logged by a DQN agent whose quality rises over training. Locally we
imitate that with an epsilon-greedy mix of a simple game-aware heuristic and uniform random actions,
epsilon falling across the "checkpoints" (splits). The heuristics read the emulator RAM (addresses
as annotated by AtariARI, Anand et al. 2019) and pick actions by name from the minimal action set:

- Pong:     move the paddle towards the ball's height.
- Breakout: FIRE to serve, then keep the paddle under the ball.
- Freeway:  always press UP.
- Boxing:   walk towards the opponent, 12 px below its RAM y, and punch when close.

Every other game has NO heuristic: its policy is uniformly random at every epsilon (so its splits
do not improve). This is recorded as `policy: 'none (uniform random)'` in the generation
metadata and in `BUILD_NOTES.md, data section`.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np

from scaled_ql.envs.atari import AtariEnv

# A heuristic maps the environment (for its RAM and action names) to an action index.
Heuristic = Callable[[AtariEnv], int]


@functools.lru_cache(maxsize=None)
def _action_indices(game: str) -> dict[str, int]:
  """{action name: index in the minimal action set} (the set is fixed per game)."""
  env = AtariEnv(game, sticky_action_prob=0.0)
  return {a.name: i for i, a in enumerate(env.ale.getMinimalActionSet())}


def pong(env: AtariEnv) -> int:
  ram = env.ale.getRAM()
  paddle_y, ball_y = int(ram[51]), int(ram[54])
  if ball_y == 0:  # ball not in play
    return 0  # NOOP
  centre = paddle_y + 6
  if centre > ball_y + 3:
    return 2  # RIGHT = paddle up in Pong
  if centre < ball_y - 3:
    return 3  # LEFT = paddle down
  return 0


def breakout(env: AtariEnv) -> int:
  ram = env.ale.getRAM()
  paddle_x, ball_x, ball_y = int(ram[72]), int(ram[99]), int(ram[101])
  if ball_y == 0:  # ball not in play: serve
    return 1  # FIRE
  centre = paddle_x + 4  # calibrated: 21 points in 600 steps at epsilon 0 (random: ~2)
  if centre < ball_x - 3:
    return 2  # RIGHT
  if centre > ball_x + 3:
    return 3  # LEFT
  return 0


def freeway(env: AtariEnv) -> int:
  del env
  return 1  # UP


def boxing(env: AtariEnv) -> int:
  ram = env.ale.getRAM()
  dx = int(ram[33]) - int(ram[32])  # opponent x - player x
  # Punches land with the player 12 px below the opponent's RAM y (calibrated: +45..+50 per
  # 2-minute bout at epsilon 0, vs ~0 when aligning at the same y).
  dy = int(ram[35]) - int(ram[34]) + 12
  vertical = 'UP' if dy < -1 else ('DOWN' if dy > 1 else '')
  horizontal = 'RIGHT' if dx > 28 else ('LEFT' if dx < -28 else '')
  close = abs(dx) <= 38 and abs(dy) <= 4
  name = vertical + horizontal + ('FIRE' if close else '')
  return _action_indices(env.game)[name or 'NOOP']


HEURISTICS: dict[str, Heuristic] = {
    'Pong': pong, 'Breakout': breakout, 'Freeway': freeway, 'Boxing': boxing,
}
NO_HEURISTIC = 'none (uniform random)'


def heuristic_name(game: str) -> str:
  """What the generator's greedy policy is for `game` (recorded in the dataset metadata)."""
  fn = HEURISTICS.get(game)
  return f'{fn.__module__}.{fn.__name__}' if fn else NO_HEURISTIC


class EpsilonGreedyHeuristic:
  """With probability `epsilon` a uniform random action, else the game's heuristic.

  Games without a heuristic act uniformly at random whatever `epsilon` is.
  """

  def __init__(self, env: AtariEnv, epsilon: float, rng: np.random.Generator):
    if not 0.0 <= epsilon <= 1.0:
      raise ValueError(f'epsilon must be in [0, 1], got {epsilon}')
    self._env = env
    self._epsilon = float(epsilon)
    self._rng = rng
    self._heuristic: Optional[Heuristic] = HEURISTICS.get(env.game)

  def __call__(self) -> int:
    if self._heuristic is None or self._rng.random() < self._epsilon:
      return int(self._rng.integers(self._env.num_actions))
    return int(self._heuristic(self._env))


def epsilon_schedule(num_checkpoints: int, start: float = 1.0, end: float = 0.05) -> list[float]:
  """Epsilon of each split: geometric from `start` (checkpoint 0) to `end` (the last one).

  Geometric rather than linear, like a DQN learning curve (fast early gains): with 10 splits
  1.0, 0.72, 0.51, 0.37, 0.26, 0.19, 0.14, 0.10, 0.07, 0.05. Boxing's heuristic, for one, only
  pays off below epsilon ~0.2; a linear 1.0 -> 0.1 schedule left its near_optimal data no
  better than its suboptimal data (BUILD_NOTES.md, data section).
  """
  if num_checkpoints < 1:
    raise ValueError(f'num_checkpoints must be >= 1, got {num_checkpoints}')
  if not 0.0 < end <= start <= 1.0:
    raise ValueError(f'need 0 < end <= start <= 1, got start={start} end={end}')
  if num_checkpoints == 1:
    return [float(end)]
  return [float(x) for x in np.geomspace(start, end, num_checkpoints)]

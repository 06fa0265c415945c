"""Atari 2600 games as a `dm_env.Environment`, with the DQN preprocessing of Dopamine / DQN-Replay.

Built on ale-py's `ALEInterface` directly (no gymnasium wrapper: it is the evaluation hot loop and
gymnasium's vector env has no mode/difficulty option). What an agent sees matches the data of
DQN-Replay / RL Unplugged (Agarwal et al. 2020; Dopamine's `AtariPreprocessing`):

- grey-scale screen, max-pooled over the last two of the 4 skipped frames, resized to 84x84 with
  cv2 INTER_AREA (Dopamine's resize);
- observation = the last 4 such frames stacked on the last axis, uint8 [84, 84, 4], oldest first;
  frames before the episode start are ZEROS (Dopamine's agent state; the data path pads the same);
- actions are indices into the game's minimal action set (`games.num_actions(game)` of them);
- rewards are the raw game score differences (clipping is the learner's job);
- an episode ends with termination (discount 0) on game over only (no life-loss terminals), or with
  truncation (discount 1) after `max_episode_frames` emulator frames (108K = 30 minutes, 27K steps);
- sticky actions (Machado et al. 2018) with probability `sticky_action_prob`, ALE's own
  `repeat_action_probability`: 0.25 when collecting data, 0 at evaluation.

Like every dm_env environment, `step` after a LAST time step starts a new episode.
"""
from __future__ import annotations

import functools
from typing import Optional

import cv2
import dm_env
import numpy as np
from ale_py import ALEInterface, LoggerMode, roms
from dm_env import specs

from scaled_ql import games as games_lib

FRAME_SKIP = 4
STACK_SIZE = 4
OBSERVATION_SIZE = 84
MAX_EPISODE_FRAMES = 108_000

ALEInterface.setLoggerMode(LoggerMode.Error)  # no banner per environment


class InvalidGameSettingError(ValueError):
  """A mode/difficulty/option that the game's ROM does not support."""


@functools.lru_cache(maxsize=None)
def available_modes(game: str) -> tuple[int, ...]:
  """The game modes of `game`'s ROM, as ALE lists them (the first is its default)."""
  games_lib.check_games([game], 'game')
  ale = ALEInterface()
  ale.loadROM(roms.get_rom_path(games_lib.rom_id(game)))
  return tuple(int(m) for m in ale.getAvailableModes())


def default_mode(game: str) -> int:
  """The mode ALE plays when none is set (`mode=None`): the ROM's first available mode, as
  ALE's `RomSettings::getDefaultMode` returns it (0 for most games; Centipede 22, Pooyan 10). ale-py
  has no getter for the mode in play; tests/test_envs.py checks this against the frames."""
  return available_modes(game)[0]


def preprocess_frame(frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
  """Max-pool two grey [H, 160] screens (H = 210 in most games) and resize to uint8 [84, 84]
  (Dopamine's INTER_AREA)."""
  np.maximum(frame_a, frame_b, out=frame_a)
  return cv2.resize(frame_a, (OBSERVATION_SIZE, OBSERVATION_SIZE),
                    interpolation=cv2.INTER_AREA)


def check_max_episode_frames(max_episode_frames: int) -> None:
  """ValueError unless an episode's frame cap holds at least one agent step."""
  if max_episode_frames < FRAME_SKIP:
    raise ValueError(f'max_episode_frames must be >= {FRAME_SKIP}, got {max_episode_frames}')


class AtariEnv(dm_env.Environment):
  """One Atari game with the DQN preprocessing (see the module docstring)."""

  def __init__(self, game: str, mode: Optional[int] = None, difficulty: Optional[int] = None,
               sticky_action_prob: float = 0.25, max_episode_frames: int = MAX_EPISODE_FRAMES,
               seed: int = 0):
    games_lib.check_games([game], 'game')
    if not 0.0 <= sticky_action_prob <= 1.0:
      raise ValueError(f'sticky_action_prob must be in [0, 1], got {sticky_action_prob}')
    check_max_episode_frames(max_episode_frames)
    self._game = game
    self._max_episode_frames = int(max_episode_frames)
    self._sticky_action_prob = float(sticky_action_prob)

    ale = ALEInterface()
    # ALE's seed is a C int; fold any Python int into range deterministically.
    ale.setInt('random_seed', int(seed) % (2**31 - 1))
    ale.setFloat('repeat_action_probability', self._sticky_action_prob)
    ale.setInt('frame_skip', 1)  # we skip (and max-pool) ourselves
    ale.setInt('max_num_frames_per_episode', 0)  # we truncate ourselves (counting skipped frames)
    ale.loadROM(roms.get_rom_path(games_lib.rom_id(game)))

    # None = the ROM's default, as in Dopamine / DQN-Replay. Not every game has a mode 0
    # (BattleZone 1-3, Centipede 22/86, DemonAttack 1-7, NameThisGame 8-40, Pooyan 10-70).
    modes = [int(m) for m in ale.getAvailableModes()]
    difficulties = [int(d) for d in ale.getAvailableDifficulties()]
    if mode is not None:
      if int(mode) not in modes:
        raise InvalidGameSettingError(
            f'{game}: mode {mode} is not available; valid modes: {modes}')
      ale.setMode(int(mode))
    if difficulty is not None:
      if int(difficulty) not in difficulties:
        raise InvalidGameSettingError(
            f'{game}: difficulty {difficulty} is not available; valid difficulties: '
            f'{difficulties}')
      ale.setDifficulty(int(difficulty))
    ale.reset_game()  # mode/difficulty take effect on reset
    self._mode = None if mode is None else int(mode)
    self._difficulty = None if difficulty is None else int(difficulty)

    self._ale = ale
    self._actions = list(ale.getMinimalActionSet())
    if len(self._actions) != games_lib.num_actions(game):
      raise RuntimeError(
          f'{game}: ale-py minimal action set has {len(self._actions)} actions, '
          f'scaled_ql.games says {games_lib.num_actions(game)}')
    # The ROM's own screen size: not every game's is 210 x 160 (Carnival, Pooyan are taller).
    self._screens = np.zeros((2,) + tuple(ale.getScreenDims()), np.uint8)
    self._zero_frame = np.zeros((OBSERVATION_SIZE, OBSERVATION_SIZE), np.uint8)
    self._frames_stack = [self._zero_frame] * STACK_SIZE  # oldest first
    self._episode_frames = 0
    self._frames = 0  # all emulator frames since construction (for throughput figures)
    self._needs_reset = True

  # ---- properties -------------------------------------------------------------------------------
  @property
  def game(self) -> str:
    return self._game

  @property
  def mode(self) -> Optional[int]:
    """The mode set at construction; None = the ROM's default mode (`default_mode(game)`)."""
    return self._mode

  @property
  def difficulty(self) -> Optional[int]:
    """The difficulty set at construction; None = the ROM's default (0 for every game here)."""
    return self._difficulty

  @property
  def sticky_action_prob(self) -> float:
    return self._sticky_action_prob

  @property
  def frames(self) -> int:
    """Emulator frames run since this environment was made (4 per agent step)."""
    return self._frames

  @property
  def episode_frames(self) -> int:
    """Emulator frames of the current episode (truncated at `max_episode_frames`)."""
    return self._episode_frames

  @property
  def num_actions(self) -> int:
    return len(self._actions)

  @property
  def ale(self) -> ALEInterface:
    """The underlying emulator (e.g. for RAM-reading scripted policies); do not step it."""
    return self._ale

  # ---- dm_env API -------------------------------------------------------------------------------
  def observation_spec(self) -> specs.Array:
    return specs.Array((OBSERVATION_SIZE, OBSERVATION_SIZE, STACK_SIZE), np.uint8, 'observation')

  def action_spec(self) -> specs.DiscreteArray:
    return specs.DiscreteArray(len(self._actions), np.int32, name='action')

  def reward_spec(self) -> specs.Array:
    return specs.Array((), np.float32, 'reward')

  def discount_spec(self) -> specs.BoundedArray:
    return specs.BoundedArray((), np.float32, 0.0, 1.0, 'discount')

  def reset(self) -> dm_env.TimeStep:
    self._ale.reset_game()
    self._episode_frames = 0
    self._needs_reset = False
    # Dopamine: the first frame is the reset screen max-pooled with zeros.
    self._ale.getScreenGrayscale(self._screens[0])
    self._screens[1].fill(0)
    self._frames_stack = [self._zero_frame] * STACK_SIZE
    return dm_env.restart(self._push(preprocess_frame(self._screens[0], self._screens[1])))

  def step(self, action) -> dm_env.TimeStep:
    if self._needs_reset:
      return self.reset()
    a = int(action)
    if not 0 <= a < len(self._actions):
      raise ValueError(f'{self._game}: action {a} out of range [0, {len(self._actions)})')
    ale_action = self._actions[a]
    reward = 0.0
    game_over = False
    for t in range(FRAME_SKIP):
      reward += self._ale.act(ale_action)
      self._episode_frames += 1
      self._frames += 1
      if self._ale.game_over():
        game_over = True
        break
      if t >= FRAME_SKIP - 2:
        self._ale.getScreenGrayscale(self._screens[t - (FRAME_SKIP - 2)])
    # On game over mid-skip Dopamine pools whatever the buffers hold; so do we (same data).
    observation = self._push(preprocess_frame(self._screens[0], self._screens[1]))
    if game_over:
      self._needs_reset = True
      return dm_env.termination(np.float32(reward), observation)
    if self._episode_frames >= self._max_episode_frames:
      self._needs_reset = True
      return dm_env.truncation(np.float32(reward), observation, np.float32(1.0))
    return dm_env.transition(np.float32(reward), observation, np.float32(1.0))

  def close(self) -> None:
    self._ale = None  # type: ignore[assignment]

  # ---- helpers ----------------------------------------------------------------------------------
  def _push(self, frame: np.ndarray) -> np.ndarray:
    """Appends the newest frame; returns a fresh uint8 [84, 84, 4] stack (oldest first)."""
    self._frames_stack.pop(0)
    self._frames_stack.append(frame)  # cv2.resize returns a new array: safe to keep
    return np.stack(self._frames_stack, axis=-1)


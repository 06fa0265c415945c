"""AtariEnv: the DQN preprocessing and the settings evaluation and data collection rely on."""
import dm_env
import numpy as np
import pytest

from scaled_ql import games
from scaled_ql.envs import AtariEnv, InvalidGameSettingError


def _play(env, actions):
  ts = env.reset()
  out = [ts]
  for a in actions:
    out.append(env.step(a))
  return out


def test_specs_and_action_count_is_minimal_set():
  for game in ('Pong', 'Breakout', 'Freeway', 'Boxing'):
    env = AtariEnv(game, sticky_action_prob=0.0)
    assert env.action_spec().num_values == games.num_actions(game) == env.num_actions
    assert env.observation_spec().shape == (84, 84, 4)
    assert env.observation_spec().dtype == np.uint8
    assert env.game == game


def test_reset_stack_is_zero_padded_and_shifts():
  env = AtariEnv('Breakout', sticky_action_prob=0.0)
  ts = env.reset()
  assert ts.first() and ts.observation.dtype == np.uint8
  assert ts.observation.shape == (84, 84, 4)
  assert not ts.observation[..., :3].any()  # frames before the start are zeros
  assert ts.observation[..., 3].any()
  ts1 = env.step(0)
  assert not ts1.observation[..., :2].any()
  np.testing.assert_array_equal(ts1.observation[..., 2], ts.observation[..., 3])
  assert ts1.observation[..., 3].any()
  assert ts1.discount == 1.0 and ts1.reward == 0.0
  assert env.frames == 4 and env.episode_frames == 4


def test_sticky_actions_setting():
  # With p=1 ALE repeats the previous action forever (NOOP at reset): RIGHT never moves the paddle.
  right = [2] * 30  # Breakout minimal set: NOOP, FIRE, RIGHT, LEFT
  noop = [0] * 30
  never = _play(AtariEnv('Breakout', sticky_action_prob=1.0), right)[-1].observation
  still = _play(AtariEnv('Breakout', sticky_action_prob=0.0), noop)[-1].observation
  moved = _play(AtariEnv('Breakout', sticky_action_prob=0.0), right)[-1].observation
  np.testing.assert_array_equal(never, still)
  assert (moved != still).any()
  assert AtariEnv('Pong', sticky_action_prob=0.0).ale.getFloat('repeat_action_probability') == 0.0


def test_seeding_sticky_randomness():
  rng = np.random.default_rng(0)
  actions = rng.integers(0, 4, size=200)
  a = [t.observation for t in _play(AtariEnv('Breakout', seed=3), actions)]
  b = [t.observation for t in _play(AtariEnv('Breakout', seed=3), actions)]
  c = [t.observation for t in _play(AtariEnv('Breakout', seed=4), actions)]
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert (np.stack(a) != np.stack(c)).any()


def test_max_frames_truncation_then_auto_reset():
  env = AtariEnv('Pong', sticky_action_prob=0.0, max_episode_frames=40)
  ts = env.reset()
  steps = 0
  while not ts.last():
    ts = env.step(0)
    steps += 1
  assert steps == 10 and env.episode_frames == 40
  assert ts.step_type == dm_env.StepType.LAST and ts.discount == 1.0  # truncation
  assert env.step(0).first()  # dm_env: step after LAST starts a new episode
  assert env.episode_frames == 0


def test_game_over_is_termination_with_zero_discount():
  env = AtariEnv('Breakout', sticky_action_prob=0.0, seed=0)
  rng = np.random.default_rng(0)
  ts = env.reset()
  lives_seen = {env.ale.lives()}
  for _ in range(5000):
    ts = env.step(rng.integers(4))
    lives_seen.add(env.ale.lives())
    if ts.last():
      break
  assert ts.last() and ts.discount == 0.0
  assert len(lives_seen) > 2  # lost lives did not end the episode


@pytest.mark.parametrize('game,mode', [('Breakout', 12), ('Freeway', 1), ('Hero', 1)])
def test_modes_of_the_paper_work(game, mode):
  env = AtariEnv(game, mode=mode, sticky_action_prob=0.0)
  assert env.mode == mode
  ts = env.reset()
  for _ in range(5):
    ts = env.step(0)
  assert ts.observation.shape == (84, 84, 4)


def test_mode_changes_the_game():
  # Freeway mode 1 has different traffic than the default mode.
  default = _play(AtariEnv('Freeway', sticky_action_prob=0.0), [0] * 40)[-1].observation
  mode1 = _play(AtariEnv('Freeway', mode=1, sticky_action_prob=0.0), [0] * 40)[-1].observation
  assert (default != mode1).any()


def test_invalid_settings_raise_clear_errors():
  with pytest.raises(InvalidGameSettingError, match=r'Breakout: mode 3 .*valid modes: \[0, 4'):
    AtariEnv('Breakout', mode=3)
  with pytest.raises(InvalidGameSettingError, match=r'Pong: difficulty 7 .*valid difficulties'):
    AtariEnv('Pong', difficulty=7)
  with pytest.raises(games.UnknownGameError, match='Pongg'):
    AtariEnv('Pongg')
  with pytest.raises(ValueError, match='sticky_action_prob'):
    AtariEnv('Pong', sticky_action_prob=1.5)
  env = AtariEnv('Pong')
  env.reset()
  with pytest.raises(ValueError, match='action 6 out of range'):
    env.step(6)


def test_games_without_mode_zero_use_rom_default():
  env = AtariEnv('BattleZone')  # modes 1..3: the ROM default is used
  assert env.mode is None
  assert env.reset().observation.shape == (84, 84, 4)


@pytest.mark.parametrize('game, first, second', [
    ('Breakout', 0, 4), ('Centipede', 22, 86), ('BattleZone', 1, 2), ('DemonAttack', 1, 3),
    ('NameThisGame', 8, 24), ('Pooyan', 10, 30)])
def test_the_default_mode_is_the_roms_first_mode(game, first, second):
  """`atari.default_mode` (ale-py has no getter for the mode in play): leaving the mode unset
  plays the same frames as setting the ROM's first mode, not those of its second."""
  from scaled_ql.envs import atari
  assert atari.default_mode(game) == first
  rng = np.random.default_rng(0)
  actions = [int(a) for a in rng.integers(games.num_actions(game), size=300)]

  def frames(mode):
    env = AtariEnv(game, mode=mode, sticky_action_prob=0.0)
    return np.stack([ts.observation for ts in _play(env, actions)])
  unset = frames(None)
  assert np.array_equal(unset, frames(first))
  assert not np.array_equal(unset, frames(second))


def test_every_game_resets_and_steps():
  # Not every ROM's screen is 210 x 160 (Carnival: 214 rows, Pooyan: 220): AtariEnv takes the
  # size from the ROM, so all 46 games of RL Unplugged give [84, 84, 4] observations.
  for game in games.ALL_GAMES:
    env = AtariEnv(game, sticky_action_prob=0.0)
    ts = env.reset()
    for _ in range(3):
      ts = env.step(0)
    assert ts.observation.shape == (84, 84, 4), game
    assert ts.observation[..., -1].any(), f'{game}: blank frame'

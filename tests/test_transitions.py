"""Episode -> n-step Transitions at episode start, terminal end and truncated end."""
import numpy as np
import pytest

from scaled_ql.datasets import transitions as tr


def make_steps(num_steps, rewards, terminal, actions=None, frame_offset=10):
  """RLDS-style steps: frame i is filled with the value frame_offset + i."""
  obs = np.stack([np.full((84, 84, 1), frame_offset + i, np.uint8) for i in range(num_steps)])
  is_last = np.zeros(num_steps, bool)
  is_last[-1] = True
  is_first = np.zeros(num_steps, bool)
  is_first[0] = True
  return dict(
      observation=obs,
      action=np.arange(num_steps, dtype=np.int64) % 3 if actions is None else actions,
      reward=np.asarray(rewards, np.float32),
      discount=np.ones(num_steps, np.float32),
      is_first=is_first, is_last=is_last, is_terminal=is_last & terminal)


def stack_of(frame_values):
  """[84,84,4] stack whose channel c is the constant frame_values[c] (None = zero padding)."""
  return np.stack([np.full((84, 84), 0 if v is None else v, np.uint8) for v in frame_values],
                  axis=-1)


def naive_transition(steps, t, n, gamma, clip):
  """The definition, one transition at a time, written independently of the module."""
  last = len(steps['action']) - 1
  frame = lambda i: steps['observation'][i, :, :, 0] if i >= 0 else np.zeros((84, 84), np.uint8)
  k_steps = min(n, last - t)
  ret = sum(gamma ** k * np.clip(steps['reward'][t + k], -clip, clip) for k in range(k_steps))
  terminated = bool(steps['is_terminal'][t + k_steps])
  return dict(
      observation=np.stack([frame(i) for i in range(t - 3, t + 1)], -1),
      action=steps['action'][t], reward=ret,
      discount=0.0 if terminated else gamma ** k_steps,
      next_observation=np.stack([frame(i) for i in range(t + k_steps - 3, t + k_steps + 1)], -1))


def assert_matches_naive(out, steps, n, gamma, clip):
  num = len(steps['action']) - 1
  assert out.observation.shape == (num, 84, 84, 4) and out.observation.dtype == np.uint8
  assert out.next_observation.shape == (num, 84, 84, 4)
  assert out.reward.dtype == np.float32 and out.discount.dtype == np.float32
  assert out.action.dtype == np.int32 and out.game_id.dtype == np.int32
  for t in range(num):
    want = naive_transition(steps, t, n, gamma, clip)
    np.testing.assert_array_equal(out.observation[t], want['observation'], err_msg=f't={t}')
    np.testing.assert_array_equal(out.next_observation[t], want['next_observation'],
                                  err_msg=f't={t}')
    assert out.action[t] == want['action']
    np.testing.assert_allclose(out.reward[t], want['reward'], rtol=1e-6, err_msg=f't={t}')
    np.testing.assert_allclose(out.discount[t], want['discount'], rtol=1e-6, err_msg=f't={t}')


REWARDS = [2.0, -0.5, 0.0, 3.0, 1.0, 7.0, -4.0, 0.25]


def test_terminal_end_hand_built():
  steps = make_steps(6, REWARDS[:6], terminal=True)  # steps 0..5, step 5 terminal
  out = tr.episode_transitions(steps, n=3, gamma=0.9, clip=1.0, game_id=1)
  assert len(out.action) == 5
  # Episode start: frames before step 0 are zeros.
  np.testing.assert_array_equal(out.observation[0], stack_of([None, None, None, 10]))
  np.testing.assert_array_equal(out.observation[1], stack_of([None, None, 10, 11]))
  np.testing.assert_array_equal(out.next_observation[0], stack_of([10, 11, 12, 13]))
  np.testing.assert_allclose(out.reward[0], 1.0 - 0.9 * 0.5 + 0.0, rtol=1e-6)  # 2.0 clipped to 1
  np.testing.assert_allclose(out.discount[0], 0.9 ** 3, rtol=1e-6)
  # t=2: K=3 reaches the terminal step 5 -> no bootstrap.
  np.testing.assert_allclose(out.reward[2], 0.0 + 0.9 * 1.0 + 0.81 * 1.0, rtol=1e-6)
  assert out.discount[2] == 0.0
  np.testing.assert_array_equal(out.next_observation[2], stack_of([12, 13, 14, 15]))
  # t=3: K = 2 steps left; t=4: K = 1; both terminate.
  np.testing.assert_allclose(out.reward[3], 1.0 + 0.9 * 1.0, rtol=1e-6)
  np.testing.assert_allclose(out.reward[4], 1.0, rtol=1e-6)
  assert out.discount[3] == 0.0 and out.discount[4] == 0.0
  np.testing.assert_array_equal(out.next_observation[4], stack_of([12, 13, 14, 15]))
  np.testing.assert_array_equal(out.game_id, 1)
  np.testing.assert_array_equal(out.action, [0, 1, 2, 0, 1])
  assert_matches_naive(out, steps, 3, 0.9, 1.0)


def test_truncated_end_bootstraps_from_last_observation():
  steps = make_steps(6, REWARDS[:6], terminal=False)
  out = tr.episode_transitions(steps, n=3, gamma=0.9, clip=1.0)
  np.testing.assert_allclose(out.discount[2], 0.9 ** 3, rtol=1e-6)
  np.testing.assert_allclose(out.discount[3], 0.9 ** 2, rtol=1e-6)
  np.testing.assert_allclose(out.discount[4], 0.9, rtol=1e-6)
  np.testing.assert_array_equal(out.next_observation[3], stack_of([12, 13, 14, 15]))
  np.testing.assert_array_equal(out.next_observation[4], stack_of([12, 13, 14, 15]))
  assert_matches_naive(out, steps, 3, 0.9, 1.0)


@pytest.mark.parametrize('num_steps', [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize('n', [1, 3, 5])
@pytest.mark.parametrize('terminal', [True, False])
def test_matches_definition_for_all_lengths(num_steps, n, terminal):
  rewards = (REWARDS * 2)[:num_steps]
  steps = make_steps(num_steps, rewards, terminal)
  out = tr.episode_transitions(steps, n=n, gamma=0.99, clip=1.0)
  assert len(out.action) == num_steps - 1
  if num_steps > 1:
    assert_matches_naive(out, steps, n, 0.99, 1.0)


def test_reward_clip_value_is_used():
  steps = make_steps(3, [5.0, -5.0, 0.0], terminal=True)
  out = tr.episode_transitions(steps, n=1, gamma=0.5, clip=2.0)
  np.testing.assert_allclose(out.reward, [2.0, -2.0])
  np.testing.assert_allclose(out.discount, [0.5, 0.0])


def test_record_stream_counts_and_padding():
  steps = make_steps(5, REWARDS[:5], terminal=True)
  stream = list(tr.padded_step_records(tr.split_steps(steps), n_step=3))
  assert len(stream) == 3 + 5 + 2  # L + n + 3 with L = 4
  assert sum(end for _, end in stream) == 4  # one window per step but the last
  assert [bool(r.valid) for r, _ in stream] == [False] * 3 + [True] * 5 + [False] * 2
  assert all(not r.frame.any() for r, _ in stream if not r.valid)
  # A step at a time (an actor's adder): step s ends the window of transition s - 3, so the
  # first item ends with the 4th step; `end` comes after the last step only, and once.
  one_by_one = tr.RecordStream(n_step=3)
  pushed = [one_by_one.push(step) for step in tr.split_steps(steps)]
  assert [[end for _, end in p] for p in pushed] == [[False] * 4, [False], [False], [True],
                                                     [True]]
  assert [end for _, end in one_by_one.end()] == [True, True]
  with pytest.raises(ValueError, match='ended already'):
    one_by_one.end()
  unfinished = tr.RecordStream(n_step=3)
  unfinished.push(next(iter(tr.split_steps(steps))))
  with pytest.raises(ValueError, match='without an is_last'):
    unfinished.end()


def test_bad_episodes_raise():
  steps = make_steps(4, REWARDS[:4], terminal=True)
  no_last = dict(steps, is_last=np.zeros(4, bool), is_terminal=np.zeros(4, bool))
  # Bad data raise MalformedEpisodeError (the inserter skips and counts those: test_reverb.py).
  with pytest.raises(tr.MalformedEpisodeError, match='without an is_last'):
    tr.episode_transitions(no_last, 3, 0.99, 1.0)
  mid_terminal = dict(steps, is_terminal=np.array([False, True, False, True]))
  with pytest.raises(tr.MalformedEpisodeError, match='terminal but not last'):
    tr.episode_transitions(mid_terminal, 3, 0.99, 1.0)
  with pytest.raises(tr.MalformedEpisodeError, match='observation must be uint8'):
    tr.episode_transitions(dict(steps, observation=steps['observation'][:, :80]), 3, 0.99, 1.0)
  late_first = dict(steps, is_first=np.array([False, True, False, False]))
  with pytest.raises(tr.MalformedEpisodeError, match='does not start with an is_first'):
    tr.episode_transitions(late_first, 3, 0.99, 1.0)
  nan_reward = dict(steps, reward=np.array([0.0, np.nan, 1.0, 0.0], np.float32))
  with pytest.raises(tr.MalformedEpisodeError, match='step 1 has reward nan'):
    tr.episode_transitions(nan_reward, 3, 0.99, 1.0)
  # With the game's action set (the inserter passes it), an action outside it raises: the
  # learner's one-hot select would read it as Q = 0.
  actions = dict(steps, action=np.array([0, 2, 3, 1]))
  assert sum(end for _, end in tr.padded_step_records(tr.split_steps(actions), 3,
                                                      num_actions=4)) == 3
  with pytest.raises(tr.MalformedEpisodeError, match="step 2 has action 3, outside the game's 3"):
    list(tr.padded_step_records(tr.split_steps(actions), 3, num_actions=3))
  with pytest.raises(tr.MalformedEpisodeError, match='action -1'):
    list(tr.padded_step_records(tr.split_steps(dict(steps, action=-np.ones(4, int))), 3,
                                num_actions=3))
  with pytest.raises(ValueError, match='lacks'):
    tr.episode_transitions({k: v for k, v in steps.items() if k != 'reward'}, 3, 0.99, 1.0)
  with pytest.raises(ValueError, match='n_step'):
    tr.episode_transitions(steps, 0, 0.99, 1.0)


def test_window_checks():
  windows = tr.episode_windows(tr.split_steps(make_steps(4, REWARDS[:4], True)), 3)
  assert windows.frame.shape == (3, 7, 84, 84)
  bad = windows._replace(valid=np.zeros_like(windows.valid))
  with pytest.raises(ValueError, match='padding'):
    tr.windows_to_transitions(bad, 0, discount=0.99, reward_clip=1.0)
  with pytest.raises(ValueError, match='action'):
    tr.windows_to_transitions(windows._replace(action=windows.action[:, :3]), 0, discount=0.99,
                              reward_clip=1.0)


def _episode_frame_windows(n=3, per_item=1):
  """Windows of two episodes (terminal and truncated ends), with distinct random frames."""
  rng = np.random.default_rng(0)
  out = []
  for terminal, length in ((True, 7), (False, 5)):
    steps = make_steps(length, REWARDS[:length], terminal)
    steps['observation'] = rng.integers(0, 256, steps['observation'].shape, dtype=np.uint8)
    windows = tr.episode_windows(tr.split_steps(steps), n, per_item)
    out.append(tr.windows_to_frame_windows(windows, 1, discount=0.9, reward_clip=1.0,
                                           per_item=per_item))
  return tr.FrameWindows(*(np.concatenate(x) for x in zip(*out)))


@pytest.mark.parametrize('per_item', [2, 3, 4])
@pytest.mark.parametrize('num_steps', [2, 3, 5, 8, 9])
@pytest.mark.parametrize('terminal', [True, False])
def test_items_of_several_transitions_equal_single_windows(per_item, num_steps, terminal):
  """An item of P consecutive transitions gives exactly the reference's transitions t0..t0+P-1;
  past the episode's last transition, the item repeats it."""
  rng = np.random.default_rng(num_steps)
  steps = make_steps(num_steps, (REWARDS * 2)[:num_steps], terminal)
  steps['observation'] = rng.integers(0, 256, steps['observation'].shape, dtype=np.uint8)
  want = tr.episode_transitions(steps, 3, 0.9, 1.0)
  stream = list(tr.padded_step_records(tr.split_steps(steps), 3, per_item))
  assert len(stream) == 3 + num_steps + 2 + per_item - 1  # per_item - 1 more padding records
  windows = tr.episode_windows(tr.split_steps(steps), 3, per_item)
  items = -(-(num_steps - 1) // per_item)
  assert windows.frame.shape == (items, 3 + 3 + per_item, 84, 84)
  got = tr.windows_to_transitions(windows, 0, discount=0.9, reward_clip=1.0, per_item=per_item)
  index = np.minimum(np.arange(items * per_item), num_steps - 2)
  for name, g, w in zip(tr.Transition._fields, got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w)[index], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize('per_item', [1, 2, 4])
def test_device_stacking_equals_numpy_reference(per_item):
  import jax
  windows = _episode_frame_windows(per_item=per_item)
  assert set(windows.next_start.tolist()) == {1, 2, 3}  # episode ends are in the batch
  want = tr.stack_frame_windows(windows)
  for got in (windows.to_transition(), jax.jit(tr.FrameWindows.to_transition)(windows)):
    for name, g, w in zip(tr.Transition._fields, got, want):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


@pytest.mark.parametrize('per_item', [1, 2, 4])
def test_split_frame_windows_gives_the_transitions_in_order(per_item):
  """`FrameWindows.split(k)` (data.batches_per_fetch): k batches whose transitions are the
  whole's, in order; a split that would cut an item is refused."""
  windows = _episode_frame_windows(per_item=per_item)
  windows = tr.FrameWindows(*(np.concatenate([x] * 4) for x in windows))  # 4 x the items
  want = tr.stack_frame_windows(windows)
  parts = windows.split(4)
  assert len(parts) == 4 and sum(len(p.action) for p in parts) == len(windows.action)
  got = [tr.stack_frame_windows(p) for p in parts]
  for i, name in enumerate(tr.Transition._fields):
    np.testing.assert_array_equal(np.concatenate([g[i] for g in got]), want[i], err_msg=name)
  assert parts[1].frames.base is not None  # views, not copies
  bad = next(k for k in range(2, 100) if len(windows.frames) % k)
  with pytest.raises(ValueError, match=f'cannot be split into {bad} batches'):
    windows.split(bad)


# P = 1 (the paper configs') on a real episode; items of P = 4 (cpu_small's) are checked on
# random windows by tests/test_learner.py (test_update_from_windows_equals_the_update_on_...).
@pytest.mark.parametrize('per_item', [1])
def test_learner_step_on_frame_windows_equals_step_on_transitions(per_item):
  from scaled_ql import configs
  from scaled_ql.agents.learner import Learner
  windows = _episode_frame_windows(per_item=per_item)
  cfg = configs.get_config('cpu_tiny').replace(
      agent=dict(games_per_batch=1, transitions_per_game=len(windows.action)),
      data=dict(transitions_per_item=per_item))
  transitions = tr.stack_frame_windows(windows)
  metrics = [Learner(cfg, iter([batch])).step()
             for batch in (windows, transitions)]
  assert metrics[0].keys() == metrics[1].keys()
  for k in metrics[0]:
    np.testing.assert_allclose(metrics[0][k], metrics[1][k], rtol=1e-5, err_msg=k)


def test_pack_unpack_records_round_trip():
  steps = make_steps(5, REWARDS[:5], terminal=True)
  records = [r for r, _ in tr.padded_step_records(tr.split_steps(steps), n_step=3)]
  packed = np.stack([tr.pack_record(r) for r in records])
  assert packed.shape == (len(records), tr.RECORD_BYTES) and packed.dtype == np.uint8
  got, want = tr.unpack_records(packed[None]), tr.stack_records(records)
  for name in tr.StepRecords._fields:
    np.testing.assert_array_equal(getattr(got, name)[0], getattr(want, name), err_msg=name)
    assert getattr(got, name).dtype == getattr(tr.record_dtypes(), name), name
  with pytest.raises(ValueError, match='packed records'):
    tr.unpack_records(packed[:, :-1])

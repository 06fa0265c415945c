"""The local generator: real emulator episodes written in the real RL Unplugged TFDS layout."""
import dataclasses
import json
import logging
import os
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import TINY_CHECKPOINTS, TINY_GAMES, TINY_STEPS_PER_CHECKPOINT
from scaled_ql.datasets import generate, policies, tfds_layout
from scaled_ql.envs import AtariEnv


def _version_dir(data_dir, game):
  return os.path.join(data_dir, 'rlu_atari_checkpoints_ordered', f'{game}_run_1', '1.1.0')


def test_layout_is_the_registered_builders(tiny_dataset_dir):
  registered = tfds.builder_cls('rlu_atari_checkpoints_ordered')
  for game in TINY_GAMES:
    d = _version_dir(tiny_dataset_dir, game)
    names = sorted(os.listdir(d))
    assert names == sorted(
        ['dataset_info.json', 'features.json', 'generation_info.json'] +
        [f'rlu_atari_checkpoints_ordered-checkpoint_{k:02d}.tfrecord-00000-of-00001'
         for k in range(TINY_CHECKPOINTS)])
    with open(os.path.join(d, 'dataset_info.json')) as f:
      info = json.load(f)
    assert info['name'] == 'rlu_atari_checkpoints_ordered'
    assert info['configName'] == f'{game}_run_1'
    assert info['version'] == str(registered.VERSION) == '1.1.0'
    assert info['moduleName'] == registered.__module__
    assert info['disableShuffling'] is True
    b = tfds.builder('rlu_atari_checkpoints_ordered', config=f'{game}_run_1',
                     data_dir=tiny_dataset_dir)
    assert sorted(b.info.splits.keys()) == ['checkpoint_00', 'checkpoint_01']
    # Same feature spec as the registered RL Unplugged builder (atari_utils.features_dict()).
    from tensorflow_datasets.rl_unplugged import atari_utils
    assert b.info.features.to_json() == atari_utils.features_dict().to_json()


def test_episodes_replay_exactly_in_the_emulator(tiny_dataset_dir):
  """Stored frames are the env's newest frames: replaying the stored actions reproduces them."""
  b = tfds.builder('rlu_atari_checkpoints_ordered', config='Breakout_run_1',
                   data_dir=tiny_dataset_dir)
  with open(os.path.join(_version_dir(tiny_dataset_dir, 'Breakout'), 'generation_info.json')) as f:
    gen = json.load(f)
  split_info = gen['splits']['checkpoint_01']
  episodes = list(tfds.as_numpy(b.as_dataset(split='checkpoint_01')))
  assert len(episodes) == split_info['episodes'] >= 2
  total_actions, ends = 0, []
  env = AtariEnv('Breakout', sticky_action_prob=0.25, seed=split_info['env_seed'],
                 max_episode_frames=gen['max_episode_frames'])
  for i, ep in enumerate(episodes):
    steps = {k: np.stack([s[k] for s in ep['steps']]) for k in ep['steps'].element_spec}
    n = len(steps['action']) - 1  # the last step holds only the final observation
    total_actions += n
    ends.append((bool(steps['is_terminal'][-1]), n))
    assert ep['checkpoint_id'] == 1 and ep['episode_id'] == i
    assert steps['is_first'].tolist() == [True] + [False] * n
    assert steps['is_last'].tolist() == [False] * n + [True]
    assert not steps['is_terminal'][:-1].any()
    assert np.all(np.abs(steps['reward']) <= 1.0)
    assert ep['episode_return'] == pytest.approx(steps['reward'].sum())
    if steps['is_terminal'][-1]:
      assert steps['discount'][-2:].tolist() == [0.0, 0.0] and (steps['discount'][:-2] == 1).all()
    else:
      assert (steps['discount'] == 1).all()
    ts = env.reset()
    np.testing.assert_array_equal(ts.observation[..., -1], steps['observation'][0, ..., 0])
    for t in range(n):
      ts = env.step(steps['action'][t])
      np.testing.assert_array_equal(ts.observation[..., -1], steps['observation'][t + 1, ..., 0])
      assert np.clip(ts.reward, -1, 1) == steps['reward'][t]
    assert bool(ts.last() and ts.discount == 0) == bool(steps['is_terminal'][-1])
  # Whole episodes: the budget is a minimum, the last episode is played to its end (game over or
  # the frame cap), so a split holds at least the budget and less than one episode more.
  assert total_actions == split_info['steps'] == sum(split_info['episode_steps'])
  last = split_info['episode_steps'][-1]
  assert TINY_STEPS_PER_CHECKPOINT <= total_actions < TINY_STEPS_PER_CHECKPOINT + last
  max_steps = gen['max_episode_frames'] // 4
  assert [n for _, n in ends] == split_info['episode_steps']
  assert all(terminal or n == max_steps for terminal, n in ends)  # game over or the frame cap


def test_generation_info_records_policy_and_epsilon(tiny_dataset_dir):
  with open(os.path.join(_version_dir(tiny_dataset_dir, 'Pong'), 'generation_info.json')) as f:
    gen = json.load(f)
  assert gen['policy'] == 'scaled_ql.datasets.policies.pong'
  assert gen['sticky_action_prob'] == 0.25
  assert gen['skill_schedule'] == dataclasses.asdict(policies.SkillSchedule())
  splits = [gen['splits'][f'checkpoint_{k:02d}'] for k in range(TINY_CHECKPOINTS)]
  assert [s['expert_fraction'] for s in splits] == [0.4, 0.9]
  for s in splits:
    assert len(s['episode_epsilons']) == len(s['raw_returns']) == s['episodes'] >= 1
    assert all(0.05 <= e <= 1.0 for e in s['episode_epsilons'])
    assert s['epsilon'] == pytest.approx(np.mean(s['episode_epsilons']))
    assert s['steps'] >= TINY_STEPS_PER_CHECKPOINT
    assert s['episode_script_probs'] == [1.0] * s['episodes']  # 'noisy': the script only
  assert gen['flawed_policy'] is None


def test_game_without_heuristic_and_episode_budget(tmp_path):
  out = generate.generate(['Alien'], str(tmp_path), num_checkpoints=1, steps_per_checkpoint=None,
                          episodes_per_checkpoint=2, max_episode_frames=200, progress=False)
  with open(os.path.join(out['Alien'], 'generation_info.json')) as f:
    gen = json.load(f)
  assert gen['policy'] == policies.NO_HEURISTIC == 'none (uniform random)'
  assert 'uniform random' in gen['policy_note']
  assert gen['splits']['checkpoint_00']['episodes'] == 2
  assert gen['splits']['checkpoint_00']['steps'] == 100  # 2 truncated episodes of 50 steps
  with pytest.raises(FileExistsError, match='Alien.*already exists.*--overwrite'):
    generate.generate(['Alien'], str(tmp_path), num_checkpoints=1, steps_per_checkpoint=10,
                      progress=False)
  # 'skip' keeps a game only if it was generated with the settings asked for: here a step budget
  # is asked of data written with an episode budget, and nothing is touched.
  with pytest.raises(ValueError, match=r'Alien: .*other settings.*steps_per_checkpoint: kept '
                                       r'None, asked 10.*episodes_per_checkpoint: kept 2, asked '
                                       r'None.*--overwrite'):
    generate.generate(['Alien'], str(tmp_path), num_checkpoints=1, steps_per_checkpoint=10,
                      if_exists='skip', progress=False)
  with pytest.raises(ValueError, match=r"Alien: .*skill_schedule: kept .*'weak': 'noisy'.*"
                                       r"asked .*'weak': 'flawed'"):
    generate.generate(['Alien'], str(tmp_path), num_checkpoints=1, steps_per_checkpoint=None,
                      episodes_per_checkpoint=2, max_episode_frames=200, if_exists='skip',
                      skill=policies.SkillSchedule(weak='flawed'), progress=False)
  assert generate.generate(['Alien'], str(tmp_path), num_checkpoints=1, steps_per_checkpoint=None,
                           episodes_per_checkpoint=2, max_episode_frames=200, if_exists='skip',
                           progress=False) == out


def test_bad_generate_arguments_fail_fast(tmp_path):
  with pytest.raises(ValueError, match='Pongg'):
    generate.generate(['Pongg'], str(tmp_path))
  with pytest.raises(ValueError, match='run must be in 1..5'):
    generate.generate(['Pong'], str(tmp_path), run=7)
  with pytest.raises(ValueError, match='num_checkpoints'):
    generate.generate(['Pong'], str(tmp_path), num_checkpoints=0)
  with pytest.raises(ValueError, match='workers must be >= 1'):
    generate.generate(['Pong'], str(tmp_path), workers=0)
  assert not os.listdir(tmp_path)  # nothing written


def test_default_workers_follow_cores_and_memory(monkeypatch):
  cores = len(os.sched_getaffinity(0))
  monkeypatch.setattr(generate, '_available_memory_bytes', lambda: 64 << 30)
  assert generate.default_workers() == min(cores, 64)
  monkeypatch.setattr(generate, '_available_memory_bytes', lambda: 1 << 29)  # 0.5 GB
  assert generate.default_workers() == 1


def test_processes_write_what_one_process_writes(tmp_path):
  """workers=2 (spawned processes, one game each) writes the same episodes and behaviour stats as
  workers=1, returns the games in their order, and raises a worker's error in the caller."""
  games = ['Pong', 'Alien']
  kw = dict(num_checkpoints=2, steps_per_checkpoint=30, max_episode_frames=400, progress=False)
  one = generate.generate(games, str(tmp_path / 'one'), workers=1, **kw)
  two = generate.generate(games, str(tmp_path / 'two'), workers=2, **kw)
  assert list(two) == games
  for game in games:
    infos = []
    for out in (one, two):
      with open(os.path.join(out[game], 'generation_info.json')) as f:
        info = json.load(f)
      infos.append({k: v for k, v in info.items() if k not in ('seconds', 'steps_per_second')})
      records = sorted(n for n in os.listdir(out[game]) if '.tfrecord' in n)
      assert records
      infos[-1]['records'] = [open(os.path.join(out[game], n), 'rb').read() for n in records]
    assert infos[0] == infos[1], game
    assert sum(s['steps'] for s in infos[1]['splits'].values()) >= 60
  with pytest.raises(FileExistsError, match='already exists'):
    generate.generate(games, str(tmp_path / 'two'), workers=2, **kw)


def test_cli_generate_bad_game_is_a_clear_error(tmp_path, capsys):
  from scaled_ql import cli
  rc = cli.main(['data', 'generate', '--games', 'Pong,Pongg', '--out', str(tmp_path)])
  assert rc == 2
  assert 'Pongg' in capsys.readouterr().err


def test_cli_inspect(tiny_dataset_dir, capsys):
  from scaled_ql import cli
  assert cli.main(['data', 'inspect', '--data-dir', tiny_dataset_dir]) == 0
  out = capsys.readouterr().out
  assert 'Breakout run 1' in out and 'Pong run 1' in out and 'checkpoint_01' in out
  with open(os.path.join(_version_dir(tiny_dataset_dir, 'Pong'), 'generation_info.json')) as f:
    sub = json.load(f)['behaviour']['selections']['suboptimal']
  pong = out[out.index('Pong run 1'):].splitlines()
  line = next(l for l in pong if l.strip().startswith('suboptimal'))
  assert f'{sub["score"]:.2f}' in line and f'{100 * sub["normalized"]:.1f}%' in line
  assert 'human-normalized IQM' in out and 'near_optimal' in out and 'best_split' in out
  assert cli.main(['data', 'inspect', '--data-dir', tiny_dataset_dir, '--games', 'Boxing']) == 2
  assert 'configs present' in capsys.readouterr().err


def test_quality_rises_across_splits_and_stats_are_reported(tmp_path):
  """A tiny real run: the late splits score more than the first, and generation_info.json holds
  each split's and each selection's behaviour score over its (whole) episodes."""
  from scaled_ql.eval import normalization
  out = generate.generate(['RoadRunner'], str(tmp_path), num_checkpoints=3,
                          steps_per_checkpoint=None, episodes_per_checkpoint=5,
                          max_episode_frames=1200, progress=False)
  with open(os.path.join(out['RoadRunner'], 'generation_info.json')) as f:
    gen = json.load(f)
  splits = [gen['splits'][f'checkpoint_{k:02d}'] for k in range(3)]
  scores = [np.mean(s['raw_returns']) for s in splits]
  assert scores[0] < scores[1] < scores[2] and scores[2] > scores[0] + 300, scores
  beh = gen['behaviour']
  for k, s in enumerate(splits):
    rec = beh['splits'][f'checkpoint_{k:02d}']
    assert rec['episodes'] == 5 and rec['score'] == pytest.approx(np.mean(s['raw_returns']), abs=1e-3)
    assert rec['normalized'] == pytest.approx(
        normalization.human_normalized('RoadRunner', rec['score']), abs=1e-4)
  sub = beh['selections']['suboptimal']  # the first 20% of 3 splits: checkpoint_00
  assert sub['splits'] == ['checkpoint_00'] and sub['episodes'] == 5
  assert beh['selections']['near_optimal']['episodes'] == 15
  rand = [r for s in splits for r, e in zip(s['raw_returns'], s['episode_epsilons']) if e == 1.0]
  assert beh['selections']['epsilon_1']['episodes'] == len(rand) >= 2  # checkpoint 0's non-late
  assert beh['selections']['epsilon_1']['score'] == pytest.approx(np.mean(rand), abs=1e-3)
  best = beh['selections']['best_split']
  assert best['score'] == pytest.approx(max(scores), abs=1e-3)
  best_median = np.median(splits[int(best['splits'][0][-2:])]['raw_returns'])
  assert sub['at_or_above_best_median'] == pytest.approx(
      np.mean(np.asarray(splits[0]['raw_returns']) >= best_median), abs=1e-4)


def test_behaviour_counts_completed_episodes_only():
  """Splits from the older generator (no episode_steps) had their last episode cut by the step
  budget: it is left out unless every episode ended by game over."""
  old = {'checkpoint_00': dict(checkpoint_id=0, raw_returns=[10.0, 20.0, 3.0], episodes=3,
                               terminated_episodes=2),
         'checkpoint_01': dict(checkpoint_id=1, raw_returns=[30.0], episodes=1,
                               terminated_episodes=1)}
  beh = generate.behaviour('Breakout', old)
  assert beh['splits']['checkpoint_00']['episodes'] == 2
  assert beh['splits']['checkpoint_00']['score'] == 15.0
  assert beh['selections']['best_split']['splits'] == ['checkpoint_01']
  assert beh['selections']['suboptimal']['at_or_above_best_median'] == 0.0
  new = {'checkpoint_00': dict(checkpoint_id=0, raw_returns=[10.0, 20.0, 3.0], episodes=3,
                               terminated_episodes=2, episode_steps=[5, 5, 5])}
  assert generate.behaviour('Breakout', new)['splits']['checkpoint_00']['episodes'] == 3


def _play(game, epsilon, steps, seed=0):
  """(returns of the episodes completed within `steps`, the running return of the last one)."""
  env = AtariEnv(game, sticky_action_prob=0.25, seed=seed)
  policy = policies.EpsilonGreedyHeuristic(env, epsilon, np.random.default_rng(seed))
  env.reset()
  returns, running = [], 0.0
  for _ in range(steps):
    ts = env.step(policy())
    running += ts.reward
    if ts.last():
      returns.append(running)
      running = 0.0
      env.reset()
  return returns, running


# Every scripted game, on the real emulator with sticky actions: the heuristic (epsilon 0) beats
# uniform random play (epsilon 1) by `margin` raw points. 'prefix': the return of the first
# `steps` steps of one episode (long-episode games); 'episodes': the mean return of the episodes
# completed within `steps` (short-episode games whose random play restarts often).
@pytest.mark.parametrize('game,steps,metric,margin', [
    ('Freeway', 400, 'prefix', 2), ('Breakout', 400, 'prefix', 4), ('Boxing', 600, 'prefix', 5),
    ('Pong', 900, 'prefix', 5), ('RoadRunner', 300, 'prefix', 500),
    ('SpaceInvaders', 1500, 'episodes', 50), ('Seaquest', 1500, 'episodes', 40),
    ('Qbert', 1500, 'episodes', 100), ('Centipede', 1500, 'episodes', 500),
    ('BeamRider', 1000, 'prefix', 100), ('Atlantis', 1500, 'prefix', 5000)])
def test_heuristics_beat_random(game, steps, metric, margin):
  assert game in policies.HEURISTICS

  def score(epsilon):
    returns, running = _play(game, epsilon, steps)
    if metric == 'prefix':
      return returns[0] if returns else running
    assert returns, (game, epsilon, running)  # at least one episode completed
    return float(np.mean(returns))
  assert score(0.0) >= score(1.0) + margin


def test_at_least_eight_scripted_games():
  assert len(policies.HEURISTICS) >= 8
  assert set(policies.HEURISTICS) >= {'Pong', 'Breakout', 'SpaceInvaders', 'Seaquest', 'Qbert'}


def test_skill_schedule_is_a_mixture_rising_across_checkpoints():
  sched = policies.SkillSchedule()
  assert sched.epsilon(0.0) == 1.0 and sched.epsilon(1.0) == pytest.approx(0.05)
  rng = np.random.default_rng(0)
  draws = [np.array([sched.sample_skill(rng, k, 10) for _ in range(4000)]) for k in range(10)]
  means = [d.mean() for d in draws]
  assert np.all(np.diff(means) > 0)  # quality rises across the splits
  for k, d in enumerate(draws):
    assert d.mean() == pytest.approx(sched.mean_skill(k, 10), abs=0.03)
    # A mixture: late-policy episodes (skill 1) in every split, the share rising.
    assert (d == 1.0).mean() == pytest.approx(sched.expert_fraction(k, 10), abs=0.03)
  assert (draws[0] == 1.0).mean() > 0.3 and (draws[0] == 0.0).mean() == pytest.approx(0.6, abs=0.03)
  # Stratified: any 5 successive episodes of checkpoint 0 hold 1 to 3 late-policy ones (40% of
  # 5) whatever the start, and in the long run the same mixture. The first episodes of
  # checkpoints 0 and 1 (the suboptimal selection of a small dataset) hold one for 84% of the
  # starts (iid draws: 67%).
  with_late = []
  for start in np.linspace(0, 1, 100, endpoint=False):
    gen = sched.split_skills(start, 0, 10)
    skills = np.array([next(gen) for _ in range(500)])
    assert all(1 <= (skills[i:i + 5] == 1.0).sum() <= 3 for i in range(0, 50, 5))
    assert (skills == 1.0).mean() == pytest.approx(0.4, abs=0.01)
    assert skills[skills < 1].max() <= sched.progress(0, 10) + 1e-9
    with_late.append(1.0 in [next(sched.split_skills(start, k, 10)) for k in (0, 1)])
  assert np.mean(with_late) == pytest.approx(0.84, abs=0.015)
  with pytest.raises(ValueError, match='expert_start <= expert_end'):
    policies.SkillSchedule(expert_start=0.9, expert_end=0.5)
  with pytest.raises(ValueError, match='checkpoint 10'):
    sched.sample_skill(rng, 10, 10)


def test_flawed_schedule_is_consistent_weaker_policies():
  sched = policies.SkillSchedule(weak='flawed')
  for u in (0.0, 0.3, 1.0):  # one low epsilon; the skill sets the script's share instead
    assert sched.epsilon(u) == 0.05 and sched.script_prob(u) == u
  assert policies.SkillSchedule().script_prob(0.0) == 1.0  # 'noisy': the script only
  assert set(policies.FLAWED) == set(policies.HEURISTICS)
  with pytest.raises(ValueError, match="weak must be one of .*'mirrored'"):
    policies.SkillSchedule(weak='mirrored')
  # The CLI flag takes the schedule's values and refuses others.
  from scaled_ql import cli
  argv = ['data', 'generate', '--games', 'Breakout', '--out', 'unused', '--weak-episodes']
  for weak in policies.WEAK_EPISODES:
    assert cli.build_parser().parse_args(argv + [weak]).weak_episodes == weak
  with pytest.raises(SystemExit):
    cli.build_parser().parse_args(argv + ['mirrored'])


@pytest.mark.parametrize('game', ['Boxing', 'SpaceInvaders', 'Seaquest', 'Centipede', 'BeamRider',
                                  'Atlantis'])
@pytest.mark.parametrize('script_prob,expected', [(0.0, 'flawed'), (1.0, 'script')])
def test_flawed_policy_plays_the_flawed_script_at_skill_0(game, script_prob, expected):
  # At epsilon 0 the policy's action is exactly the flawed script's (skill 0) or the script's
  # (skill 1). In these games the flawed script holds FIRE back and moves as the script does, so
  # both play in the same states and the data holds both actions there
  # (docs/data_generation.md): the two differ by FIRE alone, and in some states.
  env = AtariEnv(game, sticky_action_prob=0.0, seed=3)
  policy = policies.EpsilonGreedyHeuristic(env, 0.0, np.random.default_rng(0), flawed=True)
  policy.set_episode(0.0, script_prob)
  flawed, script = policies.make_flawed(game), policies.make_heuristic(game)
  names = policies._action_names(game)
  env.reset()
  differ = 0
  for _ in range(300):
    want = {'flawed': flawed(env), 'script': script(env)}  # stateful scripts: one call per step
    if want['flawed'] != want['script']:
      differ += 1
      # The script's action less its FIRE, or NOOP where the game lacks that move (Atlantis).
      held = names[want['script']].replace('FIRE', '')
      assert names[want['flawed']] == (held if held in names else 'NOOP')
      assert 'FIRE' in names[want['script']]
    assert 'FIRE' not in names[want['flawed']]
    a = policy()
    assert a == want[expected]
    env.step(a)
  assert differ > 10
  noisy = policies.EpsilonGreedyHeuristic(env, 0.0, np.random.default_rng(0))
  with pytest.raises(ValueError, match='needs flawed=True'):
    noisy.set_episode(0.0, 0.5)


def test_flawed_generation_records_the_flawed_policy(tmp_path, capsys):
  from scaled_ql import cli
  assert cli.main(['data', 'generate', '--games', 'Breakout', '--out', str(tmp_path),
                   '--checkpoints', '2', '--episodes-per-checkpoint', '3',
                   '--max-episode-frames', '400', '--weak-episodes', 'flawed', '--workers', '1',
                   '--no-progress']) == 0
  with open(os.path.join(_version_dir(str(tmp_path), 'Breakout'), 'generation_info.json')) as f:
    gen = json.load(f)
  assert gen['skill_schedule']['weak'] == 'flawed'
  assert gen['flawed_policy'] == policies.flawed_name('Breakout') and 'dead zone' in gen[
      'flawed_policy']
  for s in gen['splits'].values():
    assert s['episode_epsilons'] == [0.05] * 3
    # late-policy episodes take the script only; the others mix in the flawed script
    assert all(0.0 <= p <= 1.0 for p in s['episode_script_probs'])
  probs = [p for s in gen['splits'].values() for p in s['episode_script_probs']]
  assert 1.0 in probs and min(probs) < 1.0
  assert cli.main(['data', 'inspect', '--data-dir', str(tmp_path)]) == 0
  assert 'weak episodes: flawed (breakout with a 16-px dead zone' in capsys.readouterr().out


def _write_dopamine_ckpt(d, ckpt, obs, action, reward, terminal, add_count=None):
  import gzip
  os.makedirs(d, exist_ok=True)
  arrays = dict(observation=obs, action=action, reward=reward, terminal=terminal)
  for k, v in arrays.items():
    with gzip.open(os.path.join(d, f'$store$_{k}_ckpt.{ckpt}.gz'), 'wb') as f:
      np.save(f, v)
  if add_count is not None:
    with gzip.open(os.path.join(d, f'add_count_ckpt.{ckpt}.gz'), 'wb') as f:
      np.save(f, np.array(add_count))


def test_convert_dopamine_replay_files(tmp_path, caplog, capsys):
  """A tiny synthetic DQN-Replay set: Dopamine's zero padding, terminals, a wrapped buffer."""
  from scaled_ql.datasets import dopamine_convert, rlds_reader
  rng = np.random.default_rng(0)
  d = str(tmp_path / 'dqn' / 'Pong' / '1' / 'replay_logs')

  def frames(n):
    return rng.integers(1, 255, size=(n, 84, 84), dtype=np.uint8)

  pad = lambda n: (np.zeros((n, 84, 84), np.uint8), np.zeros(n, np.int32),
                   np.zeros(n, np.float32), np.zeros(n, np.uint8))
  # ckpt 0 (not wrapped): [3 pad] ep A (5 entries, terminal) [3 pad] ep B (4 entries, unfinished)
  p_o, p_a, p_r, p_t = pad(3)
  a_o, b_o = frames(5), frames(4)
  obs = np.concatenate([p_o, a_o, p_o, b_o])
  action = np.concatenate([p_a, [1, 2, 3, 4, 5], p_a, [5, 4, 3, 2]]).astype(np.int32)
  reward = np.concatenate([p_r, [0, 1, 0, -1, 1], p_r, [0, 0, 1, 0]]).astype(np.float32)
  terminal = np.concatenate([p_t, [0, 0, 0, 0, 1], p_t, [0, 0, 0, 0]]).astype(np.uint8)
  _write_dopamine_ckpt(d, 0, obs, action, reward, terminal, add_count=len(action))
  # ckpt 1: the same time-ordered content stored rotated by 4 in a wrapped circular buffer.
  n = len(action)
  roll = lambda v: np.roll(v, 4, axis=0)
  _write_dopamine_ckpt(d, 1, roll(obs), roll(action), roll(reward), roll(terminal),
                       add_count=3 * n + 4)

  out = str(tmp_path / 'tfds')
  dopamine_convert.convert(str(tmp_path / 'dqn'), 'Pong', 1, out)
  for c in (0, 1):
    eps = list(rlds_reader.episodes(out, 'Pong', 1, f'checkpoints:{c}-{c}', shuffle_files=False))
    assert len(eps) == 2
    a = {k: v.numpy() for k, v in next(iter(eps[0]['steps'].batch(100))).items()}
    np.testing.assert_array_equal(a['observation'][:5, ..., 0], a_o)
    assert a['action'].tolist() == [1, 2, 3, 4, 5, 0]
    assert a['reward'].tolist() == [0, 1, 0, -1, 1, 0]
    assert a['is_terminal'].tolist() == [False] * 5 + [True]
    assert a['discount'].tolist() == [1, 1, 1, 1, 0, 0]
    assert float(eps[0]['episode_return']) == 1.0
    b = {k: v.numpy() for k, v in next(iter(eps[1]['steps'].batch(100))).items()}
    np.testing.assert_array_equal(b['observation'][..., 0], b_o)  # truncated: 3 actions + final
    assert b['action'].tolist() == [5, 4, 3, 0] and not b['is_terminal'].any()
    assert b['is_last'].tolist() == [False, False, False, True]
  # Converted data records no game scores (Dopamine stores rewards clipped): no behaviour score,
  # as for downloaded DQN-Replay (before: a KeyError in `report run` and the demo).
  from scaled_ql.configs.base import DataConfig
  assert generate.selection_score(DataConfig(data_dir=out, selection='near_optimal'),
                                  'Pong') == (None, 0)
  # Part of a run: 'suboptimal' counts the splits converted, and the converter says so.
  with caplog.at_level(logging.WARNING, logger=dopamine_convert.__name__):
    dopamine_convert.convert(str(tmp_path / 'dqn'), 'Pong', 1, str(tmp_path / 'part'),
                             checkpoints=(1, 1))
  assert ("the selection 'suboptimal' (the first 20% of the splits present) will read "
          "checkpoints 1, not the run's first 20% (0)") in caplog.text
  with pytest.raises(FileNotFoundError, match=r'Pong run 2: no replay_logs.*runs present.*\'1\''):
    dopamine_convert.convert(str(tmp_path / 'dqn'), 'Pong', 2, out)
  with pytest.raises(FileNotFoundError, match=r'replay checkpoints \[2\] not found'):
    dopamine_convert.convert(str(tmp_path / 'dqn'), 'Pong', 1, out, checkpoints=(1, 2))
  # Without its add_count file a checkpoint is incomplete (a wrapped buffer cannot be put in
  # order; before, it was converted in storage order, its newest episode joined to its oldest).
  bare = tmp_path / 'bare' / 'Pong' / '1' / 'replay_logs'
  _write_dopamine_ckpt(str(bare), 0, obs, action, reward, terminal)
  with pytest.raises(FileNotFoundError, match=r'no complete .*_ckpt\.N\.gz \+ '
                                              r'add_count_ckpt\.N\.gz set in .*bare'):
    dopamine_convert.convert(str(tmp_path / 'bare'), 'Pong', 1, str(tmp_path / 'bare_out'))
  with open(bare / 'add_count_ckpt.0.gz', 'wb') as f:  # a damaged file is named
    f.write(b'not gzip')
  with pytest.raises(ValueError, match=r'add_count_ckpt\.0\.gz: not a gzipped \.npy array'):
    dopamine_convert.convert(str(tmp_path / 'bare'), 'Pong', 1, str(tmp_path / 'bare_out'))
  with pytest.raises(FileExistsError, match='already exists') as e:
    dopamine_convert.convert(str(tmp_path / 'dqn'), 'Pong', 1, out)
  assert '--skip-existing' not in str(e.value)  # a flag the converter does not have
  # The command checks every game's replay files, and --checkpoints, before converting any.
  from scaled_ql import cli
  new = tmp_path / 'new'
  for argv, message in ((['--games', 'Pong,Breakout'], 'Breakout run 1: no replay_logs dir'),
                        (['--games', 'Pong', '--checkpoints', '0..1'],
                         "--checkpoints '0..1': expected A-B"),
                        (['--games', 'Pong', '--checkpoints', '1-0'],
                         '--checkpoints 1-0: expected A-B with 0 <= A <= B')):
    assert cli.main(['data', 'convert-dopamine', '--dopamine-dir', str(tmp_path / 'dqn'),
                     '--out', str(new)] + argv) == 2
    assert message in capsys.readouterr().err
    assert not new.exists()
  # ... and every game's output: Breakout's exists (without --overwrite), so not even Pong, the
  # first game, is converted (a game of real data takes hours).
  shutil.copytree(tmp_path / 'dqn' / 'Pong', tmp_path / 'dqn' / 'Breakout')
  breakout = os.fspath(generate.builder_for('Breakout', 1, str(new),
                                            tfds_layout.ORDERED_BUILDER).data_path)
  os.makedirs(breakout)
  assert cli.main(['data', 'convert-dopamine', '--dopamine-dir', str(tmp_path / 'dqn'),
                   '--out', str(new), '--games', 'Pong,Breakout']) == 2
  err = capsys.readouterr().err
  assert f'Breakout: {breakout} already exists; pass --overwrite' in err
  assert '--skip-existing' not in err
  assert not os.path.exists(generate.builder_for('Pong', 1, str(new),
                                                 tfds_layout.ORDERED_BUILDER).data_path)


def test_generating_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch):
  # TFDS asks its GCS bucket for the info of a builder not prepared yet, in a `mkdtemp('tfds')`
  # folder it never removes: generation must not leave one per game behind.
  tmp = tmp_path / 'tmp'
  tmp.mkdir()
  monkeypatch.setenv('TMPDIR', str(tmp))
  monkeypatch.setattr(tempfile, 'tempdir', None)  # gettempdir() reads TMPDIR again
  generate.generate(['Pong'], str(tmp_path / 'data'), num_checkpoints=1, steps_per_checkpoint=20,
                    workers=1, progress=False)
  assert tempfile.gettempdir() == str(tmp)
  assert os.listdir(tmp) == []

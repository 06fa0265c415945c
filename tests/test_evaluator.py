"""The evaluator on the real emulator (tiny budgets), its logs, and `scaled-ql eval | report run`."""
import csv
import dataclasses
import json
import os

import numpy as np
import pytest

from scaled_ql import cli
from scaled_ql.configs import get_config
from scaled_ql.configs.base import EvalConfig
from scaled_ql.eval import evaluator, normalization, report

GAMES = ('Breakout', 'Freeway', 'Enduro', 'Pong')


@pytest.fixture(scope='module')
def random_policy():
  return evaluator.uniform_random_policy(GAMES)


def test_eval_config_defaults_are_the_papers_protocol():
  cfg = EvalConfig()  # Appendix B.3 / Table B.1
  assert cfg.epsilon == 0.001
  assert cfg.sticky_action_prob == 0.0
  assert cfg.max_episode_frames == 108_000
  assert cfg.steps_per_game == 125_000
  for name in ('atari40_suboptimal_resnet101', 'atari40_nearoptimal_resnet101', 'cpu_small'):
    c = get_config(name).eval
    assert (c.epsilon, c.sticky_action_prob, c.max_episode_frames) == (0.001, 0.0, 108_000)


def noop_policy(params, rng, observation, game_id):
  """A deterministic numpy policy (action 0 everywhere): episodes can be replayed independently."""
  del params, rng, game_id
  return np.zeros(observation.shape[0], np.int32)


def play_noop_episode(game, cfg, seed):
  """(length, return, truncated) of one NOOP episode, played here without the evaluator."""
  env = evaluator.make_eval_env(game, cfg, seed)
  ts, n, ret = env.reset(), 0, 0.0
  while not ts.last():
    ts = env.step(0)
    n, ret = n + 1, ret + float(ts.reward)
  return n, ret, ts.discount > 0


def test_group_batch_sizes_are_the_group_and_the_powers_of_two_it_shrinks_to():
  """What `evaluate_games` compiles before its clock starts (and evaluator_speed --split skips)."""
  assert evaluator.group_batch_sizes(1) == {1}
  assert evaluator.group_batch_sizes(4) == {1, 2, 4}
  assert evaluator.group_batch_sizes(5) == {1, 2, 5}
  assert evaluator.group_batch_sizes(16) == {1, 2, 4, 8, 16}


def test_budget_that_ends_mid_episode_plays_it_to_its_end():
  # Pong with NOOP loses 21-0 in 764 agent steps: a budget of 30 steps ends mid-episode.
  cfg = EvalConfig()
  n, ret, cut = play_noop_episode('Pong', cfg, evaluator.env_seed(0, 'Pong', 0))
  assert n > 30 and not cut
  r = evaluator.evaluate(noop_policy, None, ['Pong'], cfg, model_games=GAMES, steps_per_game=30,
                         num_envs=1)['Pong']
  assert (r.episodes, r.truncated, r.steps, r.budget) == (1, 0, n, 30)  # finished, not dropped
  assert r.score == ret == -21.0
  assert r.normalized == pytest.approx((ret - (-20.7)) / (14.6 - (-20.7)))
  # Three environments: each starts an episode (the budget of 10 is not spent at the start), and
  # every one is played out: no environment's episode is cut by its share of the budget.
  r3 = evaluator.evaluate(noop_policy, None, ['Pong'], cfg, model_games=GAMES, steps_per_game=10,
                          num_envs=3)['Pong']
  plays = [play_noop_episode('Pong', cfg, evaluator.env_seed(0, 'Pong', i)) for i in range(3)]
  assert (r3.episodes, r3.truncated) == (3, 0)
  assert r3.steps == sum(p[0] for p in plays)
  assert sorted(r3.episode_returns) == sorted(p[1] for p in plays)


def test_new_episodes_start_only_while_the_budget_lasts_and_frame_cap_episodes_count():
  # Breakout with NOOP never launches the ball: every episode ends at the frame cap (400 frames =
  # 100 agent steps). Such an episode is counted with its return at the cap (Dopamine's
  # max_steps_per_episode), and says so in `truncated`.
  cfg = EvalConfig(max_episode_frames=400)
  env = evaluator.make_eval_env('Breakout', cfg, seed=0)
  assert env.sticky_action_prob == 0.0
  assert play_noop_episode('Breakout', cfg, 0) == (100, 0.0, True)  # truncation, not game over
  # Budget 250 over 2 envs in lockstep: both episodes end at step 200 of the game (199, 200 < 250:
  # both restart), the next ones at 399 and 400 (>= 250: no new episode). 4 episodes, 400 steps.
  r = evaluator.evaluate(noop_policy, None, ['Breakout'], cfg, model_games=GAMES,
                         steps_per_game=250, num_envs=2)['Breakout']
  assert (r.episodes, r.truncated, r.steps, r.budget) == (4, 4, 400, 250)
  assert r.episode_returns == (0.0,) * 4 and r.score == 0.0
  assert r.normalized == pytest.approx(-1.7 / (30.5 - 1.7))  # random 1.7, human 30.5
  # A budget of exactly one episode starts no second one.
  r = evaluator.evaluate(noop_policy, None, ['Breakout'], cfg, model_games=GAMES,
                         steps_per_game=100, num_envs=1)['Breakout']
  assert (r.episodes, r.steps) == (1, 100)


def test_uniform_random_policy_scores_about_zero(random_policy):
  games = ('Breakout', 'Freeway')
  results = evaluator.evaluate(random_policy, None, games, EvalConfig(), model_games=GAMES,
                               steps_per_game=500, num_envs=2, seed=1)
  assert set(results) == set(games)
  for g, r in results.items():
    assert r.steps >= 500 and r.episodes >= 2 and r.truncated == 0
    assert abs(r.normalized) < 0.15, (g, r)
  # Freeway's episodes last 2048 steps (a timer): the two started ones are played to the end.
  assert (results['Freeway'].episodes, results['Freeway'].steps) == (2, 2 * 2048)


def test_seeding_batching_and_the_policy_device():
  import jax
  seen = []
  cpu = jax.devices('cpu')[0]

  def policy(params, rng, observation, game_id):
    # `evaluate` put the params on the policy's device (the CPU: gpus_per_evaluator = 0).
    assert isinstance(params['w'], jax.Array) and params['w'].devices() == {cpu}
    assert observation.shape[1:] == (84, 84, 4) and observation.dtype == np.uint8
    assert game_id.dtype == np.int32 and game_id.shape == observation.shape[:1]
    seen.append((observation.shape[0], np.asarray(game_id).copy(), np.asarray(rng).copy()))
    return np.zeros(observation.shape[0], np.int32)

  params = {'w': np.ones(3, np.float32)}
  # Pong capped at 200 frames = 50-step episodes, 4 envs in lockstep, budget 199: at step 50 the
  # first two envs restart (197, 198 < 199), the last two stop (199, 200). The batch then shrinks
  # from 4 to the 2 envs still playing.
  r = evaluator.evaluate(policy, params, ['Pong'], EvalConfig(max_episode_frames=200),
                         model_games=GAMES, steps_per_game=199, num_envs=4, env_groups=1)['Pong']
  assert (r.steps, r.episodes, r.truncated) == (4 * 50 + 2 * 50, 6, 6)
  # Untimed compiles of every shape the group can shrink to (4, 2, 1), then one call per step.
  assert [b for b, _, _ in seen] == [1, 2, 4] + [4] * 50 + [2] * 50
  assert all((g == GAMES.index('Pong')).all() for _, g, _ in seen)
  assert len({k.tobytes() for _, _, k in seen}) == len(seen)  # a fresh key every call
  # An accelerator the machine does not have: a clear error before any environment starts.
  if not any(d.platform == 'gpu' for d in jax.devices()):
    seen.clear()
    with pytest.raises(ValueError, match=r'gpus_per_evaluator=0.5 \(--evaluator-gpus\) puts the '
                       r'evaluator policy on a gpu, but JAX .* has no gpu device'):
      evaluator.evaluate(policy, params, ['Pong'], EvalConfig(gpus_per_evaluator=0.5),
                         model_games=GAMES, steps_per_game=10)
    assert not seen
  assert evaluator.policy_device(EvalConfig(gpus_per_evaluator=0.5), 'cpu') == cpu


def test_double_buffered_groups_play_the_same_episodes():
  import jax
  import jax.numpy as jnp

  @jax.jit
  def policy(params, rng, observation, game_id):  # deterministic: a function of the screen
    del params, rng, game_id
    return (jnp.sum(observation, axis=(1, 2, 3), dtype=jnp.int32) % 4).astype(jnp.int32)

  cfg = EvalConfig(max_episode_frames=1200)
  runs = [evaluator.evaluate_games(policy, None, [('Breakout', 0)], cfg, 600, 3,
                                   env_groups=g)['Breakout'] for g in (1, 3)]
  assert runs[0].episodes >= 3
  for r in runs[1:]:
    assert sorted(r.episode_returns) == sorted(runs[0].episode_returns)
    assert (r.steps, r.score) == (runs[0].steps, runs[0].score)


def test_games_at_once_share_each_call_and_play_the_same_episodes_as_one_by_one():
  """`games_at_once` batches several games' environments into one policy call per step; each
  game's budget, episodes and score are its own, so a deterministic policy plays exactly the
  episodes it plays game by game."""
  seen = []

  def policy(params, rng, observation, game_id):  # deterministic, per row: screen and game
    del params, rng
    seen.append(np.asarray(game_id).copy())
    return ((observation.sum(axis=(1, 2, 3), dtype=np.int64) + 7 * game_id) % 3).astype(np.int32)

  games = ['Breakout', 'Pong', 'Freeway']  # Freeway has 3 actions: % 3 keeps them valid
  cfg = EvalConfig(max_episode_frames=600)  # episodes of at most 150 agent steps
  one_by_one = evaluator.evaluate(policy, None, games, cfg, model_games=GAMES,
                                  steps_per_game=200, num_envs=2, games_at_once=1)
  assert all(len(ids) in (1, 2) and len(set(ids)) == 1 for ids in seen)  # one game per call
  seen.clear()
  together = evaluator.evaluate(policy, None, games, cfg, model_games=GAMES,
                                steps_per_game=200, num_envs=2)  # the default: all at once
  ids = [GAMES.index(g) for g in games]
  # Compiles of each shape (6 and the buckets 1, 2, 4 it may shrink to), then 6 rows per call,
  # each with its own game's id, until the first game's last episode ends.
  assert [len(s) for s in seen[:4]] == [1, 2, 4, 6]
  assert list(seen[4]) == [ids[0]] * 2 + [ids[1]] * 2 + [ids[2]] * 2
  for g in games:
    a, b = one_by_one[g], together[g]
    assert a.episodes >= 2 and a.steps >= 200, a
    assert (b.episode_returns, b.steps, b.episodes, b.truncated, b.score) == (
        a.episode_returns, a.steps, a.episodes, a.truncated, a.score), g
  # Time: each game's share of the loop's, by its steps; every game shows the loop's rate.
  rates = [r.steps_per_second for r in together.values()]
  assert max(rates) == pytest.approx(min(rates), rel=1e-9)
  assert {r.games_at_once for r in together.values()} == {3}
  assert {r.games_at_once for r in one_by_one.values()} == {1}
  assert evaluator.format_result(together['Pong']).endswith(
      f'{rates[0]:.0f} steps/s (the loop of 3 games at once)')
  assert evaluator.format_result(one_by_one['Pong']).endswith(
      f'{one_by_one["Pong"].steps_per_second:.0f} steps/s')
  steps = sum(r.steps for r in together.values())
  assert sum(r.seconds for r in together.values()) == pytest.approx(steps / rates[0], rel=1e-9)


def test_should_stop_abandons_the_game_in_progress_and_keeps_the_finished_ones(tmp_path):
  """An evaluator gives up a round of old params for the final evaluation (launch/nodes.py): the
  game in progress gets no score (a partial episode is never one), games done before keep their
  records."""
  log = str(tmp_path / 'eval.jsonl')
  cfg = EvalConfig(max_episode_frames=200)  # Pong: 50-step episodes
  asked = []

  def stop_in_breakout():  # asked once per step; Pong's 50 steps pass, then Breakout's 10th
    asked.append(1)
    return len(asked) > 50 + 10

  with pytest.raises(evaluator.Abandoned, match=r'evaluation abandoned: Breakout after 10 of '
                     r'50 agent steps$'):
    evaluator.evaluate(noop_policy, None, ['Pong', 'Breakout'], cfg, model_games=GAMES,
                       steps_per_game=50, num_envs=1, games_at_once=1, jsonl_path=log,
                       should_stop=stop_in_breakout)
  with open(log) as f:
    rows = [json.loads(line) for line in f]
  assert [(r['game'], r['episodes'], r['steps']) for r in rows] == [('Pong', 1, 50)]
  # Games played at once are abandoned together, each named with its steps; none is recorded.
  asked.clear()
  with pytest.raises(evaluator.Abandoned, match=r'evaluation abandoned: Pong after 10 of 50 '
                     r'agent steps, Breakout after 10 of 50 agent steps$'):
    evaluator.evaluate(noop_policy, None, ['Pong', 'Breakout'], cfg, model_games=GAMES,
                       steps_per_game=50, num_envs=1, jsonl_path=log,
                       should_stop=lambda: len(asked) >= 10 or asked.append(1))
  with open(log) as f:
    assert len(f.readlines()) == 1
  # Never asked to stop: the same round runs to its end.
  r = evaluator.evaluate(noop_policy, None, ['Pong'], cfg, model_games=GAMES, steps_per_game=50,
                         num_envs=1, should_stop=lambda: False)['Pong']
  assert (r.steps, r.episodes) == (50, 1)


def test_a_game_without_a_completed_episode_is_text_and_left_out_of_aggregates():
  scored = evaluator.GameResult('Pong', -20.0, 0.02, episodes=2, truncated=0, steps=1600,
                                budget=100, seconds=1.0, cpu_seconds=1.0,
                                episode_returns=(-20.0, -20.0))
  none = evaluator.GameResult('Freeway', None, None, episodes=0, truncated=0, steps=100,
                              budget=100, seconds=1.0, cpu_seconds=1.0, episode_returns=())
  line = evaluator.format_result(none)
  assert 'no completed episode' in line and 'human-normalized' not in line
  assert 'human-normalized' in evaluator.format_result(scored)
  agg = evaluator.aggregate_line({'Pong': scored, 'Freeway': none})
  assert 'IQM 2.0%' in agg and 'over 1 game(s)' in agg and 'left out (no completed episode): Freeway' in agg
  # The evaluator node's `latest` rows (dicts) are read the same way.
  assert evaluator.aggregate_line({'Freeway': {'normalized': None}}).endswith(
      'none: no game has a completed episode; left out (no completed episode): Freeway')
  assert evaluator.format_row('Freeway', dict(score=None, normalized=None, episodes=0,
                                               param_version=7)).count('no completed episode') == 1
  assert evaluator.format_row('Pong', dict(score=-13.0, normalized=0.218, episodes=2, truncated=2,
                                           param_version=7)) == (
      'Pong             raw      -13.0  human-normalized    21.8%  episodes 2 (2 cut at the '
      'frame cap)  (params of step 7)')
  # `eval --step`'s history: a dash for a step without a completed episode, the IQM over the
  # games that have one.
  table = evaluator.history_table([(100, {'Pong': scored, 'Freeway': none}),
                                   (200, {'Pong': none, 'Freeway': none})]).splitlines()
  assert table[0].split() == ['step', 'Pong', 'Freeway', 'IQM']
  assert table[1].split() == ['100', '-20.0', '(2', 'ep)', '-', '2.0%']
  assert table[2].split() == ['200', '-', '-', '-']
  # The driver's progress line: text for such a game, the mean over the others only.
  import time

  from scaled_ql.launch import program
  latest = {'Pong': dict(score=-20.0, normalized=0.02, param_version=5),
            'Freeway': dict(score=None, normalized=None, param_version=5)}
  line = program.format_progress(program.ProgramStatus(None, None, [{'latest': latest}], []),
                                 time.time())
  assert line.endswith('eval@5 mean_norm 2.0% Freeway=no-episode Pong=2%')
  line = program.format_progress(program.ProgramStatus(
      None, None, [{'latest': {'Freeway': latest['Freeway']}}], []), time.time())
  assert line.endswith('eval@5 mean_norm none Freeway=no-episode')
  # Rows of two evaluators' rounds, of different params: both steps (it said eval@5 of both).
  older = dict(latest['Pong'], param_version=3)
  line = program.format_progress(program.ProgramStatus(
      None, None, [{'latest': {'Pong': older}}, {'latest': {'Freeway': latest['Freeway']}}], []),
      time.time())
  assert line.endswith('eval@3-5 mean_norm 2.0% Freeway=no-episode Pong=2%')
  # TensorBoard gets scalars only for games with a score.
  assert evaluator.tensorboard_scalars({'Pong': dict(score=-20.0, normalized=0.02),
                                        'Freeway': dict(score=None, normalized=None)}) == [
      ('eval/Pong/score', -20.0), ('eval/Pong/normalized', 0.02)]


def test_argument_errors():
  pol = evaluator.uniform_random_policy(GAMES)
  with pytest.raises(ValueError, match=r"\['Qbert'\] are not games of the model.*Breakout"):
    evaluator.evaluate(pol, None, ['Qbert'], EvalConfig(), model_games=GAMES, steps_per_game=1)
  with pytest.raises(ValueError, match='unknown game'):
    evaluator.evaluate(pol, None, ['Pongg'], EvalConfig(), model_games=GAMES, steps_per_game=1)
  with pytest.raises(ValueError, match='steps_per_game must be >= 1'):
    evaluator.evaluate(pol, None, ['Pong'], EvalConfig(), model_games=GAMES, steps_per_game=0)
  with pytest.raises(ValueError, match='env_groups must be >= 1'):
    evaluator.evaluate(pol, None, ['Pong'], EvalConfig(env_groups=0), model_games=GAMES,
                       steps_per_game=1)
  with pytest.raises(ValueError, match='games_at_once must be >= 1'):
    evaluator.evaluate(pol, None, ['Pong'], EvalConfig(games_at_once=0), model_games=GAMES,
                       steps_per_game=1)


def test_logs_and_run_report(tmp_path):
  workdir = str(tmp_path / 'run')
  log = os.path.join(workdir, 'eval', 'evaluator_0.jsonl')
  out_csv = str(tmp_path / 'scores.csv')
  cfg = EvalConfig(max_episode_frames=40)  # 10-step episodes: fast
  for version in (0, 10):
    evaluator.evaluate(noop_policy, None, ['Breakout', 'Pong'], cfg, model_games=GAMES,
                       steps_per_game=8, num_envs=2, param_version=version,
                       evaluator='evaluator_0', epsilon=0.001, jsonl_path=log, csv_path=out_csv)
  lines = [json.loads(l) for l in open(log)]
  assert len(lines) == 4
  for field in report.REQUIRED_FIELDS + ('steps', 'steps_per_second', 'partial', 'epsilon',
                                         'truncated', 'budget'):
    assert field in lines[0], field
  assert [l['param_version'] for l in lines] == [0, 0, 10, 10]
  assert [(l['episodes'], l['truncated'], l['steps'], l['budget']) for l in lines] == [
      (2, 2, 20, 8)] * 4
  # The protocol each record was played under.
  assert [(l['game_mode'], l['sticky_action_prob'], l['max_episode_frames']) for l in lines] == [
      (None, 0.0, 40)] * 4
  rows = list(csv.DictReader(open(out_csv)))
  assert len(rows) == 4 and rows[0]['game'] == 'Breakout' and rows[0]['evaluator'] == 'evaluator_0'
  assert (rows[0]['game_mode'], rows[0]['max_episode_frames']) == ('', '40')

  assert cli.main(['report', 'run', workdir]) == 0
  for name in ('learning_curves_games.png', 'learning_curve_aggregate.png', 'summary.md'):
    assert os.path.getsize(os.path.join(workdir, 'report', name)) > 0
  md = open(os.path.join(workdir, 'report', 'summary.md')).read()
  assert '| 10 |' in md and 'Breakout' in md and 'Torn log lines skipped: 0.' in md
  assert ("Evaluation protocol: the ROM's default mode, no sticky actions, 40-frame cap, "
          'epsilon 0.001.\n') in md
  assert 'mix evaluation protocols' not in md
  assert 'Q diagnostics per game' not in md  # no learner_games.jsonl: no section

  # The learner's per-game Q diagnostics: a table of the latest line and a plot (a torn last
  # line, as a killed learner leaves, is skipped).
  names = ('greedy_is_data_action', 'greedy_top_share', 'data_top_share', 'action_gap',
           'q_mc_corr')
  with open(os.path.join(workdir, 'learner_games.jsonl'), 'w') as f:
    for step, share in ((100, 0.5), (200, 0.99)):
      f.write(json.dumps({'step': step, 'time': 0.0, **{
          f'{g}/{n}': (share if n == 'greedy_top_share' else 0.25) for g in ('Breakout', 'Pong')
          for n in names}}) + '\n')
    f.write('{"step": 300, "Pong/greedy_to')
  assert report.read_game_diagnostics(workdir)['Pong'][0] == [100, 200]
  assert cli.main(['report', 'run', workdir]) == 0
  assert os.path.getsize(os.path.join(workdir, 'report', 'greedy_top_share_games.png')) > 0
  md = open(os.path.join(workdir, 'report', 'summary.md')).read()
  assert '| Pong | 200 | 0.25 | 0.99 | 0.25 | 0.25 | 0.25 |' in md

  # Breakout in another mode (as online fine-tuning evaluates) in the same run: the record says
  # so, and the report names both protocols instead of one.
  evaluator.evaluate(noop_policy, None, ['Breakout'], dataclasses.replace(cfg, game_mode=12),
                     model_games=GAMES, steps_per_game=8, num_envs=1, param_version=20,
                     evaluator='evaluator_0', epsilon=0.001, jsonl_path=log)
  assert json.loads(open(log).readlines()[-1])['game_mode'] == 12
  assert cli.main(['report', 'run', workdir]) == 0
  md = open(os.path.join(workdir, 'report', 'summary.md')).read()
  assert '**These records mix evaluation protocols**' in md
  assert ("- the ROM's default mode, no sticky actions, 40-frame cap, epsilon 0.001: 4 records; "
          'games Breakout, Pong; learner steps 0 to 10') in md
  assert ('- mode 12, no sticky actions, 40-frame cap, epsilon 0.001: 1 record; games Breakout; '
          'learner steps 20') in md
  # A log from before the protocol fields says nothing of it: counted, not another protocol.
  old = report.EvalRecord.from_dict({k: lines[0][k] for k in report.REQUIRED_FIELDS})
  assert (old.game_mode, old.sticky_action_prob, old.protocol_label) == (None, None, None)
  new = report.EvalRecord.from_dict(lines[0])
  assert report.protocol_lines([new, old]) == [
      "Evaluation protocol: the ROM's default mode, no sticky actions, 40-frame cap, epsilon "
      '0.001. 1 older record names none.', '']
  # A CSV round trip through a spreadsheet: mode 12.0, empty cells.
  assert report.EvalRecord.from_dict(dict(lines[0], game_mode='12.0', max_episode_frames='',
                                          sticky_action_prob='')).game_mode == 12
  # A game's default mode set explicitly is the default protocol (Breakout's 0, Centipede's 22).
  for game, mode, same in (('Breakout', 0, True), ('Centipede', 22, True),
                           ('Centipede', 86, False)):
    label = dataclasses.replace(new, game=game, game_mode=mode).protocol_label
    assert (label == new.protocol_label) == same, (game, mode, label)


def record(game, version, normalized, evaluator_name='e0', episodes=1):
  return report.EvalRecord(game=game, score=0.0, normalized=normalized, param_version=version,
                           evaluator=evaluator_name, episodes=episodes, time=0.0)


def test_learning_curves_carry_each_games_latest_score_forward():
  recs = [record('Pong', 0, 0.1), record('Breakout', 5, 0.3), record('Pong', 10, 0.5),
          record('Pong', 10, 0.7, 'e1'), record('Breakout', 20, 0.9)]
  c = report.learning_curves(recs)
  assert c.per_game['Pong'] == ([0, 10], [0.1, pytest.approx(0.6)])
  assert c.versions == [5, 10, 20]  # version 0: Breakout has no record yet
  np.testing.assert_allclose(c.mean, [0.2, 0.45, 0.75])


def test_records_of_one_game_and_step_are_pooled_over_their_episodes():
  """A round on the normal budget and the final evaluation of the same params (or a restarted
  evaluator's second round) are one estimate: the mean over all their completed episodes, not
  the mean of the records (which gave 1 episode the weight of 5)."""
  short = dataclasses.replace(record('Pong', 10, 0.0, episodes=1), score=-21.0, budget=40)
  final = dataclasses.replace(record('Pong', 10, 0.6, episodes=5), score=-3.0, budget=60)
  assert report.pooled([short, final]) == (pytest.approx(-6.0), pytest.approx(0.5))
  c = report.learning_curves([record('Pong', 0, 0.1), short, final])
  assert c.per_game['Pong'] == ([0, 10], [0.1, pytest.approx(0.5)])
  assert c.raw_per_game['Pong'][1][1] == pytest.approx(-6.0)
  for bad in ([], [short, record('Breakout', 10, 0.5)], [short, record('Pong', 11, 0.5)],
              [short, dataclasses.replace(final, score=None, normalized=None, episodes=0)]):
    with pytest.raises(ValueError, match='pooled'):
      report.pooled(bad)


def test_records_of_params_a_learner_restart_lost_are_left_out(tmp_path):
  """Lineage 0 reached step 30 and was evaluated at 10, 20 and 30, then died; its restart
  (lineage 1) resumed from the checkpoint of step 10 and was evaluated at 20 before the run
  ended. Lineage 0's 20 and 30 are of params never saved: the curve's last point and the final
  scores would otherwise be step 30's, from the lost run, and step 20 would pool two different
  params. Its 10 is the checkpoint the restart resumed from: kept. Decided by the resume step
  (WORKDIR/learner_starts.jsonl), not by the first step the new lineage was evaluated at (30,
  with a busy evaluator, would keep lineage 0's 20). Logs without lineages are read as before."""
  def rec(version, lineage, normalized):
    return dataclasses.replace(record('Pong', version, normalized), param_lineage=lineage)
  recs = [rec(10, 0, 0.1), rec(20, 0, 0.2), rec(30, 0, 0.9), rec(30, 1, 0.3)]
  assert report.lost_params(recs, [0, 10]) == [False, True, True, False]
  assert report.lost_params(recs, [0, 30]) == [False, False, False, False]  # a clean resume
  assert report.lost_params(recs, [0, 10, 40]) == [False, True, True, False]
  assert report.lost_params(recs, [0, 20, 5]) == [True, True, True, True]  # lost twice
  assert not any(report.lost_params([record('Pong', v, 0.1) for v in (10, 20, 10)], [0, 5]))
  os.makedirs(tmp_path / 'eval')
  report.append_records(str(tmp_path / 'eval' / 'evaluator_0.jsonl'), recs)
  assert report.read_eval_logs(str(tmp_path)).lost == 0  # no learner_starts.jsonl (warned)
  with open(tmp_path / 'learner_starts.jsonl', 'w') as f:
    f.write('{"time": 1, "restart": 0, "resumed_from_step": 0}\n{"time": 2, "rest\n'
            '{"time": 3, "restart": 1, "resumed_from_step": 10}\n')  # a line torn by a kill
  logs = report.read_eval_logs(str(tmp_path))
  assert logs.lost == 2 and [(r.param_version, r.param_lineage) for r in logs.records] == [
      (10, 0), (30, 1)]
  assert report.learning_curves(logs.records).per_game['Pong'] == ([10, 30], [0.1, 0.3])
  assert cli.main(['report', 'run', str(tmp_path)]) == 0
  md = open(tmp_path / 'report' / 'summary.md').read()
  assert 'Records of params lost to a learner restart, left out: 2.' in md
  # A CSV begun before records had a lineage and a protocol gets their columns when appended to,
  # its old rows the values that read back as not recorded; a CSV that is not an evaluation CSV
  # is refused (its rows would be mostly blank).
  old = tmp_path / 'old.csv'
  newer = ('param_lineage', 'game_mode', 'sticky_action_prob', 'max_episode_frames')
  kept = [f for f in report.CSV_FIELDS if f not in newer]
  with open(old, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=kept, lineterminator='\n')
    writer.writeheader()
    writer.writerow({k: v for k, v in dataclasses.asdict(recs[0]).items() if k in kept})
  played = dataclasses.replace(recs[1], game_mode=12, sticky_action_prob=0.0,
                               max_episode_frames=400)
  report.append_csv(str(old), [played])
  with open(old, newline='') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == kept + list(newer)
  assert [r['game_mode'] for r in rows] == ['', '12'] and rows[0]['param_lineage'] == '-1'
  assert os.listdir(tmp_path).count('old.csv') == 1 and not any(
      name.endswith('.tmp') for name in os.listdir(tmp_path))
  read = report.read_csv(str(old))
  assert read[0] == dataclasses.replace(recs[0], param_lineage=-1)
  assert read[0].protocol_label is None
  assert read[1] == played and read[1].protocol_label.startswith('mode 12, no sticky actions')
  # An older CSV with a row of more cells than its header: named, and left as it was.
  torn = tmp_path / 'torn.csv'
  torn.write_text(','.join(kept) + '\n' + ','.join(['1'] * (len(kept) + 2)) + '\n')
  before = torn.read_text()
  with pytest.raises(report.EvalLogError, match=r'torn.csv:2: more cells than its header'):
    report.append_csv(str(torn), [played])
  assert torn.read_text() == before and not any(
      name.endswith('.tmp') for name in os.listdir(tmp_path))
  (tmp_path / 'other.csv').write_text('method,game,score\n')
  (tmp_path / 'binary.csv').write_bytes(b'\xff\xfe\x00\x81')
  for other in ('other.csv', 'binary.csv'):
    with pytest.raises(report.EvalLogError, match='not an evaluation CSV'):
      report.append_csv(str(tmp_path / other), recs[:1])


def old_partial_record(game, version, partial_return):
  """A record as the evaluator wrote it before issue 10: a game with no completed episode had the
  mean PARTIAL return as its `score`, flagged `partial`."""
  return json.dumps(dict(game=game, score=partial_return,
                         normalized=float(normalization.human_normalized(game, partial_return)),
                         param_version=version, evaluator='e0', episodes=0, time=0.0, steps=500,
                         steps_per_second=100.0, partial=True, epsilon=0.001))


def test_records_without_a_completed_episode_are_text_and_left_out(tmp_path, capsys):
  # Old logs stay readable; a partial return is not a score.
  old = report.EvalRecord.from_dict(json.loads(old_partial_record('Freeway', 5, 7.0)))
  assert (old.score, old.normalized, old.partial, old.has_score) == (None, None, True, False)
  recs = [record('Pong', 0, 0.1), record('Breakout', 0, 0.3),
          report.EvalRecord.from_dict(json.loads(old_partial_record('Pong', 10, 3.0))),
          record('Breakout', 10, 0.5)]
  c = report.learning_curves(recs)
  assert c.per_game['Pong'] == ([0], [0.1])  # the partial record is no point of the curve
  assert c.versions == [0, 10]
  np.testing.assert_allclose(c.mean, [0.2, 0.3])  # Pong carries its last SCORE (0.1) forward
  # A game that never completed an episode is left out of the aggregate and named.
  recs.append(report.EvalRecord.from_dict(json.loads(old_partial_record('Freeway', 10, 9.0))))
  c = report.learning_curves(recs)
  assert c.aggregate_games == ('Breakout', 'Pong') and c.per_game['Freeway'] == ([], [])
  os.makedirs(tmp_path / 'eval')
  (tmp_path / 'eval' / 'e0.jsonl').write_text(
      ''.join(r.to_json() + '\n' for r in recs[:2] + recs[3:4]) +
      old_partial_record('Pong', 10, 3.0) + '\n' + old_partial_record('Freeway', 10, 9.0) + '\n')
  assert cli.main(['report', 'run', str(tmp_path)]) == 0
  md = open(tmp_path / 'report' / 'summary.md').read()
  assert '| Freeway | 10 | no completed episode | no completed episode | 0 (0) |' in md
  assert '| Pong | 10 | no completed episode | no completed episode | 0 (0) |' in md
  assert 'Left out of the aggregate (no completed episode in any record): Freeway.' in md
  # Version 10: Pong's last score (10%, version 0) carried forward, never its partial return.
  assert 'Aggregate over 2 games' in md and '| 10 | 30.0 | 30.0 | 30.0 |' in md
  assert 'Records with no completed episode (no score, left out of every curve and aggregate): 2' in md


def test_torn_lines_anywhere_are_skipped_and_counted(tmp_path):
  import subprocess
  import sys
  workdir = tmp_path / 'run'
  log = str(workdir / 'eval' / 'evaluator_0.jsonl')
  cfg = EvalConfig(max_episode_frames=40)
  evaluator.evaluate(noop_policy, None, ['Pong'], cfg, model_games=GAMES, steps_per_game=4,
                     num_envs=1, param_version=0, evaluator='evaluator_0', jsonl_path=log)
  # An evaluator killed (SIGKILL) in the middle of writing a record ...
  half = record('Pong', 5, 0.2, 'evaluator_0').to_json()[:40]
  subprocess.run([sys.executable, '-c', f'import os, signal\nf = open({log!r}, "a")\n'
                  f'f.write({half!r}); f.flush(); os.kill(os.getpid(), signal.SIGKILL)'])
  assert not open(log).read().endswith('\n')
  # ... then restarted, appending its next records: they start on a fresh line.
  evaluator.evaluate(noop_policy, None, ['Pong'], cfg, model_games=GAMES, steps_per_game=4,
                     num_envs=1, param_version=10, evaluator='evaluator_0', jsonl_path=log)
  # A torn fragment with a whole record after it on the same line (an older writer appended
  # without the fresh-line rule): the record is kept.
  with open(log, 'a') as f:
    f.write(half + record('Pong', 20, 0.4, 'evaluator_0').to_json() + '\n')
  evaluator.evaluate(noop_policy, None, ['Pong'], cfg, model_games=GAMES, steps_per_game=4,
                     num_envs=1, param_version=30, evaluator='evaluator_0', jsonl_path=log)
  lines = open(log).read().splitlines()
  assert len(lines) == 5 and lines[1] == half
  logs = report.read_eval_logs(str(workdir))
  assert [r.param_version for r in logs.records] == [0, 10, 20, 30]
  assert [t.rsplit(':', 1)[1] for t in logs.torn] == ['2', '4']
  assert cli.main(['report', 'run', str(workdir)]) == 0
  md = open(workdir / 'report' / 'summary.md').read()
  assert 'Torn log lines skipped: 2 (eval/evaluator_0.jsonl:2, eval/evaluator_0.jsonl:4).' in md


def test_bad_logs_are_named(tmp_path, capsys):
  assert cli.main(['report', 'run', str(tmp_path)]) == 2
  assert 'no eval/ folder' in capsys.readouterr().err
  os.makedirs(tmp_path / 'eval')
  path = tmp_path / 'eval' / 'e.jsonl'
  good = record('Pong', 0, 0.1).to_json()
  path.write_text(good + '\n{"game": "Pong"}\n')
  with pytest.raises(report.EvalLogError, match=r"e.jsonl:2: missing field\(s\) \['score'"):
    report.read_eval_logs(str(tmp_path))
  path.write_text(good + '\n[1, 2]\n')
  with pytest.raises(report.EvalLogError, match='e.jsonl:2: not a JSON object'):
    report.read_eval_logs(str(tmp_path))
  path.write_text(good.replace('"episodes": 1', '"episodes": "many"') + '\n')
  with pytest.raises(report.EvalLogError, match='e.jsonl:1: bad field value'):
    report.read_eval_logs(str(tmp_path))
  path.write_text('{"game": "Po\n')
  with pytest.raises(report.EvalLogError, match=r'hold no records \(1 torn line'):
    report.read_eval_logs(str(tmp_path))


def test_eval_command_on_a_learner_checkpoint(tmp_path, capsys):
  from scaled_ql.agents.learner import Learner
  from scaled_ql.agents.runner import LearnerRunner
  workdir = str(tmp_path / 'learner')
  # cpu_tiny (Breakout, Pong); saved at step 0 with the initial params: no update is compiled
  # (the iterator is never read), which keeps the test fast.
  learner = LearnerRunner(Learner(get_config('cpu_tiny'), iter(())), workdir, handle_signals=False)
  learner.save()
  out = str(tmp_path / 'eval.csv')
  rc = cli.main(['eval', '--checkpoint', workdir, '--games', 'Pong', '--steps', '6',
                 '--num-envs', '2', '--out', out])
  assert rc == 0, capsys.readouterr().err
  text = capsys.readouterr().out
  assert 'Pong' in text and 'human-normalized' in text
  rows = list(csv.DictReader(open(out)))
  # cpu_tiny caps episodes at 2000 frames (500 steps): both started episodes are played out.
  assert [(r['game'], r['param_version'], r['budget']) for r in rows] == [('Pong', '0', '6')]
  assert int(rows[0]['episodes']) == 2 and 6 < int(rows[0]['steps']) <= 1000
  # Games the checkpoint's config does not have: a clear error listing its games.
  assert cli.main(['eval', '--checkpoint', workdir, '--games', 'Qbert', '--steps', '6']) == 2
  err = capsys.readouterr().err
  assert "['Qbert'] not in the checkpoint" in err and 'Breakout, Pong' in err
  assert cli.main(['eval', '--checkpoint', workdir, '--games', 'Pongg']) == 2
  assert 'unknown game' in capsys.readouterr().err
  assert cli.main(['eval', '--checkpoint', workdir, '--games-at-once', '0']) == 2
  assert '--games-at-once must be >= 1, got 0' in capsys.readouterr().err
  # Both games, one after the other: a row each, in order.
  one_by_one = str(tmp_path / 'one_by_one.csv')
  assert cli.main(['eval', '--checkpoint', workdir, '--steps', '6', '--num-envs', '1',
                   '--games-at-once', '1', '--out', one_by_one]) == 0, capsys.readouterr().err
  assert [r['game'] for r in csv.DictReader(open(one_by_one))] == ['Breakout', 'Pong']
  import jax
  if not any(d.platform == 'gpu' for d in jax.devices()):  # asked for an accelerator it lacks
    assert cli.main(['eval', '--checkpoint', workdir, '--steps', '6', '--device', 'gpu']) == 2
    assert "device='gpu' puts the evaluator policy on a gpu" in capsys.readouterr().err


def test_evaluator_gpus_flag_is_checked_before_any_node_starts():
  import ray

  from scaled_ql.configs import ConfigError
  from scaled_ql.launch import run
  cfg = run.resolve_config('cpu_tiny', evaluator_gpus=0.25)
  assert cfg.eval.gpus_per_evaluator == 0.25 and 'eval.gpus_per_evaluator=0.25' in cfg.overrides
  for bad in (-1, float('inf'), float('nan')):
    with pytest.raises(ConfigError, match=r'--evaluator-gpus \(eval.gpus_per_evaluator\) must be '
                       rf'>= 0 and finite, got {bad}'):
      run.resolve_config('cpu_tiny', evaluator_gpus=bad)
  # A local Ray without enough GPUs: refused, instead of evaluator actors that never start.
  started = not ray.is_initialized()
  if started:
    run.start_local_ray(1)
  try:
    gpus = ray.cluster_resources().get('GPU', 0.0)
    run.check_gpus(run.resolve_config('cpu_tiny', evaluator_gpus=gpus))  # enough
    with pytest.raises(ConfigError, match=rf'^--evaluator-gpus {gpus + 1:g} x 1 evaluator\(s\) '
                       rf'need {gpus + 1:g} GPU\(s\); Ray sees {gpus:g}'):
      run.check_gpus(run.resolve_config('cpu_tiny', evaluator_gpus=gpus + 1))
    # The learner's too (`train --learner-gpus 1` without a GPU waited forever).
    run.check_gpus(run.resolve_config('cpu_tiny', evaluator_gpus=0), learner_gpus=gpus)
    with pytest.raises(ConfigError, match=rf'^--learner-gpus {gpus + 1:g} and --evaluator-gpus '
                       rf'1 x 1 evaluator\(s\) need {gpus + 2:g} GPU\(s\)'):
      run.check_gpus(run.resolve_config('cpu_tiny', evaluator_gpus=1), learner_gpus=gpus + 1)
  finally:
    if started:
      ray.shutdown()


def test_train_with_learner_gpus_the_machine_lacks_ends_instead_of_waiting(tiny_dataset_dir,
                                                                           tmp_path, capsys):
  """`train --learner-gpus N` beyond the local Ray's GPUs: refused after Ray starts, before any
  node does (it used to print "learner (starting)" forever), and Ray is stopped again."""
  import ray
  from scaled_ql import cli
  assert not ray.is_initialized()  # (the command starts its own local Ray)
  assert cli.main(['train', '--config', 'cpu_tiny', '--data-dir', tiny_dataset_dir, '--workdir',
                   str(tmp_path / 'w'), '--learner-gpus', '64']) == 2
  assert '--learner-gpus 64 need 64 GPU(s); Ray sees' in capsys.readouterr().err
  assert not ray.is_initialized()


def test_finetune_online_with_evaluator_gpus_the_machine_lacks_is_refused(tmp_path, capsys):
  """`finetune online` checks the GPUs its evaluator asks for as `train` does: refused after Ray
  starts, before any node does (before: the evaluator sat unplaced until the 900-s placement
  timeout ended the run)."""
  import ray
  from scaled_ql import cli
  assert not ray.is_initialized()
  assert cli.main(['finetune', 'online', '--game', 'Pong', '--from-scratch', '--config',
                   'cpu_tiny', '--workdir', str(tmp_path / 'w'), '--set',
                   'eval.gpus_per_evaluator=64']) == 2
  assert '--evaluator-gpus 64 x 1 evaluator(s) need 64 GPU(s); Ray sees' in \
      capsys.readouterr().err
  assert not ray.is_initialized()


def test_run_report_sets_each_game_beside_the_data_it_trained_on(tiny_dataset_dir, tmp_path):
  """`report run` shows the behaviour score of the run's training splits (its config.json's data
  dir and selection) as a table column and a dashed line, and names a game without one."""
  from scaled_ql.configs import get_config
  from scaled_ql.configs import overrides as overrides_lib
  from scaled_ql.datasets import generate
  workdir = str(tmp_path / 'run')
  cfg = get_config('cpu_tiny').replace(
      data=dict(data_dir=tiny_dataset_dir, selection='checkpoints:0-1'))
  overrides_lib.write_file(cfg, workdir)
  report.append_records(os.path.join(workdir, 'eval', 'e0.jsonl'),
                        [record(g, 10, 0.5) for g in cfg.games])
  expected = {g: generate.selection_score(cfg.data, g) for g in cfg.games}
  data, note = report.data_behaviour(workdir, cfg.games)
  assert note == '' and data == {g: s for g, (s, _) in expected.items()}
  assert all(n > 0 for _, n in expected.values())
  report.run_report(workdir)
  md = open(os.path.join(workdir, 'report', 'summary.md')).read()
  for g, (score, _) in expected.items():
    assert f'| {g} | 10 | 0.0 | 50.0 | 1 (0) | {score:.1f} |' in md

  # The data moved away (a relative data dir read from elsewhere): no line, and the report says why.
  overrides_lib.write_file(cfg.replace(data=dict(data_dir=str(tmp_path / 'gone'))), workdir)
  data, note = report.data_behaviour(workdir, cfg.games)
  assert data == {} and 'gone' in note and cfg.games[0] in note
  report.run_report(workdir)
  md = open(os.path.join(workdir, 'report', 'summary.md')).read()
  assert '| n/a |' in md and 'no data line for' in md

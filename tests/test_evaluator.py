"""The evaluator on the real emulator (tiny budgets), its logs, and `scaled-ql eval | report run`."""
import csv
import json
import os

import numpy as np
import pytest

from scaled_ql import cli
from scaled_ql.configs import get_config
from scaled_ql.configs.base import EvalConfig
from scaled_ql.eval import evaluator, report

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


def test_eval_env_has_no_sticky_actions_and_is_cut_at_max_frames(random_policy):
  env = evaluator.make_eval_env('Pong', EvalConfig(), seed=0)
  assert env.sticky_action_prob == 0.0
  # With a 200-frame cap, 120 steps of Pong (whose episodes take thousands of frames) are two
  # complete 50-step episodes (truncated at 200 frames) plus 20 steps that are dropped.
  cfg = EvalConfig(max_episode_frames=200)
  env = evaluator.make_eval_env('Pong', cfg, seed=0)
  ts, n = env.reset(), 0
  while not ts.last():
    ts, n = env.step(0), n + 1
  assert (n, env.episode_frames, ts.discount) == (50, 200, 1.0)  # truncation, not termination
  r = evaluator.evaluate(random_policy, None, ['Pong'], cfg, model_games=GAMES,
                         steps_per_game=120, num_envs=1)['Pong']
  assert (r.episodes, r.steps, r.partial) == (2, 120, False)
  assert r.score == pytest.approx(np.mean(r.episode_returns))


def test_uniform_random_policy_scores_about_zero(random_policy):
  games = ('Breakout', 'Freeway', 'Enduro')
  results = evaluator.evaluate(random_policy, None, games, EvalConfig(), model_games=GAMES,
                               steps_per_game=500, num_envs=2, seed=1)
  assert set(results) == set(games)
  for g, r in results.items():
    assert r.steps == 500
    assert abs(r.normalized) < 0.15, (g, r)
  assert results['Breakout'].episodes >= 1  # random Breakout episodes are ~200 steps
  assert results['Freeway'].partial and results['Freeway'].episodes == 0  # 2048-step episodes


def test_budget_split_seeding_and_batching():
  seen = []

  def policy(params, rng, observation, game_id):
    assert params == 'params'
    assert observation.shape == (3, 84, 84, 4) and observation.dtype == np.uint8
    assert game_id.dtype == np.int32
    seen.append((np.asarray(game_id).copy(), np.asarray(rng).copy()))
    return np.zeros(3, np.int32)

  results = evaluator.evaluate(policy, 'params', ['Pong'], EvalConfig(), model_games=GAMES,
                               steps_per_game=10, num_envs=3, env_groups=1)
  assert results['Pong'].steps == 10  # budgets 4 + 3 + 3
  assert len(seen) == 1 + 4  # one untimed compile call, then one call per lockstep step
  assert all((g == GAMES.index('Pong')).all() for g, _ in seen)
  assert len({k.tobytes() for _, k in seen}) == len(seen)  # a fresh key every step


def test_double_buffered_groups_play_the_same_episodes():
  import jax
  import jax.numpy as jnp

  @jax.jit
  def policy(params, rng, observation, game_id):  # deterministic: a function of the screen
    del params, rng, game_id
    return (jnp.sum(observation, axis=(1, 2, 3), dtype=jnp.int32) % 4).astype(jnp.int32)

  runs = [evaluator.evaluate_game(policy, None, 'Breakout', 0, EvalConfig(), 600, 3,
                                  env_groups=g) for g in (1, 3)]
  assert runs[0].episodes >= 1
  for r in runs[1:]:
    assert sorted(r.episode_returns) == sorted(runs[0].episode_returns)
    assert (r.steps, r.score) == (600, runs[0].score)


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


def test_logs_and_run_report(tmp_path, random_policy):
  workdir = str(tmp_path / 'run')
  log = os.path.join(workdir, 'eval', 'evaluator_0.jsonl')
  out_csv = str(tmp_path / 'scores.csv')
  for version in (0, 10):
    evaluator.evaluate(random_policy, None, ['Breakout', 'Pong'], EvalConfig(),
                       model_games=GAMES, steps_per_game=8, num_envs=2, param_version=version,
                       evaluator='evaluator_0', epsilon=0.001, jsonl_path=log, csv_path=out_csv)
  lines = [json.loads(l) for l in open(log)]
  assert len(lines) == 4
  for field in report.REQUIRED_FIELDS + ('steps', 'steps_per_second', 'partial', 'epsilon'):
    assert field in lines[0], field
  assert [l['param_version'] for l in lines] == [0, 0, 10, 10]
  rows = list(csv.DictReader(open(out_csv)))
  assert len(rows) == 4 and rows[0]['game'] == 'Breakout' and rows[0]['evaluator'] == 'evaluator_0'

  assert cli.main(['report', 'run', workdir]) == 0
  for name in ('learning_curves_games.png', 'learning_curve_aggregate.png', 'summary.md'):
    assert os.path.getsize(os.path.join(workdir, 'report', name)) > 0
  md = open(os.path.join(workdir, 'report', 'summary.md')).read()
  assert '| 10 |' in md and 'Breakout' in md


def record(game, version, normalized, evaluator_name='e0'):
  return report.EvalRecord(game=game, score=0.0, normalized=normalized, param_version=version,
                           evaluator=evaluator_name, episodes=1, time=0.0)


def test_learning_curves_carry_each_games_latest_score_forward():
  recs = [record('Pong', 0, 0.1), record('Breakout', 5, 0.3), record('Pong', 10, 0.5),
          record('Pong', 10, 0.7, 'e1'), record('Breakout', 20, 0.9)]
  c = report.learning_curves(recs)
  assert c.per_game['Pong'] == ([0, 10], [0.1, pytest.approx(0.6)])
  assert c.versions == [5, 10, 20]  # version 0: Breakout has no record yet
  np.testing.assert_allclose(c.mean, [0.2, 0.45, 0.75])


def test_bad_logs_are_named(tmp_path, capsys):
  assert cli.main(['report', 'run', str(tmp_path)]) == 2
  assert 'no eval/ folder' in capsys.readouterr().err
  os.makedirs(tmp_path / 'eval')
  path = tmp_path / 'eval' / 'e.jsonl'
  good = record('Pong', 0, 0.1).to_json()
  path.write_text(good + '\n{"game": "Pong"}\n')
  with pytest.raises(report.EvalLogError, match=r"e.jsonl:2: missing field\(s\) \['score'"):
    report.read_eval_logs(str(tmp_path))
  path.write_text(good + '\n{"game": "Po')  # a last line cut short by a killed evaluator
  assert len(report.read_eval_logs(str(tmp_path))) == 1
  path.write_text('{"game": "Po\n' + good + '\n')
  with pytest.raises(report.EvalLogError, match='e.jsonl:1: not JSON'):
    report.read_eval_logs(str(tmp_path))


def test_eval_command_on_a_learner_checkpoint(tmp_path, capsys):
  from scaled_ql.agents.learner import Learner
  workdir = str(tmp_path / 'learner')
  # cpu_tiny (Breakout, Pong); saved at step 0 with the initial params: no update is compiled
  # (the iterator is never read), which keeps the test fast.
  learner = Learner(get_config('cpu_tiny'), iter(()), workdir, handle_signals=False)
  learner.save()
  out = str(tmp_path / 'eval.csv')
  rc = cli.main(['eval', '--checkpoint', workdir, '--games', 'Pong', '--steps', '6',
                 '--num-envs', '2', '--out', out])
  assert rc == 0, capsys.readouterr().err
  text = capsys.readouterr().out
  assert 'Pong' in text and 'human-normalized' in text
  rows = list(csv.DictReader(open(out)))
  assert [(r['game'], r['param_version'], r['steps']) for r in rows] == [('Pong', '0', '6')]
  # Games the checkpoint's config does not have: a clear error listing its games.
  assert cli.main(['eval', '--checkpoint', workdir, '--games', 'Qbert', '--steps', '6']) == 2
  err = capsys.readouterr().err
  assert "['Qbert'] not in the checkpoint" in err and 'Breakout, Pong' in err
  assert cli.main(['eval', '--checkpoint', workdir, '--games', 'Pongg']) == 2
  assert 'unknown game' in capsys.readouterr().err

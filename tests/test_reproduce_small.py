"""benchmarks/reproduce_small.py: its flags and the late-checkpoint scoring (no runs here)."""
import numpy as np
import pytest

from scaled_ql.datasets import policies
from scaled_ql.launch import run
from tests import benchmark_modules

rs = benchmark_modules.load('reproduce_small')


def test_late_steps_cover_the_second_half_and_end_at_the_last_step():
  assert rs.late_steps(12000, 1) == [12000]
  assert rs.late_steps(12000, 6) == [7000, 8000, 9000, 10000, 11000, 12000]
  assert rs.late_steps(400, 2) == [300, 400]
  with pytest.raises(ValueError, match='multiple of 2 x --late-checkpoints = 14'):
    rs.late_steps(12000, 7)
  with pytest.raises(ValueError, match='k >= 1'):
    rs.late_steps(12000, 0)


def test_mean_scores_average_each_game_over_the_steps_and_refuse_a_gap():
  per_step = {1000: {'Boxing': -50.0, 'Pong': -21.0}, 2000: {'Boxing': 70.0, 'Pong': -19.0}}
  assert rs.mean_scores(per_step, ('Boxing', 'Pong')) == {'Boxing': 10.0, 'Pong': -20.0}
  per_step[2000]['Pong'] = None  # no completed episode there: not a mean over the other step
  with pytest.raises(ValueError, match=r'Pong: no completed evaluation episode at step\(s\) '
                     r'\[2000\]'):
    rs.mean_scores(per_step, ('Boxing', 'Pong'))


def test_flawed_episode_data_and_late_checkpoints_reach_the_config():
  args = rs.parse_args(['--games', 'Boxing,SpaceInvaders', '--weak-episodes', 'flawed',
                        '--episodes-per-checkpoint', '16', '--steps', '12000',
                        '--late-checkpoints', '6', '--eval-steps', '5400', '--eval-envs', '3'])
  assert args.weak_episodes == 'flawed' and args.steps_per_checkpoint is None
  cfg = rs.make_config('bc', 2, args)
  run.validate(cfg)
  assert cfg.train.checkpoint_every_steps == 1000
  assert cfg.train.keep_checkpoint_every_steps == 1000  # every late step outlives the newest 3
  assert cfg.data.shuffle_buffer_per_game == 60_000
  assert cfg.train.seed == 2 and cfg.agent.loss == 'bc'
  assert (cfg.eval.steps_per_game, cfg.eval.num_envs) == (5400, 3)
  # The default keeps the old behaviour: the final params only, a step-budget data set.
  args = rs.parse_args(['--games', 'Boxing', '--steps', '300'])
  assert args.steps_per_checkpoint == 5000 and args.weak_episodes == 'noisy'
  assert rs.parse_args([]).games == rs.DEFAULT_GAMES
  # Flawed data defaults to the games whose flaw costs points where the agent is evaluated;
  # each has a scripted policy and a flawed one.
  flawed_games = rs.parse_args(['--weak-episodes', 'flawed']).games
  assert flawed_games == rs.FLAWED_GAMES and len(flawed_games) >= 6
  assert set(flawed_games) <= set(policies.FLAWED) and 'Seaquest' not in flawed_games
  cfg = rs.make_config('scaled_ql', 0, args)
  run.validate(cfg)
  assert cfg.train.checkpoint_every_steps == 300 and cfg.train.keep_checkpoint_every_steps is None


@pytest.mark.parametrize('argv,message', [
    (['--steps', '1000', '--late-checkpoints', '3'], 'multiple of 2 x --late-checkpoints'),
    (['--weak-episodes', 'mirrored'], 'invalid choice'),
    (['--steps-per-checkpoint', '100', '--episodes-per-checkpoint', '4'], 'not allowed with'),
    (['--episodes-per-checkpoint', '0'], '--episodes-per-checkpoint must be >= 1'),
])
def test_bad_flags_are_refused_before_anything_runs(argv, message, capsys):
  with pytest.raises(SystemExit):
    rs.parse_args(argv)
  assert message in capsys.readouterr().err


def report_of(scores, args):
  """rs.report on made-up runs: {(method, seed): (Boxing, Freeway)} raw scores."""
  results = [dict(method=m, seed=s, scores=dict(Boxing=b, Freeway=f), steps=100, seconds=1.0)
             for (m, s), (b, f) in scores.items()]
  behaviour = {g: dict(score=v, episodes=32, splits=['checkpoint_00', 'checkpoint_01'])
               for g, v in (('Boxing', -11.0), ('Freeway', 16.0))}
  return rs.report(results, behaviour, args, 60.0)


def test_report_keeps_seed_cis_when_an_ablation_has_one_run(tmp_path):
  # Scaled QL and BC with 2 seeds, no-CQL with 1 (`--ablation-seeds 0`): the pair's CIs stay
  # over runs within each game, as without the ablation, and the 1-run claim compares points.
  from scaled_ql.eval import metrics, normalization
  args = rs.parse_args(['--games', 'Boxing,Freeway', '--out', str(tmp_path), '--methods',
                        'scaled_ql,bc,no_cql', '--seeds', '0,1', '--ablation-seeds', '0',
                        '--reps', '200'])
  scores = {('scaled_ql', 0): (60, 22), ('scaled_ql', 1): (40, 21), ('bc', 0): (-50, 21),
            ('bc', 1): (-40, 20), ('no_cql', 0): (-60, 12)}
  md = report_of(scores, args)
  pair = metrics.aggregate(
      {label: np.array([[normalization.human_normalized(g, scores[(m, s)][i])
                         for i, g in enumerate(('Boxing', 'Freeway'))] for s in (0, 1)])
       for m, label in (('scaled_ql', 'Scaled QL'), ('bc', 'BC'))},
      reps=200, seed=0, task_bootstrap=False)
  assert f"| Scaled QL | 2 | {pair.estimates['Scaled QL']['IQM'].format()} |" in md
  assert 'over runs within each game' in md and 'over runs and games' in md
  assert ('- Scaled QL beats BC (same network, same data): holds (95% CIs disjoint; 2 runs: the '
          'target asks for >= 3)') in md
  assert ('- pessimism helps: Scaled QL beats alpha = 0: holds (point estimates only: '
          'Scaled QL, no CQL has 1 run, no CI over seeds)') in md


def test_bc_on_the_feature_norm_network_is_the_feature_norm_arms_baseline(tmp_path):
  args = rs.parse_args(['--games', 'Boxing,Freeway', '--out', str(tmp_path), '--methods',
                        'scaled_ql,feature_norm,bc_feature_norm', '--seeds', '0,1',
                        '--reps', '200'])
  cfg = rs.make_config('bc_feature_norm', 1, args)
  assert cfg.agent.loss == 'bc' and cfg.agent.cql_alpha == 0 and cfg.network.feature_norm
  assert rs.make_config('feature_norm', 0, args).agent.loss != 'bc'
  scores = {('scaled_ql', 0): (-30, 21), ('scaled_ql', 1): (-35, 22),
            ('feature_norm', 0): (60, 22), ('feature_norm', 1): (40, 21),
            ('bc_feature_norm', 0): (-50, 21), ('bc_feature_norm', 1): (-40, 20)}
  md = report_of(scores, args)
  assert ('- Scaled QL beats BC on the feature-norm network (same network, same data): holds '
          '(95% CIs disjoint; 2 runs: the target asks for >= 3)') in md
  # The data's IQM here is below random (Boxing -11): no ratio, and no "holds".
  for arm in ('Scaled QL + feature norm (paper)', 'Scaled QL'):
    line = next(l for l in md.splitlines()
                if l.startswith(f"- {arm} >= 1.5x the behaviour policy's IQM"))
    assert 'no ratio' in line and '-> undefined' in line and 'holds' not in line, line
  assert 'Scaled QL beats BC (same network' not in md  # no plain BC run: no such claim
  assert 'Wall time of this invocation 1.0 min' in md
  # A report rebuilt from finished runs does not show its own few seconds as the runs' wall time.
  rebuilt = report_of(scores, rs.parse_args(
      ['--games', 'Boxing,Freeway', '--out', str(tmp_path), '--methods',
       'scaled_ql,feature_norm,bc_feature_norm', '--seeds', '0,1', '--reps', '200', '--report-only']))
  assert 'rebuilt with --report-only' in rebuilt and 'Wall time of this invocation' not in rebuilt


def test_the_ratio_to_the_data_trims_the_same_shape_and_asks_for_the_whole_ci():
  """Scaled QL's IQM against 1.5x the data's: the data's scores count as many runs as the
  method has (rliable's IQM trims int(25%) of runs x games from each end, so 1 x 6 and 3 x 6 of
  the same scores differ); the claim holds when the whole CI clears 1.5x, says "point estimate
  only" when just the point does, and names fewer than 3 seeds."""
  import tempfile
  from scaled_ql.eval import metrics, normalization
  games = ('Boxing', 'Freeway', 'Pong', 'Breakout', 'Seaquest', 'SpaceInvaders')
  data = dict(zip(games, (6.0, 16.0, -15.0, 4.0, 150.0, 200.0)))
  behaviour = {g: dict(score=v, episodes=32, splits=['checkpoint_00']) for g, v in data.items()}
  with tempfile.TemporaryDirectory() as out:
    args = rs.parse_args(['--games', ','.join(games), '--out', out, '--methods', 'scaled_ql',
                          '--seeds', '0,1,2', '--reps', '200'])
    same = [dict(method='scaled_ql', seed=s, scores=dict(data), steps=100, seconds=1.0)
            for s in (0, 1, 2)]
    md = rs.report(same, behaviour, args, 60.0)
  line = next(l for l in md.splitlines() if l.startswith("- Scaled QL >= 1.5x"))
  assert 'ratio 1.00x -> does NOT hold' in line, line  # the data against itself
  norm = np.array([[normalization.human_normalized(g, data[g]) for g in games]])
  assert metrics.iqm(norm) != pytest.approx(metrics.iqm(np.repeat(norm, 3, axis=0)))
  est = lambda point, lower, upper: metrics.Estimate(point, lower, upper)
  assert rs._ratio_verdict(est(0.35, 0.31, 0.40), 0.2, 3) == (
      "ratio 1.75x -> holds (its 95% CI is at or above 1.5x the data's IQM)")
  assert rs._ratio_verdict(est(0.35, 0.25, 0.40), 0.2, 3).startswith(
      'ratio 1.75x -> point estimate only (its 95% CI reaches below')
  assert rs._ratio_verdict(est(0.35, 0.31, 0.40), 0.2, 2).endswith(
      '; 2 runs: the target asks for >= 3)')
  assert 'holds (point estimate only: 1 run' in rs._ratio_verdict(est(0.35, 0.0, 0.9), 0.2, 1)
  assert rs._ratio_verdict(est(0.1, 0.05, 0.2), -0.02, 3) == (
      "no ratio: the data's IQM is -2.0% <= 0 (random or worse); +12.0 points from the data "
      '-> undefined')

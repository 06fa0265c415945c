"""rliable aggregates: the paper's Tables C.1/C.2 aggregates, CSV handling, `report aggregate`."""
import os

import numpy as np
import pandas as pd
import pytest

from scaled_ql import cli
from scaled_ql import games as games_lib
from scaled_ql.eval import metrics

REPS = 20  # the point estimates do not depend on the bootstrap; keep it cheap


def paper(name):
  mats, games = metrics.normalized_score_matrices(metrics.load_scores_csv(name))
  return mats, games


def test_paper_tables_parsed():
  for name, methods in [
      ('paper:c1', ['DT (200M)', 'DT (40M)', 'Scaled QL (80M)', 'BC (80M)', 'MT Impala-DQN*',
                    'Human']),
      ('paper:c2', ['DT (200M)', 'DT (40M)', 'BC (200M)', 'MT Impala-DQN*', 'Scaled QL (80M)',
                    'Human'])]:
    df = metrics.load_scores_csv(name)
    assert list(dict.fromkeys(df['method'])) == methods
    assert len(df) == 40 * 6
    for m in methods:
      assert tuple(df[df.method == m].game) == games_lib.TRAINING_GAMES_40
  # Spot checks against the paper's text (first, last and extreme entries).
  c1 = metrics.load_scores_csv('paper:c1').set_index(['method', 'game'])['score']
  c2 = metrics.load_scores_csv('paper:c2').set_index(['method', 'game'])['score']
  assert c1['DT (200M)', 'Amidar'] == 72.9
  assert c1['Scaled QL (80M)', 'Atlantis'] == 485200.0
  assert c1['MT Impala-DQN*', 'DoubleDunk'] == -156.2
  assert c1['BC (80M)', 'Zaxxon'] == 0.0
  assert c2['DT (200M)', 'Atlantis'] == 3105342.3
  assert c2['Scaled QL (80M)', 'DemonAttack'] == 56318.3
  assert c2['Scaled QL (80M)', 'Zaxxon'] == 2.1
  assert c2['BC (200M)', 'DoubleDunk'] == -1.5


@pytest.mark.parametrize('table,method,iqm,median', [
    ('paper:c1', 'Scaled QL (80M)', 77.8, None),
    ('paper:c1', 'DT (200M)', 30.6, None),
    ('paper:c2', 'Scaled QL (80M)', 114.1, 98.9),
    ('paper:c2', 'DT (200M)', 111.8, 78.2)])
def test_reproduces_the_papers_aggregates(table, method, iqm, median):
  mats, _ = paper(table)
  est = metrics.aggregate({method: mats[method]}, reps=REPS, seed=0).estimates[method]
  assert est['IQM'].point * 100 == pytest.approx(iqm, abs=0.3)
  if median is not None:
    assert est['Median'].point * 100 == pytest.approx(median, abs=0.3)
  assert est['IQM'].lower <= est['IQM'].point <= est['IQM'].upper


def test_human_column_aggregates_to_exactly_human():
  mats, _ = paper('paper:c1')
  est = metrics.aggregate({'Human': mats['Human']}, reps=REPS).estimates['Human']
  for name in ('IQM', 'Median', 'Mean'):
    assert est[name].point == pytest.approx(1.0)
  assert est['Optimality Gap'].point == pytest.approx(0.0, abs=1e-9)


def write(tmp_path, rows, name='scores.csv', columns=('method', 'game', 'score', 'seed')):
  path = os.path.join(tmp_path, name)
  pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
  return path


GAMES = ('Breakout', 'Pong', 'Qbert', 'Seaquest', 'Hero')


def seeded_rows(methods=('A', 'B'), seeds=(0, 1, 2)):
  rng = np.random.default_rng(0)
  return [(m, g, float(rng.uniform(0, 100)), s) for m in methods for s in seeds for g in GAMES]


def test_seeds_are_runs_and_bootstrap_is_seeded(tmp_path):
  df = metrics.load_scores_csv(write(tmp_path, seeded_rows()))
  mats, games = metrics.normalized_score_matrices(df)
  assert games == tuple(sorted(GAMES, key=games_lib.ALL_GAMES.index))  # ALL_GAMES order
  assert mats['A'].shape == (3, 5)
  a = metrics.aggregate(mats, reps=50, seed=3)
  b = metrics.aggregate(mats, reps=50, seed=3)
  c = metrics.aggregate(mats, reps=50, seed=4)
  assert not a.task_bootstrap  # several runs: resample runs within games only
  assert a.estimates == b.estimates and a.estimates != c.estimates
  # Each method's CI does not depend on which other methods are in the table.
  alone = metrics.aggregate({'B': mats['B']}, reps=50, seed=3)
  assert alone.estimates['B'] == a.estimates['B']
  # IQM is rliable's: trimmed mean over all runs x games.
  from scipy import stats
  assert a.estimates['A']['IQM'].point == pytest.approx(
      stats.trim_mean(mats['A'].ravel(), 0.25))


def test_performance_profile_is_a_decreasing_fraction(tmp_path):
  mats, _ = paper('paper:c2')
  taus = np.linspace(0, 4, 41)
  profiles, cis = metrics.performance_profiles(
      {'Scaled QL (80M)': mats['Scaled QL (80M)']}, taus, reps=REPS)
  p = profiles['Scaled QL (80M)']
  assert p.shape == (41,) and cis['Scaled QL (80M)'].shape == (2, 41)
  assert np.all(np.diff(p) <= 0) and 0 <= p.min() and p.max() <= 1
  # At tau = 1: the fraction of the 40 games above human.
  assert p[10] == pytest.approx(np.mean(mats['Scaled QL (80M)'] > 1.0))


@pytest.mark.parametrize('rows,columns,match', [
    ([('A', 'Pong', 1.0)], ('method', 'game', 'points'), "missing column.*score"),
    ([('A', 'Pongg', 1.0)], ('method', 'game', 'score'), "unknown game.*Pongg"),
    ([('A', 'Pong', 1.0), ('A', 'Pong', 2.0)], ('method', 'game', 'score'),
     "'A' game 'Pong' seed 0 appears 2 times"),
    ([('A', 'Pong', 'abc')], ('method', 'game', 'score'), 'row 2: score is not a finite'),
])
def test_bad_csv_errors_name_the_file(tmp_path, rows, columns, match):
  path = write(tmp_path, rows, columns=columns)
  with pytest.raises(metrics.ScoresFileError, match=match) as e:
    metrics.load_scores_csv(path)
  assert path in str(e.value)


def test_inconsistent_games_or_seeds_are_errors(tmp_path):
  rows = seeded_rows()[:-1]  # B lacks Hero for seed 2
  with pytest.raises(metrics.ScoresFileError, match=r"'B'.*\(2, 'Hero'\)"):
    metrics.normalized_score_matrices(metrics.load_scores_csv(write(tmp_path, rows)))
  rows = [r for r in seeded_rows() if not (r[0] == 'B' and r[1] == 'Hero')]
  with pytest.raises(metrics.ScoresFileError, match=r"'B' has no score for \['Hero'\]"):
    metrics.normalized_score_matrices(metrics.load_scores_csv(write(tmp_path, rows)))
  with pytest.raises(metrics.ScoresFileError, match='no such file'):
    metrics.load_scores_csv(os.path.join(tmp_path, 'missing.csv'))


def test_report_aggregate_command_writes_its_files(tmp_path, capsys):
  out = os.path.join(tmp_path, 'out')
  rc = cli.main(['report', 'aggregate', write(tmp_path, seeded_rows()), '--out', out,
                 '--reps', str(REPS)])
  assert rc == 0
  text = capsys.readouterr().out
  assert 'IQM' in text and 'Optimality Gap' in text
  for name in ('performance_profile.png', 'aggregate.md', 'aggregate.csv'):
    assert os.path.getsize(os.path.join(out, name)) > 0
  with open(os.path.join(out, 'performance_profile.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  table = pd.read_csv(os.path.join(out, 'aggregate.csv'))
  assert set(table.method) == {'A', 'B'} and len(table) == 8
  md = open(os.path.join(out, 'aggregate.md')).read()
  assert '| A | 3 |' in md


def test_report_aggregate_keeps_seed_cis_beside_a_one_run_method(tmp_path, capsys):
  rows = seeded_rows() + seeded_rows(methods=('C',), seeds=(0,))
  out, alone = os.path.join(tmp_path, 'mixed'), os.path.join(tmp_path, 'alone')
  assert cli.main(['report', 'aggregate', write(tmp_path, rows), '--out', out,
                   '--reps', str(REPS)]) == 0
  assert 'separate tables' in capsys.readouterr().out
  assert cli.main(['report', 'aggregate', write(tmp_path, seeded_rows(), name='ab.csv'),
                   '--out', alone, '--reps', str(REPS)]) == 0
  mixed = pd.read_csv(os.path.join(out, 'aggregate.csv')).set_index(['method', 'metric'])
  ab = pd.read_csv(os.path.join(alone, 'aggregate.csv')).set_index(['method', 'metric'])
  # A's and B's CIs are those of a file without C: over runs within each game, not over games.
  pd.testing.assert_frame_equal(mixed.loc[['A', 'B']], ab)
  assert set(mixed.loc['A', 'ci_over']) == {'runs within each game'}
  assert set(mixed.loc['C', 'ci_over']) == {'runs and games'}
  md = open(os.path.join(out, 'aggregate.md')).read()
  assert md.count('| Method | Runs |') == 2 and 'separate tables' in md
  # Asked for, games are resampled for every method.
  assert cli.main(['report', 'aggregate', write(tmp_path, rows, name='m.csv'), '--out', out,
                   '--reps', str(REPS), '--task-bootstrap', 'yes']) == 0
  every = pd.read_csv(os.path.join(out, 'aggregate.csv'))
  assert set(every['ci_over']) == {'runs and games'}


def test_report_aggregate_on_the_paper_table_and_bad_input(tmp_path, capsys):
  out = os.path.join(tmp_path, 'c2')
  assert cli.main(['report', 'aggregate', 'paper:c2', '--out', out, '--reps', str(REPS),
                   '--methods', 'Scaled QL (80M),DT (200M)']) == 0
  table = pd.read_csv(os.path.join(out, 'aggregate.csv')).set_index(['method', 'metric'])
  assert table.loc[('Scaled QL (80M)', 'IQM'), 'point'] == pytest.approx(114.1, abs=0.3)
  assert table.loc[('DT (200M)', 'Median'), 'point'] == pytest.approx(78.2, abs=0.3)
  capsys.readouterr()
  assert cli.main(['report', 'aggregate', 'paper:c2', '--out', out, '--methods', 'Nope']) == 2
  assert "--methods ['Nope'] not in the file" in capsys.readouterr().err


def test_rows_without_a_completed_episode_leave_their_game_out_for_every_method(tmp_path, capsys):
  from scaled_ql.eval import report
  rows = seeded_rows()
  # An evaluation-log CSV (`scaled-ql eval --out`) with a `method` column added: a new record of a
  # game with no completed episode has an empty score, an old one a partial return with `partial`.
  log_csv = os.path.join(tmp_path, 'log.csv')
  for m, g, s, seed in rows:
    no_episode = (m, g, seed) == ('A', 'Qbert', 1)
    old_partial = (m, g, seed) == ('B', 'Hero', 0)
    report.append_csv(log_csv, [report.EvalRecord(
        game=g, score=None if no_episode else s, normalized=None, param_version=0,
        evaluator=f'{m}/{seed}', episodes=0 if no_episode or old_partial else 3, time=0.0,
        partial=no_episode or old_partial)])
  df = pd.read_csv(log_csv)
  df.insert(0, 'method', [r[0] for r in rows])
  df['seed'] = [r[3] for r in rows]
  df.to_csv(log_csv, index=False)
  assert df['score'].isna().sum() == 1  # the empty cell, never a number

  loaded = metrics.load_scores_csv(log_csv)
  assert metrics.left_out_games(loaded) == {'Hero': [('B', 0)], 'Qbert': [('A', 1)]}
  mats, games = metrics.normalized_score_matrices(loaded)
  assert games == ('Breakout', 'Pong', 'Seaquest')
  kept = [r for r in rows if r[1] in games]
  ref, _ = metrics.normalized_score_matrices(metrics.load_scores_csv(write(tmp_path, kept)))
  for m in ('A', 'B'):
    np.testing.assert_array_equal(mats[m], ref[m])

  out = os.path.join(tmp_path, 'agg')
  assert cli.main(['report', 'aggregate', log_csv, '--out', out, '--reps', str(REPS)]) == 0
  note = ('Left out of every aggregate, for every method (no completed episode): '
          'Hero (B seed 0); Qbert (A seed 1).')
  assert note in capsys.readouterr().out
  md = open(os.path.join(out, 'aggregate.md')).read()
  assert note in md and 'over 3 games' in md

  # Nothing left: a clear error naming the file.
  none = write(tmp_path, [('A', 'Pong', '', 0, 0)], name='none.csv',
               columns=('method', 'game', 'score', 'seed', 'episodes'))
  with pytest.raises(metrics.ScoresFileError, match='none.csv: no row has a score'):
    metrics.load_scores_csv(none)


def test_aggregate_by_runs_keeps_seed_cis_beside_a_one_run_method():
  rng = np.random.default_rng(0)
  mats = {'A': rng.normal(size=(3, 4)), 'B': rng.normal(size=(2, 4)), 'C': rng.normal(size=(1, 4))}
  seeded, single = metrics.aggregate_by_runs(mats, reps=100, seed=0)
  assert not seeded.task_bootstrap and single.task_bootstrap
  assert set(seeded.runs) == {'A', 'B'} and set(single.runs) == {'C'}
  alone = metrics.aggregate({'A': mats['A'], 'B': mats['B']}, reps=100, seed=0)
  assert seeded.estimates == alone.estimates  # as if the 1-run method were not there
  assert len(metrics.aggregate_by_runs({'A': mats['A']}, reps=10)) == 1
  # Few runs per game: the footnote warns that the intervals are likely too narrow.
  assert 'With 2 runs per game (fewer than 5)' in metrics.markdown_table(seeded)
  assert 'too narrow' not in metrics.markdown_table(single)  # games resampled too
  many = metrics.aggregate({'D': rng.normal(size=(6, 4))}, reps=10)
  assert 'too narrow' not in metrics.markdown_table(many)

"""`scaled-ql report compare` (scaled_ql.eval.compare) on runs and CSVs written as the evaluator
writes them, against hand-computed values."""
import csv
import json
import os

import numpy as np
import pytest

from scaled_ql.eval import compare, metrics, normalization, report

REPS = 100


def _rec(game, score, step, evaluator='eval0', episodes=3):
  no_score = episodes == 0
  return report.EvalRecord(
      game=game, score=None if no_score else score,
      normalized=None if no_score else normalization.human_normalized(game, score),
      param_version=step, evaluator=evaluator, episodes=episodes, time=1.0, steps=100)


@pytest.fixture
def run_dir(tmp_path):
  """A run: Breakout and Amidar scored, Boxing never completes an episode."""
  workdir = tmp_path / 'my_run'
  report.append_records(str(workdir / 'eval' / 'eval0.jsonl'), [
      _rec('Breakout', 10.0, 100), _rec('Amidar', 300.0, 100), _rec('Boxing', 0.0, 100, episodes=0),
      _rec('Breakout', 40.0, 200), _rec('Amidar', 0.0, 200, episodes=0),
      _rec('Boxing', 0.0, 200, episodes=0)])
  report.append_records(str(workdir / 'eval' / 'eval1.jsonl'), [_rec('Breakout', 60.0, 200,
                                                                    evaluator='eval1')])
  (workdir / 'config.json').write_text(json.dumps({'data': {'selection': 'suboptimal'}}))
  return str(workdir)


def _paper(table, method, game):
  with open(os.path.join(metrics.DATA_DIR, metrics.PAPER_TABLES[f'paper:{table}'][0])) as f:
    for r in csv.DictReader(f):
      if r['method'] == method and r['game'] == game:
        return float(r['score'])
  raise KeyError((table, method, game))


def test_run_against_table_c1_by_hand(run_dir):
  c = compare.compare([run_dir], reps=REPS, seed=0)
  assert c.table == 'c1'  # from config.json: data.selection suboptimal
  assert c.games == ('Amidar', 'Breakout')  # Boxing: no completed episode
  # Final evaluation per game: Breakout at step 200, two evaluators pooled (3 episodes each);
  # Amidar's step-200
  # evaluation has no completed episode, so its last scored one (step 100) counts.
  assert c.raw['my_run'] == {'Breakout': 50.0, 'Amidar': 300.0}
  assert 'Human' not in c.methods
  assert c.methods[0] == 'my_run' and c.methods[1:] == c.paper_methods
  for m in c.paper_methods:
    assert c.raw[m]['Breakout'] == _paper('c1', m, 'Breakout')
  # Aggregates: the rliable functions of metrics.py on hand-normalized scores, same bootstrap.
  ours = np.array([[(300.0 - 5.8) / (1719.5 - 5.8), (50.0 - 1.7) / (30.5 - 1.7)]])
  sq = [_paper('c1', 'Scaled QL (80M)', g) for g in ('Amidar', 'Breakout')]
  sq = np.array([[(sq[0] - 5.8) / (1719.5 - 5.8), (sq[1] - 1.7) / (30.5 - 1.7)]])
  expected = metrics.aggregate({'my_run': ours, 'Scaled QL (80M)': sq}, reps=REPS, seed=0)
  for m in ('my_run', 'Scaled QL (80M)'):
    for name in metrics.AGGREGATES:
      assert c.aggregates.estimates[m][name] == expected.estimates[m][name], (m, name)
  assert c.aggregates.estimates['my_run']['Mean'].point == pytest.approx(ours.mean())
  assert c.aggregates.task_bootstrap  # one run per method: games are resampled too
  assert any('Boxing (my_run)' in n and report.NO_EPISODE in n for n in c.notes)
  assert any('learner step 100..200' in n for n in c.notes)
  assert not any('protocol' in n for n in c.notes)  # the records do not name theirs


def test_runs_evaluated_under_different_protocols_are_named(tmp_path):
  """A fine-tuning run evaluated in Breakout's mode 12 beside a default-mode run: compared, with
  a note that names each run's protocol."""
  import dataclasses
  runs = []
  for name, mode in (('default_mode', None), ('mode_12', 12)):
    workdir = tmp_path / name
    report.append_records(str(workdir / 'eval' / 'eval0.jsonl'), [dataclasses.replace(
        _rec(g, s, 100), game_mode=mode, sticky_action_prob=0.0, max_episode_frames=108_000,
        epsilon=0.001) for g, s in (('Breakout', 10.0), ('Amidar', 300.0))])
    runs.append(str(workdir))
  c = compare.compare(runs, table='c1', reps=REPS, seed=0)
  note = [n for n in c.notes if 'protocol' in n]
  assert note == ["the inputs were evaluated under different protocols: default_mode: the ROM's "
                  'default mode, no sticky actions, 108000-frame cap, epsilon 0.001; mode_12: '
                  'mode 12, no sticky actions, 108000-frame cap, epsilon 0.001']
  assert 'different protocols' in compare.format_text(c)
  # The same through an evaluator CSV (`scaled-ql eval --out`), and one input alone: no note.
  csv_path = str(tmp_path / 'mode_12.csv')
  report.append_csv(csv_path, report.read_eval_logs(runs[1]).records)
  c = compare.compare([runs[0], csv_path], table='c1', reps=REPS, seed=0)
  assert [n for n in c.notes if 'protocol' in n] == [note[0]]
  assert not any('protocol' in n for n in compare.compare(
      [csv_path], table='c1', reps=REPS, seed=0).notes)
  # A run whose final evaluations mix protocols says so itself (and is one input: no second
  # note).
  report.append_records(os.path.join(runs[0], 'eval', 'eval0.jsonl'), [dataclasses.replace(
      _rec('Amidar', 200.0, 200), sticky_action_prob=0.25, max_episode_frames=108_000)])
  assert [n for n in compare.compare([runs[0]], table='c1', reps=REPS, seed=0).notes
          if 'protocol' in n] == [
      "default_mode: its final evaluations mix protocols: the ROM's default mode, no sticky "
      "actions, 108000-frame cap, epsilon 0.001 | the ROM's default mode, sticky actions 0.25, "
      '108000-frame cap']


def test_cli_prints_and_writes_side_by_side(run_dir, tmp_path, capsys):
  from scaled_ql import cli
  out = tmp_path / 'cmp'
  rc = cli.main(['report', 'compare', run_dir, '--table', 'c2', '--reps', str(REPS),
                 '--out', str(out)])
  text = capsys.readouterr().out
  assert rc == 0, text
  assert 'Compared on 2 games with Table C.2 (near-optimal data)' in text
  # human (50 - 1.7) / (30.5 - 1.7) = 1.677; DQN (shipped Breakout 96.23) 48.3 / 94.53 = 0.511
  assert 'Breakout  50.0 (168%, DQN 51%)' in text
  assert f'{_paper("c2", "DT (200M)", "Breakout"):.1f}' in text
  assert 'IQM' in text and '95% stratified-bootstrap CIs' in text
  assert 'Boxing (my_run)' in text
  with open(out / 'compare.csv') as f:
    rows = list(csv.DictReader(f))
  mine = {r['game']: r for r in rows if r['method'] == 'my_run'}
  assert float(mine['Breakout']['human_normalized_pct']) == pytest.approx(48.3 / 28.8 * 100,
                                                                           abs=1e-3)
  assert float(mine['Breakout']['dqn_normalized_pct']) == pytest.approx(48.3 / 94.53 * 100,
                                                                          abs=1e-3)
  assert {r['method'] for r in rows if r['source'] == 'paper:c2'} == set(
      compare.compare([run_dir], 'c2', reps=10).paper_methods)
  assert (out / 'compare.md').read_text().startswith('# Compared with Table C.2 on 2 games')


def test_csv_inputs_evaluator_csv_and_dqn_column(run_dir, tmp_path):
  scores = tmp_path / 'baseline.csv'
  scores.write_text('method,game,score,seed\nbase,Breakout,20,0\nbase,Breakout,30,1\n'
                    'base,Amidar,100,0\nbase,Amidar,200,1\nbase,Pong,5,0\nbase,Pong,6,1\n')
  evaluator_csv = tmp_path / 'eval_out.csv'  # what `scaled-ql eval --out` writes
  report.append_csv(str(evaluator_csv), [_rec('Breakout', 12.0, 7), _rec('Amidar', 80.0, 7),
                                         _rec('Pong', 3.0, 7)])
  ref = tmp_path / 'dqn.csv'
  ref.write_text('game,dqn_score,source\nBreakout,100.0,hand-made for this test\n')
  c = compare.compare([run_dir, str(scores), str(evaluator_csv)], reps=REPS,
                      dqn_reference=str(ref))
  assert c.methods[:3] == ('my_run', 'base', 'eval_out')
  assert c.games == ('Amidar', 'Breakout')  # Pong: not a Table C.1 game
  assert c.raw['base'] == {'Breakout': 25.0, 'Amidar': 150.0}  # mean over seeds
  assert c.raw['eval_out'] == {'Breakout': 12.0, 'Amidar': 80.0}
  assert c.aggregates.runs['base'] == 2 and c.aggregates.runs['eval_out'] == 1
  assert any('Pong' in n and 'not in Table C.1' in n for n in c.notes)
  rows = compare.per_game_rows(c)
  breakout = rows[[r[0] for r in rows].index('Breakout')]
  assert breakout[1] == '50.0 (168%, DQN 49%)'  # (50 - 1.7) / (100 - 1.7) = 0.491
  amidar = rows[[r[0] for r in rows].index('Amidar')]
  assert 'DQN' not in amidar[1]


def test_bad_inputs_are_named(run_dir, tmp_path):
  scores = tmp_path / 's.csv'
  scores.write_text('method,game,score\nx,Breakout,1\n')
  with pytest.raises(compare.CompareError, match='pass --table c1'):
    compare.compare([str(scores)], reps=10)
  with pytest.raises(compare.CompareError, match='neither a run workdir'):
    compare.compare([str(tmp_path / 'nothing')], 'c1', reps=10)
  clash = tmp_path / 'c.csv'
  clash.write_text('method,game,score\nScaled QL (80M),Breakout,1\n')
  with pytest.raises(compare.CompareError, match="method 'Scaled QL \\(80M\\)' also comes"):
    compare.compare([str(clash)], 'c1', reps=10)
  pong = tmp_path / 'p.csv'
  pong.write_text('method,game,score\nx,Pong,1\n')
  with pytest.raises(compare.CompareError, match='no game has a score in every input'):
    compare.compare([str(pong)], 'c1', reps=10)
  from scaled_ql import cli
  assert cli.main(['report', 'compare', str(scores)]) == 2

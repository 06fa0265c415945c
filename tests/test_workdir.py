"""A workdir's config on resume (issue 12): compared before config.json is overwritten, refused
changes, allowed ones, config_history.jsonl; output paths checked before any work; gs:// data dirs
that cannot be reached reported as such."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scaled_ql import cli
from scaled_ql.configs import overrides
from scaled_ql.configs.overrides import ConfigError
from scaled_ql.launch import run

SCALED_QL = [sys.executable, '-m', 'scaled_ql.cli']


def _cfg(*sets, config='cpu_tiny'):
  return run.resolve_config(config, overrides=list(sets))


def _history(workdir):
  with open(os.path.join(workdir, run.CONFIG_HISTORY)) as f:
    return [json.loads(line) for line in f]


def _config_json(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    return json.load(f)


@pytest.mark.parametrize('change', [
    'games=Pong,Qbert', 'network.feature_norm=false', 'agent.cql_alpha=0.1',
    'data.selection=uniform:5', 'data.run=2', 'train.seed=1', 'eval.epsilon=0.05',
])
def test_resume_refuses_a_change_of_what_the_run_is(change, tmp_path):
  workdir = str(tmp_path / 'w')
  first = _cfg('agent.learning_rate=1e-4')
  run.prepare_workdir(first, workdir, log=lambda line: None)
  before = open(os.path.join(workdir, 'config.json')).read()
  changed = _cfg('agent.learning_rate=1e-4', change)
  key = change.split('=')[0]
  with pytest.raises(ConfigError, match=f'ran a different config; resuming would change {key}: '
                     '.*--allow-config-change'):
    run.prepare_workdir(changed, workdir, log=lambda line: None)
  # Compared before anything is written: config.json and the history are the first start's.
  assert open(os.path.join(workdir, 'config.json')).read() == before
  assert len(_history(workdir)) == 1
  # Intended: allowed, recorded.
  changes = run.prepare_workdir(changed, workdir, allow_config_change=True,
                                log=lambda line: None)
  assert key in changes
  assert overrides.from_json_dict(_config_json(workdir), 'config.json') == changed
  last = _history(workdir)[-1]
  assert last['resumed'] and last['allow_config_change'] and key in last['changes']
  assert last['overrides'] == ['agent.learning_rate=1e-4', change]


def test_resume_allows_budget_and_cadence_changes_and_keeps_a_history(tmp_path):
  workdir = str(tmp_path / 'w')
  first = _cfg('agent.cql_alpha=0.1')
  assert run.prepare_workdir(first, workdir, log=lambda line: None) == {}
  lines = []
  second = run.resolve_config('cpu_tiny', steps=500, data_dir=str(tmp_path / 'moved'),
                              overrides=['agent.cql_alpha=0.1', 'eval.eval_every_seconds=5',
                                         'train.log_every_steps=1', 'eval.steps_per_game=7'])
  changes = run.prepare_workdir(second, workdir, log=lines.append)
  assert set(changes) == {'train.num_steps', 'data.data_dir', 'eval.eval_every_seconds',
                          'train.log_every_steps', 'eval.steps_per_game'}
  assert changes['train.num_steps'] == (20, 500)
  assert 'resuming' in lines[0] and 'train.num_steps: 20 -> 500' in lines[0]
  history = _history(workdir)
  assert [h['resumed'] for h in history] == [False, True]
  assert history[0]['overrides'] == ['agent.cql_alpha=0.1'] and history[0]['changes'] == {}
  assert history[1]['changes']['train.num_steps'] == [20, 500]
  assert history[1]['config']['train']['num_steps'] == 500
  assert _config_json(workdir)['train']['num_steps'] == 500
  # The same config again: a third line, no changes.
  assert run.prepare_workdir(second, workdir, log=lambda line: None) == {}
  assert len(_history(workdir)) == 3


def test_a_field_added_since_counts_only_if_moved_off_its_default(tmp_path):
  workdir = str(tmp_path / 'w')
  os.makedirs(workdir)
  old = json.loads(_cfg().to_json())
  del old['agent']['bcq_tau'], old['overrides']  # a config.json written before these existed

  def write_old():
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(old, f)

  write_old()
  assert run.prepare_workdir(_cfg(), workdir, log=lambda line: None) == {}
  write_old()
  with pytest.raises(ConfigError, match=r"agent.bcq_tau: '\(absent\)' -> 0.5"):
    run.prepare_workdir(_cfg('agent.bcq_tau=0.5'), workdir, log=lambda line: None)


def test_resume_policy_covers_the_issue_list():
  refused = [p for p in overrides.fields() if run.resume_refuses(p)]
  for path in ('games', 'network.encoder', 'agent.cql_alpha', 'data.selection', 'data.run',
               'train.seed', 'finetune.epsilon_end'):
    assert path in refused
  for path in ('train.num_steps', 'train.log_every_steps', 'train.checkpoint_every_steps',
               'eval.eval_every_seconds', 'eval.eval_every_steps', 'eval.steps_per_game',
               'data.data_dir', 'name', 'finetune.num_actors'):
    assert path not in refused


def test_learn_refuses_a_changed_config_before_starting_anything(tiny_dataset_dir, tmp_path,
                                                                 capsys):
  workdir = tmp_path / 'w'
  run.prepare_workdir(run.resolve_config('cpu_tiny', tiny_dataset_dir), str(workdir),
                      log=lambda line: None)
  rc = cli.main(['learn', '--config', 'cpu_tiny', '--data-dir', tiny_dataset_dir, '--workdir',
                 str(workdir), '--set', 'data.selection=uniform:50'])
  assert rc == 2
  assert "data.selection: 'suboptimal' -> 'uniform:50'" in capsys.readouterr().err
  # No learner started (the lock file stays: `run.workdir_lock`).
  assert sorted(os.listdir(workdir)) == ['config.json', run.CONFIG_HISTORY, run.LOCK_FILE]


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
  afile = tmp_path / 'afile'
  afile.write_text('x')
  with pytest.raises(ConfigError, match="is not a directory"):
    run.check_output_file(str(afile / 'x.csv'), '--out')
  with pytest.raises(ConfigError, match='does not exist'):
    run.check_output_file(str(tmp_path / 'nonexistent' / 'x.csv'), '--out')
  with pytest.raises(ConfigError, match='is a directory'):
    run.check_output_file(str(tmp_path), '--out')
  run.check_output_file(str(tmp_path / 'x.csv'), '--out')
  with pytest.raises(ConfigError, match='exists and is not a directory'):
    run.check_workdir(str(afile))
  with pytest.raises(ConfigError, match='is a file, not a directory'):
    run.check_workdir(str(afile / 'sub' / 'w'))
  run.check_workdir(str(tmp_path / 'new' / 'w'))  # creatable; nothing created by the check
  assert not (tmp_path / 'new').exists()
  # `eval --out` fails at once, before the checkpoint is read (there is none here), and creates
  # nothing.
  for out, message in ((afile / 'x.csv', 'is not a directory'),
                       (tmp_path / 'nonexistent' / 'x.csv', 'does not exist')):
    assert cli.main(['eval', '--checkpoint', str(tmp_path / 'no_run'), '--games', 'Pong',
                     '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: --out') and message in err
  assert not (tmp_path / 'nonexistent').exists()
  # A workdir that is a file: train fails before anything starts.
  assert cli.main(['train', '--config', 'cpu_tiny', '--data-dir', str(tmp_path),
                   '--workdir', str(afile)]) == 2


def test_a_url_as_workdir_or_output_is_refused_before_any_work(tiny_dataset_dir, tmp_path,
                                                               monkeypatch, capsys):
  """`--workdir gs://b/run` used to become a local folder `./gs:/b/run` (config, logs and lock
  written there) and crash in the TensorBoard writer, with Reverb and the inserters started."""
  monkeypatch.chdir(tmp_path)
  for argv in (['learn', '--config', 'cpu_tiny', '--data-dir', tiny_dataset_dir,
                '--workdir', 'gs://a-bucket/run'],
               ['train', '--config', 'cpu_tiny', '--data-dir', tiny_dataset_dir,
                '--workdir', 'gs://a-bucket/run'],
               ['eval', '--checkpoint', str(tmp_path / 'no_run'), '--games', 'Pong', '--out',
                'gs://a-bucket/x.csv'],
               # Read as local paths, these said "no checkpoints in 'gs://...'": a wrong reason.
               ['eval', '--checkpoint', 'gs://a-bucket/run', '--games', 'Pong'],
               ['finetune', 'offline', '--game', 'Pong', '--pretrained', 'gs://a-bucket/run',
                '--workdir', str(tmp_path / 'ft'), '--data-dir', tiny_dataset_dir]):
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "'gs://a-bucket/" in err and 'is a URL' in err and 'local or mounted path' in err, err
  assert os.listdir(tmp_path) == []  # no ./gs: folder


def test_check_data_reports_an_unreachable_bucket_as_such(tmp_path):
  """A gs:// data dir behind an unreachable endpoint (a closed local port as the HTTPS proxy, so
  the result is the same with or without network) and no credentials: `learn` says the bucket
  could not be reached and which credentials it had, not that the data does not exist."""
  env = dict(os.environ, HOME=str(tmp_path), NO_GCE_CHECK='true',
             GCS_RETRY_CONFIG_MAX_RETRIES='0', HTTPS_PROXY='http://127.0.0.1:9',
             https_proxy='http://127.0.0.1:9',
             GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / 'missing.json'))
  out = subprocess.run(SCALED_QL + ['learn', '--config', 'cpu_tiny', '--data-dir',
                                    'gs://scaled-ql-test-bucket/tensorflow_datasets',
                                    '--workdir', str(tmp_path / 'w')],
                       capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 2, out.stderr[-2000:]
  err = out.stderr.splitlines()[-1]
  assert err.startswith("error: --data-dir: 'gs://scaled-ql-test-bucket/tensorflow_datasets': it "
                        'could not be reached'), err
  assert f'GOOGLE_APPLICATION_CREDENTIALS={tmp_path / "missing.json"} (no such file)' in err
  assert 'does not exist' not in err
  assert not (tmp_path / 'w').exists()


def test_check_data_names_a_bad_selection_and_missing_games(tiny_dataset_dir):
  with pytest.raises(ConfigError, match="data.selection: unknown data selection 'best'"):
    run.check_data(run.resolve_config('cpu_tiny', tiny_dataset_dir,
                                      overrides=['data.selection=best']))
  with pytest.raises(ConfigError, match=r"no rlu_atari_checkpoints_ordered data for game\(s\) "
                     r"\['Qbert'\]"):
    run.check_data(run.resolve_config('cpu_tiny', tiny_dataset_dir, games='Pong,Qbert'))
  run.check_data(run.resolve_config('cpu_tiny', tiny_dataset_dir, games='Pong'))


def test_check_data_refuses_empty_game_folders_and_missing_splits(tiny_dataset_dir, tmp_path):
  """The probe of issue 12 (game folders that exist but hold nothing) fails before launch, naming
  the game and the path; so does a checkpoint range the data does not have."""
  import shutil
  data = tmp_path / 'empty_games'
  shutil.copytree(tiny_dataset_dir, data)
  for entry in (data / 'rlu_atari_checkpoints_ordered' / 'Pong_run_1').iterdir():
    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
  with pytest.raises(ConfigError, match=r"Pong run 1: no prepared version .* versions present "
                     r".*Pong_run_1: none"):
    run.check_data(run.resolve_config('cpu_tiny', str(data)))
  run.check_data(run.resolve_config('cpu_tiny', str(data), games='Breakout'))
  with pytest.raises(ConfigError, match=r"checkpoint_07.* do not exist"):
    run.check_data(run.resolve_config('cpu_tiny', tiny_dataset_dir,
                                      overrides=['data.selection=checkpoints:0-7']))


def test_allowed_param_change_is_refused_while_checkpoints_of_the_old_one_exist(tmp_path):
  """With --allow-config-change, a games/network/agent change still cannot be resumed from
  checkpoints of the old one (the learner refuses them); prepare_workdir says so before launch,
  while other intended changes (here the data selection) go through."""
  sys.path.insert(0, os.path.dirname(__file__))
  from test_learner import make  # pylint: disable=import-outside-toplevel  (a cpu_tiny Learner)
  from scaled_ql.agents import checkpointing
  workdir = str(tmp_path / 'w')
  cfg = _cfg()
  run.prepare_workdir(cfg, workdir, log=lambda line: None)
  learner = make(cfg, workdir=workdir, handle_signals=False)
  learner.step()
  learner.save()
  learner.close()
  alpha = _cfg('agent.cql_alpha=0.1')
  with pytest.raises(ConfigError, match=r"holds checkpoints \(steps \[1\]\) of another agent "
                     r"config \(agent.cql_alpha: 0.05 -> 0.1\); the learner cannot resume"):
    run.prepare_workdir(alpha, workdir, allow_config_change=True, log=lambda line: None)
  selection = _cfg('data.selection=uniform:5')
  assert 'data.selection' in run.prepare_workdir(selection, workdir, allow_config_change=True,
                                                 log=lambda line: None)
  # Why: a learner of the changed agent config refuses those checkpoints.
  other = make(alpha, workdir=workdir, handle_signals=False)
  with pytest.raises(checkpointing.ConfigMismatchError, match="different 'agent' config"):
    other.restore()
  other.close()


def test_demo_refuses_a_changed_config_before_generating_data(tmp_path, capsys):
  workdir, data = str(tmp_path / 'demo'), tmp_path / 'data'
  run.prepare_workdir(run.resolve_config('cpu_small', str(data), None, 1), workdir,
                      log=lambda line: None)
  assert cli.main(['demo', '--workdir', workdir, '--data-dir', str(data), '--set',
                   'agent.cql_alpha=0.1']) == 2
  assert 'agent.cql_alpha: 0.05 -> 0.1' in capsys.readouterr().err
  assert not data.exists()  # nothing generated


def test_demo_whose_budget_the_data_used_up_says_so(tiny_dataset_dir, tmp_path, capsys):
  """`demo --minutes M` is the whole demo's budget: when the data (here only checked: it exists)
  leaves nothing for training and evaluation, the demo says so instead of starting a run."""
  workdir = str(tmp_path / 'demo')
  assert cli.main(['demo', '--workdir', workdir, '--data-dir', tiny_dataset_dir, '--games',
                   'Breakout,Pong', '--minutes', '0.00001']) == 2
  err = capsys.readouterr().err
  assert '--minutes 1e-05: the data took' in err and 'nothing is left' in err, err
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


# Holds a workdir's lock in another process until it is killed.
_HOLDER = """
import sys, time
from scaled_ql.launch import run
with run.workdir_lock(sys.argv[1]):
  print('held', flush=True)
  time.sleep(600)
"""


def _hold(workdir) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, '-c', _HOLDER, str(workdir)], stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_a_second_run_in_a_live_workdir_is_refused_naming_the_first(tiny_dataset_dir, tmp_path,
                                                                    capsys):
  """Two runs in one workdir would resume from the same checkpoint and write over each other's
  checkpoints and logs: while one holds it, every command that writes a workdir is refused with
  the holder's pid and command line, before it writes anything or starts Ray; a killed holder
  leaves no stale lock."""
  import ray
  workdir, data = tmp_path / 'w', tmp_path / 'demo_data'
  holder = _hold(workdir)
  try:
    with pytest.raises(ConfigError, match=rf'is in use by another run \(pid {holder.pid} on '):
      with run.workdir_lock(str(workdir)):
        pass
    common = ['--workdir', str(workdir)]
    for argv in (['learn', '--config', 'cpu_tiny', '--data-dir', tiny_dataset_dir],
                 ['train', '--config', 'cpu_tiny', '--data-dir', tiny_dataset_dir],
                 ['finetune', 'online', '--game', 'Pong', '--from-scratch', '--config',
                  'cpu_tiny'],
                 ['demo', '--data-dir', str(data), '--games', 'Breakout,Pong']):
      assert cli.main(argv + common) == 2, argv
      err = capsys.readouterr().err
      assert f'pid {holder.pid} on ' in err and '-c' in err and 'Stop that run first' in err, err
    assert os.listdir(workdir) == [run.LOCK_FILE]  # nothing recorded
    assert not data.exists()  # the demo generated nothing
    assert not ray.is_initialized()
  finally:
    holder.kill()
    holder.wait()
  with run.workdir_lock(str(workdir)):  # SIGKILL: the kernel dropped the lock with its process
    with open(workdir / run.LOCK_FILE) as f:
      assert json.load(f)['pid'] == os.getpid()


def test_the_workdir_lock_is_reentrant_in_a_process_and_released_at_the_end(tmp_path):
  workdir = str(tmp_path / 'w')
  with run.workdir_lock(workdir):
    with run.workdir_lock(workdir):  # (the demo holds it around `train`)
      pass
    holder = subprocess.run([sys.executable, '-c', _HOLDER, workdir], capture_output=True,
                            text=True, timeout=60)
    assert holder.returncode != 0 and 'is in use by another run' in holder.stderr  # still held
  holder = _hold(workdir)  # released at the end of the outer block
  holder.kill()
  holder.wait()

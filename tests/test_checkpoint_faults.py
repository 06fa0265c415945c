"""Checkpoint faults (issue 12): a damaged newest checkpoint is moved aside and restoring falls back
to the newest one that loads; Orbax's temporary folders of interrupted saves are removed. The
`train` command resuming past a truncated newest checkpoint is checked in tests/test_program.py
(one program run with its SIGTERM test)."""
import logging
import os
import shutil
import threading
import time

import pytest

from scaled_ql.agents import checkpointing
from test_learner import CFG, make


def _truncate_step(workdir, step):
  root = os.path.join(workdir, 'checkpoints', str(step))
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _run_with_checkpoints(workdir, steps=(1, 2)):
  learner = make(workdir=workdir)
  for _ in range(max(steps)):
    learner.step()
    if learner.steps in steps:
      learner.save()
  learner.close()


@pytest.mark.parametrize('damage', ['truncated', 'state_missing'])
def test_restore_falls_back_past_a_truncated_newest_checkpoint(tmp_path, caplog, damage):
  """A damaged newest checkpoint is moved aside and the learner resumes from the one before.
  `state_missing` (a partial copy: config but no arrays): Orbax restored the missing item as
  None, which the learner read as "no checkpoint", and the run restarted from step 0."""
  workdir = str(tmp_path / 'run')
  _run_with_checkpoints(workdir)
  if damage == 'truncated':
    _truncate_step(workdir, 2)
  else:
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '2', 'state'))
  learner = make(workdir=workdir)
  with caplog.at_level(logging.WARNING, logger='scaled_ql.agents.checkpointing'):
    assert learner.restore()
  assert learner.steps == 1
  corrupt = os.path.join(workdir, 'checkpoints', 'corrupt-2')
  assert os.path.isdir(corrupt) and not os.path.exists(os.path.join(workdir, 'checkpoints', '2'))
  assert any(corrupt in r.getMessage() and 'does not load' in r.getMessage()
             for r in caplog.records)
  # Training goes on and checkpoints step 2 again; the damaged copy stays for the operator.
  learner.step()
  learner.save()
  learner.close()
  cfg, _, step = checkpointing.load_params(workdir)
  assert step == 2 and cfg == CFG and os.path.isdir(corrupt)


def test_load_params_falls_back_and_an_all_damaged_dir_is_an_error(tmp_path, caplog):
  """A reader skips a damaged step and moves nothing. When no step loads, neither a reader nor
  the learner moves anything: the error names every step (before, the learner moved them all
  aside and restarted the run from step 0, whatever the cause: an unreadable filesystem, or code
  that no longer reads the run's state)."""
  workdir = str(tmp_path / 'run')
  checkpoints = os.path.join(workdir, 'checkpoints')
  _run_with_checkpoints(workdir)
  _truncate_step(workdir, 2)
  with caplog.at_level(logging.WARNING, logger='scaled_ql.agents.checkpointing'):
    _, _, step = checkpointing.load_params(workdir)
  assert step == 1 and sorted(os.listdir(checkpoints)) == ['1', '2']
  assert any('checkpoint 2 in' in r.getMessage() and 'does not load' in r.getMessage()
             for r in caplog.records)
  _truncate_step(workdir, 1)
  with pytest.raises(checkpointing.NoCheckpointLoadsError,
                     match=r'holds no complete checkpoint that loads; nothing was moved or '
                     r'deleted\. Each step, newest first: 2: .*; 1: '):
    checkpointing.load_params(workdir)
  learner = make(workdir=workdir)
  with pytest.raises(checkpointing.NoCheckpointLoadsError, match='nothing was moved'):
    learner.restore()
  assert learner.steps == 0
  learner.close()
  assert sorted(os.listdir(checkpoints)) == ['1', '2']
  # Once the operator moves the damaged steps aside, a learner starts from scratch.
  for bad in ('1', '2'):
    os.rename(os.path.join(checkpoints, bad), os.path.join(tmp_path, bad))
  learner = make(workdir=workdir)
  assert not learner.restore() and learner.steps == 0
  learner.close()


def test_a_step_deleted_while_it_is_read_is_skipped_not_moved_aside(tmp_path, monkeypatch):
  """A reader (`scaled-ql eval`, `finetune --pretrained`) of a running learner's workdir meets a
  step that max_to_keep is deleting: its arrays are gone, its folder not yet. It fails to load as
  a damaged step does. A reader skips it and renames nothing (a rename to corrupt-<step> would
  make the learner's own delete fail)."""
  workdir = str(tmp_path / 'run')
  _run_with_checkpoints(workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  state_of = checkpointing._state_of  # pylint: disable=protected-access

  def deleted_as_it_is_read(manager, step, abstract_state):
    step_dir = os.path.join(checkpoints, str(step))
    if step == 2:  # the learner's delete: the arrays first, the folder 0.2 s after the failure
      shutil.rmtree(os.path.join(step_dir, 'state'))
      threading.Timer(0.2, shutil.rmtree, (step_dir, True)).start()  # (gone if moved aside)
    return state_of(manager, step, abstract_state)

  monkeypatch.setattr(checkpointing, '_state_of', deleted_as_it_is_read)
  _, _, step = checkpointing.load_params(workdir)
  time.sleep(0.5)
  assert step == 1 and sorted(os.listdir(checkpoints)) == ['1']


def test_a_different_config_is_not_treated_as_corruption(tmp_path):
  workdir = str(tmp_path / 'run')
  _run_with_checkpoints(workdir, steps=(1,))
  other = make(CFG.replace(agent=dict(cql_alpha=0.0)), workdir=workdir)
  with pytest.raises(checkpointing.ConfigMismatchError, match="different 'agent' config"):
    other.restore()
  other.close()
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['1']  # nothing moved aside


def test_temporary_folders_of_interrupted_saves_are_removed(tmp_path):
  workdir = str(tmp_path / 'run')
  _run_with_checkpoints(workdir, steps=(1,))
  tmp = os.path.join(workdir, 'checkpoints', '2.orbax-checkpoint-tmp-1700000000000000')
  os.makedirs(os.path.join(tmp, 'state'))
  with open(os.path.join(tmp, 'state', 'partial'), 'wb') as f:
    f.write(b'x' * 100)
  learner = make(workdir=workdir)
  assert not os.path.exists(tmp)
  assert learner.restore() and learner.steps == 1
  learner.close()


def test_eval_command_uses_the_newest_checkpoint_that_loads(tmp_path, capsys):
  from scaled_ql import cli
  workdir = str(tmp_path / 'run')
  _run_with_checkpoints(workdir)
  _truncate_step(workdir, 2)
  rc = cli.main(['eval', '--checkpoint', workdir, '--games', 'Pong', '--steps', '6',
                 '--num-envs', '2'])
  out, err = capsys.readouterr()
  assert rc == 0, err
  assert 'step 1 ' in out  # the damaged step 2 is skipped, and left where it is (a reader)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2']
  assert 'step 1 (the online params) on Pong' in out  # cpu_tiny keeps no moving average


def test_checkpoints_at_the_keep_period_outlive_max_to_keep(tmp_path):
  """train.keep_checkpoint_every_steps: the run's history stays for `eval --step`; the rest go
  as before (the newest checkpointing.MAX_TO_KEEP stay)."""
  def steps_kept(keep):
    workdir = str(tmp_path / f'run_keep_{keep}')
    learner = make(CFG.replace(train=dict(checkpoint_every_steps=1,
                                          keep_checkpoint_every_steps=keep)), workdir=workdir)
    for _ in range(7):
      learner.step()  # saves every step
    learner.close()
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')))

  assert checkpointing.MAX_TO_KEEP == 3
  assert steps_kept(None) == [5, 6, 7]
  assert steps_kept(2) == [2, 4, 5, 6, 7]


def test_eval_command_evaluates_several_steps_and_refuses_a_missing_one(tmp_path, capsys):
  from scaled_ql import cli
  from scaled_ql.eval import commands
  workdir = str(tmp_path / 'run')
  _run_with_checkpoints(workdir, steps=(1, 2, 3))
  assert checkpointing.saved_steps(workdir) == [1, 2, 3]
  assert checkpointing.saved_steps(os.path.join(workdir, 'checkpoints')) == [1, 2, 3]
  assert commands.parse_steps(None, [1, 2]) == [None]
  assert commands.parse_steps('all', [1, 2]) == [1, 2]
  assert commands.parse_steps('2, 1', [1, 2]) == [2, 1]
  out_csv = str(tmp_path / 'scores.csv')
  rc = cli.main(['eval', '--checkpoint', workdir, '--games', 'Pong', '--steps', '6',
                 '--num-envs', '1', '--step', '1,3', '--out', out_csv])
  out, err = capsys.readouterr()
  assert rc == 0, err
  assert out.index('step 1 (the online params)') < out.index('step 3 (the online params)')
  assert 'step 2 ' not in out
  history = out[out.index('scores by checkpoint step'):].splitlines()
  assert history[1].split()[:2] == ['step', 'Pong'] and [h.split()[0] for h in history[2:4]] == [
      '1', '3']
  import csv
  with open(out_csv) as f:
    assert [r['param_version'] for r in csv.DictReader(f)] == ['1', '3']
  # A step the workdir does not hold: an error naming it and the saved steps, nothing evaluated.
  rc = cli.main(['eval', '--checkpoint', workdir, '--step', '1,7'])
  out, err = capsys.readouterr()
  assert rc != 0 and 'no checkpoint at step(s) [7]; the workdir holds [1, 2, 3]' in err
  assert 'evaluating' not in out
  for bad in ('x', 'all'):
    with pytest.raises(ValueError, match='--step'):
      commands.parse_steps(bad, [])


def test_running_out_of_memory_does_not_move_a_checkpoint_aside(tmp_path):
  workdir = str(tmp_path / 'run')
  _run_with_checkpoints(workdir, steps=(1,))
  manager = checkpointing.make_manager(workdir)

  def load(step):
    raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB')

  with pytest.raises(RuntimeError, match='RESOURCE_EXHAUSTED'):
    checkpointing._newest_that_loads(manager, load, move_aside=True)
  manager.close()
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['1']


def test_a_restored_learner_is_exact_with_an_update_from_the_persistent_cache(tmp_path):
  """`benchmarks/compilation_cache_restore.py`: a learner restored from a checkpoint, its update
  loaded from JAX's persistent compilation cache, steps exactly like the learner that saved the
  checkpoint and stepped on (before `Learner.restore` copied the restored state: a heap
  corruption abort, or NaN)."""
  import subprocess
  import sys
  script = os.path.join(os.path.dirname(__file__), '..', 'benchmarks',
                        'compilation_cache_restore.py')
  out = subprocess.run([sys.executable, script, '--out', str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert 'verdict: exact' in out.stdout, out.stdout


_FULL_DISK_RUN = """
mount -t tmpfs -o size=1200k tmpfs "$1" || exit 99
shift
"$@" > "$MNT_OUT" 2> "$MNT_ERR"
echo "exit=$?"
ls "$MNT_DIR/W/checkpoints"
"""


def test_learn_on_a_full_disk_ends_with_a_clear_error_and_keeps_the_last_checkpoint(
    tiny_dataset_dir, tmp_path):
  """A workdir whose filesystem fills up: `learn` (cpu_tiny, a checkpoint every 10 steps of
  ~0.45 MB, and its compilation cache, ~0.4 MB) on a 1200 KB tmpfs, mounted in a user + mount
  namespace of its own (no root needed): the second checkpoint does not fit.
  Before: exit 1 after 640 lines of stderr (Orbax's RESOURCE_EXHAUSTED traceback, then its
  pending writes failing at interpreter shutdown), and the partial save's folder left, taking the
  space. Now: one `error:` line naming the folder, the cause and the checkpoint a rerun resumes
  from, which is intact; the partial save is removed."""
  import subprocess
  import sys
  mnt = tmp_path / 'small_disk'
  mnt.mkdir()
  probe = subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c',
                          f'mount -t tmpfs -o size=64k tmpfs {mnt}'], capture_output=True)
  if probe.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs in a user namespace here: {probe.stderr.decode()[:200]}')
  out, err = tmp_path / 'out.log', tmp_path / 'err.log'
  # Without the suite's cache folder: `learn` keeps its compiled update in the workdir
  # (WORKDIR/compilation_cache, ~0.4 MB for cpu_tiny), on the same full disk as a user's run.
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env.update(MNT_DIR=str(mnt), MNT_OUT=str(out), MNT_ERR=str(err))
  listing = subprocess.run(
      ['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c', _FULL_DISK_RUN, 'sh',
       str(mnt), sys.executable, '-m', 'scaled_ql.cli', 'learn', '--config', 'cpu_tiny',
       '--data-dir', tiny_dataset_dir, '--workdir', str(mnt / 'W'), '--steps', '30'],
      capture_output=True, text=True, timeout=300, env=env).stdout.split()
  stderr = err.read_text()
  assert listing[0] == 'exit=1', (listing, stderr[-3000:])
  assert 'Traceback' not in stderr, stderr[-3000:]
  error = [line for line in stderr.splitlines() if line.startswith('error: ')]
  assert len(error) == 1 and 'No space left on device' in error[0], stderr[-3000:]
  failed = int(error[0].split('error: checkpoint ')[1].split()[0])
  assert f'could not be written to {mnt}/W/checkpoints' in error[0], error
  # The run's compilation cache shares the disk: the error says it may be deleted.
  assert f'; {mnt}/W/compilation_cache, ' in error[0], error
  assert ' MiB of compiled code, may be deleted). ' in error[0], error
  kept = listing[1:]  # the partial save's folder is gone: only complete checkpoints
  assert kept and all(name.isdigit() for name in kept), (kept, error)
  assert f'The newest complete checkpoint is step {max(kept, key=int)}:' in error[0], error
  assert int(max(kept, key=int)) < failed

"""The distributed program on a real Ray runtime, tiny sizes (cpu_tiny + the tiny_dataset_dir).

- `scaled-ql train` as a subprocess, resuming past a truncated newest checkpoint on data with an
  undecodable and a malformed episode: learner steps, evaluator reports at >= 2 param versions,
  then SIGTERM -> final checkpoint, exit 0 and no process left behind.
- In-process (one Ray session for the module, a two-node cluster): killing an evaluator (Ray
  restarts it and it reports again) and the Reverb server with its port taken (it comes back
  at another; the driver restarts the learner, which resumes from its checkpoint step, not 0,
  and the inserter) while the program runs to its N steps.
- Bad input is rejected before any process starts.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from typing import Optional

import pytest

from scaled_ql import configs, loggers
from scaled_ql.launch import nodes, program, run, variable_server

from polling import wait_for  # tests/polling.py

SCALED_QL = [sys.executable, '-m', 'scaled_ql.cli']


def _eval_rows(workdir):
  rows = []
  for name in sorted(os.listdir(os.path.join(workdir, 'eval'))):
    with open(os.path.join(workdir, 'eval', name)) as f:
      rows += [json.loads(line) for line in f if line.strip()]
  return rows


def _processes_with_env(tag: str) -> list[int]:
  """pids of processes whose environment carries `tag` (everything the run started)."""
  pids = []
  for pid in os.listdir('/proc'):
    if not pid.isdigit():
      continue
    try:
      with open(f'/proc/{pid}/environ', 'rb') as f:
        if tag.encode() in f.read():
          pids.append(int(pid))
    except OSError:
      continue
  return pids


def test_train_command_resumes_past_damage_evaluates_and_ends_cleanly_on_sigterm(
    tiny_dataset_dir, tmp_path):
  """`scaled-ql train` on a workdir and data with a fault each (one program run for all of it
  keeps the suite fast): the newest checkpoint is truncated (moved aside as corrupt-2, the run
  resumes from step 1) and the data hold an undecodable episode (the inserter skips it) and a
  malformed one (cut short), which the progress line counts. Then it trains and evaluates >= 2
  param versions; on SIGTERM it saves the final step, exits 0 and leaves no process behind."""
  from test_bad_data import _with_malformed_episode, _with_undecodable_episode
  from test_checkpoint_faults import _truncate_step
  from test_learner import CFG, make
  # cpu_tiny reads the 'suboptimal' selection: checkpoint_00 (two episodes of Pong), read again
  # and again, so the bad one is met in the first epoch.
  data, _ = _with_undecodable_episode(tiny_dataset_dir, tmp_path, checkpoint=0, index=1)
  # And Breakout's second episode there is malformed (a terminal step at 50 of 129): the
  # inserter cuts it short and counts it, and the learner's MC probe, which reads it (it ends
  # terminal), skips it.
  _with_malformed_episode(data, 'Breakout', checkpoint=0, index=1, step=50)
  workdir = str(tmp_path / 'run')
  learner = make(CFG.replace(data=dict(data_dir=data)), workdir=workdir)
  for _ in range(2):
    learner.step()
    learner.save()
  learner.close()
  _truncate_step(workdir, 2)

  def steps_saved():
    return sorted(int(c) for c in os.listdir(os.path.join(workdir, 'checkpoints')) if c.isdigit())

  tag = f'SCALED_QL_TEST_TAG={uuid.uuid4().hex}'
  # RAY_ADDRESS names a cluster (none answers there), as a `ray start` on the machine would:
  # without --address, train starts its own Ray all the same (a plain ray.init() took it as the
  # cluster to join, and failed on num_cpus).
  env = dict(os.environ, SCALED_QL_TEST_TAG=tag.split('=')[1], RAY_ADDRESS='127.0.0.1:9')
  log_path = tmp_path / 'train.log'
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(
        SCALED_QL + ['train', '--config', 'cpu_tiny', '--data-dir', data,
                     '--workdir', workdir, '--steps', '100000', '--evaluators', '1'],
        stdout=log, stderr=subprocess.STDOUT, env=env)
  try:
    # Runs until the evaluator reported params of >= 2 versions and a new checkpoint exists.
    def progressed():
      if proc.poll() is not None:
        raise AssertionError(f'train exited early ({proc.returncode}):\n{log_path.read_text()}')
      try:
        versions = {r['param_version'] for r in _eval_rows(workdir)}
      except FileNotFoundError:
        return False
      return len(versions) >= 2 and steps_saved()[-1] > 2
    wait_for(progressed, 240, 'evaluations of 2 param versions and a new checkpoint', poll=1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log_path.read_text()
  finally:
    if proc.poll() is None:
      proc.kill()
  out = log_path.read_text()
  # The damaged checkpoint: moved aside (the warning names where), the run resumed from step 1
  # (kept checkpoints: the last 3, so step 1's is gone by now; the fallback's step is checked
  # in tests/test_checkpoint_faults.py). A resumed learner never publishes version 0.
  assert 'does not load' in out and 'corrupt-2' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', 'corrupt-2'))
  assert min(r['param_version'] for r in _eval_rows(workdir)) >= 1
  assert ('bad data skipped: 0 corrupt files, 1 undecodable episodes, 1 malformed episodes cut '
          'at their fault'
          in out), out[-3000:]
  assert 'SIGTERM' in out and 'learner stopped at step' in out
  # The learner node's first step says what the compilation cache did (the suite's cache: the
  # environment's folder wins over the run's; `tests/test_compilation_cache.py`).
  assert 'learner: the first step of this start (step 2) took ' in out, out[-3000:]
  assert f'compilation cache {os.environ["JAX_COMPILATION_CACHE_DIR"]}: ' in out, out[-3000:]
  final_step = int(out.split('learner stopped at step ')[1].split(';')[0])
  assert steps_saved()[-1] == final_step > 2  # the SIGTERM checkpoint is the final step
  rows = _eval_rows(workdir)
  assert {r['game'] for r in rows} == {'Breakout', 'Pong'}
  assert len({r['param_version'] for r in rows}) >= 2
  assert all(r['evaluator'] == 'evaluator_0' for r in rows)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['data']['data_dir'] == data
  assert os.path.isdir(os.path.join(workdir, 'tb', 'evaluator_0'))
  assert '| learner ' in out and 'steps/s' in out and 'replay Breakout=' in out  # progress
  # Nothing the run started is still alive (Ray's GCS, raylet, workers, Reverb, ...).
  wait_for(lambda: not _processes_with_env(tag), 30, 'every process of the run to exit',
           poll=1.0)


def _train_handler(argv):
  from scaled_ql import cli
  return cli.main(['train'] + argv)


@pytest.mark.parametrize('argv, message', [
    (['--config', 'cpu_nope'], 'unknown config'),
    (['--config', 'cpu_tiny', '--data-dir', '/nonexistent/data'], 'does not exist'),
    (['--config', 'cpu_tiny', '--evaluators', '3'], '--evaluators'),
    (['--config', 'cpu_tiny', '--steps', '0'], '--steps'),
    (['--config', 'cpu_tiny', '--learner-gpus', '-1'], '--learner-gpus must be >= 0, got -1'),
    (['--config', 'cpu_small'], "'Boxing'"),  # the tiny data dir lacks cpu_small's other games
    # Values the nodes met only after Ray started (a crash loop, or a driver traceback):
    (['--config', 'cpu_tiny', '--set', 'network.encoder=impla'], "NetworkConfig.encoder='impla'"),
    (['--config', 'cpu_tiny', '--set', 'train.crash_loop_restarts=0'],
     'train.crash_loop_restarts must be >= 1, got 0'),
    (['--config', 'cpu_tiny', '--set', 'train.log_every_steps=0'], 'train.log_every_steps'),
    (['--config', 'cpu_tiny', '--set', 'data.selection=uniform:0'], 'data.selection'),
    (['--config', 'cpu_tiny', '--set', 'data.run=7'], 'data.run must be in 1..5'),
    (['--config', 'cpu_tiny', '--set', 'data.min_fill_per_game=10000000'],
     'data.min_fill_per_game'),
])
def test_train_rejects_bad_input_before_starting_anything(argv, message, tiny_dataset_dir,
                                                          tmp_path, capsys):
  import ray
  if '--data-dir' not in argv:
    argv = argv + ['--data-dir', tiny_dataset_dir]
  was_initialized = ray.is_initialized()
  assert _train_handler(['--workdir', str(tmp_path / 'w')] + argv) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / 'w').exists()  # nothing written
  assert ray.is_initialized() == was_initialized  # no Ray started


@pytest.mark.parametrize('command', [
    ['train', '--config', 'cpu_tiny', '--workdir', 'w'], ['demo'],
    ['finetune', 'offline', '--game', 'Pong', '--workdir', 'w']])
def test_time_budget_flags_take_positive_minutes(command, capsys):
  from scaled_ql import cli
  flag = '--minutes' if command == ['demo'] else '--budget-minutes'
  assert getattr(cli.build_parser().parse_args(command + [flag, '2.5']),
                 flag[2:].replace('-', '_')) == 2.5
  for bad in ('0', '-1', 'nan', 'soon'):
    with pytest.raises(SystemExit):
      cli.build_parser().parse_args(command + [flag, bad])
    assert f'{flag}: minutes must be a number > 0, got {bad!r}' in capsys.readouterr().err


def test_split_games_round_robin():
  assert program.split_games(('A', 'B', 'C', 'D', 'E'), 2) == [('A', 'C', 'E'), ('B', 'D')]
  with pytest.raises(ValueError, match='--evaluators'):
    program.split_games(('A',), 2)


def _max_thread_niceness(pid: int) -> int:
  """The highest niceness among the threads of process `pid` (Linux keeps one per thread)."""
  values = []
  for tid in os.listdir(f'/proc/{pid}/task'):
    try:
      values.append(os.getpriority(os.PRIO_PROCESS, int(tid)))
    except OSError:  # a thread that ended meanwhile
      pass
  return max(values)


@pytest.fixture(scope='module')
def ray_session():
  """A Ray cluster of two nodes (two raylets on this machine), joined by its address as `train
  --address` joins one: the program's actors spread over both nodes (the head has 1 CPU, and a
  program's learner and evaluator ask for one each: they cannot both be on the head) and what
  they pass crosses between the nodes' object stores. Token authentication is on, as a local
  `ray.init()` sets it up (the same two calls, made here because the cluster's nodes start
  before the driver connects)."""
  from unittest import mock

  import ray
  from ray._private.authentication import authentication_token_setup as ray_auth
  from ray.cluster_utils import Cluster
  ray_auth.enable_token_auth_by_default()  # RAY_AUTH_MODE=token unless set otherwise
  ray_auth.ensure_token_if_auth_enabled()  # ~/.ray/auth_token, made if missing
  cluster = None
  try:
    # Without the patch the head writes /tmp/ray/ray_current_cluster, which every plain
    # `ray.init()` on the machine would then join (the other pytest process's included), and
    # which a killed session leaves behind.
    with mock.patch.object(ray._private.utils, 'write_ray_address'):
      cluster = Cluster(initialize_head=True, head_node_args=dict(
          num_cpus=1, include_dashboard=False, object_store_memory=300 * 2**20))
    cluster.add_node(num_cpus=3, object_store_memory=300 * 2**20)
    # A runtime_env, as `init_ray` gives a cluster joined with --address (its nodes then start
    # through Ray's setup_worker shim; a local Ray inherits its environment instead).
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False,
             runtime_env={'env_vars': {'TF_CPP_MIN_LOG_LEVEL': '2'}})
    assert len([n for n in ray.nodes() if n['Alive']]) == 2
    yield ray
  finally:
    ray.shutdown()
    if cluster is not None:  # (whose shutdown would remove another cluster's address file)
      with mock.patch.object(ray._common.utils, 'reset_ray_address'):
        cluster.shutdown()


def test_a_restarted_node_counts_its_restarts_in_its_seeds(ray_session):
  """The evaluator's and the fine-tuning actors' seeds add `nodes._restart_seed()`, so that a
  restarted node does not replay its first start's episodes. The count comes from Ray's actor
  table (a private API, `ray._private.state`): 0 at the first start, then 1 and 2 (two restarts:
  a count stuck at 0, or at the fallback of 1, fails)."""
  ray = ray_session

  class SeedsOfAStart:  # (defined here: Ray ships it by value; tests/ is no package to import)
    def seeds(self):
      from scaled_ql.launch import nodes as actor_nodes
      return actor_nodes._restarts(), actor_nodes._restart_seed()

    def die(self):
      os._exit(1)

  actor = ray.remote(max_restarts=2)(SeedsOfAStart).remote()
  seeds = []

  def back():
    try:
      seeds.append(ray.get(actor.seeds.remote(), timeout=30))
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):  # not back yet
      return False
    return True

  try:
    wait_for(back, 90, 'the first start')
    for _ in range(2):
      with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.die.remote(), timeout=60)
      wait_for(back, 90, 'the actor to come back')
  finally:
    ray.kill(actor)
  assert seeds == [(0, 0), (1, 104_729), (2, 209_458)]


def test_faults_evaluator_learner_and_replay_come_back(ray_session, tiny_dataset_dir, tmp_path):
  ray = ray_session
  num_steps = 80
  # No periodic checkpoint within the run: the learner the driver restarts to follow the moved
  # replay saves its step when asked (`LearnerNode.save_and_exit`), and resumes there.
  cfg = run.resolve_config('cpu_tiny', tiny_dataset_dir, steps=num_steps, evaluators=1,
                           overrides=['train.checkpoint_every_steps=1000'])
  workdir = str(tmp_path / 'faults')
  run.prepare_workdir(cfg, workdir)
  # (No fine-tuning actor: one beside the inserters, unpaced, is no configuration a command
  # runs, and it took a fifth of the test's CPU. An actor surviving a replay restart is tested
  # in the online program: tests/test_transfer.py.)
  prog = program.build(cfg, workdir, num_evaluators=1, num_steps=num_steps)
  evaluator_pid = ray.get(prog.evaluators[0].ping.remote(), timeout=120)
  replay_pid = ray.get(prog.replay.ping.remote(), timeout=120)
  # The evaluator yields to the learner: its loop runs EVALUATOR_NICENESS above Ray's workers.
  assert _max_thread_niceness(evaluator_pid) == min(
      19, _max_thread_niceness(replay_pid) + nodes.EVALUATOR_NICENESS)
  events = {}
  # The replay comes back at another address, as on another host: its port is taken when Ray
  # restarts it (held here, without SO_REUSEPORT, and named in the port file its restart reads).
  squatter = socket.socket()
  squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  squatter.bind(('', 0))
  squatter.listen()

  def script(status: program.ProgramStatus) -> bool:
    """Kills nodes as the run goes and ends once the learner is done after all of them."""
    learner, evaluator = status.learner, status.evaluators[0]
    if 'replay_killed_at' not in events and learner and learner['steps'] >= 15:
      events['steps_before_kill'] = learner['steps']
      events['address'] = status.replay['address']
      assert learner['replay_address'] == events['address']
      with open(os.path.join(workdir, nodes.REPLAY_PORT_FILE), 'w') as f:
        f.write(f'{squatter.getsockname()[1]}\n')
      # Reverb's clients would wait at the old address for ever (its retries): the driver
      # restarts the learner and the inserters (`_Watcher.follow_replay`), and the inserters
      # refill the new replay before the restarted learner can step on. The reconnect of live
      # clients to a replay back at its address is tested in tests/test_reverb.py
      # (test_reconnect_after_server_restart) and tests/test_actors.py.
      ray.kill(prog.evaluators[0], no_restart=False)
      ray.kill(prog.replay, no_restart=False)
      events['replay_killed_at'] = learner['steps']
    if ('replay_killed_at' in events and 'resumed' not in events and learner
        and learner['restarted']):
      events['resumed'] = learner['resumed_from_step']
      events['learner_in_window'] = status.health['learner'].get('in_window')
      events['learner_restart'] = status.health['learner']['last_error']
      events['learner_at'] = learner['replay_address']
    if evaluator and evaluator['restarted'] and evaluator['rounds'] >= 1:
      assert evaluator['pid'] != evaluator_pid  # a new process
      events['evaluator_back'] = evaluator['evaluated_version']
    if status.replay and status.replay['restarted']:
      assert status.replay['pid'] != replay_pid
      events['replay_back'] = status.replay['address']
    # Also wait to see the killed replay back: on a quiet machine the learner can finish its
    # steps before the restarted replay node first answers a status poll.
    replay_seen_back = 'replay_killed_at' not in events or 'replay_back' in events
    return bool(learner and learner['done'] and 'evaluator_back' in events and replay_seen_back)

  # Polled 4x a second: at the default 2 s, a quiet machine ran cpu_tiny from step 10 to the end
  # (80) between two polls, and the kills landed after the last step.
  try:
    status = program.run(prog, log=print, stop_when=script, timeout_s=400, status_every_s=0.25,
                         final_eval_timeout_s=60)  # (the log shows up when the test fails)
  finally:
    squatter.close()
  assert events['replay_killed_at'] < num_steps, events  # the kills landed mid-run
  # The replay came back at another port; the driver restarted the learner, which went on
  # from its checkpoint at the new address.
  assert events['replay_back'] != events['address'], events
  assert events['learner_at'] == events['replay_back'], events
  assert events['learner_restart'] == (
      f'restarted by the driver to follow the replay to {events["replay_back"]} (from '
      f'{events["address"]})'), events
  assert 'resumed' in events, events
  # Resumed at the step it had reached (the batches it held let it step on a little after the
  # replay went), not from 0: no step lost, and no crash-loop count for the driver's restart.
  assert events['steps_before_kill'] <= events['resumed'] < num_steps, events
  assert events['learner_in_window'] == 0 == status.health['learner']['in_window'], events
  assert status.learner['steps'] == num_steps
  # The restarted learner loaded what its first start compiled (JAX's persistent cache).
  assert status.learner['compilation_cache']['loaded'] >= 1, status.learner
  assert 'evaluator_back' in events, events
  assert status.learner['steps'] > events['replay_killed_at']
  assert all(s['replay_address'] == events['replay_back'] for s in status.inserters), status
  assert status.health['inserter_0']['last_error'].startswith(
      'restarted by the driver to follow the replay to '), status.health
  rows = _eval_rows(workdir)
  assert max(r['param_version'] for r in rows) == num_steps  # the final params were evaluated
  # ... those of the restarted learner (its second start in the workdir: lineage 1).
  assert {r['param_lineage'] for r in rows if r['param_version'] == num_steps} == {1}
  # Its restart is recorded as one it was asked for, which the no-progress rule does not count
  # (`nodes.record_learner_start`).
  assert [s.get('after_requested_exit', False)
          for s in loggers.read_learner_starts(workdir)] == [False, True]
  assert not os.path.exists(os.path.join(workdir, nodes.LEARNER_EXIT_REQUESTED))
  assert not os.path.exists(os.path.join(workdir, 'logs'))  # killed, never crashed
  # The program ran on both nodes of the fixture's cluster (Ray's actor table: the node of each
  # node's last start).
  placed = {name: program._gcs_actor_info(handle)['Address']['NodeID']
            for name, handle in prog.nodes()}
  assert set(placed.values()) == {n['NodeID'] for n in ray.nodes() if n['Alive']}, placed



def test_progress_line_shows_each_restarted_nodes_health():
  status = program.ProgramStatus(None, None, [], [], health={
      'inserter_0': dict(restarts=2, in_window=2, last_error='ValueError: no data'),
      'learner': dict(restarts=1, in_window=0, last_error='no traceback (killed or lost)')})
  line = program.format_progress(status, time.time())
  assert ('restarts inserter_0 2 (2 in window; last: ValueError: no data), learner 1 '
          '(0 in window; last: no traceback (killed or lost))') in line


def test_progress_line_of_a_budgeted_run_says_what_is_left_of_its_budget():
  learner = dict(steps=100, num_steps=5000, steps_per_s=2.0, metrics={})
  status = program.ProgramStatus(learner, None, [], [])
  line = program.format_progress(status, time.time() - 50, deadline=time.time() + 300.4)
  assert 'learner 100/5000 2.0 steps/s ETA 2450s' in line and 'budget 300s left' in line
  assert 'budget' not in program.format_progress(status, time.time())


def test_progress_line_of_a_learner_without_a_step_limit_has_no_eta():
  """A learner built with num_steps=None (benchmarks stop the program themselves) shows its
  steps and rate, not an ETA to a made-up limit."""
  learner = dict(steps=10440, num_steps=None, steps_per_s=12.5, metrics={'loss': 1.25})
  line = program.format_progress(program.ProgramStatus(learner, None, [], []), time.time())
  assert 'learner 10440 12.5 steps/s | loss 1.250' in line and 'ETA' not in line, line
  idle = dict(learner, steps=0, steps_per_s=0.0)
  line = program.format_progress(program.ProgramStatus(idle, None, [], []), time.time())
  assert 'learner 0 0.0 steps/s (waiting for data)' in line, line


def test_a_restarts_last_error_is_the_traceback_of_the_start_it_ended(tmp_path):
  """The health line's last error is read per start of a Ray actor, not as "whatever the log
  gained since the last poll": a crash written between the driver's read of Ray's restart count
  and its read of the log once showed the next restart as "no traceback (killed or lost)"."""
  from scaled_ql.launch import nodes
  workdir = str(tmp_path)
  assert nodes.recorded_crash(workdir, 'actor_0', 'a1', 0) is None  # no log yet
  for start in (0, 1):
    try:
      raise RuntimeError(f'fault in start {start}')
    except RuntimeError:
      nodes._record_crash(workdir, 'actor_0', traceback.format_exc(), ('a1', start))
  # Start 2 was killed (no record); a resumed run's new actor a2 crashed in its first start.
  nodes._record_crash(workdir, 'actor_0', 'Traceback ...\nValueError: other actor', ('a2', 0))
  assert nodes.recorded_crash(workdir, 'actor_0', 'a1', 0) == 'RuntimeError: fault in start 0'
  assert nodes.recorded_crash(workdir, 'actor_0', 'a1', 1) == 'RuntimeError: fault in start 1'
  assert nodes.recorded_crash(workdir, 'actor_0', 'a1', 2) is None
  assert nodes.recorded_crash(workdir, 'actor_0', 'a2', 0) == 'ValueError: other actor'
  assert nodes.recorded_crash(workdir, 'learner', 'a1', 0) is None
  # The driver's NodeLost message shows the newest record with its header: when the crash loop
  # was of kills (no record), the time and actor say whose traceback it is.
  newest = program._crash_log(workdir, 'actor_0')
  assert re.match(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(actor a2 start 0\) \[actor_0\] crashed:\n'
                  r'Traceback \.\.\.\nValueError: other actor', newest), newest


def test_restart_budget_allows_spaced_restarts_and_ends_a_crash_loop():
  budget = program.RestartBudget(max_restarts=3, window_s=600)
  # A preempted cluster: 100 learner restarts, 400 s apart (at most 2 in any 600 s), never
  # exhaust it (Ray itself restarts without limit).
  assert not any(budget.record('learner', n, now=400.0 * n) for n in range(1, 101))
  # A crash loop: the third restart of one node within 10 minutes ends the program.
  assert not budget.record('inserter_0', 1, now=0.0)
  assert not budget.record('inserter_0', 2, now=100.0)
  assert budget.record('inserter_0', 3, now=200.0) and budget.in_window('inserter_0') == 3
  # Several restarts seen in one poll count as several.
  assert program.RestartBudget(3, 600).record('replay', 3, now=0.0)
  # Restarts the driver caused (to follow a moved replay) are not counted.
  excusing = program.RestartBudget(3, 600)
  assert not any(excusing.record('learner', n, now=float(n), excused=1) for n in range(1, 11))
  assert excusing.in_window('learner') == 0
  assert not excusing.record('learner', 12, now=20.0, excused=1)  # one of two new restarts
  assert excusing.in_window('learner') == 1
  with pytest.raises(ValueError, match='crash_loop_window_s'):
    program.RestartBudget(3, 0)
  with pytest.raises(ValueError, match='crash_loop_restarts'):
    program.build(configs.get_config('cpu_tiny').replace(train=dict(crash_loop_restarts=0)),
                  '/nonexistent', 1, 1)  # before any node starts (no Ray needed)


def test_a_learner_restarting_from_the_same_checkpoint_again_and_again_ends_the_run(tmp_path):
  """Restarts hours apart never trip the crash-loop window, but a learner that fails every time
  before its next checkpoint (a full quota at each save) makes no progress: its third restart in
  a row from the same step raises in its constructor (which ends the program with that
  traceback). Any new checkpoint between restarts starts the count again, and so does a new
  program in the same workdir (restart 0)."""
  workdir = str(tmp_path)
  start = lambda restart, step: nodes.record_learner_start(workdir, restart, step, 3)
  start(0, 0)
  start(1, 2000)  # progress: a checkpoint at 2000 since the first start
  start(2, 2000)
  start(3, 2000)
  with pytest.raises(nodes.NoProgressError, match=r'restarted 3 times in a row from the '
                     r'checkpoint of step 2000 \(train.crash_loop_restarts=3\)'):
    start(4, 2000)
  # The count of earlier starts is each start's lineage: it grows over programs, never resets.
  assert start(0, 2000) == 5  # the user runs the command again: a new program
  assert start(1, 2000) == 6
  start(2, 2000)
  with open(os.path.join(workdir, loggers.LEARNER_STARTS)) as f:
    assert [json.loads(line)['restart'] for line in f] == [0, 1, 2, 3, 4, 0, 1, 2]
  with open(os.path.join(workdir, loggers.LEARNER_STARTS), 'a') as f:
    f.write('{"time": 1, "rest')  # torn by a kill
  with pytest.raises(nodes.NoProgressError):
    start(3, 2000)
  with open(os.path.join(workdir, loggers.LEARNER_STARTS)) as f:
    assert json.loads(f.read().splitlines()[-1])['restart'] == 3  # on a line of its own


def test_restarts_the_driver_asked_for_are_no_failures_of_the_learner(tmp_path):
  """A learner the driver restarts to follow a moved replay saves its step and exits
  (`LearnerNode.save_and_exit` writes LEARNER_EXIT_REQUESTED); where it made no step since its
  start (it waited for the refilled replay), the restart resumes from the same step. Such
  starts are not failures: before, three replay moves in a row before the learner stepped
  ended the run as a learner making no progress."""
  workdir = str(tmp_path)
  marker = os.path.join(workdir, nodes.LEARNER_EXIT_REQUESTED)
  start = lambda restart, step: nodes.record_learner_start(workdir, restart, step, 3)

  def requested_exit(step=2000):
    with open(marker, 'w') as f:
      f.write(str(step))
  start(0, 0)
  start(1, 2000)
  for restart in range(2, 8):  # six moves of the replay, the learner at step 2000 throughout
    requested_exit()
    start(restart, 2000)
    assert not os.path.exists(marker)  # read once
  # Failures count again from the last requested exit on.
  start(8, 2000)
  start(9, 2000)
  with pytest.raises(nodes.NoProgressError, match='restarted 3 times in a row'):
    start(10, 2000)
  with open(os.path.join(workdir, loggers.LEARNER_STARTS)) as f:
    flags = [json.loads(line).get('after_requested_exit', False) for line in f]
  assert flags == [False, False] + [True] * 6 + [False] * 3
  # A marker left from an earlier program does not mark its first start; one whose step is not
  # the step resumed from (its save did not load: the restart fell back to an older one) does
  # not mark a restart.
  requested_exit()
  start(0, 2000)
  requested_exit(2500)
  start(1, 2000)
  assert not os.path.exists(marker)
  with open(os.path.join(workdir, loggers.LEARNER_STARTS)) as f:
    assert [json.loads(line).get('after_requested_exit', False) for line in f][-2:] == [False,
                                                                                       False]


class _Node:
  """A stand-in node for the driver (`program.run`, `program.shutdown`): answers status() with
  `status`, address() and stop(); `fail` makes stop() raise as a learner whose final checkpoint
  cannot be written does."""

  def __init__(self, fail: str = '', status: Optional[dict] = None):
    self._fail = fail
    self._status = status or {}

  def status(self):
    return self._status

  def address(self):
    return 'localhost:1'

  def stop(self):
    if self._fail:
      raise RuntimeError(self._fail)
    return 7


def test_a_learner_that_cannot_save_its_last_step_ends_the_run_in_error(ray_session, tmp_path):
  """`train` printed its scores and exited 0 when the learner's stop() (its final checkpoint)
  failed: shutdown now stops every node, then raises NodeLost naming the failure, when nothing
  else is being raised (`program.run`'s `raise_if_learner_failed`). Stand-in nodes: the real
  stop path needs a full program, and this is the driver's bookkeeping."""
  from ray import cloudpickle
  module = sys.modules[__name__]
  cloudpickle.register_pickle_by_value(module)  # the workers cannot import this test file
  try:
    node = ray_session.remote(num_cpus=0)(_Node)
    cfg = configs.get_config('cpu_tiny')
    lines = []

    def prog(fail):
      replay, learner = node.remote(), node.remote(fail)
      # Placed first: shutdown tells a learner Ray has yet to place (nothing to checkpoint) from
      # one that stops; on a slow VM the workers took seconds to start (seen: KeyError 'steps').
      ray_session.get([replay.status.remote(), learner.status.remote()], timeout=120)
      return program.Program(cfg, str(tmp_path), replay, 'replay', [], learner,
                             variable_server.VariableServer.create(1), [], [])
    assert program.shutdown(prog(''), log=lines.append,
                            raise_if_learner_failed=True).learner['steps'] == 7
    failing = prog('checkpoint 7 could not be written: No space left on device')
    with pytest.raises(program.NodeLost, match=r'the learner did not stop cleanly \('
                       r'RayTaskError.*No space left on device\), so its last steps may have no '
                       r'checkpoint'):
      program.shutdown(failing, log=lines.append, raise_if_learner_failed=True)
    assert lines[-1].startswith('nodes stopped in')  # raised once every node was stopped
    # Another error already ending the run (run(): its loop did not end normally): no raise.
    assert program.shutdown(prog('no space'), log=lines.append).learner == {}
  finally:
    cloudpickle.unregister_pickle_by_value(module)


class _LearnerEndingUnderItsStop(_Node):
  """A stand-in learner whose first start's process ends under its stop() (as one asked to save
  and exit does); a restarted one takes 3 s to start (a real one imports, restores and traces
  for seconds: a stop() sent meanwhile fails with ActorUnavailableError, seen on a slow VM) and
  stops at step 9."""

  def __init__(self, fail: str = ''):
    import ray  # pylint: disable=import-outside-toplevel
    super().__init__(fail)
    if ray.get_runtime_context().was_current_actor_reconstructed:
      time.sleep(3.0)

  def stop(self):
    import ray  # pylint: disable=import-outside-toplevel
    if not ray.get_runtime_context().was_current_actor_reconstructed:
      os._exit(1)  # pylint: disable=protected-access
    return 9


def test_shutdown_stops_the_restart_of_a_learner_that_was_asked_to_save_and_exit(ray_session,
                                                                                 tmp_path):
  """A stop that overlaps the learner's `save_and_exit` (the driver asked it to follow a moved
  replay) fails with its process: shutdown then stops the restarted learner, which resumed at
  the step it saved. Not when the driver asked that of an earlier start only: that learner did
  not stop cleanly."""
  from ray import cloudpickle
  module = sys.modules[__name__]
  cloudpickle.register_pickle_by_value(module)  # the workers cannot import this test file
  try:
    node = ray_session.remote(num_cpus=0)(_Node)
    learner = ray_session.remote(num_cpus=0, max_restarts=-1)(_LearnerEndingUnderItsStop)
    cfg = configs.get_config('cpu_tiny')
    # Asked: the process the stop goes to (its first start: restart count 0), or only an earlier
    # start (count -1 stands for one the learner is past: its failure now is its own).
    for asked_at in (0, -1):
      asked, lines = asked_at == 0, []
      seen = program._Watcher()  # pylint: disable=protected-access
      seen._requests['learner'] = (asked_at, 'restarted by the driver', 0.0)  # pylint: disable=protected-access
      handle = learner.remote()
      ray_session.get(handle.status.remote(), timeout=60)  # placed and started
      prog = program.Program(cfg, str(tmp_path), node.remote(), 'replay', [], handle,
                             variable_server.VariableServer.create(1), [], [])
      program.shutdown(prog, log=lines.append, seen=seen)
      if asked:
        assert 'learner was restarting to follow the replay: stopping its restart' in lines
        assert f'learner stopped at step 9; checkpoint in {tmp_path}/checkpoints' in lines, lines
      else:
        assert any(line.startswith('learner did not stop cleanly: ') for line in lines), lines
    # A learner Ray is restarting when the shutdown comes (a kill, a crash; not asked): the stop
    # waits for the restart's constructor instead of failing at once ("the actor is restarting").
    lines, handle = [], learner.remote()
    ray_session.get(handle.status.remote(), timeout=60)
    ray_session.kill(handle, no_restart=False)
    def restarting_and_placed():  # (unplaced, shutdown says "nothing to checkpoint")
      info = program._gcs_actor_info(handle)  # pylint: disable=protected-access
      return info.get('State') == 'RESTARTING' and not program._unplaced(info)  # pylint: disable=protected-access
    wait_for(restarting_and_placed, 30, 'the restart under way, placed', poll=0.05)
    prog = program.Program(cfg, str(tmp_path), node.remote(), 'replay', [], handle,
                           variable_server.VariableServer.create(1), [], [])
    program.shutdown(prog, log=lines.append, seen=program._Watcher())  # pylint: disable=protected-access
    assert f'learner stopped at step 9; checkpoint in {tmp_path}/checkpoints' in lines, lines
  finally:
    cloudpickle.unregister_pickle_by_value(module)


_CRASHING_NODE = """
import sys, time
import ray
from scaled_ql.launch import nodes

class Boom(nodes._LoopNode):
  name = 'boom'
  def __init__(self, workdir):
    self._start(workdir)
  def _run_once(self):
    time.sleep(1.0)
    raise RuntimeError('injected fault')

Boom(sys.argv[1])
print('ray started:', ray.is_initialized(), flush=True)
time.sleep(120)  # the crash must end the process long before this
"""


def test_a_crashing_node_exits_even_when_its_log_cannot_be_written(tmp_path):
  """`logs` is a file, so the crash log cannot be written: the process still exits (1) at once.
  Built outside Ray, the node starts no Ray cluster (ray.get_runtime_context() would)."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'logs').write_text('not a directory')
  started = time.monotonic()
  out = subprocess.run([sys.executable, '-c', _CRASHING_NODE, str(workdir)], capture_output=True,
                       text=True, timeout=100)
  assert out.returncode == 1, out.stdout + out.stderr
  assert time.monotonic() - started < 60
  assert 'ray started: False' in out.stdout
  assert 'injected fault' in out.stderr


def _gcs_state(handle) -> str:
  from ray._private import state
  return state.actors(actor_id=handle._actor_id.hex()).get('State', '')


def _check_network_exposure(notice: str, ray):
  """While the program runs: what listens, per `ss -ltnp`, and Ray's token check."""
  port = int(notice.split('listens on port ')[1].split()[0])
  listeners = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True,
                             check=True).stdout.splitlines()
  reverb = [l for l in listeners if l.split()[3].rsplit(':', 1)[1] == str(port)]
  # The Reverb server: on every interface, as the start-up notice says.
  assert reverb and all(l.split()[3].rsplit(':', 1)[0] in ('*', '0.0.0.0', '[::]')
                        for l in reverb), reverb
  assert not [l for l in listeners if l.split()[3].endswith(':8265')]  # no dashboard
  assert 'token authentication on' in notice
  # Ray's ports refuse a client without the cluster's token.
  gcs = ray.get_runtime_context().gcs_address
  env = dict(os.environ, RAY_AUTH_MODE='token', RAY_AUTH_TOKEN='f' * 32)
  env.pop('RAY_AUTH_TOKEN_PATH', None)
  out = subprocess.run([sys.executable, '-c', f'import ray; ray.init(address={gcs!r})'],
                       capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode != 0 and 'auth' in (out.stdout + out.stderr).lower(), out.stderr[-2000:]


def test_crash_loop_ends_the_program_with_the_nodes_traceback(ray_session, tiny_dataset_dir,
                                                             tmp_path):
  """A node that fails in its loop on every start (injected: a fine-tuning actor whose epsilon
  schedule raises; issue 16 moved the actors' pacing into the Reverb table): Ray restarts it,
  the progress line shows its restarts and last error, and its second restart within the window
  (`train.crash_loop_restarts=2` here; the budget's counting is tested above with 3) ends the
  program with its traceback; every node is then killed.
  Meanwhile the program's network exposure is checked (`ss`, Ray's token)."""
  ray = ray_session
  cfg = run.resolve_config('cpu_tiny', tiny_dataset_dir, steps=100_000, evaluators=1).replace(
      train=dict(crash_loop_restarts=2, crash_loop_window_s=600))  # 2, not 3: suite time
  workdir = str(tmp_path / 'crash_loop')
  run.prepare_workdir(cfg, workdir)

  def broken_pacing(version):  # shipped to the actor by value (cloudpickle)
    raise RuntimeError(f'injected pacing fault at version {version}')

  # No inserters: the learner waits for data (idle) instead of training beside the actor's
  # restarts, which on 2 cores slowed them (suite time).
  prog = program.build(cfg, workdir, num_evaluators=0, num_steps=100_000, num_inserters=0,
                       actors=program.ActorSpec('Breakout', None, 1, epsilon=broken_pacing,
                                                max_episode_frames=400))
  lines = []

  def log(line):
    lines.append(line)
    if line.startswith('security:'):
      _check_network_exposure(line, ray)

  started = time.monotonic()
  with pytest.raises(program.NodeLost) as lost:
    program.run(prog, log=log, timeout_s=400, final_eval_timeout_s=None)
  message = str(lost.value)
  # At least crash_loop_restarts (2) restarts: more can fall between two polls of the driver.
  restarts = re.match(r'actor_0 restarted (\d+) times within 600s', message)
  assert restarts and int(restarts.group(1)) >= 2, message[:500]
  assert 'crash loop' in message and '[actor_0] crashed' in message
  assert 'RuntimeError: injected pacing fault' in message
  assert any(l.startswith('security:') for l in lines)
  # The health line (in progress lines while it restarts, and once more at the end).
  health = [l for l in lines if 'restarts actor_0 ' in l]
  assert health and 'last: RuntimeError: injected pacing fault' in health[-1], lines[-5:]
  assert time.monotonic() - started < 400
  # shutdown ran: no node is left (Ray marks every actor dead).
  wait_for(lambda: all(_gcs_state(h) == 'DEAD' for _, h in prog.nodes()), 60,
           'every node to be killed', poll=1.0)


def test_final_eval_estimate_reads_each_evaluators_latest_round():
  def evaluator(games, cpu_s_per_step, overrun=0, longest_overrun=None):
    # A round of budget 100 that ran `overrun` steps past it to finish its last episode; an
    # earlier round may have run `longest_overrun` past its own.
    return dict(games=list(games), latest={
        g: dict(steps=100 + overrun, budget=100, seconds=99.0,
                cpu_seconds=(100 + overrun) * cpu_s_per_step,
                longest_overrun=overrun if longest_overrun is None else longest_overrun)
        for g in games})

  status = program.ProgramStatus(None, None, [evaluator(['Pong', 'Breakout'], 0.01),
                                             evaluator(['Boxing'], 0.02, overrun=50)], [])
  slack = program.FINAL_EVAL_SLACK
  # At the CPU rate, not the wall rate (seconds=99: rounds shared the cores with the learner).
  # evaluator_0: 2 x 1000 steps x 0.01 s; evaluator_1: (1000 + 50) x 0.02 s. The slowest counts.
  assert program.final_eval_estimate_s(status, 1000) == pytest.approx(slack * 21.0)
  # A stall seen in an earlier round (e.g. Breakout without a serve: 2000 steps past its budget,
  # here in both games) counts, though the latest round had none: 2 x (1000 + 2000) x 0.01.
  stalled = program.ProgramStatus(None, None, [evaluator(['Pong', 'Breakout'], 0.01,
                                                         longest_overrun=2000)], [])
  assert program.final_eval_estimate_s(stalled, 1000) == pytest.approx(slack * 2 * 30.0)
  # Until every evaluator has a round on all its games, nothing is known.
  half = evaluator(['Pong', 'Breakout'], 0.01)
  del half['latest']['Breakout']
  assert program.final_eval_estimate_s(
      program.ProgramStatus(None, None, [half, evaluator(['Boxing'], 0.02)], []), 1000) is None
  assert program.final_eval_estimate_s(program.ProgramStatus(None, None, [None], []), 10) is None
  assert program.final_eval_estimate_s(program.ProgramStatus(None, None, [], []), 10) == 0.0


def test_the_final_evaluation_waits_for_every_evaluator_on_the_learners_lineage():
  """The driver's final wait: every evaluator's final round at the final step or later, and of
  the learner's lineage. An evaluator still on a lost run's lineage (a restarted learner) can
  show a final round past the final step: the lost run's params, not the run's."""
  def status(learner_lineage, *evaluators):
    learner = None if learner_lineage is False else dict(lineage=learner_lineage)
    return program.ProgramStatus(
        learner=learner, replay=None, actors=[],
        evaluators=[None if e is None else dict(final_version=e[0], lineage=e[1])
                    for e in evaluators])
  done = program.final_evaluation_done
  assert done(status(1, (100, 1), (120, 1)), 100)
  assert not done(status(1, (100, 1), (90, 1)), 100)  # one has not reached the final step
  assert not done(status(1, (100, 1), (150, 0)), 100)  # a lost run's round past the end
  assert not done(status(1, (100, 1), None), 100)  # one did not answer
  assert done(status(None, (100, 0)), 100)  # a learner that does not report its lineage
  assert done(status(False, (100, 0)), 100)  # no learner status


def test_budget_stop_keeps_the_final_evaluation_and_the_margin_in_hand():
  assert program.budget_stop(100.0, 600.0, 200.0, margin_s=30.0) is None
  assert program.budget_stop(369.0, 600.0, 200.0, margin_s=30.0) is None  # 231 s left > 230
  reason = program.budget_stop(371.0, 600.0, 200.0, margin_s=30.0)
  assert reason == ('time budget of 600s: 229s left, the final evaluation needs ~200s (+ 30s to '
                    'stop): stopping training')
  # No round finished yet: only the margin is kept.
  assert program.budget_stop(560.0, 600.0, None, margin_s=30.0) is None
  assert 'no evaluation round has finished yet' in program.budget_stop(575.0, 600.0, None, 30.0)
  assert '0s left' in program.budget_stop(700.0, 600.0, 5.0, 30.0)  # overrun: never negative


def test_a_budgeted_run_stops_training_in_time_for_its_final_evaluation(
    ray_session, tiny_dataset_dir, tmp_path, monkeypatch):
  """`program.run(deadline=...)` (the demo's `--minutes`, `train --budget-minutes`): a learner
  that would train for a million steps stops when what is left of the budget covers the final
  evaluation's estimate plus the margin, and the final params are still evaluated."""
  ray = ray_session
  monkeypatch.setattr(program, 'BUDGET_MARGIN_S', 3.0)  # the driver's margin, sized for tiny runs
  budget_s = 15.0
  cfg = run.resolve_config('cpu_tiny', tiny_dataset_dir, steps=1_000_000, evaluators=1).replace(
      eval=dict(final_steps_per_game=300, eval_every_seconds=5.0))
  workdir = str(tmp_path / 'budget')
  run.prepare_workdir(cfg, workdir)
  prog = program.build(cfg, workdir, num_evaluators=1, num_steps=cfg.train.num_steps)
  # The nodes run from here; the budget's clock starts with program.run, once the learner has
  # stepped and the evaluator has finished a round (on a busy machine, compiling and the first
  # round can take longer than a tiny budget).
  def started():
    try:  # (a node still in its constructor answers once it is done)
      return (ray.get(prog.learner.status.remote(), timeout=10)['steps'] >= 1
              and ray.get(prog.evaluators[0].status.remote(), timeout=10)['rounds'] >= 1)
    except ray.exceptions.GetTimeoutError:
      return False
  wait_for(started, 300, 'a learner step and the evaluator\'s first round', poll=1.0)
  lines = []
  started = time.time()
  status = program.run(prog, log=lines.append, timeout_s=400, final_eval_timeout_s=120,
                       deadline=time.time() + budget_s)
  elapsed = time.time() - started
  log = '\n'.join(lines)
  stop_lines = [line for line in lines if line.startswith(f'time budget of {budget_s:.0f}s')]
  assert len(stop_lines) == 1 and 'the final evaluation needs ~' in stop_lines[0], log[-3000:]
  assert 0 < status.learner['steps'] < cfg.train.num_steps
  rows = _eval_rows(workdir)
  # (A round of the evaluator's own clock may also have caught the final params, on its budget.)
  final = [r for r in rows if r['param_version'] == status.learner['steps'] and r['budget'] == 300]
  assert {r['game'] for r in final} == set(cfg.games), rows
  # Without the budget it would run to timeout_s (400 s). Stopping the nodes and Ray is what the
  # margin (3 s here, 30 s by default) is for; on a busy machine (the suite runs two workers) the
  # final evaluation also runs slower than its CPU-time estimate.
  assert elapsed < budget_s + 90, log[-3000:]


def test_empty_game_folders_end_the_program_instead_of_waiting_for_data(ray_session,
                                                                       tiny_dataset_dir,
                                                                       tmp_path):
  """The probe of issue 12 (game folders that exist but hold no files; `check_data` now refuses
  them before launch, so this builds the program directly): the nodes that read them fail (the
  inserter on every start, the learner's constructor when it reads the data) and the run ends
  with that node's traceback instead of printing "waiting for data" forever."""
  data = tmp_path / 'empty_games'
  shutil.copytree(tiny_dataset_dir, data)
  for game_dir in (data / 'rlu_atari_checkpoints_ordered').iterdir():
    for entry in game_dir.iterdir():
      shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
  # The first restart of a failing node ends the run (the budget's counting is tested above).
  cfg = run.resolve_config('cpu_tiny', str(data), steps=50, evaluators=1).replace(
      train=dict(crash_loop_restarts=1))
  workdir = str(tmp_path / 'empty')
  run.prepare_workdir(cfg, workdir)
  prog = program.build(cfg, workdir, num_evaluators=0, num_steps=50)
  with pytest.raises(program.NodeLost) as lost:
    program.run(prog, log=lambda line: None, timeout_s=400, final_eval_timeout_s=None)
  message = str(lost.value)
  assert message.split()[0] in ('inserter_0', 'learner'), message[:500]
  assert 'Traceback' in message or 'File "' in message, message[:2000]


def test_nodes_ray_cannot_place_are_shown_and_end_the_run_at_the_placement_timeout(
    ray_session, tiny_dataset_dir, tmp_path, monkeypatch):
  """A cluster run (`--address`, where no GPU check runs before the nodes start) whose learner
  and evaluator ask for GPUs no node has: the progress line says which nodes Ray has not placed
  and what they ask for, and the run ends at train.placement_timeout_s naming them, instead of
  printing "learner (starting)" for ever. This Ray session has no GPU."""
  monkeypatch.setattr(program, 'UNPLACED_SHOWN_AFTER_S', 0.5)
  cfg = run.resolve_config('cpu_tiny', tiny_dataset_dir, steps=50, evaluators=1).replace(
      train=dict(placement_timeout_s=5.0), eval=dict(gpus_per_evaluator=0.5))
  workdir = str(tmp_path / 'unplaced')
  run.prepare_workdir(cfg, workdir)
  prog = program.build(cfg, workdir, num_evaluators=1, num_steps=50, learner_gpus=1,
                       num_inserters=0)
  lines = []
  started = time.time()
  with pytest.raises(program.NodeLost) as lost:
    program.run(prog, log=lines.append, timeout_s=400, status_every_s=0.5)
  elapsed = time.time() - started
  message = str(lost.value)
  assert message.startswith('learner was never started: for '), message
  assert 'CPU 1, GPU 1 free' in message and 'GPU 0/0' in message, message
  assert 'train.placement_timeout_s=5' in message, message
  shown = [line for line in lines if 'not placed by Ray' in line]
  assert shown, lines
  assert 'learner (not placed by Ray for ' in shown[-1] and 'asks for CPU 1, GPU 1)' in shown[-1]
  assert 'not placed by Ray: evaluator_0 ' in shown[-1] and '(CPU 1, GPU 0.5)' in shown[-1]
  assert 'cluster free/total CPU ' in shown[-1] and 'GPU 0/0' in shown[-1]
  assert 'learner not running (Ray has not placed it): nothing to checkpoint' in lines, lines
  # No 30-s wait for a stop() the unplaced learner could never answer.
  assert elapsed < 5.0 + 20.0, (elapsed, lines)
  with pytest.raises(ValueError, match='placement_timeout_s'):
    program.build(cfg.replace(train=dict(placement_timeout_s=0.0)), '/nonexistent', 1, 1)


def test_a_learner_that_makes_no_step_for_the_stall_timeout_ends_the_run(ray_session, tmp_path):
  """A learner that never steps (a wedged device; before the driver followed a replay to another
  address, one that came back there) answers its status at the same step for ever, and the run
  waited with it. With
  train.stall_timeout_s the driver ends it, naming the step and the replay's tables. Stand-in
  nodes: this is the driver's rule (the clock's cases are in the test below); a whole program
  whose learner waits cost 18-25 s of the suite."""
  from ray import cloudpickle
  module = sys.modules[__name__]
  cloudpickle.register_pickle_by_value(module)  # the workers cannot import this test file
  try:
    node = ray_session.remote(num_cpus=0)(_Node)
    cfg = configs.get_config('cpu_tiny').replace(train=dict(stall_timeout_s=2.0))
    learner = node.remote(status=dict(pid=1, steps=3, num_steps=50, done=False, steps_per_s=0.0,
                                      metrics={}))
    replay = node.remote(status=dict(table_sizes={'Breakout': 0, 'Pong': 0}))
    prog = program.Program(cfg, str(tmp_path), replay, 'replay', [], learner,
                           variable_server.VariableServer.create(1), [], [])
    lines = []
    with pytest.raises(program.NodeLost) as lost:
      program.run(prog, log=lines.append, timeout_s=60, status_every_s=0.25,
                  final_eval_timeout_s=None)
    message = str(lost.value)
    assert message.startswith('the learner made no step for '), message
    assert ', at step 3 (train.stall_timeout_s=2): it waits for something that does not come ' \
           "(its batches: the replay tables hold {'Breakout': 0, 'Pong': 0}" in message, message
    assert any(line.startswith('ending the program: the learner made no step') for line in lines)
  finally:
    cloudpickle.unregister_pickle_by_value(module)


def test_the_stall_clock_runs_only_while_the_same_learner_shows_the_same_step():
  watcher = program._Watcher(stall_timeout_s=10.0)  # pylint: disable=protected-access
  at = lambda steps, pid=1, done=False: dict(pid=pid, steps=steps, done=done)
  for now, learner in ((0, at(5)), (9, at(5)), (15, at(6)), (24, at(6)), (26, None), (30, at(6)),
                       (39, at(6)), (40, at(6, pid=2)), (49, at(6, pid=2)), (50, at(50, done=True)),
                       (90, at(50, done=True))):
    watcher.check_progress(learner, None, now=now)  # restarts, steps, a new process, done
  # Data that moves is no stall: online fine-tuning's inserts (a restarted learner first waits
  # for the inserts its lost steps were paced against), or the replay's tables filling.
  for now, inserted, sizes in ((60, 10, 0), (69, 20, 0), (78, 30, 0), (87, 30, 4), (96, 30, 8)):
    watcher.check_progress(dict(at(7), inserted=inserted), dict(table_sizes={'Pong': sizes}),
                           now=now)
  watcher.check_progress(at(7), None, now=100)
  watcher.check_progress(at(7), None, now=110)  # 10 s: not over the limit
  with pytest.raises(program.NodeLost, match=r'no step for 11s, at step 7 .*the replay did not '
                                             r'answer'):
    watcher.check_progress(at(7), None, now=111)
  program._Watcher().check_progress(at(0), None, now=1e9)  # no limit
  with pytest.raises(ValueError, match='train.stall_timeout_s must be > 0'):
    program.check_fault_config(configs.get_config('cpu_tiny').replace(
        train=dict(stall_timeout_s=0.0)))


def test_the_driver_restarts_the_clients_left_at_the_address_of_an_earlier_replay_start():
  """`_Watcher.follow_replay`: a replay back at another address (another host) has the clients
  still at an earlier start's address killed (Ray restarts them, and they ask for the address at
  their start), once per restart, even when the driver missed the replay's first start. Left
  alone: a client behind at the same address (a restart on its port), a cached status of a
  process that is gone (Ray's record shows another process, or a restart), a client at a newer
  start than the driver has seen, a done one, one whose start is unknown, the evaluators; a
  late answer of the replay's earlier start changes nothing; a watcher without `kill` (the one
  that stops the program) never kills. A new address gets the security line again."""
  killed, forced = [], []
  kill = lambda handle, force=False: (forced if force else killed).append(handle)
  alive = lambda pid=1, restarts=0: dict(State='ALIVE', Pid=pid, NumRestarts=restarts)
  names = ['replay', 'learner', 'inserter_0', 'inserter_1', 'evaluator_0', 'actor_0', 'actor_1',
           'actor_2']
  records = {n: alive() for n in names}
  # Statuses below of processes that are gone: restarting; another pid; the same pid (on
  # another host), another restart.
  records['inserter_1'] = dict(State='RESTARTING', Pid=1, NumRestarts=0)
  records.update(actor_1=alive(pid=2), actor_2=alive(pid=1, restarts=1))
  watcher = program._Watcher(  # pylint: disable=protected-access
      kill=kill, gcs_info=lambda handle: records[handle])

  class Nodes:  # the program's nodes, handles named after them
    def nodes(self):
      return [(n, n) for n in names]

  a, b, c = 'h1:5000', 'h2:5000', 'h2:6000'
  at = lambda address, start, pid=1, **kw: dict(pid=pid, replay_address=address,
                                                replay_start=start, **kw)
  # The replay restarted on its port: clients behind, at its address, reconnect by themselves.
  watcher.announced = a
  statuses = dict(replay=dict(start=1, address=a), learner=at(a, 0), inserter_0=at(a, 0),
                  inserter_1=at(a, 0), evaluator_0=dict(pid=1), actor_0=at(a, 0),
                  actor_1=at(a, 0), actor_2=at(a, 0, restarts=0))
  watcher.follow_replay(Nodes(), statuses)
  assert killed == [] and watcher.notes == []
  # Its next start is on another host (the driver saw no status of it before: it follows).
  statuses['replay'] = dict(start=3, address=b)
  watcher.follow_replay(Nodes(), statuses, now=0.0)
  assert killed == ['learner', 'inserter_0', 'actor_0']
  assert watcher.notes[0].startswith('security: the Reverb server (replay node) listens on port '
                                     '5000 of ALL interfaces (h2:5000;'), watcher.notes
  assert watcher.notes[1] == ('learner restarted by the driver to follow the replay to h2:5000 '
                              '(from h1:5000)')
  # Their old statuses, until they answer again: asked once; one still that process when the
  # request's deadline has passed (it never ran) is killed, once.
  watcher.follow_replay(Nodes(), statuses, now=program.FORCE_RESTART_AFTER_S)
  assert killed == ['learner', 'inserter_0', 'actor_0'] and len(watcher.notes) == 4
  assert forced == []
  watcher.follow_replay(Nodes(), statuses, now=program.FORCE_RESTART_AFTER_S + 1)
  watcher.follow_replay(Nodes(), statuses, now=program.FORCE_RESTART_AFTER_S + 2)
  assert killed == ['learner', 'inserter_0', 'actor_0']
  assert forced == ['learner', 'inserter_0', 'actor_0']
  assert watcher.notes[4] == (
      f'learner did not restart within {program.FORCE_RESTART_AFTER_S:.0f}s: killed')
  del watcher.notes[4:]
  # Restarted: the learner at the new start; inserter_0 asked the replay after a start the
  # driver has not seen yet; actor_0 done; inserter_1's start unknown.
  records.update(learner=alive(2, 1), inserter_0=alive(2, 1), inserter_1=alive(2, 1),
                 actor_0=alive(2, 1))
  statuses.update(learner=at(b, 3, pid=2), inserter_0=at(c, 4, pid=2),
                  inserter_1=at(a, None, pid=2), actor_0=at(a, 0, pid=2, done=True))
  watcher.follow_replay(Nodes(), statuses)
  assert killed == ['learner', 'inserter_0', 'actor_0']
  statuses['replay'] = dict(start=4, address=c)
  watcher.follow_replay(Nodes(), statuses)
  assert killed[3:] == ['learner']
  assert watcher.notes[-2].startswith('security: the Reverb server (replay node) listens on '
                                      'port 6000 of ALL interfaces'), watcher.notes
  # A late answer of the earlier start changes neither the newest address nor the notes:
  # inserter_1, back at that start's address, is behind.
  notes = list(watcher.notes)
  records['inserter_1'] = alive(3, 2)
  statuses.update(replay=dict(start=3, address=b), inserter_1=at(b, 3, pid=3, restarts=2))
  watcher.follow_replay(Nodes(), statuses)
  assert killed[4:] == ['inserter_1']
  assert watcher.notes == notes + ['inserter_1 restarted by the driver to follow the replay to '
                                   'h2:6000 (from h2:5000)']
  # A run whose start-up could not ask the replay's address names it at the first status.
  unnamed = program._Watcher(kill=kill, gcs_info=lambda handle: records[handle])  # pylint: disable=protected-access
  unnamed.follow_replay(Nodes(), dict(replay=dict(start=0, address=a)))
  assert unnamed.notes[0].startswith('security: the Reverb server (replay node) listens on port '
                                     '5000 of ALL interfaces (h1:5000;'), unnamed.notes
  stopping = program._Watcher(gcs_info=lambda handle: records[handle])  # pylint: disable=protected-access
  stopping.follow_replay(Nodes(), dict(statuses, learner=at(a, 0, pid=2)))
  assert killed[5:] == []


def test_a_restart_the_driver_caused_shows_its_reason_and_later_ones_do_not(tmp_path):
  """The progress line's last error of a node the driver killed (`follow_replay`) is the
  driver's reason, for the restart the kill caused only: a later restart, or two seen at once,
  shows what Ray or the node's log says. Only the restart the driver caused is left out of the
  node's crash-loop budget."""
  import types
  records = dict(learner=dict(State='ALIVE', Pid=1, NumRestarts=0))
  watcher = program._Watcher(program.RestartBudget(5, 600),  # pylint: disable=protected-access
                             gcs_info=lambda handle: records[handle.name])
  handle = types.SimpleNamespace(name='learner', _actor_id=types.SimpleNamespace(hex=lambda: 'a1'))
  prog = types.SimpleNamespace(workdir=str(tmp_path), needs={},
                               nodes=lambda: [('learner', handle)])
  watcher._requests['learner'] = (0, 'restarted by the driver', 0.0)  # pylint: disable=protected-access
  records['learner'] = dict(State='ALIVE', Pid=2, NumRestarts=1)
  health = watcher.health(prog)['learner']
  assert health['last_error'] == 'restarted by the driver' and health['in_window'] == 0
  records['learner'] = dict(State='ALIVE', Pid=3, NumRestarts=2)
  health = watcher.health(prog)['learner']
  assert health['last_error'] == 'no traceback (killed or lost)' and health['in_window'] == 1
  watcher._requests['learner'] = (2, 'restarted by the driver', 0.0)  # pylint: disable=protected-access
  records['learner'] = dict(State='ALIVE', Pid=5, NumRestarts=4)  # two restarts between polls
  health = watcher.health(prog)['learner']
  assert health['last_error'] == 'no traceback (killed or lost)' and health['in_window'] == 3


def test_unplaced_reads_rays_actor_records_at_a_first_start_and_at_a_restart():
  """`_unplaced` on Ray 2.60's GCS actor records as probed (2026-12-05; docs/reliability.md):
  an actor asking for a GPU no node has, one whose constructor sleeps, and one whose restart
  waits for a custom resource another actor took meanwhile (it keeps its old pid; its address
  is gone). A restart whose worker is placed at once is not unplaced."""
  node = 'f826b180048301a1d96f13be88276fa38db5e9de9bda5dde3b0fcd24'
  gone = {'IPAddress': '', 'Port': 0, 'NodeID': node}
  there = {'IPAddress': '192.0.2.2', 'Port': 43339, 'NodeID': node}
  assert program._unplaced({'State': 'PENDING_CREATION', 'Pid': 0, 'Address': gone})
  assert program._unplaced({'State': 'DEPENDENCIES_UNREADY', 'Pid': 0, 'Address': gone})
  assert program._unplaced({'State': 'RESTARTING', 'Pid': 24265, 'Address': gone})
  assert not program._unplaced({'State': 'PENDING_CREATION', 'Pid': 22573, 'Address': there})
  assert not program._unplaced({'State': 'RESTARTING', 'Pid': 24265, 'Address': there})
  assert not program._unplaced({'State': 'ALIVE', 'Pid': 24266, 'Address': there})
  assert not program._unplaced({'State': 'DEAD', 'Pid': 0, 'Address': gone})


def test_a_node_whose_constructor_raises_records_its_traceback(tmp_path):
  """Like a crashed loop, in WORKDIR/logs/<node>.err (what the driver's NodeLost message shows),
  whatever Ray records of the failed constructor; then the constructor's error is raised."""
  from scaled_ql.launch import nodes

  class Broken(nodes._LoopNode):  # pylint: disable=protected-access
    name = 'broken'

    def __init__(self, cfg, workdir=None):
      del cfg
      raise FileNotFoundError(f'no data for this node (workdir {workdir})')

  with pytest.raises(FileNotFoundError, match='no data for this node'):
    Broken(None, workdir=str(tmp_path))
  log = (tmp_path / 'logs' / 'broken.err').read_text()
  assert '[broken] crashed:' in log and 'Traceback' in log and 'FileNotFoundError' in log
  assert 'no data for this node' in program._crash_log(str(tmp_path), 'broken')

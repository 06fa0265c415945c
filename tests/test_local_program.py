"""The program's real nodes in one process, without Ray (tests/local_program.py): the Reverb node,
an inserter streaming the tiny TFDS dataset, the learner publishing to an in-process variable
server and an evaluator playing the real emulator, each on its own loop thread as inside a Ray
actor."""
import json
import os
import time

from scaled_ql.agents import checkpointing, runner
from scaled_ql.launch import nodes, run
from scaled_ql.launch.variable_server import LocalVariableServer

import local_program  # tests/local_program.py

NUM_STEPS = 12


def test_learner_data_and_evaluator_nodes_run_end_to_end_in_process(tiny_dataset_dir, tmp_path):
  cfg = run.resolve_config('cpu_tiny', tiny_dataset_dir, steps=NUM_STEPS, evaluators=1).replace(
      eval=dict(steps_per_game=40, final_steps_per_game=60, eval_every_seconds=3600.0),
      train=dict(checkpoint_every_steps=5, publish_every_steps=4))
  workdir = str(tmp_path / 'local')
  out = local_program.run_in_process(cfg, workdir, NUM_STEPS)
  assert out.learner['steps'] == NUM_STEPS and out.learner['published_version'] == NUM_STEPS
  step_ms = out.learner['step_ms']  # every step's duration is kept (fewer than STEP_TIMES_KEPT)
  assert step_ms['n'] == NUM_STEPS and 0 < step_ms['p50'] <= step_ms['p90'] <= step_ms['p99']
  assert all(size >= cfg.data.min_fill_per_game for size in out.replay['table_sizes'].values())
  assert out.stopped_at == NUM_STEPS
  data = out.inserter['data']
  assert data['episodes_read'] > 0 and data['corrupt_files'] == data['undecodable_episodes'] == 0
  with open(os.path.join(workdir, 'eval', 'evaluator_0.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert {r['game'] for r in rows} == set(cfg.games)
  assert {r['param_version'] for r in rows} >= {NUM_STEPS}
  # The evaluator's first round (params of step 0) came on its own; wake(final=True) asked for
  # the final params, on the final budget. Had the wake caught that round in progress, the round
  # gave way (its finished games keep their rows).
  step0 = [r['budget'] for r in rows if r['param_version'] == 0]
  assert set(step0) <= {40}
  if out.evaluator['abandoned_rounds'] == 0:
    assert sorted(step0) == [40, 40]
  assert {r['budget'] for r in rows if r['param_version'] == NUM_STEPS} == {60}
  _, _, step = checkpointing.load_params(workdir)
  assert step == NUM_STEPS


def test_step_time_percentiles():
  assert runner.step_time_percentiles([]) == {}
  # 100 steps of 50 ms and 1 ms more each: p50 between the 50th and 51st, in milliseconds.
  p = runner.step_time_percentiles([0.050 + 0.001 * i for i in range(100)])
  assert p['n'] == 100
  assert abs(p['p50'] - 99.5) < 1e-9 and abs(p['p90'] - 139.1) < 1e-9
  assert abs(p['p99'] - 148.01) < 1e-9
  # A tail of slow steps moves p90/p99, not p50.
  tail = runner.step_time_percentiles([0.05] * 85 + [0.2] * 15)
  assert tail['p50'] == 50.0 and tail['p90'] == 200.0


def test_a_learner_waiting_on_its_paced_table_stops_promptly_and_checkpoints(tmp_path):
  """Online fine-tuning without actors: the learner's sampler waits on the paced table (nothing
  was inserted). stop() must not hang on it: it wakes the waiting sampler, checkpoints the step
  it is at (0) and returns."""
  from scaled_ql import configs
  from scaled_ql.datasets import reverb_tables
  from scaled_ql.launch import finetune
  cfg = configs.finetune_online(configs.get_config('cpu_tiny'), 'Breakout', None,
                                pretrained=None, num_steps=5, scale=0.001)
  workdir = str(tmp_path / 'online')
  run.prepare_workdir(cfg, workdir)
  with local_program.crashes_kept_in_status():
    replay_node = nodes.ReverbNode(cfg, pacing=reverb_tables.TablePacing.from_config(cfg))
    try:
      learner = finetune.FinetuneLearnerNode(cfg, nodes.LocalReplay(replay_node),
                                             LocalVariableServer(), workdir, 5)
      time.sleep(3.0)
      status = learner.status()
      assert status['steps'] == 0 and status['inserted'] == 0 and status['allowed_steps'] == 0
      assert status['waited_for_actors_s'] > 1.0  # the wait in progress counts
      assert status['step_ms'] == {}  # no step has ended
      started = time.monotonic()
      assert learner.stop() == 0
      assert time.monotonic() - started < 15  # measured 3.6 s
      assert learner.stop() == 0  # a stop sent again (the driver's retry) returns the first's step
      assert learner.status()['error'] is None
    finally:
      replay_node.stop()
  _, _, step = checkpointing.load_params(workdir)
  assert step == 0


def test_a_round_of_old_params_gives_way_to_the_final_evaluation(tmp_path):
  """wake(final=True) in the middle of a long round of old params: the evaluator drops that round
  (no record, no score from its partial episode) and evaluates the final params at once, on the
  final budget; its status carries what the driver's estimate of a final evaluation reads."""
  import jax
  from scaled_ql.agents import builder
  from scaled_ql.configs import get_config
  from polling import wait_for
  # A round of 100K steps per game would take minutes; the final one, 30 steps per game, seconds.
  cfg = get_config('cpu_tiny').replace(eval=dict(steps_per_game=100_000, final_steps_per_game=30,
                                                 eval_every_seconds=3600.0))
  params = builder.agent_networks(cfg).q.init(jax.random.PRNGKey(0), *builder.dummy_inputs())
  variables = LocalVariableServer()
  publisher = variables.publisher()
  publisher.publish(params, 0)
  workdir = str(tmp_path / 'eval_node')
  niceness = os.nice(0)
  with local_program.crashes_kept_in_status():
    node = nodes.EvaluatorNode(cfg, cfg.games, variables, workdir, 0)
    # Built in this process (not a Ray actor), the node leaves the process's niceness alone.
    assert os.nice(0) == niceness
    try:
      wait_for(lambda: node.status()['evaluating_version'] == 0, 120, 'the round of version 0')
      time.sleep(1.0)  # well into its first game
      publisher.publish(params, 7)
      started = time.monotonic()
      node.wake(final=True)
      wait_for(lambda: node.status()['evaluated_version'] == 7 or node.status()['error'], 120,
               'the final evaluation')
      took = time.monotonic() - started
      status = node.status()
    finally:
      node.stop()
  assert status['error'] is None, status['error']
  assert (status['rounds'], status['abandoned_rounds']) == (1, 1)
  assert took < 60  # the dropped round alone would have taken minutes
  latest = status['latest']
  assert set(latest) == set(cfg.games)
  for row in latest.values():
    assert row['budget'] == 30 and row['steps'] >= 30 and row['param_version'] == 7
    assert 0 < row['cpu_seconds'] and 0 < row['seconds']
    assert row['games_at_once'] == len(cfg.games)  # the evaluator plays its games at once
    assert row['longest_overrun'] == row['steps'] - 30  # its only finished round
  with open(os.path.join(workdir, 'eval', 'evaluator_0.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert {r['param_version'] for r in rows} == {7}  # nothing of the dropped round


def test_final_params_a_round_already_evaluated_get_the_final_budget_too(tmp_path):
  """A round on the normal budget can evaluate the final params between the learner's last
  publish and wake(final=True). The final evaluation still plays them on the final budget, and
  the driver waits for that (`final_version`); before, the evaluator counted them as done and the
  run's result was the short round's. Where the final budget is the normal one, any round counts
  as final and the wake adds none."""
  import jax
  from scaled_ql.agents import builder
  from scaled_ql.configs import get_config
  from polling import wait_for
  base = get_config('cpu_tiny').replace(eval=dict(steps_per_game=20, eval_every_seconds=3600.0))
  params = builder.agent_networks(base).q.init(jax.random.PRNGKey(0), *builder.dummy_inputs())
  variables = LocalVariableServer()
  variables.publisher().publish(params, 7)
  for final_budget in (50, None):
    cfg = base.replace(eval=dict(final_steps_per_game=final_budget))
    workdir = str(tmp_path / f'final_{final_budget}')
    with local_program.crashes_kept_in_status():
      node = nodes.EvaluatorNode(cfg, cfg.games[:1], variables, workdir, 0)  # one game: faster
      try:
        wait_for(lambda: node.status()['evaluated_version'] == 7 or node.status()['error'], 120,
                 'a round of the final params on the normal budget')
        before = node.status()
        node.wake(final=True)
        wait_for(lambda: node.status()['final_version'] == 7 or node.status()['error'], 120,
                 'the final evaluation')
        time.sleep(2 * nodes.RETRY_SECONDS)  # no further round of the same params
        status = node.status()
      finally:
        node.stop()
    assert status['error'] is None, status['error']
    with open(os.path.join(workdir, 'eval', 'evaluator_0.jsonl')) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    budgets = sorted({(r['param_version'], r['budget']) for r in rows})
    if final_budget is None:
      assert before['final_version'] == 7 and status['rounds'] == 1 and budgets == [(7, 20)]
    else:
      assert before['final_version'] == -1 and not before['final'] and status['final']
      assert status['rounds'] == 2 and budgets == [(7, 20), (7, 50)]
      assert all(row['budget'] == 50 for row in status['latest'].values())


def _evaluator_rounds_around_a_restart(workdir, cfg, first_version, restart, what):
  """An in-process EvaluatorNode on the config's first game: a round of params published at
  `first_version` (lineage 0, the lost run's), then `restart(variables, params, node)` (what a
  restarted learner publishes), then its second round, described by `what`. Returns its status."""
  import jax
  from scaled_ql.agents import builder
  from polling import wait_for
  params = builder.agent_networks(cfg).q.init(jax.random.PRNGKey(0), *builder.dummy_inputs())
  variables = LocalVariableServer()
  variables.publisher().publish(params, first_version)
  with local_program.crashes_kept_in_status():
    node = nodes.EvaluatorNode(cfg, cfg.games[:1], variables, workdir, 0)  # one game
    try:
      wait_for(lambda: node.status()['rounds'] == 1 or node.status()['error'], 120,
               f"a round of the lost run's params of step {first_version}")
      restart(variables, params, node)
      wait_for(lambda: node.status()['rounds'] == 2 or node.status()['error'], 60, what)
      return node.status()
    finally:
      node.stop()


def test_a_restarted_learners_params_of_steps_evaluated_before_are_evaluated_again(tmp_path):
  """The learner published 7 and was evaluated, then restarted from an older checkpoint and
  reached step 7 again: a new lineage (`launch/variable_server.py`). Its params of step 7 are
  other params than the lost run's, so they get a round of their own; before, the evaluator held
  version 7 as done and the run's curve kept the lost run's scores."""
  from scaled_ql.configs import get_config
  assert nodes.forget_lost_versions(4, 9, -1) == (3, -1)  # steps from 4 on: the lost run's
  assert nodes.forget_lost_versions(12, 9, 9) == (9, 9)
  assert nodes.first_lost_version(str(tmp_path), 0, 7) == 7  # no learner start recorded
  cfg = get_config('cpu_tiny').replace(eval=dict(steps_per_game=20, eval_every_seconds=3600.0))

  def restart(variables, params, node):
    variables.publisher().publish(params, 7)  # the restarted learner, at step 7 again
    node.wake()  # the next round now, not eval_every_seconds later

  status = _evaluator_rounds_around_a_restart(
      str(tmp_path), cfg, 7, restart, "a round of the restarted learner's params of step 7")
  assert status['error'] is None, status['error']
  assert (status['evaluated_version'], status['lineage']) == (7, 1)
  with open(os.path.join(tmp_path, 'eval', 'evaluator_0.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert [(r['param_version'], r['param_lineage']) for r in rows] == [(7, 0), (7, 1)]
  from scaled_ql.eval import report
  with open(os.path.join(tmp_path, 'learner_starts.jsonl'), 'w') as f:  # (what LearnerNode logs)
    f.write('{"restart": 0, "resumed_from_step": 0}\n{"restart": 1, "resumed_from_step": 5}\n')
  assert report.read_eval_logs(str(tmp_path)).lost == 1  # the lost run's round of step 7


def test_a_restarted_learners_params_first_fetched_past_its_resume_step_get_a_round(tmp_path):
  """Step cadence (eval_every_steps=4): the lost run's params of step 8 (lineage 0) were
  evaluated. During the evaluator's next round the learner restarted twice: from its checkpoint
  of step 5 (lineage 1, which saved step 10 and died), then from step 10 (lineage 2). The
  evaluator first fetches lineage 2, at step 11. Lineage 0's params past step 5 were lost, so
  its round of step 8 no longer counts: 11 // 4 > 5 // 4, a round now. Forgetting from the
  fetched step (the rule before), or from the newest start's resume step (10), kept step 8 as
  evaluated, and the new run got no round before step 12."""
  from scaled_ql.configs import get_config
  from scaled_ql.eval import report
  cfg = get_config('cpu_tiny').replace(eval=dict(steps_per_game=20, eval_every_steps=4))
  starts = os.path.join(tmp_path, 'learner_starts.jsonl')  # (what LearnerNode logs)
  with open(starts, 'w') as f:
    f.write('{"restart": 0, "resumed_from_step": 0}\n')

  def restart(variables, params, node):
    with open(starts, 'a') as f:
      f.write('{"restart": 1, "resumed_from_step": 5}\n{"restart": 2, "resumed_from_step": 10}\n')
    variables.publisher(lineage=2).publish(params, 11)  # lineage 1 was never fetched

  status = _evaluator_rounds_around_a_restart(
      str(tmp_path), cfg, 8, restart, "a round of the restarted learner's params of step 11")
  assert status['error'] is None, status['error']
  assert (status['evaluated_version'], status['lineage']) == (11, 2)
  # The evaluator's rule is the readers': lineage 0's round of step 8 is left out of the curves.
  assert report.read_eval_logs(str(tmp_path)).lost == 1
  workdir = str(tmp_path)
  assert nodes.first_lost_version(workdir, 0, 11) == 6  # past min(5, 10), the starts after 0
  assert nodes.first_lost_version(workdir, 1, 20) == 11  # past 10, the start after lineage 1
  assert nodes.first_lost_version(workdir, 0, 4) == 4  # never past the fetched step
  for held in (-1, 2, 7):  # nothing held; no start after it; a lineage the file does not number
    assert nodes.first_lost_version(workdir, held, 20) == 20  # the fetched step
  with open(starts, 'a') as f:
    f.write('{"restart": 3}\n')  # no resume step: the cautious reading, every step lost
  assert nodes.first_lost_version(workdir, 2, 20) == 1


def test_a_learner_without_a_step_limit_trains_until_it_is_stopped(tiny_dataset_dir, tmp_path):
  """num_steps=None (benchmarks/chaos.py, program_throughput.py): the learner node is never done
  on its own; it trains on past any count until stop(), which checkpoints and publishes the step
  it reached."""
  from polling import wait_for
  # The config's own step count (1) is not the node's: the node is given None. (One evaluator
  # is what resolve_config checks; none is started.)
  cfg = run.resolve_config('cpu_tiny', tiny_dataset_dir, steps=1, evaluators=1).replace(
      train=dict(checkpoint_every_steps=1000, publish_every_steps=4))
  workdir = str(tmp_path / 'unbounded')
  with local_program.data_and_learner(cfg, workdir, None) as running:
    learner = running.learner
    wait_for(lambda: (learner.status()['steps'] >= 9 or learner.status()['done']
                      or learner.status()['error']), 240, 'the learner to take 9 steps')
    status = learner.status()
    assert status['error'] is None, status['error']
    assert status['num_steps'] is None and not status['done']
    assert status['published_version'] >= 8  # every publish_every_steps, no end in sight
    stopped_at = running.stop_learner()
  assert stopped_at >= status['steps'] >= 9
  _, _, step = checkpointing.load_params(workdir)
  assert step == stopped_at  # the final checkpoint, not the last periodic one (none was due)
  assert running.variables.latest_versions() == [stopped_at]  # the final params, published


# `LearnerNode.save_and_exit`'s failure paths, each in a process of its own (it ends the
# process): the learner waits on an online table nothing is inserted into, as above.
_SAVE_AND_EXIT = '''
import sys, time
from scaled_ql import configs
from scaled_ql.datasets import reverb_tables
from scaled_ql.launch import finetune, nodes, run
from scaled_ql.launch.variable_server import LocalVariableServer
mode, workdir = sys.argv[1:3]
cfg = configs.finetune_online(configs.get_config('cpu_tiny'), 'Breakout', None,
                              pretrained=None, num_steps=5, scale=0.001)
run.prepare_workdir(cfg, workdir)
replay = nodes.ReverbNode(cfg, pacing=reverb_tables.TablePacing.from_config(cfg))
learner = finetune.FinetuneLearnerNode(cfg, nodes.LocalReplay(replay), LocalVariableServer(),
                                       workdir, 5)
time.sleep(1.0)
if mode == 'save_fails':
  def save():
    raise OSError(28, 'No space left on device')
  learner._learner.save = save
elif mode == 'save_hangs':  # a save on a filesystem that stopped answering
  nodes.LEARNER_SAVE_AND_EXIT_S = 15.0  # (the loop's end comes first: 1-2 s, more if busy)
  def save():
    print('saving', flush=True)
    time.sleep(3600)
  learner._learner.save = save
elif mode == 'after_stop':
  learner.stop()
print('asking', flush=True)
asked = time.monotonic()
try:
  learner.save_and_exit()
finally:
  print(f'returned after {time.monotonic() - asked:.1f}s', flush=True)
replay.stop()
'''


def test_save_and_exit_ends_the_process_whatever_the_save_does(tmp_path):
  """A save that raises is recorded as the start's crash (WORKDIR/logs/learner.err, which the
  driver shows as the restart's cause) and the process ends; a save that never returns is cut
  by LEARNER_SAVE_AND_EXIT_S (15 s here), with no record; a learner already stopping ignores the
  request and its process goes on. Ray's restart would resume from the newest checkpoint."""
  import subprocess
  import sys
  started = time.monotonic()
  procs = {}
  for mode in ('save_fails', 'save_hangs', 'after_stop'):
    # (to files: the pipes of the processes not yet read could fill up and stop them)
    with open(tmp_path / f'{mode}.out', 'w', encoding='utf-8') as stdout, \
         open(tmp_path / f'{mode}.err', 'w', encoding='utf-8') as stderr:
      procs[mode] = subprocess.Popen(
          [sys.executable, '-c', _SAVE_AND_EXIT, mode, str(tmp_path / mode)],
          stdout=stdout, stderr=stderr)
  out = {}
  try:
    for mode, proc in procs.items():
      proc.wait(timeout=240)
      out[mode] = tuple([proc.returncode] + [
          (tmp_path / f'{mode}.{name}').read_text(encoding='utf-8', errors='replace')
          for name in ('out', 'err')])
      if mode == 'save_hangs':  # (the default deadline, 240 s, would have run into the timeout)
        assert time.monotonic() - started < 120, out[mode]
  finally:  # (every process, when one of them failed the test)
    for proc in procs.values():
      proc.kill()
      proc.wait()
  code, stdout, stderr = out['save_fails']
  assert code == 1 and 'asking' in stdout and 'returned' not in stdout, out['save_fails']
  with open(tmp_path / 'save_fails' / 'logs' / 'learner.err') as f:
    record = f.read()
  assert '[learner] crashed:' in record and 'OSError: [Errno 28] No space left on device' in record
  # No save, no request recorded: the restart counts as the start's failure.
  for mode in ('save_fails', 'save_hangs'):
    assert not (tmp_path / mode / nodes.LEARNER_EXIT_REQUESTED).exists(), mode
  code, stdout, stderr = out['save_hangs']
  assert code == 1 and 'returned' not in stdout, out['save_hangs']
  assert 'asking\nsaving\n' in stdout, out['save_hangs']  # the save is what the deadline cut
  assert not (tmp_path / 'save_hangs' / 'logs').exists()  # cut by the deadline: no record
  code, stdout, stderr = out['after_stop']
  assert code == 0 and 'returned after' in stdout, out['after_stop']
  assert not (tmp_path / 'after_stop' / 'logs').exists()
  _, _, step = checkpointing.load_params(str(tmp_path / 'after_stop'))
  assert step == 0  # stop()'s checkpoint

"""The program's real nodes in one process, without Ray (as Acme's run_experiment_test.py runs its
agents): the Reverb node, an inserter streaming the tiny TFDS dataset, the learner publishing to an
in-process variable server and an evaluator playing the real emulator. Every node runs its own
loop thread, exactly as inside a Ray actor; only the seams are local (`nodes.LocalReplay`,
`variable_server.LocalVariableServer`)."""
import json
import os
import time


from scaled_ql.agents import checkpointing
from scaled_ql.launch import nodes, run
from scaled_ql.launch.variable_server import LocalVariableServer

NUM_STEPS = 12


def _wait_for(predicate, timeout: float, what: str):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    time.sleep(0.2)
  raise AssertionError(f'timed out after {timeout:.0f}s waiting for {what}')


def test_learner_data_and_evaluator_nodes_run_end_to_end_in_process(tiny_dataset_dir, tmp_path,
                                                                    monkeypatch):
  # A crashing loop keeps its traceback in status()['error'] instead of ending pytest's process.
  monkeypatch.setattr(nodes._LoopNode, 'exit_on_crash', False)  # pylint: disable=protected-access
  cfg = run.resolve_config('cpu_tiny', tiny_dataset_dir, steps=NUM_STEPS, evaluators=1).replace(
      eval=dict(steps_per_game=40, final_steps_per_game=60, eval_every_seconds=3600.0),
      train=dict(checkpoint_every_steps=5, publish_every_steps=4))
  workdir = str(tmp_path / 'local')
  run.prepare_workdir(cfg, workdir)
  replay_node = nodes.ReverbNode(cfg)
  replay = nodes.LocalReplay(replay_node)
  variables = LocalVariableServer()
  inserter = learner = evaluator = None
  try:
    inserter = nodes.InserterNode(cfg, replay, 0, 1, workdir)
    learner = nodes.LearnerNode(cfg, replay, variables, workdir, NUM_STEPS)
    evaluator = nodes.EvaluatorNode(cfg, cfg.games, variables, workdir, 0)
    live = (inserter, learner, evaluator)
    _wait_for(lambda: learner.status()['done'] or any(n.status()['error'] for n in live), 240,
              'the learner to take its steps')
    assert [n.status()['error'] for n in live] == [None] * 3
    status = learner.status()
    assert status['steps'] == NUM_STEPS and status['published_version'] == NUM_STEPS
    assert all(size >= cfg.data.min_fill_per_game
               for size in replay_node.status()['table_sizes'].values())
    # The evaluator's first round (params of step 0) came on its own; wake() asks for the final,
    # on the final budget.
    evaluator.wake(final=True)
    _wait_for(lambda: evaluator.status()['evaluated_version'] >= NUM_STEPS, 180,
              'the evaluation of the final params')
    assert learner.stop() == NUM_STEPS
    data = inserter.status()['data']
    assert data['episodes_read'] > 0 and data['corrupt_files'] == data['undecodable_episodes'] == 0
  finally:
    for node in (evaluator, inserter):
      if node is not None:
        node.stop()
    replay_node.stop()
  with open(os.path.join(workdir, 'eval', 'evaluator_0.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert {r['game'] for r in rows} == set(cfg.games)
  assert {r['param_version'] for r in rows} >= {NUM_STEPS}
  assert {r['budget'] for r in rows if r['param_version'] == 0} == {40}
  assert {r['budget'] for r in rows if r['param_version'] == NUM_STEPS} == {60}
  _, _, step = checkpointing.load_params(workdir)
  assert step == NUM_STEPS


def test_a_learner_waiting_on_its_paced_table_stops_promptly_and_checkpoints(tmp_path,
                                                                             monkeypatch):
  """Online fine-tuning without actors: the learner's sampler waits on the paced table (nothing
  was inserted). stop() must not hang on it: it wakes the waiting sampler, checkpoints the step
  it is at (0) and returns."""
  monkeypatch.setattr(nodes._LoopNode, 'exit_on_crash', False)  # pylint: disable=protected-access
  from scaled_ql import configs
  from scaled_ql.datasets import reverb_tables
  from scaled_ql.launch import finetune
  cfg = configs.finetune_online(configs.get_config('cpu_tiny'), 'Breakout', None,
                                pretrained=None, num_steps=5, scale=0.001)
  workdir = str(tmp_path / 'online')
  run.prepare_workdir(cfg, workdir)
  replay_node = nodes.ReverbNode(cfg, pacing=reverb_tables.TablePacing.from_config(cfg))
  try:
    learner = finetune.FinetuneLearnerNode(cfg, nodes.LocalReplay(replay_node),
                                           LocalVariableServer(), workdir, 5)
    time.sleep(3.0)
    status = learner.status()
    assert status['steps'] == 0 and status['inserted'] == 0 and status['allowed_steps'] == 0
    assert status['waited_for_actors_s'] > 1.0  # the wait in progress counts
    started = time.monotonic()
    assert learner.stop() == 0
    assert time.monotonic() - started < 15  # measured 3.6 s
    assert learner.status()['error'] is None
  finally:
    replay_node.stop()
  _, _, step = checkpointing.load_params(workdir)
  assert step == 0

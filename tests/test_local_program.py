"""The program's real nodes in one process, without Ray (tests/local_program.py): the Reverb node,
an inserter streaming the tiny TFDS dataset, the learner publishing to an in-process variable
server and an evaluator playing the real emulator, each on its own loop thread as inside a Ray
actor."""
import json
import os
import time

from scaled_ql.agents import checkpointing
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
  assert all(size >= cfg.data.min_fill_per_game for size in out.replay['table_sizes'].values())
  assert out.stopped_at == NUM_STEPS
  data = out.inserter['data']
  assert data['episodes_read'] > 0 and data['corrupt_files'] == data['undecodable_episodes'] == 0
  with open(os.path.join(workdir, 'eval', 'evaluator_0.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert {r['game'] for r in rows} == set(cfg.games)
  assert {r['param_version'] for r in rows} >= {NUM_STEPS}
  # The evaluator's first round (params of step 0) came on its own; wake(final=True) asked for
  # the final params, on the final budget.
  assert {r['budget'] for r in rows if r['param_version'] == 0} == {40}
  assert {r['budget'] for r in rows if r['param_version'] == NUM_STEPS} == {60}
  _, _, step = checkpointing.load_params(workdir)
  assert step == NUM_STEPS


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
      started = time.monotonic()
      assert learner.stop() == 0
      assert time.monotonic() - started < 15  # measured 3.6 s
      assert learner.status()['error'] is None
    finally:
      replay_node.stop()
  _, _, step = checkpointing.load_params(workdir)
  assert step == 0

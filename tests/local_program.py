"""The program's real nodes in this process, without Ray (as Acme's run_experiment_test.py runs its
agents): the Reverb node, an inserter streaming a TFDS dataset, the learner publishing to an
in-process variable server and an evaluator playing the real emulator. Every node runs its own
loop thread, exactly as inside a Ray actor; only the seams are local (`nodes.LocalReplay`,
`variable_server.LocalVariableServer`). Used by tests/test_local_program.py and
tests/test_baselines.py; the Ray wiring itself is tested in tests/test_program.py."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import pytest

from scaled_ql.launch import nodes, run
from scaled_ql.launch.variable_server import LocalVariableServer

from polling import wait_for  # tests/polling.py


@dataclasses.dataclass
class Statuses:
  """What each node reported at the end of `run_in_process` (its `status()` dicts)."""
  learner: dict  # when its steps were done, before the final evaluation
  replay: dict  # at the same time
  inserter: dict
  evaluator: dict
  stopped_at: int  # the step `LearnerNode.stop()` returned


@contextlib.contextmanager
def crashes_kept_in_status():
  """A crashing node loop keeps its traceback in status()['error'] instead of ending the
  process (Ray's behaviour, which would end pytest's)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(nodes._LoopNode, 'exit_on_crash', False)  # pylint: disable=protected-access
    yield


@dataclasses.dataclass
class DataAndLearner:
  """The nodes `data_and_learner` runs."""
  replay_node: nodes.ReverbNode
  inserter: nodes.InserterNode
  learner: nodes.LearnerNode
  variables: LocalVariableServer
  stopped_at: Optional[int] = None  # the step `stop_learner()` returned

  def stop_learner(self) -> int:
    self.stopped_at = self.learner.stop()
    return self.stopped_at


@contextlib.contextmanager
def data_and_learner(cfg, workdir: str, num_steps: Optional[int]):
  """Prepares `workdir`, then runs the Reverb node, one inserter streaming cfg's data and the
  learner node (`num_steps`; None: until stopped) in this process, each crash kept in its
  status(). On the way out it stops the learner (unless `stop_learner()` did), the inserter and
  the server."""
  run.prepare_workdir(cfg, workdir)
  with crashes_kept_in_status():
    replay_node = nodes.ReverbNode(cfg)
    replay = nodes.LocalReplay(replay_node)
    variables = LocalVariableServer()
    inserter = running = None
    try:
      inserter = nodes.InserterNode(cfg, replay, 0, 1, workdir)
      running = DataAndLearner(replay_node, inserter,
                               nodes.LearnerNode(cfg, replay, variables, workdir, num_steps),
                               variables)
      yield running
    finally:
      if running is not None and running.stopped_at is None:
        running.stop_learner()  # a failed check: no loop thread left training in pytest
      if inserter is not None:
        inserter.stop()
      replay_node.stop()


def run_in_process(cfg, workdir: str, num_steps: int, *, learner_timeout_s: float = 240,
                   eval_timeout_s: float = 180) -> Statuses:
  """Trains `num_steps` steps through the real nodes, then evaluates the final params once (on
  `eval.final_steps_per_game`, as `program.run` does) and stops every node. Fails naming the
  node whose loop crashed, or what it timed out waiting for."""
  with data_and_learner(cfg, workdir, num_steps) as running:
    learner, evaluator = running.learner, None
    try:
      evaluator = nodes.EvaluatorNode(cfg, cfg.games, running.variables, workdir, 0)
      live = {'inserter': running.inserter, 'learner': learner, 'evaluator': evaluator}

      def errors():
        return {name: n.status()['error'] for name, n in live.items() if n.status()['error']}

      wait_for(lambda: learner.status()['done'] or errors(), learner_timeout_s,
               'the learner to take its steps')
      assert not errors(), errors()
      learner_status, replay_status = learner.status(), running.replay_node.status()
      evaluator.wake(final=True)
      wait_for(lambda: evaluator.status()['final_version'] >= num_steps or errors(),
               eval_timeout_s, 'the evaluation of the final params')
      assert not errors(), errors()
      stopped_at = running.stop_learner()
      return Statuses(learner=learner_status, replay=replay_status,
                      inserter=running.inserter.status(), evaluator=evaluator.status(),
                      stopped_at=stopped_at)
    finally:
      if evaluator is not None:
        evaluator.stop()

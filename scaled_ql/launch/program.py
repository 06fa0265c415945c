"""The distributed program: which nodes exist and how they are wired (a Launchpad program on Ray).

                 RLDS files
                     |
       inserter_0 .. inserter_{I-1}                (InserterNode; Ray restarts them)
                     |  Reverb trajectory writers
                  replay                           (ReverbNode: one table per game, fixed port)
                     |  stratified_batches (gRPC)
                  learner                          (LearnerNode: jitted sharded Learner, Orbax
                     |  publish(params, step)                    checkpoints in WORKDIR/checkpoints)
       variable_shard_0 .. variable_shard_{S-1}    (VariableServer: params split by size)
                     |  VariableClient (fetch all shards, one consistent version)
     evaluator_0 .. evaluator_{E-1}  [actor_0 ..]  (EvaluatorNode: own games, own clock ->
                                                    WORKDIR/eval/evaluator_<i>.jsonl, TensorBoard;
                                                    FinetuneActorNode: acts, inserts into replay)

Everything here is wiring: each node builds its component from the config (scaled_ql.launch.nodes)
and runs by itself; the driver (`run`) only watches, prints progress and ends the program.
Faults: every node is a Ray actor with `max_restarts`; a restarted node carries on by itself (the
learner from its last checkpoint, the replay server on the same port, inserters and the learner's
iterator reconnect). Ctrl-C / SIGTERM: the learner checkpoints, then every actor is stopped.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Optional, Sequence

import ray

from scaled_ql.configs.base import ExperimentConfig
from scaled_ql.launch import nodes
from scaled_ql.launch.variable_server import VariableServer

# How often a node may be restarted by Ray before the program gives up on it.
MAX_RESTARTS = dict(replay=5, inserter=5, learner=3, evaluator=5, actor=5, variable_shard=5)
# Logical CPUs each node asks Ray for. Inserters, replay and the variable shards are I/O-bound.
NUM_CPUS = dict(replay=0, inserter=0, learner=1, evaluator=1, actor=1, variable_shard=0)
STATUS_EVERY_SECONDS = 2.0


@dataclasses.dataclass
class Program:
  cfg: ExperimentConfig
  workdir: str
  replay: ray.actor.ActorHandle
  replay_name: str
  inserters: list
  learner: ray.actor.ActorHandle
  variables: VariableServer
  evaluators: list
  evaluator_games: list
  actors: list = dataclasses.field(default_factory=list)


def split_games(games: Sequence[str], num_evaluators: int) -> list[tuple[str, ...]]:
  """Round-robin assignment of games to evaluators; every evaluator gets at least one game."""
  if not 1 <= num_evaluators <= len(games):
    raise ValueError(f'--evaluators must be between 1 and the number of games ({len(games)}), '
                     f'got {num_evaluators}')
  return [tuple(games[i::num_evaluators]) for i in range(num_evaluators)]


def required_cpus(cfg: ExperimentConfig, num_actors: int = 0) -> int:
  """Logical CPUs the program's nodes ask Ray for (a local ray.init needs at least this many)."""
  return (NUM_CPUS['replay'] + cfg.data.num_inserters * NUM_CPUS['inserter'] + NUM_CPUS['learner']
          + cfg.eval.num_evaluators * NUM_CPUS['evaluator'] + num_actors * NUM_CPUS['actor'])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('', 0))
    return s.getsockname()[1]


def _actor(cls, kind: str, **options):
  return ray.remote(num_cpus=NUM_CPUS[kind], max_restarts=MAX_RESTARTS[kind],
                    max_concurrency=4, **options)(cls)


def build(cfg: ExperimentConfig, workdir: str, num_evaluators: int, num_steps: int,
          learner_gpus: float = 0, initial_params=None) -> Program:
  """Starts every node of the training program (the graph in the module docstring).
  `learner_gpus`: GPUs the learner node asks Ray for (on a cluster: 1 puts it on a GPU node).
  `initial_params`: the learner's starting Q-network params (transfer), instead of a random init."""
  # No evaluators at all is allowed here (benchmarks); the train command asks for >= 1.
  evaluator_games = split_games(cfg.games, num_evaluators) if num_evaluators else []
  # Nodes find the replay and the variable shards by name (never by a handle in their
  # arguments: Ray cannot always restart such actors, ray-project/ray#53727).
  prefix = f'{cfg.name}_{uuid.uuid4().hex[:8]}_'
  replay_name = prefix + 'replay'
  replay = _actor(nodes.ReverbNode, 'replay', name=replay_name).remote(cfg, free_port())
  variables = VariableServer.create(cfg.train.variable_server_shards, name_prefix=prefix,
                                    max_restarts=MAX_RESTARTS['variable_shard'])
  inserters = [
      _actor(nodes.InserterNode, 'inserter').remote(cfg, replay_name, i, cfg.data.num_inserters,
                                                    workdir)
      for i in range(cfg.data.num_inserters)]
  learner = _actor(nodes.LearnerNode, 'learner', num_gpus=learner_gpus).remote(
      cfg, replay_name, variables, workdir, num_steps, initial_params)
  # eval.gpus_per_evaluator (train --evaluator-gpus) > 0: Ray gives each evaluator that share of
  # a GPU and the evaluator runs its policy there (eval/evaluator.py policy_device). JAX would
  # take 75% of the GPU's memory per process: evaluators sharing a GPU allocate as they go.
  gpu_options = {} if not cfg.eval.gpus_per_evaluator else dict(
      num_gpus=cfg.eval.gpus_per_evaluator,
      runtime_env={'env_vars': {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}})
  evaluators = [
      _actor(nodes.EvaluatorNode, 'evaluator', **gpu_options).remote(
          cfg, games, variables, workdir, i)
      for i, games in enumerate(evaluator_games)]
  return Program(cfg, workdir, replay, replay_name, inserters, learner, variables, evaluators,
                 evaluator_games)


def add_finetune_actors(program: Program, game: str, mode: Optional[int], num_actors: int,
                        epsilon, max_episode_frames: int = 108_000, **actor_kwargs) -> None:
  """Fine-tuning actors acting in `game` (+ `mode`) and feeding the replay's table of that game.
  `epsilon`: a constant or a schedule of the param version (see `nodes.FinetuneActorNode`)."""
  for i in range(num_actors):
    program.actors.append(_actor(nodes.FinetuneActorNode, 'actor').remote(
        program.cfg, game, mode, epsilon, program.variables, program.replay_name, i,
        program.workdir,
        seed=program.cfg.train.seed, max_episode_frames=max_episode_frames, **actor_kwargs))


# ---------------------------------------------------------------------------------------------
# The driver: watch, print progress, end cleanly.


def _node_name(handle) -> str:
  return handle._ray_actor_creation_function_descriptor.class_name  # pylint: disable=protected-access


def _print(line: str) -> None:
  print(line, flush=True)


class NodeLost(RuntimeError):
  """A node that Ray will not restart any more."""


class _Watcher:
  """Non-blocking status polls: one `status()` call in flight per node; a node that is still
  being built or restarting shows as None until it answers."""

  def __init__(self):
    self._pending: dict = {}
    self._last: dict = {}

  def status(self, handle, wait_s: float = 0.5) -> Optional[dict]:
    """The node's newest status; raises NodeLost when it is dead with no restarts left."""
    key = handle._actor_id.hex()  # pylint: disable=protected-access
    if key not in self._pending:
      self._pending[key] = handle.status.remote()
    ref = self._pending[key]
    ready, _ = ray.wait([ref], timeout=wait_s)
    if not ready:
      return self._last.get(key)
    del self._pending[key]
    try:
      self._last[key] = ray.get(ref)
    except ray.exceptions.ActorDiedError as e:  # dead with no restarts left
      raise NodeLost(str(e).splitlines()[0]) from e
    except ray.exceptions.RayActorError:  # ActorUnavailableError: restarting
      self._last[key] = None
    return self._last[key]


def _crash_log(workdir: str, name: str) -> str:
  path = os.path.join(workdir, 'logs', f'{name}.err')
  if os.path.exists(path):
    with open(path) as f:
      return f.read()[-4000:]
  return '(no traceback recorded)'


@dataclasses.dataclass
class ProgramStatus:
  learner: Optional[dict]
  replay: Optional[dict]
  evaluators: list
  actors: list

  def latest_scores(self) -> dict[str, dict]:
    scores = {}
    for status in self.evaluators:
      if status:
        scores.update(status.get('latest', {}))
    return scores


def poll(program: Program, watcher: Optional[_Watcher] = None) -> ProgramStatus:
  watcher = watcher or _Watcher()
  learner = watcher.status(program.learner)
  replay = watcher.status(program.replay)
  evaluators = []
  for i, handle in enumerate(program.evaluators):
    try:
      evaluators.append(watcher.status(handle))
    except NodeLost:
      evaluators.append(None)
      print(f'evaluator_{i} is lost for good:\n{_crash_log(program.workdir, f"evaluator_{i}")}',
            file=sys.stderr)
  actors = [watcher.status(h) for h in program.actors]
  return ProgramStatus(learner, replay, evaluators, actors)


def format_progress(status: ProgramStatus, started: float) -> str:
  parts = [f'{time.time() - started:6.0f}s']
  s = status.learner
  if s:
    head = f"learner {s['steps']}/{s['num_steps']}"
    if s['steps_per_s'] > 0:
      eta = (s['num_steps'] - s['steps']) / s['steps_per_s']
      parts.append(f"{head} {s['steps_per_s']:.1f} steps/s ETA {eta:.0f}s")
    else:
      parts.append(f"{head} 0.0 steps/s" + (' (waiting for data)' if s['steps'] == 0 else ''))
    loss = s['metrics'].get('loss')
    if loss is not None:
      parts.append(f'loss {loss:.3f}')
  else:
    parts.append('learner (starting)')
  if status.replay:
    sizes = status.replay['table_sizes']
    parts.append('replay ' + ','.join(f'{g[:8]}={n}' for g, n in sizes.items()))
  scores = status.latest_scores()
  if scores:
    # A game with no completed episode has no score (None): never a number, never in the mean.
    norm = [r['normalized'] for r in scores.values() if r['normalized'] is not None]
    versions = sorted({r['param_version'] for r in scores.values()})
    mean = f'{100 * sum(norm) / len(norm):.1f}%' if norm else 'none'
    shown = {g: 'no-episode' if r['normalized'] is None else f"{100 * r['normalized']:.0f}%"
             for g, r in scores.items()}
    parts.append(f'eval@{versions[-1]} mean_norm {mean} ' + ' '.join(
        f'{g[:8]}={shown[g]}' for g in sorted(shown)))
  return ' | '.join(parts)


class _StopRequest:
  """SIGINT/SIGTERM -> a flag the driver loop checks (the learner then checkpoints)."""

  def __init__(self):
    self.requested = threading.Event()
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested.is_set():  # a second Ctrl-C: stop waiting
      raise KeyboardInterrupt
    print(f'\n{signal.Signals(signum).name}: checkpointing and stopping every node ...',
          file=sys.stderr, flush=True)
    self.requested.set()

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def learner_done(status: ProgramStatus) -> bool:
  return bool(status.learner and status.learner['done'])


def run(program: Program, *, log: Callable[[str], None] = _print,
        stop_when: Callable[[ProgramStatus], bool] = learner_done,
        timeout_s: Optional[float] = None, final_eval_timeout_s: Optional[float] = 600.0,
        status_every_s: float = STATUS_EVERY_SECONDS) -> ProgramStatus:
  """Watches the program until `stop_when(status)` (default: the learner reached its steps), a
  signal, or `timeout_s`, printing progress; then shuts every node down (`shutdown`). Unless
  stopped by a signal, the evaluators first evaluate the learner's final params (at most
  `final_eval_timeout_s`; None skips it). Returns the last status."""
  started = time.time()
  status = None
  watcher = _Watcher()
  with _StopRequest() as stop:
    try:
      while True:
        try:
          status = poll(program, watcher)
        except NodeLost as e:
          raise NodeLost(f'the learner/replay node is lost for good: {e}\n'
                         f'{_crash_log(program.workdir, "learner")}') from e
        log(format_progress(status, started))
        if stop_when(status):
          break
        if timeout_s is not None and time.time() - started > timeout_s:
          log(f'time budget of {timeout_s:.0f}s used: stopping')
          break
        if stop.requested.wait(status_every_s):
          break
    finally:
      final_eval = None if stop.requested.is_set() else final_eval_timeout_s
      final = shutdown(program, log=log, final_eval_timeout_s=final_eval)
  return final or status


def shutdown(program: Program, log: Callable[[str], None] = _print,
             final_eval_timeout_s: Optional[float] = None) -> Optional[ProgramStatus]:
  """Learner first (final checkpoint + publish), then (optionally) a last evaluation of the final
  params, then evaluators/actors, inserters, replay; finally every actor is killed so no process
  is left behind. Returns the last status seen (learner steps = the final step)."""
  final_step, status = None, None
  watcher = _Watcher()
  t0 = time.time()
  try:
    final_step = ray.get(program.learner.stop.remote(), timeout=300)
    log(f'learner stopped at step {final_step}; checkpoint in {program.workdir}/checkpoints')
  except Exception as e:  # pylint: disable=broad-except
    log(f'learner did not stop cleanly: {type(e).__name__}: {e}')
  if final_step is not None and final_eval_timeout_s and program.evaluators:
    log(f'evaluating the final params (step {final_step}) ...')
    for handle in program.evaluators:
      handle.wake.remote()
    deadline = time.time() + final_eval_timeout_s
    while time.time() < deadline:
      try:
        status = poll(program, watcher)
      except NodeLost as e:
        log(f'final evaluation abandoned: {e}')
        break
      if all(s and s['evaluated_version'] >= final_step for s in status.evaluators):
        break
      time.sleep(0.5)
    log(f'final evaluation done in {time.time() - t0:.0f}s')
  if status is None:
    try:
      status = poll(program, watcher)
    except NodeLost:
      status = None
  if status is not None and status.learner is not None and final_step is not None:
    status.learner['steps'] = final_step
  others = program.evaluators + program.actors + program.inserters
  t1 = time.time()
  pending = {h.stop.remote(): i for i, h in enumerate(others)}
  slow = []
  while pending:
    ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, t1 + 180 - time.time()))
    if not ready:
      log(f'{len(pending)} node(s) did not stop within 180 s; killing them')
      break
    index = pending.pop(ready[0])
    try:
      ray.get(ready[0])
    except Exception as e:  # pylint: disable=broad-except
      log(f'node {index} did not stop cleanly: {type(e).__name__}')
    if time.time() - t1 > 5:
      slow.append(f'{_node_name(others[index])} {time.time() - t1:.0f}s')
  log(f'nodes stopped in {time.time() - t0:.0f}s' + (f' (slow: {", ".join(slow)})' if slow else ''))
  for handle in [program.learner] + others + [program.replay]:
    ray.kill(handle, no_restart=True)
  program.variables.kill()
  return status

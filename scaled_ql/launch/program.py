"""The distributed program: which nodes exist and how they are wired (a Launchpad program on Ray).

                 RLDS files
                     |
       inserter_0 .. inserter_{I-1}                (InserterNode; Ray restarts them)
                     |  Reverb trajectory writers
                  replay                           (ReverbNode: one table per game)
                     |  stratified_batches (gRPC)
                  learner                          (LearnerNode: jitted sharded Learner, Orbax
                     |  publish(params, step)                    checkpoints in WORKDIR/checkpoints)
       variable_shard_0 .. variable_shard_{S-1}    (VariableServer: params split by size)
                     |  VariableClient (fetch all shards, one consistent version)
     evaluator_0 .. evaluator_{E-1}  [actor_0 ..]  (EvaluatorNode: own games, own clock ->
                                                    WORKDIR/eval/evaluator_<i>.jsonl, TensorBoard;
                                                    FinetuneActorNode: acts, inserts into replay)

Everything here is wiring: each node builds its component from the config (scaled_ql.launch.nodes)
and runs by itself; the driver (`run`) watches, prints progress, restarts the replay's clients
when the replay moves (below) and ends the program.
Faults: Ray restarts every node (actor) any number of times; a restarted node carries on by itself
(the learner from its last checkpoint, the replay server on the same port, inserters and the
learner's iterator reconnect; a replay that comes back at another address, on another host, has
its clients restarted by the driver: `_Watcher.follow_replay`). The driver watches every node,
inserters and variable shards included: a node that Ray cannot restart (it fails in its
constructor) or that restarts `train.crash_loop_restarts` times within `train.crash_loop_window_s`
(`RestartBudget`) ends the program with that node's traceback (`NodeLost`, a non-zero exit). The
progress line shows each restarted node's count and last error. Ctrl-C / SIGTERM: the learner
checkpoints, then every actor is stopped.

Network exposure (README "Security"): Ray's own ports take its token authentication (on by default
in Ray 2.60 for a local cluster; `run.init_ray`) and no dashboard is started; the Reverb server
(`reverb.Server` takes a port but no host) listens on every interface without authentication, so
`run` names its port at start-up with the mitigation (`security_line`), and again if it moves.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, Optional, Sequence

import ray

from scaled_ql.configs.base import ExperimentConfig
from scaled_ql.launch import nodes
from scaled_ql.launch.variable_server import VariableServer

# Ray restarts every node without limit; the driver's RestartBudget ends a crash loop.
MAX_RESTARTS = -1
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
  # {node: the resources it asks Ray for} (named when Ray cannot place it: `_Watcher`)
  needs: dict = dataclasses.field(default_factory=dict)

  def nodes(self) -> list[tuple[str, Any]]:
    """(name, actor handle) of every node; the name is also its log's (WORKDIR/logs/NAME.err)."""
    return ([('replay', self.replay), ('learner', self.learner)]
            + [(f'inserter_{i}', h) for i, h in enumerate(self.inserters)]
            + [(f'evaluator_{i}', h) for i, h in enumerate(self.evaluators)]
            + [(f'actor_{i}', h) for i, h in enumerate(self.actors)]
            + [(f'variable_shard_{i}', h) for i, h in enumerate(self.variables.shards)])


@dataclasses.dataclass(frozen=True)
class ActorSpec:
  """Fine-tuning actors (`nodes.FinetuneActorNode`) acting in `game` (+ ALE `mode`) and feeding
  the replay's table of that game. `epsilon`: a constant or a schedule of the param version
  (`actors.LinearEpsilon`). Their pacing is the table's (`build(replay_pacing=...)`)."""
  game: str
  mode: Optional[int]
  num_actors: int
  epsilon: Any
  max_episode_frames: int = 108_000
  sticky_action_prob: float = 0.25


def split_games(games: Sequence[str], num_evaluators: int) -> list[tuple[str, ...]]:
  """Round-robin assignment of games to evaluators; every evaluator gets at least one game."""
  if not 1 <= num_evaluators <= len(games):
    raise ValueError(f'--evaluators must be between 1 and the number of games ({len(games)}), '
                     f'got {num_evaluators}')
  return [tuple(games[i::num_evaluators]) for i in range(num_evaluators)]


def required_cpus(cfg: ExperimentConfig, num_actors: int = 0,
                  num_inserters: Optional[int] = None) -> int:
  """Logical CPUs the program's nodes ask Ray for (a local ray.init needs at least this many)."""
  num_inserters = cfg.data.num_inserters if num_inserters is None else num_inserters
  return (NUM_CPUS['replay'] + num_inserters * NUM_CPUS['inserter'] + NUM_CPUS['learner']
          + cfg.eval.num_evaluators * NUM_CPUS['evaluator'] + num_actors * NUM_CPUS['actor'])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('', 0))
    return s.getsockname()[1]


def _actor(cls, kind: str, **options):
  return ray.remote(num_cpus=NUM_CPUS[kind], max_restarts=MAX_RESTARTS,
                    max_concurrency=4, **options)(cls)


def _needs(kind: str, gpus: float = 0) -> dict[str, float]:
  """The resources a node of this kind asks Ray for, as Ray names them."""
  return {'CPU': NUM_CPUS[kind], **({'GPU': gpus} if gpus else {})}


def build(cfg: ExperimentConfig, workdir: str, num_evaluators: int, num_steps: Optional[int],
          learner_gpus: float = 0, initial_params=None, *, learner_node: Optional[type] = None,
          num_inserters: Optional[int] = None, actors: Optional[ActorSpec] = None,
          replay_pacing=None) -> Program:
  """Starts every node of the program (the graph in the module docstring).
  `num_steps`: the learner's steps; None trains until `run` stops the program (benchmarks).
  `learner_gpus`: GPUs the learner node asks Ray for (on a cluster: 1 puts it on a GPU node).
  `initial_params`: the learner's starting Q-network params (transfer), instead of a random init.
  `learner_node`: the learner's node class (default `nodes.LearnerNode`; online fine-tuning:
  `finetune.FinetuneLearnerNode`). `num_inserters`: offline-data inserters (default
  `cfg.data.num_inserters`; 0: only actors feed the replay). `actors`: fine-tuning actors.
  `replay_pacing`: a `reverb_tables.TablePacing` on every table (online fine-tuning; None: the
  offline tables, which never block the learner)."""
  _Watcher.from_config(cfg)  # a bad restart budget or placement timeout fails before any node
  learner_node = learner_node or nodes.LearnerNode
  num_inserters = cfg.data.num_inserters if num_inserters is None else num_inserters
  # No evaluators at all is allowed here (benchmarks); the train command asks for >= 1.
  evaluator_games = split_games(cfg.games, num_evaluators) if num_evaluators else []
  # Nodes find the replay and the variable shards by name (never by a handle in their
  # arguments: Ray cannot always restart such actors, ray-project/ray#53727).
  prefix = f'{cfg.name}_{uuid.uuid4().hex[:8]}_'
  replay_name = prefix + 'replay'
  replay = _actor(nodes.ReverbNode, 'replay', name=replay_name).remote(cfg, free_port(),
                                                                      replay_pacing, workdir)
  replay_ref = nodes.RayReplay(replay_name)
  variables = VariableServer.create(cfg.train.variable_server_shards, name_prefix=prefix,
                                    max_restarts=MAX_RESTARTS)
  inserters = [
      _actor(nodes.InserterNode, 'inserter').remote(cfg, replay_ref, i, num_inserters, workdir)
      for i in range(num_inserters)]
  learner = _actor(learner_node, 'learner', num_gpus=learner_gpus).remote(
      cfg, replay_ref, variables, workdir, num_steps, initial_params)
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
  actor_nodes = [] if actors is None else [
      _actor(nodes.FinetuneActorNode, 'actor').remote(
          cfg, actors.game, actors.mode, actors.epsilon, variables, replay_ref, i, workdir,
          seed=cfg.train.seed, max_episode_frames=actors.max_episode_frames,
          sticky_action_prob=actors.sticky_action_prob)
      for i in range(actors.num_actors)]
  needs = dict(replay=_needs('replay'), learner=_needs('learner', learner_gpus),
               **{f'inserter_{i}': _needs('inserter') for i in range(num_inserters)},
               **{f'evaluator_{i}': _needs('evaluator', cfg.eval.gpus_per_evaluator)
                  for i in range(len(evaluators))},
               **{f'actor_{i}': _needs('actor') for i in range(len(actor_nodes))},
               **{f'variable_shard_{i}': _needs('variable_shard')
                  for i in range(len(variables.shards))})
  return Program(cfg, workdir, replay, replay_name, inserters, learner, variables, evaluators,
                 evaluator_games, actor_nodes, needs)


def restart_node(handle, force: bool = False) -> None:
  """Restarts a node (Ray restarts it: `MAX_RESTARTS`). A node that can save its state first is
  asked to and ends its own process (the learner: `LearnerNode.save_and_exit`, so that its
  restart resumes at the step it was at); any other's process, or any node's with `force`, is
  killed."""
  if not force and hasattr(handle, 'save_and_exit'):
    handle.save_and_exit.remote()  # not waited on: it ends the process, and the call with it
  else:
    ray.kill(handle, no_restart=False)


# How long the driver waits for a node it asked to save and exit (`restart_node`) to restart
# before it kills the node: the node's own deadline (`nodes.LEARNER_SAVE_AND_EXIT_S`) passed, so
# the request never ran (the actor did not take it).
FORCE_RESTART_AFTER_S = nodes.LEARNER_SAVE_AND_EXIT_S + 60.0


def security_line(address: str) -> str:
  """What a program exposes on the network, with the Reverb server at `address`."""
  port = address.rsplit(':', 1)[1]
  auth = os.environ.get('RAY_AUTH_MODE', '')
  ray_line = ('Ray: token authentication on, no dashboard.' if auth.lower() == 'token' else
              f'Ray: token authentication is OFF (RAY_AUTH_MODE={auth or "unset"}): anyone who '
              'reaches Ray\'s ports can run code on this machine (CVE-2023-48022); set '
              'RAY_AUTH_MODE=token.')
  return (f'security: the Reverb server (replay node) listens on port {port} of ALL interfaces '
          f'({address}; reverb.Server takes no host) without authentication: whoever reaches it '
          'can read, insert or reset replay data. Allow only this machine/cluster, e.g. '
          f'`iptables -A INPUT -p tcp --dport {port} ! -s 127.0.0.1 -j DROP` (one host), or a '
          f'private network / firewall (README "Security"). {ray_line}')


# ---------------------------------------------------------------------------------------------
# The driver: watch, print progress, end cleanly.


def _node_name(handle) -> str:
  return handle._ray_actor_creation_function_descriptor.class_name  # pylint: disable=protected-access


def _print(line: str) -> None:
  print(line, flush=True)


class NodeLost(RuntimeError):
  """A node that Ray could not restart, or that restarted too often (a crash loop)."""


class RestartBudget:
  """Restarts of every node, in a sliding time window: any number of restarts spaced out (a
  preempted cluster), but `max_restarts` of one node within `window_s` seconds is a crash loop.
  Pure bookkeeping: `record(node, total_restarts, now)` -> True when the budget is exceeded."""

  def __init__(self, max_restarts: int, window_s: float):
    if max_restarts < 1:
      raise ValueError(f'train.crash_loop_restarts must be >= 1, got {max_restarts}')
    if window_s <= 0:
      raise ValueError(f'train.crash_loop_window_s must be > 0, got {window_s}')
    self.max_restarts, self.window_s = max_restarts, window_s
    self._seen: dict[str, int] = {}
    self._times: dict[str, collections.deque] = collections.defaultdict(collections.deque)

  @classmethod
  def from_config(cls, cfg: ExperimentConfig) -> 'RestartBudget':
    return cls(cfg.train.crash_loop_restarts, cfg.train.crash_loop_window_s)

  def record(self, node: str, total_restarts: int, now: float, excused: int = 0) -> bool:
    """`excused`: how many of the restarts new since the last call the driver caused (to follow
    a moved replay: the replay's own restarts are counted on the replay); they are not counted."""
    new = total_restarts - self._seen.get(node, 0) - excused
    self._seen[node] = max(total_restarts, self._seen.get(node, 0))
    times = self._times[node]
    times.extend([now] * max(0, new))
    while times and now - times[0] > self.window_s:
      times.popleft()
    return len(times) >= self.max_restarts

  def in_window(self, node: str) -> int:
    return len(self._times[node])


def check_fault_config(cfg: ExperimentConfig) -> None:
  """The fault-tolerance fields the driver watches with (`train.crash_loop_restarts`,
  `crash_loop_window_s`, `placement_timeout_s`, `stall_timeout_s`): ValueError naming the field.
  Needs no Ray (`run.validate` calls it before anything starts)."""
  RestartBudget.from_config(cfg)
  for name in ('placement_timeout_s', 'stall_timeout_s'):
    timeout = getattr(cfg.train, name)
    if timeout is not None and not timeout > 0:
      raise ValueError(f'train.{name} must be > 0, or None for no limit, got {timeout}')


def _gcs_actor_info(handle) -> dict:
  """The actor's record in Ray's GCS (State, NumRestarts). Ray's public state API needs the
  dashboard, which the program does not start, so this reads the GCS table directly."""
  from ray._private import state  # pylint: disable=import-outside-toplevel
  return state.actors(actor_id=handle._actor_id.hex())  # pylint: disable=protected-access


# A node Ray has not placed shows in the progress line after this long: Ray starting its worker
# process also takes a moment.
UNPLACED_SHOWN_AFTER_S = 30.0


# Ray's actor states of a node whose constructor has not finished: its first start or a
# restart (placed or not).
_STARTING_STATES = ('RESTARTING', 'PENDING_CREATION', 'DEPENDENCIES_UNREADY')


def _unplaced(info: dict) -> bool:
  """Whether Ray has yet to give the node a worker (it waits for resources that no node of the
  cluster has free, or for its worker to start), at its first start or at a restart. Ray 2.60's
  GCS record then has no address (port 0); a node running its constructor has one. (A
  restarting node keeps its old pid in the record, so the pid does not tell.)"""
  return (info.get('State') in _STARTING_STATES
          and not int((info.get('Address') or {}).get('Port') or 0))


def format_resources(resources: dict) -> str:
  """`CPU 1, GPU 1` (Ray's names; a float share like 0.5 as such)."""
  return ', '.join(f'{k} {v:g}' for k, v in sorted(resources.items()))


def _cluster_resources(names) -> dict[str, tuple[float, float]]:
  """{resource: (free, total)} in the Ray cluster, for CPU, GPU and the given names."""
  free, total = ray.available_resources(), ray.cluster_resources()
  return {k: (free.get(k, 0.0), total.get(k, 0.0)) for k in sorted({'CPU', 'GPU', *names})}


def format_cluster(cluster: dict) -> str:
  return ', '.join(f'{k} {free:g}/{total:g}' for k, (free, total) in cluster.items())


class _Watcher:
  """Non-blocking status polls: one `status()` call in flight per node; a node that is still
  being built or restarting shows as None until it answers. `health()` reads every node's
  restart count from Ray and applies the `RestartBudget`, and times how long Ray has left each
  node unplaced (`placement_timeout_s`; None: no limit)."""

  def __init__(self, budget: Optional[RestartBudget] = None,
               placement_timeout_s: Optional[float] = None,
               stall_timeout_s: Optional[float] = None,
               kill: Optional[Callable[..., None]] = None,
               gcs_info: Callable[[Any], dict] = _gcs_actor_info):
    self._pending: dict = {}
    # How `follow_replay` restarts a node (`restart_node`; None: it does not, as while stopping).
    self._kill = kill
    self._gcs_info = gcs_info  # a node's record in Ray's actor table
    self._replay: Optional[tuple[int, str]] = None  # (start, address): the newest replay seen
    self.announced: Optional[str] = None  # the replay address of the last security line
    # node -> (its restart count, why, when) of the restart `follow_replay` asked for; dropped
    # once the node shows a later restart (`health`).
    self._requests: dict[str, tuple[int, str, float]] = {}
    self.notes: list[str] = []  # lines for the run's log (`run` prints and clears them)
    self._last: dict = {}
    self._budget = budget
    self._health: dict[str, dict] = {}
    self._placement_timeout_s = placement_timeout_s
    self._unplaced_since: dict[str, float] = {}
    self._stall_timeout_s = stall_timeout_s
    self._learner_at: Optional[tuple[tuple, float]] = None  # (what it showed, since)

  @classmethod
  def from_config(cls, cfg: ExperimentConfig, **kw) -> '_Watcher':
    check_fault_config(cfg)
    return cls(RestartBudget.from_config(cfg), cfg.train.placement_timeout_s,
               cfg.train.stall_timeout_s, **kw)

  def check_progress(self, learner: Optional[dict], replay: Optional[dict],
                     now: Optional[float] = None) -> None:
    """Raises NodeLost when the learner's status (answering, not done) has shown the same
    process at the same step for `stall_timeout_s`, while its data did not move either: the
    replay's table sizes, and for online fine-tuning the transitions inserted (a restarted
    learner first waits for the inserts its lost steps were paced against). A learner that is
    restarting (no status) or done starts the clock again."""
    now = time.monotonic() if now is None else now
    if self._stall_timeout_s is None or learner is None or learner.get('done'):
      self._learner_at = None
      return
    tables = (replay or {}).get('table_sizes')
    key = (learner.get('pid'), learner.get('steps'), learner.get('inserted'),
           tuple(sorted(tables.items())) if tables else None)
    if self._learner_at is None or self._learner_at[0] != key:
      self._learner_at = (key, now)
      return
    waited = now - self._learner_at[1]
    if waited > self._stall_timeout_s:
      raise NodeLost(
          f'the learner made no step for {waited:.0f}s, at step {key[1]} '
          f'(train.stall_timeout_s={self._stall_timeout_s:g}): it waits for something that does '
          'not come (its batches: the replay tables hold '
          f'{tables if tables is not None else "(the replay did not answer)"}; or a device)')

  def for_stopping(self) -> '_Watcher':
    """A watcher for the program's stop: no restart budget, no following the replay; it starts
    from this one's last statuses, and the restarts seen so far keep their errors and the
    driver's reasons."""
    watcher = _Watcher(gcs_info=self._gcs_info)
    watcher._last = dict(self._last)
    watcher._health = {k: dict(v) for k, v in self._health.items()}
    watcher._requests = dict(self._requests)
    return watcher

  def asked(self, name: str, restarts: int) -> bool:
    """Whether `follow_replay` asked the node's process of this restart count to restart."""
    return self._requests.get(name, (None,))[0] == restarts

  def follow_replay(self, program: Program, statuses: dict[str, Optional[dict]],
                    now: Optional[float] = None) -> None:
    """Restarts the replay's clients that use the address of an earlier replay start.

    A restarted replay comes back at its address where it can (Reverb's clients then reconnect
    by themselves; they retry a lost server at that address for ever, so none of them would
    notice a move); where it cannot (on another host, or its port taken), it comes back at
    another. The replay's status shows its start (Ray's restart count) and address; each client
    shows the replay start and address it asked for (`replay_start`, `replay_address`: the
    learner and the inserters at their start, a fine-tuning actor for its current writer). A
    client behind the newest start seen, at another address, is restarted (`kill`:
    `restart_node`; the learner saves a checkpoint of its step and exits, the others are
    killed), and Ray starts it again at the new address; not a done one. Acted on only where
    Ray's record, read right before, shows the status's process alive (its pid and restart
    count: a cached status of a process that is gone would have the new one restarted), once
    per restart, with a kill (`force`) if a node asked to exit is still that process
    `FORCE_RESTART_AFTER_S` later; a status without a start (a count Ray did not give) is left
    alone. A new replay address is logged with its `security_line` (the port to firewall)."""
    if self._kill is None:
      return
    now = time.monotonic() if now is None else now
    replay = statuses.get('replay') or {}
    start, address = replay.get('start'), replay.get('address')
    if start is not None and address is not None and (self._replay is None
                                                      or start > self._replay[0]):
      self._replay = (start, address)
    # The port to firewall, again when it changed (one whose start is unknown included).
    shown = self._replay[1] if self._replay is not None and start is not None else address
    if shown is not None and shown != self.announced:
      self.notes.append(security_line(shown))
      self.announced = shown
    if self._replay is None:
      return
    newest_start, newest = self._replay
    for name, handle in program.nodes():
      status = statuses.get(name) or {}
      behind = status.get('replay_start')
      if (behind is None or behind >= newest_start or status.get('replay_address') == newest
          or status.get('done')):
        continue
      info = self._gcs_info(handle)  # read now: the process the kill would reach
      restarts = int(info.get('NumRestarts', 0))
      if (info.get('State') != 'ALIVE' or info.get('Pid') != status.get('pid')
          or status.get('restarts') not in (None, restarts)):
        continue
      if self.asked(name, restarts):  # asked already: killed if it is still there
        _, why, when = self._requests[name]
        if now - when > FORCE_RESTART_AFTER_S:
          self._requests[name] = (restarts, why, float('inf'))  # (once)
          self.notes.append(f'{name} did not restart within {FORCE_RESTART_AFTER_S:.0f}s: '
                            'killed')
          self._kill(handle, force=True)
        continue
      reason = (f'restarted by the driver to follow the replay to {newest} (from '
                f'{status.get("replay_address")})')
      self._requests[name] = (restarts, reason, now)
      self.notes.append(f'{name} {reason}')
      self._kill(handle)

  def unplaced(self, program: Program, now: Optional[float] = None) -> dict[str, dict]:
    """{node: dict(seconds, needs)} of the nodes Ray has left unplaced for at least
    UNPLACED_SHOWN_AFTER_S (as of the last `health()`)."""
    now = time.monotonic() if now is None else now
    return {name: dict(seconds=now - since, needs=program.needs.get(name, {}))
            for name, since in sorted(self._unplaced_since.items())
            if now - since >= UNPLACED_SHOWN_AFTER_S}

  @property
  def last_health(self) -> dict[str, dict]:
    return {k: dict(v) for k, v in self._health.items()}

  def health(self, program: Program) -> dict[str, dict]:
    """{node: dict(restarts, in_window, last_error)} of the nodes restarted so far; raises
    NodeLost for a dead node or a crash loop, with the node's traceback."""
    now = time.monotonic()
    for name, handle in program.nodes():
      info = self._gcs_info(handle)
      if not info:
        continue
      restarts = int(info.get('NumRestarts', 0))
      self._check_placed(program, name, info, now)
      if info.get('State') == 'DEAD':
        raise NodeLost(f'{name} died and cannot be restarted:\n'
                       f'{_crash_log(program.workdir, name, info)}')
      old = self._health.get(name, dict(restarts=0, last_error=''))
      reason = None  # the driver's, for the restart its kill caused (not a later one)
      if restarts > old['restarts']:
        # The start that ended in the newest restart; none recorded: killed (OOM, preemption,
        # kill -9) or lost.
        line = nodes.recorded_crash(program.workdir, name,
                                    handle._actor_id.hex(),  # pylint: disable=protected-access
                                    restarts - 1)
        if name in self._requests and restarts > self._requests[name][0]:
          killed_at, why, _ = self._requests.pop(name)
          reason = why if restarts == killed_at + 1 else None
        self._health[name] = dict(old, restarts=restarts,
                                  last_error=line or reason or 'no traceback (killed or lost)')
      # A restart the driver caused is no crash of the node: not in its crash-loop budget.
      tripped = self._budget is not None and self._budget.record(
          name, restarts, now, excused=int(reason is not None))
      if name in self._health and self._budget is not None:  # (a stopping watcher keeps it)
        self._health[name]['in_window'] = self._budget.in_window(name)
      if tripped:
        raise NodeLost(
            f'{name} restarted {self._budget.in_window(name)} times within '
            f'{self._budget.window_s:.0f}s (train.crash_loop_restarts='
            f'{self._budget.max_restarts}, train.crash_loop_window_s={self._budget.window_s:g}): '
            f'a crash loop. Last error:\n{_crash_log(program.workdir, name, info)}')
    return {k: dict(v) for k, v in self._health.items()}

  def _check_placed(self, program: Program, name: str, info: dict, now: float) -> None:
    """Times the node while Ray leaves it unplaced; raises NodeLost past the placement timeout."""
    if not _unplaced(info):
      self._unplaced_since.pop(name, None)
      return
    waited = now - self._unplaced_since.setdefault(name, now)
    if self._placement_timeout_s is None or waited <= self._placement_timeout_s:
      return
    needs = program.needs.get(name, {})
    what = ('could not be restarted' if info.get('State') == 'RESTARTING' else
            'was never started')
    raise NodeLost(
        f'{name} {what}: for {waited:.0f}s Ray found no node with '
        f'{format_resources(needs) or "what it asks for"} free (the cluster, free/total: '
        f'{format_cluster(_cluster_resources(needs))}). Add a node that has them (or let the '
        'autoscaler add one), ask for less (--learner-gpus, --evaluator-gpus), or wait longer '
        f'(train.placement_timeout_s={self._placement_timeout_s:g})')

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


def _crash_log(workdir: str, name: str, gcs_info: Optional[dict] = None) -> str:
  """The node's newest traceback: its log (WORKDIR/logs/NAME.err), from its record's header
  line (the time, the Ray actor and its start: a crash loop of kills records nothing, and the
  newest record may then be an older start's or an earlier run's), else Ray's death cause."""
  path = os.path.join(workdir, 'logs', f'{name}.err')
  try:
    with open(path, errors='replace') as f:
      text = f.read()
    at = text.rfind(f'[{name}] crashed:')
    return text[text.rfind('\n', 0, at) + 1:][-4000:] if at >= 0 else text[-4000:]
  except OSError:
    pass
  cause = str((gcs_info or {}).get('DeathCause', '')).strip()
  if 'formatted_exception_string' in cause:  # a constructor that raised: Ray kept its traceback
    cause = cause.split('formatted_exception_string:', 1)[1]
    cause = cause.encode().decode('unicode_escape', errors='replace')
  return cause[-4000:] or '(no traceback recorded: killed or lost)'


@dataclasses.dataclass
class ProgramStatus:
  learner: Optional[dict]
  replay: Optional[dict]
  evaluators: list
  actors: list
  inserters: list = dataclasses.field(default_factory=list)
  # {node: dict(restarts, in_window, last_error)} of every node restarted so far
  health: dict = dataclasses.field(default_factory=dict)
  # {node: dict(seconds, needs)} of the nodes Ray has not placed for UNPLACED_SHOWN_AFTER_S,
  # and then the cluster's {resource: (free, total)}
  unplaced: dict = dataclasses.field(default_factory=dict)
  cluster: dict = dataclasses.field(default_factory=dict)

  def data_counts(self) -> dict[str, int]:
    """Bad data the inserters skipped so far, summed: corrupt (unreadable) files, undecodable
    episodes and malformed episodes cut short (`rlds_reader.ReadStats.counts`)."""
    total = dict(corrupt_files=0, undecodable_episodes=0, malformed_episodes=0)
    for status in self.inserters:
      for key in total:
        total[key] += int(((status or {}).get('data') or {}).get(key, 0))
    return total

  def latest_scores(self) -> dict[str, dict]:
    scores = {}
    for status in self.evaluators:
      if status:
        scores.update(status.get('latest', {}))
    return scores


def poll(program: Program, watcher: Optional[_Watcher] = None) -> ProgramStatus:
  """Every node's status and health; raises NodeLost (see `_Watcher.health` and
  `_Watcher.check_progress`)."""
  watcher = watcher or _Watcher.from_config(program.cfg)
  health = watcher.health(program)
  statuses = {}
  for name, handle in program.nodes():
    if name.startswith('variable_shard'):
      continue  # no status(): health only
    try:
      statuses[name] = watcher.status(handle)
    except NodeLost as e:
      raise NodeLost(f'{name} died and cannot be restarted: {e}\n'
                     f'{_crash_log(program.workdir, name)}') from e
  watcher.check_progress(statuses['learner'], statuses['replay'])
  watcher.follow_replay(program, statuses)
  unplaced = watcher.unplaced(program)
  cluster = _cluster_resources(
      {k for u in unplaced.values() for k in u['needs']}) if unplaced else {}
  return ProgramStatus(
      statuses['learner'], statuses['replay'],
      [statuses[f'evaluator_{i}'] for i in range(len(program.evaluators))],
      [statuses[f'actor_{i}'] for i in range(len(program.actors))],
      [statuses[f'inserter_{i}'] for i in range(len(program.inserters))], health, unplaced,
      cluster)


def format_health(health: dict) -> str:
  """`restarts NODE N (K in window; last: ERROR), ...` of the nodes restarted so far."""
  return 'restarts ' + ', '.join(
      f"{name} {h['restarts']} ({h.get('in_window', 0)} in window; last: {h['last_error'][:80]})"
      for name, h in sorted(health.items()))


def format_progress(status: ProgramStatus, started: float,
                    deadline: Optional[float] = None) -> str:
  """One progress line. The learner's ETA is to its `num_steps` (none for a learner without
  one, which trains until the program is stopped); a run with a `deadline` (its time budget)
  also says how much of the budget is left, since it may stop training long before."""
  parts = [f'{time.time() - started:6.0f}s']
  if deadline is not None:
    parts.append(f'budget {max(0.0, deadline - time.time()):.0f}s left')
  s = status.learner
  if s:
    bounded = s['num_steps'] is not None
    head = f"learner {s['steps']}" + (f"/{s['num_steps']}" if bounded else '')
    if s['steps_per_s'] > 0:
      eta = (f" ETA {(s['num_steps'] - s['steps']) / s['steps_per_s']:.0f}s" if bounded else '')
      parts.append(f"{head} {s['steps_per_s']:.1f} steps/s{eta}")
    else:
      parts.append(f"{head} 0.0 steps/s" + (' (waiting for data)' if s['steps'] == 0 else ''))
    loss = s['metrics'].get('loss')
    if loss is not None:
      parts.append(f'loss {loss:.3f}')
  elif 'learner' in status.unplaced:
    u = status.unplaced['learner']
    parts.append(f"learner (not placed by Ray for {u['seconds']:.0f}s: asks for "
                 f"{format_resources(u['needs'])})")
  else:
    parts.append('learner (starting)')
  others = {k: u for k, u in status.unplaced.items() if k != 'learner'}
  if others:
    parts.append('not placed by Ray: ' + ', '.join(
        f"{name} {u['seconds']:.0f}s ({format_resources(u['needs'])})"
        for name, u in others.items()))
  if status.cluster:
    parts.append(f'cluster free/total {format_cluster(status.cluster)}')
  if status.replay:
    sizes = status.replay['table_sizes']
    parts.append('replay ' + ','.join(f'{g[:8]}={n}' for g, n in sizes.items()))
  bad = status.data_counts()
  if any(bad.values()):
    parts.append(f"bad data skipped: {bad['corrupt_files']} corrupt files, "
                 f"{bad['undecodable_episodes']} undecodable episodes, "
                 f"{bad['malformed_episodes']} malformed episodes cut at their fault")
  if status.health:
    parts.append(format_health(status.health))
  scores = status.latest_scores()
  if scores:
    # A game with no completed episode has no score (None): never a number, never in the mean.
    norm = [r['normalized'] for r in scores.values() if r['normalized'] is not None]
    versions = sorted({r['param_version'] for r in scores.values()})
    mean = f'{100 * sum(norm) / len(norm):.1f}%' if norm else 'none'
    shown = {g: 'no-episode' if r['normalized'] is None else f"{100 * r['normalized']:.0f}%"
             for g, r in scores.items()}
    # Evaluators (and games at once) finish rounds at different times: say every step shown.
    at = str(versions[0]) if len(versions) == 1 else f'{versions[0]}-{versions[-1]}'
    parts.append(f'eval@{at} mean_norm {mean} ' + ' '.join(
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


def final_evaluation_done(status: ProgramStatus, final_step: int) -> bool:
  """Whether every evaluator has evaluated params of `final_step` or later on the final budget,
  of the learner's own lineage: an evaluator that has not yet fetched a restarted learner's
  params may still hold a round of the lost run's, at a version past its end
  (`launch/variable_server.py`). A learner status without a lineage (not reported) is not
  checked."""
  lineage = status.learner.get('lineage') if status.learner else None
  return all(s and s['final_version'] >= final_step and lineage in (None, s.get('lineage'))
             for s in status.evaluators)


# What a budgeted run (`run(deadline=...)`) keeps in hand beyond its final evaluation's estimate:
# stopping the learner (its final checkpoint), the other nodes and Ray, plus one status interval.
BUDGET_MARGIN_S = 30.0
# The final evaluation's estimate (`final_eval_estimate_s`) times this: episodes vary in length.
FINAL_EVAL_SLACK = 1.25


def final_eval_estimate_s(status: ProgramStatus, final_steps: int) -> Optional[float]:
  """Seconds the final evaluation (`final_steps` agent steps per game) should take, from each
  evaluator's latest round: per game, `final_steps` plus the most steps any round of the game ran
  past its budget (`longest_overrun`: the last episodes are played out, and a policy that stalled
  to the frame cap once may again), at the latest round's rate per CPU second of the evaluator
  (`cpu_seconds`), times FINAL_EVAL_SLACK. CPU time, not wall time: rounds during training share
  the cores with the learner (and run niced), the final one runs after the learner has stopped.
  The evaluators run side by side: the slowest one's. None until every evaluator has finished a
  round on all its games; 0 for a program without evaluators (nothing to evaluate).
  Not foreseeable: a first stall in the final round itself (up to `max_episode_frames` / 4 agent
  steps per environment)."""
  total = 0.0
  for ev in status.evaluators:
    latest = (ev or {}).get('latest') or {}
    games = (ev or {}).get('games') or []
    if not games or any('cpu_seconds' not in latest.get(g, {}) for g in games):
      return None
    seconds = 0.0
    for g in games:
      row = latest[g]
      rate = row['steps'] / max(row['cpu_seconds'], 1e-9)
      overrun = row.get('longest_overrun', row['steps'] - row['budget'])
      seconds += (final_steps + max(0, overrun)) / rate
    total = max(total, FINAL_EVAL_SLACK * seconds)
  return total


def budget_stop(elapsed_s: float, budget_s: float, estimate_s: Optional[float],
                margin_s: float = BUDGET_MARGIN_S) -> Optional[str]:
  """Why a run with a wall-clock `budget_s` (training and final evaluation together) stops
  training now, or None to go on: the time left no longer covers the final evaluation's
  `estimate_s` (None: not known yet, only the margin counts) plus `margin_s`."""
  left = budget_s - elapsed_s
  need = margin_s + (estimate_s or 0.0)
  if left > need:
    return None
  known = (f'the final evaluation needs ~{estimate_s:.0f}s' if estimate_s is not None else
           'no evaluation round has finished yet')
  return (f'time budget of {budget_s:.0f}s: {max(left, 0):.0f}s left, {known} (+ '
          f'{margin_s:.0f}s to stop): stopping training')


def run(program: Program, *, log: Callable[[str], None] = _print,
        stop_when: Callable[[ProgramStatus], bool] = learner_done,
        timeout_s: Optional[float] = None, final_eval_timeout_s: Optional[float] = 600.0,
        status_every_s: float = STATUS_EVERY_SECONDS,
        deadline: Optional[float] = None) -> ProgramStatus:
  """Watches the program until `stop_when(status)` (default: the learner reached its steps), a
  signal, `timeout_s` (of training) or, with a `deadline` (a `time.time()` by which the whole run,
  the final evaluation included, should end: a budget that may have started before this call),
  when what is left only covers the final evaluation (`budget_stop`), printing
  progress; then shuts every node down (`shutdown`). Unless stopped by a signal, the evaluators
  first evaluate the learner's final params (at most `final_eval_timeout_s`; None skips it).
  Returns the last status.
  Raises NodeLost (after shutting every node down, without a final evaluation) when a node
  cannot be restarted or crash-loops (`RestartBudget`): a run never waits forever; and, after
  shutting down, when the learner's stop() failed (its final checkpoint not written)."""
  started = time.time()
  status = None
  lost = ended_normally = False
  pushed_counts: dict = {}
  final_steps = program.cfg.eval.final_budget
  budget_s = None if deadline is None else deadline - started
  watcher = _Watcher.from_config(program.cfg, kill=restart_node)  # follows a moved replay
  with _StopRequest() as stop:
    try:
      try:
        watcher.announced = ray.get(program.replay.address.remote(), timeout=300)
        log(security_line(watcher.announced))
      except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
        # The replay node failed to start (poll() reports it with its traceback) or is slow.
        log(f'security: the Reverb server\'s port is unknown ({type(e).__name__}); it listens on '
            'all interfaces without authentication (README "Security")')
      while True:
        try:
          status = poll(program, watcher)
        except NodeLost as e:
          lost = True
          log(f'ending the program: {str(e).splitlines()[0]}')
          if watcher.last_health:
            log(format_health(watcher.last_health))
          raise
        for note in watcher.notes:
          log(note)
        watcher.notes.clear()
        log(format_progress(status, started, deadline))
        counts = status.data_counts()
        if any(counts.values()) and counts != pushed_counts:  # into the learner's metrics
          program.learner.set_data_counts.remote(counts)
          pushed_counts = counts
        if stop_when(status):
          break
        if timeout_s is not None and time.time() - started > timeout_s:
          log(f'time budget of {timeout_s:.0f}s used: stopping')
          break
        if budget_s is not None:
          reason = budget_stop(time.time() - started, budget_s,
                               final_eval_estimate_s(status, final_steps),
                               BUDGET_MARGIN_S + status_every_s)
          if reason:
            log(reason)
            break
        if stop.requested.wait(status_every_s):
          break
      ended_normally = True  # (no exception in flight for shutdown's own to replace)
    finally:
      final_eval = None if stop.requested.is_set() or lost else final_eval_timeout_s
      # After a lost node: the learner still gets a chance to checkpoint (bounded), the rest is
      # killed at once (a crash-looping node would never answer stop()).
      final = shutdown(program, log=log, final_eval_timeout_s=final_eval,
                       learner_stop_timeout_s=30 if lost else 300,
                       others_stop_timeout_s=0 if lost else 180, seen=watcher,
                       raise_if_learner_failed=ended_normally)
  return final or status


def _stop_through_a_restart(handle, deadline: float, restarts: int) -> int:
  """`handle.stop()` of a node Ray is restarting, sent again every 0.5 s while Ray reports the
  call undelivered (ActorUnavailableError: "the actor is restarting", its new process's
  constructor not done, and a learner imports, restores and traces for seconds; or "temporarily
  unavailable", a call to the old process's address before this driver heard of its end), until
  `deadline` (a `time.time()`), and only while Ray's record shows at most `restarts` restarts:
  one more is a constructor that failed, a crash, not a wait. A stop delivered twice returns
  the first's step (`LearnerNode.stop`)."""
  while True:
    try:
      return ray.get(handle.stop.remote(), timeout=max(1.0, deadline - time.time()))
    except ray.exceptions.ActorUnavailableError:
      count = int((_gcs_actor_info(handle) or {}).get('NumRestarts', 0))
      if count > restarts or time.time() + 0.5 >= deadline:
        raise
      time.sleep(0.5)


def shutdown(program: Program, log: Callable[[str], None] = _print,
             final_eval_timeout_s: Optional[float] = None,
             learner_stop_timeout_s: float = 300,
             others_stop_timeout_s: float = 180,
             seen: Optional[_Watcher] = None,
             raise_if_learner_failed: bool = False) -> Optional[ProgramStatus]:
  """Learner first (final checkpoint + publish), then (optionally) a last evaluation of the final
  params, then evaluators/actors, inserters, replay; finally every actor is killed so no process
  is left behind. Returns the last status seen (learner steps = the final step); a node that does
  not answer in time keeps the status `seen` last had of it. `raise_if_learner_failed`: a
  learner whose stop() failed or timed out (its final checkpoint not written) raises NodeLost
  once every node is stopped, so that the command exits 1, not 0."""
  final_step, status, learner_error = None, None, None
  watcher = seen.for_stopping() if seen is not None else _Watcher()
  t0 = time.time()
  try:
    info = _gcs_actor_info(program.learner) or {}
    if _unplaced(info):  # it would answer stop() once placed
      log('learner not running (Ray has not placed it): nothing to checkpoint')
    else:
      deadline, restarts = t0 + learner_stop_timeout_s, int(info.get('NumRestarts', 0))
      try:
        if info.get('State') in _STARTING_STATES:  # restarting already (a crash, a kill): the
          final_step = _stop_through_a_restart(program.learner, deadline, restarts)  # restart
        else:
          final_step = ray.get(program.learner.stop.remote(), timeout=learner_stop_timeout_s)
      except ray.exceptions.RayActorError:
        if not watcher.asked('learner', restarts):
          raise
        # The process the stop went to ended under it: the one asked to save and exit to follow
        # the replay. Ray restarts it at the step it saved; that start is the one to stop.
        log('learner was restarting to follow the replay: stopping its restart')
        final_step = _stop_through_a_restart(program.learner, deadline, restarts + 1)
      log(f'learner stopped at step {final_step}; checkpoint in {program.workdir}/checkpoints')
  except Exception as e:  # pylint: disable=broad-except
    learner_error = f'{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ""}'
    log(f'learner did not stop cleanly: {type(e).__name__}: {e}')
  if final_step is not None and final_eval_timeout_s and program.evaluators:
    log(f'evaluating the final params (step {final_step}) ...')
    for handle in program.evaluators:
      handle.wake.remote(final=True)
    deadline, done = time.time() + final_eval_timeout_s, None
    while time.time() < deadline:
      try:
        status = poll(program, watcher)
      except NodeLost as e:
        log(f'final evaluation abandoned: {e}')
        done = False
        break
      if final_evaluation_done(status, final_step):
        done = True
        break
      for handle, s in zip(program.evaluators, status.evaluators):
        if s and not s['final']:  # restarted since the wake: a new process that did not hear it
          handle.wake.remote(final=True)
      time.sleep(0.5)
    if done:
      log(f'final evaluation done in {time.time() - t0:.0f}s')
    elif done is None:
      log(f'final evaluation not finished within {final_eval_timeout_s:.0f}s: the scores of '
          f'step {final_step} are those of the evaluators that finished it')
  if status is None:
    try:
      status = poll(program, watcher)
    except NodeLost:
      status = None
  if status is not None and status.learner is not None and final_step is not None:
    status.learner['steps'] = final_step
  others = program.evaluators + program.actors + program.inserters
  t1 = time.time()
  pending = {h.stop.remote(): i for i, h in enumerate(others)} if others_stop_timeout_s else {}
  slow = []
  while pending:
    ready, _ = ray.wait(list(pending), num_returns=1,
                        timeout=max(0.0, t1 + others_stop_timeout_s - time.time()))
    if not ready:
      log(f'{len(pending)} node(s) did not stop within {others_stop_timeout_s:.0f} s; killing them')
      break
    index = pending.pop(ready[0])
    try:
      ray.get(ready[0])
    except Exception as e:  # pylint: disable=broad-except
      log(f'node {index} did not stop cleanly: {type(e).__name__}')
    if time.time() - t1 > 5:
      slow.append(f'{_node_name(others[index])} {time.time() - t1:.0f}s')
  # The replay last, once nothing writes to it: its stop() also removes the Reverb server's
  # checkpoint folder (reverb_tables.server_with_tables), which a kill would leave behind.
  try:
    ray.get(program.replay.stop.remote(), timeout=30)
  except Exception as e:  # pylint: disable=broad-except
    log(f'replay did not stop cleanly: {type(e).__name__}')
  # From the stop requests on (the final evaluation's time is in its own line above).
  log(f'nodes stopped in {time.time() - t1:.0f}s' + (f' (slow: {", ".join(slow)})' if slow else ''))
  for handle in [program.learner] + others + [program.replay]:
    ray.kill(handle, no_restart=True)
  program.variables.kill()
  if learner_error and raise_if_learner_failed:  # every node is stopped: the run ends in error
    raise NodeLost(f'the learner did not stop cleanly ({learner_error}), so its last steps may '
                   'have no checkpoint; a rerun of the same command resumes from the newest in '
                   f'{program.workdir}/checkpoints')
  return status

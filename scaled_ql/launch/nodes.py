"""The nodes of the distributed program: plain classes that `program.py` turns into Ray actors.

Every node is self-driving: its constructor builds its component from the config and starts a
background thread that does the node's work (`_LoopNode`), so a node Ray restarts after a crash or
a kill carries on by itself (the learner from its last checkpoint). Meanwhile `status()` answers
the driver (the actors are threaded: `max_concurrency` > 1) and `stop()` ends the loop cleanly.
A loop that raises records the traceback in WORKDIR/logs/<node>.err and exits the process, so
Ray restarts the node (up to its `max_restarts`); a constructor that raises records it there too.

Heavy imports (JAX, TensorFlow, Reverb) happen inside the nodes, in their own processes.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import os
import re
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import ray

from scaled_ql import compilation_cache, loggers
from scaled_ql.configs.base import ExperimentConfig
from scaled_ql.launch.variable_server import VariableServer

# How long a node waits between tries to reach a restarting Reverb server / params that are not
# yet published.
RETRY_SECONDS = 1.0


def _was_restarted() -> bool:
  if not ray.is_initialized():  # outside Ray (a unit test): ray.get_runtime_context() would
    return False                # start a local Ray cluster
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # Ray's own property uses a deprecated API internally
      return bool(ray.get_runtime_context().was_current_actor_reconstructed)
  except Exception:  # pylint: disable=broad-except  (not inside an actor: e.g. a unit test)
    return False


def _restart_seed() -> int:
  """What a restarted node adds to its seeds, so that it does not replay its first start's
  episodes (0 on the first start)."""
  return 104_729 * _restarts()


def _restart_count() -> Optional[int]:
  """How often this actor was restarted: 0 outside Ray or on the first start; None for a restart
  whose count Ray's actor table did not give."""
  if not ray.is_initialized():
    return 0
  try:
    context = ray.get_runtime_context()
    if not _was_restarted():
      return 0
    from ray._private import state  # no public API for the count
    count = state.actors(actor_id=context.get_actor_id()).get('NumRestarts')
    return int(count) if count else None
  except Exception:  # pylint: disable=broad-except
    return None


def _as_restarts(count: Optional[int]) -> int:
  """`_restart_count()` for seeds and crash records: a restart whose count is unknown reads 1."""
  return 1 if count is None else count


def _restarts() -> int:
  """How often this actor was restarted (0 outside Ray or on the first start; 1 for a restart
  whose count is unknown)."""
  return _as_restarts(_restart_count())


def _actor_id() -> str:
  """This Ray actor's id ('' outside a Ray actor: a node built in a test's own process)."""
  if not ray.is_initialized():
    return ''
  try:
    return ray.get_runtime_context().get_actor_id() or ''
  except Exception:  # pylint: disable=broad-except
    return ''


def _actor_start(count: Optional[int]) -> tuple[str, int]:
  """(this Ray actor's id, how often it was restarted, from `_restart_count()`'s `count`): which
  start of which node a crash record belongs to ('' and 0 outside a Ray actor)."""
  actor = _actor_id()
  return (actor, _as_restarts(count)) if actor else ('', 0)


# A crash record's first line in WORKDIR/logs/<name>.err, and its pattern (`recorded_crash`).
_CRASH_HEADER = '{time} (actor {actor} start {start}) [{name}] crashed:'
_CRASH_HEADER_RE = re.compile(
    r'^.*? \(actor (?P<actor>\S+) start (?P<start>\d+)\) \[(?P<name>[^\]]+)\] crashed:$',
    re.MULTILINE)


def _record_crash(workdir: Optional[str], name: str, error: str,
                  actor_start: tuple[str, int] = ('', 0)) -> None:
  """Writes `[name] crashed:` and the traceback to stderr and to WORKDIR/logs/<name>.err (what
  `program._crash_log` reads), the latter under a header naming the actor and its start
  (`actor_start`), so that the driver can tell which restart a traceback belongs to."""
  message = f'[{name}] crashed:\n{error}'
  try:
    print(message, file=sys.stderr, flush=True)
  finally:
    if workdir:
      os.makedirs(os.path.join(workdir, 'logs'), exist_ok=True)
      header = _CRASH_HEADER.format(time=time.strftime('%Y-%m-%d %H:%M:%S'),
                                  actor=actor_start[0] or '-', start=actor_start[1], name=name)
      with open(os.path.join(workdir, 'logs', f'{name}.err'), 'a') as f:
        f.write(f'{header}\n{error}\n')


def recorded_crash(workdir: str, name: str, actor_id: str, start: int) -> Optional[str]:
  """The exception line of the crash that ended start `start` (0: the first) of the Ray actor
  `actor_id`, from WORKDIR/logs/NAME.err; None when that start recorded none (killed or lost).
  A node writes its record before its process ends, so a restart that Ray reports is never ahead
  of its record."""
  try:
    with open(os.path.join(workdir, 'logs', f'{name}.err'), errors='replace') as f:
      text = f.read()
  except OSError:
    return None
  headers = list(_CRASH_HEADER_RE.finditer(text))
  found = None
  for header, following in zip(headers, headers[1:] + [None]):
    if (header['name'], header['actor'], int(header['start'])) == (name, actor_id, start):
      body = text[header.end():following.start() if following else len(text)]
      lines = [l.strip() for l in body.splitlines() if l.strip()]
      found = lines[-1] if lines else ''
  return found


class _LoopNode:
  """A background loop with stop/status; `_run_once()` returns False when the work is done.

  A loop that raises ends the process (Ray restarts the node), unless `exit_on_crash` is False:
  an in-process program (tests/test_local_program.py) keeps the traceback in `status()['error']`
  and the loop ends."""

  name = 'node'
  exit_on_crash = True

  def _start(self, workdir: Optional[str], stop: Optional[threading.Event] = None) -> None:
    self._workdir = workdir
    self._stop = stop or threading.Event()
    self._done = threading.Event()
    self._exiting = False  # ending its process for a restart (`LearnerNode.save_and_exit`)
    self._error: Optional[str] = None
    self._restarted = _was_restarted()
    # One read of Ray's actor table, now (a crash must not wait on it): the crash records' start
    # and the status's `restarts` (the driver matches it with Ray's record).
    self._restart_count = _restart_count()
    self._actor_start = _actor_start(self._restart_count)
    self._started = time.time()
    self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
    self._thread.start()

  def _loop(self) -> None:
    try:
      while not self._stop.is_set():
        if self._run_once() is False:
          break
      self._done.set()
    except BaseException:  # pylint: disable=broad-except
      self._crash()

  def __init_subclass__(cls, **kwargs):
    """A node's constructor that raises records its traceback like a crashed loop, then raises.
    Ray's own record of a failed constructor (its death cause, `program._crash_log`'s fallback)
    lacked the traceback when the worker aborted right after (seen once in 5 suite runs: the
    learner's DatasetNotFoundError on empty game folders)."""
    super().__init_subclass__(**kwargs)
    init = cls.__dict__.get('__init__')
    if init is None:
      return
    signature = inspect.signature(init)

    @functools.wraps(init)
    def init_recording_a_crash(self, *args, **kw):
      try:
        init(self, *args, **kw)
      except BaseException as e:
        if not getattr(e, '_scaled_ql_recorded', False):  # once, for nested constructors
          e._scaled_ql_recorded = True
          workdir = signature.bind(self, *args, **kw).arguments.get('workdir')
          try:
            _record_crash(workdir, getattr(self, 'name', cls.name), traceback.format_exc(),
                          _actor_start(_restart_count()))
          except Exception:  # pylint: disable=broad-except
            pass  # the constructor's own error is the one to raise
        raise

    cls.__init__ = init_recording_a_crash

  def _crash(self) -> None:
    """Logs the traceback and ends the process, whatever fails on the way (stderr closed, disk
    full, `logs` not a directory): Ray restarts the node, and the driver sees every restart and
    ends the program on a crash loop (program.RestartBudget)."""
    try:
      self._error = traceback.format_exc()
      _record_crash(self._workdir, self.name, self._error, self._actor_start)
    finally:
      if self.exit_on_crash:
        os._exit(1)  # pylint: disable=protected-access

  def _run_once(self) -> Optional[bool]:
    raise NotImplementedError

  def _stop_loop(self, timeout: float = 60.0) -> None:
    self._stop.set()
    self._thread.join(timeout)

  def base_status(self) -> dict:
    return dict(name=self.name, pid=os.getpid(), restarted=self._restarted,
                restarts=self._restart_count, done=self._done.is_set() and not self._exiting,
                uptime_s=time.time() - self._started, error=self._error)

  def ping(self) -> int:
    return os.getpid()


REPLAY_PORT_FILE = 'replay_port'  # WORKDIR/: the port the replay node bound, for its restarts


def _read_port(path: str) -> Optional[int]:
  try:
    with open(path, encoding='utf-8') as f:
      return int(f.read().strip())
  except (OSError, ValueError):  # no file yet (the first start wrote none), or not a number
    return None


class ReverbNode:
  """The Reverb server (one table per game). Its clients ask it for its address once it is up
  (`RayReplay.where`) and reconnect to that address after a restart (Reverb's clients retry a
  lost server at the address they were given, for ever). So a restarted server comes back on the
  port it bound, read from WORKDIR/replay_port (written at every start), where it can: on
  another host (Ray restarted it there) its address differs even on that port, and where the
  port is taken it binds a free one. The driver then sees the new address in its status and
  restarts the clients (`program._Watcher.follow_replay`), which ask for the address at their
  start. At its first start it binds the port chosen when the program was built, or, should
  that one be taken on its host, a free one. gRPC binds with SO_REUSEPORT, so the dead
  server's port is free again at once."""

  name = 'replay'

  def __init__(self, cfg: ExperimentConfig, port: Optional[int] = None, pacing=None,
               workdir: Optional[str] = None):
    """`pacing`: a `reverb_tables.TablePacing` for online fine-tuning (None: offline tables)."""
    from scaled_ql.datasets import reverb_tables
    self._cfg = cfg
    tables = reverb_tables.make_tables(cfg, pacing)
    port_file = os.path.join(workdir, REPLAY_PORT_FILE) if workdir else None
    self._restarted = _was_restarted()
    bound_before = _read_port(port_file) if self._restarted and port_file else None
    try:
      self._server = reverb_tables.server_with_tables(tables, bound_before or port)
    except Exception as e:  # pylint: disable=broad-except  (port in use on this host)
      wanted = bound_before or port
      then = ('; the driver restarts its clients at the new address' if bound_before else '')
      print(f'[replay] port {wanted} unavailable ({e}); using a free port{then}', file=sys.stderr)
      self._server = reverb_tables.server_with_tables(reverb_tables.make_tables(cfg, pacing))
    self.port = self._port = self._server.port
    if port_file is not None:
      loggers.write_atomically(port_file, f'{self._port}\n')
    self._incarnation = f'{os.getpid()}-{time.time_ns()}'
    # Which start this is, for its clients and the driver to tell a newer address from an older
    # one (`program._Watcher.follow_replay`); None for a restart whose count Ray did not give.
    self._start = _restart_count()

  def address(self) -> str:
    host = ray.util.get_node_ip_address()
    return f'{host}:{self._port}'

  def where(self) -> tuple[str, Optional[int]]:
    """(address, start): this start's address and restart count (None: unknown)."""
    return self.address(), self._start

  def incarnation(self) -> str:
    """Differs for every start of the server: a restarted server holds no data and counts its
    inserts from 0 (online fine-tuning's pacing starts over from it)."""
    return self._incarnation

  def status(self) -> dict:
    from scaled_ql.datasets import reverb_tables
    sizes = reverb_tables.table_sizes(f'localhost:{self._port}', self._cfg.games,
                                      per_item=self._cfg.data.transitions_per_item)
    return dict(name=self.name, pid=os.getpid(), restarted=self._restarted, table_sizes=sizes,
                address=self.address(), start=self._start)

  def ping(self) -> int:
    return os.getpid()

  def stop(self) -> None:
    self._server.stop()


@dataclasses.dataclass(frozen=True)
class RayReplay:
  """How a node finds the replay node of a Ray program: by its actor NAME, never by a handle in
  its arguments (Ray cannot always restart an actor whose constructor arguments hold actor
  handles, ray-project/ray#53727). Picklable."""
  name: str

  def where(self) -> tuple[str, Optional[int]]:
    """The replay's current (address, start) (`ReverbNode.where()`), waiting while it
    restarts."""
    while True:
      try:
        return ray.get(ray.get_actor(self.name).where.remote(), timeout=60)
      except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError):
        time.sleep(RETRY_SECONDS)

  def incarnation(self) -> Optional[str]:
    """`ReverbNode.incarnation()`; None while the replay node restarts."""
    try:
      return ray.get(ray.get_actor(self.name).incarnation.remote(), timeout=10)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError):
      return None


@dataclasses.dataclass(frozen=True)
class LocalReplay:
  """The same seam for a `ReverbNode` in this process (an in-process program, a test)."""
  node: 'ReverbNode'

  def where(self) -> tuple[str, Optional[int]]:
    return f'localhost:{self.node.port}', self.node.where()[1]

  def incarnation(self) -> Optional[str]:
    return self.node.incarnation()


Replay = Union[RayReplay, LocalReplay]  # what nodes take to find the replay


class _RestartsSeen:
  """Counts the replay servers a node has lived through, read at status time only (no node waits
  on it): a restarted server is a new incarnation."""

  def __init__(self, replay):
    self._replay = replay
    self._seen: Optional[str] = None
    self.count = 0

  def __call__(self) -> int:
    incarnation = self._replay.incarnation()
    if incarnation is not None and incarnation != self._seen:
      if self._seen is not None:
        self.count += 1
      self._seen = incarnation
    return self.count


class InserterNode(_LoopNode):
  """Streams RLDS episodes of its share of the games (games[index::num_inserters]) into their
  Reverb tables, epoch after epoch (`reverb_tables.run_inserter`, which reconnects when the server
  comes back at its address).

  Throttle: `reverb_tables.InsertThrottle` (`DataConfig.samples_per_insert`), applied by
  `run_inserter` itself, so the `learn` command's inserter processes are throttled alike.
  """

  def __init__(self, cfg: ExperimentConfig, replay: Replay, index: int, num_inserters: int,
               workdir: Optional[str] = None):
    self.name = f'inserter_{index}'
    self._cfg, self._replay = cfg, replay
    self._games = tuple(cfg.games[index::num_inserters])
    if not self._games:
      raise ValueError(f'inserter {index} of {num_inserters} has no games ({len(cfg.games)} '
                       'games): lower DataConfig.num_inserters')
    self._throttle = None
    # The replay's (address, start), asked at each (re)start of the loop (status).
    self._replay_at: tuple[Optional[str], Optional[int]] = (None, None)
    # The reader's counters (episodes, corrupt files, undecodable episodes) and the malformed
    # episodes the inserter cut short.
    self._read_stats = None
    self._start(workdir)

  def _run_once(self) -> bool:
    from scaled_ql.datasets import reverb_tables
    self._replay_at = self._replay.where()
    address = self._replay_at[0]
    # The throttle lives in the data layer (`reverb_tables.InsertThrottle`); kept here for status.
    self._throttle = reverb_tables.InsertThrottle(address, self._games,
                                                  self._cfg.data.samples_per_insert, self._stop)
    from scaled_ql.datasets import rlds_reader
    self._read_stats = self._read_stats or rlds_reader.ReadStats()
    reverb_tables.run_inserter(
        address, self._cfg, self._games,
        # One epoch per source call; run_inserter repeats them (and sees resident data).
        reverb_tables.rlds_episode_source(self._cfg, repeat=False, stats=self._read_stats),
        repeat=True, stop=self._stop, throttle=self._throttle, stats=self._read_stats)
    return False

  @property
  def throttled_s(self) -> float:
    return self._throttle.throttled_s if self._throttle is not None else 0.0

  def status(self) -> dict:
    # data: episodes read, corrupt (unreadable) files, undecodable episodes skipped and malformed
    # episodes cut short so far.
    resident = sorted(self._throttle.resident) if self._throttle is not None else []
    return dict(self.base_status(), games=list(self._games), throttled_s=self.throttled_s,
                resident=resident, replay_address=self._replay_at[0],
                replay_start=self._replay_at[1],
                data=self._read_stats.counts() if self._read_stats is not None else {})

  def stop(self) -> None:
    # Nothing of an inserter needs saving (an episode cut short is dropped either way), and its
    # thread may sit in the reader's next episode (decoding a long one takes seconds): do not
    # wait on it for long; the program kills the node next.
    self._stop_loop(timeout=2)


class NoProgressError(RuntimeError):
  """The learner restarted again and again from the same checkpoint: the run makes no progress."""


# WORKDIR/: written by a learner that saved its step and exits on the driver's request
# (`LearnerNode.save_and_exit`); the next start reads and removes it (`record_learner_start`).
LEARNER_EXIT_REQUESTED = 'learner_exit_requested'


def record_learner_start(workdir: str, restart: int, resumed_from_step: int,
                         max_in_a_row: int) -> int:
  """Appends this learner start to WORKDIR/learner_starts.jsonl and returns how many starts the
  file held before it (the lineage its params are published under: it only grows over the
  workdir's programs, `launch/variable_server.py`); raises NoProgressError when it
  is the `max_in_a_row`-th restart in a row (of this program: the starts since the last first
  start, restart 0) that resumed from the same checkpoint step as the start before it. A learner
  that fails every time before its next checkpoint (a full disk or quota at each save, a
  divergence that recurs) would otherwise train the same interval again and again: restarts
  minutes or hours apart never make `crash_loop_restarts` within `crash_loop_window_s`.
  A start after a requested exit (the driver's, to follow a moved replay: LEARNER_EXIT_REQUESTED,
  recorded as `after_requested_exit`) ends the row: that start did not fail, even where the
  learner made no step since (it waited for the refilled replay)."""
  import json
  path = os.path.join(workdir, loggers.LEARNER_STARTS)
  starts = loggers.read_learner_starts(workdir) or []
  this = dict(time=time.time(), restart=restart, resumed_from_step=resumed_from_step)
  marker = os.path.join(workdir, LEARNER_EXIT_REQUESTED)
  if os.path.exists(marker):
    with open(marker) as f:
      saved = f.read().strip()
    os.remove(marker)
    # Only where this start resumed from the step that exit saved (not from an older checkpoint
    # because that save does not load), and only for a restart (a first start just removes it).
    if restart > 0 and saved == str(resumed_from_step):
      this['after_requested_exit'] = True
  loggers.append_lines(path, [json.dumps(this)])
  lineage = len(starts)
  firsts = [i for i, s in enumerate(starts) if s.get('restart') == 0]
  starts = starts[firsts[-1]:] + [this] if firsts and restart > 0 else [this]
  in_a_row = 0
  for before, after in zip(starts[::-1][1:], starts[::-1]):
    if (after['resumed_from_step'] != before['resumed_from_step']
        or after.get('after_requested_exit')):
      break
    in_a_row += 1
  if in_a_row >= max_in_a_row:
    raise NoProgressError(
        f'the learner restarted {in_a_row} times in a row from the checkpoint of step '
        f'{resumed_from_step} (train.crash_loop_restarts={max_in_a_row}): each start failed '
        'before its next checkpoint, so the run makes no progress. The error of each start is '
        f'in {os.path.join(workdir, "logs", "learner.err")}; its starts in {path}')
  return lineage


# How long the learner's stop() waits for its loop (a step, or a periodic checkpoint under way)
# before its final save: that leaves the save ~115 s of the driver's 300 s for the learner's
# stop (`program.shutdown`), after the final publish's two flushes of up to 30 s each. (A stop
# that meets a `save_and_exit` under way ends with its process; `shutdown` then stops the
# restarted learner in what is left of the 300 s.)
LEARNER_LOOP_STOP_S = 120.0
# How long `LearnerNode.save_and_exit` may take before its process ends regardless: the loop's
# end (LEARNER_LOOP_STOP_S) and a save of the state.
LEARNER_SAVE_AND_EXIT_S = LEARNER_LOOP_STOP_S + 120.0


class LearnerNode(_LoopNode):
  """The sharded jitted Learner fed by stratified batches from Reverb. Checkpoints into
  WORKDIR/checkpoints (the LearnerRunner's Orbax manager) and publishes its params, tagged with its
  step, every `publish_every_steps` without waiting on anyone. A restarted node resumes from the
  last checkpoint. It stops at `num_steps`; with None it trains until the program stops it."""

  name = 'learner'
  offline_data = True  # cfg.data is read (the MC probe); False for online fine-tuning

  def __init__(self, cfg: ExperimentConfig, replay: Replay, variables: VariableServer,
               workdir: str, num_steps: Optional[int], initial_params: Any = None):
    from scaled_ql.agents.learner import Learner
    from scaled_ql.agents.runner import LearnerRunner
    from scaled_ql.datasets.mc_probe import load_mc_probe
    from scaled_ql.datasets import reverb_tables
    # Before anything compiles: a restart loads the update and the rest its first start compiled.
    compilation_cache.use_run_cache(workdir)
    self._cfg, self._num_steps = cfg, num_steps
    # The iterator reconnects by itself when the server comes back at the same address; at
    # another (on another host) the driver restarts this node (`program._Watcher.follow_replay`).
    self._address, self._replay_start = replay.where()
    self._iterator = reverb_tables.stratified_batches(
        self._address, cfg.games, cfg, seed=cfg.train.seed + 1000 * _restarts())
    # initial_params (transfer: a pretrained encoder) seed a fresh run; a checkpoint wins.
    # mc_probe: Q(s, a_data) against Monte-Carlo returns of the offline data, in the metrics.
    probe = load_mc_probe(cfg) if self.offline_data else None
    self._learner = LearnerRunner(Learner(cfg, self._iterator, initial_params=initial_params),
                                  workdir, handle_signals=False, mc_probe=probe)
    self._learner.restore()  # a restarted node resumes from the last checkpoint
    self.resumed_from_step = int(self._learner.steps)
    lineage = record_learner_start(workdir, _restarts(), self.resumed_from_step,
                                   cfg.train.crash_loop_restarts)
    self._publisher = variables.publisher(lineage=lineage)
    self._publisher.publish(self._params(), self._learner.steps)
    self._metrics: dict = {}
    self._rate_window: collections.deque = collections.deque()  # (time, steps) of the last 30 s
    self._ending = threading.RLock()  # `_end_loop_and_save`, `save_and_exit`, `stop`
    self._stopped_at: Optional[int] = None  # the step `stop` ended at
    self._start(workdir)

  def _params(self):
    return self._learner.get_variables(('params',))[0]

  def _at_end(self, steps: int) -> bool:
    """Whether `steps` reach `num_steps` (never for None: trains until stopped)."""
    return self._num_steps is not None and steps >= self._num_steps

  def _run_once(self) -> Optional[bool]:
    if self._at_end(self._learner.steps):
      return False
    try:
      self._metrics = self._learner.step()
    except StopIteration:
      if self._stop.is_set():  # stop() closed the iterator the step was waiting on
        return False
      raise
    steps = int(self._learner.steps)
    eval_every = self._cfg.eval.eval_every_steps  # the evaluators' step cadence needs these
    if (steps % self._cfg.train.publish_every_steps == 0 or self._at_end(steps)
        or (eval_every and steps % eval_every == 0)):
      self._publisher.publish(self._params(), steps)
    now = time.monotonic()
    self._rate_window.append((now, steps))
    while now - self._rate_window[0][0] > 30.0:
      self._rate_window.popleft()
    return None

  def status(self) -> dict:
    window = list(self._rate_window)
    rate = ((window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
            if len(window) > 1 and window[-1][0] > window[0][0] else 0.0)
    if window and time.monotonic() - window[-1][0] > 30.0:
      rate = 0.0  # no step for 30 s (waiting for data or actors): not the last rate seen
    metrics = {k: float(v) for k, v in self._metrics.items() if _is_number(v)}
    return dict(self.base_status(), steps=int(self._learner.steps), num_steps=self._num_steps,
                steps_per_s=rate, resumed_from_step=self.resumed_from_step,
                replay_address=self._address, replay_start=self._replay_start,
                published_version=self._publisher.last_version,
                lineage=self._publisher.lineage,
                publishes_skipped=self._publisher.skipped,
                reverb_reconnects=self._iterator.reconnects,
                waited_for_data_s=self._iterator.waited_s, metrics=metrics,
                step_ms=self._learner.step_ms(), compilation_cache=compilation_cache.counts())

  def set_data_counts(self, counts: dict) -> None:
    """The inserters' bad-data counters (summed by the driver), logged with the learner's
    metrics (`Learner.set_data_counts`)."""
    self._learner.set_data_counts(counts)

  def _end_loop_and_save(self, why: str) -> None:
    """Ends the loop and checkpoints its step, once at a time (`stop` and `save_and_exit` may
    overlap: the second finds the step saved). A loop waiting for data (a table below its
    warm-up, a paced table waiting for the actors, a replay gone) is woken by closing its
    iterator: no batch was taken, the state is whole."""
    with self._ending:
      self._stop.set()
      self._thread.join(1.0)
      if self._thread.is_alive():  # waiting for a batch (or in a long step: it ends with it)
        self._iterator.close(timeout_s=0)
      self._stop_loop(timeout=LEARNER_LOOP_STOP_S)
      if self._thread.is_alive():  # (a periodic save of a large state on a slow filesystem)
        raise RuntimeError(f'the learner\'s loop did not end within '
                           f'{LEARNER_LOOP_STOP_S + 1:.0f}s of {why}: no checkpoint of its '
                           'step is written beside it (the newest periodic one stands)')
      self._learner.save()

  def stop(self) -> int:
    """Ends the loop, writes a final checkpoint and publishes the final params; a second call
    returns the step the first stopped at (the driver may send it again: a call Ray reported
    as not delivered, `program._stop_through_a_restart`)."""
    with self._ending:
      if self._stopped_at is not None:
        return self._stopped_at
      self._stopped_at = self._stop_once()
      return self._stopped_at

  def _stop_once(self) -> int:
    self._end_loop_and_save('its stop')
    # A periodic publish still in flight made the final one a skip (`publish` sends at most one
    # at a time), and the final evaluation waited for params that never came. `flush` clears
    # what is in flight, so the publish after it is sent.
    self._publisher.flush(timeout=30)
    self._publisher.publish(self._params(), self._learner.steps)
    self._publisher.flush(timeout=30)
    self._iterator.close(timeout_s=2)  # its thread may be stuck in a sample request: a daemon
    self._learner.close()
    return int(self._learner.steps)

  def save_and_exit(self) -> None:
    """Checkpoints the step the learner is at and ends the process, so that Ray's restart
    resumes there: how the driver restarts a learner left at the old address of a moved replay
    (`program.restart_node`), where a kill would lose the steps since the last periodic
    checkpoint. Nothing to do for a learner that is stopping or has trained its steps. The
    status never shows the ended loop as done. Whatever the loop or the save do, the process
    ends within LEARNER_SAVE_AND_EXIT_S: a save that raises is recorded as the start's crash,
    one cut off by that deadline is not; the restart then resumes from the newest periodic
    checkpoint. It holds `_ending` from its check to the exit, so a `stop()` either came first
    (and this does nothing) or fails with the process (the driver then stops the restarted
    learner: `program.shutdown`)."""
    with self._ending:
      if self._stop.is_set() or self._done.is_set():
        return
      self._exiting = True
      deadline = threading.Timer(LEARNER_SAVE_AND_EXIT_S, os._exit, (1,))
      deadline.daemon = True
      deadline.start()
      try:
        self._end_loop_and_save('the request to save and exit')
        self._learner.close()  # (its metrics' files)
        # Saved: the restart this asks for is no failure (`record_learner_start`).
        with open(os.path.join(self._workdir, LEARNER_EXIT_REQUESTED), 'w') as f:
          f.write(str(int(self._learner.steps)))
      except BaseException:  # pylint: disable=broad-except
        self._crash()
      finally:
        os._exit(1)  # pylint: disable=protected-access


def _is_number(v: Any) -> bool:
  try:
    float(v)
    return True
  except (TypeError, ValueError):
    return False


def eval_due(version: int, evaluated_version: int, every_steps: Optional[int],
             woken: bool = False) -> bool:
  """Whether an evaluator evaluates params `version` after `evaluated_version`: any newer params
  on a time cadence (`every_steps` None) or after wake(); on a step cadence (paper configs) the
  first params of each new multiple of `every_steps` (the learner publishes at those steps)."""
  if version <= evaluated_version:
    return False
  return not every_steps or woken or version // every_steps > evaluated_version // every_steps


def forget_lost_versions(first_lost: int, *evaluated: int) -> tuple[int, ...]:
  """The evaluated versions an evaluator keeps when it first holds params of a new lineage (a
  restarted learner's, `launch/variable_server.py`): versions from `first_lost` on
  (`first_lost_version`) were the lost run's, so the new lineage's params of those steps are
  due as any new params."""
  return tuple(min(e, first_lost - 1) for e in evaluated)


def first_lost_version(workdir: str, held_lineage: int, version: int) -> int:
  """The first step of lost params, for an evaluator that held params of `held_lineage` and
  first fetches a newer lineage at step `version`: one past the smallest step that any learner
  start after `held_lineage` resumed from (`loggers.lost_bound`, the rule `report.lost_params`
  reads records by), and never past `version`.

  An evaluator busy with a round can first fetch the new lineage some steps past the resume step,
  and can miss whole lineages (two restarts during one round). Forgetting only from `version` on
  would keep the lost run's versions between the two counted as evaluated, and the new run's
  params of those steps (with `eval_every_steps`, a whole interval) would get no round. When
  `version` is the resume step itself, its params (the checkpoint's, the same in both runs) get
  a round again: harmless.

  Falls back to `version` (forget from the fetched step on, the rule before) when the workdir
  records no start (a variable server without a LearnerNode, e.g. a test's), when the file cannot
  be read or parsed, when nothing was held (-1), and when the file does not number
  `held_lineage` or no start follows it there (`loggers.lost_bound`; the readers then keep that
  lineage's records)."""
  try:
    resumed = loggers.resume_steps(loggers.read_learner_starts(workdir) or [])
  except (OSError, TypeError, ValueError, AttributeError):
    return version
  bound = loggers.lost_bound(resumed, held_lineage)
  return version if bound is None else min(version, bound + 1)


EVALUATOR_NICENESS = 5


class EvaluatorNode(_LoopNode):
  """Evaluates the newest params on its own games, once per `eval_every_steps` learner steps
  (paper configs) or on its own clock (every `eval_every_seconds`), and only params newer than the
  last it evaluated; writes per-game rows
  tagged with the param version to WORKDIR/eval/evaluator_<i>.jsonl and TensorBoard."""

  def __init__(self, cfg: ExperimentConfig, games: Sequence[str], variables: VariableServer,
               workdir: str, index: int):
    from scaled_ql.agents.actors import make_policy
    self.name = f'evaluator_{index}'
    compilation_cache.use_run_cache(workdir)  # a restart loads the policy shapes compiled before
    # Where it shares cores with the learner (one machine), the learner's steps come first: an
    # evaluator round only decides when the next curve point lands. +5 on top of Ray's worker
    # niceness (a no-op for a node on a machine of its own), for this thread and those it starts
    # (Linux keeps a niceness per thread): the loop's. Only in its own Ray actor process: a node
    # built in a test's process leaves that process's niceness alone.
    if _actor_id():
      os.nice(EVALUATOR_NICENESS)
    self._cfg, self._games, self._index = cfg, tuple(games), index
    self._policy = make_policy(cfg, cfg.eval.epsilon)
    self._client = variables.client()
    self._evaluated_version = -1
    # The newest params a round on the final budget evaluated (any round, when the final budget
    # is the normal one): what the driver waits for after wake(final=True).
    self._final_version = -1
    self._lineage = -1  # the variable server's lineage of the params held (one per learner start)
    self._rounds = 0
    self._latest: dict[str, dict] = {}
    self._writer = None
    self._wake = threading.Event()
    self._woken = False
    self._final = False
    self._evaluating_version = -1
    self._abandoned_rounds = 0  # rounds given up for the final evaluation or stop()
    self._longest_overrun: dict[str, int] = {}
    self._start(workdir)

  def _run_once(self) -> None:
    from scaled_ql.eval import evaluator
    started = time.monotonic()
    self._client.update_and_wait()
    every = self._cfg.eval.eval_every_steps
    version, params = self._client.version, self._client.params
    lineage = self._client.lineage
    if lineage != self._lineage:  # a restarted learner's params
      first_lost = first_lost_version(self._workdir, self._lineage, version)
      self._evaluated_version, self._final_version = forget_lost_versions(
          first_lost, self._evaluated_version, self._final_version)
      # The lost run's latest scores are not the run's (progress line, final scores).
      self._latest = {g: r for g, r in self._latest.items() if r['param_version'] < first_lost}
      self._lineage = lineage  # last: status() never shows it with the lost run's versions
    # After wake(final=True) the newest params are due on the final budget even when a round on
    # the normal budget evaluated them already (one that ended between the learner's last
    # publish and the wake).
    final_due = self._final and version > self._final_version
    if not (final_due or eval_due(version, self._evaluated_version, every, self._woken)):
      self._wake.wait(RETRY_SECONDS)
      self._wake.clear()
      return
    self._evaluating_version = version  # a round in progress (lost if the node is killed)
    # wake(final=True) before this round started: the final params get the final budget.
    final_round = self._final
    budget = self._cfg.eval.final_steps_per_game if final_round else None
    # A round of older params gives way to the final evaluation (wake(final=True)) and to stop():
    # the final scores then do not wait for a whole round of params nobody will use.
    give_way = (lambda: self._stop.is_set()) if final_round else (
        lambda: self._stop.is_set() or self._final)
    try:
      results = evaluator.evaluate(
          self._policy, params, self._games, self._cfg.eval, model_games=self._cfg.games,
          steps_per_game=budget,
          seed=self._cfg.train.seed + 1000 * self._index + self._rounds + _restart_seed(),
          param_version=version, param_lineage=lineage, evaluator=self.name,
          epsilon=self._cfg.eval.epsilon,
          jsonl_path=os.path.join(self._workdir, 'eval', f'{self.name}.jsonl'),
          should_stop=give_way)
    except evaluator.Abandoned:
      self._evaluating_version = -1
      self._abandoned_rounds += 1
      return
    self._evaluated_version = version
    if final_round or self._cfg.eval.final_budget == self._cfg.eval.steps_per_game:
      self._final_version = version
    self._evaluating_version = -1
    self._rounds += 1
    # The most steps any round of a game ran past its budget (its last episodes played out): a
    # policy that once stalled until the frame cap (Breakout without a serve) may again.
    for game, r in results.items():
      self._longest_overrun[game] = max(self._longest_overrun.get(game, 0), r.steps - r.budget)
    # score/normalized are None for a game with no completed episode (shown as text).
    # steps/budget/seconds/longest_overrun: what the driver's estimate of a final evaluation's
    # time reads (program.final_eval_estimate_s). Games played at once (games_at_once > 1)
    # share their loop's time by steps: steps_per_s is the loop's.
    self._latest = {game: dict(game=game, score=r.score, normalized=r.normalized,
                               episodes=r.episodes, truncated=r.truncated,
                               games_at_once=r.games_at_once,
                               steps_per_s=r.steps / max(r.seconds, 1e-9),
                               steps=r.steps, budget=r.budget, seconds=r.seconds,
                               cpu_seconds=r.cpu_seconds,
                               longest_overrun=self._longest_overrun[game],
                               param_version=version) for game, r in results.items()}
    self._write_tensorboard(version)
    if every:
      return  # step cadence: the next round waits for the next multiple of eval_every_steps
    # Own clock: the next round starts eval_every_seconds after this one started (or on wake()).
    self._wake.wait(max(0.0, self._cfg.eval.eval_every_seconds - (time.monotonic() - started)))
    self._wake.clear()

  def wake(self, final: bool = False) -> None:
    """Start the next round now (e.g. to evaluate the final params at the end of training);
    from now on any newer params are due, whatever the step cadence. `final`: later rounds use
    `eval.final_steps_per_game` (when set) as their budget."""
    self._woken = True
    self._final = self._final or final
    self._wake.set()

  def _write_tensorboard(self, version: int) -> None:
    if self._writer is None:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(os.path.join(self._workdir, 'tb', self.name))
    from scaled_ql.eval import evaluator
    # Games with no completed episode write no scalar (never a number; eval/evaluator.py).
    for tag, value in evaluator.tensorboard_scalars(self._latest):
      self._writer.add_scalar(tag, value, version)
    self._writer.flush()

  def status(self) -> dict:
    return dict(self.base_status(), games=list(self._games), rounds=self._rounds,
                compilation_cache=compilation_cache.counts(),
                abandoned_rounds=self._abandoned_rounds,
                evaluated_version=self._evaluated_version, final=self._final,
                final_version=self._final_version, lineage=self._lineage,
                evaluating_version=self._evaluating_version, latest=self._latest)

  def stop(self) -> None:
    self._wake.set()
    self._stop_loop(timeout=120)
    if self._writer is not None:
      self._writer.close()


class FinetuneActorNode(_LoopNode):
  """Wiring, restarts and status around `agents.actors.EpsilonGreedyActor`: acts in a new
  environment (game + mode) with the newest params (sticky actions 0.25, like the data
  collection) and writes each step into the Reverb table of that game as it comes
  (`reverb_tables.EpisodeAdder`, the offline inserters' record format). The game must be one of
  `cfg.games` (its game_id and action set come from the config). Pacing is the table's
  (`reverb_tables.TablePacing`): an actor ahead of the learner waits in its writer."""

  def __init__(self, cfg: ExperimentConfig, game: str, mode: Optional[int],
               epsilon: 'float | Callable[[int], float]', variables: VariableServer,
               replay: Replay, index: int, workdir: Optional[str] = None,
               update_period: int = 100, seed: int = 0, max_episode_frames: int = 108_000,
               sticky_action_prob: float = 0.25):
    """`epsilon`: a constant, or a (picklable) schedule `epsilon(param_version) -> float` of the
    learner step that produced the acting params (e.g. `actors.LinearEpsilon`)."""
    from scaled_ql.agents import actors
    from scaled_ql.datasets import reverb_tables
    from scaled_ql.envs.atari import AtariEnv
    if game not in cfg.games:
      raise ValueError(f'fine-tuning game {game!r} is not one of the config games {cfg.games}')
    self.name = f'actor_{index}'
    compilation_cache.use_run_cache(workdir)
    self._game = game
    seed = seed + 7919 * index + _restart_seed()
    env = AtariEnv(game, mode=mode, sticky_action_prob=sticky_action_prob, seed=seed,
                   max_episode_frames=max_episode_frames)
    self._client = variables.client(update_period)
    self._stop = threading.Event()  # also ends a write held back by the paced table
    self._replay_at: tuple[Optional[str], Optional[int]] = (None, None)  # its writer's (status)

    def replay_address() -> str:  # asked by the adder for each new writer
      self._replay_at = replay.where()
      return self._replay_at[0]

    self._adder = reverb_tables.EpisodeAdder(replay_address, cfg, game, stop=self._stop,
                                             name=self.name)
    self._actor = actors.EpsilonGreedyActor(cfg, game, self._client, epsilon, env.num_actions,
                                            seed=seed, adder=self._adder)
    # Held back by the paced table, the actor keeps its params (and epsilon) current.
    self._adder.while_waiting = lambda: self._actor.update(wait=True)
    self._episodes = actors.EnvironmentLoop(env, self._actor, should_stop=self._stop.is_set)
    self._restarts_seen = _RestartsSeen(replay)
    self._start(workdir, stop=self._stop)

  def _run_once(self) -> None:
    if self._client.params is None:
      # The learner's first params, in the loop: a learner that takes long to build or restore
      # (a paper-size checkpoint) must not fail this node's constructor (Ray restarts no node
      # whose constructor raised, and the program would end), and stop() must end the wait.
      try:
        self._client.wait_for_version(0, timeout=1.0)
      except TimeoutError:
        return
    self._episodes.run_episode()

  def status(self) -> dict:
    # items before env_steps: the loop counts a step before its adder writes it, so this order
    # keeps items <= env_steps while the loop runs on.
    items, loop, recent = self._adder.items, self._episodes, self._episodes.returns[-10:]
    try:
      epsilon = self._actor.epsilon
    except Exception:  # pylint: disable=broad-except  (a faulty schedule fails the loop, not status)
      epsilon = None
    return dict(self.base_status(), game=self._game, episodes=loop.episodes,
                compilation_cache=compilation_cache.counts(),
                epsilon=epsilon, replay_restarts_seen=self._restarts_seen(),
                replay_address=self._replay_at[0], replay_start=self._replay_at[1],
                env_steps=loop.env_steps, items=items,
                lost_episodes=self._adder.lost_episodes, param_version=self._client.version,
                mean_return=sum(recent) / len(recent) if recent else None)

  def stop(self) -> None:
    self._stop_loop(timeout=30)
    self._adder.close()

"""Reverb replay for offline multi-game training: one table per game, stratified sampling.

Server: one table per game (`table_name(game)`), uniform sampler, FIFO remover, max_size =
`cfg.data.shuffle_buffer_per_game` transitions, rate limiter `MinSize(min_fill_per_game)`: each
table is a shuffle buffer over a stream of transitions; sampling starts once it holds
min_fill_per_game transitions and inserts are never blocked (FIFO eviction makes room). Sizes are
in transitions; a table counts items of `data.transitions_per_item` transitions (`table_items`).
Online fine-tuning paces its table instead (`TablePacing`: Dopamine's one gradient step per
`update_period` environment steps as a `SampleToInsertRatio` rate limiter); its actors write
through `EpisodeAdder`.

Storage: inserters append ONE record per RLDS step (a single 84x84 frame, action, reward,
terminal, valid; see `transitions.py` for the record stream and its padding), packed into one
uint8 column (`transitions.pack_record`: one chunk per sample instead of five), with the
trajectory writer, and create an item over the last `n + 4` records for every transition (or over
`n + 3 + P` records for every P transitions, P = `data.transitions_per_item`). Items only
reference the chunks that hold the records, so each frame is stored once (compressed) however many
items use it.

Learner side: `stratified_batches(address, games, cfg)` draws `games_per_batch` game indices with
replacement and `transitions_per_game` transitions from each drawn game's table (Appendix B.3),
turns the windows into `FrameWindows` with the same `windows_to_frame_windows` as the numpy
reference (rewards, discounts, K: vectorised, the frames untouched), and prefetches
`prefetch_batches` batches in a background thread. Frames are stacked into observations on the
learner's device, inside its jitted update (`FrameWindows.to_transition`): each frame is copied
once, and no host thread interleaves channels (docs/history/performance_log.md has the profile).

Processes: `start_server_process(cfg)` runs the server in a subprocess (`python -m
scaled_ql.datasets.reverb_tables serve ...`) reachable at `localhost:PORT` over gRPC;
`start_inserter_processes(address, cfg)` streams the RLDS data into it from
`cfg.data.num_inserters` subprocesses. `serve(cfg, port)` and `run_inserter(...)` are the bodies
a Ray actor can run instead.

Reconnect: a server that goes away and comes back at the same address starts with empty tables.
Reverb's own clients retry UNAVAILABLE: the sampling datasets and the trajectory writer simply
block and carry on once the server answers again (tested: `test_reconnect_after_server_restart`,
~4 s after the new server is up); sampling blocks until the inserters have refilled
each table to min_fill. Errors that do surface are handled as a fallback: `StratifiedBatches`
rebuilds its datasets after gRPC errors (waits up to `reconnect_timeout_s` for the server), and
`run_inserter` reconnects with a new client and writer and moves on to the next episode (the
partial one is dropped). Batches already prefetched from the old server are still delivered.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from scaled_ql.configs.base import ExperimentConfig, check_transitions_per_item, table_items
from scaled_ql.datasets import transitions as tr
from scaled_ql.types import FrameWindows

log = logging.getLogger(__name__)

# Every FLUSH_EVERY_ITEMS items, wait until at most chunk_length + n + 4 items are unconfirmed:
# bounds the writer's buffers without forcing chunks to close early (items wait for their chunk;
# Reverb warns about "alarmingly high" pending items when flushed every 32).
FLUSH_EVERY_ITEMS = 8


def table_name(game: str) -> str:
  return f'transitions_{game}'


def _check_games(games: Sequence[str], cfg: ExperimentConfig) -> None:
  unknown = [g for g in games if g not in cfg.games]
  if unknown:
    raise ValueError(f'games {unknown} are not in config {cfg.name!r} games {list(cfg.games)}')
  if not games:
    raise ValueError('no games given')


RECORD_COLUMN = 'record'  # the one column: `transitions.pack_record` bytes per step


def _record_specs(n_step: int, per_item: int = 1):
  import tensorflow as tf
  shape = (tr.window_length(n_step, per_item), tr.RECORD_BYTES)
  return {RECORD_COLUMN: tf.TensorSpec(shape, tf.uint8, name=RECORD_COLUMN)}


# ----------------------------------------------------------------------------------------- server

@dataclasses.dataclass(frozen=True)
class TablePacing:
  """Online fine-tuning's pacing, as a property of the game's table (Acme's DQN builder: a
  `reverb.rate_limiters.SampleToInsertRatio`), instead of nodes polling each other.

  Dopamine's C51 takes its first gradient step once `warmup` transitions were collected and then
  one per `update_period` more (`allowed_steps`). A step draws `batch_size` samples, so the table
  lets samples through at `batch_size / update_period` per insert, starting with one batch at
  `warmup` inserts: a learner ahead of the actors waits in its sampler. The insert side has
  `slack_steps` gradient steps of slack: an actor that is that far ahead of the samples waits in
  its writer (`EpisodeAdder` writes each step as it comes and waits on every FLUSH_EVERY_ITEMS-th
  item until at most chunk + window items are unconfirmed, so it runs ahead by at most ~22 items
  more in cpu configs: 7 + 8 + 7).

  Both sides count on the server: a restarted (empty) server starts a new warm-up for both by
  itself. A restarted learner resumes at its checkpoint step while the server still counts the
  samples its previous incarnation drew, so it first waits for the inserts those samples were
  paced against (at most one checkpoint interval's worth). Offline tables are never paced
  (`MinSize` only: nothing may block the learner); their inserters have `InsertThrottle`."""
  warmup: int
  update_period: int
  batch_size: int
  slack_steps: int

  def __post_init__(self):
    if min(self.warmup, self.update_period, self.batch_size, self.slack_steps) < 1:
      raise ValueError(f'TablePacing fields must be >= 1: {self}')

  @classmethod
  def from_config(cls, cfg: ExperimentConfig) -> 'TablePacing':
    """The online fine-tuning pacing of `cfg`: warm-up `data.min_fill_per_game`, one step per
    `finetune.update_period` transitions, a slack of 4 publish periods (as the actors had)."""
    if cfg.data.transitions_per_item != 1:
      raise ValueError(f'online fine-tuning paces single transitions (Dopamine): '
                       f'data.transitions_per_item must be 1, got {cfg.data.transitions_per_item}')
    if cfg.data.batches_per_fetch != 1:
      # The table lets one batch through per allowed step: fetching K would hold the learner
      # back until K steps were allowed, and then let it take them in a burst.
      raise ValueError(f'online fine-tuning paces one batch per gradient step: '
                       f'data.batches_per_fetch must be 1, got {cfg.data.batches_per_fetch}')
    return cls(cfg.data.min_fill_per_game, cfg.finetune.update_period, cfg.agent.batch_size,
               4 * cfg.train.publish_every_steps)

  @property
  def samples_per_insert(self) -> float:
    return self.batch_size / self.update_period

  def allowed_steps(self, inserted: int) -> int:
    """Gradient steps allowed once `inserted` transitions were collected (Dopamine's pacing)."""
    after_warmup = inserted - self.warmup
    if after_warmup < 0:
      return 0
    return after_warmup // self.update_period + 1

  def error_range(self) -> tuple[float, float]:
    """Reverb's (min_diff, max_diff) of `inserts x samples_per_insert - samples`: a sample may
    take it down to one batch below the warm-up's offset (so `allowed_steps` whole batches
    pass), an insert up to `slack_steps` batches above it."""
    offset = self.samples_per_insert * self.warmup
    return offset - self.batch_size, offset + self.batch_size * self.slack_steps

  def rate_limiter(self):
    import reverb
    return reverb.rate_limiters.SampleToInsertRatio(
        samples_per_insert=self.samples_per_insert, min_size_to_sample=self.warmup,
        error_buffer=self.error_range())


def make_tables(cfg: ExperimentConfig, pacing: Optional[TablePacing] = None) -> list:
  """One table per game. `pacing` None (offline): `MinSize(min_fill_per_game)`, inserts never
  blocked; else every table is paced by `pacing.rate_limiter()` (online fine-tuning)."""
  import reverb
  data = cfg.data
  if data.min_fill_per_game < 1 or data.min_fill_per_game > data.shuffle_buffer_per_game:
    raise ValueError(f'min_fill_per_game={data.min_fill_per_game} must be in '
                     f'[1, shuffle_buffer_per_game={data.shuffle_buffer_per_game}]')
  max_items, min_items = table_items(cfg)
  signature = _record_specs(cfg.agent.n_step, data.transitions_per_item)
  limiter = (lambda: reverb.rate_limiters.MinSize(min_items)) if pacing is None else (
      pacing.rate_limiter)
  return [reverb.Table(name=table_name(game), sampler=reverb.selectors.Uniform(),
                       remover=reverb.selectors.Fifo(), max_size=max_items,
                       rate_limiter=limiter(), signature=signature)
          for game in cfg.games]


SERVER_FOLDER_PREFIX = 'scaled_ql_reverb_'


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except (ProcessLookupError, OverflowError):
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def sweep_server_folders(root: Optional[str] = None) -> list[str]:
  """Removes the empty checkpoint folders of servers whose process is gone (killed with
  SIGKILL, which no finalizer survives) from `root` (default: the temporary directory); returns
  them. A folder is named `scaled_ql_reverb_<pid>_<random>`; one of a live process, a non-empty
  one, or any other name is left alone. (A server in another PID namespace sharing the folder
  may lose its empty folder: it never writes there, so it loses nothing.)"""
  root = root or tempfile.gettempdir()
  removed = []
  try:
    names = os.listdir(root)
  except OSError:  # a sweep must never stop a server from starting
    return removed
  for name in names:
    pid = name[len(SERVER_FOLDER_PREFIX):].split('_', 1)[0]
    if not name.startswith(SERVER_FOLDER_PREFIX) or not pid.isdigit() or _pid_alive(int(pid)):
      continue
    try:
      os.rmdir(os.path.join(root, name))  # only if empty: we never write Reverb checkpoints
    except OSError:
      continue
    removed.append(name)
  return removed


@functools.lru_cache(maxsize=None)
def _server_class():
  import reverb

  class Server(reverb.Server):
    """`reverb.Server` whose checkpoint folder is removed by `stop()`, when the server is
    collected, or when the process exits (`server_with_tables`); the folders that killed
    processes left are swept when a server starts (`sweep_server_folders`)."""

    def __init__(self, tables, port: Optional[int] = None):
      sweep_server_folders()
      folder = tempfile.mkdtemp(prefix=f'{SERVER_FOLDER_PREFIX}{os.getpid()}_')
      self._remove_folder = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
      super().__init__(tables=tables, port=port,
                       checkpointer=reverb.checkpointers.DefaultCheckpointer(folder))

    def stop(self):
      super().stop()
      self._remove_folder()  # runs once, whichever comes first

  return Server


def server_with_tables(tables, port: Optional[int] = None):
  """An in-process `reverb.Server` over `tables` whose checkpoint folder goes with it.

  Reverb gives every server without a checkpointer a fresh `tempfile.mkdtemp()` folder (its
  `TempDirCheckpointer`) and never removes it: one empty folder in the temporary directory per
  server start. We never write Reverb checkpoints (the offline tables are refilled from the
  files), so the folder is made here and removed when the server stops, is collected, or its
  process exits. A process killed with SIGKILL leaves its empty folder; the next server started
  on the machine removes it (`sweep_server_folders`)."""
  return _server_class()(tables, port)


def make_server(cfg: ExperimentConfig, port: Optional[int] = None,
                pacing: Optional[TablePacing] = None):
  """An in-process `reverb.Server` with one table per game of `cfg.games` (`make_tables`)."""
  return server_with_tables(make_tables(cfg, pacing), port)


def serve(cfg: ExperimentConfig, port: int, pacing: Optional[TablePacing] = None) -> None:
  """Runs the server until SIGTERM/SIGINT (the body of the server process or a Ray actor)."""
  server = make_server(cfg, port, pacing)
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  print(f'reverb server ready on port {server.port}', flush=True)
  stop.wait()
  server.stop()


def wait_for_server(address: str, timeout_s: float = 60.0, proc=None) -> dict:
  """Polls `address` until it answers `server_info`; returns the table infos."""
  import reverb
  deadline = time.monotonic() + timeout_s
  client = reverb.Client(address)
  while True:
    if proc is not None and proc.poll() is not None:
      raise RuntimeError(f'reverb server process exited with code {proc.returncode} before '
                         f'answering at {address}')
    try:
      return client.server_info(timeout=2)
    except Exception as e:  # the server is not up yet: gRPC unavailable / deadline
      if time.monotonic() > deadline:
        raise TimeoutError(f'no reverb server answered at {address} within {timeout_s}s') from e
      time.sleep(0.2)


def check_server(address: str, games: Sequence[str], timeout_s: float = 30.0) -> None:
  """A server given by address (`learn --reverb`) answers within `timeout_s` and has a table for
  each of `games`; ValueError otherwise. Without it the learner's sampler waited forever: Reverb
  only logs that the server "could not be reached" or that a table is not in its signature."""
  try:
    info = wait_for_server(address, timeout_s)
  except TimeoutError as e:
    raise ValueError(f'{e} (is the server running, and is this its host:port?)') from None
  missing = [table_name(g) for g in games if table_name(g) not in info]
  if missing:
    raise ValueError(f'the reverb server at {address} has no table {", ".join(missing)} (its '
                     f'tables: {", ".join(sorted(info)) or "none"}); it serves other games or '
                     'another program')


def _python_module_cmd(*args: str) -> list[str]:
  return [sys.executable, '-m', 'scaled_ql.datasets.reverb_tables', *args]


class ServerProcess:
  """A Reverb server in a subprocess; `address` is 'localhost:PORT'. Use as a context manager."""

  def __init__(self, cfg: ExperimentConfig, port: Optional[int] = None,
               timeout_s: float = 60.0, pacing: Optional[TablePacing] = None):
    import portpicker
    self.port = port or portpicker.pick_unused_port()
    self.address = f'localhost:{self.port}'
    args = ['serve', '--port', str(self.port), '--config_json', cfg.to_json()]
    if pacing is not None:
      args += ['--pacing_json', json.dumps(dataclasses.asdict(pacing))]
    self.proc = subprocess.Popen(_python_module_cmd(*args), stdout=subprocess.DEVNULL)
    try:
      wait_for_server(self.address, timeout_s, self.proc)
    except BaseException:
      self.stop()
      raise

  @property
  def pid(self) -> int:
    return self.proc.pid

  def stop(self, timeout_s: float = 10.0) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout_s)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()

  def __enter__(self) -> 'ServerProcess':
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


def watch_processes(procs: Mapping[str, subprocess.Popen], on_exit: Callable[[str], None],
                    poll_s: float = 1.0) -> threading.Event:
  """Calls `on_exit('NAME (pid P) was killed by SIGKILL' / '... exited with code C')` once, from
  a daemon thread, when one of `procs` ends. Returns the Event that ends the watch: set it before
  stopping them on purpose. (`learn`'s server and inserters run until it stops them; one that
  ended left the learner waiting for data, or training on what the tables held, without a word.)"""
  done = threading.Event()

  def watch():
    while not done.wait(poll_s):
      for name, proc in procs.items():
        code = proc.poll()
        if code is not None and not done.is_set():
          try:
            how = (f'exited with code {code}' if code >= 0 else
                   f'was killed by {signal.Signals(-code).name}')
          except ValueError:  # a signal number without a name
            how = f'was killed by signal {-code}'
          on_exit(f'{name} (pid {proc.pid}) {how}')
          return

  threading.Thread(target=watch, daemon=True, name='watch_processes').start()
  return done


def start_server_process(cfg: ExperimentConfig, port: Optional[int] = None,
                         timeout_s: float = 60.0,
                         pacing: Optional[TablePacing] = None) -> ServerProcess:
  return ServerProcess(cfg, port, timeout_s, pacing)


# -------------------------------------------------------------------------------------- inserting

def make_writer(client, n_step: int, chunk_length: int, per_item: int = 1):
  """A trajectory writer whose columns are chunked `chunk_length` steps at a time.

  Longer chunks compress better (consecutive frames in one compressed chunk); a chunk lives while
  any item references it, so with FIFO eviction a table holds at most ~2 chunks more than its
  items need (`cfg.data.reverb_chunk_length`, measured in benchmarks/data_pipeline.py).
  """
  if chunk_length < 1:
    raise ValueError(f'data.reverb_chunk_length must be >= 1, got {chunk_length}')
  width = tr.window_length(n_step, per_item)
  keep_alive = max(width, chunk_length)
  writer = client.trajectory_writer(num_keep_alive_refs=keep_alive)
  writer.configure((RECORD_COLUMN,), num_keep_alive_refs=keep_alive,
                   max_chunk_length=chunk_length)
  return writer


class InsertStopped(Exception):
  """A writer (`write_episode`, `EpisodeAdder`) gave up waiting on a paced table's rate limiter
  because `stop` was set."""


def _wait_confirmed(wait, stop: Optional[threading.Event],
                    while_waiting: Optional[Callable[[], None]] = None) -> None:
  """Runs a blocking writer call (`wait(timeout_ms)`), in 0.5-s slices when `stop` is given, so a
  writer held back by a paced table (`TablePacing`) notices a stop request; `while_waiting()`
  runs after every slice that ended without confirmation."""
  import reverb
  while True:
    try:
      wait(None if stop is None else 500)
      return
    except reverb.errors.DeadlineExceededError:
      if stop.is_set():
        raise InsertStopped() from None
      if while_waiting is not None:
        while_waiting()


def _append_records(writer, table: str, records: Iterable[tuple[Any, bool]], width: int,
                    chunk_length: int, created: int, stop: Optional[threading.Event] = None,
                    while_waiting: Optional[Callable[[], None]] = None) -> int:
  """Appends (record, window_ends_here) pairs (`transitions.RecordStream`) and an item over the
  last `width` records wherever a window ends; every FLUSH_EVERY_ITEMS-th item (counting from
  `created`, the items made before) waits for the server, where a paced table's rate limiter
  holds the writer back. Returns `created` plus the items made."""
  for record, window_ends in records:
    writer.append({RECORD_COLUMN: tr.pack_record(record)})
    if window_ends:
      writer.create_item(table=table, priority=1.0,
                         trajectory={RECORD_COLUMN: writer.history[RECORD_COLUMN][-width:]})
      created += 1
      if created % FLUSH_EVERY_ITEMS == 0:
        _wait_confirmed(lambda t: writer.flush(block_until_num_items=chunk_length + width,
                                               timeout_ms=t), stop, while_waiting)
  return created


def _end_episode(writer, stop: Optional[threading.Event] = None,
                 while_waiting: Optional[Callable[[], None]] = None) -> None:
  """Sends an episode's last items and starts a new trajectory (no window spans two). Waits in
  0.5-s slices when `stop` is given: a timed-out `end_episode` resets nothing (Reverb's
  EndEpisode returns from its flush first), so the next slice waits again and resets once."""
  _wait_confirmed(lambda t: writer.end_episode(timeout_ms=t), stop, while_waiting)


# A game whose first this many episodes are all malformed ends the inserter (`run_inserter`).
MALFORMED_FIRST_EPISODES = 10


class _UntilMalformed:
  """Iterates `records` until they raise `MalformedEpisodeError`, which it keeps in `error`."""

  def __init__(self, records: Iterable):
    self._records, self.error = records, None

  def __iter__(self):
    try:
      yield from self._records
    except tr.MalformedEpisodeError as e:
      self.error = e


def write_episode(writer, table: str, steps: Iterable[Mapping[str, Any]], n_step: int,
                  chunk_length: int, stop: Optional[threading.Event] = None,
                  while_waiting: Optional[Callable[[], None]] = None, per_item: int = 1,
                  num_actions: Optional[int] = None) -> int:
  """Appends one whole episode's records (padding included) and one item per `per_item`
  transitions (the offline inserters; an actor writes a step at a time, `EpisodeAdder`).

  Returns the number of items created (= transitions when per_item = 1). With `stop`, waits on
  the server (a paced table's rate limiter) end with `InsertStopped` once it is set, and call
  `while_waiting()` every 0.5 s. A malformed step (`transitions.RecordStream`; with
  `num_actions`, an action outside the game's set too) ends the episode there and raises its
  `transitions.MalformedEpisodeError`, with `items_written`: the items whose windows closed
  before it (whole transitions of the well-formed steps before it; with per_item > 1, whole
  items only) stay in the table, and the next episode starts afresh.
  """
  records = _UntilMalformed(tr.padded_step_records(steps, n_step, per_item, num_actions))
  items = _append_records(writer, table, records, tr.window_length(n_step, per_item),
                          chunk_length, 0, stop, while_waiting)
  _end_episode(writer, stop, while_waiting)
  if records.error is not None:
    records.error.items_written = items
    raise records.error
  return items


class EpisodeAdder:
  """Acme's adder seam for the fine-tuning actors (`agents.actors.Adder`): writes each step into
  `game`'s table as it comes, in the record format of the offline inserters
  (`transitions.RecordStream`), so the learner's `stratified_batches` samples both alike. A
  transition is an item once its n-step window is complete, and reaches the server with its
  chunk (`data.reverb_chunk_length` records, sent with the last of them), so the learner can
  sample it n to n + chunk - 1 steps after it happened, not only after its episode ends.

  `address()` is asked for the server's address when a writer is made (the first write, and
  the next episode's first after a write error or a stop). A server back at another address is
  not followed here (the writer retries the old one); in a Ray program the driver restarts the
  actor that owns the adder (docs/reliability.md). A server killed and back at its address
  (the replay node's restart) costs only what it held: the writer's own stream reconnects and
  sends the records its pending items need again, and the episode goes on
  (`tests/test_actors.py`). A write that fails with an error instead drops the rest of the
  episode (counted in `lost_episodes`; its items written before stay), and the next episode
  makes a new writer.
  `stop` ends a write held back by a paced table, and the rest of that episode is dropped too;
  `while_waiting()` runs every 0.5 s of such a wait (an actor refreshes its params there). An
  episode left unfinished keeps the items of its complete windows when the next one starts
  (`add_first`); `close` in the middle of an episode drops its rest and what is
  still in flight, and counts it in `lost_episodes`; `close` is final (a step written after it,
  by a loop that outlived its stop, is ignored). `items` counts the items of the steps whose
  write completed, those in flight included (a stop or a lost server can lose some of them)."""

  def __init__(self, address: Callable[[], str], cfg: ExperimentConfig, game: str,
               stop: Optional[threading.Event] = None, name: str = 'adder',
               while_waiting: Optional[Callable[[], None]] = None):
    _check_games([game], cfg)
    self._address, self._table = address, table_name(game)
    self._stop, self._name = stop, name
    self.while_waiting = while_waiting
    # The writer's sizes, read once (the config is frozen): `_append` runs every env step.
    self._n_step, self._per_item = cfg.agent.n_step, cfg.data.transitions_per_item
    self._chunk_length = cfg.data.reverb_chunk_length
    self._width = tr.window_length(self._n_step, self._per_item)
    self._writer = None
    self._closed = False
    self._stream: Optional[tr.RecordStream] = None  # None: no episode, or the rest dropped
    self._observation = None
    self.items = 0
    self.lost_episodes = 0

  def add_first(self, timestep) -> None:
    """Starts an episode; an unfinished one before it ends where it stopped."""
    if self._stream is not None and self._stream.num_steps:
      self._guarded(self._end_trajectory)
    self._stream = tr.RecordStream(self._n_step, self._per_item)
    self._observation = timestep.observation

  def add(self, action: int, next_timestep) -> None:
    """RLDS steps: step i holds observation i, the action taken there and the reward that
    followed; the last step holds only the final observation (RLDS `is_terminal` when the
    environment's discount is 0, not when the episode was truncated)."""
    if self._observation is None:
      raise RuntimeError('EpisodeAdder.add before add_first')
    self._write(dict(observation=self._observation[..., -1], action=int(action),
                     reward=float(next_timestep.reward), is_last=False, is_terminal=False))
    self._observation = next_timestep.observation
    if next_timestep.last():
      self._write(dict(observation=self._observation[..., -1], action=0, reward=0.0,
                       is_last=True, is_terminal=bool(next_timestep.discount == 0.0)))
      self._observation = None

  def _cut(self) -> None:
    """Closes the writer: the next episode goes through a new client and writer (after a write
    error, a stop or `close`); the rest of an episode in progress is dropped (it cannot go on in
    a new trajectory: its windows need the records before)."""
    if self._stream is not None and self._stream.num_steps:
      self.lost_episodes += 1
    self._stream = None
    if self._writer is not None:
      try:
        self._writer.close()
      except Exception:  # noqa: BLE001 -- a writer of a dead server may fail to close
        pass
    self._writer = None

  def _write(self, step: dict) -> None:
    """Appends one step's records to the episode's trajectory and creates the items they end."""
    if self._stream is None or self._closed:  # the rest of a dropped episode; a closed adder
      return
    records = self._stream.push(step)
    last = self._stream.last_seen
    if last:
      records += self._stream.end()
    self._guarded(lambda: self._append(records, last))

  def _append(self, records: list, last: bool) -> None:
    if self._writer is None:
      if self._closed:
        return
      import reverb
      self._writer = make_writer(reverb.Client(self._address()), self._n_step,
                                 self._chunk_length, self._per_item)
    self.items = _append_records(self._writer, self._table, records, self._width,
                                 self._chunk_length, self.items, self._stop, self.while_waiting)
    if last:
      self._end_trajectory()

  def _end_trajectory(self) -> None:
    self._stream = None
    if self._writer is not None:
      _end_episode(self._writer, self._stop, self.while_waiting)

  def _guarded(self, write: Callable[[], None]) -> None:
    """Runs `write`; a stop request or a write error drops the rest of the episode."""
    import reverb
    try:
      write()
    except InsertStopped:
      self._drop()
    except (reverb.errors.ReverbError, RuntimeError) as e:
      # A write error (a server restarted at its address raises none: the writer reconnects by
      # itself): drop the rest of this episode, make a new writer for the next one.
      log.warning('%s: a write to the Reverb server failed (%s); the rest of the episode is '
                  'dropped', self._name, type(e).__name__)
      self._drop()

  def _drop(self) -> None:
    """The rest of the episode is dropped; the trajectory is cut where it was."""
    if self._closed:  # a write that failed on the writer `close` closed: counted there
      return
    if self._stream is None:  # (ended: its last items were lost in flight)
      self.lost_episodes += 1
    self._cut()

  def close(self) -> None:
    self._closed = True  # first: a write failing on the writer closed here is not counted again
    self._cut()


EpisodeSource = Callable[[str], Iterable[Iterable[Mapping[str, Any]]]]


def _full(info) -> bool:
  return info.current_size >= info.max_size


class InsertThrottle:
  """The offline throttle (`DataConfig.samples_per_insert`): holds an inserter back, never the
  learner.

  `wait(game)` runs before each episode of `game` is written. While any table of this inserter is
  below its max_size it returns at once: episodes go round-robin, one per game, so waiting on one
  game's full table would stall the others (a table below min_fill blocks every stratified batch:
  deadlock; a game of short episodes would crawl to its size). Once all are full, it waits until
  the learner has sampled `samples_per_insert` x (transitions inserted since the table filled)
  from `game`'s table, so each transition is sampled about that often before FIFO eviction and an
  inserter does not spend CPU (the learner's, on a small machine) re-inserting data nobody
  samples. The learner's samplers are never blocked (the tables' rate limiter is MinSize only).
  A server that does not answer (restarting) lets the episode through: the writer reconnects.

  Resident data: a game whose selection holds at most half its table's max_size transitions
  (`resident`, e.g. the demo's and the CPU benchmarks' generated data) is not streamed again once
  its table is full: the table then holds every transition (each ~max_size / epoch times: the
  last whole epochs plus part of one), and re-inserting copies would only spend CPU.
  """

  def __init__(self, address: str, games: Sequence[str], samples_per_insert: float,
               stop: Optional[threading.Event] = None, poll_s: float = 0.2):
    import reverb
    if samples_per_insert <= 0:
      raise ValueError(f'data.samples_per_insert must be > 0, got {samples_per_insert}')
    self._client = reverb.Client(address)
    self._tables = [table_name(g) for g in games]
    self._samples_per_insert = samples_per_insert
    self._stop = stop or threading.Event()
    self.poll_s = poll_s
    self.throttled_s = 0.0  # total time spent waiting
    # Games whose whole selection fits twice in its table (`run_inserter` learns it at the end of
    # the first epoch): once the table is full it holds every transition, so nothing more is
    # inserted until the table is below its max_size again (a restarted server).
    self.resident: set[str] = set()

  def _server_info(self) -> Optional[dict]:
    """Table name -> TableInfo, or None while the server does not answer (restarting: the writer
    copes)."""
    try:
      return self._client.server_info(timeout=10)
    except Exception:  # noqa: BLE001 -- server restarting
      return None

  def end_of_epoch(self, game: str, items: int, max_size: int) -> None:
    """`run_inserter` finished an epoch of `game` of `items` transitions: resident if it fits
    twice in the table."""
    if 0 < 2 * items <= max_size and game not in self.resident:
      self.resident.add(game)
      log.info('%s: %d transitions per epoch fit its table of %d: not streamed again once the '
               'table is full', game, items, max_size)

  def idle(self) -> set[str]:
    """The resident games whose table is full: nothing of theirs needs inserting."""
    infos = self._server_info() if self.resident else None
    if infos is None:
      return set()
    return {g for g in self.resident if table_name(g) in infos and _full(infos[table_name(g)])}

  def must_wait(self, game: str) -> bool:
    infos = self._server_info()
    if infos is None:
      return False
    if any(t in infos and not _full(infos[t]) for t in self._tables):
      return False
    info = infos.get(table_name(game))
    if info is None:
      return False
    stats = info.rate_limiter_info
    inserted_since_full = stats.insert_stats.completed - info.max_size
    return stats.sample_stats.completed < self._samples_per_insert * inserted_since_full

  def wait(self, game: str) -> None:
    while not self._stop.is_set() and self.must_wait(game):
      started = time.monotonic()
      self._stop.wait(self.poll_s)
      self.throttled_s += time.monotonic() - started


def rlds_episode_source(cfg: ExperimentConfig, *, repeat: bool = True, seed: int = 0,
                        **reader_kwargs) -> EpisodeSource:
  """game -> stream of episodes (each a stream of step dicts) from `rlds_reader`.

  With `repeat` the reader streams the selection epoch after epoch (reshuffling its file order).
  Without it a call streams one epoch; each later call for the same game (`run_inserter` repeating
  the epochs itself, which lets it see where an epoch ends) reads its files in a new order: the
  same episodes (a `uniform:P` selection's are `cfg.data.selection_seed`'s), reordered.
  """
  calls: dict[str, int] = {}

  def source(game: str):
    from scaled_ql.datasets import rlds_reader
    epoch = calls[game] = calls.get(game, -1) + 1
    dataset = rlds_reader.episodes_from_config(cfg.data, game, repeat=repeat, seed=seed + epoch,
                                               **reader_kwargs)
    for episode in dataset:
      yield LabelledEpisode(_episode_steps(episode['steps']), ', '.join(
          f'{key} {int(episode[key])}' for key in ('checkpoint_id', 'episode_id')
          if key in episode) or 'an episode')
  return source


class LabelledEpisode:
  """An episode's steps and which one it is (`label`: its checkpoint_id and episode_id), so
  that the inserter can name an episode it cannot write."""

  def __init__(self, steps: Iterable[dict], label: str):
    self._steps, self.label = steps, label

  def __iter__(self) -> Iterator[dict]:
    return iter(self._steps)


def _episode_steps(steps_dataset, block: int = 256) -> Iterator[dict]:
  for batch in steps_dataset.batch(block).as_numpy_iterator():
    yield from tr.split_steps(batch)


def run_inserter(server_address: str, cfg: ExperimentConfig, games: Sequence[str],
                 source: EpisodeSource, *, max_episodes_per_game: Optional[int] = None,
                 repeat: bool = True, stop: Optional[threading.Event] = None,
                 reconnect_timeout_s: float = 600.0,
                 throttle: Optional[InsertThrottle] = None, stats: Any = None) -> int:
  """Streams episodes of `games` round-robin into their tables; returns items written.

  Each pass reads every game's episodes in turn (one episode per game per round). With
  `repeat` the data is streamed again when a game's episodes run out (an offline dataset
  streamed through shuffle buffers, epoch after epoch); `max_episodes_per_game` caps the total.
  Every episode first passes `throttle` (default: an `InsertThrottle` of
  `cfg.data.samples_per_insert` over `games`), so `learn` and `train` are throttled alike.

  A malformed episode (`write_episode`'s `MalformedEpisodeError`) is bad data, like an
  undecodable one: it is cut at its first malformed step (the whole transitions before it
  stay), warned about naming its game, data dir and episode the first time, and counted in
  `stats` (`rlds_reader.ReadStats`: `malformed_episodes`). With `cfg.data.strict` it raises
  instead, and so does a game whose first MALFORMED_FIRST_EPISODES episodes are all malformed
  (its data are not in this format).
  A game that would leave its table empty raises too: no episode, or none that made a
  transition (in an epoch, or before `max_episodes_per_game`).
  """
  import reverb
  from scaled_ql import games as games_lib
  from scaled_ql.datasets import rlds_reader
  _check_games(games, cfg)
  stats = stats if stats is not None else rlds_reader.ReadStats()
  stop = stop or threading.Event()
  n_step, chunk_length = cfg.agent.n_step, cfg.data.reverb_chunk_length
  per_item, (max_items, _) = cfg.data.transitions_per_item, table_items(cfg)
  wait_for_server(server_address, reconnect_timeout_s)
  if throttle is None:
    throttle = InsertThrottle(server_address, games, cfg.data.samples_per_insert, stop)
  client = reverb.Client(server_address)
  writer = make_writer(client, n_step, chunk_length, per_item)
  streams = {g: iter(source(g)) for g in games}
  written = {g: 0 for g in games}
  epoch_items = {g: 0 for g in games}  # items of the epoch being streamed
  epoch_lost = {g: 0 for g in games}  # its episodes lost to a reconnect (their items unknown)
  game_items = {g: 0 for g in games}  # items over the epochs (all of them: the return value)
  malformed = {g: 0 for g in games}  # episodes cut short at a malformed step, over the epochs
  first_malformed: dict[str, str] = {}  # game -> its first malformed episode and why
  source_name = (lambda game: f'game {game} in the data source (data_dir '
                 f'{cfg.data.data_dir!r}, selection {cfg.data.selection!r})')  # for errors

  def no_transitions(game: str) -> ValueError:
    bad, all_bad = malformed[game], malformed[game] == written[game]
    why = 'one step each'
    if bad:
      why = (f'{"all" if all_bad else bad} malformed (the first: {first_malformed[game]})'
             + ('' if all_bad else ', the others one step each'))
    return ValueError(f'no transitions of {source_name(game)}: its {written[game]} episodes '
                      f'hold none ({why})')

  failures = 0
  active = list(games)
  while active and not stop.is_set():
    # Resident games (see InsertThrottle) are skipped while their tables are full.
    idle = throttle.idle()
    if idle and all(g in idle for g in active):
      stop.wait(throttle.poll_s)
      continue
    for game in list(active):
      if stop.is_set():
        break
      if game in idle:
        continue
      # Its table would never fill, and every sampler would block: a game that leaves with no
      # episode, or with episodes that made no transition (one step each, or malformed), or
      # (streamed again) an epoch that made none.
      if max_episodes_per_game is not None and written[game] >= max_episodes_per_game:
        if game_items[game] == 0 and epoch_lost[game] == 0:
          raise no_transitions(game)
        active.remove(game)
        continue
      try:
        episode = next(streams[game])
      except StopIteration:
        if written[game] == 0 and epoch_lost[game] == 0:
          raise ValueError(f'no episodes of {source_name(game)}') from None
        if epoch_items[game] == 0 and epoch_lost[game] == 0:
          raise no_transitions(game) from None
        if not repeat:
          active.remove(game)
          continue
        if epoch_lost[game] == 0:  # (an epoch with a lost episode is no measure of its size)
          throttle.end_of_epoch(game, epoch_items[game], max_items)
        epoch_items[game] = epoch_lost[game] = 0
        streams[game] = iter(source(game))
        episode = next(streams[game], None)
        if episode is None:  # read before, gone now (files removed or unreadable)
          raise ValueError(f'no episodes of {source_name(game)} when streamed again') from None
      throttle.wait(game)
      if stop.is_set():
        break
      try:
        items = write_episode(writer, table_name(game), episode, n_step, chunk_length,
                              per_item=per_item, num_actions=games_lib.num_actions(game))
      except tr.MalformedEpisodeError as e:  # bad data: name it, count it, keep what came before
        label = getattr(episode, 'label', None)
        message = f'{source_name(game)}, {label or "an episode"}: {e}'
        if cfg.data.strict:
          raise ValueError(f'{message} (data.strict=true)') from e
        items = e.items_written
        malformed[game] += 1
        first_malformed.setdefault(game, f'{label or "an episode"}: {e}')
        if malformed[game] == written[game] + 1 >= MALFORMED_FIRST_EPISODES:
          raise ValueError(f'{source_name(game)}: its first {malformed[game]} episodes are all '
                           f'malformed, so its data are not in the format the inserter reads '
                           f'(the first: {first_malformed[game]})') from e
        # A labelled episode counts once over the epochs; one without a label each time.
        if stats.add_malformed(game, label or f'unlabelled #{malformed[game]}'):
          log.warning('cutting a malformed episode short at its fault (%d items kept): %s',
                      items, message)
      except (ValueError, TypeError, KeyError) as e:  # a step it cannot read: say which
        label = getattr(episode, 'label', 'an episode')
        raise ValueError(f'{source_name(game)}, {label}: {type(e).__name__}: {e}') from e
      except (reverb.errors.ReverbError, RuntimeError) as e:
        # The server went away (gRPC UNAVAILABLE surfaces as RuntimeError): reconnect; this
        # episode's partial items are lost with the old server. An error that persists across
        # reconnections is not a lost server: raise it.
        failures += 1
        epoch_lost[game] += 1
        if failures > 3:
          raise
        log.warning('inserter lost %s (%s); reconnecting', server_address, e)
        try:
          writer.close()  # its stream thread would otherwise live on with the process
        except Exception:  # noqa: BLE001 -- a writer of a dead server may fail to close
          pass
        wait_for_server(server_address, reconnect_timeout_s)
        client = reverb.Client(server_address)
        writer = make_writer(client, n_step, chunk_length, per_item)
        continue
      epoch_items[game] += items
      game_items[game] += items
      failures = 0
      written[game] += 1
  writer.close()
  return sum(game_items.values())


def start_inserter_processes(server_address: str, cfg: ExperimentConfig,
                             games: Optional[Sequence[str]] = None,
                             max_episodes_per_game: Optional[int] = None,
                             repeat: bool = True) -> list[subprocess.Popen]:
  """`cfg.data.num_inserters` subprocesses; worker i streams games[i::num_inserters]."""
  games = tuple(games or cfg.games)
  _check_games(games, cfg)
  workers = max(1, min(cfg.data.num_inserters, len(games)))
  procs = []
  for i in range(workers):
    args = ['insert', '--address', server_address, '--config_json', cfg.to_json(),
            '--games', ','.join(games[i::workers])]
    if max_episodes_per_game is not None:
      args += ['--max_episodes_per_game', str(max_episodes_per_game)]
    if not repeat:
      args += ['--no_repeat']
    args += ['--seed', str(cfg.train.seed * 1000 + i)]
    procs.append(subprocess.Popen(_python_module_cmd(*args)))
  return procs


def stop_processes(procs: Sequence[subprocess.Popen], timeout_s: float = 10.0) -> None:
  for p in procs:
    if p.poll() is None:
      p.terminate()
  for p in procs:
    try:
      p.wait(timeout_s)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


# --------------------------------------------------------------------------------------- sampling

def table_sizes(server_address: str, games: Sequence[str], timeout_s: int = 10,
                per_item: int = 1) -> dict:
  """game -> transitions its table holds: items x `per_item` (data.transitions_per_item; an
  episode's last item may repeat a transition, so with per_item > 1 this is an upper bound)."""
  import reverb
  info = reverb.Client(server_address).server_info(timeout=timeout_s)
  return {g: info[table_name(g)].current_size * per_item for g in games}


def samples_served(server_address: str, games: Sequence[str], timeout_s: int = 10) -> dict:
  """game -> number of samples its table has served (rate limiter stats)."""
  import reverb
  info = reverb.Client(server_address).server_info(timeout=timeout_s)
  return {g: info[table_name(g)].rate_limiter_info.sample_stats.completed for g in games}


def stratified_dataset(server_address: str, games: Sequence[str], cfg: ExperimentConfig,
                       seed: int = 0):
  """tf.data of item batches: ({'record': uint8 [D, I, W, RECORD_BYTES]}, game_id [D, I]).

  D = games_per_batch x data.batches_per_fetch draws of a game, uniform with replacement (the
  caller cuts them into batches of games_per_batch draws); each draw is I =
  transitions_per_game / transitions_per_item consecutive samples of that game's table
  (Appendix B.3), each an item of W = n + 3 + transitions_per_item records. Per-sample work
  stays in Reverb's sampler; tf.data only batches and interleaves (no function runs per sample or
  per draw) and the caller merges [D, I] into the batch dimension with a free reshape.
  """
  import reverb
  import tensorflow as tf
  _check_games(games, cfg)
  agent = cfg.agent
  per_item = check_transitions_per_item(cfg)
  specs = _record_specs(agent.n_step, per_item)
  per_game = agent.transitions_per_game // per_item  # items per game draw
  fetch = cfg.data.batches_per_fetch
  # In-flight samples per table: about two fetches' worth of this game's expected share.
  in_flight = max(2 * per_game,
                  int(np.ceil(2 * fetch * agent.batch_size / per_item / len(games))))
  # No tf.data function runs per sample or per game draw: each call of a mapped function is a
  # graph run handed to TF's inter-op threads and back, and per draw those hand-offs were the
  # sampler's largest CPU cost (perf, docs/history/performance_log.md "tf.data without per-draw
  # functions").
  # The game id rides along by `zip`, the draws come 4096 at a time, and the one map left runs
  # once per batch.
  no_autograph = tf.autograph.experimental.do_not_convert  # plain tensor code; no warnings
  datasets = []
  for game in games:
    ds = reverb.TrajectoryDataset(
        server_address=server_address, table=table_name(game),
        dtypes={k: s.dtype for k, s in specs.items()},
        shapes={k: s.shape for k, s in specs.items()},
        max_in_flight_samples_per_worker=in_flight, num_workers_per_iterator=1)
    game_id = tf.fill([per_game], tf.constant(cfg.games.index(game), tf.int32))
    ids = tf.data.Dataset.from_tensors(game_id).repeat()
    datasets.append(tf.data.Dataset.zip((ds.batch(per_game), ids)))

  @no_autograph
  def to_game_index(x):
    return tf.cast(tf.math.floormod(x, len(games)), tf.int64)

  choice = tf.data.Dataset.random(seed=seed).batch(4096).map(to_game_index).unbatch()
  ds = tf.data.Dataset.choose_from_datasets(datasets, choice)
  ds = ds.batch(agent.games_per_batch * fetch).map(
      no_autograph(lambda samples, game_id: (samples.data, game_id)))
  # Nothing here has a tunable parallelism or buffer (the prefetch below is sized): tf.data's
  # autotuning thread would only cost CPU (-4% CPU per transition without it, same doc section).
  options = tf.data.Options()
  options.autotune.enabled = False
  ds = ds.with_options(options)
  return ds.prefetch(max(1, cfg.data.prefetch_batches))


def _is_connection_error(e: BaseException) -> bool:
  import tensorflow as tf
  return isinstance(e, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                        tf.errors.InternalError, tf.errors.CancelledError,
                        tf.errors.AbortedError))


class StratifiedBatches:
  """Iterator[FrameWindows] over the tables of `games`, prefetched in a background thread.

  Each batch is a `FrameWindows`: the learner stacks observation and next observation from the
  window frames on its device (`Learner.step`); `.to_transition()` does it anywhere.

  Call `close()` (or use as a context manager) to stop the thread.
  """

  def __init__(self, server_address: str, games: Sequence[str], cfg: ExperimentConfig,
               seed: int = 0, reconnect_timeout_s: float = 600.0):
    _check_games(games, cfg)
    self._address = server_address
    self._games = tuple(games)
    self._cfg = cfg
    self._seed = seed
    self._reconnect_timeout_s = reconnect_timeout_s
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, cfg.data.prefetch_batches))
    self._stop = threading.Event()
    self._end_reason: Optional[str] = None  # `close(reason=...)`: carried by the StopIteration
    self.reconnects = 0
    self._waited_s = 0.0  # see `waited_s`
    self._waiting_since: Optional[float] = None
    # Finish importing reverb/TensorFlow here, not first in the sampler thread: an import racing
    # the main thread's left `reverb.TrajectoryDataset` a half-loaded 'LazyModule' (seen in a
    # fault test: "TypeError: 'LazyModule' object is not callable" at the learner's start).
    import reverb
    import tensorflow as tf
    _ = (reverb.TrajectoryDataset, tf.data.Dataset)  # attribute reads: force the lazy loads
    self._thread = threading.Thread(target=self._run, daemon=True, name='stratified_batches')
    self._thread.start()

  def _windows(self) -> Iterator:
    attempt = 0
    while not self._stop.is_set():
      # A fresh seed per (re)connection keeps game draws independent after a reconnect.
      dataset = stratified_dataset(self._address, self._games, self._cfg,
                                   seed=self._seed + 1000 * attempt)
      try:
        for item in dataset.as_numpy_iterator():
          yield item
      except Exception as e:  # noqa: BLE001 -- only connection errors are retried
        if not _is_connection_error(e):
          raise
        log.warning('stratified_batches lost %s (%s); reconnecting', self._address,
                    type(e).__name__)
        wait_for_server(self._address, self._reconnect_timeout_s)
        self.reconnects += 1
        attempt += 1
        continue
      return

  def _run(self) -> None:
    agent = self._cfg.agent
    try:
      for data, game_id in self._windows():
        merge = lambda x: x.reshape((-1,) + x.shape[2:])  # [D, I, ...] -> [D*I, ...], a view
        windows = tr.unpack_records(merge(data[RECORD_COLUMN]))
        fetched = tr.windows_to_frame_windows(windows, merge(game_id), discount=agent.discount,
                                              reward_clip=agent.reward_clip,
                                              per_item=self._cfg.data.transitions_per_item)
        for batch in fetched.split(self._cfg.data.batches_per_fetch):
          if not self._put(batch):
            return
    except BaseException as e:  # surfaced to the consumer by __next__
      self._put(e)
      return
    self._put(StopIteration())

  def _put(self, item) -> bool:
    """Queues `item`, waiting while the queue is full; False if the iterator was closed first."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self) -> 'StratifiedBatches':
    return self

  @property
  def waited_s(self) -> float:
    """Time the consumer waited for a batch (tables below min fill, a paced table), the wait in
    progress included; ~0 while batches are ready."""
    since = self._waiting_since
    return self._waited_s + (time.monotonic() - since if since is not None else 0.0)

  def __next__(self) -> FrameWindows:
    self._waiting_since = time.monotonic()
    try:
      while True:
        try:
          item = self._queue.get(timeout=0.1)
          break
        except queue.Empty:
          if self._stop.is_set():  # closed (with the closer's reason, if it gave one)
            reason = () if self._end_reason is None else (self._end_reason,)
            raise StopIteration(*reason) from None
    finally:
      self._waited_s += time.monotonic() - self._waiting_since
      self._waiting_since = None
    if isinstance(item, BaseException):
      self._put(item)  # later calls see it too
      raise item
    return item

  def close(self, timeout_s: float = 10.0, reason: Optional[str] = None) -> None:
    """Stops the prefetch thread (waiting up to `timeout_s` for it); a consumer waiting in
    `next()` gets StopIteration within 0.1 s, `StopIteration(reason)` when a reason is given
    (why the data ended, for the consumer to report: `learn`'s server died)."""
    if reason is not None and not self._stop.is_set():
      self._end_reason = reason
    self._stop.set()
    self._thread.join(timeout=timeout_s)

  def __enter__(self) -> 'StratifiedBatches':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def stratified_batches(server_address: str, games: Sequence[str], cfg: ExperimentConfig,
                       seed: int = 0) -> StratifiedBatches:
  """The learner's Iterator[FrameWindows]: stratified multi-game batches (Appendix B.3)."""
  return StratifiedBatches(server_address, games, cfg, seed)


# ------------------------------------------------------------------------------- subprocess entry

def _exit_with_parent(poll_s: float = 1.0) -> None:
  """Ends this subprocess once the process that started it is gone (killed, crashed), so that a
  dead learner/test never leaves servers or inserters behind."""
  parent = os.getppid()

  def watch():
    while True:
      time.sleep(poll_s)
      if os.getppid() != parent:
        os._exit(0)

  threading.Thread(target=watch, daemon=True, name='exit_with_parent').start()


def _main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m scaled_ql.datasets.reverb_tables')
  sub = parser.add_subparsers(dest='cmd', required=True)
  p = sub.add_parser('serve')
  p.add_argument('--port', type=int, required=True)
  p.add_argument('--config_json', required=True)
  p.add_argument('--pacing_json', default=None, help='TablePacing fields (online fine-tuning)')
  p = sub.add_parser('insert')
  p.add_argument('--address', required=True)
  p.add_argument('--config_json', required=True)
  p.add_argument('--games', required=True, help='comma-separated')
  p.add_argument('--max_episodes_per_game', type=int, default=None)
  p.add_argument('--no_repeat', action='store_true')
  p.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  cfg = ExperimentConfig.from_dict(json.loads(args.config_json))
  _exit_with_parent()
  if args.cmd == 'serve':
    pacing = TablePacing(**json.loads(args.pacing_json)) if args.pacing_json else None
    serve(cfg, args.port, pacing)
    return 0
  # SIGTERM ends an inserter process at once (default action): nothing of it needs saving.
  # One epoch per source call: run_inserter repeats the epochs itself (and sees resident data).
  source = rlds_episode_source(cfg, repeat=False, seed=args.seed)
  items = run_inserter(args.address, cfg, args.games.split(','), source,
                       max_episodes_per_game=args.max_episodes_per_game,
                       repeat=not args.no_repeat)
  log.info('inserter done: %d items', items)
  return 0


if __name__ == '__main__':
  sys.exit(_main())

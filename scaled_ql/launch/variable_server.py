"""A sharded variable server on Ray (Acme's VariableSource / VariableClient, without Launchpad).

The learner publishes its param tree with a version (its step) to S shard actors; every shard holds
a part of the leaves, chosen by greedy bin packing by size (`split_by_size`) so that the bytes each
shard serves are balanced. A `VariableClient` fetches all shards concurrently and reassembles the
tree. Consistency: each shard keeps the last `history` versions it received, and the learner's
publishes reach every shard in order (Ray runs one caller's calls to one actor in submission
order), so a client that sees different newest versions on two shards asks the shards that are
ahead for the oldest of them: a client never assembles leaves of two versions.

Lineages: each publisher (one per learner start) publishes under a new lineage, the learner's
start count in its workdir (or one above any lineage the shards hold, if higher: shards that
restarted empty still rank it above what clients hold), and a shard drops every version of an
older lineage when the first publish of a newer one reaches it. Params are ordered by (lineage,
version). So a learner restarted from the checkpoint of step C, after it had published V > C, is
served at once as C, C+1, ...: its clients never keep the lost run's V as the newest params until
the restarted learner passes V again (they would then be evaluated and labelled as if trained
for V steps).

    server = VariableServer.create(num_shards=4)
    publisher = server.publisher()
    publisher.publish(params, version=step)        # never blocks on shards or clients
    client = VariableClient(server, update_period=10)
    client.update()                                # every 10th call starts a fetch; never blocks
    params, version = client.params, client.version

Pure parts (`split_by_size`, `ShardLayout`) are plain functions tested without Ray.

Nothing here unpickles bytes: the layout travels as JSON and the leaves as numpy arrays in Ray's
object store. (Ray's own transport deserializes with pickle between the cluster's processes; who
may talk to the cluster at all is Ray's token authentication and the firewall, README "Security".)
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import numpy as np
import ray

# A shard keeps this many newest versions so a client that raced a publish can still assemble the
# version every shard has.
DEFAULT_HISTORY = 3
# How long a new publisher waits for the shards' lineages (a shard restarting or not yet placed by
# Ray would otherwise hold up the learner's start).
LINEAGE_TIMEOUT_S = 30.0


def split_by_size(sizes: Sequence[int], num_shards: int) -> list[list[int]]:
  """Greedy bin packing: leaf indices per shard, largest leaf first into the lightest shard.

  Deterministic (ties broken by leaf index then shard index). Every shard's list is sorted.
  The heaviest shard holds at most (total / S + largest leaf) bytes.
  """
  if num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}')
  loads = [0] * num_shards
  shards: list[list[int]] = [[] for _ in range(num_shards)]
  for index in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
    target = min(range(num_shards), key=lambda s: (loads[s], s))
    shards[target].append(index)
    loads[target] += int(sizes[index])
  return [sorted(s) for s in shards]


def _flatten(tree: Any, prefix: tuple = ()) -> tuple[list[tuple[str, ...]], list[Any]]:
  """(paths, leaves) of a nested mapping with string keys (Haiku params), keys sorted at every
  level (the order of `jax.tree_util.tree_flatten` for dicts)."""
  if isinstance(tree, Mapping):
    paths, leaves = [], []
    for key in sorted(tree):
      if not isinstance(key, str):
        raise TypeError(f'param tree keys must be strings, got {key!r} at {"/".join(prefix)}')
      p, l = _flatten(tree[key], prefix + (key,))
      paths += p
      leaves += l
    return paths, leaves
  if isinstance(tree, (list, tuple)) or tree is None:
    raise TypeError(f'the variable server ships nested dicts of arrays (Haiku params); found a '
                    f'{type(tree).__name__} at {"/".join(prefix) or "the root"}')
  return [prefix], [tree]


@dataclasses.dataclass(frozen=True)
class ShardLayout:
  """How a param tree is split: the path (keys) of every leaf and the leaf indices each shard
  holds. Travels between processes as JSON (`to_json`/`from_json`), never pickled: a shard's
  bytes cannot run code in the client that reads them."""
  paths: tuple[tuple[str, ...], ...]
  shard_leaves: tuple[tuple[int, ...], ...]

  @classmethod
  def for_tree(cls, tree: Any, num_shards: int) -> 'ShardLayout':
    paths, leaves = _flatten(tree)
    sizes = [np.asarray(leaf).nbytes for leaf in leaves]
    return cls(tuple(paths), tuple(tuple(s) for s in split_by_size(sizes, num_shards)))

  @property
  def num_shards(self) -> int:
    return len(self.shard_leaves)

  def to_json(self) -> bytes:
    return json.dumps(dict(paths=[list(p) for p in self.paths],
                           shard_leaves=[list(s) for s in self.shard_leaves])).encode()

  @classmethod
  def from_json(cls, data: bytes) -> 'ShardLayout':
    d = json.loads(data)
    return cls(tuple(tuple(str(k) for k in p) for p in d['paths']),
               tuple(tuple(int(i) for i in s) for s in d['shard_leaves']))

  def split(self, tree: Any) -> list[list[np.ndarray]]:
    """The host (numpy) leaves of `tree` for every shard."""
    paths, leaves = _flatten(tree)
    if tuple(paths) != self.paths:
      changed = sorted(set(paths) ^ set(self.paths))[:3]
      raise ValueError(f'param tree structure changed (e.g. {changed}) vs the layout\'s '
                       f'{len(self.paths)} leaves')
    return [[np.asarray(leaves[i]) for i in indices] for indices in self.shard_leaves]

  def join(self, shard_values: Sequence[Sequence[np.ndarray]]) -> dict:
    """Reassembles the nested dict from every shard's leaves (the inverse of `split`)."""
    if len(shard_values) != self.num_shards:
      raise ValueError(f'expected {self.num_shards} shards, got {len(shard_values)}')
    tree: dict = {}
    for indices, values in zip(self.shard_leaves, shard_values):
      if len(indices) != len(values):
        raise ValueError(f'shard holds {len(values)} leaves, layout says {len(indices)}')
      for i, value in zip(indices, values):
        node = tree
        for key in self.paths[i][:-1]:
          node = node.setdefault(key, {})
        node[self.paths[i][-1]] = value
    return tree


class VariableShard:
  """One shard: the newest `history` versions of its part of the leaves (a Ray actor class), all
  of one lineage (the newest publisher's)."""

  def __init__(self, history: int = DEFAULT_HISTORY):
    if history < 1:
      raise ValueError(f'history must be >= 1, got {history}')
    self._history = history
    self._versions: dict[int, list[np.ndarray]] = {}
    self._layout: Optional[bytes] = None
    self._lineage = -1

  def set(self, version: int, layout: bytes, leaves: list[np.ndarray], lineage: int = 0) -> int:
    """Stores `leaves` (this shard's part) of `version`; `layout` is the ShardLayout as JSON
    bytes (`ShardLayout.to_json`), passed on to clients as it is. A newer `lineage` (a restarted
    learner's publisher) replaces every version held; an older one's publish is dropped."""
    if lineage > self._lineage:
      self._lineage, self._versions = int(lineage), {}
    elif lineage < self._lineage or (self._versions and version <= max(self._versions)):
      return self.latest_version()  # a lost learner's late publish, or a stale/repeated one
    self._layout = layout
    self._versions[int(version)] = leaves
    for old in sorted(self._versions)[:-self._history]:
      del self._versions[old]
    return int(version)

  def latest_version(self) -> int:
    """The newest version held, -1 when none."""
    return max(self._versions) if self._versions else -1

  def lineage(self) -> int:
    """The lineage of the versions held (-1 before any publish)."""
    return self._lineage

  def get(self, version: Optional[int] = None, newer_than: Sequence[int] = (-1, -1),
          lineage: Optional[int] = None):
    """(lineage, version, layout, leaves) of `version` (newest if None); leaves None when
    (lineage, version) is not after `newer_than` (a (lineage, version) pair); version -1 when
    nothing is held, or not that version, or (with `lineage`) not of that lineage."""
    if not self._versions or (lineage is not None and lineage != self._lineage):
      return self._lineage, -1, None, None
    if version is None:
      version = max(self._versions)
    if version not in self._versions:
      return self._lineage, -1, None, None
    if (self._lineage, version) <= tuple(newer_than):
      return self._lineage, version, None, None
    return self._lineage, version, self._layout, self._versions[version]


class VariableServer:
  """The shard actors, by name. Picklable: nodes receive it as an argument and look the shards up
  by name (`ray.get_actor`), so no actor handle travels in a constructor's arguments (Ray cannot
  always restart an actor whose arguments hold handles, ray-project/ray#53727)."""

  def __init__(self, names: Sequence[str], history: int = DEFAULT_HISTORY):
    self.names = list(names)
    self.history = history  # versions each shard keeps
    self._handles: Optional[list] = None

  def __getstate__(self):
    return {'names': self.names, 'history': self.history}

  def __setstate__(self, state):
    self.names, self.history, self._handles = state['names'], state['history'], None

  @property
  def shards(self) -> list:
    if self._handles is None:
      self._handles = [ray.get_actor(name) for name in self.names]
    return self._handles

  @classmethod
  def create(cls, num_shards: int, history: int = DEFAULT_HISTORY,
             name_prefix: Optional[str] = None, max_restarts: int = -1) -> 'VariableServer':
    if num_shards < 1:
      raise ValueError(f'TrainConfig.variable_server_shards must be >= 1, got {num_shards}')
    prefix = name_prefix if name_prefix is not None else f'vs_{uuid.uuid4().hex[:8]}_'
    actor = ray.remote(num_cpus=0, max_restarts=max_restarts, max_task_retries=-1)(VariableShard)
    names = [f'{prefix}variable_shard_{i}' for i in range(num_shards)]
    server = cls(names, history)
    server._handles = [actor.options(name=name).remote(history) for name in names]
    ray.get([s.latest_version.remote() for s in server.shards])  # up (they start in < 1 s)
    return server

  @property
  def num_shards(self) -> int:
    return len(self.names)

  def publisher(self, max_in_flight: int = 1, lineage: int = 0) -> 'VariablePublisher':
    """A publisher of a new lineage: `lineage` (the learner's start in its workdir), or one
    above the shards' newest if that is higher."""
    if not 1 <= max_in_flight < self.history:
      # A shard that lags by max_in_flight versions must still hold the version the others
      # hold, or clients could not assemble any version until it caught up.
      raise ValueError(f'max_in_flight must be between 1 and history - 1 = {self.history - 1} '
                       f'(the versions a shard keeps), got {max_in_flight}')
    # A new lineage: the shards drop what an earlier publisher (a lost learner) published.
    try:
      held = max(ray.get([s.lineage.remote() for s in self.shards], timeout=LINEAGE_TIMEOUT_S))
    except ray.exceptions.GetTimeoutError:  # a shard restarting or not placed: never wait on it
      held = -1
      warnings.warn(f'variable shards did not say their lineage within {LINEAGE_TIMEOUT_S:.0f}s;'
                    f' publishing under lineage {lineage} (the learner start count)')
    return VariablePublisher(self, max_in_flight, max(lineage, held + 1))

  def client(self, update_period: int = 1) -> 'VariableClient':
    return VariableClient(self, update_period)

  def latest_versions(self) -> list[int]:
    return ray.get([s.latest_version.remote() for s in self.shards])

  def kill(self) -> None:
    for shard in self.shards:
      ray.kill(shard)


class VariablePublisher:
  """The learner's side: fire-and-forget publishes that never wait on shards or clients.

  At most `max_in_flight` publishes are outstanding PER SHARD; a publish asked for while any
  shard still has that many in flight is skipped on every shard (the next one carries newer params
  anyway), so a slow shard can never make the learner's memory or loop grow, and never falls more
  than `max_in_flight` versions behind the others (< the `history` every shard keeps, so clients
  always find a version that every shard holds).
  """

  def __init__(self, server: VariableServer, max_in_flight: int = 1, lineage: int = 0):
    self._server = server
    self._max_in_flight = max_in_flight
    self.lineage = lineage
    self._layout: Optional[bytes] = None
    self._in_flight: list[list] = [[] for _ in range(server.num_shards)]  # per shard
    self.published = 0
    self.skipped = 0
    self.last_version = -1

  def publish(self, params: Any, version: int) -> bool:
    """Sends `params` tagged `version`; returns False when skipped because shards lag behind."""
    if any(len(refs) >= self._max_in_flight for refs in self.in_flight()):
      self.skipped += 1
      return False
    if self._layout is None:
      self._layout = ShardLayout.for_tree(params, self._server.num_shards)
      self._layout_bytes = self._layout.to_json()
    parts = self._layout.split(params)
    for shard, leaves, refs in zip(self._server.shards, parts, self._in_flight):
      refs.append(shard.set.remote(int(version), self._layout_bytes, ray.put(leaves),
                                   self.lineage))
    self.published += 1
    self.last_version = int(version)
    return True

  def in_flight(self) -> list[list]:
    """Every shard's publishes not yet stored (refs), after dropping those that are done."""
    for i, refs in enumerate(self._in_flight):
      if refs:
        _, self._in_flight[i] = ray.wait(refs, num_returns=len(refs), timeout=0)
    return self._in_flight

  def flush(self, timeout: Optional[float] = None) -> None:
    """Waits for the publishes in flight (used only at shutdown and in tests)."""
    refs = [r for shard_refs in self._in_flight for r in shard_refs]
    if refs:
      ray.wait(refs, num_returns=len(refs), timeout=timeout)
    self._in_flight = [[] for _ in self._in_flight]


def _wait_for_version(client, min_version: int, timeout: float, poll_s: float) -> int:
  """Polls `client.update_and_wait` until it holds params of at least `min_version`."""
  deadline = time.monotonic() + timeout
  while True:
    client.update_and_wait(timeout=max(0.1, deadline - time.monotonic()))
    if client.version >= min_version:
      return client.version
    if time.monotonic() > deadline:
      raise TimeoutError(f'no params of version >= {min_version} after {timeout:.0f}s '
                         f'(held: {client.version})')
    time.sleep(poll_s)


class VariableClient:
  """Acme's VariableClient over a sharded server: holds params and the version they are.

  `update()` counts calls and starts a fetch on every `update_period`-th one, without blocking;
  later calls install the result once every shard answered. `update_and_wait()` fetches now.
  `params` is None and `version` -1 until the first fetch completed. `lineage` is the publisher's
  (a restarted learner's params come as a new lineage, whose `version` may be lower).
  """

  def __init__(self, server: VariableServer, update_period: int = 1):
    if update_period < 1:
      raise ValueError(f'update_period must be >= 1, got {update_period}')
    self._server = server
    self._update_period = update_period
    self._calls = 0
    self._pending: Optional[list] = None
    self._layout: Optional[ShardLayout] = None
    self._layout_bytes = b''
    self.params: Any = None
    self.version = -1
    self.lineage = -1
    self.fetches = 0

  def update(self) -> bool:
    """Non-blocking; returns True when newer params were installed by this call."""
    self._calls += 1
    if self._pending is not None:
      ready, _ = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
      if len(ready) < len(self._pending):
        return False
      return self._finish(ray.get(self._pending))
    if self._calls >= self._update_period:
      self._calls = 0
      self._pending = [s.get.remote(None, self._held()) for s in self._server.shards]
    return False

  def update_and_wait(self, timeout: Optional[float] = None) -> bool:
    """Blocks until the newest consistent params are installed; True when they changed."""
    changed = False
    if self._pending is not None:  # a fetch started by update(): install it, then ask again
      changed = self._finish(ray.get(self._pending, timeout=timeout))
    self._pending = [s.get.remote(None, self._held()) for s in self._server.shards]
    return self._finish(ray.get(self._pending, timeout=timeout)) or changed

  def wait_for_version(self, min_version: int = 0, timeout: float = 60.0,
                       poll_s: float = 0.2) -> int:
    """Blocks until params of at least `min_version` are held (raises TimeoutError)."""
    return _wait_for_version(self, min_version, timeout, poll_s)

  def _held(self) -> tuple[int, int]:
    return self.lineage, self.version

  def _finish(self, answers: list) -> bool:
    self._pending = None
    keys = [(g, v) for g, v, _, _ in answers]
    if any(v < 0 for _, v in keys) or min(keys) <= self._held():
      return False  # some shard has nothing newer than what we hold (or nothing at all)
    target = min(keys)
    # Shards that are ahead: ask them for `target`, which they still hold (history) unless
    # several publishes (or a new lineage) raced this fetch; then start over next time.
    for i, key in enumerate(keys):
      if key != target:
        answers[i] = ray.get(self._server.shards[i].get.remote(target[1], self._held(),
                                                                target[0]))
    if any((g, v) != target or leaves is None for g, v, _, leaves in answers):
      return False
    layout_bytes = answers[0][2]
    if layout_bytes != self._layout_bytes:
      self._layout, self._layout_bytes = ShardLayout.from_json(layout_bytes), layout_bytes
    layout = self._layout
    self.params = layout.join([leaves for _, _, _, leaves in answers])
    self.lineage, self.version = target
    self.fetches += 1
    return True


class LocalVariableServer:
  """The same seams in one process (an in-process program or a test without Ray): `publisher()`
  and `client(update_period)` behave as the sharded server's, lineages included, over one locked
  slot that holds the newest (lineage, version, params). Publishes never wait; clients copy
  nothing (host arrays are read-only to them)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._slot: tuple[int, int, Any] = (-1, -1, None)

  def publisher(self, max_in_flight: int = 1, lineage: int = 0) -> '_LocalPublisher':
    del max_in_flight  # nothing is ever in flight
    with self._lock:  # as the sharded server's
      return _LocalPublisher(self, max(lineage, self._slot[0] + 1))

  def client(self, update_period: int = 1) -> '_LocalClient':
    return _LocalClient(self, update_period)

  def latest_versions(self) -> list[int]:
    return [self._slot[1]]

  def _set(self, params: Any, version: int, lineage: int) -> None:
    with self._lock:
      if (lineage, version) > self._slot[:2]:  # as a shard: stale publishes are dropped
        self._slot = (int(lineage), int(version), params)

  def _get(self) -> tuple[int, int, Any]:
    with self._lock:
      return self._slot


class _LocalPublisher:

  def __init__(self, server: LocalVariableServer, lineage: int):
    self._server = server
    self.lineage = lineage
    self.published = 0
    self.skipped = 0
    self.last_version = -1

  def publish(self, params: Any, version: int) -> bool:
    self._server._set(params, version, self.lineage)  # pylint: disable=protected-access
    self.published += 1
    self.last_version = int(version)
    return True

  def flush(self, timeout: Optional[float] = None) -> None:
    del timeout


class _LocalClient:

  def __init__(self, server: LocalVariableServer, update_period: int = 1):
    if update_period < 1:
      raise ValueError(f'update_period must be >= 1, got {update_period}')
    self._server, self._update_period = server, update_period
    self._calls = 0
    self.params: Any = None
    self.version = -1
    self.lineage = -1
    self.fetches = 0

  def update(self) -> bool:
    self._calls += 1
    if self._calls < self._update_period:
      return False
    return self.update_and_wait()

  def update_and_wait(self, timeout: Optional[float] = None) -> bool:
    del timeout
    self._calls = 0
    lineage, version, params = self._server._get()  # pylint: disable=protected-access
    if version < 0 or (lineage, version) <= (self.lineage, self.version):
      return False
    self.params, self.lineage, self.version = params, lineage, version
    self.fetches += 1
    return True

  def wait_for_version(self, min_version: int = 0, timeout: float = 60.0,
                       poll_s: float = 0.05) -> int:
    return _wait_for_version(self, min_version, timeout, poll_s)

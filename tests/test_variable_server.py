"""Variable server: shard split/reassembly, version consistency, non-blocking client (real Ray)."""
from __future__ import annotations

import os
import pickle
import time
import uuid

import numpy as np
import pytest
import ray

from scaled_ql.launch import run
from scaled_ql.launch import variable_server as vs


def _tree(version: int, sizes=(1000, 10, 300, 5, 700, 64)):
  """A haiku-like nested param dict whose every value equals `version`."""
  return {f'layer_{i}': {'w': np.full((n,), version, np.float32),
                         'b': np.full((2,), version, np.float32)} for i, n in enumerate(sizes)}


def _versions_in(tree) -> set:
  import jax
  return {float(v) for leaf in jax.tree_util.tree_leaves(tree) for v in np.unique(leaf)}


@pytest.mark.parametrize('num_shards', [1, 2, 3, 5])
def test_split_by_size_is_a_balanced_partition(num_shards):
  sizes = [1000, 10, 300, 5, 700, 64, 64, 2]
  shards = vs.split_by_size(sizes, num_shards)
  assert len(shards) == num_shards
  assert sorted(i for s in shards for i in s) == list(range(len(sizes)))  # a partition
  loads = [sum(sizes[i] for i in s) for s in shards]
  assert max(loads) <= sum(sizes) / num_shards + max(sizes)
  if num_shards == 2:  # 1000+64+10 | 700+300+64+5+2
    assert shards == [[0, 1, 5], [2, 3, 4, 6, 7]] and loads == [1074, 1071]


def test_split_by_size_rejects_no_shards():
  with pytest.raises(ValueError, match='num_shards'):
    vs.split_by_size([1, 2], 0)


@pytest.mark.parametrize('num_shards', [1, 4])
def test_layout_split_join_roundtrip(num_shards):
  tree = _tree(3)
  tree['layer_2']['w'] = np.arange(300, dtype=np.float32)
  layout = vs.ShardLayout.for_tree(tree, num_shards)
  parts = layout.split(tree)
  assert len(parts) == num_shards
  back = layout.join(parts)
  assert set(back) == set(tree)
  for k in tree:
    for n in tree[k]:
      np.testing.assert_array_equal(back[k][n], tree[k][n])
  with pytest.raises(ValueError, match='structure'):
    layout.split({'other': np.zeros(3)})
  assert vs.ShardLayout.from_json(layout.to_json()) == layout
  with pytest.raises(TypeError, match='nested dicts'):
    vs.ShardLayout.for_tree({'a': [np.zeros(2)]}, 1)


_NODE_ENV = {'SCALED_QL_TEST_NODE_ENV': 'from start_local_ray'}


@pytest.fixture(scope='module')
def ray_session():
  assert 'SCALED_QL_TEST_NODE_ENV' not in os.environ
  run.start_local_ray(2, _NODE_ENV, log_to_driver=False)
  yield
  ray.shutdown()


def test_the_environment_ray_starts_with_is_undone_after(monkeypatch):
  """`run._environment` (Ray-free): a variable set before gets its value back, one that was
  not is removed, also when the block raises or a value cannot be set."""
  monkeypatch.setenv('SCALED_QL_TEST_BEFORE', 'caller')
  monkeypatch.delenv('SCALED_QL_TEST_ABSENT', raising=False)
  with pytest.raises(RuntimeError, match='inside'):
    with run._environment({'SCALED_QL_TEST_BEFORE': 'ray', 'SCALED_QL_TEST_ABSENT': 'ray'}):  # pylint: disable=protected-access
      assert os.environ['SCALED_QL_TEST_BEFORE'] == os.environ['SCALED_QL_TEST_ABSENT'] == 'ray'
      raise RuntimeError('inside')
  assert os.environ['SCALED_QL_TEST_BEFORE'] == 'caller'
  assert 'SCALED_QL_TEST_ABSENT' not in os.environ
  with pytest.raises(TypeError):
    with run._environment({'SCALED_QL_TEST_ABSENT': 'ray', 'SCALED_QL_TEST_BEFORE': 7}):  # pylint: disable=protected-access
      pass
  assert os.environ['SCALED_QL_TEST_BEFORE'] == 'caller'
  assert 'SCALED_QL_TEST_ABSENT' not in os.environ


def test_a_local_rays_nodes_get_the_environment_it_was_started_with(ray_session):
  """`start_local_ray`'s `env` reaches the nodes through the Ray processes it starts (not as a
  runtime_env, which starts each worker through a shim: ~0.55 s more per node), and this
  process's environment is as it was."""
  @ray.remote(num_cpus=0)
  class Probe:
    def env(self):
      return (os.environ.get('SCALED_QL_TEST_NODE_ENV'),
              dict(ray.get_runtime_context().runtime_env))

  probe = Probe.remote()
  value, runtime_env = ray.get(probe.env.remote(), timeout=120)
  assert value == 'from start_local_ray' and 'env_vars' not in runtime_env, runtime_env
  ray.kill(probe)
  assert 'SCALED_QL_TEST_NODE_ENV' not in os.environ


def test_publish_and_fetch_across_shards(ray_session):
  server = vs.VariableServer.create(num_shards=3)
  publisher = server.publisher()
  client = vs.VariableClient(server, update_period=1)
  assert client.update_and_wait() is False and client.version == -1 and client.params is None
  assert publisher.publish(_tree(7), version=7)
  publisher.flush()
  assert server.latest_versions() == [7, 7, 7]
  assert client.update_and_wait() is True
  assert client.version == 7 and _versions_in(client.params) == {7.0}
  assert set(client.params) == set(_tree(0))
  assert client.update_and_wait() is False  # nothing newer: no leaves are shipped again
  server.kill()


def test_client_never_mixes_versions(ray_session):
  """Shards deliberately at different versions: the client assembles the common one."""
  server = vs.VariableServer.create(num_shards=2)
  layout = vs.ShardLayout.for_tree(_tree(0), 2)
  blob = layout.to_json()
  for version in (1, 2):
    parts = layout.split(_tree(version))
    ray.get([s.set.remote(version, blob, p) for s, p in zip(server.shards, parts)])
  ray.get(server.shards[0].set.remote(3, blob, layout.split(_tree(3))[0]))  # shard 1 lags
  client = vs.VariableClient(server)
  assert client.update_and_wait()
  assert client.version == 2 and _versions_in(client.params) == {2.0}
  ray.get(server.shards[1].set.remote(3, blob, layout.split(_tree(3))[1]))
  assert client.update_and_wait()
  assert client.version == 3 and _versions_in(client.params) == {3.0}
  # A new lineage (a restarted learner) that reached one shard only, at a version the other
  # shard holds of the old lineage: the two shards' leaves are not assembled as one version.
  ray.get(server.shards[1].set.remote(4, blob, layout.split(_tree(4))[1]))
  ray.get(server.shards[0].set.remote(4, blob, layout.split(_tree(40))[0], 1))
  assert not client.update_and_wait() and (client.lineage, client.version) == (0, 3)
  ray.get(server.shards[1].set.remote(4, blob, layout.split(_tree(40))[1], 1))
  assert client.update_and_wait()
  assert (client.lineage, client.version, _versions_in(client.params)) == (1, 4, {40.0})
  server.kill()


def test_concurrent_publishes_are_always_consistent(ray_session):
  server = vs.VariableServer.create(num_shards=4, history=3)
  publisher = server.publisher(max_in_flight=2)
  client = vs.VariableClient(server, update_period=1)
  seen = []
  for version in range(1, 40):
    publisher.publish(_tree(version), version)
    if client.update():
      assert _versions_in(client.params) == {float(client.version)}
      seen.append(client.version)
  publisher.flush()
  client.update_and_wait()
  assert client.version == publisher.last_version and _versions_in(client.params) == {
      float(publisher.last_version)}
  assert publisher.publish(_tree(40), 40)  # nothing in flight after flush: never skipped
  publisher.flush()
  client.update_and_wait()
  assert client.version == 40 and _versions_in(client.params) == {40.0}
  assert seen == sorted(seen)  # versions only move forward
  server.kill()


def test_client_update_period_and_non_blocking(ray_session):
  server = vs.VariableServer.create(num_shards=1)
  publisher = server.publisher()
  publisher.publish(_tree(1), 1)
  publisher.flush()
  client = vs.VariableClient(server, update_period=3)
  assert client.update() is False and client.update() is False  # period not yet passed: no ask
  assert client._pending is None
  client.update()  # third call starts the fetch
  assert client._pending is not None
  deadline = time.monotonic() + 10
  while not client.update():
    assert time.monotonic() < deadline
  assert client.version == 1
  server.kill()


def test_stale_publish_is_ignored_and_publisher_skips_when_shards_lag(ray_session):
  server = vs.VariableServer.create(num_shards=1)
  publisher = server.publisher(max_in_flight=1)
  assert publisher.publish(_tree(5), 5)
  publisher.flush()
  assert publisher.publish(_tree(3), 3)  # older than what this publisher sent before: dropped
  publisher.flush()
  assert server.latest_versions() == [5]
  # A shard busy elsewhere: publishes beyond max_in_flight are skipped, never queued or waited on.
  big = {'w': np.zeros((4_000_000,), np.float32)}
  publisher = server.publisher(max_in_flight=1)
  results = [publisher.publish(big, 10 + i) for i in range(20)]
  assert results[0] and publisher.skipped > 0 and publisher.skipped + publisher.published == 20
  publisher.flush()
  server.kill()


@pytest.mark.parametrize('server_kind', ['sharded', 'local'])
def test_a_restarted_learners_params_replace_the_lost_runs_at_once(ray_session, server_kind):
  """A learner that published version 9, then restarted from its checkpoint of step 4: its new
  publisher's params are served at once as 4, 5, ... (before, the shards kept serving the lost
  run's 9 until the restarted learner passed step 9, and an evaluator scored 9's params as the
  newest). The lost learner's publishes still in flight are dropped."""
  server = (vs.VariableServer.create(num_shards=3) if server_kind == 'sharded'
            else vs.LocalVariableServer())
  lost = server.publisher()
  client = server.client()
  for version in (1, 9):
    assert lost.publish(_tree(version), version)
    lost.flush()
  assert client.update_and_wait() and client.version == 9
  restarted = server.publisher()
  assert restarted.lineage == lost.lineage + 1
  assert restarted.publish(_tree(4), 4)
  restarted.flush()
  assert client.update_and_wait()
  assert (client.version, _versions_in(client.params)) == (4, {4.0})
  assert server.latest_versions() == [4] * (3 if server_kind == 'sharded' else 1)
  assert lost.publish(_tree(12), 12)  # the lost learner's last publish, landing late
  lost.flush()
  assert restarted.publish(_tree(5), 5)
  restarted.flush()
  assert client.update_and_wait() and (client.version, _versions_in(client.params)) == (5, {5.0})
  if server_kind == 'sharded':
    # A client that saw no version of the lost run fetches the new lineage as any client does.
    fresh = server.client()
    assert fresh.update_and_wait() and fresh.version == 5
    # Every shard restarted by Ray (empty) as well: the learner's start count in its workdir,
    # passed as `lineage`, still ranks its params above those the client holds.
    for shard in server.shards:
      ray.kill(shard, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
      try:
        if ray.get([s.lineage.remote() for s in server.shards], timeout=5) == [-1] * 3:
          break
      except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass
      assert time.monotonic() < deadline, 'the shards did not restart'
      time.sleep(0.2)
  again = server.publisher(lineage=7)
  assert again.lineage == 7
  assert again.publish(_tree(2), 2)
  again.flush()
  assert client.update_and_wait() and (client.lineage, client.version) == (7, 2)
  if server_kind == 'sharded':
    server.kill()


class _RunsCode:
  """Unpickling this writes a file: a stand-in for code smuggled into a shard."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, 'w'))


def test_layout_bytes_from_a_shard_are_never_unpickled(ray_session, tmp_path):
  """A shard that serves a pickle (e.g. written by someone who reached the cluster) makes the
  client fail on bad JSON; the pickle's code never runs."""
  server = vs.VariableServer.create(num_shards=1)
  marker = str(tmp_path / 'code_ran')
  evil = pickle.dumps(_RunsCode(marker))
  ray.get(server.shards[0].set.remote(1, evil, [np.zeros(2, np.float32)]))
  client = vs.VariableClient(server)
  with pytest.raises(ValueError):  # json.JSONDecodeError / UnicodeDecodeError
    client.update_and_wait()
  assert not os.path.exists(marker) and client.version == -1
  pickle.loads(evil)  # the payload is live: the test would catch an unpickling client
  assert os.path.exists(marker)
  server.kill()


def test_in_flight_publishes_are_capped_per_shard(ray_session):
  """One slow shard of 4: publishes are skipped while any shard has `max_in_flight` in flight,
  so it never lags more than that many versions (it keeps `history`), and a client assembles
  every version the slow shard reaches. (Capped over all shards, the slow one fell 4 behind.)"""

  class SlowShard(vs.VariableShard):  # defined here: Ray ships it by value to the worker
    def set(self, *args):
      time.sleep(0.3)
      return super().set(*args)

  prefix = f'slow_{uuid.uuid4().hex[:8]}_'
  names = [f'{prefix}{i}' for i in range(4)]
  handles = [ray.remote(num_cpus=0)(SlowShard if i == 3 else vs.VariableShard).options(
      name=name).remote(3) for i, name in enumerate(names)]  # (held: a dropped handle ends it)
  server = vs.VariableServer(names, history=3)
  assert server.latest_versions() == [-1] * 4 and len(handles) == 4  # all up
  with pytest.raises(ValueError, match='history'):
    server.publisher(max_in_flight=3)
  publisher = server.publisher(max_in_flight=1)
  client = vs.VariableClient(server)
  deadline = time.monotonic() + 3.0
  version = 0
  while time.monotonic() < deadline:
    version += 1
    publisher.publish(_tree(version), version)
    assert max(len(refs) for refs in publisher.in_flight()) <= 1
    time.sleep(0.02)
  assert publisher.skipped > publisher.published > 3  # the slow shard set the pace
  publisher.flush(timeout=10)
  assert client.update_and_wait(timeout=10)
  assert client.version == publisher.last_version
  assert _versions_in(client.params) == {float(client.version)}
  server.kill()

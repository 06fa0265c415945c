"""Reverb tables: the window path agrees with the numpy reference; stratified sampling; processes."""
import os
import threading
import time

import jax
import numpy as np
import pytest
from scipy import stats

from scaled_ql import configs
from scaled_ql import games as games_lib
from scaled_ql.configs.base import check_transitions_per_item
from scaled_ql.datasets import reverb_tables as rt
from scaled_ql.datasets import transitions as tr

from polling import wait_for  # tests/polling.py


def tiny_cfg(games=('Breakout', 'Pong'), games_per_batch=2, transitions_per_game=4,
             min_fill=4, max_size=1000, n_step=3):
  cfg = configs.get_config('cpu_tiny')
  return cfg.replace(games=tuple(games),
                     agent=dict(games_per_batch=games_per_batch,
                                transitions_per_game=transitions_per_game, n_step=n_step),
                     data=dict(min_fill_per_game=min_fill, shuffle_buffer_per_game=max_size,
                               prefetch_batches=2))


def make_steps(num_steps, terminal, base, rng):
  """Episode whose step i shows the frame value base + i (unique across the test's episodes)."""
  obs = (base + np.arange(num_steps, dtype=np.int64)).astype(np.uint8)
  obs = np.broadcast_to(obs[:, None, None, None], (num_steps, 84, 84, 1)).copy()
  is_last = np.arange(num_steps) == num_steps - 1
  return dict(observation=obs, action=rng.integers(0, 4, num_steps),
              reward=rng.normal(0, 2, num_steps).astype(np.float32),
              is_first=np.arange(num_steps) == 0, is_last=is_last,
              is_terminal=is_last & terminal)


def hand_made_episodes(games, rng, episodes_per_game=2, length=(6, 9)):
  """game -> list of step dicts; frame values tell games and steps apart."""
  out, base = {}, 1
  for game in games:
    out[game] = []
    for e in range(episodes_per_game):
      num = int(rng.integers(*length))
      out[game].append(make_steps(num, terminal=(e % 2 == 0), base=base, rng=rng))
      base += num
  assert base < 256
  return out


def source_of(episodes):
  return lambda game: (tr.split_steps(steps) for steps in episodes[game])


def transitions_of(windows):
  """The learner's view of a sampled batch: frames stacked by the jitted device code."""
  assert isinstance(windows, tr.FrameWindows)
  return jax.device_get(stack_on_device(windows))


stack_on_device = jax.jit(tr.FrameWindows.to_transition)


def key(t):
  """A transition's identity: its current frame value (unique per step) and next frame."""
  return int(t[0][0, 0, 3]), int(t[4][0, 0, 3])


def reference(cfg, episodes):
  """{key: transition tuple} of the numpy reference over all episodes."""
  ref = {}
  for gid, game in enumerate(cfg.games):
    for steps in episodes[game]:
      out = tr.episode_transitions(steps, cfg.agent.n_step, cfg.agent.discount,
                                   cfg.agent.reward_clip, game_id=gid)
      for i in range(len(out.action)):
        t = tuple(np.asarray(x)[i] for x in out)
        assert key(t) not in ref
        ref[key(t)] = t
  return ref


@pytest.fixture
def server():
  cfg = tiny_cfg()
  srv = rt.make_server(cfg)
  yield cfg, f'localhost:{srv.port}'
  srv.stop()


def test_a_server_leaves_no_checkpoint_folder_behind(tmp_path, monkeypatch):
  """Reverb makes a temporary checkpoint folder per server and never removes it; ours goes with
  the server (`reverb_tables.server_with_tables`)."""
  import gc
  import tempfile
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))  # where mkdtemp() makes folders
  srv = rt.make_server(tiny_cfg())
  assert [p.name.startswith('scaled_ql_reverb_') for p in tmp_path.iterdir()] == [True]
  srv.stop()  # a node's stop(): the node (a Ray actor) may be killed right after
  assert list(tmp_path.iterdir()) == []
  srv = rt.make_server(tiny_cfg())  # never stopped: the folder goes with the object
  assert len(list(tmp_path.iterdir())) == 1
  del srv
  gc.collect()
  assert list(tmp_path.iterdir()) == []


def test_a_killed_servers_folder_is_swept_by_the_next_server(tmp_path, monkeypatch):
  """SIGKILL runs no finalizer: the folder stays until a server starts on the machine."""
  import subprocess
  import sys
  import tempfile
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  killed = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  left = tmp_path / f'scaled_ql_reverb_{killed.pid}_abc'  # as the killed process named it
  left.mkdir()
  killed.kill()
  killed.wait()
  busy = tmp_path / f'scaled_ql_reverb_{killed.pid}_def'  # not empty: not ours to remove
  busy.mkdir()
  (busy / 'file').write_text('x')
  alive = tmp_path / f'scaled_ql_reverb_{os.getpid()}_ghi'  # a live process's server
  alive.mkdir()
  other = tmp_path / 'scaled_ql_reverb_notapid'
  other.mkdir()
  srv = rt.make_server(tiny_cfg())
  try:
    names = sorted(p.name for p in tmp_path.iterdir())
    assert left.name not in names
    assert {busy.name, alive.name, other.name} <= set(names)
    mine = [n for n in names
            if n.startswith(f'scaled_ql_reverb_{os.getpid()}_') and n != alive.name]
    assert len(mine) == 1  # this server's own folder, named after its process
  finally:
    srv.stop()
  assert rt.sweep_server_folders(str(tmp_path)) == []  # nothing more to sweep
  assert rt.sweep_server_folders(str(tmp_path / 'missing')) == []  # an unreadable root


def test_window_path_agrees_with_numpy_reference(server):
  cfg, address = server
  rng = np.random.default_rng(0)
  episodes = hand_made_episodes(cfg.games, rng)
  items = rt.run_inserter(address, cfg, cfg.games, source_of(episodes), repeat=False)
  ref = reference(cfg, episodes)
  assert items == len(ref)
  assert rt.table_sizes(address, cfg.games) == {
      g: sum(len(s['action']) - 1 for s in episodes[g]) for g in cfg.games}
  seen = set()
  with rt.stratified_batches(address, cfg.games, cfg, seed=1) as batches:
    for _ in range(150):
      batch = transitions_of(next(batches))
      assert batch.observation.shape == (8, 84, 84, 4)
      for i in range(8):
        t = tuple(np.asarray(x)[i] for x in batch)
        want = ref[key(t)]
        for got_field, want_field, name in zip(t, want, tr.Transition._fields):
          np.testing.assert_allclose(got_field, want_field, rtol=1e-6, err_msg=name)
        seen.add(key(t))
  # ~1200 uniform draws over ~25 items: every transition, boundaries included, came back.
  assert seen == set(ref)


@pytest.mark.parametrize('fetch', [1, 3])
def test_items_of_consecutive_transitions_agree_with_numpy_reference(fetch):
  """data.transitions_per_item = 2: one sample, two consecutive transitions, each equal to the
  numpy reference; an episode's odd last transition repeats in its item's empty place. With
  data.batches_per_fetch = 3 the batches come three per fetch, each as without it."""
  per_item = 2
  cfg = tiny_cfg().replace(data=dict(transitions_per_item=per_item, batches_per_fetch=fetch))
  srv = rt.make_server(cfg)
  address = f'localhost:{srv.port}'
  try:
    episodes = hand_made_episodes(cfg.games, np.random.default_rng(3))
    lengths = {g: [len(s['action']) - 1 for s in episodes[g]] for g in cfg.games}
    assert any(n % per_item for ns in lengths.values() for n in ns)  # a repeat is exercised
    items = rt.run_inserter(address, cfg, cfg.games, source_of(episodes), repeat=False)
    assert items == sum(-(-n // per_item) for ns in lengths.values() for n in ns)
    ref, seen = reference(cfg, episodes), set()
    with rt.stratified_batches(address, cfg.games, cfg, seed=1) as batches:
      for _ in range(120):
        windows = next(batches)
        assert windows.frames.shape[0] == 8 // per_item
        batch = transitions_of(windows)
        keys = []
        for i in range(8):
          t = tuple(np.asarray(x)[i] for x in batch)
          for got_field, want_field, name in zip(t, ref[key(t)], tr.Transition._fields):
            np.testing.assert_allclose(got_field, want_field, rtol=1e-6, err_msg=name)
          keys.append(key(t))
        for first, second in zip(keys[::2], keys[1::2]):  # the item's successor, or a repeat
          assert second[0] in (first[0] + 1, first[0]), (first, second)
        seen.update(keys)
  finally:
    srv.stop()
  assert seen == set(ref)


def test_transitions_per_item_is_checked():
  with pytest.raises(ValueError, match='transitions_per_item=3 must divide'):
    check_transitions_per_item(tiny_cfg().replace(data=dict(transitions_per_item=3)))
  with pytest.raises(ValueError, match='transitions_per_item must be >= 1'):
    check_transitions_per_item(tiny_cfg().replace(data=dict(transitions_per_item=0)))
  with pytest.raises(ValueError, match='batches_per_fetch must be >= 1'):
    check_transitions_per_item(tiny_cfg().replace(data=dict(batches_per_fetch=0)))
  cfg = tiny_cfg(min_fill=5, max_size=1001).replace(data=dict(transitions_per_item=4))
  assert rt.table_items(cfg) == (250, 2)  # sizes are transitions; tables count items
  with pytest.raises(ValueError, match='online fine-tuning paces single transitions'):
    rt.TablePacing.from_config(cfg)
  with pytest.raises(ValueError, match='data.batches_per_fetch must be 1, got 4'):
    rt.TablePacing.from_config(tiny_cfg().replace(data=dict(batches_per_fetch=4)))


@pytest.mark.parametrize('fetch', [1, 4])
def test_stratified_proportions(fetch):
  """Each batch is games_per_batch draws of a uniformly drawn game, each draw uniform over that
  game's table; also when data.batches_per_fetch = 4 batches are fetched in one go."""
  games = ('Breakout', 'Pong', 'Boxing')
  cfg = tiny_cfg(games=games, games_per_batch=6, transitions_per_game=3, min_fill=3).replace(
      data=dict(batches_per_fetch=fetch))
  rng = np.random.default_rng(1)
  episodes = hand_made_episodes(games, rng, episodes_per_game=1, length=(5, 6))
  srv = rt.make_server(cfg)
  address = f'localhost:{srv.port}'
  try:
    rt.run_inserter(address, cfg, games, source_of(episodes), repeat=False)
    ref = reference(cfg, episodes)
    num_batches = 300
    group_counts = np.zeros(len(games))
    item_counts = {k: 0 for k in ref}
    with rt.stratified_batches(address, games, cfg, seed=7) as batches:
      for _ in range(num_batches):
        batch = transitions_of(next(batches))
        gid = batch.game_id.reshape(6, 3)
        # Each draw is transitions_per_game transitions of one game.
        assert (gid == gid[:, :1]).all()
        group_counts += np.bincount(gid[:, 0], minlength=len(games))
        for i in range(18):
          t = tuple(np.asarray(x)[i] for x in batch)
          assert ref[key(t)][5] == t[5]  # the transition came from the drawn game's table
          item_counts[key(t)] += 1
    assert group_counts.sum() == num_batches * 6
    # Games drawn uniformly with replacement: chi-square goodness of fit (false alarm 1e-4).
    assert stats.chisquare(group_counts).pvalue > 1e-4, group_counts
    # Within a game, uniform over its table's transitions.
    for gid, game in enumerate(games):
      counts = [c for k, c in item_counts.items() if ref[k][5] == gid]
      assert stats.chisquare(counts).pvalue > 1e-4, (game, counts)
  finally:
    srv.stop()


def test_no_tf_data_function_runs_per_game_draw():
  # A function mapped per sample or per game draw (a graph run handed to TF's threads and back)
  # was the sampler's largest CPU cost (docs/history/performance_log.md, "tf.data without per-draw
  # functions"). Every map of the dataset's graph must run on batches (its input, through other
  # maps, is a batch: the draws in blocks of 4096, or the whole batch), and their number must
  # not grow with the games (no map per game's dataset).
  import tensorflow as tf
  maps = {}
  for games in (('Breakout',), ('Breakout', 'Pong', 'Boxing')):
    cfg = tiny_cfg(games=games)
    ds = rt.stratified_dataset('localhost:1', games, cfg)  # not connected until iterated
    graph = tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph().numpy())
    nodes = {node.name: node for node in graph.node}
    ops = [node.op for node in graph.node]
    assert ops.count('ZipDataset') == len(games), ops  # the game id rides along by zip
    for node in graph.node:
      if 'MapDataset' in node.op:
        source = node
        while 'MapDataset' in source.op:
          source = nodes[source.input[0]]
        assert source.op.startswith('BatchDataset'), (node.name, 'maps', source.op)
    maps[len(games)] = sum('MapDataset' in op for op in ops)
  assert maps[1] == maps[3] > 0, maps


def test_bad_input_errors():
  cfg = tiny_cfg()
  with pytest.raises(ValueError, match='Boxing'):
    rt.stratified_batches('localhost:1', ['Boxing'], cfg)
  with pytest.raises(ValueError, match='min_fill_per_game'):
    rt.make_tables(cfg.replace(data=dict(min_fill_per_game=10_000)))


def test_a_restarted_replay_node_comes_back_on_the_port_it_bound(tmp_path, monkeypatch):
  """Clients ask the replay node for its address once it is up and reconnect to it after a
  restart. A first start whose planned port is taken binds a free one; restarted, it bound the
  planned port again (its constructor's argument), and its clients waited at the other one for
  ever. It now comes back on the port it bound; where that is taken, on a free one, written for
  its next restart, and its status shows the new address (the driver then restarts its
  clients: `test_program.py`)."""
  import socket
  from scaled_ql.launch import nodes
  cfg, workdir = tiny_cfg(), str(tmp_path)
  with socket.socket() as held:  # no SO_REUSEPORT: gRPC cannot bind beside it
    held.bind(('', 0))
    held.listen()
    planned = held.getsockname()[1]
    first = nodes.ReverbNode(cfg, port=planned, workdir=workdir)
    bound = first.port
    assert bound != planned
    first.stop()
  monkeypatch.setattr(nodes, '_was_restarted', lambda: True)
  again = nodes.ReverbNode(cfg, port=planned, workdir=workdir)  # the planned port is free now
  assert again.port == bound
  again.stop()
  with socket.socket() as held:
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(('', bound))
    held.listen()
    moved = nodes.ReverbNode(cfg, port=planned, workdir=workdir)
    try:
      assert moved.port != bound
      assert moved.status()['address'].endswith(f':{moved.port}')
      with open(os.path.join(workdir, nodes.REPLAY_PORT_FILE)) as f:
        assert int(f.read()) == moved.port
    finally:
      moved.stop()


def test_reconnect_after_server_restart():
  cfg = tiny_cfg()
  rng = np.random.default_rng(2)
  episodes = hand_made_episodes(cfg.games, rng)
  ref = reference(cfg, episodes)
  stop = threading.Event()
  # A server in the same process would be read without gRPC: both servers are subprocesses.
  server = rt.start_server_process(cfg)
  inserter = None
  try:
    # Inserter streams forever (repeat) from a thread; the learner side samples over gRPC.
    inserter = threading.Thread(target=rt.run_inserter, daemon=True, args=(
        server.address, cfg, cfg.games, source_of(episodes)),
        kwargs=dict(stop=stop, reconnect_timeout_s=60))
    inserter.start()
    with rt.stratified_batches(server.address, cfg.games, cfg) as batches:
      batch = transitions_of(next(batches))
      assert all(key(tuple(np.asarray(x)[i] for x in batch)) in ref for i in range(8))
      # The server dies and comes back at the same port, empty: both sides reconnect (Reverb's
      # clients retry UNAVAILABLE), the inserter refills it and sampling resumes from it.
      port = server.port
      server.stop()
      server = rt.start_server_process(cfg, port=port)
      assert server.proc.poll() is None
      for _ in range(300):  # batches prefetched from the old server drain first
        batch = transitions_of(next(batches))
        assert all(key(tuple(np.asarray(x)[i] for x in batch)) in ref for i in range(8))
        if sum(rt.samples_served(server.address, cfg.games).values()) >= 16:
          break
      assert sum(rt.samples_served(server.address, cfg.games).values()) >= 16
  finally:
    stop.set()
    if inserter is not None:  # it finishes its episode, then stops (before the server goes)
      inserter.join(timeout=20)
      assert not inserter.is_alive()
    server.stop()


def _transition_hash(t):
  obs, action, reward, discount, next_obs, game_id = (np.asarray(x) for x in t)
  return (obs.tobytes(), int(action), round(float(reward), 5), round(float(discount), 5),
          next_obs.tobytes(), int(game_id))


def test_end_to_end_tfds_server_and_inserters_in_other_processes(tiny_dataset_dir):
  from scaled_ql.datasets import rlds_reader
  cfg = configs.get_config('cpu_tiny')
  cfg = cfg.replace(data=dict(data_dir=tiny_dataset_dir, selection='near_optimal',
                              num_inserters=1))
  with rt.start_server_process(cfg) as server:
    # The inserter process starts (imports, reader) while this process builds the reference.
    inserters = rt.start_inserter_processes(server.address, cfg)
    try:
      assert len(inserters) == 1
      # Reference: every transition of the same TFDS episodes, by the numpy path.
      want = set()
      for gid, game in enumerate(cfg.games):
        for episode in rlds_reader.episodes_from_config(cfg.data, game):
          steps = next(episode['steps'].batch(100_000).as_numpy_iterator())
          out = tr.episode_transitions(steps, cfg.agent.n_step, cfg.agent.discount,
                                       cfg.agent.reward_clip, game_id=gid)
          want.update(_transition_hash(tuple(x[i] for x in out))
                      for i in range(len(out.action)))
      assert len(want) > 2 * cfg.data.min_fill_per_game
      with rt.stratified_batches(server.address, cfg.games, cfg) as batches:
        for _ in range(6):
          batch = transitions_of(next(batches))
          assert batch.observation.shape == (cfg.agent.batch_size, 84, 84, 4)
          assert batch.observation.dtype == np.uint8 and batch.game_id.dtype == np.int32
          for i in range(cfg.agent.batch_size):
            assert _transition_hash(tuple(x[i] for x in batch)) in want
      sizes = rt.table_sizes(server.address, cfg.games)
      assert all(s >= cfg.data.min_fill_per_game for s in sizes.values()), sizes
      assert all(p.poll() is None for p in inserters)  # streaming epoch after epoch
    finally:
      rt.stop_processes(inserters)


def test_closed_iterator_stops(server):
  cfg, address = server
  rt.run_inserter(address, cfg, cfg.games,
                  source_of(hand_made_episodes(cfg.games, np.random.default_rng(4))), repeat=False)
  batches = rt.stratified_batches(address, cfg.games, cfg)
  assert next(batches).action.shape == (8,)
  batches.close()
  with pytest.raises(StopIteration):
    for _ in range(10):  # what was prefetched may still come out, then it ends
      next(batches)
  # A closer's reason rides on the StopIteration (`learn` names the data process that died).
  batches = rt.stratified_batches(address, cfg.games, cfg)
  next(batches)
  batches.close(reason='the Reverb server (pid 1) was killed by SIGKILL')
  with pytest.raises(StopIteration) as end:
    for _ in range(10):
      next(batches)
  assert end.value.args == ('the Reverb server (pid 1) was killed by SIGKILL',)


def test_inserter_rejects_a_game_without_episodes(server):
  cfg, address = server
  episodes = hand_made_episodes(cfg.games, np.random.default_rng(3), episodes_per_game=1)
  episodes['Pong'] = []
  with pytest.raises(ValueError, match='no episodes of game Pong'):
    rt.run_inserter(address, cfg, cfg.games, source_of(episodes))
  # Streamed again, episodes that hold no transition (one step each) would never fill the table:
  # the inserter looped over them for ever while the learner waited.
  episodes['Pong'] = [make_steps(1, terminal=True, base=200, rng=np.random.default_rng(4))]
  with pytest.raises(ValueError, match=r'no transitions of game Pong in the data source .*: '
                                       r'its 1 episodes hold none \(one step each\)'):
    rt.run_inserter(address, cfg, cfg.games, source_of(episodes))
  # Data read once and gone when streamed again: before, a bare StopIteration.
  first = hand_made_episodes(cfg.games, np.random.default_rng(5), episodes_per_game=1)
  reads = {g: 0 for g in cfg.games}

  def vanishing(game):
    reads[game] += 1
    return source_of(first)(game) if reads[game] == 1 or game != 'Pong' else iter(())

  with pytest.raises(ValueError, match='no episodes of game Pong .* when streamed again'):
    rt.run_inserter(address, cfg, cfg.games, vanishing)


def test_inserter_cuts_a_malformed_episode_short_and_counts_it(server, caplog):
  """A malformed episode (here a terminal step that is not its last) is bad data, like an
  undecodable one: the inserter keeps the whole transitions before its fault, warns naming its
  game and episode, counts it, and the episodes after it are written as before; data.strict
  makes it an error. Before, it ended the inserter (and a program, through its crash loop)."""
  import logging
  from scaled_ql.datasets import rlds_reader
  cfg, address = server
  rng = np.random.default_rng(7)
  episodes = hand_made_episodes(cfg.games, rng, episodes_per_game=2)
  bad = make_steps(8, terminal=False, base=1 + sum(len(s['action']) for g in cfg.games
                                                   for s in episodes[g]), rng=rng)
  bad['is_terminal'][5] = True
  label = 'checkpoint_id 3, episode_id 17'

  def with_a_bad_episode(game):
    good = [tr.split_steps(s) for s in episodes[game]]
    if game == 'Pong':  # between two good ones
      good.insert(1, rt.LabelledEpisode(tr.split_steps(bad), label))
    return iter(good)

  stats = rlds_reader.ReadStats()
  with caplog.at_level(logging.WARNING, logger='scaled_ql.datasets.reverb_tables'):
    items = rt.run_inserter(address, cfg, cfg.games, with_a_bad_episode, repeat=False,
                            stats=stats)
  # What the table must hold: the good episodes' transitions and those of the bad one's steps
  # before its fault (steps 0-4) whose n-step windows closed before it (t = 0 .. 4 - n).
  ref = reference(cfg, episodes)
  prefix = {k: np.array(v[:5]) for k, v in bad.items()}
  prefix['is_last'][4], prefix['is_terminal'][:] = True, False
  kept = tr.episode_transitions(prefix, cfg.agent.n_step, cfg.agent.discount,
                                cfg.agent.reward_clip, game_id=cfg.games.index('Pong'))
  for i in range(5 - cfg.agent.n_step):
    t = tuple(np.asarray(x)[i] for x in kept)
    ref[key(t)] = t
  assert items == len(ref) == sum(rt.table_sizes(address, cfg.games).values())
  assert stats.counts()['malformed_episodes'] == 1 and stats.malformed == {('Pong', label)}
  warned = [r.getMessage() for r in caplog.records if 'malformed' in r.getMessage()]
  assert len(warned) == 1 and 'game Pong in the data source' in warned[0], warned
  assert label in warned[0] and 'step 5 is terminal but not last' in warned[0], warned
  # Every window sampled is a transition of the reference (none spans the cut into the next
  # episode), and every one came back.
  seen = set()
  with rt.stratified_batches(address, cfg.games, cfg, seed=1) as batches:
    for _ in range(150):
      batch = transitions_of(next(batches))
      for i in range(8):
        t = tuple(np.asarray(x)[i] for x in batch)
        for got_field, want_field, name in zip(t, ref[key(t)], tr.Transition._fields):
          np.testing.assert_allclose(got_field, want_field, rtol=1e-6, err_msg=name)
        seen.add(key(t))
  assert seen == set(ref)
  # data.strict: the same episode is an error that names the game, the data and the episode.
  strict = cfg.replace(data=dict(strict=True))
  with pytest.raises(ValueError, match=r'game Pong in the data source .*, checkpoint_id 3, '
                                       r'episode_id 17: step 5 is terminal but not last .*'
                                       r'\(data.strict=true\)'):
    rt.run_inserter(address, strict, cfg.games, with_a_bad_episode, repeat=False)


def test_inserter_refuses_a_game_whose_episodes_are_all_malformed(server):
  """Data not in the inserter's format (frames of another shape) would be cut short episode
  after episode: the first MALFORMED_FIRST_EPISODES all malformed end the inserter, and a game
  with fewer, all malformed, ends it at the end of its first epoch."""
  cfg, address = server
  rng = np.random.default_rng(8)
  good = hand_made_episodes(cfg.games, rng, episodes_per_game=1)
  rgb = make_steps(4, terminal=True, base=200, rng=rng)
  rgb['observation'] = np.repeat(rgb['observation'], 3, axis=-1)  # [T, 84, 84, 3]

  def source(bad_episodes):
    return lambda game: iter([tr.split_steps(s) for s in good[game]] if game != 'Pong' else
                             [tr.split_steps(rgb) for _ in range(bad_episodes)])

  with pytest.raises(ValueError, match=r'game Pong in the data source .*: its first 10 episodes '
                                       r'are all malformed, .*step observation must be uint8'):
    rt.run_inserter(address, cfg, cfg.games, source(rt.MALFORMED_FIRST_EPISODES))
  no_transitions = (r'no transitions of game Pong .*: its 2 episodes hold none \(all malformed '
                    r'\(the first: an episode: step observation must be uint8')
  with pytest.raises(ValueError, match=no_transitions):
    rt.run_inserter(address, cfg, cfg.games, source(2))
  # Streamed once, or up to a cap, the game would leave its table empty all the same.
  with pytest.raises(ValueError, match=no_transitions):
    rt.run_inserter(address, cfg, cfg.games, source(2), repeat=False)
  with pytest.raises(ValueError, match=no_transitions):
    rt.run_inserter(address, cfg, cfg.games, source(3), max_episodes_per_game=2)


def test_inserter_counts_unlabelled_malformed_episodes_and_names_other_errors(server):
  """Episodes without a label (a source that is not `rlds_episode_source`) count one each; an
  error that is not the data's (a step the inserter cannot read) still names game and episode."""
  from scaled_ql.datasets import rlds_reader
  cfg, address = server
  rng = np.random.default_rng(9)
  good = hand_made_episodes(cfg.games, rng, episodes_per_game=2)
  bad = make_steps(4, terminal=True, base=200, rng=rng)
  bad['action'][2] = games_lib.num_actions('Pong')  # one past Pong's action set

  def source(game):
    episodes = [tr.split_steps(s) for s in good[game]]
    return iter(episodes[:1] + [tr.split_steps(bad), tr.split_steps(bad)] + episodes[1:]
                if game == 'Pong' else episodes)

  stats = rlds_reader.ReadStats()
  items = rt.run_inserter(address, cfg, cfg.games, source, repeat=False, stats=stats)
  assert stats.counts()['malformed_episodes'] == 2
  # Each bad episode kept its transitions before step 2: none with n = 3.
  assert items == sum(len(s['action']) - 1 for g in cfg.games for s in good[g])
  odd = make_steps(4, terminal=True, base=210, rng=rng)
  odd['is_last'] = np.stack([odd['is_last']] * 2, axis=1)  # not one flag per step
  labelled = rt.LabelledEpisode(tr.split_steps(odd), 'checkpoint_id 1, episode_id 2')
  with pytest.raises(ValueError, match=r'game Pong in the data source .*, checkpoint_id 1, '
                                       r'episode_id 2: ValueError: The truth value'):
    rt.run_inserter(address, cfg, ['Pong'], lambda game: iter([labelled]), repeat=False)


def _insert_counts(address, games):
  import reverb
  info = reverb.Client(address).server_info(timeout=10)
  return {g: info[rt.table_name(g)].rate_limiter_info.insert_stats.completed for g in games}


def _streaming_inserter(address, cfg, source, **kwargs):
  stop = threading.Event()
  throttle = rt.InsertThrottle(address, cfg.games, cfg.data.samples_per_insert, stop,
                               poll_s=0.05)
  thread = threading.Thread(target=rt.run_inserter, daemon=True, args=(
      address, cfg, cfg.games, source), kwargs=dict(stop=stop, throttle=throttle, **kwargs))
  thread.start()
  return thread, stop, throttle


def test_throttle_stops_inserts_while_full_tables_are_not_sampled():
  cfg = tiny_cfg(max_size=30, min_fill=4).replace(data=dict(samples_per_insert=2.0))
  episodes = hand_made_episodes(cfg.games, np.random.default_rng(5), episodes_per_game=3)
  srv = rt.make_server(cfg)
  address = f'localhost:{srv.port}'
  thread, stop, throttle = _streaming_inserter(address, cfg, source_of(episodes))
  try:
    wait_for(lambda: min(rt.table_sizes(address, cfg.games).values()) == 30, 60, 'full tables',
             poll=0.05)
    time.sleep(0.5)  # the inserter reaches the throttle
    held = _insert_counts(address, cfg.games)
    time.sleep(1.5)
    assert _insert_counts(address, cfg.games) == held  # nobody samples: nothing is inserted
    assert thread.is_alive() and throttle.throttled_s > 1.0
    assert throttle.resident == set()  # ~22 transitions per epoch do not fit twice in 30
    # The learner samples: each game's table lets an episode in once it has been sampled
    # samples_per_insert x (inserted since full) times; inserting resumes, for every game.
    with rt.stratified_batches(address, cfg.games, cfg, seed=3) as batches:
      def grew():
        next(batches)
        now = _insert_counts(address, cfg.games)
        return all(now[g] > held[g] for g in cfg.games)
      wait_for(grew, 60, 'inserts to resume while sampling', poll=0.05)
  finally:
    stop.set()
    thread.join(timeout=20)
    srv.stop()
  assert not thread.is_alive()


def test_resident_data_is_not_streamed_again_while_sampled():
  # ~22 transitions per game and epoch, tables of 200: after the first epoch the inserter knows
  # the data fits; once a table is full it holds every transition, and sampling it (which lets a
  # streamed game's inserts resume, test above) inserts nothing more.
  cfg = tiny_cfg(max_size=200, min_fill=4).replace(data=dict(samples_per_insert=1.0))
  episodes = hand_made_episodes(cfg.games, np.random.default_rng(7), episodes_per_game=3)
  srv = rt.make_server(cfg)
  address = f'localhost:{srv.port}'
  thread, stop, throttle = _streaming_inserter(address, cfg, source_of(episodes))
  try:
    wait_for(lambda: min(rt.table_sizes(address, cfg.games).values()) == 200, 60, 'full tables',
             poll=0.05)
    assert throttle.resident == set(cfg.games)
    time.sleep(0.3)  # an episode already past the check may still land
    held = _insert_counts(address, cfg.games)
    seen = set()
    with rt.stratified_batches(address, cfg.games, cfg, seed=5) as batches:
      for _ in range(120):  # 480 samples per game: 480 more inserts per game if streamed
        seen.update(int(v) for v in transitions_of(next(batches)).observation[:, 0, 0, -1])
    assert _insert_counts(address, cfg.games) == held
    # every transition is still there: each step's frame value (but the last of an episode,
    # which is only ever a next observation) comes out as some sample's newest frame
    expected = {int(steps['observation'][i, 0, 0, 0]) for eps in episodes.values()
                for steps in eps for i in range(len(steps['observation']) - 1)}
    assert expected <= seen
    assert thread.is_alive()
  finally:
    stop.set()
    thread.join(timeout=20)
    srv.stop()
  assert not thread.is_alive()


def test_throttle_no_deadlock_with_unequal_episode_lengths():
  # Breakout's episodes are 10x longer than Pong's: Breakout's table fills after 3 episodes,
  # Pong's needs 30 (and its min_fill is its max_size). Throttling Breakout as soon as its table
  # is full would stop the round-robin inserter before Pong's table can be sampled at all.
  cfg = tiny_cfg(max_size=60, min_fill=60).replace(data=dict(samples_per_insert=1.0))
  rng = np.random.default_rng(6)
  episodes = {'Breakout': [make_steps(21, True, 1, rng)], 'Pong': [make_steps(3, True, 100, rng)]}
  srv = rt.make_server(cfg)
  address = f'localhost:{srv.port}'
  thread, stop, throttle = _streaming_inserter(address, cfg, source_of(episodes))
  got = []
  try:
    with rt.stratified_batches(address, cfg.games, cfg, seed=4) as batches:
      sampler = threading.Thread(target=lambda: got.extend(next(batches) for _ in range(20)),
                                 daemon=True)
      sampler.start()
      sampler.join(timeout=90)
      assert len(got) == 20, 'stratified sampling deadlocked with the throttled inserter'
  finally:
    stop.set()
    thread.join(timeout=20)
    srv.stop()
  assert {int(g) for b in got for g in b.game_id} == {0, 1}

"""rlds_reader: real TFDS files (made by the generator), selections, sharding, bad input, corruption."""
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from scaled_ql.datasets import rlds_reader as rr


def _ids(ds):
  return [(int(e['checkpoint_id']), int(e['episode_id'])) for e in ds]


def _all_ids(data_dir, game):
  b = tfds.builder('rlu_atari_checkpoints_ordered', config=f'{game}_run_1', data_dir=data_dir)
  out = []
  for split in sorted(b.info.splits.keys()):
    out += _ids(b.as_dataset(split=split))
  return sorted(out)


def test_round_trip_matches_tfds_as_dataset(tiny_dataset_dir):
  expected = _all_ids(tiny_dataset_dir, 'Pong')
  assert len(expected) >= 4
  got = _ids(rr.episodes(tiny_dataset_dir, 'Pong', 1, 'near_optimal'))
  assert sorted(got) == expected
  # Episodes carry the RLDS feature spec; steps decode to single frames.
  ep = next(iter(rr.episodes(tiny_dataset_dir, 'Pong', 1, 'near_optimal', shuffle_files=False)))
  b = tfds.builder('rlu_atari_checkpoints_ordered', config='Pong_run_1', data_dir=tiny_dataset_dir)
  ref = next(iter(b.as_dataset(split='checkpoint_00')))
  a = next(iter(ep['steps'].batch(1000)))
  r = next(iter(ref['steps'].batch(1000)))
  assert a['observation'].shape[1:] == (84, 84, 1) and a['observation'].dtype == tf.uint8
  for k in r:
    np.testing.assert_array_equal(a[k].numpy(), r[k].numpy())


def test_selections_pick_the_right_splits(tiny_dataset_dir):
  everything = _all_ids(tiny_dataset_dir, 'Breakout')
  sub = _ids(rr.episodes(tiny_dataset_dir, 'Breakout', 1, 'suboptimal'))
  assert sub and {c for c, _ in sub} == {0}  # first 20% of 2 splits -> checkpoint_00
  assert sorted(sub) == [i for i in everything if i[0] == 0]
  assert {c for c, _ in _ids(rr.episodes(tiny_dataset_dir, 'Breakout', 1, 'checkpoints:1-1'))} \
      == {1}
  half = _ids(rr.episodes(tiny_dataset_dir, 'Breakout', 1, 'uniform:50', seed=3))
  for c in (0, 1):
    n = sum(1 for i in everything if i[0] == c)
    assert sum(1 for i in half if i[0] == c) in (n // 2, (n + 1) // 2)
  assert set(half) <= set(everything)


def test_a_uniform_selection_reads_one_subset_whatever_the_reading_seed(tiny_dataset_dir):
  """`uniform:P` picks its episodes with `selection_seed` alone: every reading `seed` (an
  inserter's epochs, `seed + epoch`; each inserter's own; the MC probe's) reads the same subset,
  and another `selection_seed` picks another subset of the same size."""
  def subset(**seeds):
    return frozenset(_ids(rr.episodes(tiny_dataset_dir, 'Breakout', 1, 'uniform:50', **seeds)))
  first = subset()
  assert first and {subset(seed=s) for s in (1, 2, 1001)} == {first}
  others = {subset(selection_seed=s) for s in range(1, 6)}
  assert others - {first} and {len(o) for o in others} == {len(first)}


def test_an_inserters_epochs_stream_the_same_uniform_subset(tiny_dataset_dir):
  """What the inserters stream (`rlds_episode_source`, one epoch per call): epoch after epoch,
  the same episodes of a `uniform:50` selection, in a new order (before: a new subset each epoch,
  so a 1% fine-tuning run read ever more of the data)."""
  from scaled_ql import configs
  from scaled_ql.datasets import reverb_tables
  cfg = configs.get_config('cpu_tiny').replace(data=dict(data_dir=tiny_dataset_dir))

  def epochs(selection: str, n: int) -> list[list[bytes]]:  # an episode: its actions and frames
    source = reverb_tables.rlds_episode_source(cfg.replace(data=dict(selection=selection)),
                                               repeat=False)
    return [[b''.join(np.asarray(step[k]).tobytes() for step in steps
                      for k in ('action', 'observation')) for steps in source('Breakout')]
            for _ in range(n)]
  uniform = epochs('uniform:50', 4)
  assert all(sorted(e) == sorted(uniform[0]) for e in uniform), [len(e) for e in uniform]
  whole, = epochs('near_optimal', 1)
  assert set(uniform[0]) < set(whole)  # a proper subset: the selection did select


def test_selection_rules():
  assert rr.selected_checkpoints(rr.parse_selection('suboptimal'), range(50)) == list(range(10))
  assert rr.selected_checkpoints(rr.parse_selection('suboptimal'), range(49)) == list(range(10))
  assert rr.selected_checkpoints(rr.parse_selection('suboptimal'), range(10)) == [0, 1]
  assert rr.selected_checkpoints(rr.parse_selection('near_optimal'), range(50)) == list(range(50))
  assert rr.selected_checkpoints(rr.parse_selection('checkpoints:3-5'), range(50)) == [3, 4, 5]
  assert rr.parse_selection('uniform:1').fraction == 0.01
  mask = rr.keep_mask(1000, 0.01, 0.37)
  assert mask.sum() == 10 and np.all(np.diff(np.flatnonzero(mask)) == 100)  # evenly spaced
  assert rr.keep_mask(7, 1.0, 0.5).all()
  for bad in ('optimal', 'uniform:0', 'uniform:101', 'checkpoints:5-3', 'checkpoints:a-b'):
    with pytest.raises(ValueError, match='valid selections'):
      rr.parse_selection(bad)


def test_sharding_is_disjoint_and_complete(tiny_dataset_dir):
  everything = _all_ids(tiny_dataset_dir, 'Pong')
  # 2 files, 2 shards: one file each; 3 shards: every worker reads all, keeps every 3rd episode.
  for n in (2, 3):
    parts = [_ids(rr.episodes(tiny_dataset_dir, 'Pong', 1, 'near_optimal', shard_index=i,
                              num_shards=n)) for i in range(n)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == everything and len(set(flat)) == len(flat)
    assert all(parts)
  # Also with repeat: every epoch is partitioned the same way across the 3 workers.
  n = len(everything)
  parts = [_ids(rr.episodes(tiny_dataset_dir, 'Pong', 1, 'near_optimal', shard_index=i,
                            num_shards=3, repeat=True, seed=5).take(2 * len(p)))
           for i, p in enumerate(parts)]
  for epoch in range(2):
    flat = [x for p in parts for x in p[epoch * len(p) // 2:(epoch + 1) * len(p) // 2]]
    assert sorted(flat) == everything
  with pytest.raises(ValueError, match='shard_index'):
    rr.episodes(tiny_dataset_dir, 'Pong', 1, 'near_optimal', shard_index=2, num_shards=2)


def test_repeat_is_infinite_and_counts_epochs(tiny_dataset_dir):
  stats = rr.ReadStats()
  n = len(_all_ids(tiny_dataset_dir, 'Pong'))
  got = _ids(rr.episodes(tiny_dataset_dir, 'Pong', 1, 'near_optimal', repeat=True,
                         stats=stats).take(3 * n))
  assert len(got) == 3 * n and stats.epochs >= 2
  assert sorted(got[:n]) == sorted(got[n:2 * n])


def test_bad_input_errors_name_the_problem(tiny_dataset_dir, tmp_path):
  with pytest.raises(rr.DatasetNotFoundError, match='data dir .*nope does not exist'):
    rr.episodes(str(tmp_path / 'nope'), 'Pong')
  with pytest.raises(rr.DatasetNotFoundError, match=r'Boxing run 1.*configs present.*Breakout_run_1'):
    rr.episodes(tiny_dataset_dir, 'Boxing')
  with pytest.raises(rr.DatasetNotFoundError, match=r'Pong run 3.*Pong_run_1'):
    rr.episodes(tiny_dataset_dir, 'Pong', run=3)
  with pytest.raises(rr.DatasetNotFoundError, match=r'checkpoint_02.*available: checkpoint_00'):
    rr.episodes(tiny_dataset_dir, 'Pong', selection='checkpoints:0-2')
  with pytest.raises(ValueError, match='unknown game.*Pongg'):
    rr.episodes(tiny_dataset_dir, 'Pongg')
  with pytest.raises(ValueError, match='run must be in 1..5'):
    rr.episodes(tiny_dataset_dir, 'Pong', run=0)
  with pytest.raises(ValueError, match='unknown TFDS builder'):
    rr.episodes(tiny_dataset_dir, 'Pong', builder='rlu_atari_v2')
  with pytest.raises(rr.DatasetNotFoundError, match=r'rlu_atari does not exist.*datasets in'):
    rr.episodes(tiny_dataset_dir, 'Pong', builder='rlu_atari')
  empty = tmp_path / 'rlu_atari_checkpoints_ordered' / 'Pong_run_1'
  empty.mkdir(parents=True)
  with pytest.raises(rr.DatasetNotFoundError, match=r'no prepared version 1.1.0'):
    rr.episodes(str(tmp_path), 'Pong')


def test_a_missing_version_leaves_no_folder_in_the_temporary_directory(tmp_path, monkeypatch):
  # A TFDS builder made without its dataset_info.json asks TFDS's GCS bucket for one, in a
  # `mkdtemp('tfds')` folder TFDS never removes: the missing version is found before.
  import tempfile
  (tmp_path / 'data' / 'rlu_atari_checkpoints_ordered' / 'Pong_run_1' / '1.0.0').mkdir(
      parents=True)
  tmp = tmp_path / 'tmp'
  tmp.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp))
  with pytest.raises(rr.DatasetNotFoundError, match=r'no prepared version 1.1.0 .*1\.0\.0'):
    rr.load_builder(str(tmp_path / 'data'), 'Pong')
  assert list(tmp.iterdir()) == []


def _corrupted_copy(tiny_dataset_dir, tmp_path):
  data = str(tmp_path / 'data')
  shutil.copytree(tiny_dataset_dir, data)
  d = os.path.join(data, 'rlu_atari_checkpoints_ordered', 'Breakout_run_1', '1.1.0')
  bad = os.path.join(d, 'rlu_atari_checkpoints_ordered-checkpoint_00.tfrecord-00000-of-00001')
  size = os.path.getsize(bad)
  with open(bad, 'r+b') as f:
    f.truncate(size // 2)  # the first episode survives (episodes are ~70 KB), the rest is cut
  return data, bad


def test_corrupt_shard_is_skipped_with_a_warning(tiny_dataset_dir, tmp_path, caplog):
  data, bad = _corrupted_copy(tiny_dataset_dir, tmp_path)
  everything = _all_ids(tiny_dataset_dir, 'Breakout')
  stats = rr.ReadStats()
  with caplog.at_level(logging.WARNING, logger='scaled_ql.datasets.rlds_reader'):
    got = _ids(rr.episodes(data, 'Breakout', 1, 'near_optimal', stats=stats))
  assert stats.corrupt_files == [bad] and stats.num_corrupt == 1
  assert any(bad in r.getMessage() for r in caplog.records)
  ckpt1 = [i for i in everything if i[0] == 1]
  assert set(ckpt1) <= set(got)  # the intact file is read in full
  assert len(got) < len(everything)
  # With repeat the corrupt file is warned about and counted once, and its good prefix re-read.
  stats = rr.ReadStats()
  n_per_epoch = len(got)
  again = _ids(rr.episodes(data, 'Breakout', 1, 'near_optimal', repeat=True, stats=stats)
               .take(3 * n_per_epoch))
  assert len(again) == 3 * n_per_epoch and stats.corrupt_files == [bad]


def test_corrupt_shard_is_fatal_when_strict(tiny_dataset_dir, tmp_path):
  data, bad = _corrupted_copy(tiny_dataset_dir, tmp_path)
  with pytest.raises(Exception, match=r'corrupt or unreadable shard .*' + os.path.basename(bad)):
    _ids(rr.episodes(data, 'Breakout', 1, 'near_optimal', strict=True))


def test_summarize(tiny_dataset_dir):
  summary = rr.summarize(tiny_dataset_dir, 'Breakout')
  assert sorted(summary) == [0, 1]
  b = tfds.builder('rlu_atari_checkpoints_ordered', config='Breakout_run_1',
                   data_dir=tiny_dataset_dir)
  for c, s in summary.items():
    eps = list(tfds.as_numpy(b.as_dataset(split=f'checkpoint_{c:02d}')))
    assert s.episodes == len(eps)
    assert s.mean_return == pytest.approx(np.mean([e['episode_return'] for e in eps]))
    assert s.steps == sum(len(list(e['steps'])) for e in eps)  # actions + final obs step each


def test_unordered_rlu_atari_builder_selects_by_checkpoint_id(tmp_path):
  from scaled_ql.datasets import generate
  out = generate.generate(['Pong'], str(tmp_path), num_checkpoints=3, steps_per_checkpoint=60,
                          max_episode_frames=120, builder='rlu_atari', progress=False)
  assert os.path.basename(out['Pong']) == '1.3.0'  # rlu_atari's registered version
  b = tfds.builder('rlu_atari', config='Pong_run_1', data_dir=str(tmp_path))
  assert list(b.info.splits.keys()) == ['train']
  everything = sorted(_ids(b.as_dataset(split='train')))
  assert {c for c, _ in everything} == {0, 1, 2} and len(everything) == 6
  sub = _ids(rr.episodes(str(tmp_path), 'Pong', 1, 'checkpoints:1-2', builder='rlu_atari'))
  assert sorted(sub) == [i for i in everything if i[0] >= 1]
  # suboptimal: checkpoint_id < 10 of the real run's 50 checkpoints -> all 3 here.
  assert sorted(_ids(rr.episodes(str(tmp_path), 'Pong', 1, 'suboptimal',
                                 builder='rlu_atari'))) == everything
  # The launch check accepts it (it refused every selection: no checkpoint splits to select).
  from scaled_ql.configs import ConfigError, get_config
  from scaled_ql.launch import run
  cfg = get_config('cpu_tiny').replace(
      games=('Pong',), data=dict(data_dir=str(tmp_path), builder='rlu_atari'))
  run.check_data(cfg)
  with pytest.raises(ConfigError, match=r"checkpoints:60-70: .*'checkpoint_60'.* do not exist"):
    run.check_data(cfg.replace(data=dict(selection='checkpoints:60-70')))


def test_summarize_first_episodes_only(tiny_dataset_dir):
  summary = rr.summarize(tiny_dataset_dir, 'Pong', max_episodes_per_split=1)
  assert sorted(summary) == [0, 1] and all(s.episodes == 1 for s in summary.values())


def _rewrite_record(path, index, make_bad):
  """Rewrites record `index` of a TFRecord file with make_bad(record), keeping valid framing."""
  records = list(tf.compat.v1.io.tf_record_iterator(path))
  with tf.io.TFRecordWriter(path) as w:
    for i, r in enumerate(records):
      w.write(make_bad(r) if i == index else r)
  return len(records)


def _broken_png(record):
  ex = tf.train.Example.FromString(record)
  ex.features.feature['steps/observation'].bytes_list.value[3] = b'not a png' * 10
  return ex.SerializeToString()


@pytest.mark.parametrize('make_bad', [lambda r: b'\x12\x34 garbage ' * 100, _broken_png],
                         ids=['garbage_proto', 'broken_png'])
def test_undecodable_episode_is_skipped_and_counted(tiny_dataset_dir, tmp_path, caplog, make_bad):
  data = str(tmp_path / 'data')
  shutil.copytree(tiny_dataset_dir, data)
  d = os.path.join(data, 'rlu_atari_checkpoints_ordered', 'Pong_run_1', '1.1.0')
  bad = os.path.join(d, 'rlu_atari_checkpoints_ordered-checkpoint_00.tfrecord-00000-of-00001')
  n = _rewrite_record(bad, 1, make_bad)
  assert n >= 2
  everything = _all_ids(tiny_dataset_dir, 'Pong')
  stats = rr.ReadStats()
  with caplog.at_level(logging.WARNING, logger='scaled_ql.datasets.rlds_reader'):
    got = _ids(rr.episodes(data, 'Pong', 1, 'near_optimal', stats=stats))
  assert stats.undecodable == [(bad, 1)] and stats.num_corrupt == 0
  assert stats.counts() == dict(episodes_read=len(everything) - 1, corrupt_files=0,
                                undecodable_episodes=1, malformed_episodes=0)
  assert any(bad in r.getMessage() and 'undecodable episode 1' in r.getMessage()
             for r in caplog.records)
  assert sorted(got) == [i for i in everything if i != (0, 1)]  # only the bad one is missing
  # Every episode that comes out decodes in full (the bad one never reaches a consumer).
  for ep in rr.episodes(data, 'Pong', 1, 'near_optimal'):
    assert ep['steps'].batch(10_000).get_single_element()['observation'].shape[1:] == (84, 84, 1)
  # With repeat it is counted once; strict mode raises, naming the file and record.
  stats = rr.ReadStats()
  _ids(rr.episodes(data, 'Pong', 1, 'near_optimal', repeat=True, stats=stats).take(3 * len(got)))
  assert stats.num_undecodable == 1 and stats.epochs >= 2
  with pytest.raises(Exception, match=r'undecodable episode 1 of .*checkpoint_00'):
    _ids(rr.episodes(data, 'Pong', 1, 'near_optimal', strict=True))


def test_stream_mixes_all_checkpoints_at_the_same_pace(many_checkpoints_dataset_dir):
  data = many_checkpoints_dataset_dir
  everything = _all_ids(data, 'Breakout')
  per_ckpt = {c: sum(1 for i in everything if i[0] == c) for c in range(10)}
  assert min(per_ckpt.values()) >= 3
  for seed in (0, 1):
    got = _ids(rr.episodes(data, 'Breakout', 1, 'near_optimal', seed=seed))
    assert sorted(got) == everything  # one epoch is the whole selection, once
    # Any stretch of the stream holds every checkpoint in proportion: the first 10 episodes
    # come from (nearly) all 10 checkpoints, and no checkpoint runs ahead of the others.
    assert len({c for c, _ in got[:10]}) >= 9
    for k in (10, len(got) // 2):
      for c, n in per_ckpt.items():
        seen = sum(1 for i in got[:k] if i[0] == c)
        assert abs(seen - k * n / len(everything)) <= 1.5, (seed, k, c)
  # Random episode offsets: a checkpoint's first episode is not always its episode 0.
  firsts = {tuple(_ids(rr.episodes(data, 'Breakout', 1, 'checkpoints:3-3', seed=s).take(1)))
            for s in range(6)}
  assert len(firsts) >= 2
  # One checkpoint at a time (cycle_length=1): the stream is checkpoint after checkpoint.
  got = _ids(rr.episodes(data, 'Breakout', 1, 'near_optimal', cycle_length=1))
  assert len({c for c, _ in got[:10]}) <= 4
  # Unshuffled: file order, each checkpoint from its first episode.
  got = _ids(rr.episodes(data, 'Breakout', 1, 'near_optimal', shuffle_files=False))
  assert got[0] == (0, 0) and sorted(got) == everything
  for c in per_ckpt:
    assert [i for i in got if i[0] == c] == [i for i in everything if i[0] == c]


def test_decoding_writes_no_file_a_killed_process_would_leave(tiny_dataset_dir, tmp_path):
  """AutoGraph writes the source of each function it converts to the temporary directory and
  removes it only at an orderly exit; a killed inserter left one per process. The decoder is
  not converted. A fresh process (nothing converted yet) reads one episode and exits at once."""
  import subprocess
  import sys
  tmp = tmp_path / 'tmp'
  tmp.mkdir()
  code = ('import os, sys\n'
          'from scaled_ql.datasets import rlds_reader as rr\n'
          'next(iter(rr.episodes(sys.argv[1], "Pong", 1, "near_optimal")))\n'
          'os._exit(0)  # no atexit handlers, as for a killed process\n')
  subprocess.run([sys.executable, '-c', code, tiny_dataset_dir], check=True, timeout=300,
                 env={**os.environ, 'TMPDIR': str(tmp)})
  assert [p.name for p in tmp.iterdir() if p.name.startswith('__autograph')] == []

"""Bad data (issue 12): an undecodable episode in a shard with valid TFRecord framing is skipped by
the inserter like a truncated shard, a malformed one is cut at its fault, and the counts reach the
node status, the progress line and the learner's metrics."""
import os
import shutil

import tensorflow as tf

from scaled_ql import configs
from scaled_ql.datasets import reverb_tables, rlds_reader
from scaled_ql.launch import program
from test_learner import CFG, make


def _with_undecodable_episode(tiny_dataset_dir, tmp_path, game='Pong', checkpoint=1, index=0):
  """A copy of the data whose episode `index` of `checkpoint` is garbage in valid framing."""
  data = str(tmp_path / 'data')
  shutil.copytree(tiny_dataset_dir, data)
  path = os.path.join(data, 'rlu_atari_checkpoints_ordered', f'{game}_run_1', '1.1.0',
                      f'rlu_atari_checkpoints_ordered-checkpoint_{checkpoint:02d}.tfrecord-'
                      '00000-of-00001')
  records = list(tf.compat.v1.io.tf_record_iterator(path))
  assert len(records) > index
  with tf.io.TFRecordWriter(path) as w:
    for i, r in enumerate(records):
      w.write(b'\x0a\xff garbage' * 50 if i == index else r)
  return data, path


def test_inserter_skips_an_undecodable_episode_and_counts_it(tiny_dataset_dir, tmp_path):
  data, bad = _with_undecodable_episode(tiny_dataset_dir, tmp_path)
  cfg = configs.get_config('cpu_tiny').replace(
      data=dict(data_dir=data, selection='near_optimal', shuffle_buffer_per_game=5000))
  good = sum(int(ep['steps'].cardinality()) - 1
             for ep in rlds_reader.episodes(tiny_dataset_dir, 'Pong', 1, 'near_optimal')
             if (int(ep['checkpoint_id']), int(ep['episode_id'])) != (1, 0))
  stats = rlds_reader.ReadStats()
  server = reverb_tables.make_server(cfg)
  try:
    address = f'localhost:{server.port}'
    items = reverb_tables.run_inserter(
        address, cfg, ['Pong'], reverb_tables.rlds_episode_source(cfg, repeat=False, stats=stats),
        repeat=False)
    assert items == good == reverb_tables.table_sizes(address, ['Pong'])['Pong']
  finally:
    server.stop()
  assert stats.undecodable == [(bad, 0)]
  assert stats.counts()['undecodable_episodes'] == 1 and stats.counts()['corrupt_files'] == 0


def _with_malformed_episode(data, game='Breakout', checkpoint=0, index=0, step=100):
  """Makes episode `index` of `checkpoint` in the data copy `data` decode but break the RLDS
  convention: its step `step` is terminal, and steps follow it. Returns the file's path."""
  path = os.path.join(data, 'rlu_atari_checkpoints_ordered', f'{game}_run_1', '1.1.0',
                      f'rlu_atari_checkpoints_ordered-checkpoint_{checkpoint:02d}.tfrecord-'
                      '00000-of-00001')
  records = list(tf.compat.v1.io.tf_record_iterator(path))
  example = tf.train.Example.FromString(records[index])
  terminal = example.features.feature['steps/is_terminal'].int64_list.value
  assert len(terminal) > step + 1 and not terminal[step]
  terminal[step] = 1
  records[index] = example.SerializeToString()
  with tf.io.TFRecordWriter(path) as w:
    for r in records:
      w.write(r)
  return path


def test_inserter_cuts_a_malformed_tfds_episode_short_and_counts_it(tiny_dataset_dir, tmp_path):
  """A decodable episode with a terminal step before its last, in real TFDS files: the inserter
  keeps its transitions before the fault, names it by its checkpoint and episode ids, counts it
  and goes on (tests/test_reverb.py has the windows' equality with the numpy reference)."""
  data = str(tmp_path / 'data')
  shutil.copytree(tiny_dataset_dir, data)
  _with_malformed_episode(data, step=100)
  cfg = configs.get_config('cpu_tiny').replace(
      data=dict(data_dir=data, selection='checkpoints:0-0', shuffle_buffer_per_game=5000))
  lengths = {(int(ep['checkpoint_id']), int(ep['episode_id'])): int(ep['steps'].cardinality())
             for ep in rlds_reader.episodes(tiny_dataset_dir, 'Breakout', 1, 'checkpoints:0-0')}
  assert len(lengths) >= 2 and lengths[(0, 0)] > 101
  n = cfg.agent.n_step
  want = sum(length - 1 for key, length in lengths.items() if key != (0, 0)) + 100 - n
  stats = rlds_reader.ReadStats()
  server = reverb_tables.make_server(cfg)
  try:
    address = f'localhost:{server.port}'
    items = reverb_tables.run_inserter(
        address, cfg, ['Breakout'],
        reverb_tables.rlds_episode_source(cfg, repeat=False, stats=stats), repeat=False,
        stats=stats)
    assert items == want == reverb_tables.table_sizes(address, ['Breakout'])['Breakout']
  finally:
    server.stop()
  assert stats.malformed == {('Breakout', 'checkpoint_id 0, episode_id 0')}
  assert stats.counts()['malformed_episodes'] == 1 and stats.counts()['undecodable_episodes'] == 0


def test_counts_appear_in_the_progress_line():
  inserters = [dict(name='inserter_0', data=dict(episodes_read=9, corrupt_files=1,
                                                 undecodable_episodes=2, malformed_episodes=4)),
               dict(name='inserter_1', data=dict(episodes_read=5, corrupt_files=0,
                                                 undecodable_episodes=1)),
               None]  # a node that did not answer this time
  status = program.ProgramStatus(learner=None, replay=None, evaluators=[], actors=[],
                                 inserters=inserters)
  assert status.data_counts() == dict(corrupt_files=1, undecodable_episodes=3,
                                      malformed_episodes=4)
  line = program.format_progress(status, started=0.0)
  assert ('bad data skipped: 1 corrupt files, 3 undecodable episodes, 4 malformed episodes cut '
          'at their fault'
          in line)
  clean = program.ProgramStatus(None, None, [], [], inserters=[dict(data={})])
  assert 'bad data' not in program.format_progress(clean, started=0.0)


class _Capture:
  def __init__(self):
    self.rows = []

  def write(self, step, metrics):
    self.rows.append((step, dict(metrics)))

  def close(self):
    pass


def test_counts_appear_in_the_learners_metrics():
  logger = _Capture()
  learner = make(CFG.replace(train=dict(log_every_steps=1)), logger=logger)
  learner.step()
  learner.set_data_counts(dict(corrupt_files=1, undecodable_episodes=3))
  learner.step()
  learner.step()
  learner.close()
  assert 'data/undecodable_episodes' not in logger.rows[0][1]
  assert logger.rows[-1][1]['data/undecodable_episodes'] == 3.0
  assert logger.rows[-1][1]['data/corrupt_files'] == 1.0

"""`scaled-ql data download` against a local directory laid out like gs://rl_unplugged.

The fake bucket is written by the real generator (emulator + TFDS writer) in the real layout; the
copies are read back by TFDS and `rlds_reader`, and by our verifier.
"""
import filecmp
import os
import shutil

import pytest

from scaled_ql.datasets import download, rlds_reader

GAMES = ('Pong', 'Breakout')
CHECKPOINTS = 10  # suboptimal = the first 20% = checkpoint_00, checkpoint_01


@pytest.fixture(scope='module')
def bucket(tmp_path_factory) -> str:
  """A TFDS data dir like gs://rl_unplugged/tensorflow_datasets (2 games x 10 splits, tiny)."""
  from scaled_ql.datasets import generate
  out = str(tmp_path_factory.mktemp('bucket'))
  generate.generate(GAMES, out, run=1, num_checkpoints=CHECKPOINTS, steps_per_checkpoint=40,
                    seed=0, max_episode_frames=160, progress=False)
  return out


def _version_dir(root, game):
  return os.path.join(root, 'rlu_atari_checkpoints_ordered', f'{game}_run_1', '1.1.0')


def _shards(root, game):
  d = _version_dir(root, game)
  return sorted(f for f in os.listdir(d) if '.tfrecord-' in f)


def _flip_byte(path, offset):
  with open(path, 'r+b') as f:
    f.seek(offset)
    b = f.read(1)
    f.seek(offset)
    f.write(bytes([b[0] ^ 0xFF]))


def test_suboptimal_copies_only_its_splits_and_reads_back(bucket, tmp_path, capsys):
  from scaled_ql import cli
  out = str(tmp_path / 'data')
  rc = cli.main(['data', 'download', '--games', ','.join(GAMES), '--selection', 'suboptimal',
                 '--out', out, '--source', bucket, '--no-progress'])
  text = capsys.readouterr().out
  assert rc == 0, text
  assert 'checkpoint_00..checkpoint_01 (2 of 10 splits)' in text
  assert 'needs ' in text and 'every file verified' in text
  for game in GAMES:
    src, dst = _version_dir(bucket, game), _version_dir(out, game)
    copied = _shards(out, game)
    assert copied == [s for s in _shards(bucket, game)
                      if '-checkpoint_00.' in s or '-checkpoint_01.' in s]
    for name in copied + ['dataset_info.json', 'features.json']:
      assert filecmp.cmp(os.path.join(src, name), os.path.join(dst, name), shallow=False)
    assert not [f for f in os.listdir(dst) if f.endswith(download.PARTIAL_SUFFIX)]
    # The copy reads as the bucket does for the selection it was made for.
    n_src = sum(1 for _ in rlds_reader.episodes(bucket, game, 1, 'suboptimal', strict=True))
    n_dst = sum(1 for _ in rlds_reader.episodes(out, game, 1, 'suboptimal', strict=True))
    assert n_src == n_dst > 0
  assert cli.main(['data', 'inspect', '--data-dir', out]) == 0
  text = capsys.readouterr()
  assert 'Pong run 1' in text.out and 'checkpoint_01' in text.out
  assert 'not on disk (a partial download?): 8 splits, checkpoint_02' in text.out
  assert 'corrupt' not in text.err
  # A run that needs the splits the copy lacks is refused before it starts (it trained on a part
  # of its data before, with a warning per missing file); one of the copy's selection runs.
  from scaled_ql.configs import ConfigError, get_config
  from scaled_ql.launch import run
  cfg = get_config('cpu_tiny').replace(games=tuple(GAMES), data=dict(data_dir=out))
  run.check_data(cfg.replace(data=dict(selection='suboptimal')))
  with pytest.raises(ConfigError, match=r"needs checkpoint split\(s\) \[2, 3, 4, 5, 6, 7, 8, 9\] "
                     r"whose files are not on disk.*scaled-ql data download"):
    run.check_data(cfg.replace(data=dict(selection='near_optimal')))


def test_dry_run_prints_sizes_and_copies_nothing(bucket, tmp_path, capsys):
  from scaled_ql import cli
  out = tmp_path / 'data'
  rc = cli.main(['data', 'download', '--games', 'Pong', '--selection', 'checkpoints:3-4',
                 '--out', str(out), '--source', bucket, '--dry-run'])
  assert rc == 0
  text = capsys.readouterr().out
  plan = download.plan_download(['Pong'], 'checkpoints:3-4', str(out), bucket)
  # dataset_info.json is copied last (after features.json): it marks a finished copy.
  assert os.path.basename(plan.games[0].files[-1].dest) == 'dataset_info.json'
  src = _version_dir(bucket, 'Pong')
  names = [s for s in _shards(bucket, 'Pong') if '-checkpoint_03.' in s or '-checkpoint_04.' in s]
  meta = [f for f in os.listdir(src) if '.tfrecord-' not in f]
  assert plan.total_bytes == sum(os.path.getsize(os.path.join(src, f)) for f in names + meta)
  total = download.format_bytes(plan.total_bytes)
  assert f'total {total} in {len(names) + len(meta)} files' in text
  assert not out.exists()


def test_interrupted_copy_resumes_where_it_stopped(bucket, tmp_path):
  out = str(tmp_path / 'data')
  plan = download.plan_download(['Pong'], 'suboptimal', out, bucket)
  first = plan.files[0]
  assert first.split == 'checkpoint_00' and first.size > 3 * 1024

  def interrupt_after_two_chunks(n, seen=[]):  # pylint: disable=dangerous-default-value
    seen.append(n)
    if len(seen) == 2:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    download.download(plan, progress=False, on_bytes=interrupt_after_two_chunks, chunk_bytes=1024)
  assert not os.path.exists(first.dest)
  assert os.path.getsize(first.partial) == 2048  # what was written before the interruption

  result = download.download(plan, progress=False, log=lambda _: None, chunk_bytes=1024)
  assert result.bytes_copied == plan.total_bytes - 2048  # continued, not restarted
  assert first.dest in result.copied and not os.path.exists(first.partial)
  assert filecmp.cmp(first.source, first.dest, shallow=False)
  # A second run finds every file in place, verifies it and copies nothing.
  again = download.download(plan, progress=False)
  assert again.bytes_copied == 0 and sorted(again.kept) == sorted(f.dest for f in plan.files)


def test_bad_partial_and_corrupt_destination_are_copied_again(bucket, tmp_path):
  out = str(tmp_path / 'data')
  plan = download.plan_download(['Pong'], 'suboptimal', out, bucket)
  shard0, shard1 = plan.files[0], plan.files[1]
  download.download(plan, progress=False)
  # A finished file damaged afterwards, and a .partial whose bytes are not the source's.
  _flip_byte(shard0.dest, shard0.size // 2)
  os.remove(shard1.dest)
  with open(shard1.partial, 'wb') as f:
    f.write(b'\x07' * 100)
  messages = []
  result = download.download(plan, progress=False, log=messages.append)
  assert [d for d, _ in result.recopied] == [shard0.dest]
  assert 'data CRC mismatch' in result.recopied[0][1]
  assert any('resumed copy fails verification' in m and shard1.partial in m for m in messages)
  for f in (shard0, shard1):
    assert filecmp.cmp(f.source, f.dest, shallow=False)
    assert not os.path.exists(f.partial)


def test_corrupt_source_shard_fails_naming_the_file(bucket, tmp_path, capsys):
  from scaled_ql import cli
  mirror = str(tmp_path / 'mirror')
  shutil.copytree(bucket, mirror)
  bad = os.path.join(_version_dir(mirror, 'Pong'), _shards(mirror, 'Pong')[0])
  _flip_byte(bad, os.path.getsize(bad) // 2)
  out = str(tmp_path / 'data')
  rc = cli.main(['data', 'download', '--games', 'Pong,Breakout', '--out', out,
                 '--source', mirror, '--no-progress'])
  err = capsys.readouterr().err
  assert rc == 1
  assert os.path.basename(bad) in err and 'data CRC mismatch' in err
  # The damaged game is not left looking complete (no dataset_info.json); the other game is.
  assert not os.path.exists(bad.replace(mirror, out)) and os.listdir(_version_dir(out, 'Pong'))
  assert not os.path.exists(os.path.join(_version_dir(out, 'Pong'), 'dataset_info.json'))
  assert os.path.exists(os.path.join(_version_dir(out, 'Breakout'), 'dataset_info.json'))


def test_verifier_checks_framing_crcs_and_counts(tmp_path):
  import tensorflow as tf
  path = str(tmp_path / 'x.tfrecord')
  records = [b'a' * 10, b'', os.urandom(5000)]
  with tf.io.TFRecordWriter(path) as w:  # TensorFlow's own writer
    for r in records:
      w.write(r)
  size = os.path.getsize(path)
  assert size == sum(16 + len(r) for r in records)
  assert download.verify_tfrecord(path, size, 3) == 3
  with pytest.raises(download.CorruptFileError, match='3 records, dataset_info.json says 4'):
    download.verify_tfrecord(path, size, 4)
  with pytest.raises(download.CorruptFileError, match=f'{size} bytes, the source has {size + 1}'):
    download.verify_tfrecord(path, size + 1)
  bad = str(tmp_path / 'bad.tfrecord')
  shutil.copy(path, bad)
  _flip_byte(bad, 16 + 10 + 3)  # record 1's length field (record 0 is 16 + 10 bytes)
  with pytest.raises(download.CorruptFileError, match='record 1 at byte 26: length CRC mismatch'):
    download.verify_tfrecord(bad)
  shutil.copy(path, bad)
  _flip_byte(bad, size - 100)  # inside record 2's data
  with pytest.raises(download.CorruptFileError, match='record 2 at byte 42: data CRC mismatch'):
    download.verify_tfrecord(bad)
  with open(path, 'rb') as f:
    head = f.read(size - 10)
  with open(bad, 'wb') as f:
    f.write(head)
  with pytest.raises(download.CorruptFileError, match='record 2 at byte 42: truncated'):
    download.verify_tfrecord(bad)


def test_bad_input_is_named_before_any_copy(bucket, tmp_path, capsys):
  from scaled_ql import cli
  out = str(tmp_path / 'data')
  cases = [(['--games', 'Pongg'], 'Pongg'),
           (['--games', 'Boxing'], 'configs present'),
           (['--games', 'Pong', '--selection', 'best'], "unknown data selection 'best'"),
           (['--games', 'Pong', '--selection', 'checkpoints:8-12'], 'checkpoint_10'),
           (['--games', 'Pong', '--run', '7'], 'run must be in 1..5'),
           (['--games', 'Pong', '--source', str(tmp_path / 'nowhere')], 'no such directory')]
  for flags, message in cases:
    rc = cli.main(['data', 'download', '--out', out, '--source', bucket, '--no-progress'] + flags)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, (flags, err)
  with pytest.raises(ValueError, match='must be a local directory'):
    download.plan_download(['Pong'], 'suboptimal', 'gs://somewhere/data', bucket)
  assert not os.path.exists(out)


def test_not_enough_space_is_an_error_before_copying(bucket, tmp_path):
  plan = download.plan_download(['Pong'], 'suboptimal', str(tmp_path / 'data'), bucket)
  huge = download.FileToCopy('Pong', 'checkpoint_00', plan.files[0].source,
                             plan.files[0].dest, 1 << 50, 1)
  game = plan.games[0]
  too_big = download.Plan(plan.source, plan.out, plan.run, plan.selection,
                          (download.GamePlan(game.game, game.source_dir, game.dest_dir,
                                             game.splits, game.num_splits, (huge,)),))
  with pytest.raises(download.NotEnoughSpaceError, match='the copy needs 1024.00 TiB more'):
    download.download(too_big, progress=False)
  assert not os.path.exists(huge.partial)


def test_progress_shows_bytes_rate_and_eta(bucket, tmp_path, capsys):
  plan = download.plan_download(['Breakout'], 'suboptimal', str(tmp_path / 'data'), bucket)
  download.download(plan, progress=True, chunk_bytes=4096)
  err = capsys.readouterr().err
  assert 'download: 100%' in err and 'B/s' in err and '<00:00' in err  # elapsed<remaining


def test_generate_is_quiet_unless_verbose(tmp_path, capfd, caplog):
  import logging

  from scaled_ql import cli
  caplog.set_level(logging.INFO)  # the CLI's logging.basicConfig(level=INFO) (pytest owns root)
  scaled_ql_logger = logging.getLogger('scaled_ql')
  saved_level = scaled_ql_logger.level
  args = ['data', 'generate', '--games', 'Pong', '--checkpoints', '1',
          '--steps-per-checkpoint', '10', '--max-episode-frames', '40', '--no-progress']
  assert cli.main(args + ['--out', str(tmp_path / 'a')]) == 0
  quiet, quiet_log = capfd.readouterr(), caplog.text
  caplog.clear()
  try:
    assert cli.main(args + ['--out', str(tmp_path / 'b'), '--verbose']) == 0
  finally:
    scaled_ql_logger.setLevel(saved_level)
  verbose, verbose_log = capfd.readouterr(), caplog.text
  assert 'Downloading and preparing dataset' not in quiet.out + quiet.err
  assert 'Downloading and preparing dataset' in verbose.out
  assert 'Done writing' not in quiet_log and 'Done writing' in verbose_log  # TFDS, per split
  assert 'Pong: ' in quiet.out and 'Pong: 10 steps' in quiet_log  # our own lines stay

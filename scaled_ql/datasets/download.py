"""Copy only the RL Unplugged `rlu_atari_checkpoints_ordered` shards a data selection needs.

    from scaled_ql.datasets import download
    plan = download.plan_download(['Pong', 'Breakout'], 'suboptimal', 'data/rlu')
    print(plan.describe())          # splits, files and bytes per game, before anything is copied
    download.download(plan)         # copy, resume, verify

The source is a TFDS data dir laid out like `gs://rl_unplugged/tensorflow_datasets` (the default;
a mirror may be a local path or any URL `tf.io.gfile` reads):

    {source}/rlu_atari_checkpoints_ordered/{Game}_run_{run}/1.1.0/
        dataset_info.json, features.json, ...
        rlu_atari_checkpoints_ordered-checkpoint_NN.tfrecord-SSSSS-of-TTTTT

Which files a split has comes from the source's own dataset_info.json, read by TFDS itself
(`rlds_reader.load_builder`: `split.filepaths`, `split.shard_lengths`), and which splits a selection
needs from `rlds_reader.selected_checkpoints`, the same code the reader uses: `suboptimal` is the
first 20% of the splits (checkpoint_00..09 of 50), `checkpoints:A-B` those splits, and
`near_optimal` / `uniform:P` every split (a uniform selection keeps P% of each split's episodes at
read time, so it needs every file). The copy lands in `{out}` under the same relative paths, so
`scaled-ql data inspect --data-dir OUT` and training with `data.data_dir=OUT` read it as they read
the bucket. dataset_info.json is copied whole (it lists all splits), so a selection keeps its
meaning on the copy; the splits that were not copied are simply absent.

Resuming and verifying: each file is copied to `NAME.partial` and renamed when complete and
verified; an interrupted run leaves the `.partial` file, and the next run continues it from its
length. A file already in place is verified, not trusted; one that fails is copied again. A shard
is verified by reading its TFRecord framing: every record's header
(uint64 length, masked CRC32C of the length) and its data's masked CRC32C (google-crc32c, the C
implementation), the file size against the source's, and the record count against
dataset_info.json's shard length. Shards are copied before the game's metadata files, so a
dataset_info.json in `out` means that game's copy finished.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import time
from typing import Callable, Optional, Sequence

from scaled_ql import games as games_lib
from scaled_ql.datasets import tfds_layout

DEFAULT_SOURCE = tfds_layout.PUBLIC_DATA_DIR
PARTIAL_SUFFIX = '.partial'
CHUNK_BYTES = 8 << 20


class DownloadError(RuntimeError):
  """Some files could not be copied or failed verification (the message lists them)."""


class CorruptFileError(ValueError):
  """A file that fails verification; the message names the file, the byte offset and the fault."""


class NotEnoughSpaceError(ValueError):
  """The output disk has less free space than the copy still needs."""


@dataclasses.dataclass(frozen=True)
class FileToCopy:
  game: str
  split: Optional[str]  # checkpoint_NN for a shard; None for a metadata file
  source: str
  dest: str
  size: int  # bytes, as the source reports them
  num_records: Optional[int] = None  # shards: dataset_info.json's shard length

  @property
  def partial(self) -> str:
    return self.dest + PARTIAL_SUFFIX


@dataclasses.dataclass(frozen=True)
class GamePlan:
  game: str
  source_dir: str  # the version dir in the source
  dest_dir: str
  splits: tuple[str, ...]  # the splits the selection needs
  num_splits: int  # splits the dataset has
  files: tuple[FileToCopy, ...]  # shards first, then metadata

  @property
  def bytes(self) -> int:
    return sum(f.size for f in self.files)


@dataclasses.dataclass(frozen=True)
class Plan:
  source: str
  out: str
  run: int
  selection: str
  games: tuple[GamePlan, ...]

  @property
  def files(self) -> tuple[FileToCopy, ...]:
    return tuple(f for g in self.games for f in g.files)

  @property
  def total_bytes(self) -> int:
    return sum(f.size for f in self.files)

  def bytes_on_disk(self) -> int:
    """Bytes of the plan's files already in `out` (finished files and .partial prefixes)."""
    return sum(_bytes_present(f) for f in self.files)

  def describe(self) -> str:
    lines = [f'{tfds_layout.ORDERED_BUILDER} run {self.run}, selection {self.selection!r}',
             f'  from {self.source}', f'  to   {self.out}']
    for g in self.games:
      shards = sum(1 for f in g.files if f.split)
      lines.append(f'  {g.game:<16}{_split_range(g.splits)} ({len(g.splits)} of {g.num_splits} '
                   f'splits): {shards} shards + {len(g.files) - shards} metadata files, '
                   f'{format_bytes(g.bytes)}')
    present = self.bytes_on_disk()
    lines.append(f'  total {format_bytes(self.total_bytes)} in {len(self.files)} files; '
                 f'already in {self.out}: {format_bytes(present)}; to copy: '
                 f'{format_bytes(self.total_bytes - present)}')
    return '\n'.join(lines)


@dataclasses.dataclass
class Result:
  copied: list = dataclasses.field(default_factory=list)  # dest paths copied (or completed)
  kept: list = dataclasses.field(default_factory=list)  # dest paths already there and verified
  recopied: list = dataclasses.field(default_factory=list)  # (dest, reason) found bad and replaced
  failed: list = dataclasses.field(default_factory=list)  # (dest, reason) still bad
  bytes_copied: int = 0
  seconds: float = 0.0


def format_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024
  raise AssertionError('unreachable')


def _split_range(splits: Sequence[str]) -> str:
  if not splits:
    return 'no splits'
  return splits[0] if len(splits) == 1 else f'{splits[0]}..{splits[-1]}'


# ---- planning ------------------------------------------------------------------------------------
def _is_url(path: str) -> bool:
  return '://' in path


def plan_download(games: Sequence[str], selection: str, out: str,
                  source: Optional[str] = DEFAULT_SOURCE, run: int = 1) -> Plan:
  """The files `selection` needs for each game, with their sizes (reads only metadata).

  Errors name the game, split or file at fault: an unknown game or selection, a game/run the
  source lacks (listing what it has), or a shard dataset_info.json lists but the source lacks.
  """
  source = source or DEFAULT_SOURCE
  games = games_lib.check_games(list(games), '--games')
  run = tfds_layout.check_run(run)
  if not games:
    raise ValueError('--games: no games given')
  if _is_url(out):
    raise ValueError(f'--out {out}: must be a local directory (share it over NFS or similar; '
                     'see README "Getting the data")')
  import tensorflow as tf

  from scaled_ql.datasets import rlds_reader
  sel = rlds_reader.parse_selection(selection)
  out = os.path.abspath(out)
  if not tf.io.gfile.isdir(source):
    if _is_url(source):  # gfile cannot tell "unreachable" or "forbidden" from "absent"
      raise FileNotFoundError(
          f'--source {source}: cannot be read (no network, no access, or no longer served: the '
          'original DQN-Replay bucket has answered 403 since 2025); copy from a mirror with '
          '--source (README "Getting the data")')
    raise FileNotFoundError(f'--source {source}: no such directory')
  plans = []
  for game in games:
    try:
      plans.append(_plan_game(tf, rlds_reader, sel, game, run, source, out))
    except tf.errors.OpError as e:  # e.g. 403 from a bucket that is no longer served
      raise FileNotFoundError(
          f'{game}: cannot read the source {source}: {type(e).__name__}: {e.message} (if the '
          'bucket is unavailable, copy from a mirror with --source; README "Getting the '
          'data")') from e
  return Plan(source=source, out=out, run=run, selection=selection, games=tuple(plans))


def _plan_game(tf, rlds_reader, sel, game: str, run: int, source: str, out: str) -> GamePlan:
  b = rlds_reader.load_builder(source, game, run, tfds_layout.ORDERED_BUILDER)
  src_dir = os.fspath(b.data_path)
  rel = os.path.join(tfds_layout.ORDERED_BUILDER, tfds_layout.config_name(game, run),
                     str(b.version))
  dest_dir = os.path.join(out, rel)
  available = rlds_reader.available_checkpoints(b)
  if not available:
    raise rlds_reader.DatasetNotFoundError(
        f'{game}: {src_dir}/dataset_info.json lists no checkpoint_NN splits')
  checkpoints = rlds_reader.selected_checkpoints(sel, available)
  shards, shard_names = [], set()
  for c in checkpoints:
    split = tfds_layout.split_name(c)
    info = b.info.splits[split]
    for path, n in zip(info.filepaths, info.shard_lengths):
      path = os.fspath(path)
      name = os.path.basename(path)
      shard_names.add(name)
      shards.append(FileToCopy(game, split, path, os.path.join(dest_dir, name),
                               _source_size(tf, path, game, split), int(n)))
  metadata = []
  prefix = f'{tfds_layout.ORDERED_BUILDER}-'
  # dataset_info.json last: its presence says the game's copy finished (README, docs).
  for name in sorted(tf.io.gfile.listdir(src_dir), key=lambda n: (n == 'dataset_info.json', n)):
    path = os.path.join(src_dir, name)
    if name.endswith('/') or name in shard_names or tf.io.gfile.isdir(path):
      continue
    if name.startswith(prefix) and '.tfrecord-' in name:
      continue  # a shard of a split the selection does not need
    metadata.append(FileToCopy(game, None, path, os.path.join(dest_dir, name),
                               _source_size(tf, path, game, None)))
  return GamePlan(game, src_dir, dest_dir,
                  tuple(tfds_layout.split_name(c) for c in checkpoints), len(available),
                  tuple(shards + metadata))


def _source_size(tf, path: str, game: str, split: Optional[str]) -> int:
  try:
    return int(tf.io.gfile.stat(path).length)
  except tf.errors.NotFoundError as e:
    what = f'{split} shard' if split else 'metadata file'
    raise FileNotFoundError(f'{game}: {what} {path} is listed in the source but cannot be read '
                            f'there: {e.message}') from e


def _bytes_present(f: FileToCopy) -> int:
  if os.path.isfile(f.dest):
    return min(os.path.getsize(f.dest), f.size)
  if os.path.isfile(f.partial):
    return min(os.path.getsize(f.partial), f.size)
  return 0


def _free_bytes(path: str) -> int:
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return shutil.disk_usage(path).free


def check_space(plan: Plan) -> tuple[int, int]:
  """(bytes still to copy, free bytes); raises NotEnoughSpaceError if they do not fit."""
  needed = plan.total_bytes - plan.bytes_on_disk()
  free = _free_bytes(plan.out)
  if needed > free:
    raise NotEnoughSpaceError(
        f'--out {plan.out}: the copy needs {format_bytes(needed)} more but the disk has '
        f'{format_bytes(free)} free (total for this selection: {format_bytes(plan.total_bytes)})')
  return needed, free


# ---- verification --------------------------------------------------------------------------------
_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC32C: rotate the CRC right by 15 bits and add a constant."""
  import google_crc32c
  return _mask(google_crc32c.value(data))


def _mask(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def verify_tfrecord(path: str, expected_size: Optional[int] = None,
                    expected_records: Optional[int] = None,
                    chunk_bytes: int = CHUNK_BYTES) -> int:
  """Reads a local TFRecord file's framing and checks every CRC; returns the number of records.

  Each record is: uint64 length, uint32 masked CRC32C of those 8 bytes, `length` bytes of data,
  uint32 masked CRC32C of the data (all little-endian). Raises CorruptFileError naming the file,
  the record and its byte offset for a wrong size, a truncated record, a CRC mismatch or a record
  count other than `expected_records`.
  """
  import google_crc32c
  size = os.path.getsize(path)
  if expected_size is not None and size != expected_size:
    raise CorruptFileError(f'{path}: {size} bytes, the source has {expected_size}')
  n = offset = 0
  with open(path, 'rb') as f:
    while offset < size:
      header = f.read(12)
      if len(header) < 12:
        raise CorruptFileError(f'{path}: record {n} at byte {offset}: truncated header '
                               f'({len(header)} of 12 bytes)')
      (length,) = struct.unpack('<Q', header[:8])
      (length_crc,) = struct.unpack('<I', header[8:])
      if masked_crc32c(header[:8]) != length_crc:
        raise CorruptFileError(f'{path}: record {n} at byte {offset}: length CRC mismatch '
                               '(corrupt record header)')
      if offset + 16 + length > size:
        raise CorruptFileError(f'{path}: record {n} at byte {offset}: truncated ({length} data '
                               f'bytes + footer do not fit in the {size}-byte file)')
      crc, left = 0, length
      while left:
        chunk = f.read(min(left, chunk_bytes))
        crc = google_crc32c.extend(crc, chunk)
        left -= len(chunk)
      (data_crc,) = struct.unpack('<I', f.read(4))
      if _mask(crc) != data_crc:
        raise CorruptFileError(f'{path}: record {n} at byte {offset}: data CRC mismatch '
                               f'({length}-byte record)')
      offset += 16 + length
      n += 1
  if expected_records is not None and n != expected_records:
    raise CorruptFileError(f'{path}: {n} records, dataset_info.json says {expected_records}')
  return n


def verify_file(f: FileToCopy, path: Optional[str] = None) -> None:
  """Shards: size, framing, CRCs and record count. Metadata files: size."""
  path = path or f.dest
  if f.split is None:
    size = os.path.getsize(path)
    if size != f.size:
      raise CorruptFileError(f'{path}: {size} bytes, the source has {f.size}')
    return
  verify_tfrecord(path, f.size, f.num_records)


# ---- copying -------------------------------------------------------------------------------------
def download(plan: Plan, *, progress: bool = True, log: Callable[[str], None] = print,
             on_bytes: Optional[Callable[[int], None]] = None,
             chunk_bytes: int = CHUNK_BYTES) -> Result:
  """Copies and verifies every file of `plan` (see the module docstring); returns what it did.

  Files already in place are verified and kept (or copied again if they fail); `.partial` files
  are continued. `on_bytes(n)` is called after every chunk written. Raises DownloadError, after
  trying every file, listing the files that could not be copied or failed verification.
  """
  import tensorflow as tf
  import tqdm
  check_space(plan)
  result = Result()
  start = time.time()
  bar = tqdm.tqdm(total=plan.total_bytes - plan.bytes_on_disk(), unit='B', unit_scale=True,
                  unit_divisor=1024, desc='download', disable=not progress, dynamic_ncols=True)

  def advance(n: int) -> None:
    bar.update(n)
    result.bytes_copied += n
    if on_bytes is not None:
      on_bytes(n)

  try:
    for g in plan.games:
      os.makedirs(g.dest_dir, exist_ok=True)
      bar.set_postfix_str(g.game)
      game_failed = False
      for f in g.files:
        if f.split is None and game_failed and os.path.basename(f.dest) == 'dataset_info.json':
          # Without all its other files the game's copy is incomplete: no dataset_info.json
          # (copied last), so nothing reads it as finished.
          result.failed.append((f.dest, 'not copied: another file of this game failed'))
          continue
        if not _place(tf, f, result, advance, chunk_bytes, log):
          game_failed = True
  finally:
    bar.close()
  result.seconds = time.time() - start
  if result.failed:
    raise DownloadError(
        f'{len(result.failed)} file(s) could not be copied or failed verification:\n' +
        '\n'.join(f'  {d}: {why}' for d, why in result.failed) +
        '\n(the source copy may be damaged; run again to retry, or use another --source)')
  return result


def _place(tf, f: FileToCopy, result: Result, advance, chunk_bytes: int, log) -> bool:
  """One file into place, verified. Returns False (and records why) if that fails."""
  if os.path.isfile(f.dest):
    try:
      verify_file(f)
      result.kept.append(f.dest)
      return True
    except CorruptFileError as e:
      log(f'{f.dest} fails verification ({e}); copying it again')
      result.recopied.append((f.dest, str(e)))
      os.remove(f.dest)
  resumed = os.path.isfile(f.partial) and 0 < os.path.getsize(f.partial) <= f.size
  for attempt in ('resume', 'fresh') if resumed else ('fresh',):
    try:
      _copy(tf, f, advance, chunk_bytes, resume=attempt == 'resume')
      verify_file(f, f.partial)
    except CorruptFileError as e:
      os.remove(f.partial)
      if attempt == 'resume':
        log(f'{f.partial}: the resumed copy fails verification ({e}); copying it from the start')
        continue
      result.failed.append((f.dest, str(e)))
      return False
    except (tf.errors.OpError, OSError) as e:
      result.failed.append((f.dest, f'copy failed: {type(e).__name__}: {e}'))
      return False
    os.replace(f.partial, f.dest)
    result.copied.append(f.dest)
    return True
  return False


def _copy(tf, f: FileToCopy, advance, chunk_bytes: int, resume: bool) -> None:
  """Source -> dest.partial, continuing an existing .partial when `resume`."""
  offset = os.path.getsize(f.partial) if resume else 0
  with tf.io.gfile.GFile(f.source, 'rb') as src, open(f.partial, 'ab' if resume else 'wb') as dst:
    if offset:
      src.seek(offset)
    while True:
      chunk = src.read(chunk_bytes)
      if not chunk:
        break
      dst.write(chunk)
      dst.flush()
      advance(len(chunk))
    dst.flush()
    os.fsync(dst.fileno())


# ---- the command ---------------------------------------------------------------------------------
def download_selection(games: Sequence[str], selection: str, out: str,
                       source: Optional[str] = DEFAULT_SOURCE, run: int = 1, *,
                       dry_run: bool = False, progress: bool = True,
                       log: Callable[[str], None] = print
                       ) -> Optional[Result]:
  """`scaled-ql data download`: plan, print the plan and the space it needs, then copy.

  With `dry_run` only the plan is printed (and None returned).
  """
  plan = plan_download(games, selection, out, source, run)
  log(plan.describe())
  if dry_run:
    return None
  needed, free = check_space(plan)
  log(f'needs {format_bytes(needed)} more on {plan.out} ({format_bytes(free)} free)')
  result = download(plan, progress=progress, log=log)
  rate = result.bytes_copied / max(result.seconds, 1e-9)
  log(f'done: {len(result.copied)} files copied ({format_bytes(result.bytes_copied)}, '
      f'{format_bytes(rate)}/s), {len(result.kept)} already in place and verified, '
      f'{len(result.recopied)} replaced after failing verification; every file verified')
  return result

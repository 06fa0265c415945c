"""Read RL Unplugged Atari episodes (RLDS, via TFDS) for one game and run, with the paper's data
selections, sharding over inserter workers, infinite repeat and corrupt-shard tolerance.

    ds = rlds_reader.episodes('gs://rl_unplugged/tensorflow_datasets', 'Pong', run=1,
                              selection='suboptimal')
    for episode in ds:            # {checkpoint_id, episode_id, episode_return, steps: Dataset}
      for step in episode['steps']:   # {observation [84,84,1] uint8, action, reward, discount,
        ...                           #  is_first, is_last, is_terminal}

Data dirs may be local or gs://. The dataset is looked up with `tfds.builder(builder,
config=f'{game}_run_{run}', data_dir=data_dir)`, so real RL Unplugged data and our generated data
(`generate.py`) read the same way.

Selections (`DataConfig.selection`, Section 3 of the paper):
- `suboptimal`: the first 20% of the checkpoint splits (checkpoint_00..09 of the real 50 / 49);
- `near_optimal`: all splits;
- `uniform:P`: P% of every split's episodes, evenly spaced with a seeded offset (P=1 for the
  fine-tuning experiments, Section 5.2);
- `checkpoints:A-B`: splits A..B inclusive.
For the unordered `rlu_atari` builder (one 'train' split) the same selections filter episodes by
their `checkpoint_id` (which reads every episode of the run).

How it reads: TFRecord files are opened one by one in Python (`tf_record_iterator`, local or GCS)
and round-robin interleaved, `cycle_length` at a time, in a seeded shuffled file order; episodes
are decoded by the builder's own feature spec in a parallel `tf.data` map. Reading in Python is
what lets a corrupt file be skipped: a read error warns naming the file, counts it in
`ReadStats.corrupt_files` and reading goes on with the next file (`strict=True`: raise instead).
Episodes read from the file before the error are kept.

Sharding (`num_shards` inserter workers, this one `shard_index`): whole files are dealt out
round-robin when there are at least `num_shards` files; otherwise every worker reads every file and
keeps every `num_shards`-th selected episode (disjoint, complete, but each worker reads all bytes).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from typing import Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.python.util import deprecation as _deprecation

from scaled_ql import games as games_lib
from scaled_ql.datasets import tfds_layout

log = logging.getLogger(__name__)

SUBOPTIMAL_FRACTION = 0.2  # "first 20% of the data of each run" (Section 3)


class DatasetNotFoundError(FileNotFoundError):
  """Missing data dir, builder, game/run config, version or split (the message lists what exists)."""


class CorruptShardError(IOError):
  """A TFRecord file could not be read to its end (raised when strict=True)."""


@dataclasses.dataclass
class ReadStats:
  """Counters a reader updates while it runs (shared with the caller)."""
  episodes: int = 0
  files_read: int = 0
  corrupt_files: list = dataclasses.field(default_factory=list)
  epochs: int = 0
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  @property
  def num_corrupt(self) -> int:
    return len(self.corrupt_files)


# ---- selections ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Selection:
  """A parsed `DataConfig.selection`."""
  kind: str  # 'suboptimal' | 'near_optimal' | 'uniform' | 'checkpoints'
  percent: float = 100.0  # uniform: percentage of episodes kept
  first: int = 0  # checkpoints: first and last checkpoint index, inclusive
  last: int = 0

  @property
  def fraction(self) -> float:
    return self.percent / 100.0


_SELECTION_HELP = ("valid selections: 'suboptimal', 'near_optimal', 'uniform:P' (0 < P <= 100), "
                   "'checkpoints:A-B' (0 <= A <= B)")


def parse_selection(selection: str) -> Selection:
  s = selection.strip()
  if s in ('suboptimal', 'near_optimal'):
    return Selection(kind=s)
  m = re.fullmatch(r'uniform:([0-9]*\.?[0-9]+)', s)
  if m:
    p = float(m.group(1))
    if not 0.0 < p <= 100.0:
      raise ValueError(f'selection {selection!r}: P must be in (0, 100]; {_SELECTION_HELP}')
    return Selection(kind='uniform', percent=p)
  m = re.fullmatch(r'checkpoints:(\d+)-(\d+)', s)
  if m:
    a, b = int(m.group(1)), int(m.group(2))
    if a > b:
      raise ValueError(f'selection {selection!r}: A > B; {_SELECTION_HELP}')
    return Selection(kind='checkpoints', first=a, last=b)
  raise ValueError(f'unknown data selection {selection!r}; {_SELECTION_HELP}')


def num_suboptimal_checkpoints(num_checkpoints: int) -> int:
  """First 20% of the checkpoints: 10 of 50 (and of 49), 2 of 10, at least 1."""
  return max(1, int(round(SUBOPTIMAL_FRACTION * num_checkpoints)))


def selected_checkpoints(selection: Selection, available: Sequence[int]) -> list[int]:
  """Checkpoint indices a selection reads, given those the dataset has (sorted, contiguous-ish)."""
  available = sorted(available)
  if selection.kind == 'suboptimal':
    return available[:num_suboptimal_checkpoints(len(available))]
  if selection.kind in ('near_optimal', 'uniform'):
    return list(available)
  wanted = list(range(selection.first, selection.last + 1))
  missing = [c for c in wanted if c not in available]
  if missing:
    raise DatasetNotFoundError(
        f'selection checkpoints:{selection.first}-{selection.last}: checkpoint split(s) '
        f'{[tfds_layout.split_name(c) for c in missing]} do not exist; available: '
        f'{_ranges(available)}')
  return wanted


def keep_mask(num_episodes: int, fraction: float, offset: float) -> np.ndarray:
  """Evenly spaced selection of round(fraction * n) of n episodes (Bresenham with an offset)."""
  i = np.arange(num_episodes, dtype=np.float64)
  return np.floor((i + 1) * fraction + offset) > np.floor(i * fraction + offset)


def _ranges(checkpoints: Sequence[int]) -> str:
  if not checkpoints:
    return 'none'
  return f'checkpoint_{min(checkpoints):02d}..checkpoint_{max(checkpoints):02d} ({len(checkpoints)})'


# ---- locating a dataset ------------------------------------------------------------------------------
def _listdir(path: str) -> list[str]:
  try:
    return sorted(p.rstrip('/') for p in tf.io.gfile.listdir(path))
  except tf.errors.NotFoundError:
    return []


def list_configs(data_dir: str, builder: str = tfds_layout.ORDERED_BUILDER) -> list[str]:
  """The `{Game}_run_{r}` configs present under `data_dir/builder` (empty if none)."""
  return [c for c in _listdir(os.path.join(data_dir, builder)) if re.fullmatch(r'\w+_run_\d+', c)]


def load_builder(data_dir: str, game: str, run: int = 1,
                 builder: str = tfds_layout.ORDERED_BUILDER):
  """`tfds.builder(builder, config='{game}_run_{run}', data_dir=data_dir)`, checked to exist.

  Raises DatasetNotFoundError naming what is missing and listing what exists.
  """
  games_lib.check_games([game], 'game')
  tfds_layout.check_builder(builder)
  run = tfds_layout.check_run(run)
  if not data_dir:
    raise DatasetNotFoundError('no data dir given (DataConfig.data_dir / --data-dir)')
  if not tf.io.gfile.isdir(data_dir):
    raise DatasetNotFoundError(
        f'data dir {data_dir} does not exist (generate local data with `scaled-ql data generate '
        f'--out {data_dir}` or use gs://rl_unplugged/tensorflow_datasets)')
  builder_dir = os.path.join(data_dir, builder)
  if not tf.io.gfile.isdir(builder_dir):
    raise DatasetNotFoundError(
        f'{builder_dir} does not exist; datasets in {data_dir}: {_listdir(data_dir) or "none"}')
  config = tfds_layout.config_name(game, run)
  config_dir = os.path.join(builder_dir, config)
  if not tf.io.gfile.isdir(config_dir):
    raise DatasetNotFoundError(
        f'{game} run {run}: {config_dir} does not exist; configs present in {builder_dir}: '
        f'{", ".join(list_configs(data_dir, builder)) or "none"}')
  import tensorflow_datasets as tfds
  b = tfds.builder(builder, config=config, data_dir=data_dir)
  if not tf.io.gfile.exists(os.path.join(os.fspath(b.data_path), 'dataset_info.json')):
    raise DatasetNotFoundError(
        f'{game} run {run}: no prepared version {b.version} at {b.data_path}; versions present '
        f'in {config_dir}: {_listdir(config_dir) or "none"}')
  return b


def available_checkpoints(builder) -> list[int]:
  """Checkpoint indices of an ordered dataset's splits (from its dataset_info.json)."""
  return sorted(tfds_layout.checkpoint_of_split(s) for s in builder.info.splits.keys()
                if s.startswith('checkpoint_'))


def present_checkpoints(builder) -> list[int]:
  """The checkpoint splits whose shard files all exist (a `data download` copy holds only the
  splits its selection needs, under the source's complete dataset_info.json)."""
  return [c for c in available_checkpoints(builder)
          if all(tf.io.gfile.exists(os.fspath(p))
                 for p in builder.info.splits[tfds_layout.split_name(c)].filepaths)]


# ---- reading -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _FileTask:
  path: str
  keep: Optional[np.ndarray]  # bool per record of the file (None = keep all)
  checkpoint: Optional[tuple[int, int]] = None  # unordered builder: keep checkpoint ids in [a, b]


def _file_tasks(b, game: str, selection: Selection, seed: int) -> list[_FileTask]:
  rng = np.random.default_rng(seed)
  tasks = []
  if b.name == tfds_layout.ORDERED_BUILDER:
    available = available_checkpoints(b)
    if not available:
      raise DatasetNotFoundError(f'{b.data_path}: no checkpoint_XX splits in dataset_info.json')
    for c in selected_checkpoints(selection, available):
      split = b.info.splits[tfds_layout.split_name(c)]
      keep = None
      if selection.kind == 'uniform':
        keep = keep_mask(split.num_examples, selection.fraction, rng.random())
      start = 0
      for path, n in zip(split.filepaths, split.shard_lengths):
        tasks.append(_FileTask(os.fspath(path), None if keep is None else keep[start:start + n]))
        start += n
  else:  # rlu_atari: one 'train' split; select by checkpoint_id while reading
    if 'train' not in b.info.splits:
      raise DatasetNotFoundError(
          f'{b.data_path}: no train split; splits: {list(b.info.splits.keys())}')
    n_ckpt = games_lib.num_checkpoints(game)
    ckpts = selected_checkpoints(selection, list(range(n_ckpt)))
    split = b.info.splits['train']
    keep = (keep_mask(split.num_examples, selection.fraction, rng.random())
            if selection.kind == 'uniform' else None)
    start = 0
    for path, n in zip(split.filepaths, split.shard_lengths):
      tasks.append(_FileTask(os.fspath(path), None if keep is None else keep[start:start + n],
                             (min(ckpts), max(ckpts))))
      start += n
  return tasks


def _read_file(task: _FileTask, strict: bool, stats: ReadStats) -> Iterator[bytes]:
  """Serialized episodes of one file; a read error skips the rest of the file (or raises)."""
  i = 0
  try:
    with _deprecation.silence():  # tf_record_iterator is "deprecated" but the one Python reader
      records = tf.compat.v1.io.tf_record_iterator(task.path)
    for record in records:
      if task.keep is None or (i < len(task.keep) and task.keep[i]):
        yield record
      i += 1
  except (tf.errors.OpError, OSError) as e:
    if strict:
      raise CorruptShardError(f'corrupt or unreadable shard {task.path} (after {i} episodes): '
                              f'{type(e).__name__}: {e}') from e
    with stats._lock:
      first_time = task.path not in stats.corrupt_files
      if first_time:  # with repeat, warn and count each corrupt file once
        stats.corrupt_files.append(task.path)
    if first_time:
      log.warning('skipping the rest of corrupt shard %s after %d episodes: %s: %s', task.path,
                  i, type(e).__name__, str(e).splitlines()[0] if str(e) else '')
    return
  with stats._lock:
    stats.files_read += 1


def _interleave(tasks: Sequence[_FileTask], cycle_length: int, strict: bool, stats: ReadStats,
                shard_index: int, num_shards: int, by_record: bool) -> Iterator[bytes]:
  """Round-robin over `cycle_length` open files; with by_record, keep every n-th episode."""
  pending = list(tasks)
  active: list[Iterator[bytes]] = []
  counter = 0
  while pending or active:
    while pending and len(active) < cycle_length:
      active.append(_read_file(pending.pop(0), strict, stats))
    for it in list(active):
      record = next(it, None)
      if record is None:
        active.remove(it)
        continue
      if by_record:
        counter += 1
        if (counter - 1) % num_shards != shard_index:
          continue
      yield record


def episodes(data_dir: str, game: str, run: int = 1, selection: str = 'suboptimal', *,
             builder: str = tfds_layout.ORDERED_BUILDER, shard_index: int = 0,
             num_shards: int = 1, repeat: bool = False, strict: bool = False, seed: int = 0,
             shuffle_files: bool = True, cycle_length: int = 4,
             stats: Optional[ReadStats] = None) -> tf.data.Dataset:
  """tf.data.Dataset of RLDS episodes of `game`/`run` under `selection` (see module docstring).

  Everything is validated (data dir, builder, config, splits, selection, shard) before reading.
  `stats` (optional) is updated as episodes are read: episodes, files, corrupt files, epochs.
  """
  sel = parse_selection(selection)
  if not 0 <= shard_index < num_shards:
    raise ValueError(f'shard_index must be in [0, {num_shards}), got {shard_index}')
  if cycle_length < 1:
    raise ValueError(f'cycle_length must be >= 1, got {cycle_length}')
  b = load_builder(data_dir, game, run, builder)
  tasks = _file_tasks(b, game, sel, seed)
  by_record = len(tasks) < num_shards
  if not by_record:
    tasks = tasks[shard_index::num_shards]
  stats = stats if stats is not None else ReadStats()
  features = b.info.features
  ckpt_range = tasks[0].checkpoint if tasks else None

  def serialized() -> Iterator[bytes]:
    epoch = 0
    while True:
      order = list(tasks)
      if shuffle_files:
        # The same order in every worker: per-episode sharding relies on identical streams.
        np.random.default_rng([seed, epoch]).shuffle(order)
      n = 0
      for record in _interleave(order, cycle_length, strict, stats, shard_index, num_shards,
                                by_record):
        n += 1
        with stats._lock:
          stats.episodes += 1
        yield record
      epoch += 1
      with stats._lock:
        stats.epochs = epoch
      if not repeat:
        return
      if n == 0:
        raise DatasetNotFoundError(
            f'{game} run {run} ({selection}, shard {shard_index}/{num_shards}): no episodes '
            f'could be read from {b.data_path}; cannot repeat an empty dataset')

  ds = tf.data.Dataset.from_generator(serialized,
                                      output_signature=tf.TensorSpec((), tf.string))
  ds = ds.map(features.deserialize_example, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  if ckpt_range is not None:  # rlu_atari: the selection filters by checkpoint_id
    lo, hi = ckpt_range
    ds = ds.filter(lambda ep: tf.logical_and(ep['checkpoint_id'] >= lo,
                                             ep['checkpoint_id'] <= hi))
  return ds


def episodes_from_config(data_cfg, game: str, **kwargs) -> tf.data.Dataset:
  """`episodes(...)` with data dir, builder, run, selection and strict taken from a DataConfig."""
  return episodes(data_cfg.data_dir, game, data_cfg.run, data_cfg.selection,
                  builder=data_cfg.builder, strict=data_cfg.strict, **kwargs)


# ---- summaries (`scaled-ql data inspect`) -------------------------------------------------------------
@dataclasses.dataclass
class SplitSummary:
  checkpoint: int
  episodes: int = 0
  steps: int = 0  # RLDS steps (actions + the final observation step of each episode)
  return_sum: float = 0.0  # of episode_return (the sum of clipped rewards, as in the real data)

  @property
  def mean_return(self) -> float:
    return self.return_sum / self.episodes if self.episodes else float('nan')


def summarize(data_dir: str, game: str, run: int = 1,
              builder: str = tfds_layout.ORDERED_BUILDER,
              max_episodes_per_split: Optional[int] = None) -> dict[int, SplitSummary]:
  """Episodes, steps and mean episode_return per checkpoint for one game/run (reads the data).

  Ordered datasets: only the splits whose files are present (`present_checkpoints`).
  """
  b = load_builder(data_dir, game, run, builder)
  ordered = b.name == tfds_layout.ORDERED_BUILDER
  present = present_checkpoints(b) if ordered else None
  if ordered and (max_episodes_per_split or present != available_checkpoints(b)):
    # One small pipeline per split (reading only its first episodes if asked).
    out = {}
    for c in present:
      ds = episodes(data_dir, game, run, f'checkpoints:{c}-{c}', builder=builder,
                    shuffle_files=False, cycle_length=1)
      if max_episodes_per_split:
        ds = ds.take(max_episodes_per_split)
      out[c] = SplitSummary(c)
      _accumulate(ds, out)
    return out
  # One pass over everything, grouped by checkpoint_id.
  ds = episodes(data_dir, game, run, 'near_optimal', builder=builder, shuffle_files=False,
                cycle_length=1)
  out = {c: SplitSummary(c) for c in available_checkpoints(b)}
  _accumulate(ds, out, max_episodes_per_split)
  return dict(sorted(out.items()))


def _accumulate(ds: tf.data.Dataset, out: dict, max_episodes: Optional[int] = None) -> None:
  for c, n, ret in ds.map(_episode_stats).as_numpy_iterator():
    s = out.setdefault(int(c), SplitSummary(int(c)))
    if max_episodes and s.episodes >= max_episodes:
      continue
    s.episodes += 1
    s.steps += int(n)
    s.return_sum += float(ret)


def _episode_stats(ep):
  return ep['checkpoint_id'], ep['steps'].cardinality(), ep['episode_return']

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
- `uniform:P`: P% of every split's episodes, evenly spaced from an offset drawn with
  `selection_seed` (`DataConfig.selection_seed`; P=1 for the fine-tuning experiments, Section
  5.2). The subset depends on that seed alone: every epoch, reader shard and reading `seed`
  reads the same episodes;
- `checkpoints:A-B`: splits A..B inclusive.
For the unordered `rlu_atari` builder (one 'train' split) the same selections filter episodes by
their `checkpoint_id` (which reads every episode of the run).

How it reads: TFRecord files are opened in Python (`tf_record_iterator`, local or GCS), grouped
by checkpoint ("strata"; for `rlu_atari` every file is its own), and mixed in proportion: up to
`cycle_length` checkpoints are read at once and each moves through its episodes at the same pace,
so any stretch of the stream (and so a game's FIFO shuffle buffer) holds every open checkpoint in
proportion to its share of the selection, not a few files one after the other (issue 15: measured
by `mixing.py` / `benchmarks/replay_mixing.py`). Every epoch reshuffles the order of checkpoints
and files and starts each checkpoint at a random episode (reading wraps around to the episodes
before it). Episodes are decoded whole (frames included; 4 at a time, in order). A read error
warns naming the file, counts it in `ReadStats.corrupt_files` and reading goes on with the next
file; an episode that cannot be decoded (valid TFRecord framing, but a bad proto, a missing
feature or a broken PNG) is skipped, counted in `ReadStats.undecodable` and warned about naming
the file and record (`strict=True`: raise instead). Episodes read from a file before an error are
kept.

Sharding (`num_shards` inserter workers, this one `shard_index`): whole files are dealt out
round-robin when there are at least `num_shards` files; otherwise every worker reads every file and
keeps every `num_shards`-th selected episode (disjoint, complete, but each worker reads all bytes).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import heapq
import itertools
import logging
import os
import re
import threading
from typing import Callable, Iterator, Optional, Sequence

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
  """Counters a reader updates while it runs (shared with the caller), and the malformed episodes
  its inserter skipped (`reverb_tables.run_inserter`)."""
  episodes: int = 0
  files_read: int = 0
  corrupt_files: list = dataclasses.field(default_factory=list)  # unreadable TFRecord files
  undecodable: list = dataclasses.field(default_factory=list)  # (path, record index) skipped
  malformed: set = dataclasses.field(default_factory=set)  # (game, episode label) cut short
  epochs: int = 0
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  @property
  def num_corrupt(self) -> int:
    return len(self.corrupt_files)

  @property
  def num_undecodable(self) -> int:
    return len(self.undecodable)

  def add_malformed(self, game: str, label: str) -> bool:
    """Counts a malformed episode once over the epochs; True the first time."""
    with self._lock:
      first_time = (game, label) not in self.malformed
      self.malformed.add((game, label))
      return first_time

  def counts(self) -> dict[str, int]:
    """The counters as plain ints (node status, progress line, learner metrics)."""
    with self._lock:
      return dict(episodes_read=self.episodes, corrupt_files=len(self.corrupt_files),
                  undecodable_episodes=len(self.undecodable),
                  malformed_episodes=len(self.malformed))


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
  # Checked before the builder is made: a builder without its dataset_info.json asks TFDS's GCS
  # bucket for one, in a temporary folder that TFDS never removes.
  version = str(tfds.builder_cls(builder).VERSION)  # the version `tfds.builder` picks
  version_dir = os.path.join(config_dir, version)
  if not tf.io.gfile.exists(os.path.join(version_dir, 'dataset_info.json')):
    raise DatasetNotFoundError(
        f'{game} run {run}: no prepared version {version} at {version_dir}; versions present '
        f'in {config_dir}: {_listdir(config_dir) or "none"}')
  return tfds.builder(builder, config=config, data_dir=data_dir)


def available_checkpoints(builder) -> list[int]:
  """Checkpoint indices of an ordered dataset's splits (from its dataset_info.json)."""
  return sorted(tfds_layout.checkpoint_of_split(s) for s in builder.info.splits.keys()
                if s.startswith('checkpoint_'))


def present_checkpoints(builder, checkpoints: Optional[Sequence[int]] = None) -> list[int]:
  """The checkpoint splits (of `checkpoints`, default all) whose shard files all exist (a `data
  download` copy holds only the splits its selection needs, under the source's complete
  dataset_info.json)."""
  wanted = available_checkpoints(builder) if checkpoints is None else checkpoints
  return [c for c in wanted
          if all(tf.io.gfile.exists(os.fspath(p))
                 for p in builder.info.splits[tfds_layout.split_name(c)].filepaths)]


# ---- reading -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _FileTask:
  path: str
  keep: Optional[np.ndarray]  # bool per record of the file (None = keep all)
  checkpoint: Optional[tuple[int, int]] = None  # unordered builder: keep checkpoint ids in [a, b]
  stratum: int = 0  # ordered builder: the file's checkpoint; unordered: the file's own index
  num_records: int = 0  # episodes in the file (its shard length)

  @property
  def num_kept(self) -> int:
    return self.num_records if self.keep is None else int(np.count_nonzero(self.keep))


def _file_tasks(b, game: str, selection: Selection, selection_seed: int) -> list[_FileTask]:
  rng = np.random.default_rng(selection_seed)  # 'uniform:P' offsets only: never the reading's
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
        tasks.append(_FileTask(os.fspath(path), None if keep is None else keep[start:start + n],
                               stratum=c, num_records=n))
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
    for i, (path, n) in enumerate(zip(split.filepaths, split.shard_lengths)):
      tasks.append(_FileTask(os.fspath(path), None if keep is None else keep[start:start + n],
                             (min(ckpts), max(ckpts)), stratum=i, num_records=n))
      start += n
  return tasks


def _read_file(task: _FileTask, strict: bool, stats: ReadStats, start: int = 0,
               stop: Optional[int] = None) -> Iterator[tuple[bytes, str, int]]:
  """(serialized episode, path, record index) of records [start, stop) of one file; a read error
  skips the rest of the file (or raises)."""
  i = 0
  try:
    with _deprecation.silence():  # tf_record_iterator is "deprecated" but the one Python reader
      records = tf.compat.v1.io.tf_record_iterator(task.path)
    for record in records:
      if stop is not None and i >= stop:
        return
      if i >= start and (task.keep is None or (i < len(task.keep) and task.keep[i])):
        yield record, task.path, i
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


def _stratum_segments(files: Sequence[_FileTask], rng: Optional[np.random.Generator]
                      ) -> list[tuple[_FileTask, int, Optional[int]]]:
  """The (file, start, stop) pieces one stratum is read in: with `rng`, its files in a shuffled
  order that starts at a random episode of the first file and wraps around to the episodes before
  it (the random episode offset); without, every file whole, in order."""
  files = list(files)
  if rng is None:
    return [(f, 0, None) for f in files]
  rng.shuffle(files)
  offset = int(rng.integers(files[0].num_records)) if files[0].num_records > 1 else 0
  segments = [(files[0], offset, None)] + [(f, 0, None) for f in files[1:]]
  if offset:
    segments.append((files[0], 0, offset))
  return segments


def _mix(tasks: Sequence[_FileTask], cycle_length: int, strict: bool, stats: ReadStats,
         rng: Optional[np.random.Generator]) -> Iterator[tuple[bytes, str, int]]:
  """One epoch of the selection's episodes, mixed in proportion over its strata (checkpoints).

  Up to `cycle_length` strata are read at once; stratum s, holding n_s episodes, gives its k-th
  episode at "time" t0_s + (k + u_s) / n_s and episodes come out in time order. So every stratum
  moves through its episodes at the same pace: any stretch of the stream holds each open checkpoint
  in proportion to its episodes (+-1), not a few files one after the other, and a shuffle buffer
  fed by the stream holds all of them. With `rng`: shuffled strata and files, random phases u_s and
  random episode offsets (`_stratum_segments`); without: file order, phase 0 (deterministic).
  """
  by_stratum: dict[int, list[_FileTask]] = {}
  for t in tasks:
    by_stratum.setdefault(t.stratum, []).append(t)
  strata = list(by_stratum.values())
  if rng is not None:
    rng.shuffle(strata)
  pending = collections.deque(strata)
  heap: list = []  # (time, order, stratum state)
  order = 0
  now = 0.0

  def open_next() -> None:
    nonlocal order
    files = pending.popleft()
    n = max(1, sum(f.num_kept for f in files))
    u = float(rng.random()) if rng is not None else 0.0
    pieces = (_read_file(f, strict, stats, a, b) for f, a, b in _stratum_segments(files, rng))
    state = dict(n=n, u=u, t0=now, k=0, records=itertools.chain.from_iterable(pieces))
    heapq.heappush(heap, (now + u / n, order, state))
    order += 1

  while pending and len(heap) < cycle_length:
    open_next()
  while heap:
    now, o, state = heapq.heappop(heap)
    item = next(state['records'], None)
    if item is None:  # this stratum is done: open the next one from here
      if pending:
        open_next()
      continue
    yield item
    state['k'] += 1
    heapq.heappush(heap, (state['t0'] + (state['k'] + state['u']) / state['n'], o, state))


def _step_signature(features) -> dict:
  """output_signature of a decoded episode: its scalars, and every step field batched [T, ...]."""
  spec = features.get_tensor_spec()
  return {k: ({f: tf.TensorSpec((None,) + tuple(s.shape), s.dtype) for f, s in v.items()}
              if k == 'steps' else v) for k, v in spec.items()}


_DECODERS: dict[str, Callable[[bytes], dict]] = {}


def _decoder(features) -> Callable[[bytes], dict]:
  """record -> the episode decoded whole (steps and frames) as numpy, by one traced function: an
  undecodable example (bad proto, missing feature, broken PNG) raises here, before any of it is
  used. Thread-safe (the reader decodes `_DECODE_THREADS` episodes at once). One per feature spec
  (an inserter opens a reader per epoch; a new tf.function each time would be traced again)."""
  key = repr(features)
  if key not in _DECODERS:
    _DECODERS[key] = _make_decoder(features)
  return _DECODERS[key]


def _make_decoder(features) -> Callable[[bytes], dict]:

  # autograph=False: the `if` below is decided in Python while tracing, and AutoGraph would write
  # its converted source to a file in the temporary directory that only an orderly exit removes
  # (a killed inserter left one per process).
  @tf.function(input_signature=[tf.TensorSpec((), tf.string)], autograph=False)
  def decode(record):
    episode = features.deserialize_example(record)
    steps = episode['steps']
    if isinstance(steps, tf.data.Dataset):
      steps = steps.batch(_MAX_EPISODE_STEPS).get_single_element()
    return {**episode, 'steps': steps}

  return lambda record: tf.nest.map_structure(lambda x: x.numpy(), decode(record))


_MAX_EPISODE_STEPS = 1 << 30
_DECODE_THREADS = 4  # episodes decoded at once (TF releases the GIL); each holds its frames


def episodes(data_dir: str, game: str, run: int = 1, selection: str = 'suboptimal', *,
             builder: str = tfds_layout.ORDERED_BUILDER, shard_index: int = 0,
             num_shards: int = 1, repeat: bool = False, strict: bool = False, seed: int = 0,
             selection_seed: int = 0, shuffle_files: bool = True, cycle_length: int = 64,
             stats: Optional[ReadStats] = None) -> tf.data.Dataset:
  """tf.data.Dataset of RLDS episodes of `game`/`run` under `selection` (see module docstring).

  Everything is validated (data dir, builder, config, splits, selection, shard) before reading.
  `seed` orders the reading (files, checkpoints, where each starts; a new order every epoch);
  `selection_seed` alone picks the episodes of a `uniform:P` selection.
  `cycle_length`: checkpoints (strata) read at once; the default covers all 50 of a run.
  `stats` (optional) is updated as episodes are read: episodes, files, corrupt files,
  undecodable episodes, epochs.
  """
  sel = parse_selection(selection)
  if not 0 <= shard_index < num_shards:
    raise ValueError(f'shard_index must be in [0, {num_shards}), got {shard_index}')
  if cycle_length < 1:
    raise ValueError(f'cycle_length must be >= 1, got {cycle_length}')
  b = load_builder(data_dir, game, run, builder)
  tasks = _file_tasks(b, game, sel, selection_seed)
  by_record = len(tasks) < num_shards
  if not by_record:
    tasks = tasks[shard_index::num_shards]
  stats = stats if stats is not None else ReadStats()
  features = b.info.features
  ckpt_range = tasks[0].checkpoint if tasks else None

  decode = _decoder(features)

  def checked(future, path: str, index: int) -> Optional[dict]:
    """The decoded episode, or None for an undecodable one (counted, warned; strict: raised)."""
    try:
      return future.result()
    except (tf.errors.OpError, ValueError, TypeError) as e:
      message = (f'undecodable episode {index} of {path}: {type(e).__name__}: '
                 f'{str(e).splitlines()[0] if str(e) else ""}')
      if strict:
        raise CorruptShardError(message) from e
      with stats._lock:
        first_time = (path, index) not in stats.undecodable
        if first_time:  # with repeat, count each bad episode once
          stats.undecodable.append((path, index))
      if first_time:
        log.warning('skipping %s', message)
      return None

  def decoded() -> Iterator[dict]:
    epoch = 0
    with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
      while True:
        # The same stream in every worker: per-episode sharding relies on identical streams.
        rng = np.random.default_rng([seed, epoch]) if shuffle_files else None
        n = counter = 0
        in_flight: collections.deque = collections.deque()  # decoded in order, a few ahead

        def ready(block: bool) -> Iterator[dict]:
          nonlocal n
          while in_flight and (block or len(in_flight) >= 2 * _DECODE_THREADS):
            episode = checked(*in_flight.popleft())
            if episode is not None:
              n += 1
              with stats._lock:
                stats.episodes += 1
              yield episode

        for record, path, index in _mix(tasks, cycle_length, strict, stats, rng):
          counter += 1
          if by_record and (counter - 1) % num_shards != shard_index:
            continue
          in_flight.append((pool.submit(decode, record), path, index))
          yield from ready(block=False)
        yield from ready(block=True)
        epoch += 1
        with stats._lock:
          stats.epochs = epoch
        if not repeat:
          return
        if n == 0:
          raise DatasetNotFoundError(
              f'{game} run {run} ({selection}, shard {shard_index}/{num_shards}): no episodes '
              f'could be read from {b.data_path}; cannot repeat an empty dataset')

  ds = tf.data.Dataset.from_generator(decoded, output_signature=_step_signature(features))
  no_autograph = tf.autograph.experimental.do_not_convert
  ds = ds.map(no_autograph(lambda ep: {**ep, 'steps': tf.data.Dataset.from_tensor_slices(
      ep['steps'])}))
  if ckpt_range is not None:  # rlu_atari: the selection filters by checkpoint_id
    lo, hi = ckpt_range
    ds = ds.filter(lambda ep: tf.logical_and(ep['checkpoint_id'] >= lo,
                                             ep['checkpoint_id'] <= hi))
  return ds


def episodes_from_config(data_cfg, game: str, **kwargs) -> tf.data.Dataset:
  """`episodes(...)` with data dir, builder, run, selection, selection_seed, strict and
  cycle_length (the number of checkpoints streamed at once, `DataConfig.reader_cycle_length`)
  taken from a DataConfig."""
  kwargs.setdefault('cycle_length', data_cfg.reader_cycle_length)
  kwargs.setdefault('selection_seed', data_cfg.selection_seed)
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

"""Convert the original DQN-Replay files (Dopamine replay buffers) into the RL Unplugged TFDS layout.

    {dopamine_dir}/{Game}/{run}/replay_logs/$store$_{observation,action,reward,terminal}_ckpt.{N}.gz
    + add_count_ckpt.{N}.gz  ->  {out}/rlu_atari_checkpoints_ordered/{Game}_run_{run}/

Each file is a gzipped `.npy` array of Dopamine's `OutOfGraphReplayBuffer._store` (Agarwal et al.
2020): observation uint8 [C, 84, 84] (the newest frame of each step), action int32 [C], reward
float32 [C] (already clipped by Dopamine's runner), terminal uint8 [C]. Entry i is
(o_i, a_i, r_i, terminal_i): a_i was taken at o_i, earned r_i, and ended the episode if
terminal_i. Dopamine's runner of the time marked an episode cut at its 27k-step cap terminal too
(`end_episode` stored terminal=True either way), so such an episode's last n transitions do not
bootstrap here: a few transitions in 27k, kept as the files have them (RL Unplugged's copy,
which the paper trained on, was made from the same files).

Conversion, per replay checkpoint N -> split checkpoint_{N:02d}, checkpoint_id N:
- a circular buffer is rotated to time order when `add_count_ckpt.N.gz` says it wrapped
  (oldest entry at add_count % C), and one not yet full is cut to its add_count entries. The
  file is required (DQN-Replay ships it with every checkpoint): without it a wrapped buffer
  would join its newest episode to its oldest, and the unwritten tail of one not yet full would
  read as data;
- the zero transitions Dopamine inserts before every episode (stack_size - 1 = 3 entries with an
  all-zero frame, action 0, reward 0) are dropped;
- the buffer is cut into episodes after every terminal entry. An episode ending in a terminal
  entry becomes RLDS steps o_0..o_{T-1} plus a final step with is_terminal (its observation repeats
  o_{T-1}: the terminal frame is never stored by Dopamine, and with discount 0 it is never used);
  the unfinished tail becomes a truncated episode whose last stored entry is its final observation.
  A wrapped buffer's oldest entries usually begin in the middle of an episode whose start was
  overwritten: that fragment becomes an episode of its own, and its first 3 observations stack
  zero frames where the lost history was (3 transitions in a 1M-entry checkpoint, which
  Dopamine itself never samples: they lie in its invalid range). RLDS has no way to carry
  history before a first step, so they are kept as they are rather than dropping the fragment.
Memory: one checkpoint's arrays at a time (~7 GB for a real 1M-entry buffer; a wrapped buffer's
observations are read in time order through an index, not rotated into a second copy).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
from typing import Iterator, Optional

import numpy as np

from scaled_ql import games as games_lib
from scaled_ql.datasets import generate, tfds_layout

log = logging.getLogger(__name__)

STORE_KEYS = ('observation', 'action', 'reward', 'terminal')
DOPAMINE_STACK = 4
_CKPT_RE = re.compile(r'^\$store\$_observation_ckpt\.(\d+)\.gz$')


def replay_dir(dopamine_dir: str, game: str, run: int) -> str:
  return os.path.join(dopamine_dir, game, str(run), 'replay_logs')


def find_checkpoints(dopamine_dir: str, game: str, run: int) -> list[int]:
  """Replay checkpoint numbers with all four $store$ files present; clear error if none."""
  import tensorflow as tf
  d = replay_dir(dopamine_dir, game, run)
  if not tf.io.gfile.isdir(d):
    parent = os.path.join(dopamine_dir, game)
    present = sorted(tf.io.gfile.listdir(parent)) if tf.io.gfile.isdir(parent) else []
    raise FileNotFoundError(f'{game} run {run}: no replay_logs dir {d}; runs present for {game} '
                            f'in {dopamine_dir}: {present or "none"}')
  names = set(tf.io.gfile.listdir(d))
  ckpts = sorted(int(m.group(1)) for n in names if (m := _CKPT_RE.match(n)))
  complete = [c for c in ckpts if all(name in names for name in _checkpoint_files(c))]
  if not complete:
    raise FileNotFoundError(f'{game} run {run}: no complete $store$_{{{",".join(STORE_KEYS)}}}'
                            f'_ckpt.N.gz + add_count_ckpt.N.gz set in {d}')
  return complete


def _checkpoint_files(ckpt: int) -> list[str]:
  return [f'$store$_{k}_ckpt.{ckpt}.gz' for k in STORE_KEYS] + [f'add_count_ckpt.{ckpt}.gz']


def _load(path: str) -> np.ndarray:
  import tensorflow as tf
  try:
    with tf.io.gfile.GFile(path, 'rb') as f, gzip.GzipFile(fileobj=f) as g:
      return np.load(g, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:  # not gzip, not .npy, cut short
    raise ValueError(f'{path}: not a gzipped .npy array of a Dopamine replay checkpoint '
                     f'({type(e).__name__}: {e})') from e


def load_checkpoint(dopamine_dir: str, game: str, run: int, ckpt: int) -> dict[str, np.ndarray]:
  """The four store arrays of one replay checkpoint, rotated into time order."""
  d = replay_dir(dopamine_dir, game, run)
  store = {k: _load(os.path.join(d, f'$store$_{k}_ckpt.{ckpt}.gz')) for k in STORE_KEYS}
  n = len(store['action'])
  if store['observation'].shape[1:] != (84, 84) or store['observation'].dtype != np.uint8:
    raise ValueError(f'{d} ckpt {ckpt}: observation must be uint8 [N, 84, 84], got '
                     f'{store["observation"].dtype} {store["observation"].shape}')
  if any(len(v) != n or (k != 'observation' and v.ndim != 1) for k, v in store.items()):
    raise ValueError(f'{d} ckpt {ckpt}: the store arrays must be one entry per step, of one '
                     f'length: {dict((k, v.shape) for k, v in store.items())}')
  add_count_path = os.path.join(d, f'add_count_ckpt.{ckpt}.gz')
  add_count = _load(add_count_path)
  if add_count.ndim or add_count < 0:
    raise ValueError(f'{add_count_path}: add_count must be a count, got {add_count!r}')
  add_count = int(add_count)
  if add_count > n:  # the circular buffer wrapped: oldest entry at add_count % n
    shift = add_count % n
    store = {k: np.roll(v, -shift, axis=0) if k != 'observation' else _Rotated(v, shift)
             for k, v in store.items()}
  elif add_count < n:  # not yet full: only the first add_count entries are valid
    store = {k: v[:add_count] for k, v in store.items()}
  return store


class _Rotated:
  """`array` in time order from entry `shift` on (wrapping round), read entry by entry or by an
  index array, without the copy `np.roll` makes: a real buffer's observations are 7 GB, and a
  rolled copy beside the loaded one doubled the conversion's peak memory."""

  def __init__(self, array: np.ndarray, shift: int):
    self._array, self._shift = array, shift
    self.shape, self.dtype = array.shape, array.dtype

  def __len__(self) -> int:
    return len(self._array)

  def __getitem__(self, index):
    return self._array[(np.asarray(index) + self._shift) % len(self._array)]


def split_episodes(store: dict[str, np.ndarray]) -> Iterator[tuple[np.ndarray, bool]]:
  """Yields (entry indices, ends_in_terminal) per episode, Dopamine's zero padding dropped."""
  obs, action, reward = store['observation'], store['action'], store['reward']
  terminal = store['terminal'].astype(bool)
  n = len(action)
  start = 0
  while start < n:
    # Skip the zero transitions Dopamine adds before an episode.
    skipped = 0
    while (start < n and skipped < DOPAMINE_STACK - 1 and not terminal[start]
           and action[start] == 0 and reward[start] == 0 and not obs[start].any()):
      start += 1
      skipped += 1
    if start >= n:
      return
    ends = np.flatnonzero(terminal[start:])
    if len(ends):
      end = start + int(ends[0]) + 1
      yield np.arange(start, end), True
    else:
      end = n
      if end - start >= 2:  # a truncated episode needs an action and a final observation
        yield np.arange(start, end), False
    start = end


def checkpoint_episodes(store: dict[str, np.ndarray], checkpoint_id: int,
                        stats: dict) -> Iterator[dict]:
  """RLDS episodes (rlu_atari feature layout) of one replay checkpoint."""
  for episode_id, (idx, terminal) in enumerate(split_episodes(store)):
    frames = list(store['observation'][idx])
    actions = store['action'][idx]
    rewards = store['reward'][idx]
    if terminal:
      frames.append(frames[-1])  # the terminal frame is not stored; discount 0 never reads it
    else:
      actions, rewards = actions[:-1], rewards[:-1]  # last entry = final observation only
    stats['episodes'] += 1
    stats['steps'] += len(actions)
    yield generate.rlds_episode(frames, actions, rewards, terminal, checkpoint_id, episode_id)


def source_checkpoints(dopamine_dir: str, game: str, run: int,
                       checkpoints: Optional[tuple[int, int]] = None
                       ) -> tuple[list[int], list[int]]:
  """(every complete replay checkpoint of `game` run `run`, the ones `checkpoints` (A, B) picks):
  the checks of the source before anything is written, for every game of a command first."""
  games_lib.check_games([game], 'game')
  found = find_checkpoints(dopamine_dir, game, run)
  ckpts = found
  if checkpoints is not None:
    a, b = checkpoints
    if not 0 <= a <= b:
      raise ValueError(f'--checkpoints {a}-{b}: expected A-B with 0 <= A <= B')
    ckpts = [c for c in found if a <= c <= b]
    missing = [c for c in range(a, b + 1) if c not in found]
    if missing:
      raise FileNotFoundError(f'{game} run {run}: replay checkpoints {missing} not found in '
                              f'{replay_dir(dopamine_dir, game, run)}; found: {found}')
  if max(ckpts) > 99:
    raise ValueError(f'{game}: replay checkpoint {max(ckpts)} > 99 has no checkpoint_XX split')
  return found, ckpts


# What `convert` (and the command, before any game) says about an output that exists: the
# converter has no --skip-existing (a kept conversion is not checked against its source).
OVERWRITE_REMEDY = '--overwrite (overwrite=True) to replace it'


def _ranges(ids: list[int]) -> str:
  return f'{ids[0]}-{ids[-1]}' if len(ids) > 1 else str(ids[0])


def convert(dopamine_dir: str, game: str, run: int, out_dir: str,
            checkpoints: Optional[tuple[int, int]] = None, overwrite: bool = False) -> str:
  """Writes rlu_atari_checkpoints_ordered/{game}_run_{run} from the DQN-Replay files; returns the
  dataset version dir."""
  run = tfds_layout.check_run(run)
  found, ckpts = source_checkpoints(dopamine_dir, game, run, checkpoints)
  # The reader's selections count the splits a data dir holds: 'suboptimal' is the first 20% of
  # the converted ones, which is not the run's first 20% when only part of it is converted.
  from scaled_ql.datasets import rlds_reader
  suboptimal = rlds_reader.parse_selection('suboptimal')
  ours, runs = (rlds_reader.selected_checkpoints(suboptimal, c) for c in (ckpts, found))
  if ours != runs:
    log.warning('%s run %d: converting replay checkpoints %d-%d of the %d found: the selection '
                "'suboptimal' (the first 20%% of the splits present) will read checkpoints %s, "
                'not the run\'s first 20%% (%s); convert them too, or name splits with '
                "'checkpoints:A-B'", game, run, min(ckpts), max(ckpts), len(found),
                _ranges(ours), _ranges(runs))
  builder = generate.builder_for(game, run, out_dir, tfds_layout.ORDERED_BUILDER)
  version_dir = os.fspath(builder.data_path)
  generate.handle_existing(builder, game, 'overwrite' if overwrite else 'error',
                          remedy=OVERWRITE_REMEDY)
  split_stats = {c: {'episodes': 0, 'steps': 0} for c in ckpts}

  def one_split(c):
    log.info('%s run %d: converting replay checkpoint %d', game, run, c)
    store = load_checkpoint(dopamine_dir, game, run, c)
    return generate.keyed(tfds_layout.ORDERED_BUILDER,
                          checkpoint_episodes(store, c, split_stats[c]))

  def lazy(c):  # load a checkpoint only when TFDS reaches its split
    yield from one_split(c)

  generate.write_splits(builder, lambda: {tfds_layout.split_name(c): lazy(c) for c in ckpts})
  info = {
      'generator': 'scaled_ql.datasets.dopamine_convert',
      'builder': tfds_layout.ORDERED_BUILDER, 'game': game, 'run': run,
      'source': replay_dir(dopamine_dir, game, run),
      'policy': 'DQN (Dopamine) replay: the logging agent of DQN-Replay',
      'reward_note': 'rewards as stored by Dopamine (clipped to [-1, 1])',
      'splits': {tfds_layout.split_name(c): dict(checkpoint_id=c, **s)
                 for c, s in split_stats.items()},
  }
  with open(os.path.join(version_dir, tfds_layout.GENERATION_INFO_FILE), 'w') as f:
    json.dump(info, f, indent=1)
  return version_dir

"""Names and paths of the RL Unplugged Atari TFDS datasets (shared by the reader and the writers).

On disk (local or gs://) a TFDS data dir holds, per builder and config,
    {data_dir}/{builder}/{Game}_run_{run}/{version}/
        dataset_info.json, features.json,
        {builder}-{split}.tfrecord-{shard:05d}-of-{num_shards:05d}
`rlu_atari_checkpoints_ordered` (version 1.1.0) has splits checkpoint_00..checkpoint_49 (49 splits
for Carnival, Gravitar, StarGunner); `rlu_atari` (version 1.3.0) one 'train' split. Our local
generator and Dopamine converter write this same layout with TFDS's own builder and writer, plus a
`generation_info.json` beside dataset_info.json saying how the data was made.
"""
from __future__ import annotations

import re

ORDERED_BUILDER = 'rlu_atari_checkpoints_ordered'
UNORDERED_BUILDER = 'rlu_atari'
BUILDERS = (ORDERED_BUILDER, UNORDERED_BUILDER)
GENERATION_INFO_FILE = 'generation_info.json'
NUM_RUNS = 5
# The public RL Unplugged TFDS data dir (what `data download` copies from by default).
PUBLIC_DATA_DIR = 'gs://rl_unplugged/tensorflow_datasets'

_SPLIT_RE = re.compile(r'^checkpoint_(\d{2})$')


def config_name(game: str, run: int) -> str:
  return f'{game}_run_{run}'


def split_name(checkpoint: int) -> str:
  if not 0 <= checkpoint <= 99:
    raise ValueError(f'checkpoint index must be in [0, 99], got {checkpoint}')
  return f'checkpoint_{checkpoint:02d}'


def checkpoint_of_split(split: str) -> int:
  m = _SPLIT_RE.match(split)
  if not m:
    raise ValueError(f'not a checkpoint split name: {split!r} (expected checkpoint_XX)')
  return int(m.group(1))


def check_builder(builder: str) -> str:
  if builder not in BUILDERS:
    raise ValueError(f'unknown TFDS builder {builder!r}; supported: {", ".join(BUILDERS)}')
  return builder


def check_run(run: int) -> int:
  if not 1 <= int(run) <= NUM_RUNS:
    raise ValueError(f'run must be in 1..{NUM_RUNS} (DQN-Replay runs), got {run}')
  return int(run)

"""Shared fixtures. `tiny_dataset_dir`: a real generated TFDS data dir, made once per session."""
import pytest

TINY_GAMES = ('Breakout', 'Pong')  # the games of the `cpu_tiny` config
TINY_CHECKPOINTS = 2
TINY_STEPS_PER_CHECKPOINT = 300
TINY_MAX_EPISODE_FRAMES = 1_000  # 250 agent steps: a few (terminated or truncated) episodes


@pytest.fixture(scope='session')
def tiny_dataset_dir(tmp_path_factory) -> str:
  """TFDS data dir with rlu_atari_checkpoints_ordered/{Breakout,Pong}_run_1, 2 splits x 300 steps.

  Written by the real generator (emulator + TFDS writer), ~3 s. Treat it as read-only: copy it
  (shutil.copytree) before corrupting or changing anything.
  """
  from scaled_ql.datasets import generate
  out = str(tmp_path_factory.mktemp('tiny_dataset'))
  generate.generate(TINY_GAMES, out, run=1, num_checkpoints=TINY_CHECKPOINTS,
                    steps_per_checkpoint=TINY_STEPS_PER_CHECKPOINT, seed=0,
                    max_episode_frames=TINY_MAX_EPISODE_FRAMES, progress=False)
  return out


@pytest.fixture(scope='session')
def many_checkpoints_dataset_dir(tmp_path_factory) -> str:
  """TFDS data dir with rlu_atari_checkpoints_ordered/Breakout_run_1: 10 splits x 200 steps of
  short episodes (<= 50 steps), for replay-mixing tests (~5 s). Read-only, like tiny_dataset_dir."""
  from scaled_ql.datasets import generate
  out = str(tmp_path_factory.mktemp('many_checkpoints_dataset'))
  generate.generate(('Breakout',), out, run=1, num_checkpoints=10, steps_per_checkpoint=200,
                    seed=0, max_episode_frames=200, progress=False)
  return out

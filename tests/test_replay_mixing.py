"""Replay mixing (issue 15, item 5): a game's samples over a window of learner steps come from
most of its selected checkpoints, close to uniform over the selection (real Reverb table, real
RLDS stream, `scaled_ql.datasets.mixing`)."""
import numpy as np
import pytest

from scaled_ql import configs
from scaled_ql.datasets import mixing


def _cfg(data_dir):
  # cpu_tiny's batch (2 games x 2 draws x 4) and throttle; a buffer of ~20 short episodes.
  return configs.get_config('cpu_tiny').replace(
      games=('Breakout', 'Pong'),
      data=dict(data_dir=data_dir, selection='near_optimal', shuffle_buffer_per_game=800,
                min_fill_per_game=100))


def test_ks_helpers():
  assert mixing.ks_discrete(np.array([0, 1, 2, 3] * 25), {0: .25, 1: .25, 2: .25, 3: .25}) == 0
  assert mixing.ks_discrete(np.array([0] * 10), {0: .5, 1: .5}) == pytest.approx(0.5)
  assert mixing.ks_uniform(np.linspace(0.005, 0.995, 100)) == pytest.approx(0.005)
  assert mixing.ks_uniform(np.full(10, 0.1)) == pytest.approx(0.9)


def test_stream_samples_close_to_uniform_over_the_selection(many_checkpoints_dataset_dir):
  cfg = _cfg(many_checkpoints_dataset_dir)
  index = mixing.selection_index(cfg, 'Breakout')
  assert index.selected_checkpoints == list(range(10))
  stats = mixing.measure(cfg, 'Breakout', window_steps=300, index=index)
  assert stats.samples > 500 and stats.inserted > cfg.data.shuffle_buffer_per_game
  assert stats.checkpoint_coverage >= 0.8 and stats.ks_checkpoint <= 0.1, stats
  assert stats.passes()
  # Reading one checkpoint at a time (the old stream's failure): few checkpoints per window.
  narrow = mixing.measure(cfg, 'Breakout', window_steps=300, index=index,
                          reader_kwargs=dict(cycle_length=1))
  assert not narrow.passes() and narrow.ks_checkpoint > 0.2, narrow
  assert narrow.sampled_checkpoints < stats.sampled_checkpoints

"""Random-shift augmentation (scaled_ql/agents/augmentation.py) against a numpy reference."""
import jax
import numpy as np
import pytest

from scaled_ql.agents import augmentation
from scaled_ql.agents import builder
from scaled_ql.configs import get_config


def _reference(images, offsets, pad, hw_axes):
  out = np.empty_like(images)
  rows, cols = (1 + a for a in hw_axes)
  for i, (dy, dx) in enumerate(offsets):
    widths = [(0, 0)] * images.ndim
    widths[rows] = widths[cols] = (pad, pad)
    padded = np.pad(images[i:i + 1], widths, mode='edge')
    index = [slice(None)] * images.ndim
    index[rows] = slice(dy, dy + images.shape[rows])
    index[cols] = slice(dx, dx + images.shape[cols])
    out[i] = padded[tuple(index)][0]
  return out


@pytest.mark.parametrize('shape,hw_axes', [((3, 5, 84, 84), (1, 2)),   # frame windows
                                           ((4, 84, 84, 4), (0, 1))])  # stacked observations
def test_shift_is_an_edge_padded_crop(shape, hw_axes):
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  offsets = augmentation.shift_offsets(jax.random.PRNGKey(1), shape[0], 4)
  offsets = np.asarray(offsets)
  assert offsets.min() >= 0 and offsets.max() <= 8
  got = np.asarray(jax.jit(augmentation.shift, static_argnums=(2, 3))(images, offsets, 4, hw_axes))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, _reference(images, offsets, 4, hw_axes))
  # Offset (pad, pad) is no shift; a shift moves the content by offset - pad pixels.
  centre = np.full((shape[0], 2), 4, np.int32)
  np.testing.assert_array_equal(augmentation.shift(images, centre, 4, hw_axes), images)
  right = np.array([[4, 6]] * shape[0], np.int32)  # content moves 2 columns to the left
  moved = np.asarray(augmentation.shift(images, right, 4, hw_axes))
  take = lambda x, lo, hi: np.take(x, np.arange(lo, hi), axis=1 + hw_axes[1])
  np.testing.assert_array_equal(take(moved, 0, 82), take(images, 2, 84))


def test_no_padding_is_the_identity_and_bad_values_are_refused():
  images = np.arange(2 * 84 * 84, dtype=np.uint8).reshape(2, 84, 84)
  assert augmentation.shift(images, np.zeros((2, 2), np.int32), 0, (0, 1)) is images
  with pytest.raises(ValueError, match=r'agent.random_shift=-1 must be an int in \[0, 42\)'):
    builder.check_agent_config(get_config('cpu_tiny').replace(agent=dict(random_shift=-1)))

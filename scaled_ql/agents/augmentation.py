"""Random-shift augmentation of training observations (DrQ: Kostrikov et al. 2020, Yarats et al.
2021): each image moves by up to `pad` pixels in each direction, its border replicated. Not in
the paper (off by default, `AgentConfig.random_shift = 0`); at CPU scale the generator's splits
are small enough for the network to learn them by heart (docs/learning.md, 2026-12-02).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def shift_offsets(key: jax.Array, num: int, pad: int) -> jax.Array:
  """int32 [num, 2]: (row, column) crop origins in [0, 2 * pad], uniform."""
  return jax.random.randint(key, (num, 2), 0, 2 * pad + 1, dtype=jnp.int32)


def shift(images: jax.Array, offsets: jax.Array, pad: int, hw_axes: tuple[int, int]) -> jax.Array:
  """Each images[i] (its spatial axes `hw_axes`, counted without the leading axis) edge-padded
  by `pad` and cropped back to its size at `offsets[i]`: a shift by offsets[i] - pad pixels."""
  chex.assert_rank(offsets, 2)
  chex.assert_equal(offsets.shape, (images.shape[0], 2))
  if pad == 0:
    return images
  rank = images.ndim - 1
  rows, cols = (a % rank for a in hw_axes)
  widths = [(0, 0)] * images.ndim
  widths[1 + rows] = widths[1 + cols] = (pad, pad)
  padded = jnp.pad(images, widths, mode='edge')

  def crop(image, offset):
    start = [jnp.int32(0)] * rank
    start[rows], start[cols] = offset[0], offset[1]
    return jax.lax.dynamic_slice(image, start, images.shape[1:])

  return jax.vmap(crop)(padded, offsets)

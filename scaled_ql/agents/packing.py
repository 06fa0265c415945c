"""A tree of arrays as one flat buffer per dtype, and back.

    packing = Packing.of(tree)          # the layout, from arrays or ShapeDtypeStructs
    buffers = packing.pack(tree)        # tuple of 1-D arrays, one per dtype (jittable)
    tree = packing.unpack(buffers)      # slices and reshapes (jittable; XLA fuses them)

The learner's train state crosses its jit boundary packed with `train.packed_state`
(`learner.pack_state`): a call's host cost grows with its number of buffers (ResNet-101's state
has 1615 leaves, ~5 ms per call; docs/history/performance_log.md, "Where the gaps are"), and a
packed state has about seven. A `Packing` is hashable, so that it can be a static argument of a
jit.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Packing:
  """Where each leaf of a tree lies in the buffer of its dtype.

  Buffers follow `buffer_dtypes` (the dtypes in their order of first appearance among the
  leaves); within a buffer the leaves lie in the tree's leaf order, each raveled (C order)."""
  treedef: Any  # jax.tree_util.PyTreeDef
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[np.dtype, ...]
  buffer_dtypes: tuple[np.dtype, ...]

  @classmethod
  def of(cls, tree: Any) -> Packing:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dtypes = tuple(np.dtype(x.dtype) for x in leaves)
    return cls(treedef, tuple(tuple(x.shape) for x in leaves), dtypes,
               tuple(dict.fromkeys(dtypes)))

  def sizes(self) -> tuple[int, ...]:
    """Elements of each buffer."""
    return tuple(sum(math.prod(s) for s, d in zip(self.shapes, self.dtypes) if d == dtype)
                 for dtype in self.buffer_dtypes)

  def pack(self, tree: Any) -> tuple[jax.Array, ...]:
    leaves = self.treedef.flatten_up_to(tree)  # raises if the structure differs
    for i, (x, shape, dtype) in enumerate(zip(leaves, self.shapes, self.dtypes)):
      if tuple(x.shape) != shape or np.dtype(x.dtype) != dtype:
        path = jax.tree_util.keystr(jax.tree_util.tree_leaves_with_path(tree)[i][0])
        raise ValueError(f'leaf {path}: expected {dtype.name}{list(shape)}, got '
                         f'{np.dtype(x.dtype).name}{list(x.shape)}')
    return tuple(jnp.concatenate([jnp.ravel(x) for x, d in zip(leaves, self.dtypes) if d == dtype])
                 for dtype in self.buffer_dtypes)

  def unpack(self, buffers: Sequence[jax.Array]) -> Any:
    got = [(np.dtype(b.dtype), tuple(b.shape)) for b in buffers]
    expected = [(d, (n,)) for d, n in zip(self.buffer_dtypes, self.sizes())]
    if got != expected:
      raise ValueError(f'buffers {got} do not match the packing {expected}')
    offsets = dict.fromkeys(self.buffer_dtypes, 0)
    leaves = []
    for shape, dtype in zip(self.shapes, self.dtypes):
      start, n = offsets[dtype], math.prod(shape)
      buffer = buffers[self.buffer_dtypes.index(dtype)]
      leaves.append(jax.lax.slice(buffer, (start,), (start + n,)).reshape(shape))
      offsets[dtype] = start + n
    return self.treedef.unflatten(leaves)

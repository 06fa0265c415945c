"""Tests of `agents.packing.Packing`: a tree of arrays as one flat buffer per dtype."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaled_ql.agents.packing import Packing


def mixed_tree():
  rng = np.random.default_rng(0)
  return {'conv': {'w': rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
                   'b': rng.normal(size=(8,)).astype(np.float32)},
          'count': np.int32(7),
          'key': np.array([1, 2], np.uint32),
          'head': (rng.normal(size=(5, 2)).astype(np.float32), np.arange(6, dtype=np.int32))}


def test_pack_then_unpack_gives_the_tree_back_with_one_buffer_per_dtype():
  tree = mixed_tree()
  packing = Packing.of(tree)
  buffers = packing.pack(tree)
  # one 1-D buffer per dtype, in the order the dtypes first appear among the leaves (conv/b,
  # conv/w, count, head[0], head[1], key)
  assert [b.dtype for b in buffers] == [np.float32, np.int32, np.uint32]
  assert packing.sizes() == (8 + 288 + 10, 1 + 6, 2) == tuple(b.size for b in buffers)
  # each buffer holds its leaves in leaf order, raveled
  np.testing.assert_array_equal(buffers[1], np.r_[7, np.arange(6)])
  np.testing.assert_array_equal(buffers[0][:8], tree['conv']['b'])
  np.testing.assert_array_equal(buffers[0][8:296], tree['conv']['w'].ravel())
  back = jax.jit(packing.unpack)(jax.jit(packing.pack)(tree))
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
  for got, want in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_packing_of_shapes_alone_matches_and_is_a_static_jit_argument():
  tree = mixed_tree()
  from_shapes = Packing.of(jax.eval_shape(lambda: tree))
  assert from_shapes == Packing.of(tree) and hash(from_shapes) == hash(Packing.of(tree))
  double = jax.jit(lambda b, p: tuple(2 * x for x in b), static_argnums=1)
  assert len(double(from_shapes.pack(tree), from_shapes)) == 3
  empty = Packing.of({})
  assert empty.pack({}) == () and empty.unpack(()) == {}


def test_mismatches_raise_naming_what_differs():
  tree = mixed_tree()
  packing = Packing.of(tree)
  bad = dict(tree, count=np.float32(7))
  with pytest.raises(ValueError, match=r"leaf \['count'\]: expected int32\[\], got float32\[\]"):
    packing.pack(bad)
  with pytest.raises(ValueError):  # the tree's structure differs
    packing.pack({'conv': tree['conv']})
  buffers = packing.pack(tree)
  with pytest.raises(ValueError, match='do not match the packing'):
    packing.unpack(buffers[:2] + (jnp.zeros(3, jnp.float32),))

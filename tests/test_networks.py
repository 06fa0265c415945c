"""The Q-network: shapes, feature norm, switches, per-game heads, bf16, param split, FLOPs, CLI.

Real networks at cpu_tiny size; the paper-sized ResNet-101 only through `jax.eval_shape`.
"""
import dataclasses

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scaled_ql import configs
from scaled_ql import games as games_lib
from scaled_ql.networks import (QNetworkOutput, encoder_param_filter, flops_breakdown,
                                flops_per_example, make_q_network, param_counts, q_network)

CFG = configs.get_config('cpu_tiny')
GAMES = CFG.games  # ('Breakout', 'Pong'): 4 and 6 actions
NET_CFG = CFG.network
K = CFG.agent.num_atoms
B = 6


def _inputs(batch=B, seed=0):
  rng = np.random.default_rng(seed)
  obs = jnp.asarray(rng.integers(0, 256, (batch, 84, 84, 4), dtype=np.uint8))
  game_id = jnp.asarray(np.arange(batch) % len(GAMES), jnp.int32)
  return obs, game_id


def _init(net_cfg=NET_CFG, games=GAMES, num_atoms=K, seed=0):
  net = make_q_network(net_cfg, games, num_atoms)
  obs, game_id = _inputs()
  return net, net.init(jax.random.PRNGKey(seed), obs, game_id)


@pytest.fixture(scope='module')
def tiny():
  return _init()


def _randomize(params, seed=1, scale=0.3):
  """Non-trivial params: the zero-initialised GroupNorm scales etc. get random values."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_output_shapes_and_dtypes(tiny):
  net, params = tiny
  obs, game_id = _inputs()
  out = jax.jit(net.apply)(params, obs, game_id)
  assert isinstance(out, QNetworkOutput)
  a_max = max(games_lib.action_counts(GAMES))
  chex.assert_shape(out.logits, (B, a_max, K))
  chex.assert_shape(out.features, (B, NET_CFG.trunk_hidden_dims[-1]))
  chex.assert_type([out.logits, out.features], [jnp.float32, jnp.float32])
  chex.assert_tree_all_finite(out)
  for leaf in jax.tree_util.tree_leaves(params):
    assert leaf.dtype == jnp.float32


def test_scalar_head_num_atoms_1():
  net, params = _init(num_atoms=1)
  obs, game_id = _inputs()
  out = net.apply(params, obs, game_id)
  chex.assert_shape(out.logits, (B, 6, 1))


def test_features_unit_norm_and_gradients_flow_through_normalization(tiny):
  net, params = tiny
  params = _randomize(params)
  obs, game_id = _inputs()
  out = net.apply(params, obs, game_id)
  np.testing.assert_allclose(jnp.linalg.norm(out.features, axis=-1), 1.0, rtol=1e-5)

  # A loss on the logits reaches the trunk and the encoder through the normalized features.
  w = jax.random.normal(jax.random.PRNGKey(2), out.logits.shape)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(w * net.apply(p, obs, game_id).logits)))(params)
  for module in ('trunk/linear_3', 'trunk/linear_0', 'encoder/stem_conv',
                 'encoder/spatial_embedding'):
    g = jax.tree_util.tree_leaves(grads[module])
    assert max(float(jnp.abs(x).max()) for x in g) > 1e-6, module

  # Gradients are taken *through* the norm: the norm of the features is constant (=1), so its
  # gradient w.r.t. every parameter vanishes (a stop_gradient on the divisor would break this).
  grads_norm, grads_sum = jax.jit(lambda p: (
      jax.grad(lambda q: jnp.sum(jnp.square(net.apply(q, obs, game_id).features)))(p),
      jax.grad(lambda q: jnp.sum(net.apply(q, obs, game_id).features))(p)))(params)
  top = grads_norm['trunk/linear_3']['w']
  assert float(jnp.abs(top).max()) < 1e-4 * float(jnp.abs(grads_sum['trunk/linear_3']['w']).max())


def test_no_feature_norm_switch(tiny):
  _, params = tiny
  params = _randomize(params)
  net = make_q_network(dataclasses.replace(NET_CFG, feature_norm=False), GAMES, K)
  obs, game_id = _inputs()
  out = net.apply(params, obs, game_id)  # same parameters: the switch adds none
  norms = jnp.linalg.norm(out.features, axis=-1)
  assert float(jnp.abs(norms - 1.0).max()) > 1e-2
  # Without normalization the heads see the raw trunk output: logits = features @ w + b.
  w, b = params['heads/Breakout']['w'], params['heads/Breakout']['b']
  expected = (out.features[0] @ w + b).reshape(4, K)
  np.testing.assert_allclose(out.logits[0, :4], expected, rtol=1e-4, atol=1e-5)
  # With normalization the features are the same direction, rescaled.
  normed = make_q_network(NET_CFG, GAMES, K).apply(params, obs, game_id)
  np.testing.assert_allclose(normed.features, out.features / norms[:, None], rtol=1e-4,
                             atol=1e-6)


def test_mean_pool_switch():
  net_cfg = dataclasses.replace(NET_CFG, spatial_embedding=False)
  net, params = _init(net_cfg)
  assert 'encoder/spatial_embedding' not in params
  channels = NET_CFG.resnet_width * 2 ** (len(NET_CFG.resnet_stage_sizes) - 1)
  assert params['trunk/linear_0']['w'].shape[0] == channels  # pooled: C, not C * F
  _, params_se = _init()
  assert params_se['encoder/spatial_embedding']['kernel'].shape == (
      4, 4, channels, NET_CFG.spatial_embedding_features)  # 84 / 12 = 7 -> stride 2 -> 4
  assert params_se['trunk/linear_0']['w'].shape[0] == channels * NET_CFG.spatial_embedding_features
  out = net.apply(params, *_inputs())
  chex.assert_shape(out.logits, (B, 6, K))


def test_spatial_embedding_is_position_sensitive():
  """The spatial embedding weighs each position; global mean pooling ignores positions."""
  from scaled_ql.networks import q_network
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 4))
  x_flipped = x[:, ::-1, ::-1, :]
  se = hk.without_apply_rng(hk.transform(lambda v: q_network.spatial_embedding(v, 3)))
  p = se.init(jax.random.PRNGKey(1), x)
  (kernel,) = jax.tree_util.tree_leaves(p)
  assert kernel.shape == (5, 5, 4, 3)
  y, y_flipped = se.apply(p, x), se.apply(p, x_flipped)
  chex.assert_shape(y, (2, 12))
  assert float(jnp.abs(y - y_flipped).max()) > 1e-3
  # Per channel c and feature f: sum_hw x[h,w,c] * kernel[h,w,c,f], flattened as c*F + f.
  np.testing.assert_allclose(y[1, 2 * 3 + 1], jnp.sum(x[1, :, :, 2] * kernel[:, :, 2, 1]),
                             rtol=1e-5)
  # Global mean pooling (the ablation) cannot tell the two apart.
  np.testing.assert_allclose(jnp.mean(x, axis=(1, 2)), jnp.mean(x_flipped, axis=(1, 2)),
                             rtol=1e-5)


def test_head_of_a_game_depends_only_on_its_own_head_params(tiny):
  net, params = tiny
  params = _randomize(params)
  obs, game_id = _inputs()  # alternating Breakout (0), Pong (1)
  out = net.apply(params, obs, game_id)
  # Padded actions (Breakout has 4 of Pong's 6): finite zeros.
  assert bool(jnp.all(out.logits[game_id == 0][:, 4:] == 0.0))
  assert bool(jnp.all(out.logits[game_id == 1][:, 4:] != 0.0))

  breakout = game_id == 0
  grads = jax.jit(jax.grad(
      lambda p: jnp.sum(net.apply(p, obs, game_id).logits[breakout])))(params)
  assert float(jnp.abs(grads['heads/Pong']['w']).max()) == 0.0
  assert float(jnp.abs(grads['heads/Pong']['b']).max()) == 0.0
  assert float(jnp.abs(grads['heads/Breakout']['w']).max()) > 0.0

  # Changing Pong's head changes Pong's logits only.
  changed = dict(params)
  changed['heads/Pong'] = jax.tree_util.tree_map(lambda x: x + 1.0, params['heads/Pong'])
  out2 = net.apply(changed, obs, game_id)
  np.testing.assert_array_equal(out2.logits[breakout], out.logits[breakout])
  assert float(jnp.abs(out2.logits[~breakout] - out.logits[~breakout]).max()) > 0.1
  # Head params are sized by each game's own action set: padded actions have no params.
  assert params['heads/Breakout']['w'].shape == (NET_CFG.trunk_hidden_dims[-1], 4 * K)
  assert params['heads/Pong']['b'].shape == (6 * K,)


def test_heads_match_a_per_example_reference(tiny):
  net, params = tiny
  params = _randomize(params)
  obs, game_id = _inputs()
  out = net.apply(params, obs, game_id)
  for i, g in enumerate(np.asarray(game_id)):
    head = params[f'heads/{GAMES[g]}']
    n = games_lib.num_actions(GAMES[g])
    expected = (out.features[i] @ head['w'] + head['b']).reshape(n, K)
    np.testing.assert_allclose(out.logits[i, :n], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('num_games', [1, 3])
@pytest.mark.parametrize('batch', [1, 5])
def test_head_logits_per_game_equal_the_one_matmul_form(num_games, batch):
  rng = np.random.default_rng(batch * 10 + num_games)
  d, widths = 16, [4 * 3, 18 * 3, 6 * 3][:num_games]
  features = jnp.asarray(rng.normal(size=(batch, d)), jnp.float32)
  ws = [jnp.asarray(rng.normal(size=(d, n)), jnp.float32) for n in widths]
  bs = [jnp.asarray(rng.normal(size=(n,)), jnp.float32) for n in widths]
  per_game = q_network.head_logits_per_game(features, ws, bs)
  one = q_network.head_logits_one_matmul(features, ws, bs)
  chex.assert_shape(per_game, [(batch, n) for n in widths])
  chex.assert_trees_all_close(per_game, one, rtol=1e-5, atol=1e-5)
  grad = lambda fn: jax.grad(lambda f, w, b: sum(jnp.sum(jnp.sin(x)) for x in fn(f, w, b)),
                             argnums=(0, 1, 2))(features, ws, bs)
  chex.assert_trees_all_close(grad(q_network.head_logits_per_game),
                              grad(q_network.head_logits_one_matmul), rtol=1e-5, atol=1e-5)


def test_on_cpu_the_heads_weights_are_not_concatenated(tiny):
  """`MultiGameHeads` runs a matmul per game on a CPU: the compiled network holds no
  concatenation of the heads' weights or biases (at batch 1 that copy made cpu_small's policy
  call 0.40 ms instead of 0.26)."""
  net, params = tiny
  obs, game_id = _inputs(batch=1)
  hlo = jax.jit(net.apply).lower(params, obs, game_id).compile().as_text()
  total = sum(games_lib.num_actions(g) for g in GAMES) * K
  concats = [line for line in hlo.splitlines()
             if 'concatenate(' in line and f'{total}]' in line.split('concatenate(')[0]]
  assert not concats, concats
  # The one-matmul form does concatenate them (what the assertion above would catch).
  one = jax.jit(q_network.head_logits_one_matmul).lower(
      jnp.zeros((1, NET_CFG.trunk_hidden_dims[-1])),
      [params[f'heads/{g}']['w'] for g in GAMES], [params[f'heads/{g}']['b'] for g in GAMES])
  assert f'{total}]' in ''.join(line.split('concatenate(')[0] for line in
                                one.compile().as_text().splitlines() if 'concatenate(' in line)


def test_bfloat16_compute_path(tiny):
  _, params = tiny
  params = _randomize(params, scale=0.1)
  obs, game_id = _inputs()
  bf16_cfg = dataclasses.replace(NET_CFG, compute_dtype='bfloat16')
  net16 = make_q_network(bf16_cfg, GAMES, K)
  # Same parameter tree, created in float32.
  params16 = net16.init(jax.random.PRNGKey(0), obs, game_id)
  chex.assert_trees_all_equal_shapes_and_dtypes(params16, params)
  out16 = jax.jit(net16.apply)(params, obs, game_id)
  out32 = jax.jit(make_q_network(NET_CFG, GAMES, K).apply)(params, obs, game_id)
  chex.assert_type([out16.logits, out16.features], [jnp.float32, jnp.float32])
  np.testing.assert_allclose(out16.features, out32.features, atol=0.05)
  np.testing.assert_allclose(out16.logits, out32.logits, atol=0.1)
  assert float(jnp.abs(out16.logits - out32.logits).max()) > 0.0  # it did run in bf16
  # Convolutions and matmuls run in bfloat16.
  jaxpr = str(jax.make_jaxpr(net16.apply)(params, obs, game_id))
  assert 'conv_general_dilated' in jaxpr
  conv_lines = [l for l in jaxpr.splitlines() if 'conv_general_dilated' in l]
  assert all('bf16' in l.split('=')[0] for l in conv_lines)
  dot_lines = [l for l in jaxpr.splitlines() if 'dot_general' in l]
  assert dot_lines and all('bf16' in l.split('=')[0] for l in dot_lines)
  # Gradients come back in float32.
  grads = jax.jit(jax.grad(lambda p: jnp.sum(net16.apply(p, obs, game_id).logits)))(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))


def test_param_split_sums_to_total(tiny):
  _, params = tiny
  counts = param_counts(params)
  assert set(counts) == {'encoder', 'trunk', 'heads', 'total'}
  assert counts['total'] == hk.data_structures.tree_size(params)
  assert counts['encoder'] + counts['trunk'] + counts['heads'] == counts['total']
  d = NET_CFG.trunk_hidden_dims[-1]
  assert counts['heads'] == (d + 1) * (4 + 6) * K


def test_encoder_param_filter_picks_exactly_the_encoder(tiny):
  _, params = tiny
  encoder, rest = hk.data_structures.partition(encoder_param_filter, params)
  assert 'encoder/spatial_embedding' in encoder
  assert 'encoder/stem_conv' in encoder
  assert all(m.startswith('encoder/') for m in encoder)
  assert all(m.startswith(('trunk/', 'heads/')) for m in rest)
  assert hk.data_structures.tree_size(encoder) == param_counts(params)['encoder']


def test_resnet101_40_games_shapes_only():
  """Paper-sized network through `jax.eval_shape` only (nothing is allocated)."""
  games = games_lib.TRAINING_GAMES_40
  net = make_q_network(configs.NETWORKS['resnet101'], games, 51)
  obs = jax.ShapeDtypeStruct((3, 84, 84, 4), jnp.uint8)
  gid = jax.ShapeDtypeStruct((3,), jnp.int32)
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0), obs, gid)
  out = jax.eval_shape(net.apply, params, obs, gid)
  assert out.logits.shape == (3, 18, 51) and out.features.shape == (3, 1024)
  assert params['encoder/spatial_embedding']['kernel'].shape == (3, 3, 2048, 8)
  counts = param_counts(params)
  # The paper's "about 80M" for ResNet-101 is encoder + trunk (the 40 heads add ~26M).
  assert 79e6 < counts['encoder'] + counts['trunk'] < 81.5e6
  assert counts['heads'] == (1024 + 1) * sum(games_lib.action_counts(games)) * 51


@pytest.mark.parametrize('overrides,final_hw', [
    (dict(stem='imagenet', resnet_block='bottleneck', resnet_width=4, resnet_stage_sizes=(1, 1)),
     (11, 11)),
    (dict(stem='imagenet', resnet_block='basic', resnet_width=4, resnet_stage_sizes=(1, 1, 1, 1)),
     (3, 3)),
    (dict(encoder='impala', impala_channels=(4, 8, 8)), (11, 11)),
    # Nature-DQN stem: 84 -8x8/4-> 20 -4x4/2-> 9 -3x3/1-> 7, then one stage at stride 1.
    (dict(stem='nature', resnet_block='basic', resnet_width=4, resnet_stage_sizes=(1,)), (7, 7)),
])
def test_other_encoders_real_tiny(overrides, final_hw):
  net_cfg = dataclasses.replace(NET_CFG, **overrides)
  net, params = _init(net_cfg)
  kernel = params['encoder/spatial_embedding']['kernel']
  assert kernel.shape[:2] == final_hw
  if overrides.get('resnet_block') == 'bottleneck':
    assert kernel.shape[2] == 4 * 4 * 2  # bottleneck expansion 4 at the second stage
  out = net.apply(params, *_inputs())
  chex.assert_shape(out.logits, (B, 6, K))
  chex.assert_tree_all_finite(out)


@pytest.mark.parametrize('patch', [4, 5, 12])
def test_patchify_stem_equals_a_strided_valid_conv(patch):
  from scaled_ql.networks import q_network
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 84, 84, 4))
  mine = hk.without_apply_rng(hk.transform(lambda v: q_network.PatchifyConv(6, patch)(v)))
  ref = hk.without_apply_rng(hk.transform(lambda v: hk.Conv2D(
      6, patch, stride=patch, padding='VALID', with_bias=False)(v)))
  p = mine.init(jax.random.PRNGKey(1), x)
  (w,) = jax.tree_util.tree_leaves(p)
  assert w.shape == (patch, patch, 4, 6)
  y = mine.apply(p, x)
  assert y.shape == (2, 84 // patch, 84 // patch, 6)
  np.testing.assert_allclose(y, ref.apply({'conv2_d': {'w': w}}, x), rtol=1e-4, atol=1e-5)


def test_has_strided_convolutions():
  """The networks whose gradients hold dilated convolutions (what XLA's classic CPU runtime
  aborts on): the ResNets with a strided stem convolution or more than one stage."""
  from scaled_ql.configs import NETWORKS
  from scaled_ql.networks import q_network
  strided = {name for name, net in NETWORKS.items() if q_network.has_strided_convolutions(net)}
  assert strided == {'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
                     'resnet_cpu_tiny'}
  one_stage = dataclasses.replace(NETWORKS['resnet_cpu_tiny'], resnet_stage_sizes=(1,))
  assert not q_network.has_strided_convolutions(one_stage)  # the patchify stem is a matmul


def test_patch_matmul_is_a_matmul_with_its_gradients():
  """`q_network.patch_matmul` (the stem's matmul, with its weight gradient computed as the
  transposed [C, K] product): the value and both gradients of x @ w."""
  from scaled_ql.networks import q_network
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 5, 24))
  w = jax.random.normal(jax.random.PRNGKey(1), (24, 7))
  g = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 5, 7))
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * g)
  np.testing.assert_allclose(q_network.patch_matmul(x, w), x @ w, rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(q_network.patch_matmul), (0, 1))(x, w)
  want = jax.grad(loss(lambda x, w: x @ w), (0, 1))(x, w)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-4)
  chex.assert_shape(got, ((3, 5, 5, 24), (24, 7)))


@pytest.mark.parametrize('input_norm,patch,dtype', [('standardize', 12, 'float32'),
                                                    ('scale', 7, 'float32'),
                                                    ('standardize', 12, 'bfloat16')])
def test_frame_patches_give_the_stacked_observations_result(input_norm, patch, dtype):
  """Observations given as `FramePatches` of frame windows (each frame preprocessed once): the
  same logits and features as the uint8 stacks, with the same params."""
  from scaled_ql.networks import q_network
  net_cfg = dataclasses.replace(NET_CFG, input_norm=input_norm, stem_patch=patch,
                                compute_dtype=dtype)
  net, params = _init(net_cfg)
  params = _randomize(params)
  rng = np.random.default_rng(4)
  frames = rng.integers(0, 256, (2, 9, 84, 84), dtype=np.uint8)
  frames[1, 2:5] = 0  # blank frames (standardize: 0, not NaN)
  item = np.array([0, 0, 1, 1, 1, 0], np.int32)
  first = np.array([0, 5, 0, 1, 3, 2], np.int32)  # observation b: frames first .. first+3
  stacks = jnp.asarray(np.moveaxis(frames[item[:, None], first[:, None] + np.arange(4)], 1, -1))
  patches = q_network.frame_patches(jnp.asarray(frames), net_cfg)
  assert patches.shape == (2, 84 // patch, 84 // patch, 9, patch * patch)
  _, game_id = _inputs()
  got = net.apply(params, q_network.FramePatches(patches, jnp.asarray(item), jnp.asarray(first)),
                  game_id)
  want = net.apply(params, stacks, game_id)
  tol = 1e-4 if dtype == 'float32' else 5e-2
  np.testing.assert_allclose(got.logits, want.logits, rtol=tol, atol=tol)
  np.testing.assert_allclose(got.features, want.features, rtol=tol, atol=tol)
  with pytest.raises(ValueError, match=r"strided stem, not encoder='resnet' stem='nature'"):
    q_network.frame_patches(jnp.asarray(frames), dataclasses.replace(net_cfg, stem='nature'))
  with pytest.raises(ValueError, match=r'patches must be \[N, \d+, \d+, F'):
    net.apply(params, q_network.FramePatches(patches[..., :-1], jnp.asarray(item),
                                             jnp.asarray(first)), game_id)
  with pytest.raises(ValueError, match='hold 3 frames per window; an observation needs 4'):
    net.apply(params, q_network.FramePatches(patches[:, :, :, :3], jnp.asarray(item),
                                             jnp.asarray(first)), game_id)


def test_flops(tiny):
  flops = flops_breakdown(NET_CFG, GAMES, K)
  assert flops['total'] == pytest.approx(flops_per_example(NET_CFG, GAMES, K))
  assert flops['encoder'] > flops['trunk'] > 0
  d = NET_CFG.trunk_hidden_dims[-1]
  assert flops['heads'] == 2 * d * 10 * K
  # The stem alone: 7x7 outputs x 8 channels x (12*12*4) MACs x 2.
  p = NET_CFG.stem_patch
  assert flops['encoder'] > 2 * (84 // p) ** 2 * NET_CFG.resnet_width * p * p * 4
  bigger = flops_per_example(dataclasses.replace(NET_CFG, resnet_width=16), GAMES, K)
  assert bigger > 2 * flops['encoder']


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match='resnet_block'):
    make_q_network(dataclasses.replace(NET_CFG, resnet_block='wide'), GAMES, K)
  with pytest.raises(ValueError, match='compute_dtype'):
    make_q_network(dataclasses.replace(NET_CFG, compute_dtype='float16'), GAMES, K)
  with pytest.raises(ValueError, match='input_norm'):
    make_q_network(dataclasses.replace(NET_CFG, input_norm='zscore'), GAMES, K)
  with pytest.raises(games_lib.UnknownGameError, match='Pongg'):
    make_q_network(NET_CFG, ('Pongg',), K)
  net = make_q_network(NET_CFG, GAMES, K)
  with pytest.raises(ValueError, match='uint8'):
    net.init(jax.random.PRNGKey(0), jnp.zeros((2, 84, 84, 4), jnp.float32),
             jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match='84,84,4'):
    net.init(jax.random.PRNGKey(0), jnp.zeros((2, 84, 84, 3), jnp.uint8),
             jnp.zeros((2,), jnp.int32))


def test_input_scaling():
  """'scale' is x / 255; 'standardize' takes each frame of the stack to zero spatial mean and
  std s / (s + 1) (s its std in grey levels), so the background drops out and a blank frame is 0."""
  from scaled_ql.networks.q_network import preprocess
  rng = np.random.default_rng(0)
  obs = np.full((2, 84, 84, 4), 87, np.uint8)  # Pong-grey background
  obs[0, 40:42, 50, 3] = 236  # a 2-pixel ball in the latest frame of example 0
  obs[1, ..., 0] = 0  # a blank (zero-padded) history frame
  obs[1, ..., 1] = rng.integers(0, 256, (84, 84))
  np.testing.assert_allclose(preprocess(jnp.asarray(obs), 'scale'), obs / 255.0, rtol=1e-6)
  x = np.asarray(preprocess(jnp.asarray(obs), 'standardize'))
  np.testing.assert_allclose(x.mean(axis=(1, 2)), 0.0, atol=1e-5)
  s = obs.astype(np.float64).std(axis=(1, 2))
  np.testing.assert_allclose(x.std(axis=(1, 2)), s / (s + 1.0), rtol=1e-4, atol=1e-6)
  assert np.all(x[1, ..., 0] == 0.0) and np.all(x[0, ..., 0] == 0.0)  # constant frames -> 0
  ball, background = x[0, 40, 50, 3], x[0, 0, 0, 3]
  assert ball > 20 and abs(background) < 0.1  # the ball stands out, the background is ~0
  net_cfg = dataclasses.replace(NET_CFG, input_norm='standardize')
  net, params = _init(net_cfg)
  out = net.apply(params, *_inputs())
  assert np.all(np.isfinite(np.asarray(out.logits)))


def test_describe_cli(capsys):
  from scaled_ql import cli
  assert cli.main(['describe', '--config', 'cpu_tiny']) == 0
  text = capsys.readouterr().out
  assert 'encoder/stem_conv' in text and 'heads' in text and 'FLOPs' in text
  assert 'float32[4, 4, 16, 2]' in text  # the spatial embedding kernel: 84 / 12 = 7 -> 4
  assert 'total 20,862' in text
  assert cli.main(['describe', '--config', 'cpu_tiny', '--games', '3']) == 0
  assert '3 games' in capsys.readouterr().out
  assert cli.main(['describe', '--config', 'no_such_config']) == 2
  err = capsys.readouterr().err
  assert 'no_such_config' in err and 'cpu_small' in err


def test_standardize_one_pass_matches_the_two_pass_reference():
  from scaled_ql.networks.q_network import standardize
  rng = np.random.default_rng(0)
  # Post-ReLU-like activations: a mean well above the spread, where one-pass loses most.
  y = (3.0 + 0.5 * rng.standard_normal((4, 7, 7, 2, 16))).astype(np.float32)
  out = jax.jit(standardize, static_argnums=(1, 2))(jnp.asarray(y), (1, 2, 4), 1e-5)
  chex.assert_shape(out, y.shape)
  mean = y.astype(np.float64).mean(axis=(1, 2, 4), keepdims=True)
  var = ((y - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  np.testing.assert_allclose(np.asarray(out), (y - mean) / np.sqrt(var + 1e-5), atol=2e-4)
  # A near-constant group far from 0: E[y^2] - E[y]^2 rounds to -0.023 here (found by search),
  # and without the clamp rsqrt(var + eps) is NaN.
  r = np.random.default_rng(3)
  c = np.full((1, 3, 3, 1, 4), r.uniform(100, 3000), np.float32)
  flat = jnp.asarray(c + np.float32(1e-4) * r.standard_normal(c.shape).astype(np.float32))
  assert np.isfinite(np.asarray(standardize(flat, (1, 2, 4), 1e-5))).all()

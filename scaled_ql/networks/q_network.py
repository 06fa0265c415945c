"""The multi-game Q-network of Scaled QL (Section 4, Figure 3, Appendix B.1), in one file.

    observation uint8 [B,84,84,4] -> /255 (or per-frame standardization) -> encoder (ResNet v1 + GroupNorm, or IMPALA-CNN)
      -> learned spatial embedding (or global mean pooling)            [B, C*F]   } module 'encoder'
      -> Dense(2048) + LayerNorm -> 3 x (Dense(1024) + ReLU)           [B, D]     } module 'trunk'
      -> feature normalization x / ||x||_2 (gradients flow through)    [B, D]
      -> one linear head per game, |A_g| x num_atoms logits, padded    [B, A_max, num_atoms]
                                                                                  } module 'heads'

The top-level modules are named 'encoder', 'trunk' and 'heads' so that parameters can be split by
their first path component (`encoder_param_filter`, `param_counts`).

The learner may give the observations as `FramePatches` instead: frame windows whose frames were
preprocessed and cut into the patchify stem's patches once each (`frame_patches`), for the
'strided' stem only. The result is the same; the stem's input costs half as much
(docs/history/performance_log.md, "Frame patches").

Mixed precision (`compute_dtype='bfloat16'`): parameters are created and stored in float32, cast to
bfloat16 when read by convolutions, matmuls and the spatial embedding; GroupNorm/LayerNorm
statistics, feature normalization and the returned logits/features are float32.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from scaled_ql import games as games_lib
from scaled_ql.configs.base import NetworkConfig

ENCODER = 'encoder'
TRUNK = 'trunk'
HEADS = 'heads'
_COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# ResNet stems: 'imagenet' 7x7/2 conv + 3x3/2 max-pool (84 -> 21); 'strided' one PxP/P patchify conv
# (84 -> 84 // P); 'nature' the Nature-DQN convolutions 8x8/4, 4x4/2, 3x3/1, VALID (84 -> 7).
STEMS = ('imagenet', 'strided', 'nature')
INPUT_NORMS = ('scale', 'standardize')


class QNetworkOutput(NamedTuple):
  logits: jax.Array  # f32 [B, A_max, num_atoms]; entries a >= num_actions(game) are 0 (masked)
  features: jax.Array  # f32 [B, D]: the (normalized, if feature_norm) input of the heads


STACK = 4  # frames per observation


class FramePatches(NamedTuple):
  """Observations given as the preprocessed patches of frame windows (`frame_patches`): what the
  learner feeds a 'strided'-stem network, so that each window frame is normalized and cut into
  patches once instead of once per stack position it fills (a window of P transitions holds
  P + n + 3 frames for 8P frame uses). Observation b is frames first[b] .. first[b] + 3 of
  window item[b]; the network's result is the same as on the stacked uint8 observation.

  The frame axis comes after the patch grid, so that an observation's four frames of one patch
  are adjacent in memory and the stem's input is a plain slice of them (no transpose)."""
  patches: jax.Array  # [N, H/P, W/P, F, P*P] in the compute dtype: frame f of window n
  item: jax.Array  # int32 [B]
  first: jax.Array  # int32 [B]


def takes_frame_patches(net_cfg: NetworkConfig) -> bool:
  """Whether the network can take `FramePatches` (a ResNet with the 'strided' patchify stem)."""
  return net_cfg.encoder == 'resnet' and net_cfg.stem == 'strided'


def frame_patches(frames: jax.Array, net_cfg: NetworkConfig) -> jax.Array:
  """uint8 [N, F, 84, 84] window frames -> [N, 84/P, 84/P, F, P*P]: each frame preprocessed
  (`preprocess`, per frame) and cut into PxP patches, (row, column) order within a patch; the
  frame axis after the patch grid (`FramePatches`).

  The patches are cut from the uint8 frames and normalized after: XLA:CPU moves bytes through
  this 6-D transposition ~7x faster than the float32 frames (docs/history/performance_log.md)."""
  if not takes_frame_patches(net_cfg):
    raise ValueError(f'frame patches need a resnet with the strided stem, not encoder='
                     f'{net_cfg.encoder!r} stem={net_cfg.stem!r}')
  n, f, h, w = frames.shape
  p = net_cfg.stem_patch
  ho, wo = h // p, w // p
  # One transposition to the final layout. (`space_to_depth` then a move of the frame axis gives
  # the same values, but XLA then fuses the frame move into each observation's gather: 3.4-3.7
  # ms per gather instead of ~2, measured with benchmarks/update_profile.py.)
  patches = frames[:, :, :ho * p, :wo * p].reshape(n, f, ho, p, wo, p)
  patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(n, ho, wo, f, p * p)
  dtype = _COMPUTE_DTYPES[net_cfg.compute_dtype]
  if net_cfg.input_norm == 'scale':
    return _scale(patches, dtype)
  # Statistics of each whole frame (as `preprocess`), broadcast over its patches.
  mean, scale = _frame_statistics(frames.astype(jnp.float32), axes=(2, 3))
  mean, scale = (v.reshape(n, 1, 1, f, 1) for v in (mean, scale))
  return ((patches.astype(jnp.float32) - mean) / scale).astype(dtype)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/P, W/P, P*P*C]: non-overlapping PxP patches, (row, column, channel)
  order within a patch (rows and columns beyond a whole patch are dropped)."""
  b, h, w, c = x.shape
  ho, wo = h // p, w // p
  if ho < 1 or wo < 1:
    raise ValueError(f'stem_patch={p} is larger than the {h}x{w} input')
  x = x[:, :ho * p, :wo * p].reshape(b, ho, p, wo, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, ho, wo, p * p * c)


def has_strided_convolutions(net_cfg: NetworkConfig) -> bool:
  """Whether the network has a strided convolution (whose gradient is a dilated convolution): a
  ResNet's 'imagenet' or 'nature' stem, or a stage after the first. The 'strided' stem is a
  matmul (`PatchifyConv`); the IMPALA-CNN downsamples by max-pooling."""
  return net_cfg.encoder == 'resnet' and (net_cfg.stem != 'strided'
                                          or len(net_cfg.resnet_stage_sizes) > 1)


def check_network_config(net_cfg: NetworkConfig) -> None:
  """Raises ValueError naming the offending NetworkConfig field, before any tracing."""
  def bad(field, value, valid):
    raise ValueError(f'NetworkConfig.{field}={value!r} is invalid; expected {valid}')
  if net_cfg.encoder not in ('resnet', 'impala'):
    bad('encoder', net_cfg.encoder, "'resnet' or 'impala'")
  if net_cfg.resnet_block not in ('basic', 'bottleneck'):
    bad('resnet_block', net_cfg.resnet_block, "'basic' or 'bottleneck'")
  if net_cfg.stem not in STEMS:
    bad('stem', net_cfg.stem, ' or '.join(repr(x) for x in STEMS))
  if net_cfg.input_norm not in INPUT_NORMS:
    bad('input_norm', net_cfg.input_norm, ' or '.join(repr(x) for x in INPUT_NORMS))
  if net_cfg.compute_dtype not in _COMPUTE_DTYPES:
    bad('compute_dtype', net_cfg.compute_dtype, f'one of {sorted(_COMPUTE_DTYPES)}')
  if not net_cfg.resnet_stage_sizes or min(net_cfg.resnet_stage_sizes) < 1:
    bad('resnet_stage_sizes', net_cfg.resnet_stage_sizes, 'a non-empty tuple of ints >= 1')
  if not net_cfg.impala_channels or net_cfg.impala_width < 1:
    bad('impala_channels/impala_width', (net_cfg.impala_channels, net_cfg.impala_width),
        'non-empty channels and width >= 1')
  if net_cfg.resnet_width < 1:
    bad('resnet_width', net_cfg.resnet_width, 'an int >= 1')
  if net_cfg.group_norm_groups < 1 or net_cfg.resnet_width % net_cfg.group_norm_groups:
    bad('group_norm_groups', net_cfg.group_norm_groups,
        f'a divisor of resnet_width={net_cfg.resnet_width}')
  if not 1 <= net_cfg.stem_patch <= 84:
    bad('stem_patch', net_cfg.stem_patch, 'an int in 1..84')
  if net_cfg.spatial_embedding_features < 1:
    bad('spatial_embedding_features', net_cfg.spatial_embedding_features, 'an int >= 1')
  if net_cfg.trunk_first_dim < 1 or min(net_cfg.trunk_hidden_dims, default=1) < 1:
    bad('trunk_first_dim/trunk_hidden_dims',
        (net_cfg.trunk_first_dim, net_cfg.trunk_hidden_dims), 'positive sizes')


# ----------------------------------------------------------------------------------------------
# Normalization layers: statistics always in float32, output in the input's (compute) dtype.

def standardize(y: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
  """(y - mean) / sqrt(var + eps) over `axes`. One pass: var = E[y^2] - E[y]^2 (clamped at 0), so
  the two statistics are sibling reductions that XLA fuses into one read of y, as flax's
  `use_fast_variance` does. Against the two-pass form it cut a ResNet-101 update on the H200 from
  3913 to 3195 kernels and sped it up 7% (docs/history/performance_log.md, "GPU suite")."""
  mean = jnp.mean(y, axis=axes, keepdims=True)
  var = jnp.maximum(jnp.mean(jnp.square(y), axis=axes, keepdims=True) - jnp.square(mean), 0.0)
  return (y - mean) * jax.lax.rsqrt(var + eps)


class GroupNorm(hk.Module):
  """GroupNorm over (H, W, channels-of-group) for NHWC inputs (Wu & He 2018)."""

  def __init__(self, groups: int, scale_init: float = 1.0, eps: float = 1e-5, name=None):
    super().__init__(name=name)
    self.groups, self.scale_init, self.eps = groups, scale_init, eps

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if c % self.groups:
      raise ValueError(f'GroupNorm: {c} channels are not divisible by {self.groups} groups')
    scale = hk.get_parameter('scale', [c], jnp.float32, hk.initializers.Constant(self.scale_init))
    offset = hk.get_parameter('offset', [c], jnp.float32, jnp.zeros)
    y = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    y = standardize(y, (1, 2, 4), self.eps).reshape(b, h, w, c)
    return (y * scale + offset).astype(x.dtype)


class LayerNorm(hk.Module):
  """LayerNorm over the last axis, float32 statistics."""

  def __init__(self, eps: float = 1e-5, name=None):
    super().__init__(name=name)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = hk.get_parameter('scale', [c], jnp.float32, jnp.ones)
    offset = hk.get_parameter('offset', [c], jnp.float32, jnp.zeros)
    y = standardize(x.astype(jnp.float32), (-1,), self.eps)
    return (y * scale + offset).astype(x.dtype)


def _conv(channels: int, kernel: int, stride: int = 1, padding: str = 'SAME', name=None,
          with_bias: bool = False) -> hk.Conv2D:
  # He-normal init (fan_in) for convolutions followed by ReLU.
  return hk.Conv2D(channels, kernel, stride=stride, padding=padding, with_bias=with_bias,
                   w_init=hk.initializers.VarianceScaling(2.0, 'fan_in', 'truncated_normal'),
                   name=name)


@jax.custom_vjp
def patch_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, C], whose gradient for w is computed as (g^T x)^T: the [C, K] product.

  XLA:CPU computes the plain gradient x^T g, [K, C] with K = 576 and C = 32 for cpu_small's stem
  and x of [12544, 576], at 51 GFLOP/s against 115 for g^T x (9.0 vs 4.0 ms alone;
  docs/history/performance_log.md, "XLA's classic CPU runtime"). The values are the same."""
  return x @ w


def _patch_matmul_fwd(x, w):
  return x @ w, (x, w)


def _patch_matmul_bwd(residuals, g):
  x, w = residuals
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  return g @ w.T, (g2.T @ x2).T


patch_matmul.defvjp(_patch_matmul_fwd, _patch_matmul_bwd)


class PatchifyConv(hk.Module):
  """A PxP conv with stride P and VALID padding, computed as space-to-depth + one matmul.

  Same parameter ('w' [P, P, C_in, C_out], no bias) and same result as `hk.Conv2D(C_out, P,
  stride=P, padding='VALID', with_bias=False)`, but forward and backward are plain matmuls,
  about 2x faster than XLA:CPU's strided convolution (benchmarks/network_step_throughput.py).
  Also takes `FramePatches` (the learner's input): the same kernel, its rows reordered.
  """

  def __init__(self, channels: int, patch: int, name=None):
    super().__init__(name=name)
    self.channels, self.patch = channels, patch

  def __call__(self, x: jax.Array | FramePatches) -> jax.Array:
    p = self.patch
    if isinstance(x, FramePatches):
      return self._from_frame_patches(x)
    c = x.shape[-1]
    kernel = self._kernel(c, x.dtype)
    return patch_matmul(space_to_depth(x, p), kernel.reshape(p * p * c, self.channels))

  def _kernel(self, c: int, dtype) -> jax.Array:
    return hk.get_parameter('w', [self.patch, self.patch, c, self.channels], dtype,
                            hk.initializers.VarianceScaling(2.0, 'fan_in', 'truncated_normal'))

  def _from_frame_patches(self, x: FramePatches) -> jax.Array:
    p = self.patch
    _, ho, wo, _, pp = x.patches.shape
    if pp != p * p:
      raise ValueError(f'frame patches of {pp} pixels do not fit stem_patch={p}')
    kernel = self._kernel(STACK, x.patches.dtype)
    # Observation b: the slice [ho, wo, STACK, P*P] of window item[b] at frame first[b], i.e. the
    # frames' patches side by side, with the kernel's rows in the same (frame, row, column)
    # order. A slice of adjacent frames copies runs of STACK*P*P values: 3x faster than
    # gathering [STACK, ho, wo] and transposing (docs/history/performance_log.md).
    stacked = jax.lax.gather(
        x.patches, jnp.stack([x.item, x.first], axis=1),
        jax.lax.GatherDimensionNumbers(offset_dims=(1, 2, 3, 4), collapsed_slice_dims=(0,),
                                       start_index_map=(0, 3)),
        slice_sizes=(1, ho, wo, STACK, pp), mode='clip')
    stacked = stacked.reshape(-1, ho, wo, STACK * pp)
    return patch_matmul(stacked, kernel.transpose(2, 0, 1, 3).reshape(STACK * pp, self.channels))


# ----------------------------------------------------------------------------------------------
# ResNet v1 with GroupNorm (He et al. 2016; GroupNorm instead of BatchNorm, Appendix B.1).

class BasicBlock(hk.Module):
  """3x3 -> GN -> ReLU -> 3x3 -> GN, + shortcut (1x1 conv + GN when the shape changes), ReLU."""

  def __init__(self, channels: int, stride: int, groups: int, name=None):
    super().__init__(name=name)
    self.channels, self.stride, self.groups = channels, stride, groups

  def __call__(self, x):
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.channels:
      shortcut = _conv(self.channels, 1, self.stride, name='shortcut_conv')(x)
      shortcut = GroupNorm(self.groups, name='shortcut_norm')(shortcut)
    y = _conv(self.channels, 3, self.stride, name='conv_0')(x)
    y = jax.nn.relu(GroupNorm(self.groups, name='norm_0')(y))
    y = _conv(self.channels, 3, name='conv_1')(y)
    # Zero-initialised last scale: every block starts as the identity (Goyal et al. 2017), which
    # keeps the 100+-layer variants trainable from the first step.
    y = GroupNorm(self.groups, scale_init=0.0, name='norm_1')(y)
    return jax.nn.relu(y + shortcut)


class BottleneckBlock(hk.Module):
  """1x1 -> 3x3 (strided, as in 'ResNet v1.5') -> 1x1 x4, GroupNorm after each, + shortcut."""

  def __init__(self, channels: int, stride: int, groups: int, name=None):
    super().__init__(name=name)
    self.channels, self.stride, self.groups = channels, stride, groups

  def __call__(self, x):
    out_channels = 4 * self.channels
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_channels:
      shortcut = _conv(out_channels, 1, self.stride, name='shortcut_conv')(x)
      shortcut = GroupNorm(self.groups, name='shortcut_norm')(shortcut)
    y = _conv(self.channels, 1, name='conv_0')(x)
    y = jax.nn.relu(GroupNorm(self.groups, name='norm_0')(y))
    y = _conv(self.channels, 3, self.stride, name='conv_1')(y)
    y = jax.nn.relu(GroupNorm(self.groups, name='norm_1')(y))
    y = _conv(out_channels, 1, name='conv_2')(y)
    y = GroupNorm(self.groups, scale_init=0.0, name='norm_2')(y)
    return jax.nn.relu(y + shortcut)


def resnet_torso(x: jax.Array, net_cfg: NetworkConfig) -> jax.Array:
  """[B,84,84,4] in [0,1] -> final feature map [B,H,W,C]. Call inside the 'encoder' module."""
  groups, width = net_cfg.group_norm_groups, net_cfg.resnet_width
  if net_cfg.stem == 'imagenet':  # 84 -> 42 -> 21
    x = _conv(width, 7, 2, name='stem_conv')(x)
    x = jax.nn.relu(GroupNorm(groups, name='stem_norm')(x))
    x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding='SAME')
  elif net_cfg.stem == 'strided':  # a PxP/P patchify conv (P = stem_patch), e.g. 84 -> 7 for P=12
    x = PatchifyConv(width, net_cfg.stem_patch, name='stem_conv')(x)
    x = jax.nn.relu(GroupNorm(groups, name='stem_norm')(x))
  else:  # 'nature': Mnih et al. (2015)'s 8x8/4 (32), 4x4/2 (64), 3x3/1 (64), VALID: 84->20->9->7,
    # the last one with `width` channels (it feeds the residual stages).
    x = _conv(32, 8, 4, padding='VALID', name='stem_conv_0')(x)
    x = jax.nn.relu(x)
    x = _conv(64, 4, 2, padding='VALID', name='stem_conv_1')(x)
    x = jax.nn.relu(x)
    x = _conv(width, 3, 1, padding='VALID', name='stem_conv_2')(x)
    x = jax.nn.relu(GroupNorm(groups, name='stem_norm')(x))
  block_cls = BasicBlock if net_cfg.resnet_block == 'basic' else BottleneckBlock
  for stage, num_blocks in enumerate(net_cfg.resnet_stage_sizes):
    for i in range(num_blocks):
      stride = 2 if (stage > 0 and i == 0) else 1
      x = block_cls(width * 2 ** stage, stride, groups, name=f'stage_{stage}_block_{i}')(x)
  return x


# ----------------------------------------------------------------------------------------------
# IMPALA-CNN (Espeholt et al. 2018): per stage conv3x3 -> maxpool 3x3/2 -> 2 residual blocks.

def impala_torso(x: jax.Array, net_cfg: NetworkConfig) -> jax.Array:
  """[B,84,84,4] -> [B,11,11,C]. No normalization inside, as in the original IMPALA-CNN."""
  for stage, base in enumerate(net_cfg.impala_channels):
    channels = base * net_cfg.impala_width
    x = hk.Conv2D(channels, 3, name=f'stage_{stage}_conv')(x)
    x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding='SAME')
    for i in range(2):
      y = hk.Conv2D(channels, 3, name=f'stage_{stage}_block_{i}_conv_0')(jax.nn.relu(x))
      y = hk.Conv2D(channels, 3, name=f'stage_{stage}_block_{i}_conv_1')(jax.nn.relu(y))
      x = x + y
  return jax.nn.relu(x)


# ----------------------------------------------------------------------------------------------
# Encoder = torso + spatial aggregation; trunk; feature norm; per-game heads.

def spatial_embedding(x: jax.Array, num_features: int) -> jax.Array:
  """Learned spatial embedding (Appendix B.1): [B,H,W,C] x kernel [H,W,C,F] -> [B, C*F].

  Each channel's map is multiplied point-wise by F learned [H, W] maps and summed over H and W.
  """
  _, h, w, c = x.shape
  kernel = hk.get_parameter('kernel', [h, w, c, num_features], jnp.float32,
                            hk.initializers.TruncatedNormal(stddev=1.0 / np.sqrt(h * w)))
  # A product summed over H and W, not the einsum 'bhwc,hwcf->bcf': XLA:CPU ran that as a matmul
  # batched over the channels, transposing [B, H, W, C] to channel-major in the forward passes and
  # the backward (1.1-1.6 ms each for cpu_small); this fuses (docs/history/performance_log.md,
  # "XLA's classic CPU runtime"). Accumulated in float32, as a bfloat16 matmul is.
  y = jnp.sum(x[..., None] * kernel.astype(x.dtype), axis=(1, 2), dtype=jnp.float32)
  return y.astype(x.dtype).reshape(x.shape[0], c * num_features)


class Encoder(hk.Module):
  """Conv torso + spatial embedding / mean pooling. Everything `encoder_param_filter` selects."""

  def __init__(self, net_cfg: NetworkConfig, name: str = ENCODER):
    super().__init__(name=name)
    self.net_cfg = net_cfg

  def __call__(self, x: jax.Array) -> jax.Array:
    torso = resnet_torso if self.net_cfg.encoder == 'resnet' else impala_torso
    x = torso(x, self.net_cfg)
    if self.net_cfg.spatial_embedding:
      with hk.experimental.name_scope('spatial_embedding'):
        return spatial_embedding(x, self.net_cfg.spatial_embedding_features)
    return jnp.mean(x, axis=(1, 2))  # global mean pooling (ablation)


class Trunk(hk.Module):
  """Dense(trunk_first_dim) + LayerNorm, then Dense(d) + ReLU for d in trunk_hidden_dims.

  Appendix B.1 applies LayerNorm after the first layer and names no activation there; we follow
  it literally (the next layer is linear on the normalized vector).
  """

  def __init__(self, net_cfg: NetworkConfig, name: str = TRUNK):
    super().__init__(name=name)
    self.net_cfg = net_cfg

  def __call__(self, x: jax.Array) -> jax.Array:
    x = hk.Linear(self.net_cfg.trunk_first_dim, name='linear_0')(x)
    x = LayerNorm(name='layer_norm')(x)
    for i, dim in enumerate(self.net_cfg.trunk_hidden_dims):
      x = jax.nn.relu(hk.Linear(dim, name=f'linear_{i + 1}')(x))
    return x


def head_logits_per_game(features: jax.Array, ws: Sequence[jax.Array],
                         bs: Sequence[jax.Array]) -> list[jax.Array]:
  """Every game's head on every example: [B, D] -> [[B, |A_g|*K] per game], one matmul each."""
  return [features @ w.astype(features.dtype) + b.astype(features.dtype) for w, b in zip(ws, bs)]


def head_logits_one_matmul(features: jax.Array, ws: Sequence[jax.Array],
                           bs: Sequence[jax.Array]) -> list[jax.Array]:
  """The same logits from one matmul over the heads' weights concatenated, then sliced."""
  w, b = jnp.concatenate(ws, axis=1), jnp.concatenate(bs)  # (one game: the arrays themselves)
  all_logits = features @ w.astype(features.dtype) + b.astype(features.dtype)  # [B, T]
  bounds = np.cumsum([0] + [x.shape[1] for x in ws])
  return [all_logits[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


class MultiGameHeads(hk.Module):
  """One linear head per game: params `heads/<Game>/{w [D, |A_g|*K], b [|A_g|*K]}`.

  Every example goes through every game's head (G x the FLOPs of a single head, 2*D*sum_g|A_g|*K
  per example, small next to the encoder; BUILD_NOTES.md, networks section) and keeps its own
  game's columns. This avoids a per-example weight gather ([B, D, A_max*K] floats). Padded
  actions have no parameters; their logits are 0 (finite) and the losses mask them.

  How the heads are computed depends on the platform (`jax.lax.platform_dependent`, decided when
  the computation is compiled): on a CPU one matmul per game (`head_logits_per_game`); elsewhere
  one matmul over the concatenated weights (`head_logits_one_matmul`: fewer kernel launches for
  a host-bound accelerator step). On a CPU, at batch 1 (cpu_small's evaluator and actors), the
  policy call took 0.40 ms with the concatenated weights and 0.26 ms with a matmul per game; at
  batches 4 and 16, and for the training update at batch 256, the two run equally fast
  (docs/history/performance_log.md, "The policy at batch 1: a matmul per head").

  The columns are picked with one static slice and one `where` per game, not a gather by
  game_id: the gradient of a gather is a scatter-add, which XLA:CPU runs as a serial loop over
  the batch (with the losses' `select`, this made the cpu_small update ~10% faster, BUILD_NOTES).
  """

  def __init__(self, games: Sequence[str], num_atoms: int, name: str = HEADS):
    super().__init__(name=name)
    self.games, self.num_atoms = tuple(games), num_atoms
    self.counts = games_lib.action_counts(self.games)

  def __call__(self, features: jax.Array, game_id: jax.Array) -> jax.Array:
    d, k = features.shape[-1], self.num_atoms
    ws, bs = [], []
    for game, count in zip(self.games, self.counts):
      with hk.experimental.name_scope(game):
        ws.append(hk.get_parameter('w', [d, count * k], jnp.float32,
                                   hk.initializers.TruncatedNormal(1.0 / np.sqrt(d))))
        bs.append(hk.get_parameter('b', [count * k], jnp.float32, jnp.zeros))
    per_game = jax.lax.platform_dependent(features, ws, bs, cpu=head_logits_per_game,
                                          default=head_logits_one_matmul)
    width = max(self.counts) * k
    logits = jnp.zeros((features.shape[0], width), per_game[0].dtype)
    for g, own in enumerate(per_game):  # game g's head, padded with 0 logits
      logits = jnp.where((game_id == g)[:, None], jnp.pad(own, ((0, 0), (0, width - own.shape[1]))),
                         logits)
    return logits.reshape(-1, max(self.counts), k).astype(jnp.float32)


def _mixed_precision(compute_dtype):
  """Haiku creator/getter: params created in float32, read as `compute_dtype` (norms excepted)."""
  def creator(next_creator, shape, dtype, init, context):
    del context
    return next_creator(shape, jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else dtype, init)

  def getter(next_getter, value, context):
    value = next_getter(value)
    if 'norm' in context.module_name.rsplit('/', 1)[-1]:
      return value  # GroupNorm/LayerNorm apply their affine in float32
    return value.astype(compute_dtype) if jnp.issubdtype(value.dtype, jnp.floating) else value
  return creator, getter


def preprocess(observation: jax.Array, input_norm: str, dtype=jnp.float32) -> jax.Array:
  """uint8 [B,H,W,C] -> network input in `dtype`.

  'scale': x / 255 in [0, 1]. 'standardize': every frame of the stack (channel) minus its spatial
  mean, divided by its spatial std + 1 (in grey levels, so a blank frame maps to 0, not NaN):
  the static background becomes ~0 and the few moving pixels (ball, paddle) carry the signal.
  Statistics in float32.
  """
  if input_norm == 'scale':
    return _scale(observation, dtype)
  x = observation.astype(jnp.float32)
  mean, scale = _frame_statistics(x, axes=(1, 2))
  return ((x - mean) / scale).astype(dtype)


def _scale(x: jax.Array, dtype) -> jax.Array:
  """'scale': uint8 -> x / 255 in [0, 1]."""
  return x.astype(dtype) / 255.0


def _frame_statistics(x: jax.Array, axes: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """'standardize': float32 frames -> (spatial mean, spatial std + 1), kept dims."""
  return (jnp.mean(x, axis=axes, keepdims=True), jnp.std(x, axis=axes, keepdims=True) + 1.0)


def encoder_forward(net_cfg: NetworkConfig, observation: jax.Array) -> jax.Array:
  """The encoder alone, [B,84,84,4] uint8 -> [B, C*F] (call inside hk.transform; for sizing)."""
  compute_dtype = _COMPUTE_DTYPES[net_cfg.compute_dtype]
  creator, getter = _mixed_precision(compute_dtype)
  with hk.custom_creator(creator), hk.custom_getter(getter):
    return Encoder(net_cfg)(preprocess(observation, net_cfg.input_norm, compute_dtype))


def q_network_forward(net_cfg: NetworkConfig, games: Sequence[str], num_atoms: int,
                      observation: jax.Array, game_id: jax.Array) -> QNetworkOutput:
  """The forward pass (call inside hk.transform)."""
  compute_dtype = _COMPUTE_DTYPES[net_cfg.compute_dtype]
  creator, getter = _mixed_precision(compute_dtype)
  with hk.custom_creator(creator), hk.custom_getter(getter):
    if not isinstance(observation, FramePatches):  # FramePatches come preprocessed
      observation = preprocess(observation, net_cfg.input_norm, compute_dtype)
    x = Encoder(net_cfg)(observation)
    x = Trunk(net_cfg)(x).astype(jnp.float32)
    if net_cfg.feature_norm:
      # DR3-motivated feature normalization (Section 4): unit L2 norm, gradients flow through.
      x = x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)
    logits = MultiGameHeads(games, num_atoms)(x.astype(compute_dtype), game_id)
  return QNetworkOutput(logits=logits, features=x)


def check_frame_patches(x: FramePatches, net_cfg: NetworkConfig) -> None:
  """Raises ValueError unless `x` fits a network of `net_cfg` (shapes only; traceable)."""
  if not takes_frame_patches(net_cfg):
    raise ValueError(f'FramePatches need a resnet with the strided stem, not encoder='
                     f'{net_cfg.encoder!r} stem={net_cfg.stem!r}')
  p = net_cfg.stem_patch
  shape = x.patches.shape
  if x.patches.ndim != 5 or shape[1:3] != (84 // p, 84 // p) or shape[4] != p * p:
    raise ValueError(f'FramePatches.patches must be [N, {84 // p}, {84 // p}, F, {p * p}] for '
                     f'stem_patch={p}, got {list(shape)}')
  if shape[3] < STACK:
    raise ValueError(f'FramePatches.patches hold {shape[3]} frames per window; an observation '
                     f'needs {STACK}')
  if x.item.shape != x.first.shape or x.first.ndim != 1:
    raise ValueError(f'FramePatches.item and .first must be [B], got {list(x.item.shape)} and '
                     f'{list(x.first.shape)}')


def make_q_network(net_cfg: NetworkConfig, games: Sequence[str], num_atoms: int) -> hk.Transformed:
  """The Q-network as `hk.Transformed`: `init(rng, observation, game_id)` and
  `apply(params, observation uint8 [B,84,84,4] (or `FramePatches`), game_id int32 [B])
  -> QNetworkOutput` with
  logits f32 [B, A_max, num_atoms] (A_max = max action count over `games`) and features f32 [B, D].
  `apply` takes no rng (the network is deterministic).
  """
  games = games_lib.check_games(games, 'games')
  check_network_config(net_cfg)
  if num_atoms < 1:
    raise ValueError(f'num_atoms={num_atoms} must be >= 1')

  def forward(observation, game_id):
    if isinstance(observation, FramePatches):
      check_frame_patches(observation, net_cfg)
      batch = observation.first.shape
    else:
      if observation.ndim != 4 or observation.shape[1:] != (84, 84, 4):
        raise ValueError(f'observation must be [B,84,84,4], got {observation.shape}')
      if observation.dtype != jnp.uint8:
        raise ValueError(f'observation must be uint8, got {observation.dtype}')
      batch = observation.shape[:1]
    if game_id.shape != batch or not jnp.issubdtype(game_id.dtype, jnp.integer):
      raise ValueError(f'game_id must be int [B={batch[0]}], got '
                       f'{game_id.dtype}{list(game_id.shape)}')
    return q_network_forward(net_cfg, games, num_atoms, observation, game_id)

  return hk.without_apply_rng(hk.transform(forward))


def encoder_param_filter(module_name: str, name: str, value) -> bool:
  """True for the conv encoder's params, incl. the spatial embedding (for `hk.data_structures`)."""
  del name, value
  return module_name.split('/', 1)[0] == ENCODER

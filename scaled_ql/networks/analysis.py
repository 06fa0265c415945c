"""Sizes of a Q-network: parameter counts by part, FLOPs per example, a printable description.

FLOPs come from XLA's HLO cost analysis of the lowered (not compiled) jitted forward pass
(`jax.jit(f).lower(...).cost_analysis()`): no parameters are materialised and nothing is
compiled, so this is cheap even for ResNet-152. A multiply-add counts as 2 FLOPs.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from scaled_ql import games as games_lib
from scaled_ql.configs.base import NetworkConfig
from scaled_ql.networks import q_network

PARTS = (q_network.ENCODER, q_network.TRUNK, q_network.HEADS)


def param_counts(params: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
  """{'encoder', 'trunk', 'heads', 'total'} -> number of scalars (works on ShapeDtypeStructs)."""
  counts = {part: 0 for part in PARTS}
  for module_name, module_params in params.items():
    part = module_name.split('/', 1)[0]
    if part not in counts:
      raise ValueError(f'parameter module {module_name!r} is in none of {PARTS}')
    counts[part] += sum(int(np.prod(v.shape)) for v in module_params.values())
  counts['total'] = sum(counts[p] for p in PARTS)
  return counts


def _specs(batch_size: int):
  return (jax.ShapeDtypeStruct((batch_size, 84, 84, 4), jnp.uint8),
          jax.ShapeDtypeStruct((batch_size,), jnp.int32))


def abstract_params(net_cfg: NetworkConfig, games: Sequence[str], num_atoms: int):
  """The parameter tree as ShapeDtypeStructs (`jax.eval_shape`, no memory, no compile)."""
  net = q_network.make_q_network(net_cfg, games, num_atoms)
  return jax.eval_shape(net.init, jax.random.PRNGKey(0), *_specs(1))


def _lowered_flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returns one dict per computation
    analysis = analysis[0]
  return float(analysis['flops'])


def flops_breakdown(net_cfg: NetworkConfig, games: Sequence[str], num_atoms: int,
                    batch_size: int = 8) -> dict[str, float]:
  """Forward FLOPs per example: {'encoder', 'trunk', 'heads', 'total'} (XLA cost analysis).

  'total' is the whole `apply`; 'encoder' the encoder alone; 'heads' is counted analytically
  (2 * D * sum_g |A_g| * num_atoms: every example goes through every game's head); 'trunk' is
  the rest (trunk + feature norm + gathers).
  """
  games = games_lib.check_games(games, 'games')
  net = q_network.make_q_network(net_cfg, games, num_atoms)
  obs, gid = _specs(batch_size)
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0), obs, gid)
  total = _lowered_flops(net.apply, params, obs, gid) / batch_size

  enc = hk.without_apply_rng(hk.transform(lambda x: q_network.encoder_forward(net_cfg, x)))
  enc_params = jax.eval_shape(enc.init, jax.random.PRNGKey(0), obs)
  encoder = _lowered_flops(enc.apply, enc_params, obs) / batch_size
  dim = (net_cfg.trunk_hidden_dims or (net_cfg.trunk_first_dim,))[-1]
  heads = 2.0 * dim * sum(games_lib.action_counts(games)) * num_atoms
  return dict(encoder=encoder, trunk=total - encoder - heads, heads=heads, total=total)


def flops_per_example(net_cfg: NetworkConfig, games: Sequence[str], num_atoms: int) -> float:
  """Forward FLOPs per example of `make_q_network(net_cfg, games, num_atoms).apply`."""
  return flops_breakdown(net_cfg, games, num_atoms)['total']


def _flops_str(flops: float) -> str:
  return f'{flops / 1e9:.3f} G' if flops >= 1e8 else f'{flops / 1e6:.3f} M'


def _shape(spec) -> str:
  return f'{jnp.dtype(spec.dtype).name}{list(spec.shape)}'


def describe(net_cfg: NetworkConfig, games: Sequence[str], num_atoms: int,
             max_depth: int = 2) -> str:
  """Human-readable summary: modules with output shapes (batch 1) and params, counts, FLOPs."""
  games = games_lib.check_games(games, 'games')
  net = q_network.make_q_network(net_cfg, games, num_atoms)
  obs, gid = _specs(1)
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0), obs, gid)

  def forward(o, g):
    return q_network.q_network_forward(net_cfg, games, num_atoms, o, g)

  lines = [f'{"module":<44} {"output (batch 1)":<26} {"params":>12}']
  params_by_prefix: dict[str, int] = {}
  for module_name, module_params in params.items():
    size = sum(int(np.prod(v.shape)) for v in module_params.values())
    parts = module_name.split('/')
    for depth in range(1, len(parts) + 1):
      prefix = '/'.join(parts[:depth])
      params_by_prefix[prefix] = params_by_prefix.get(prefix, 0) + size
  seen = set()
  for call in hk.experimental.eval_summary(forward)(obs, gid):
    name = call.module_details.module.module_name
    if name.count('/') >= max_depth or name in seen:
      continue
    seen.add(name)
    out = jax.tree_util.tree_leaves(call.output_spec)
    out_str = _shape(out[0]) if len(out) == 1 else f'{len(out)} arrays'
    lines.append(f'{name:<44} {out_str:<26} {params_by_prefix.get(name, 0):>12,}')
  if net_cfg.spatial_embedding:
    kernel = params[f'{q_network.ENCODER}/spatial_embedding']['kernel']
    lines.append(f'{"  spatial embedding kernel [H,W,C,F]":<44} {_shape(kernel):<26}')
  counts = param_counts(params)
  flops = flops_breakdown(net_cfg, games, num_atoms)
  lines.append('')
  lines.append('parameters: ' + ', '.join(f'{k} {v:,} ({v / 1e6:.2f}M)' for k, v in counts.items()))
  lines.append('forward FLOPs per example (XLA cost analysis): ' + ', '.join(
      f'{k} {_flops_str(v)}' for k, v in flops.items()))
  return '\n'.join(lines)

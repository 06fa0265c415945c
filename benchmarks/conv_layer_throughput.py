"""Which conv shapes XLA:CPU runs efficiently: single 3x3 convs and patchify stems, fwd and fwd+bwd.

    .venv/bin/python benchmarks/conv_layer_throughput.py

Used to choose the CPU-sized network (BUILD_NOTES.md, networks section). Rates are FLOPs per CPU-second of
this process (all threads), best of short repetitions, next to the same measure for a 2048^3 f32
matmul: robust to other load on a shared machine. fwd+bwd counts 3x the forward FLOPs.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def cpu_seconds(f, *args, seconds: float = 2.0) -> float:
  jax.block_until_ready(f(*args))
  best, end = float('inf'), time.perf_counter() + seconds
  while time.perf_counter() < end:
    c = time.process_time()
    jax.block_until_ready(f(*args))
    best = min(best, time.process_time() - c)
  return best


def conv(x, w, stride, padding='SAME'):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def patchify(x, w, p):
  b, h, wd, c = x.shape
  x = x.reshape(b, h // p, p, wd // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, wd // p, p * p * c) @ w.reshape(p * p * c, -1)


def main():
  a = jnp.ones((2048, 2048), jnp.float32)
  peak = 2 * 2048 ** 3 / cpu_seconds(jax.jit(lambda x: x @ x), a) / 1e9
  print(f'f32 matmul 2048^3: {peak:.0f} GFLOP per CPU-second')
  rng = np.random.default_rng(0)
  print('3x3 SAME convs, batch 64:')
  for h, cin, cout, stride in [(21, 32, 32, 1), (21, 32, 64, 2), (11, 64, 64, 1), (11, 64, 128, 2),
                               (12, 64, 64, 1), (7, 96, 96, 1), (7, 128, 128, 1),
                               (6, 128, 128, 1)]:
    x = jnp.asarray(rng.standard_normal((64, h, h, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.01, jnp.float32)
    ho = -(-h // stride)
    flops = 2 * 64 * ho * ho * 9 * cin * cout
    fwd = jax.jit(lambda x, w, s=stride: conv(x, w, s))
    grad = jax.jit(jax.grad(lambda x, w, s=stride: jnp.sum(conv(x, w, s) ** 2), argnums=(0, 1)))
    r_f = flops / cpu_seconds(fwd, x, w) / 1e9
    r_g = 3 * flops / cpu_seconds(grad, x, w) / 1e9
    print(f'  {h:>2}x{h:<2} {cin:>3}->{cout:<3} stride {stride}: fwd {r_f:6.1f} ({100 * r_f / peak:3.0f}%)'
          f'  fwd+bwd {r_g:6.1f} ({100 * r_g / peak:3.0f}%) GFLOP/CPU-s')
  print('stems on uint8->f32 [64,84,84,4], weight gradient only (input needs none):')
  x = jnp.asarray(rng.random((64, 84, 84, 4)), jnp.float32)
  for p, cout in [(4, 32), (7, 64), (12, 96)]:
    w = jnp.asarray(rng.random((p, p, 4, cout)), jnp.float32)
    for name, f in [('strided conv', lambda x, w, p=p: conv(x, w, p, 'VALID')),
                    ('patchify matmul', lambda x, w, p=p: patchify(x, w, p))]:
      t_f = cpu_seconds(jax.jit(f), x, w)
      t_g = cpu_seconds(jax.jit(jax.grad(lambda w, x, f=f: jnp.sum(f(x, w) ** 2))), w, x)
      print(f'  {p:>2}x{p:<2}/{p:<2} -> {cout:<3} {name:<16}: fwd {t_f * 1e3:6.2f} CPU-ms, '
            f'fwd+grad_w {t_g * 1e3:6.2f} CPU-ms')


if __name__ == '__main__':
  main()

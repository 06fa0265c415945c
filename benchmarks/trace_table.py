"""Where a traced JAX program's device time goes, from the Perfetto trace that
`jax.profiler.trace(..., create_perfetto_trace=True)` writes (`benchmarks/gpu_suite.py --profile`).

Standard library only, and kept out of gpu_suite.py: importing that module blocks TensorFlow,
Reverb and Ray in the importing process (as the GPU machine lacks them), which a test must not do.
"""
from __future__ import annotations

import collections
import gzip
import json
import re

# Kernel names of convolutions and matrix products (cuDNN, cuBLAS, CUTLASS, XLA's Triton gemms).
MATMUL_KERNEL = re.compile(r'conv|gemm|xmma|cutlass|wgmma|cudnn|dot|sm\d\d_', re.IGNORECASE)


def device_time_table(trace_file: str, steps: int, top: int = 12) -> dict:
  """Where the device time of `steps` traced update steps goes, from a Perfetto trace of
  `jax.profiler.trace`: kernels on the device's streams (processes named '/device:...'), grouped
  by name without XLA's numeric suffixes. Returns per-step device-busy ms, the share of
  convolution/matmul kernels, and the top kernels by time; empty (kernels 0) on a backend whose
  trace has no device streams (the CPU)."""
  with gzip.open(trace_file, 'rt', encoding='utf-8') as f:
    events = json.load(f)['traceEvents']
  device_pids = {e['pid'] for e in events if e.get('ph') == 'M' and e.get('name') ==
                 'process_name' and str(e['args'].get('name', '')).startswith('/device:')}
  kernels = [e for e in events if e.get('ph') == 'X' and e.get('pid') in device_pids]
  by_name = collections.Counter()
  for e in kernels:
    by_name[re.sub(r'([._]\d+)+$', '', e['name'])] += e['dur']
  total_us = sum(by_name.values())
  matmul_us = sum(us for name, us in by_name.items() if MATMUL_KERNEL.search(name))
  return dict(kernels=len(kernels), busy_ms_per_step=total_us / 1e3 / steps,
              matmul_share=matmul_us / total_us if total_us else float('nan'),
              top=[(name, us / 1e3 / steps) for name, us in by_name.most_common(top)])

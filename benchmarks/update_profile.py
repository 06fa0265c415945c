"""Where the learner's update spends its time: the top XLA ops of one compiled step.

    flock /tmp/scaled_ql_heavy.lock .venv/bin/python benchmarks/update_profile.py \
        [--config cpu_small] [--steps 20] [--top 25] [--set KEY=VALUE ...]

Compiles `learner.update_from_windows` for the config on random `FrameWindows` (what the Reverb
path delivers; `learner_step.compiled_update`), traces `--steps` steps with the JAX profiler,
and prints the ops with the most traced time per step: milliseconds, the op's name in the
compiled HLO, its output shape and the JAX operation it came from (HLO metadata). Use it to find
what to cut before changing the network or the update.

It traces the update compiled for XLA's thunk runtime even where the config asks for the
classic one (cpu_small's `train.xla_cpu_use_thunk_runtime=False`): the classic runtime emits no
per-op trace events. The op list is the same computation's; the classic runtime runs the big
elementwise loops on several threads, so its step is shorter (`learner_step.py`).

Read it as a guide, not a budget: on the CPU only the ops XLA traces appear (the big matmuls and
convolutions run partly inside Eigen's thread pool, whose work is not all traced), so the listed
times add up to less than a step. `learner_step.py` gives the step's rate and FLOP/s.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# A sibling module (benchmarks/ is not a package).
from learner_step import compiled_update  # noqa: E402

from scaled_ql.configs import get_config, overrides  # noqa: E402

_WRAPPERS = ('call', 'Thunk', '$', 'Pjit', 'Tfrt', 'Parse')  # runtime events, not ops


def hlo_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (output shape, JAX op_name) from a compiled module's text."""
  meta = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?op_name="([^"]*)"', line)
    if m:
      meta[m.group(1)] = (m.group(2), m.group(3))
  return meta


def traced_op_times(trace_dir: str) -> collections.Counter:
  """Op name -> total traced microseconds, from the trace the JAX profiler wrote."""
  files = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not files:
    raise RuntimeError(f'the JAX profiler wrote no trace under {trace_dir}')
  totals = collections.Counter()
  for event in json.load(gzip.open(files[0]))['traceEvents']:
    if event.get('ph') == 'X' and not event['name'].startswith(_WRAPPERS):
      totals[event['name']] += event['dur']
  return totals


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='cpu_small')
  parser.add_argument('--steps', type=int, default=20, help='steps traced')
  parser.add_argument('--top', type=int, default=25, help='ops printed')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='a config override (e.g. train.packed_state=true)')
  args = parser.parse_args()
  cfg = overrides.apply(get_config(args.config), args.set)
  if not cfg.train.xla_cpu_use_thunk_runtime:
    print(f'{cfg.name} asks for the classic CPU runtime, which emits no per-op trace events: '
          'profiling the thunk runtime\'s executable')
    cfg = cfg.replace(train=dict(xla_cpu_use_thunk_runtime=True))
  compiled, state, data = compiled_update(cfg)
  meta = hlo_metadata(compiled.as_text())

  def run(state, steps: int):  # each step waits for its metrics, as the Learner does
    for _ in range(steps):
      state, metrics = compiled(state, data)
      jax.block_until_ready(metrics)
    return state

  state = run(state, 3)  # warm-up
  start = time.perf_counter()
  state = run(state, args.steps)
  step_ms = (time.perf_counter() - start) / args.steps * 1e3
  with tempfile.TemporaryDirectory(prefix='update_profile_') as trace_dir:
    jax.profiler.start_trace(trace_dir)
    run(state, args.steps)
    jax.profiler.stop_trace()
    totals = traced_op_times(trace_dir)
  print(f'{cfg.name}: {step_ms:.1f} ms per step untraced (batch {cfg.agent.batch_size}); traced '
        f'ops {sum(totals.values()) / args.steps / 1e3:.1f} ms per step; load average '
        f'{os.getloadavg()[0]:.2f}')
  print('| ms/step | HLO op | output | from |\n|---|---|---|---|')
  for name, micros in totals.most_common(args.top):
    shape, op = meta.get(name) or meta.get(name.removesuffix('.clone'), ('', ''))
    op = re.sub(r'jit\((packed_update|update_from_windows|update|main)\)/', '', op)
    print(f'| {micros / args.steps / 1e3:.2f} | {name.removesuffix(".clone")} | {shape} | {op} |')


if __name__ == '__main__':
  main()

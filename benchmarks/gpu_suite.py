"""The GPU benchmark suite (issue 13), runnable where only JAX + Haiku exist.

    bash benchmarks/gpu_suite.sh [--tiny] [--out DIR] [--pipeline-json FILE]

The GPU machine we can be lent (one H200) has Python 3.12, JAX 0.11 (CUDA), chex, optax, flax and
orbax, and no TensorFlow, Reverb, Ray, Haiku or ale-py. This script therefore blocks those modules
before importing anything of ours (an import of them is an error, on CPU too) and measures only
what needs JAX + Haiku:

1. matmul peak: best bf16 (fp32 with --fp32) [n,n]@[n,n] FLOP/s, measured here.
2. the real learner update (`learner.update_from_windows`: frame windows stacked on the device,
   forward of online + target network, backward, Adam) for ResNet-101 in bf16 at batch 512
   (Appendix B.3): steps/s, FLOPs per step from XLA's cost analysis of the update compiled for
   the CPU (`learner_step.cpu_flops`), MFU = achieved / (1). Timed twice: waiting for each step
   (as `Learner.step()` does, for its metrics), and dispatched ahead, one wait per 10 steps (the
   host launches step k+1 while the device runs step k: what an asynchronous learner would get).
3. the learner's consumption: `Learner.step()` on host `FrameWindows` batches (host checks,
   host->device copy, metrics fetch): transitions/s, with `train.device_prefetch` (the default:
   the next batch's checks and copy overlap the step) and without it, in interleaved blocks.
   The Reverb pipeline's feed rate is measured on CPU (benchmarks/data_pipeline.py --out FILE)
   and set against it with --pipeline-json FILE.
4. batched policy inference for evaluators (`actors.make_policy`, the ResNet-101 policy):
   environment steps/s at several batch sizes (the emulator is not here: inference only).
5. the host's cost of the train state's leaves: a jitted call that takes the state donated and
   returns it with only `step` changed (every buffer passes through uncopied), as it is and
   packed (`learner.pack_state`: a few flat buffers of the same bytes;
   docs/history/performance_log.md, "Where the gaps are").

`packed` (with `update`): the update of (2) on the packed train state (`learner.packed_update`,
what a Learner with `train.packed_state` runs) against the tree state's, synchronous steps in 3
interleaved blocks each (`--seconds` in all): steps/s, MFU, and packed / tree.

`--profile`: after (2), traces a few update steps with the JAX profiler, writes the Perfetto trace
(`update_trace.json.gz`, open it at ui.perfetto.dev) beside gpu_suite.json and prints where the
device time goes: its top kernels, and the share of convolutions and matmuls. With `packed`, the
packed update too (`update_trace_packed.json.gz`).

`--tiny`: cpu_tiny, small batches and sizes: the whole suite end to end in seconds on CPU (CI).
Every figure is printed with the 1-minute load average beside it; `--out DIR` writes a JSON too.
"""
from __future__ import annotations

import argparse
import glob
import importlib.abc
import json
import os
import shutil
import sys
import tempfile
import time

BLOCKED = ('tensorflow', 'tensorflow_datasets', 'reverb', 'ray', 'ale_py', 'cv2', 'tensorboardX')


class BlockModules(importlib.abc.MetaPathFinder):
  """Makes `import tensorflow` (etc.) fail, as it does on the GPU machine."""

  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(f'{name} is not available on the GPU machine (blocked by gpu_suite.py)')
    return None


sys.meta_path.insert(0, BlockModules())

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learner_step import bench_config, cpu_flops, matmul_peak  # noqa: E402
from trace_table import device_time_table  # noqa: E402

from scaled_ql import loggers  # noqa: E402
from scaled_ql.agents import actors  # noqa: E402
from scaled_ql.agents import learner as learner_lib  # noqa: E402
from scaled_ql.agents import runner as runner_lib  # noqa: E402
from scaled_ql.types import random_frame_windows  # noqa: E402

SIZES = dict(
    full=dict(config='atari40_suboptimal_resnet101', batch=512, seconds=20.0,
              peak_sizes=(4096, 8192), peak_seconds=6.0, policy_batches=(16, 64, 256, 1024)),
    tiny=dict(config='cpu_tiny', batch=8, seconds=0.5, peak_sizes=(256,), peak_seconds=0.5,
              policy_batches=(2, 4)),
    # The full suite's code path (ResNet-101, bf16, the mesh) at toy sizes: for a new JAX on CPU
    # before a GPU session (benchmarks/gpu_rehearsal.sh); its figures mean nothing.
    rehearsal=dict(config='atari40_suboptimal_resnet101', batch=2, seconds=0.5, peak_sizes=(256,),
                   peak_seconds=0.5, policy_batches=(2,)),
)


def imported_modules() -> dict[str, list[str]]:
  """What this process imported, for the record and for tests/test_gpu_suite.py: `third_party`,
  the top-level modules that are neither the standard library, built in, nor this repo's (what
  the GPU machine must have or be given: benchmarks/gpu_wheels.txt); `ours`, the files of this
  repo's modules."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ours_dirs = tuple(os.path.join(repo, d) + os.sep for d in ('scaled_ql', 'benchmarks'))
  third_party, ours = set(), set()
  for name, module in list(sys.modules.items()):
    path = getattr(module, '__file__', None) or ''
    if path.startswith(ours_dirs):
      ours.add(os.path.relpath(path, repo))
      continue
    top = name.split('.')[0]
    top_module = sys.modules.get(top)
    if top in sys.stdlib_module_names or top.startswith('_') or top_module is None:
      continue
    if getattr(top_module, '__file__', None) or getattr(top_module, '__path__', None):
      third_party.add(top)  # (modules with neither are built in, e.g. cython_runtime)
  return dict(third_party=sorted(third_party), ours=sorted(ours))


def load() -> float:
  return os.getloadavg()[0]


def timed(fn, seconds: float, min_calls: int = 3) -> tuple[int, float]:
  calls, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds or calls < min_calls:
    fn()
    calls += 1
  return calls, time.perf_counter() - t0


def interleaved_rates(arms: dict, seconds: float, rounds: int = 3) -> dict:
  """Calls per second of each arm's function, timed in `rounds` rounds of one block per arm (the
  same minutes of the device for every arm): `seconds` in all."""
  totals = {arm: [0, 0.0] for arm in arms}
  for _ in range(rounds):
    for arm, fn in arms.items():
      calls, wall = timed(fn, seconds / (rounds * len(arms)))
      totals[arm][0] += calls
      totals[arm][1] += wall
  return {arm: calls / wall for arm, (calls, wall) in totals.items()}


def state_dispatch_ms(state, calls: int = 100) -> float:
  """Host ms per jitted call that takes `state` (a TrainState) donated and returns it with only
  `step` changed: the per-call cost of its number of buffers, with no device work to speak of.
  Consumes `state`."""
  touch = jax.jit(lambda s: (s._replace(step=s.step + 1), s.step), donate_argnums=(0,))
  for _ in range(3):
    state, step = touch(state)
  jax.block_until_ready(step)
  t = time.perf_counter()
  for _ in range(calls):
    state, step = touch(state)
    jax.block_until_ready(step)
  return 1e3 * (time.perf_counter() - t) / calls


def profile_update(steps, label: str, filename: str, row, out_dir: str | None,
                   traced_steps: int = 3) -> None:
  """Traces `traced_steps` calls of `steps` (one update each) with the JAX profiler; rows of
  where the device time goes, its top kernels printed, the Perfetto trace copied to
  `out_dir/filename`."""
  trace_dir = tempfile.mkdtemp(prefix='gpu_suite_trace_')
  t = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(traced_steps):
      steps()
  traced_ms = 1e3 * (time.perf_counter() - t) / traced_steps
  trace_file = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                         recursive=True)[0]
  table = device_time_table(trace_file, traced_steps)
  row(f'{label}: wall per step (tracing on)', traced_ms, 'ms')
  row(f'{label}: device kernels busy per step', table['busy_ms_per_step'], 'ms',
      f'{table["kernels"]} kernels in {traced_steps} steps')
  row(f'{label}: convolution + matmul kernels', 100 * table['matmul_share'], '% of busy')
  for name, ms in table['top']:
    print(f'  {ms:9.3f} ms/step  {name[:110]}', flush=True)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(trace_file, os.path.join(out_dir, filename))
  shutil.rmtree(trace_dir, ignore_errors=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--tiny', action='store_true', help='cpu_tiny, seconds: the CI run')
  p.add_argument('--rehearsal', action='store_true',
                 help="the full suite's ResNet-101 path at toy sizes (a new JAX, on CPU)")
  p.add_argument('--config', default=None, help='override the config (default ResNet-101)')
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--fp32', action='store_true', help='fp32 compute instead of bf16')
  p.add_argument('--seconds', type=float, default=None, help='timed seconds per figure')
  p.add_argument('--pipeline-json', default=None,
                 help='benchmarks/data_pipeline.py --out file: its feed rate is set against the '
                 "learner's consumption")
  p.add_argument('--out', default=None, help='directory for gpu_suite.json')
  p.add_argument('--parts', default='update,packed,learner,policy,dispatch',
                 help='comma-separated parts to run after the peak: update (2), packed (with '
                 'update), learner (3), policy (4), dispatch (5)')
  p.add_argument('--profile', action='store_true',
                 help='trace 3 update steps: update_trace.json.gz in --out, top kernels printed')
  args = p.parse_args(argv)
  parts = set(args.parts.split(','))
  if not parts or parts - {'update', 'packed', 'learner', 'policy', 'dispatch'}:
    p.error(f'--parts {args.parts!r}: name parts among update, packed, learner, policy, dispatch')
  if 'packed' in parts and 'update' not in parts:
    p.error('--parts: packed is timed against update: name both')
  if args.tiny and args.rehearsal:
    p.error('--tiny and --rehearsal exclude each other')
  size = SIZES['tiny' if args.tiny else 'rehearsal' if args.rehearsal else 'full']
  name = args.config or size['config']
  batch = args.batch or size['batch']
  seconds = args.seconds or size['seconds']
  dtype = jnp.float32 if args.fp32 else jnp.bfloat16
  cfg = bench_config(name, batch, bf16=not args.fp32)
  cfg = cfg.replace(train=dict(log_every_steps=10**9, checkpoint_every_steps=10**9))
  b = cfg.agent.batch_size
  devices = jax.local_devices()
  rows = []

  def row(figure, value, unit, note=''):
    rows.append(dict(figure=figure, value=float(value), unit=unit, load_1min=load(), note=note))
    print(f'{figure:<52} {value:14.2f} {unit:<14} load {load():5.2f}  {note}', flush=True)

  if devices[0].platform != 'cpu':
    # Serves part 3's second Learner (a config that differs in a field the update does not read)
    # without a second minute-long compile. Not on the CPU: see Learner.restore's note.
    jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='gpu_suite_cache_'))
  blocked = [m for m in sys.modules if m.split('.')[0] in BLOCKED]
  assert not blocked, blocked
  print(f'jax {jax.__version__} on {len(devices)} x {devices[0].device_kind} '
        f'({devices[0].platform}); python {sys.version.split()[0]}; config {cfg.name} batch {b} '
        f'{jnp.dtype(dtype).name}; cpus {os.cpu_count()}; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; '
        f'{os.popen("uptime").read().strip()}', flush=True)

  # 1. matmul peak.
  peak = max(matmul_peak(dtype, n, size['peak_seconds'] / len(size['peak_sizes']))
             for n in size['peak_sizes']) * len(devices)
  row(f'matmul peak {jnp.dtype(dtype).name}, n in {list(size["peak_sizes"])}', peak / 1e12,
      'TFLOP/s')

  # 2. The real update on device-resident frame windows.
  if 'update' in parts:
    mesh = Mesh(np.asarray(devices), ('batch',))
    state = jax.device_put(learner_lib.init_state(cfg, jax.random.PRNGKey(0)),
                           NamedSharding(mesh, PartitionSpec()))
    windows = jax.device_put(random_frame_windows(cfg, b),
                             NamedSharding(mesh, PartitionSpec('batch')))
    box = [state]

    def update_steps(n=1):  # n > 1: the host dispatches step k+1 while the device runs step k
      for _ in range(n):
        box[0], metrics = learner_lib.update_from_windows(box[0], windows, cfg=cfg)
      jax.block_until_ready(metrics)

    t = time.perf_counter()
    update_steps()
    row('update compile + first step', time.perf_counter() - t, 's')
    # After the first step: on a CPU the count's compile is the same executable, and counted first
    # it made the row above a cache hit (0.16 s for cpu_small).
    flops = cpu_flops(learner_lib.update_from_windows, box[0], windows, cfg=cfg)
    update_steps()
    calls, wall = timed(update_steps, seconds)
    steps_per_s = calls / wall
    row('update steps/s (device-resident batch)', steps_per_s, 'steps/s',
        f'{steps_per_s * b:.0f} transitions/s')
    row('update FLOPs per step (XLA cost analysis, CPU-compiled)', flops / 1e9, 'GFLOP')
    row('update MFU vs measured matmul peak', 100 * flops * steps_per_s / peak, '%')
    calls, wall = timed(lambda: update_steps(10), seconds)
    ahead = 10 * calls / wall
    row('update dispatched ahead (1 sync per 10): steps/s', ahead, 'steps/s',
        f'{ahead / steps_per_s:.2f}x the synchronous steps')
    row('update dispatched ahead (1 sync per 10): MFU', 100 * flops * ahead / peak, '%')
    if 'packed' in parts:
      # The same update on the packed state (what a Learner with train.packed_state runs), jitted
      # like the tree state's above (XLA's default options), timed in blocks interleaved with it
      # (the same minutes of the device).
      packed_cfg = cfg.replace(train=dict(packed_state=True))
      pbox = [learner_lib.pack_state_jit(
          jax.device_put(learner_lib.init_state(cfg, jax.random.PRNGKey(0)),
                         NamedSharding(mesh, PartitionSpec())), packed_cfg)]
      t = time.perf_counter()

      def packed_steps():
        pbox[0], metrics = learner_lib.packed_update(pbox[0], windows, cfg=packed_cfg)
        jax.block_until_ready(metrics)

      packed_steps()
      row('packed update compile + first step', time.perf_counter() - t, 's',
          f'{len(jax.tree_util.tree_leaves(pbox[0]))} state buffers, against '
          f'{len(jax.tree_util.tree_leaves(box[0]))} leaves')
      rate = interleaved_rates({'tree': update_steps, 'packed': packed_steps}, seconds)
      for arm in ('tree', 'packed'):
        row(f'packed A/B: update steps/s, {arm} state', rate[arm], 'steps/s',
            f'MFU {100 * flops * rate[arm] / peak:.1f}%; 3 interleaved blocks')
      row('packed A/B: update packed / tree state', rate['packed'] / rate['tree'], 'ratio')
    if args.profile:
      profile_update(update_steps, 'profiled update', 'update_trace.json.gz', row, args.out)
      if 'packed' in parts:
        profile_update(packed_steps, 'profiled packed update', 'update_trace_packed.json.gz', row,
                       args.out)
    del state, windows, box  # frees their device buffers before the next part
    if 'packed' in parts:
      del pbox

  # 3. The learner's consumption: Learner.step() on host batches, with and without
  # train.device_prefetch, in interleaved blocks (the same device, the same minutes).
  params = None  # the policy's: the Learner's after part 3, else freshly initialised
  if 'learner' in parts:
    host_batches = [random_frame_windows(cfg, b, seed) for seed in range(4)]
    learners = {}
    for prefetch in (True, False):
      # (With the other setting the config differs, so the update is traced again; on a GPU the
      # persistent compilation cache set up above then serves the executable.)
      cfg_p = cfg.replace(train=dict(device_prefetch=prefetch))
      learners[prefetch] = runner_lib.LearnerRunner(
          learner_lib.Learner(cfg_p, (host_batches[i % 4] for i in range(10**9))),
          logger=loggers.MultiLogger([]), handle_signals=False)
      t = time.perf_counter()
      learners[prefetch].step()
      row(f'Learner.step() first step, device_prefetch={prefetch}', time.perf_counter() - t, 's')
    rate = interleaved_rates({k: learner.step for k, learner in learners.items()}, seconds)
    for prefetch in (False, True):
      row(f'Learner.step() on host FrameWindows, prefetch={prefetch}', rate[prefetch],
          'steps/s', f'= consumption {rate[prefetch] * b:.0f} transitions/s')
    row('Learner.step(): prefetch / no prefetch', rate[True] / rate[False], 'ratio',
        '3 interleaved blocks each')
    if 'update' in parts:
      row('Learner.step() with prefetch / update alone', rate[True] / steps_per_s, 'ratio')
    consumption = rate[True] * b
    if args.pipeline_json:
      with open(args.pipeline_json, encoding='utf-8') as f:
        pipe = {r['figure']: r for r in json.load(f)['rows']}
      feed = pipe['sampling alone (learner idle): delivered']
      row('pipeline feed (CPU, data_pipeline.py) / consumption', feed['value'] / consumption,
          'ratio', f'feed {feed["value"]:.0f} transitions/s at load {feed["load_1min"]:.2f}')
    params = learners[True].get_variables(('params',))[0]
    for learner in learners.values():
      learner.close()
    del learners

  # 4. Batched policy inference (evaluators).
  if 'policy' in parts:
    policy = actors.make_policy(cfg, epsilon=0.001)
    if params is None:
      params = learner_lib.init_state(cfg, jax.random.PRNGKey(0)).params
    params = jax.device_put(params, devices[0])
    rng = np.random.default_rng(1)
    for n in size['policy_batches']:
      obs = rng.integers(0, 256, (n, 84, 84, 4), dtype=np.uint8)
      gid = (np.arange(n) % len(cfg.games)).astype(np.int32)
      key = jax.random.PRNGKey(0)
      act = lambda: np.asarray(policy(params, key, obs, gid))  # host in, host out: as an evaluator
      act()
      calls, wall = timed(act, seconds / 2)
      row(f'policy inference, {n} envs per call', calls * n / wall, 'env steps/s',
          f'{1e3 * wall / calls:.2f} ms per call')

  # 5. The host's cost of the train state's leaves.
  if 'dispatch' in parts:
    state = learner_lib.initial_state(cfg, jax.random.PRNGKey(0))
    # The same bytes packed, in buffers of their own (each call donates, so none may be shared).
    flat = learner_lib.pack_state_jit(state, cfg)
    leaves, flat_leaves = (len(jax.tree_util.tree_leaves(s)) for s in (state, flat))
    as_is, flat_ms = state_dispatch_ms(state), state_dispatch_ms(flat)
    row(f'host dispatch, train state as is ({leaves} leaves)', as_is, 'ms/call')
    row(f'host dispatch, the same bytes packed ({flat_leaves} buffers)', flat_ms, 'ms/call')

  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'gpu_suite.json'), 'w', encoding='utf-8') as f:
      json.dump(dict(config=cfg.name, batch=b, dtype=jnp.dtype(dtype).name,
                     xla_flags=os.environ.get('XLA_FLAGS', ''),
                     jax=jax.__version__, device=devices[0].device_kind, rows=rows,
                     modules=imported_modules()), f, indent=1)
  print(f'end: {os.popen("uptime").read().strip()}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())

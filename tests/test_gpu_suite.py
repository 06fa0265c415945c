"""The GPU suite's constraints on CPU: the learner stack imports and runs without TensorFlow,
Reverb or Ray (the GPU machine has none of them), benchmarks/gpu_suite.sh runs end to end, and
what our code imports there is on the machine or in benchmarks/gpu_wheels.txt."""
import ast
import gzip
import json
import os
import re
import subprocess
import sys

import pytest

import benchmark_modules  # tests/benchmark_modules.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Top-level modules of the GPU machine's image that our code imports directly (its package list:
# /work/.library/device/KINDS.md, read 2026-11-17). Everything else must come from the wheels.
DEVICE_MODULES = frozenset({'jax', 'jaxlib', 'numpy', 'chex', 'optax', 'flax', 'orbax', 'absl',
                            'scipy', 'six', 'cloudpickle', 'tabulate', 'typing_extensions'})

BLOCKED_IMPORT_CHECK = r'''
import importlib.abc, sys
BLOCKED = ('tensorflow', 'tensorflow_datasets', 'reverb', 'ray', 'ale_py', 'cv2', 'tensorboardX')
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(f'{name} blocked')
sys.meta_path.insert(0, Block())
for name in BLOCKED:
  try:
    __import__(name)
  except ImportError:
    pass
  else:
    raise AssertionError(f'{name} was importable: the block does not work')
import jax, numpy as np
from scaled_ql import configs
from scaled_ql.agents import actors, builder, learner, losses
from scaled_ql.networks import q_network
from scaled_ql.types import FrameWindows
cfg = configs.get_config('cpu_tiny')
b = cfg.agent.batch_size
windows = FrameWindows(frames=np.zeros((b, cfg.agent.n_step + 4, 84, 84), np.uint8),
                       next_start=np.full(b, cfg.agent.n_step, np.int32),
                       action=np.zeros(b, np.int32), reward=np.ones(b, np.float32),
                       discount=np.full(b, 0.9, np.float32),
                       game_id=(np.arange(b) % len(cfg.games)).astype(np.int32),
                       start=np.zeros(b, np.int32))
state = learner.init_state(cfg, jax.random.PRNGKey(0))
state, metrics = learner.update_from_windows(state, windows, cfg=cfg)
assert np.isfinite(float(metrics['loss']))
policy = actors.make_policy(cfg, 0.0)
action = policy(state.params, jax.random.PRNGKey(1), np.zeros((2, 84, 84, 4), np.uint8),
                np.zeros(2, np.int32))
assert action.shape == (2,)
loaded = sorted({m.split('.')[0] for m in sys.modules} & set(BLOCKED))
assert not loaded, loaded
print('OK')
'''


def test_learner_networks_losses_run_without_tensorflow_reverb_ray():
  out = subprocess.run([sys.executable, '-c', BLOCKED_IMPORT_CHECK], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith('OK'), out.stderr[-3000:]


@pytest.fixture(scope='module')
def tiny_suite(tmp_path_factory):
  """benchmarks/gpu_suite.sh --tiny, run once: its gpu_suite.json."""
  out_dir = tmp_path_factory.mktemp('gpu_suite')
  out = subprocess.run(['bash', 'benchmarks/gpu_suite.sh', '--tiny', '--profile', '--out',
                        str(out_dir)],
                       cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHON=sys.executable))
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  with open(out_dir / 'gpu_suite.json', encoding='utf-8') as f:
    result = json.load(f)
  result['trace_exists'] = (out_dir / 'update_trace.json.gz').is_file()
  return result


def test_gpu_suite_tiny_end_to_end(tiny_suite):
  result = tiny_suite
  figures = {r['figure']: r['value'] for r in result['rows']}
  assert result['config'] == 'cpu_tiny' and result['dtype'] == 'bfloat16'
  for prefix in ('matmul peak', 'update steps/s', 'update MFU',
                 'update dispatched ahead (1 sync per 10): steps/s',
                 'update dispatched ahead (1 sync per 10): MFU',
                 'Learner.step() on host FrameWindows, prefetch=True',
                 'Learner.step() on host FrameWindows, prefetch=False',
                 'Learner.step(): prefetch / no prefetch', 'Learner.step() with prefetch / update',
                 'policy inference, 4 envs', 'host dispatch, train state as is',
                 'host dispatch, the same bytes packed', 'packed update compile',
                 'packed A/B: update steps/s, tree', 'packed A/B: update steps/s, packed',
                 'packed A/B: update packed / tree'):
    values = [v for k, v in figures.items() if k.startswith(prefix)]
    assert len(values) == 1 and values[0] > 0, (prefix, figures)
  # --profile: the Perfetto trace of the update is written beside the JSON.
  assert result['trace_exists']
  assert figures['profiled update: wall per step (tracing on)'] > 0


def test_device_time_table_counts_device_kernels_only(tmp_path):
  # trace_table, not gpu_suite: importing gpu_suite here would block TensorFlow in this process.
  device_time_table = benchmark_modules.load('trace_table').device_time_table
  meta = lambda pid, name: dict(ph='M', pid=pid, name='process_name', args=dict(name=name))
  kernel = lambda pid, name, dur: dict(ph='X', pid=pid, tid=1, ts=0.0, dur=dur, name=name)
  events = [meta(1, '/host:CPU'), meta(7, '/device:GPU:0'),
            kernel(1, 'PjitFunction(update)', 5000.0),  # host: not device time
            kernel(7, 'sm90_xmma_fprop_implicit_gemm_bf16', 600.0),
            kernel(7, 'loop_add_fusion.12', 300.0), kernel(7, 'loop_add_fusion.3', 100.0),
            kernel(7, 'input_reduce_fusion_2', 200.0)]
  trace = tmp_path / 'perfetto_trace.json.gz'
  with gzip.open(trace, 'wt', encoding='utf-8') as f:
    json.dump(dict(traceEvents=events), f)
  table = device_time_table(str(trace), steps=2, top=2)
  assert table['kernels'] == 4
  assert table['busy_ms_per_step'] == pytest.approx(0.6)  # 1200 us over 2 steps
  assert table['matmul_share'] == pytest.approx(0.5)
  assert table['top'] == [('sm90_xmma_fprop_implicit_gemm_bf16', 0.3), ('loop_add_fusion', 0.2)]


def wheel_modules() -> set[str]:
  """The top-level modules benchmarks/gpu_wheels.txt provides (the comment after each pin)."""
  modules = set()
  with open(os.path.join(REPO, 'benchmarks', 'gpu_wheels.txt'), encoding='utf-8') as f:
    for line in f:
      if line.strip() and not line.startswith('#'):
        match = re.fullmatch(r'[\w.-]+==[\w.]+ +# (\w+)', line.strip())
        assert match, f'gpu_wheels.txt: {line.strip()!r} is not "name==version  # module"'
        modules.add(match.group(1))
  return modules


def direct_imports(path: str) -> set[str]:
  """Top-level names of the absolute imports in a Python file (function-level ones included)."""
  with open(os.path.join(REPO, path), encoding='utf-8') as f:
    tree = ast.parse(f.read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {alias.name.split('.')[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.add(node.module.split('.')[0])
  return names


def test_what_our_code_imports_on_the_gpu_machine_is_there_or_in_the_wheels(tiny_suite):
  # The suite's record of what it loaded: our files, and the third-party modules. A module that
  # our loaded code imports itself and that was loaded must be in the device's image or in
  # gpu_wheels.txt (dm_env was neither, and only a Python 3.12 rehearsal found it).
  modules = tiny_suite['modules']
  assert 'scaled_ql/agents/learner.py' in modules['ours'], modules['ours']
  assert {'jax', 'haiku', 'rlax'} <= set(modules['third_party']), modules['third_party']
  ours = set().union(*(direct_imports(p) for p in modules['ours']))
  needed = ours & set(modules['third_party'])
  assert 'dm_env' in needed and 'haiku' in needed, needed
  missing = needed - DEVICE_MODULES - wheel_modules()
  assert not missing, (f'imported by our code in the GPU suite, but neither on the GPU machine '
                       f'nor in benchmarks/gpu_wheels.txt: {sorted(missing)}')

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
  """The suite, which blocks TensorFlow, TFDS, Reverb, Ray, ale-py, cv2 and tensorboardX as the
  GPU machine lacks them (`gpu_suite.BLOCKED`), imports the learner stack and runs its update,
  `Learner.step` and the policy: none of those modules was loaded by the end."""
  result = tiny_suite
  # (read, not imported: importing gpu_suite.py would block those modules in this process too)
  with open(os.path.join(REPO, 'benchmarks', 'gpu_suite.py'), encoding='utf-8') as f:
    blocked, = [ast.literal_eval(node.value) for node in ast.parse(f.read()).body
                if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == 'BLOCKED']
  assert {'tensorflow', 'reverb', 'ray'} <= set(blocked)
  loaded = set(result['modules']['third_party']) & set(blocked)
  assert not loaded, loaded
  for ours in ('agents/learner.py', 'agents/losses.py', 'agents/actors.py', 'agents/builder.py',
               'networks/q_network.py'):
    assert f'scaled_ql/{ours}' in result['modules']['ours'], ours
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

"""The GPU suite's constraints on CPU: the learner stack imports and runs without TensorFlow,
Reverb or Ray (the GPU machine has none of them), and benchmarks/gpu_suite.sh runs end to end."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def test_gpu_suite_tiny_end_to_end(tmp_path):
  out = subprocess.run(['bash', 'benchmarks/gpu_suite.sh', '--tiny', '--out', str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHON=sys.executable))
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  with open(tmp_path / 'gpu_suite.json', encoding='utf-8') as f:
    result = json.load(f)
  figures = {r['figure']: r['value'] for r in result['rows']}
  assert result['config'] == 'cpu_tiny' and result['dtype'] == 'bfloat16'
  for prefix in ('matmul peak', 'update steps/s', 'update MFU', 'Learner.step()',
                 'policy inference, 4 envs'):
    values = [v for k, v in figures.items() if k.startswith(prefix)]
    assert len(values) == 1 and values[0] > 0, (prefix, figures)

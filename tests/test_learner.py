"""Tests of the learner and its runner, checkpoints, policies and loggers (cpu_tiny, random uint8
batches)."""
import ast
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import numpy as np
import pytest

from polling import wait_for  # tests/polling.py
from scaled_ql import games as games_lib
from scaled_ql import loggers
from scaled_ql.agents import actors, augmentation, builder, checkpointing
from scaled_ql.agents import learner as learner_lib
from scaled_ql.agents import runner as runner_lib
from scaled_ql.configs import get_config
from scaled_ql.datasets import mc_probe
from scaled_ql.networks import q_network
from scaled_ql.types import McProbe, Transition, random_frame_windows

CFG = get_config('cpu_tiny')  # games Breakout (4 actions), Pong (6 actions); batch 8


def random_batch(cfg, seed, reward=None):
  rng = np.random.default_rng(seed)
  b = cfg.agent.batch_size
  counts = np.asarray(games_lib.action_counts(cfg.games))
  game_id = rng.integers(0, len(cfg.games), b).astype(np.int32)
  return Transition(
      observation=rng.integers(0, 256, (b, 84, 84, 4), dtype=np.uint8),
      action=(rng.integers(0, 1000, b) % counts[game_id]).astype(np.int32),
      reward=(rng.normal(size=b) if reward is None else np.full(b, reward)).astype(np.float32),
      discount=np.where(rng.random(b) < 0.2, 0.0, 0.99 ** 3).astype(np.float32),
      next_observation=rng.integers(0, 256, (b, 84, 84, 4), dtype=np.uint8),
      game_id=game_id)


def batches(cfg, start=0):
  i = start
  while True:
    yield random_batch(cfg, i)
    i += 1


def tree_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def make(cfg=CFG, it=None, workdir=None, *, devices=None, initial_params=None, **kw):
  """A LearnerRunner around a one-device Learner; `kw` go to the runner."""
  kw.setdefault('logger', loggers.MultiLogger([]))
  learner = learner_lib.Learner(cfg, it if it is not None else batches(cfg),
                                devices=devices or jax.local_devices()[:1],
                                initial_params=initial_params)
  return runner_lib.LearnerRunner(learner, workdir, **kw)


@pytest.mark.parametrize('variant', ['', '_mse', '_bc', '_bcq'])
def test_loss_falls_on_a_fixed_batch(variant):
  # A larger step size than the paper's so that 30 steps show it; the C51 cross-entropy cannot go
  # below the entropy of its (near-uniform, random-target) target, hence the absolute margin.
  cfg = get_config('cpu_tiny' + variant).replace(
      agent=dict(target_update_period=1000, learning_rate=3e-3))
  batch = random_batch(cfg, 0)
  learner = make(cfg, iter(lambda: batch, None))
  metrics = [learner.step() for _ in range(31)]
  assert learner.steps == 31
  assert all(np.isfinite(v) for m in metrics for v in m.values())
  loss = [m['loss'] for m in metrics]
  assert loss[30] < loss[15] < loss[0] - 0.05, loss
  if variant == '_bcq':
    assert metrics[30]['behaviour_nll'] < metrics[0]['behaviour_nll']
    params, = learner.get_variables()
    assert set(params) == {'q', 'behaviour'}
    actions = actors.make_policy(cfg, 0.0)(params, jax.random.PRNGKey(0), batch.observation,
                                           batch.game_id)
    counts = np.asarray(games_lib.action_counts(cfg.games))[batch.game_id]
    assert ((np.asarray(actions) >= 0) & (np.asarray(actions) < counts)).all()
  learner.close()


@pytest.mark.parametrize('variant', ['', '_mse', '_bc', '_bcq'])
def test_update_has_no_scatter(variant):
  """The compiled update has no scatter-add: XLA:CPU runs one as a serial loop over the batch (the
  gradients of the per-game head gather and of the data-action index cost ~10% of the cpu_small
  step)."""
  cfg = get_config('cpu_tiny' + variant)
  state = learner_lib.initial_state(cfg, jax.random.PRNGKey(0), None)
  hlo = learner_lib.update.lower(state, random_batch(cfg, 0), cfg=cfg).compile().as_text()
  assert 'scatter' not in hlo


def test_target_network_copied_every_period():
  cfg = CFG  # target_update_period=10
  learner = make(cfg)
  init_target, = learner.get_variables(['target_params'])
  for _ in range(9):
    learner.step()
  target, params = learner.get_variables(['target_params', 'params'])
  assert tree_equal(target, init_target) and not tree_equal(target, params)
  learner.step()
  target, params = learner.get_variables(['target_params', 'params'])
  assert tree_equal(target, params)
  learner.close()


def test_runner_keeps_the_durations_of_its_steps():
  learner = make(CFG)
  assert learner.step_ms() == {}  # no step has ended
  for _ in range(3):
    learner.step()
  every, last_two = learner.step_ms(), learner.step_ms(last=2)
  assert every['n'] == 3 and last_two['n'] == 2 and learner.step_ms(last=10)['n'] == 3
  assert 0 < every['p50'] <= every['p90'] <= every['p99']
  assert last_two['p99'] <= every['p99']  # the first step (the compile) is left out
  learner.close()


def test_checkpoint_round_trip_is_exact_and_deterministic(tmp_path):
  workdir = str(tmp_path / 'run')
  a = make(workdir=workdir)
  for _ in range(3):
    a.step()
  a.save()
  a.step()
  after_a = a.get_variables(['params', 'target_params', 'opt_state', 'step'])
  a.close()
  assert json.load(open(os.path.join(workdir, 'config.json')))['name'] == CFG.name

  b = make(it=batches(CFG, start=3), workdir=workdir)
  assert b.restore() and b.steps == 3
  b.step()
  assert tree_equal(after_a, b.get_variables(['params', 'target_params', 'opt_state', 'step']))
  b.close()

  c = make()  # same seed, same data, never stopped
  for _ in range(4):
    c.step()
  assert tree_equal(after_a[0], c.get_variables()[0])
  c.close()

  cfg, params, step = checkpointing.load_params(os.path.join(workdir, 'checkpoints'))
  assert cfg == CFG and step == 3
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(after_a[0])


def test_policy_params_ema_is_the_moving_average_of_the_online_params(tmp_path):
  decay = 0.5
  cfg = CFG.replace(agent=dict(policy_params_ema=decay))
  workdir = str(tmp_path / 'run')
  learner = make(cfg, workdir=workdir)
  average, = learner.get_variables(['online_params'])  # the average starts at the init
  assert tree_equal(average, learner.get_variables(['params'])[0])
  for _ in range(3):
    learner.step()
    online, = learner.get_variables(['online_params'])
    average = jax.tree_util.tree_map(lambda a, p: decay * a + (1 - decay) * p, average, online)
    published, = learner.get_variables(['params'])
    assert not tree_equal(published, online)
    for x, y in zip(jax.tree_util.tree_leaves(published), jax.tree_util.tree_leaves(average)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  learner.save()
  learner.close()
  _, from_checkpoint, step = checkpointing.load_params(workdir)
  _, online_from_checkpoint, _ = checkpointing.load_params(workdir, online=True)
  assert step == 3
  assert tree_equal(from_checkpoint, published) and tree_equal(online_from_checkpoint, online)
  # What the eval command and the demo print beside the scores.
  assert builder.policy_params_label(cfg.agent) == "the params' moving average (decay 0.5)"
  assert builder.policy_params_label(cfg.agent, online=True) == 'the online params'
  assert builder.policy_params_label(CFG.agent) == 'the online params'
  # The default (0) publishes the online params and keeps the optimizer state's layout.
  plain = make(CFG)
  plain.step()
  assert tree_equal(*plain.get_variables(['params', 'online_params']))
  plain.close()
  # Started from given params (fine-tuning), the average starts at them.
  started = make(cfg, initial_params=online)
  assert tree_equal(started.get_variables(['params'])[0], online)
  started.close()
  with pytest.raises(ValueError, match=r'agent.policy_params_ema=1.0 must be in \[0, 1\)'):
    make(CFG.replace(agent=dict(policy_params_ema=1.0)))


def test_restore_refuses_a_different_network(tmp_path):
  workdir = str(tmp_path / 'run')
  a = make(workdir=workdir)
  a.step()
  a.save()
  a.close()
  other = CFG.replace(agent=dict(cql_alpha=0.0))
  b = make(other, workdir=workdir)
  with pytest.raises(ValueError, match="different 'agent' config"):
    b.restore()
  b.close()


def test_nan_loss_raises_naming_the_step_and_keeps_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  data = [random_batch(CFG, 0), random_batch(CFG, 1), random_batch(CFG, 2, reward=np.nan)]
  learner = make(it=iter(data), workdir=workdir)
  learner.step()
  learner.step()
  learner.save()
  with pytest.raises(runner_lib.NonFiniteLossError, match=r'td_loss=nan.*step 3.*step 2'):
    learner.step()
  with pytest.raises(runner_lib.NonFiniteLossError, match='stopped earlier'):
    learner.save()  # a bad state is never saved
  assert learner.restore() and learner.steps == 2  # ... but the learner can resume from a good one
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(learner.get_variables()))
  learner.close()
  _, params, step = checkpointing.load_params(workdir)
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_signal_saves_at_step_boundary_then_stops(tmp_path, sig):
  """SIGTERM (a scheduler) and SIGINT (Ctrl-C) alike: a checkpoint at the next step boundary,
  then StopTraining with exit code 0 (`learn` then exits 0; a SIGINT left to Python's default
  would raise KeyboardInterrupt mid-step instead)."""
  workdir = str(tmp_path / 'run')
  # Whatever was installed before (SIG_DFL, or Ray's handler once another test module ran
  # ray.init in this process) must be back after close().
  previous_handler = signal.getsignal(sig)
  learner = make(workdir=workdir)
  assert signal.getsignal(sig) is not previous_handler
  learner.step()
  os.kill(os.getpid(), sig)  # handled: only sets a flag
  with pytest.raises(runner_lib.StopTraining, match=f'{sig.name}.*step 2') as stop:
    learner.step()
  assert stop.value.code == 0
  learner.close()
  assert signal.getsignal(sig) is previous_handler
  assert checkpointing.load_params(workdir)[2] == 2


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match='agent.loss'):
    make(CFG.replace(agent=dict(loss='dqn')))
  learner = make()
  bad = random_batch(CFG, 0)._replace(action=np.full(8, 5, np.int32),
                                      game_id=np.zeros(8, np.int32))
  with pytest.raises(ValueError, match='not a valid action of Breakout'):
    learner_lib.check_batch(bad, CFG, 8)
  with pytest.raises(ValueError, match='batch.observation'):
    learner_lib.check_batch(bad._replace(observation=bad.observation.astype(np.float32)), CFG, 8)
  learner.close()
  with pytest.raises(ValueError, match='not divisible'):
    make(CFG.replace(agent=dict(games_per_batch=1, transitions_per_game=3)),
         devices=jax.local_devices()[:1] * 2)


@pytest.mark.parametrize('windows', [False, True], ids=['transitions', 'frame_windows'])
def test_device_prefetch_changes_nothing_but_when_the_next_batch_is_taken(windows):
  """`train.device_prefetch` takes batch n+1 while step n runs: the steps and metrics are those of
  the learner without it, the iterator is one batch ahead, and what taking a batch raises (a
  malformed batch, the end of the data) comes from the step that would have trained on it."""
  make_batch = ((lambda i: random_frame_windows(CFG, 8, i)) if windows
                else (lambda i: random_batch(CFG, i)))
  good = [make_batch(i) for i in range(3)]
  bad = make_batch(3)._replace(action=np.full(8, 5, np.int32), game_id=np.zeros(8, np.int32))
  runs = {}
  for prefetch in (False, True):
    taken = []
    def it():
      for i, batch in enumerate(good + [bad, make_batch(4)]):
        taken.append(i)
        yield batch
    learner = learner_lib.Learner(CFG.replace(train=dict(device_prefetch=prefetch)), it(),
                                  devices=jax.local_devices()[:1])
    metrics = []
    for step in range(3):
      metrics.append(learner.step())
      assert taken[-1] == step + prefetch  # the next batch is taken during the step, not after
    with pytest.raises(ValueError, match='not a valid action of Breakout'):
      learner.step()  # the fourth batch is malformed: its step raises, not the third
    assert learner.steps == 3
    metrics.append(learner.step())  # then the next batch trains, as without prefetch
    with pytest.raises(StopIteration):
      learner.step()
    runs[prefetch] = metrics, learner.get_variables(['params', 'opt_state', 'step'])
  assert runs[True][0] == runs[False][0]
  assert tree_equal(runs[True][1], runs[False][1])


def test_packed_state_steps_like_the_tree_state_and_checkpoints_the_same_trees(tmp_path):
  """`train.packed_state`: the learner steps a few flat buffers (`learner.pack_state`); the
  metrics, variables (the params' moving average, the target refreshes) and checkpoints are those
  of the tree state, and a checkpoint of one restores into the other."""
  cfg = CFG.replace(agent=dict(target_update_period=2, policy_params_ema=0.5))
  data = [random_frame_windows(cfg, 8, i) for i in range(5)]
  names = ['params', 'online_params', 'target_params', 'opt_state', 'step']
  runs = {}
  for packed in (False, True):
    c = cfg.replace(train=dict(packed_state=packed))
    runner = make(c, iter(data), workdir=str(tmp_path / f'packed_{packed}'))
    leaves = len(jax.tree_util.tree_leaves(runner._learner._state))
    assert leaves == (6 if packed else len(jax.tree_util.tree_leaves(runner._learner.save())))
    metrics = [runner.step() for _ in range(3)]
    runner.save()  # at step 3
    metrics += [runner.step() for _ in range(2)]
    runs[packed] = metrics, runner.get_variables(names)
    runner.close()
  # Up to float32 reassociation (XLA fuses the two layouts differently): an absolute margin for
  # metrics near 0 (a fresh clone's suite saw q_data -2.14994e-3 against -2.14982e-3).
  for a, b in zip(runs[True][0], runs[False][0]):
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(a)], rtol=1e-6,
                               atol=1e-6)
  chex.assert_trees_all_close(runs[True][1], runs[False][1], rtol=1e-6, atol=1e-7)
  # Each checkpoint (trees either way) resumes in a learner of the other setting.
  for packed in (False, True):
    c = cfg.replace(train=dict(packed_state=not packed))
    runner = make(c, iter(data[3:]), workdir=str(tmp_path / f'packed_{packed}'))
    assert runner.restore() and runner.steps == 3
    for _ in range(2):
      runner.step()
    chex.assert_trees_all_close(runner.get_variables(names), runs[packed][1], rtol=1e-6,
                                atol=1e-7)
    runner.close()


def test_classic_cpu_runtime_trains_like_the_thunk_runtime():
  """`train.xla_cpu_use_thunk_runtime=False` (cpu_small's) compiles the update for XLA's classic
  CPU runtime: the same steps as the thunk runtime's, up to float reassociation."""
  cfg = get_config('cpu_small').replace(agent=dict(games_per_batch=4, transitions_per_game=2))
  assert not cfg.train.xla_cpu_use_thunk_runtime
  devices = jax.local_devices()[:1]
  runs = {}
  for thunk in (True, False):
    c = cfg.replace(train=dict(xla_cpu_use_thunk_runtime=thunk))
    assert learner_lib.compiler_options(c, devices) == (
        {} if thunk else {'xla_cpu_use_thunk_runtime': False})
    learner = learner_lib.Learner(c, (random_frame_windows(c, 8, i) for i in range(3)),
                                  devices=devices)
    runs[thunk] = [learner.step() for _ in range(3)], learner.get_variables(['params'])
  for a, b in zip(runs[True][0], runs[False][0]):
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(a)],
                               rtol=1e-3, atol=1e-5)
  chex.assert_trees_all_close(runs[True][1], runs[False][1], rtol=1e-3, atol=1e-5)


def test_classic_cpu_runtime_is_refused_for_strided_convolutions():
  """The classic runtime aborts the process on a strided convolution's gradient (jaxlib 0.4.34;
  shown in a subprocess), so the config check refuses it for such a network (cpu_tiny's),
  naming the field, before a Learner exists; `compile_update`'s backstop finds the same
  convolutions in the compiled update, and none in cpu_small's."""
  crash = textwrap.dedent("""
      import jax
      from scaled_ql.agents import learner
      from scaled_ql.configs import get_config
      from scaled_ql.types import random_frame_windows
      cfg = get_config('cpu_tiny')
      state = learner.initial_state(cfg, jax.random.PRNGKey(0), None)
      windows = jax.device_put(random_frame_windows(cfg, 8, 0))
      update = learner.update_from_windows.lower(state, windows, cfg=cfg).compile(
          compiler_options={'xla_cpu_use_thunk_runtime': False})
      jax.block_until_ready(update(state, windows))
      print('no abort')
  """)
  out = subprocess.run([sys.executable, '-c', crash], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0 and 'no abort' not in out.stdout, out.stdout + out.stderr
  assert 'use_thread_pool' in out.stderr, out.stderr[-2000:]
  classic = CFG.replace(train=dict(xla_cpu_use_thunk_runtime=False))
  assert q_network.has_strided_convolutions(CFG.network)
  with pytest.raises(ValueError, match=r'train.xla_cpu_use_thunk_runtime=False: this network has '
                                       r'strided convolutions'):
    learner_lib.Learner(classic, iter([]), devices=jax.local_devices()[:1])
  small = get_config('cpu_small').replace(agent=dict(games_per_batch=4, transitions_per_game=2))
  assert not q_network.has_strided_convolutions(small.network)
  for cfg, found in ((CFG, True), (small, False)):
    state = learner_lib.initial_state(cfg, jax.random.PRNGKey(0), None)
    windows = jax.device_put(random_frame_windows(cfg, 8, 0))
    hlo = learner_lib.update_from_windows.lower(state, windows, cfg=cfg).compile().as_text()
    assert bool(learner_lib.dilated_convolutions(hlo)) == found


def test_policy_never_picks_invalid_actions():
  learner = make()
  params, = learner.get_variables()
  learner.close()
  # Make every valid Breakout action's distribution sit on the lowest atom (Q ~ v_min), so a
  # padded action (logits 0 -> Q = mean of the support = 0) would win an unmasked argmax.
  heads = dict(params['heads/Breakout'])
  bias = np.full(heads['b'].shape, -50.0, np.float32).reshape(4, 51)
  bias[:, 0] = 50.0
  heads['b'] = bias.reshape(-1)
  params = {**params, 'heads/Breakout': heads}
  obs = np.random.default_rng(0).integers(0, 256, (16, 84, 84, 4), dtype=np.uint8)
  game_id = np.zeros(16, np.int32)
  for epsilon in (0.0, 1.0):
    policy = actors.make_policy(CFG, epsilon)
    for seed in range(3):
      actions = np.asarray(policy(params, jax.random.PRNGKey(seed), obs, game_id))
      assert actions.dtype == np.int32 and actions.shape == (16,)
      assert (actions < 4).all() and (actions >= 0).all(), actions
  uniform = np.asarray(actors.make_policy(CFG, 1.0)(
      params, jax.random.PRNGKey(0), np.repeat(obs, 8, axis=0), np.ones(128, np.int32)))
  assert set(uniform.tolist()) == set(range(6))  # epsilon=1: all of Pong's 6 actions appear


_MULTI_DEVICE_SCRIPT = textwrap.dedent('''
    import sys
    import jax, numpy as np
    sys.path.insert(0, {tests_dir!r})
    from test_learner import CFG, batches, make
    assert len(jax.local_devices()) == 4, jax.local_devices()
    learner = make(devices=jax.local_devices())
    for _ in range(3):
      learner.step()
    state = learner.learner.state
    assert state.params['trunk/linear_0']['w'].sharding.is_fully_replicated
    params, = learner.get_variables()
    np.savez({out!r}, *jax.tree_util.tree_leaves(params))
''')


def test_one_and_four_devices_agree(tmp_path):
  out = str(tmp_path / 'four.npz')
  script = _MULTI_DEVICE_SCRIPT.format(tests_dir=os.path.dirname(__file__), out=out)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, (f'4-device run exited {proc.returncode}:\n{proc.stdout[-1000:]}\n'
                                f'{proc.stderr[-3000:]}')
  learner = make()
  for _ in range(3):
    learner.step()
  one = jax.tree_util.tree_leaves(learner.get_variables()[0])
  learner.close()
  four = np.load(out)
  four = [four[f'arr_{i}'] for i in range(len(four.files))]
  assert len(one) == len(four)
  for i, (x, y) in enumerate(zip(one, four)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=f'param leaf {i}')


def test_loggers_write_jsonl_and_tensorboard(tmp_path):
  logger = loggers.make_logger('learner', str(tmp_path), stdout=True)
  logger.write(5, {'loss': np.float32(0.5), 'q': 1})
  logger.write(10, {'loss': float('nan')})
  with pytest.raises(TypeError, match="'bad'"):
    logger.write(11, {'bad': 'x'})
  logger.close()
  lines = [json.loads(l) for l in open(tmp_path / 'learner.jsonl')]
  assert lines[0]['step'] == 5 and lines[0]['loss'] == 0.5 and lines[1]['loss'] == 'nan'
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tb'))


def test_run_stops_at_the_end_of_the_data_with_a_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  learner = make(it=iter([random_batch(CFG, i) for i in range(3)]), workdir=workdir)
  assert learner.run(num_steps=100) == 3
  learner.close()
  assert checkpointing.load_params(workdir)[2] == 3


def test_learn_command_rejects_bad_flags_before_starting_anything(tmp_path, capsys):
  from scaled_ql import cli
  assert cli.main(['learn', '--config', 'cpu_nope', '--workdir', str(tmp_path)]) == 2
  assert '--config' in capsys.readouterr().err
  assert cli.main(['learn', '--config', 'cpu_tiny', '--workdir', str(tmp_path),
                   '--data-dir', str(tmp_path / 'missing')]) == 2
  assert '--data-dir' in capsys.readouterr().err
  assert cli.main(['learn', '--config', 'cpu_tiny', '--workdir', str(tmp_path),
                   '--steps', '0']) == 2
  assert '--steps' in capsys.readouterr().err


def test_learn_refuses_a_reverb_address_that_does_not_serve_its_games(tiny_dataset_dir, tmp_path,
                                                                     capsys, monkeypatch):
  """`learn --reverb HOST:PORT` checks the server before anything is written: with nothing there,
  or a server without the config's tables, the learner's sampler waited forever."""
  import portpicker
  import reverb
  from scaled_ql import cli
  from scaled_ql.agents import commands as learn_commands
  from scaled_ql.datasets import reverb_tables
  monkeypatch.setattr(learn_commands, 'REVERB_CHECK_TIMEOUT_S', 1.0)
  workdir = tmp_path / 'w'
  argv = ['learn', '--config', 'cpu_tiny', '--data-dir', tiny_dataset_dir, '--workdir',
          str(workdir), '--reverb']
  nobody = f'localhost:{portpicker.pick_unused_port()}'
  assert cli.main(argv + [nobody]) == 2
  assert f'--reverb {nobody}: no reverb server answered at {nobody}' in capsys.readouterr().err
  other = reverb_tables.server_with_tables([reverb.Table.queue('other_table', 10)])
  try:
    assert cli.main(argv + [f'localhost:{other.port}']) == 2
    assert ('has no table transitions_Breakout, transitions_Pong (its tables: other_table)'
            in capsys.readouterr().err)
  finally:
    other.stop()
  assert not workdir.exists()


def test_sigterm_ends_a_learn_run_waiting_for_data_with_a_checkpoint(tiny_dataset_dir, tmp_path):
  """`learn --reverb` on a server whose tables stay below their warm-up (no inserter): the
  learner waits for its first batch, where no step boundary comes. A SIGTERM left it waiting
  forever; now it ends the wait, checkpoints the step it is at (0) and exits 0."""
  from scaled_ql.datasets import reverb_tables
  server = reverb_tables.make_server(CFG)
  workdir = tmp_path / 'w'
  proc = _learn_logged(['--config', 'cpu_tiny', '--data-dir', tiny_dataset_dir, '--workdir',
                        str(workdir), '--reverb', f'localhost:{server.port}'], workdir)
  try:
    _wait_until(lambda: (workdir / 'checkpoints').is_dir(),  # made by the runner, next to its
                proc, 120, 'its checkpoints folder', workdir)  # handlers
    time.sleep(2.0)  # (in the wait for a batch)
    proc.send_signal(signal.SIGTERM)
    _wait(proc, 60, workdir)
    out, err = _outputs(workdir)
  finally:
    _end(proc)
    server.stop()
  assert proc.returncode == 0, (out[-2000:], err[-2000:])
  assert 'SIGTERM received while waiting for data: stopped after step 0' in out, out[-3000:]
  assert checkpointing.load_params(str(workdir))[2] == 0


def _children(pid: int, tag: str) -> list[int]:
  """pids of the processes whose parent is `pid` and whose command line holds `tag`."""
  import psutil
  found = []
  for child in psutil.Process(pid).children():
    try:
      if tag in ' '.join(child.cmdline()):
        found.append(child.pid)
    except psutil.NoSuchProcess:
      continue
  return found


def _learn_logged(args: list[str], log, env=None) -> subprocess.Popen:
  """`scaled-ql learn ARGS` in a process group of its own, its stdout and stderr in the files
  LOG.out and LOG.err (`_outputs`): a pipe that no one reads while the learner runs fills up
  (64 KiB; JAX_LOG_COMPILES=1 did it) and stops it."""
  with open(f'{log}.out', 'w', encoding='utf-8') as out, \
       open(f'{log}.err', 'w', encoding='utf-8') as err:
    return subprocess.Popen([sys.executable, '-m', 'scaled_ql.cli', 'learn', *args], stdout=out,
                            stderr=err, start_new_session=True, env=env)


def _outputs(log) -> tuple[str, str]:
  """What `_learn_logged`'s process wrote so far to its stdout and its stderr."""
  with open(f'{log}.out', encoding='utf-8', errors='replace') as out, \
       open(f'{log}.err', encoding='utf-8', errors='replace') as err:
    return out.read(), err.read()


def _wait(proc: subprocess.Popen, timeout: float, log) -> None:
  """Waits for `proc` to end; past `timeout` s, fails with the end of its stderr."""
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    raise AssertionError(f'learn did not end within {timeout:g} s:\n'
                         f'{_outputs(log)[1][-3000:]}') from None


def _wait_until(done, proc: subprocess.Popen, timeout: float, what: str, log) -> None:
  """Polls `done()` while `proc` runs; fails, with the end of its stderr, if it exits first (and
  with what code) or `timeout` s pass."""
  def check():
    if done():
      return True
    if proc.poll() is not None:
      raise AssertionError(f'learn exited ({proc.returncode}) before {what}:\n'
                           f'{_outputs(log)[1][-3000:]}')
    return False
  try:
    wait_for(check, timeout, what)
  except AssertionError as e:
    if proc.poll() is None:  # (timed out)
      raise AssertionError(f'{e}:\n{_outputs(log)[1][-3000:]}') from None
    raise


def _end(proc: subprocess.Popen) -> None:
  """Kills what is left of `_learn_logged`'s process group (the learner, and its Reverb server
  and inserters, which outlive a learner that exits without them) and reaps the learner."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:  # nothing left in the group
    pass
  proc.wait()


def _learn_until_checkpoint(data_dir, workdir, step: int, env=None) -> subprocess.Popen:
  """`learn --config cpu_tiny` (`_learn_logged`), once checkpoint `step` exists; on a failure or
  an interrupt meanwhile, its process group is killed."""
  proc = _learn_logged(['--config', 'cpu_tiny', '--data-dir', data_dir, '--workdir', str(workdir),
                        '--steps', '100000'], workdir, env=env)
  try:
    _wait_until(lambda: (workdir / 'checkpoints' / str(step)).is_dir(), proc, 120,
                f'checkpoint {step}', workdir)  # the learner is training
  except BaseException:
    _end(proc)
    raise
  return proc


def test_learn_ends_with_a_checkpoint_when_its_reverb_server_dies(tiny_dataset_dir, tmp_path):
  """`learn`'s own Reverb server SIGKILLed while the learner trains: before, the learner waited
  for data for ever without a word (and the inserter retried); now the run stops at its step
  with a checkpoint of it and exits 1 naming the server and the signal.

  Also: `learn` points JAX's persistent cache at WORKDIR/compilation_cache/<machine> before it
  compiles (the suite's own folder is taken out of its environment here), and its first step
  says what the cache did (a rerun's loads: tests/test_compilation_cache.py)."""
  workdir = tmp_path / 'w'
  environment = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  proc = _learn_until_checkpoint(tiny_dataset_dir, workdir, 10, env=environment)
  try:
    servers = _children(proc.pid, 'reverb_tables serve')
    inserters = _children(proc.pid, 'reverb_tables insert')
    assert len(servers) == 1 and inserters, (servers, inserters)
    os.kill(servers[0], signal.SIGKILL)
    _wait(proc, 60, workdir)
    out, err = _outputs(workdir)
    # (before `_end`, which kills what is left of the group)
    left = [pid for pid in inserters if os.path.exists(f'/proc/{pid}')]
  finally:
    _end(proc)
  assert proc.returncode == 1, err[-3000:]
  message = re.search(r'error: the Reverb server \(pid (\d+)\) was killed by SIGKILL while the '
                      r'learner trained: the run stopped after step (\d+), with a checkpoint', err)
  assert message and int(message.group(1)) == servers[0], err[-3000:]
  assert checkpointing.load_params(str(workdir))[2] == int(message.group(2)) >= 10
  # The runner's own line names the same cause (it said "the data iterator is exhausted").
  assert (f'the Reverb server (pid {servers[0]}) was killed by SIGKILL: stopped after step '
          f'{message.group(2)}') in out, out[-3000:]
  assert not left, f'inserter(s) left behind: {left}'
  folders = os.listdir(workdir / 'compilation_cache')
  assert len(folders) == 1, folders
  folder = workdir / 'compilation_cache' / folders[0]
  first = re.search(r'^learner: the first step of this start \(step 1\) took [\d.]+ s \(.*\); '
                    rf'compilation cache {re.escape(str(folder))}: 0 executable\(s\) loaded, '
                    r'(\d+) compiled for it$', out, re.MULTILINE)
  assert first and int(first.group(1)) >= 1, out[-3000:]


# ---- the Monte-Carlo probe (issue 11 diagnostics) -----------------------------------------------
def test_discounted_returns_hand_computed():
  g = mc_probe.discounted_returns(np.array([1.0, 0.0, 5.0]), 0.5, clip=1.0)
  np.testing.assert_allclose(g, [1.0 + 0.25 * 1.0, 0.5, 1.0])  # 5 is clipped to 1


def _episode(rng, length, terminal, rewards=None):
  rewards = rng.normal(size=length) if rewards is None else np.asarray(rewards)
  last = np.arange(length + 1) == length
  return dict(observation=rng.integers(0, 256, (length + 1, 84, 84), dtype=np.uint8),
              action=rng.integers(0, 4, length + 1).astype(np.int32),
              reward=np.concatenate([rewards, [0.0]]).astype(np.float32),
              is_last=last, is_terminal=last & terminal)


def test_mc_probe_skips_truncated_episodes_and_logs_q_against_mc_return(tmp_path):
  rng = np.random.default_rng(0)
  cfg = CFG
  eps = [(0, _episode(rng, 6, terminal=False)), (0, _episode(rng, 5, True, [0, 0, 1, 0, 1])),
         (1, _episode(rng, 7, terminal=True))]
  probe = mc_probe.mc_probe_from_episodes(cfg, iter(eps), per_game=40)
  # Only the terminated episodes: all 5 transitions of game 0's and 7 of game 1's.
  assert len(probe.action) == 12 and list(probe.game_id) == [0] * 5 + [1] * 7
  g = cfg.agent.discount
  np.testing.assert_allclose(probe.mc_return[:5], [g ** 2 + g ** 4, g + g ** 3, 1 + g ** 2, g, 1],
                             rtol=1e-6)
  assert mc_probe.mc_probe_from_episodes(cfg, iter(eps[:1]), per_game=40) is None
  # A malformed episode is skipped, as the inserters skip it (before, it raised in the learner's
  # constructor, and its crash loop ended the program); data.strict raises.
  bad = _episode(rng, 4, terminal=True)
  bad['is_terminal'][1] = True
  again = mc_probe.mc_probe_from_episodes(cfg, iter(eps[:2] + [(1, bad)] + eps[2:]), per_game=40)
  np.testing.assert_array_equal(again.observation, probe.observation)
  with pytest.raises(ValueError, match='step 1 is terminal but not last'):
    mc_probe.mc_probe_from_episodes(cfg.replace(data=dict(strict=True)),
                                    iter(eps[:2] + [(1, bad)]), per_game=40)
  # So is one with an action outside its game's set (Breakout, game 0, has 4 actions).
  wide = dict(eps[1][1], action=eps[1][1]['action'].copy())
  wide['action'][2] = games_lib.num_actions(cfg.games[0])
  assert mc_probe.mc_probe_from_episodes(cfg, iter([(0, wide)]), per_game=40) is None

  records = []

  class Capture:
    def write(self, step, metrics):
      records.append((step, dict(metrics)))

    def close(self):
      pass

  by_game = []

  class CaptureGames(Capture):
    def write(self, step, metrics):
      by_game.append((step, dict(metrics)))

  learner = make(cfg, logger=Capture(), mc_probe=probe, game_logger=CaptureGames())
  learner.run(cfg.train.log_every_steps)
  learner.close()
  step, logged = records[-1]
  params, = learner.get_variables()
  q = runner_lib.probe_q_values(cfg, params, probe)
  # The per-game diagnostics of the same params, logged at the same step (their own logger).
  assert by_game[-1] == (step, runner_lib.probe_game_metrics(
      runner_lib.probe_q_table(cfg, params, probe), probe, cfg.games))
  assert set(by_game[-1][1]) == {f'{g}/{k}' for g in cfg.games for k in (
      'greedy_is_data_action', 'greedy_top_share', 'data_top_share', 'action_gap', 'q_mc_corr')}
  # The probe's Q(s, a_data) is the loss's q_data on the same transitions.
  batch = Transition(probe.observation, probe.action, np.zeros(12, np.float32),
                     np.zeros(12, np.float32), probe.observation, probe.game_id)
  _, terms = learner_lib.batch_loss((params, {}), params, batch, cfg)
  np.testing.assert_allclose(q.mean(), terms['q_data'], rtol=1e-4, atol=1e-6)
  assert step == cfg.train.log_every_steps
  np.testing.assert_allclose(logged['probe_q_data'], q.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logged['probe_mc_return'], probe.mc_return.mean(), rtol=1e-6)
  np.testing.assert_allclose(logged['probe_q_minus_mc_return'], (q - probe.mc_return).mean(),
                             rtol=1e-4, atol=1e-6)
  for key in ('td_loss_over_log_atoms', 'action_gap', 'greedy_is_data_action', 'probe_q_mc_corr'):
    assert key in logged, key
  # With a workdir the per-game diagnostics go to their own JSONL (and TB), not to stdout.
  learner = make(cfg, workdir=str(tmp_path), mc_probe=probe)
  learner.run(cfg.train.log_every_steps)
  learner.close()
  lines = [json.loads(l) for l in open(tmp_path / 'learner_games.jsonl')]
  assert lines[-1]['step'] == cfg.train.log_every_steps
  assert 0 <= lines[-1]['Pong/greedy_top_share'] <= 1


def test_probe_game_metrics_by_hand():
  # Game 0 (3 valid actions): greedy 2, 2, 0 against data actions 2, 1, 1. Game 1 (2 valid):
  # greedy 1 both times, data 1 both times. -inf marks an action the game does not have.
  inf = np.inf
  q = np.array([[0., 1., 3., -inf], [1., 0., 1.5, -inf], [5., 4., 0., -inf],
                [0., 2., -inf, -inf], [1., 1.5, -inf, -inf]], np.float32)
  probe = McProbe(observation=np.zeros((5, 84, 84, 4), np.uint8),
                  action=np.array([2, 1, 1, 1, 1], np.int32),
                  game_id=np.array([0, 0, 0, 1, 1], np.int32),
                  mc_return=np.array([3., 0., 4., 1., 2.], np.float32))
  m = runner_lib.probe_game_metrics(q, probe, ('A', 'B', 'C'))
  assert not any(k.startswith('C/') for k in m)  # a game without probe transitions: no entries
  np.testing.assert_allclose(m['A/greedy_is_data_action'], 1 / 3)
  np.testing.assert_allclose(m['A/greedy_top_share'], 2 / 3)
  np.testing.assert_allclose(m['A/data_top_share'], 2 / 3)
  np.testing.assert_allclose(m['A/action_gap'], (2 + 0.5 + 1) / 3, rtol=1e-6)
  # Q(s, a_data) of game 0: 3, 0, 4 against returns 3, 0, 4: perfectly correlated.
  np.testing.assert_allclose(m['A/q_mc_corr'], 1.0, rtol=1e-6)
  assert m['B/greedy_is_data_action'] == 1.0 and m['B/greedy_top_share'] == 1.0
  np.testing.assert_allclose(m['B/action_gap'], (2 + 0.5) / 2)
  # Q(s, a_data) of game 1: 2 then 1.5, against returns 1 then 2.
  np.testing.assert_allclose(m['B/q_mc_corr'], -1.0, rtol=1e-6)


def test_load_mc_probe_reads_the_run_data(tiny_dataset_dir):
  cfg = CFG.replace(data=dict(data_dir=tiny_dataset_dir, selection='checkpoints:0-1'))
  probe = mc_probe.load_mc_probe(cfg, per_game=16)
  assert probe is not None and probe.observation.dtype == np.uint8
  assert set(np.unique(probe.game_id)) <= {0, 1} and np.isfinite(probe.mc_return).all()
  assert len(probe.action) <= 32


def test_agents_modules_import_in_one_direction():
  # Issue 16: losses <- methods <- builder <- learner <- checkpointing <- transfer, runner; no
  # circle, and no function-local import of another agents module to hide one.
  agents_dir = os.path.dirname(learner_lib.__file__)
  graph = {}
  for name in ('losses', 'builder', 'learner', 'checkpointing', 'transfer', 'runner', 'actors'):
    tree = ast.parse(open(os.path.join(agents_dir, f'{name}.py')).read())
    top, local = set(), set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('scaled_ql.agents'):
        names = ({a.name for a in node.names} if node.module == 'scaled_ql.agents'
                 else {node.module.split('.')[2]})
        (top if node in tree.body else local).update(names)
    assert not local, f'{name}.py imports {local} inside a function'
    graph[name] = top
  order = []
  while graph:
    ready = [n for n, deps in graph.items() if not (deps & set(graph))]
    assert ready, f'import circle among {sorted(graph)}: {graph}'
    order += sorted(ready)
    for n in ready:
      del graph[n]
  assert order.index('learner') < order.index('checkpointing') < order.index('transfer')


@pytest.mark.parametrize('loss,input_norm,per_item', [('c51', 'standardize', 4)])
def test_update_from_windows_equals_the_update_on_stacked_observations(loss, input_norm,
                                                                         per_item):
  """The learner's path from frame windows (each frame preprocessed and cut into patches once,
  `windows_batch`) takes the same step as `update` on the stacked `Transition`."""
  cfg = CFG.replace(agent=dict(loss=loss, cql_alpha=0.05 if loss == 'c51' else 0.0),
                    network=dict(input_norm=input_norm),
                    data=dict(transitions_per_item=per_item))
  windows = random_frame_windows(cfg, seed=3)
  assert isinstance(learner_lib.windows_batch(windows, cfg).observation, q_network.FramePatches)
  state = learner_lib.initial_state(cfg, jax.random.PRNGKey(0), None)
  copy = lambda: jax.tree_util.tree_map(np.array, state)  # update donates its state
  got, got_metrics = learner_lib.update_from_windows(copy(), windows, cfg=cfg)
  want, want_metrics = learner_lib.update(copy(), windows.to_transition(), cfg=cfg)
  assert set(got_metrics) == set(want_metrics)
  for k in want_metrics:
    np.testing.assert_allclose(got_metrics[k], want_metrics[k], rtol=1e-4, atol=1e-5, err_msg=k)
  chex.assert_trees_all_close((got.params, got.behaviour_params),
                              (want.params, want.behaviour_params), rtol=1e-4, atol=1e-5)


def test_windows_batch_stacks_frames_for_other_stems():
  nature = CFG.replace(network=dict(stem='nature'))
  observation = learner_lib.windows_batch(random_frame_windows(nature), nature).observation
  assert observation.shape == (8, 84, 84, 4) and observation.dtype == np.uint8


def test_random_shift_moves_the_observations_of_both_update_paths():
  """`agent.random_shift`: `update_from_windows` shifts each item's frames and `update` each
  transition's two observations, by offsets from `augmentation_key(state)`; the step is then
  the plain `gradient_step` on the moved images (and differs from the unshifted one)."""
  cfg = CFG.replace(agent=dict(random_shift=4), data=dict(transitions_per_item=4))
  windows = random_frame_windows(cfg, seed=5)
  state = learner_lib.initial_state(cfg, jax.random.PRNGKey(0), None)
  copy = lambda: jax.tree_util.tree_map(np.array, state)  # the updates donate their state
  key = learner_lib.augmentation_key(state)

  offsets = augmentation.shift_offsets(key, windows.frames.shape[0], 4)
  moved = windows._replace(frames=augmentation.shift(windows.frames, offsets, 4, (1, 2)))
  got, got_metrics = learner_lib.update_from_windows(copy(), windows, cfg=cfg)
  want, want_metrics = jax.jit(learner_lib.gradient_step, static_argnums=2)(
      copy(), learner_lib.windows_batch(moved, cfg), cfg)
  _, unshifted_metrics = jax.jit(learner_lib.gradient_step, static_argnums=2)(
      copy(), learner_lib.windows_batch(windows, cfg), cfg)
  chex.assert_trees_all_close(got.params, want.params, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_metrics['grad_norm'], want_metrics['grad_norm'], rtol=1e-4)
  unshifted = float(unshifted_metrics['grad_norm'])
  assert abs(float(got_metrics['grad_norm']) - unshifted) > 1e-3 * unshifted

  batch = windows.to_transition()
  offsets = augmentation.shift_offsets(key, batch.action.shape[0], 4)
  moved = batch._replace(observation=augmentation.shift(batch.observation, offsets, 4, (0, 1)),
                         next_observation=augmentation.shift(batch.next_observation, offsets, 4,
                                                             (0, 1)))
  got, _ = learner_lib.update(copy(), batch, cfg=cfg)
  want, _ = jax.jit(learner_lib.gradient_step, static_argnums=2)(copy(), moved, cfg)
  chex.assert_trees_all_close(got.params, want.params, rtol=1e-4, atol=1e-5)


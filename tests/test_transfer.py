"""Transfer (issue 6): encoder loading, frozen/trained encoders, the mismatch error, the configs,
and the online fine-tuning program end to end (real Ray, real emulator in mode 12, real Reverb),
through a restart of its replay.

The "pretrained" checkpoint is a cpu_tiny learner (games Breakout, Freeway) after a few steps on
random batches: what matters is that its params differ from a fresh init.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from scaled_ql import configs, loggers
from scaled_ql.agents import builder
from scaled_ql.agents import learner as learner_lib
from scaled_ql.agents import runner as runner_lib
from scaled_ql.agents import actors, checkpointing, transfer
from scaled_ql.configs import ConfigError
from scaled_ql.datasets import reverb_tables
from scaled_ql.launch import finetune
from scaled_ql.launch import run as launch_run

sys.path.insert(0, os.path.dirname(__file__))
from test_learner import batches  # noqa: E402  (random uint8 Transition batches of a config)

PRETRAIN_CFG = configs.get_config('cpu_tiny').replace(name='cpu_tiny_pretrain',
                                                      games=('Breakout', 'Freeway'))


def _learner(cfg, workdir=None, initial_params=None):
  learner = learner_lib.Learner(cfg, batches(cfg), devices=jax.local_devices()[:1],
                                initial_params=initial_params)
  return runner_lib.LearnerRunner(learner, workdir, logger=loggers.MultiLogger([]),
                                  handle_signals=False)


def _modules(params, prefix):
  return {k: v for k, v in params.items() if k.split('/', 1)[0] == prefix}


def _equal(a, b) -> bool:
  return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
          and all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                       jax.tree_util.tree_leaves(b))))


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory) -> str:
  """A pretrained run of 3 steps that kept a moving average of its params, as cpu_small does
  (`agent.policy_params_ema`): its evaluators' params and its online ones differ."""
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  learner = _learner(PRETRAIN_CFG.replace(agent=dict(policy_params_ema=0.5)), workdir)
  for _ in range(3):
    learner.step()
  learner.save()
  learner.close()
  return workdir


def _offline_cfg(pretrained, game='Pong', freeze=False, seed=1):
  cfg = configs.finetune_offline(PRETRAIN_CFG, game, pretrained=pretrained, freeze_encoder=freeze)
  # Tiny batch for the tests; a seed other than pre-training's so fresh != pretrained init.
  return cfg.replace(agent=dict(transitions_per_game=4), train=dict(seed=seed))


def test_loaded_encoder_equals_checkpoint_and_trunk_heads_are_fresh(pretrained):
  _, ckpt, step = transfer.load_pretrained(pretrained)
  assert step == 3
  cfg = _offline_cfg(pretrained)
  params = transfer.finetune_params(cfg)
  fresh = transfer.finetune_params(cfg.replace(finetune=dict(pretrained=None)))
  assert _equal(_modules(params, 'encoder'), _modules(ckpt, 'encoder'))
  assert not _equal(_modules(fresh, 'encoder'), _modules(ckpt, 'encoder'))
  # Trunk: the fine-tuning run's own random init, not the checkpoint's trained trunk.
  assert _equal(_modules(params, 'trunk'), _modules(fresh, 'trunk'))
  assert not any(np.array_equal(params[m]['w'], ckpt[m]['w'])
                 for m in _modules(params, 'trunk') if 'w' in params[m])
  # Heads: the new game's head only (Pong), freshly initialized.
  assert sorted(_modules(params, 'heads')) == ['heads/Pong']
  assert sorted(_modules(ckpt, 'heads')) == ['heads/Breakout', 'heads/Freeway']
  assert _equal(_modules(params, 'heads'), _modules(fresh, 'heads'))


@pytest.mark.parametrize('freeze', [True, False])
def test_frozen_encoder_is_unchanged_and_a_trained_one_changes(pretrained, freeze):
  cfg = _offline_cfg(pretrained, freeze=freeze)
  initial = transfer.finetune_params(cfg)
  learner = _learner(cfg, initial_params=initial)
  start, = learner.get_variables()
  assert _equal(start, initial)  # the learner starts from the given params
  for _ in range(3):
    learner.step()
  after, = learner.get_variables()
  learner.close()
  assert _equal(_modules(after, 'encoder'), _modules(initial, 'encoder')) == freeze
  assert not _equal(_modules(after, 'trunk'), _modules(initial, 'trunk'))
  assert not _equal(_modules(after, 'heads'), _modules(initial, 'heads'))


def test_the_encoder_of_a_run_with_a_moving_average_is_the_averaged_or_the_online_one(
    pretrained, tiny_dataset_dir, tmp_path, capsys):
  """A pretrained run that kept a moving average of its params (`agent.policy_params_ema`, as
  cpu_small does): fine-tuning starts from the averaged params' encoder (what its evaluators
  scored), or with --online-params (`finetune.pretrained_online_params`) from the online one."""
  workdir = pretrained
  _, averaged, _ = checkpointing.load_params(workdir)
  _, online, _ = checkpointing.load_params(workdir, online=True)
  assert not _equal(_modules(averaged, 'encoder'), _modules(online, 'encoder'))
  lines = []
  for flag, expected in ((False, averaged), (True, online)):
    cfg, params = launch_run.finetune_config(
        'offline', 'Pong', pretrained=workdir, data_dir=tiny_dataset_dir, online_params=flag,
        overrides=['agent.transitions_per_game=4'], log=lines.append)
    assert cfg.finetune.pretrained_online_params is flag
    assert _equal(_modules(params, 'encoder'), _modules(expected, 'encoder'))
    # A config.json's rerun (`train` with the fine-tuning config) reads the same encoder.
    assert _equal(_modules(launch_run.initial_params(cfg), 'encoder'),
                  _modules(expected, 'encoder'))
  assert any('the encoder of the online params of the pretrained run '
             '(finetune.pretrained_online_params)' in line for line in lines)
  assert any("moving average (decay 0.5) of the pretrained run, what its evaluators used" in line
             for line in lines)
  # Without a pretrained run the field means nothing: refused, from the flag, from --set, and
  # in a config `train` or `learn` would run.
  from scaled_ql import cli
  for argv in (['--online-params'], ['--set', 'finetune.pretrained_online_params=true']):
    assert cli.main(['finetune', 'offline', '--from-scratch', '--config', 'cpu_tiny', '--game',
                     'Pong', '--data-dir', tiny_dataset_dir, '--workdir',
                     str(tmp_path / 'scratch')] + argv) == 2
    assert 'finetune.pretrained_online_params (--online-params) needs a pretrained run' in (
        capsys.readouterr().err)
  with pytest.raises(ConfigError, match='finetune.pretrained_online_params'):
    launch_run.validate(PRETRAIN_CFG.replace(finetune=dict(pretrained_online_params=True)))
  assert launch_run.resume_refuses('finetune.pretrained_online_params')
  # `learn --config FT/config.json` starts from the pretrained encoder, as `train` does (it
  # ignored finetune.pretrained and trained from a random init before).
  from scaled_ql.agents import commands as learn_commands
  cfg, _ = launch_run.finetune_config('offline', 'Pong', pretrained=workdir,
                                      data_dir=tiny_dataset_dir, online_params=True,
                                      log=lambda line: None)
  launch_run.prepare_workdir(cfg, str(tmp_path / 'ft'))  # what `finetune offline` writes
  args = cli.build_parser().parse_args(['learn', '--config', str(tmp_path / 'ft' / 'config.json'),
                                        '--workdir', str(tmp_path / 'learn')])
  import contextlib
  with contextlib.ExitStack() as held:
    _, initial = learn_commands._resolve(args, held)
  assert _equal(_modules(initial, 'encoder'), _modules(online, 'encoder'))


def test_learn_and_train_refuse_a_fine_tuning_start_that_cannot_be_before_anything_costly(
    tmp_path):
  """`run.check_initial_params`, the first checks of `learn` (before its workdir lock and its
  compilation cache) and of `initial_params`: an online fine-tuning config, or a pretrained run
  that is not there, is refused before anything is loaded or compiled."""
  missing = str(tmp_path / 'no_such_run')
  with pytest.raises(ConfigError, match=re.escape(f"finetune.pretrained: no checkpoints in "
                                                  f"'{missing}'")):
    launch_run.check_initial_params(PRETRAIN_CFG.replace(finetune=dict(pretrained=missing)))
  with pytest.raises(ConfigError, match=re.escape("'gs://b/run' is a URL")):
    launch_run.check_initial_params(PRETRAIN_CFG.replace(finetune=dict(pretrained='gs://b/run')))
  online = configs.finetune_online(PRETRAIN_CFG, 'Breakout', None, pretrained=None)
  with pytest.raises(ConfigError, match='Use scaled-ql finetune online'):
    launch_run.check_initial_params(online)
  launch_run.check_initial_params(PRETRAIN_CFG)  # a fresh start: nothing to check


def test_frozen_labels_and_config_checks():
  params = {'encoder/stem_conv': {'w': 1}, 'trunk/linear_0': {'w': 2, 'b': 3},
            'heads/Pong': {'w': 4}}
  labels = builder.frozen_labels(({**params}, {}), ('encoder', 'heads'))
  assert labels[0] == {'encoder/stem_conv': {'w': 'frozen'},
                       'trunk/linear_0': {'w': 'trainable', 'b': 'trainable'},
                       'heads/Pong': {'w': 'frozen'}}
  with pytest.raises(ValueError, match=r"frozen_modules.*'torso'"):
    builder.check_agent_config(
        PRETRAIN_CFG.replace(agent=dict(frozen_modules=('torso',))))


def test_a_frozen_encoders_backward_pass_is_not_computed():
  """The optimizer gives a frozen module zero updates; its gradients are read by nothing else
  (`grad_norm` counts the trained params only: `builder.trained_only`), so XLA drops their
  computation. Before, the norm read them, and a frozen-encoder step cost a trained one's."""
  grads = {'encoder/stem_conv': {'w': np.full(4, 3.0, np.float32)},
           'trunk/linear_0': {'w': np.full(4, 2.0, np.float32)}}
  kept = builder.trained_only(grads, ('encoder',))
  assert float(kept['encoder/stem_conv']['w']) == 0.0
  assert kept['trunk/linear_0']['w'] is grads['trunk/linear_0']['w']
  assert builder.trained_only(grads, ()) is grads

  def flops(cfg):
    state = jax.eval_shape(lambda: learner_lib.init_state(cfg, jax.random.PRNGKey(0)))
    batch = jax.eval_shape(lambda: next(batches(cfg)))
    analysis = learner_lib.update.lower(state, batch, cfg=cfg).compile().cost_analysis()
    return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)['flops'])
  trained = flops(PRETRAIN_CFG)
  frozen = flops(PRETRAIN_CFG.replace(agent=dict(frozen_modules=('encoder',))))
  assert frozen < 0.8 * trained, (frozen, trained)  # cpu_tiny: 0.013 against 0.020 GFLOP


def test_encoder_mismatch_names_the_parameters_and_the_checkpoint(pretrained):
  cfg = _offline_cfg(pretrained).replace(network=dict(resnet_width=16))
  with pytest.raises(transfer.EncoderMismatchError) as e:
    transfer.finetune_params(cfg)
  message = str(e.value)
  assert pretrained in message
  assert ('encoder/stage_0_block_0/conv_0/w: checkpoint [3, 3, 8, 8] vs configured network '
          '[3, 3, 16, 16]') in message, message
  # Mean pooling instead of the spatial embedding: a parameter the network does not have.
  cfg = _offline_cfg(pretrained).replace(network=dict(spatial_embedding=False))
  with pytest.raises(transfer.EncoderMismatchError, match='encoder/spatial_embedding/kernel: '
                     'not in the configured network'):
    transfer.finetune_params(cfg)
  with pytest.raises(ValueError, match='initial_params do not fit'):
    _learner(_offline_cfg(pretrained), initial_params={'encoder/stem_conv': {'w': np.zeros(3)}})
  # Same shapes, other computation: the checkpoint was trained on x / 255 with 4 GroupNorm groups.
  cfg = _offline_cfg(pretrained).replace(network=dict(input_norm='standardize',
                                                      group_norm_groups=2))
  with pytest.raises(transfer.EncoderMismatchError) as e:
    transfer.finetune_params(cfg)
  assert (f'the encoder of checkpoint {pretrained} does not match the configured network: '
          "network.input_norm: checkpoint 'scale' vs configured network 'standardize'; "
          'network.group_norm_groups: checkpoint 4 vs configured network 2') == str(e.value)


def test_cli_rejects_a_mismatching_checkpoint_before_starting_anything(pretrained,
                                                                        tiny_dataset_dir, tmp_path,
                                                                        capsys):
  from scaled_ql import cli  # in-process: a subprocess added ~5 s of imports to the suite
  code = cli.main(['finetune', 'offline', '--pretrained', pretrained, '--config', 'cpu_small',
                   '--game', 'Pong', '--data-dir', tiny_dataset_dir,
                   '--workdir', str(tmp_path / 'ft')])
  err = capsys.readouterr().err
  assert code == 2, err
  assert f'the encoder of checkpoint {pretrained} does not match' in err
  assert "network.input_norm: checkpoint 'scale' vs configured network 'standardize'" in err
  assert 'encoder/stage_0_block_0/conv_0/w: checkpoint [3, 3, 8, 8]' in err
  assert not os.path.exists(tmp_path / 'ft')


def test_flags_are_checked_before_the_checkpoints_params_are_read(pretrained, tiny_dataset_dir,
                                                                   tmp_path):
  """`finetune` reads the checkpoint's config, checks every flag, and only then reads the params
  (a paper-size checkpoint takes minutes to read). Shown on a copy whose arrays are gone: a bad
  --set is named, and the copy is left as it was (reading its params would move it aside)."""
  copy = tmp_path / 'pretrained'
  shutil.copytree(pretrained, copy)
  steps = checkpointing.saved_steps(str(copy))
  for step in steps:
    shutil.rmtree(copy / 'checkpoints' / str(step) / 'state')
  assert checkpointing.load_config(str(copy))[1] == steps[-1]
  with pytest.raises(ConfigError, match='agent.cql_alpha=-1'):
    launch_run.finetune_config('offline', 'Pong', pretrained=str(copy),
                               data_dir=tiny_dataset_dir, overrides=['agent.cql_alpha=-1'],
                               log=lambda line: None)
  assert checkpointing.saved_steps(str(copy)) == steps  # nothing read, nothing moved aside
  with pytest.raises(ConfigError, match='--pretrained: .* holds no complete checkpoint'):
    launch_run.finetune_config('offline', 'Pong', pretrained=str(copy),
                               data_dir=tiny_dataset_dir, log=lambda line: None)


def test_finetune_configs_follow_appendix_b4(pretrained):
  cfg = configs.finetune_offline(PRETRAIN_CFG, 'Alien', pretrained=pretrained,
                                 freeze_encoder=True, data_dir='d')
  assert cfg.games == ('Alien',) and cfg.agent.batch_size == 32
  assert (cfg.agent.learning_rate, cfg.agent.cql_alpha, cfg.agent.loss) == (5e-5, 0.05, 'c51')
  assert cfg.train.num_steps == 300_000 and cfg.data.selection == 'uniform:1'
  assert cfg.agent.frozen_modules == ('encoder',) and cfg.finetune.pretrained == pretrained
  assert cfg.network == PRETRAIN_CFG.network and cfg.data.data_dir == 'd'
  on = configs.finetune_online(PRETRAIN_CFG, 'Breakout', 12, pretrained=None, learning_rate=1e-5)
  assert (on.agent.cql_alpha, on.agent.n_step, on.agent.batch_size, on.agent.v_max) == (
      0.0, 3, 32, 10.0)
  assert on.eval.game_mode == 12 and on.finetune.pretrained is None
  small_on = configs.finetune_online(configs.get_config('cpu_small'), 'Breakout', 12,
                                     pretrained=None)
  assert small_on.agent.policy_params_ema == 0.0  # actors act with the online params
  assert (on.data.shuffle_buffer_per_game, on.data.min_fill_per_game) == (1_000_000, 20_000)
  assert (on.finetune.update_period, on.finetune.epsilon_end) == (4, 0.01)
  assert on.agent.target_update_period == 2000 and on.finetune.epsilon_decay_steps == 250_000
  # The config (with the new sub-config) round-trips through its JSON form.
  assert configs.ExperimentConfig.from_dict(json.loads(on.to_json())) == on


def test_epsilon_schedule_and_pacing():
  cfg = configs.finetune_online(PRETRAIN_CFG, 'Breakout', 12, pretrained=None)
  eps = actors.LinearEpsilon.from_config(cfg)
  assert eps(0) == 1.0 and eps(10**7) == pytest.approx(0.01)
  assert eps(250_000 // 4) == pytest.approx(0.01)
  assert eps(250_000 // 8) == pytest.approx(0.505)
  # Learner: no step before the warm-up, then one per update_period transitions.
  assert finetune.allowed_steps(19_999, cfg) == 0
  assert finetune.allowed_steps(20_000, cfg) == 1 and finetune.allowed_steps(20_400, cfg) == 101
  # The actors' side is the table's (issue 16: tests/test_pacing.py runs it on a real server):
  # inserts may run `slack_steps` gradient steps ahead of the samples.
  pace = reverb_tables.TablePacing(warmup=20_000, update_period=4, batch_size=32, slack_steps=10)
  low, high = pace.error_range()
  assert low == pace.samples_per_insert * 20_000 - 32
  assert high == pace.samples_per_insert * 20_000 + 32 * 10
  # Actors may always run ahead of what lets the learner take its next steps (no deadlock): with
  # the samples of `version` steps drawn, the inserts the table admits allow more steps.
  for version in (0, 7, 1000):
    admitted = int(pace.warmup + (high + 32 * version - pace.samples_per_insert * pace.warmup)
                   // pace.samples_per_insert)
    assert pace.allowed_steps(admitted) > version + 1


def test_online_finetuning_runs_end_to_end_and_survives_a_replay_restart(pretrained,
                                                                         tmp_path):
  """Real Ray + Reverb + emulator (`finetune.run_online`): actors play Breakout mode 12 into
  Reverb, the learner trains from the pretrained encoder, the evaluator reports mode-12 scores.
  Mid-run the replay node is killed (Ray restarts it, empty). Suspected in issue 12, confirmed:
  the new server counts inserts from 0, so the learner's allowance fell to 0 while the actors'
  pacing (their own env steps) stayed used up: neither side moved again. Both now pace from the
  new server's start, and the run reaches its steps. (One program for both: each costs ~40 s of
  the suite.)"""
  import ray
  # 160 steps need 64 + 4 x 160 inserts, and the paced table holds the actor back within
  # `slack_steps` learner steps of the samples (checked below: at the kill, the actor had not yet
  # inserted what the rest of the run needs, so it goes on under the new server's pacing).
  num_steps = 160
  cfg = configs.finetune_online(PRETRAIN_CFG, 'Breakout', 12, pretrained=pretrained,
                                num_steps=num_steps, scale=0.001)
  cfg = cfg.replace(agent=dict(transitions_per_game=8), data=dict(min_fill_per_game=64),
                    eval=dict(steps_per_game=60, eval_every_seconds=1.0))
  initial = transfer.finetune_params(cfg)
  workdir = str(tmp_path / 'online')
  killed_at = []

  def log(line):  # the driver's progress lines: kill the replay once the learner has stepped
    steps = re.search(r'\| learner (\d+)/', line)
    if not killed_at and steps and int(steps.group(1)) >= 2:
      replay, = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a['name'].endswith('_replay')]
      killed_at.append(int(steps.group(1)))
      ray.kill(ray.get_actor(replay['name'], namespace=replay['namespace']), no_restart=False)

  status = finetune.run_online(cfg, workdir, initial, log=log, timeout_s=480,
                               final_eval_timeout_s=120)
  # The allowance at the kill was at most its step + the slack (+ a few steps of the writer's
  # run-ahead and of a status a poll old): short of the end. (The first progress line past step
  # 2 showed 40 on 2 cores: the lines come every 2 s.)
  slack = reverb_tables.TablePacing.from_config(cfg).slack_steps
  assert killed_at and killed_at[0] + slack + 10 < num_steps, (killed_at, slack)
  assert status.learner['steps'] == num_steps and not status.inserters
  # Both sides saw the restarted server, and it came back once.
  assert status.learner['replay_restarts_seen'] >= 1
  actor, = status.actors
  assert actor['replay_restarts_seen'] >= 1 and status.health['replay']['restarts'] == 1
  assert actor['episodes'] >= 1 and actor['items'] >= 64 and actor['epsilon'] < 1.0
  assert actor['items'] <= actor['env_steps']  # (status() reads the items first)
  # Pacing: the learner took no more steps than the transitions allow (1 per 4 after warm-up).
  assert finetune.allowed_steps(actor['items'], cfg) >= num_steps
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'eval', 'evaluator_0.jsonl'))]
  assert {r['game'] for r in rows} == {'Breakout'}
  assert max(r['param_version'] for r in rows) == num_steps
  saved_cfg, params, step = transfer.load_pretrained(workdir)
  assert step == num_steps and saved_cfg.eval.game_mode == 12 and saved_cfg.finetune.pretrained
  # Trained from the transferred encoder: moved away from it, but not a different init.
  encoder_before = _modules(initial, 'encoder')
  encoder_after = _modules(params, 'encoder')
  assert not _equal(encoder_after, encoder_before)
  drift = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree_util.tree_leaves(encoder_after), jax.tree_util.tree_leaves(encoder_before)))
  assert drift < 0.05


def test_offline_finetuning_program_starts_from_the_pretrained_encoder(pretrained,
                                                                         tiny_dataset_dir,
                                                                         tmp_path):
  """`scaled-ql finetune offline` with a frozen encoder on the held-out Pong (real Ray, Reverb,
  TFDS data, evaluator): the final checkpoint's encoder is the checkpoint's, bit for bit."""
  workdir = str(tmp_path / 'offline')
  out = subprocess.run(
      [sys.executable, '-m', 'scaled_ql.cli', 'finetune', 'offline', '--pretrained', pretrained,
       '--game', 'Pong', '--data-dir', tiny_dataset_dir, '--selection', 'near_optimal',
       '--encoder', 'frozen', '--steps', '6', '--set', 'agent.transitions_per_game=8',
       '--eval-steps', '40',
       '--workdir', workdir], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert 'Pong' in out.stdout and 'human-normalized' in out.stdout
  _, ckpt, _ = transfer.load_pretrained(pretrained)
  # The fine-tuning run's online params: its own moving average (it inherits the pretrained
  # run's agent.policy_params_ema) would equal a frozen encoder only up to rounding.
  cfg, params, step = transfer.load_pretrained(workdir, online=True)
  assert step == 6 and cfg.games == ('Pong',) and cfg.agent.frozen_modules == ('encoder',)
  assert cfg.agent.batch_size == 8 and cfg.agent.learning_rate == 5e-5
  assert cfg.overrides[-1] == 'agent.transitions_per_game=8'  # recorded with the checkpoint
  assert _equal(_modules(params, 'encoder'), _modules(ckpt, 'encoder'))
  assert not _equal(_modules(params, 'trunk'), _modules(ckpt, 'trunk'))
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'eval', 'evaluator_0.jsonl'))]
  assert {r['game'] for r in rows} == {'Pong'} and max(r['param_version'] for r in rows) == 6

"""Configs from the command line and from files (issue 14): `--set key.path=value` (typed, unknown
keys with near matches, nested, recorded), `--games` (the heads follow), rerunning a workdir's
config.json, `scaled-ql config show/list` and the field docs they print."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from scaled_ql import cli, configs
from scaled_ql.configs import overrides
from scaled_ql.configs.overrides import ConfigError
from scaled_ql.launch import run

TINY = configs.get_config('cpu_tiny')


@pytest.mark.parametrize('text, path, value', [
    ('agent.cql_alpha=0.1', 'agent.cql_alpha', 0.1),
    ('agent.cql_alpha=1', 'agent.cql_alpha', 1.0),          # an int for a float field
    ('train.num_steps=2.5e5', 'train.num_steps', 250_000),  # whole floats for an int field
    ('train.num_steps=10_000', 'train.num_steps', 10_000),
    ('data.selection=uniform:5', 'data.selection', 'uniform:5'),
    ('data.strict=true', 'data.strict', True),
    ('data.strict=No', 'data.strict', False),
    ('agent.max_grad_norm=10', 'agent.max_grad_norm', 10.0),  # Optional[float]
    ('agent.max_grad_norm=None', 'agent.max_grad_norm', None),
    ('eval.game_mode=12', 'eval.game_mode', 12),             # Optional[int]
    ('network.trunk_hidden_dims=(8, 16)', 'network.trunk_hidden_dims', (8, 16)),
    ('network.trunk_hidden_dims=32', 'network.trunk_hidden_dims', (32,)),
    ('agent.frozen_modules=encoder,trunk', 'agent.frozen_modules', ('encoder', 'trunk')),
    ('agent.frozen_modules=()', 'agent.frozen_modules', ()),
    ('games=Pong, Qbert', 'games', ('Pong', 'Qbert')),
])
def test_set_is_typed_by_the_dataclass_and_recorded(text, path, value):
  cfg = overrides.apply(TINY, [text])
  got = overrides.get(cfg, path)
  assert got == value and type(got) is type(value)  # pylint: disable=unidiomatic-typecheck
  assert cfg.overrides == (text,)
  # Nothing else changed.
  assert dataclasses.replace(cfg, overrides=()) == overrides._set(TINY, path, value)  # pylint: disable=protected-access


@pytest.mark.parametrize('text, message', [
    ('agent.cql_alpha=abc', r"--set agent.cql_alpha=abc: expected float, got 'abc'"),
    ('train.num_steps=1.5', 'expected int'),
    ('data.strict=maybe', 'expected bool'),
    ('network.trunk_hidden_dims=8,x', 'expected int'),
    ('agent.cql_alpa=0.1', r"'agent.cql_alpa' is not a config field; did you mean agent.cql_alpha\?"),
    ('cql_alpha=0.1', 'did you mean agent.cql_alpha'),
    ('data.selecton=uniform:5', 'did you mean data.selection'),
    ('eval.steps=5', 'the fields of eval: .*steps_per_game'),
    ('agent=1', "'agent' is a group of fields; set one of them, e.g. agent.loss"),
    ('overrides=x', 'the record of the others'),
    ('agent.cql_alpha', 'expected key.path=value'),
    ('games=Pong,Pongg', r"unknown game\(s\) \['Pongg'\]"),
])
def test_bad_overrides_name_the_key_and_the_near_matches(text, message):
  with pytest.raises(ConfigError, match=message):
    overrides.apply(TINY, [text])


def test_resolve_config_records_flags_and_overrides_in_order_and_validates():
  cfg = run.resolve_config('cpu_tiny', data_dir='d', steps=7, overrides=[
      'agent.cql_alpha=0.1', 'data.selection=uniform:5', 'network.feature_norm=false'])
  assert (cfg.agent.cql_alpha, cfg.data.selection, cfg.network.feature_norm) == (0.1, 'uniform:5',
                                                                                  False)
  assert (cfg.data.data_dir, cfg.train.num_steps) == ('d', 7)
  assert cfg.overrides == ('data.data_dir=d', 'train.num_steps=7', 'agent.cql_alpha=0.1',
                           'data.selection=uniform:5', 'network.feature_norm=false')
  # --set comes last: it wins over the flag shorthands.
  assert run.resolve_config('cpu_tiny', steps=7, overrides=['train.num_steps=9']).train.num_steps == 9
  # The agent's own checks run on the result.
  with pytest.raises(ConfigError, match='agent.cql_alpha=-1.0 must be >= 0'):
    run.resolve_config('cpu_tiny', overrides=['agent.cql_alpha=-1'])
  with pytest.raises(ConfigError, match='--steps must be >= 1'):
    run.resolve_config('cpu_tiny', steps=0)
  with pytest.raises(ConfigError, match='data.transitions_per_item=3 must divide '
                                        'agent.transitions_per_game=4'):
    run.resolve_config('cpu_tiny', overrides=['data.transitions_per_item=3'])
  with pytest.raises(ConfigError, match=r'data.min_fill_per_game=10 is 3 items of '
                     r'data.transitions_per_item=4 transitions, more than the 2 that '
                     r'data.shuffle_buffer_per_game=10 holds'):
    run.resolve_config('cpu_tiny', overrides=['data.transitions_per_item=4',
                                              'data.shuffle_buffer_per_game=10',
                                              'data.min_fill_per_game=10'])
  # cpu_tiny checkpoints every 10 steps: a kept step must be one of those.
  for keep in ('15', '0'):
    with pytest.raises(ConfigError, match='train.keep_checkpoint_every_steps must be a positive '
                                          r'multiple of train.checkpoint_every_steps \(10\)'):
      run.resolve_config('cpu_tiny', overrides=[f'train.keep_checkpoint_every_steps={keep}'])
  assert run.resolve_config('cpu_tiny', overrides=['train.keep_checkpoint_every_steps=20']
                            ).train.keep_checkpoint_every_steps == 20
  with pytest.raises(ConfigError, match=r'eval.games_at_once must be >= 1 \(or None'):
    run.resolve_config('cpu_tiny', overrides=['eval.games_at_once=0'])
  assert run.resolve_config('cpu_tiny', overrides=['eval.games_at_once=1']
                            ).eval.games_at_once == 1
  # What the evaluator nodes refused only at their first round, after every other node started.
  with pytest.raises(ConfigError, match=r'^eval.game_mode=12: not a mode of Pong \(its modes: '
                                        r'0, 1\)$'):
    run.resolve_config('cpu_tiny', games='Breakout,Pong', overrides=['eval.game_mode=12'])
  assert run.resolve_config('cpu_tiny', games='Breakout', overrides=['eval.game_mode=12']
                            ).eval.game_mode == 12
  for bad, message in (('eval.steps_per_game=0', 'eval.steps_per_game must be >= 1, got 0'),
                       ('eval.max_episode_frames=3', 'eval.max_episode_frames must be >= 4'),
                       ('eval.env_groups=0', 'eval.env_groups must be >= 1'),
                       ('eval.final_steps_per_game=0', 'eval.final_steps_per_game must be >= 1'),
                       ('eval.sticky_action_prob=1.5', r'eval.sticky_action_prob must be in '
                                                       r'\[0, 1\], got 1.5')):
    with pytest.raises(ConfigError, match=message):
      run.resolve_config('cpu_tiny', overrides=[bad])


@pytest.mark.parametrize('bad, message', [
    # Each passed the checks before 2026-12-07 night and failed later, in a node (agent.n_step=0:
    # the replay node's constructor, then the program ended as a crash loop) or not at all.
    ('agent.n_step=0', 'agent.n_step=0 must be >= 1'),
    ('agent.discount=1.5', r'agent.discount=1.5 must be in \[0, 1\]'),
    ('agent.reward_clip=0', 'agent.reward_clip=0.0 must be > 0'),
    ('agent.learning_rate=nan', 'agent.learning_rate is nan'),
    ('agent.cql_alpha=inf', 'agent.cql_alpha=inf must be finite'),
    ('network.resnet_width=0', 'NetworkConfig.resnet_width=0 is invalid'),
    ('train.num_steps=0', 'train.num_steps must be >= 1, got 0'),
    ('train.seed=-1', r'train.seed must be >= 0 \(numpy seeds from it\), got -1'),
    ('train.crash_loop_window_s=nan', 'train.crash_loop_window_s is nan'),
    ('data.samples_per_insert=0', 'data.samples_per_insert must be > 0 and finite, got 0.0'),
    ('data.reverb_chunk_length=0', 'data.reverb_chunk_length must be >= 1, got 0'),
    ('data.prefetch_batches=0', 'data.prefetch_batches must be >= 1, got 0'),
    ('eval.eval_every_steps=0', r'eval.eval_every_steps must be >= 1 \(or None'),
    ('eval.eval_every_seconds=-1', 'eval.eval_every_seconds must be > 0, got -1.0'),
    ('finetune.update_period=0', 'finetune.update_period must be >= 1, got 0'),
    ('finetune.epsilon_end=2', r'finetune.epsilon_end must be in \[0, 1\], got 2.0'),
])
def test_out_of_range_numbers_are_refused_before_anything_starts(bad, message):
  with pytest.raises(ConfigError, match=message):
    run.resolve_config('cpu_tiny', overrides=[bad])


def test_the_edges_of_the_ranges_are_accepted():
  for ok in ('agent.discount=0', 'agent.discount=1', 'agent.reward_clip=inf', 'train.seed=0',
             'eval.eval_every_seconds=inf', 'finetune.epsilon_decay_steps=0',
             'agent.cql_alpha=0'):
    run.resolve_config('cpu_tiny', overrides=[ok])


def test_games_flag_sets_any_games_and_the_heads_follow():
  cfg = run.resolve_config('cpu_tiny', games='Pong,Qbert,Seaquest')
  assert cfg.games == ('Pong', 'Qbert', 'Seaquest') and cfg.overrides == (
      'games=Pong,Qbert,Seaquest',)
  import jax
  import jax.numpy as jnp
  from scaled_ql import games as games_lib
  from scaled_ql.agents import builder
  nets = builder.agent_networks(cfg)  # what the learner builds from the config
  params = jax.eval_shape(nets.q.init, jax.random.PRNGKey(0),  # shapes only: nothing compiles
                          jnp.zeros((1, 84, 84, 4), jnp.uint8), jnp.zeros((1,), jnp.int32))
  heads = {k.split('/', 1)[1]: v['b'].shape[0] for k, v in params.items()
           if k.startswith('heads/')}
  assert heads == {g: games_lib.num_actions(g) * cfg.agent.num_atoms for g in cfg.games}
  # A paper config with 4 evaluators and 4 inserters on 2 games: both follow the games, recorded.
  paper = run.resolve_config('atari6_suboptimal_resnet34', games='Pong,Breakout')
  assert (paper.eval.num_evaluators, paper.data.num_inserters) == (2, 2)
  assert paper.overrides == ('games=Pong,Breakout', 'eval.num_evaluators=2',
                             'data.num_inserters=2')
  with pytest.raises(ConfigError, match=r"--games Pong,Pongg: unknown game\(s\) \['Pongg'\]"):
    run.resolve_config('cpu_tiny', games='Pong,Pongg')
  with pytest.raises(ConfigError, match='duplicate'):
    run.resolve_config('cpu_tiny', games='Pong,Pong')


def test_config_json_reruns_exactly_what_a_workdir_ran(tmp_path):
  cfg = run.resolve_config('cpu_tiny', data_dir='d', games='Pong,Qbert',
                           overrides=['agent.cql_alpha=0.1', 'network.trunk_hidden_dims=8,8'])
  workdir = str(tmp_path / 'w')
  run.prepare_workdir(cfg, workdir, log=lambda line: None)
  for where in (os.path.join(workdir, 'config.json'), workdir):
    again = run.resolve_config(where)
    assert again == cfg  # every field, the overrides included
  # Further overrides on a rerun append to the record.
  more = run.resolve_config(workdir, overrides=['train.seed=3'])
  assert more.overrides == cfg.overrides + ('train.seed=3',) and more.train.seed == 3


def test_config_json_is_read_strictly(tmp_path):
  good = json.loads(TINY.to_json())
  for change, message in [
      (lambda d: d['agent'].update(cql_alpa=0.1), "'agent.cql_alpa' is not a config field; did "
                                                  'you mean agent.cql_alpha'),
      (lambda d: d['agent'].update(cql_alpha='0.1'), "agent.cql_alpha: expected float, got '0.1'"),
      (lambda d: d.update(gamez=['Pong']), "'gamez' is not a config field; did you mean games"),
      (lambda d: d.pop('games'), 'missing games'),
      (lambda d: d['network'].update(trunk_hidden_dims=3), 'expected a list of int'),
  ]:
    d = json.loads(json.dumps(good))
    change(d)
    path = tmp_path / 'config.json'
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=message):
      run.resolve_config(str(path))
  (tmp_path / 'bad.json').write_text('{"name": ')
  with pytest.raises(ConfigError, match='cannot read it as JSON'):
    run.resolve_config(str(tmp_path / 'bad.json'))
  with pytest.raises(ConfigError, match='no such file'):
    run.resolve_config(str(tmp_path / 'none.json'))


def test_every_field_has_a_doc():
  missing = [path for path in overrides.fields() if not overrides.field_doc(path)]
  assert not missing, f'fields without a comment in configs/base.py: {missing}'
  assert 'Table B.1' in overrides.field_doc('agent.cql_alpha')
  assert overrides.paper_references(overrides.field_doc('agent.v_min')) == ['Appendix B.2']


def test_config_show_and_list(capsys):
  assert cli.main(['config', 'show', 'cpu_tiny', '--set', 'agent.cql_alpha=0.1',
                   '--games', 'Pong,Qbert']) == 0
  out = capsys.readouterr().out
  assert out.startswith('config cpu_tiny  (overrides: games=Pong,Qbert agent.cql_alpha=0.1)')
  lines = out.splitlines()
  i = lines.index('  agent.cql_alpha = 0.1')
  assert lines[i + 1].strip().startswith('0.05 for C51, 0.1 for MSE (Table B.1)')
  assert lines[i + 2].strip() == 'paper: Table B.1'
  assert "  games = ('Pong', 'Qbert')" in lines
  assert any(line.startswith('[agent] The loss and optimizer') for line in lines)
  assert cli.main(['config', 'show', 'cpu_tiny', '--json', '--set', 'train.seed=4']) == 0
  shown = configs.ExperimentConfig.from_dict(json.loads(capsys.readouterr().out))
  assert shown.train.seed == 4 and shown.overrides == ('train.seed=4',)
  assert cli.main(['config', 'show', 'cpu_tiny', '--set', 'agent.nope=1']) == 2
  assert "'agent.nope' is not a config field" in capsys.readouterr().err
  assert cli.main(['config', 'list']) == 0
  out = capsys.readouterr().out
  assert 'atari40_suboptimal_resnet101' in out.splitlines() and '_no_cql' in out


def test_finetune_values_of_appendix_b4_live_in_one_place():
  cfg = configs.finetune_offline(TINY, 'Alien', pretrained=None)
  b4 = configs.FINETUNE_OFFLINE
  assert (cfg.agent.batch_size, cfg.agent.cql_alpha, cfg.agent.learning_rate,
          cfg.train.num_steps, cfg.data.selection) == (
              b4['batch_size'], b4['cql_alpha'], b4['learning_rate'], b4['num_steps'],
              b4['selection'])
  on = configs.finetune_online(TINY, 'Breakout', 12, pretrained=None)
  assert (on.agent.n_step, on.agent.learning_rate) == (configs.FINETUNE_ONLINE['n_step'],
                                                      configs.FINETUNE_ONLINE['learning_rate'])
  # The command line's help shows those values and has no copies of its own.
  parser = cli.build_parser()
  sub = next(a for a in parser._actions if a.dest == 'command').choices['finetune']  # pylint: disable=protected-access
  assert f"{b4['num_steps']:,} steps" in sub.description and 'lr 5e-05' in sub.description
  offline = next(a for a in sub._actions if a.dest == 'finetune_command').choices['offline']  # pylint: disable=protected-access
  defaults = {a.dest: a.default for a in offline._actions}  # pylint: disable=protected-access
  assert defaults['selection'] is None and 'cql_alpha' not in defaults


def test_rerunning_an_offline_finetuning_config_starts_from_its_pretrained_encoder(tmp_path):
  """`train --config FT/config.json` of an offline fine-tuning workdir starts where `finetune
  offline` started: the checkpoint's encoder, a fresh trunk and heads (the same params)."""
  import sys
  import numpy as np
  sys.path.insert(0, os.path.dirname(__file__))
  from test_learner import make  # pylint: disable=import-outside-toplevel  (a cpu_tiny Learner)
  from scaled_ql.agents import transfer
  pretrained = str(tmp_path / 'pretrained')
  learner = make(TINY, workdir=pretrained, handle_signals=False)
  learner.step()
  learner.save()
  learner.close()
  cfg = configs.finetune_offline(TINY, 'Qbert', pretrained=pretrained)
  workdir = str(tmp_path / 'ft')
  run.prepare_workdir(cfg, workdir, log=lambda line: None)
  rerun = run.resolve_config(workdir)
  assert rerun == cfg and rerun.finetune.pretrained == pretrained
  init = run.initial_params(rerun)
  want = transfer.finetune_params(cfg, pretrained)  # what `finetune offline` starts from
  assert init.keys() == want.keys()
  assert all(np.array_equal(init[m][k], want[m][k]) for m in init for k in init[m])
  _, ckpt, _ = transfer.load_pretrained(pretrained)
  encoder = [m for m in init if m.startswith('encoder')]
  assert encoder and all(np.array_equal(init[m][k], ckpt[m][k]) for m in encoder for k in init[m])
  assert run.initial_params(TINY) is None
  online = configs.finetune_online(TINY, 'Breakout', 12, pretrained=None)
  with pytest.raises(ConfigError, match='online fine-tuning run.*scaled-ql finetune online'):
    run.initial_params(online)

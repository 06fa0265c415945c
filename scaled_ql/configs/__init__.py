"""Named experiment configs: the paper's settings and CPU-sized ones.

    from scaled_ql import configs
    cfg = configs.get_config('atari40_suboptimal_resnet101')
    configs.list_configs()

Names are `{games}_{data}_{network}` for the paper's settings (Appendix B, Table B.1), optionally
followed by a baseline/ablation variant suffix (see `VARIANTS`), e.g.
`atari6_suboptimal_resnet50_no_feature_norm`. CPU configs: `cpu_small` (the `make demo` default),
`cpu_tiny` (tests), with the same variant suffixes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from scaled_ql import games as games_lib
from scaled_ql.configs.base import (AgentConfig, DataConfig, EvalConfig, ExperimentConfig,
                                    FinetuneConfig, NetworkConfig, TrainConfig)
from scaled_ql.configs.overrides import ConfigError

__all__ = ['AgentConfig', 'DataConfig', 'EvalConfig', 'ExperimentConfig', 'FinetuneConfig',
           'NetworkConfig', 'TrainConfig', 'finetune_offline', 'finetune_online', 'get_config',
           'list_configs', 'ConfigError', 'UnknownConfigError', 'NETWORKS', 'VARIANTS']


class UnknownConfigError(ConfigError):
  pass


# Networks of Figure 6 / Appendix B.1 (ResNets with GroupNorm + spatial embedding) and the IMPALA
# family (Espeholt et al. 2018; Lee et al. 2022 scale its width).
NETWORKS: dict[str, NetworkConfig] = {
    'resnet18': NetworkConfig(resnet_stage_sizes=(2, 2, 2, 2), resnet_block='basic'),
    'resnet34': NetworkConfig(resnet_stage_sizes=(3, 4, 6, 3), resnet_block='basic'),
    'resnet50': NetworkConfig(resnet_stage_sizes=(3, 4, 6, 3), resnet_block='bottleneck'),
    'resnet101': NetworkConfig(resnet_stage_sizes=(3, 4, 23, 3), resnet_block='bottleneck'),
    'resnet152': NetworkConfig(resnet_stage_sizes=(3, 8, 36, 3), resnet_block='bottleneck'),
    'impala_w1': NetworkConfig(encoder='impala', impala_width=1),
    'impala_w2': NetworkConfig(encoder='impala', impala_width=2),
    'impala_w4': NetworkConfig(encoder='impala', impala_width=4),
    # Section 5.1 quotes IMPALA "widths (4, 8, 16)" from Lee et al. (2022); width 4 = channels
    # (64, 128, 128), the MT Impala-DQN of Appendix B.5. Sized here for `describe`/benchmarks.
    'impala_w8': NetworkConfig(encoder='impala', impala_width=8),
    'impala_w16': NetworkConfig(encoder='impala', impala_width=16),
    # CPU-sized networks of the same design (GroupNorm ResNet + spatial embedding + trunk + feature
    # norm + per-game heads). cpu_small: a 12x12/12 patchify stem (84 -> 7x7, the final map size
    # of the Nature DQN) and one basic block at 32 channels, a 256 + 3x128 trunk. It was 96
    # channels and 512 + 3x256: on in-memory 4-game BC at 64 transitions per game the narrow one
    # imitates as well per step (held-out Breakout 0.59 at step 1500, 0.62 at 2500; the wide one
    # 0.63 at 3500; Boxing 0.72 both) at 2.5x the steps/s (12.2 vs 4.9 at batch 256;
    # docs/learning.md 3b), and on 2 cores steps are what the recipe lacks.
    # Two measured deviations make it learn at a CPU budget (docs/learning.md, "why the CPU
    # network could not imitate"): per-frame input standardization (with x / 255 no network here,
    # not even a plain Nature CNN, fits 256 Pong frames in 500 steps) and NO feature normalization
    # (with it, Pong BC stays at the majority action for 1500+ single-game steps; without it,
    # 0.67 held-out accuracy at 1000). The `feature_norm` variant puts it back.
    'resnet_cpu_small': NetworkConfig(
        resnet_stage_sizes=(1,), resnet_block='basic', resnet_width=32, stem='strided',
        stem_patch=12, trunk_first_dim=256, trunk_hidden_dims=(128, 128, 128),
        input_norm='standardize', feature_norm=False),
    # cpu_tiny (tests): the same 12x12/12 stem (7x7 -> 4x4 over two stages); 8-channel convs at
    # 21x21 (stem_patch=4) made its learner update ~3x slower.
    'resnet_cpu_tiny': NetworkConfig(
        resnet_stage_sizes=(1, 1), resnet_block='basic', resnet_width=8, stem='strided',
        stem_patch=12, spatial_embedding_features=2, trunk_first_dim=32,
        trunk_hidden_dims=(16, 16, 16)),
}

# Baselines and ablations of the paper, as changes to a config (Section 5.3, Appendix A).
VARIANTS: dict[str, Callable[[ExperimentConfig], ExperimentConfig]] = {
    'bc': lambda c: c.replace(agent=dict(loss='bc', cql_alpha=0.0)),
    'bcq': lambda c: c.replace(agent=dict(loss='bcq', cql_alpha=0.0)),
    'no_cql': lambda c: c.replace(agent=dict(cql_alpha=0.0)),
    'mse': lambda c: c.replace(agent=dict(loss='mse', cql_alpha=0.1)),
    'no_feature_norm': lambda c: c.replace(network=dict(feature_norm=False)),
    # For cpu_small, whose network runs without feature norm (see NETWORKS): the paper's setting.
    'feature_norm': lambda c: c.replace(network=dict(feature_norm=True)),
    'mean_pool': lambda c: c.replace(network=dict(spatial_embedding=False)),
}

_GAME_SETS = {
    'atari40': games_lib.TRAINING_GAMES_40,
    'atari6': games_lib.ABLATION_GAMES_6,
}
_DATA = {'suboptimal': 'suboptimal', 'nearoptimal': 'near_optimal'}
# Figure 6 compares IMPALA-CNNs of widths 4, 8, 16 (Lee et al. 2022); w1/w2 are smaller extras.
_PAPER_NETWORKS = ('resnet34', 'resnet50', 'resnet101', 'resnet152', 'impala_w1', 'impala_w2',
                   'impala_w4', 'impala_w8', 'impala_w16')

CPU_SMALL_GAMES = ('Breakout', 'Boxing', 'Freeway', 'Pong')


# One training "iteration" of the paper: 62.5k gradient steps (Table B.1: "Training environment
# steps per iteration 62.5k", "Update period every 1 environment steps"). Paper configs evaluate
# once per iteration (EvalConfig.eval_every_steps), as the paper's learning curves do.
ITERATION_STEPS = 62_500


def paper_num_steps(game_set: str, data: str, variant: str | None = None) -> int:
  """Gradient steps of the paper's experiment for a config (docs/paper_fidelity.md, item 1).

  - atari40 (main results, Table 1, A.3, Table A.3): 10M steps ("We trained our ResNet 101 network
    for 10M gradient steps", Appendix B.3) = 160 iterations.
  - atari6 + near-optimal data (the six-game runs of Appendix A.4, Table A.2: no pessimism "on the
    entire DQN-replay dataset", and their CQL arm): "100 epochs = 6.25M gradient steps".
  - atari6 + bcq (Appendix A.2, Figure A.3): "after 100 epochs = 6.25M gradient steps", on either
    data (the text does not name its data; the CQL numbers beside it match Table A.2's arm on the
    entire data, so `atari6_nearoptimal_resnet{34,50}_bcq` is the paper's run).
  - atari6 + sub-optimal data otherwise (Table 2, feature normalization, "initial 20% data"): half
    as long, 50 iterations = 3.125M ("100 epochs (2x longer training compared to other ablations in
    Table 2)", Table A.2 caption; "2x longer training than other ablations in Table 2", Fig. A.3).
  """
  if game_set == 'atari40':
    return 10_000_000
  if game_set == 'atari6':
    if data == 'nearoptimal' or variant == 'bcq':
      return 100 * ITERATION_STEPS
    return 50 * ITERATION_STEPS
  raise UnknownConfigError(f'unknown game set {game_set!r}; known: {sorted(_GAME_SETS)}')


def _paper_config(game_set: str, data: str, network: str) -> ExperimentConfig:
  return ExperimentConfig(
      name=f'{game_set}_{data}_{network}',
      games=_GAME_SETS[game_set],
      network=NETWORKS[network],
      agent=AgentConfig(),
      data=DataConfig(data_dir='gs://rl_unplugged/tensorflow_datasets', selection=_DATA[data],
                      shuffle_buffer_per_game=100_000, min_fill_per_game=10_000,
                      num_inserters=4, prefetch_batches=4),
      eval=EvalConfig(num_evaluators=4, num_envs=8, eval_every_steps=ITERATION_STEPS),
      train=TrainConfig(num_steps=paper_num_steps(game_set, data), log_every_steps=1000,
                        checkpoint_every_steps=20_000, publish_every_steps=1000),
  )


def _cpu_small() -> ExperimentConfig:
  return ExperimentConfig(
      name='cpu_small',
      games=CPU_SMALL_GAMES,
      network=NETWORKS['resnet_cpu_small'],
      # Batch 64 x 4 = 256: 64 transitions per game and step. At 16 per game (batch 64) Pong and
      # Breakout BC stayed at their action priors for 7000 steps; at 64 all four games act on
      # the pixels by step 3500 (docs/learning.md 3b, cause 3). The CPU recipe
      # (docs/learning.md, issue 11): lr 1e-3, not the paper's 2e-4 (with unit-norm features a
      # C51 head sharpens ~lr*sqrt(D) per step, and D=256 here, 1024 there, with a few thousand
      # steps instead of 10M); support [-10, 10]: the
      # discounted clipped MC returns of the generated data lie in [-5, 7.5] (99% in [-2.9, 5.5]),
      # [-20, 20] gave that range ~16 of the 51 atoms, [-10, 10] ~32; a target refresh every 200
      # steps so that a few-thousand-step run gets tens of refreshes, not a handful.
      # Adam epsilon 1e-8 (optax's default), not Dopamine's 3.125e-4: the encoder's gradients
      # (RMS ~5e-4 at init) are of the order of 3.125e-4, which damps them; single-game Pong BC
      # left the majority action by step 1000 with 1e-8, by 1500 with 3.125e-4.
      # Actors and evaluators use a moving average of the online params (decay 0.998, ~500
      # steps; not in the paper): the online params' Boxing score swung by hundreds of percent
      # between evaluations. Evaluated on the same final checkpoints of 4 demo runs, the average
      # scored above the online params on Boxing and on the IQM in 3 of the 4 (Boxing 36.0 /
      # -5.0 / 33.7 / -2.0 vs 15.0 / -8.7 / 11.3 / 4.3; docs/learning.md, "2026-12-01
      # afternoon").
      agent=AgentConfig(games_per_batch=64, transitions_per_game=4, target_update_period=200,
                        learning_rate=1e-3, v_min=-10.0, v_max=10.0, adam_eps=1e-8,
                        policy_params_ema=0.998),
      # Items of 4 consecutive transitions: a game draw (4 transitions) is one Reverb sample, so
      # the sampler costs ~1/3 of the CPU per transition (benchmarks/sample_cost.py) and the
      # learner in the program runs 0.81-0.84x alone instead of 0.76x; BC imitation per step was
      # no worse (docs/history/performance_log.md, "Items of several transitions"). Paper
      # configs: 1.
      # Four batches per fetch: the data path's work beside the learner comes in fewer, longer
      # bursts. Fed / alone in one process 0.915 vs 0.896 and 0.932 vs 0.905; in the program
      # 0.85, 0.88 vs 0.87, 0.83 (2026-12-04 late evening; docs/history/performance_log.md,
      # "Several batches per fetch"): a small gain, inside the program's run-to-run spread, for
      # ~9% more sampler CPU per transition when the sampler runs flat out (25.5 vs 23.4 CPU-us).
      data=DataConfig(data_dir='data/generated', shuffle_buffer_per_game=20_000,
                      min_fill_per_game=1_000, transitions_per_item=4, batches_per_fetch=4),
      # One environment: Dopamine's exact loop. Every started episode is played out (up to 27K
      # steps when a policy stalls, e.g. Breakout without FIRE), so each extra environment adds
      # up to one more such episode per round (docs/evaluation.md: 94K steps with 4 envs).
      # The final evaluation's 4500 steps start >= 3 whole episodes of each game (Freeway's last
      # ~2040 steps, a Boxing bout at most ~1800): the demo's score is a mean over >= 3.
      # A curve point a minute: the evaluator shares the learner's 2 cores (and runs niced).
      eval=EvalConfig(steps_per_game=2_000, final_steps_per_game=4_500, num_envs=1,
                      num_evaluators=1, eval_every_seconds=60.0),
      # No device prefetch: on 2 CPU cores the next batch's host work beside the step only
      # competes with it (0.97x and 0.99x steps/s in two interleaved A/Bs, 2026-12-04 evening;
      # docs/history/performance_log.md, "Device prefetch"). XLA's classic CPU runtime: the
      # update 11-15% faster (the network has no strided convolution; "XLA's classic CPU
      # runtime" there).
      train=TrainConfig(num_steps=5_000, log_every_steps=100, checkpoint_every_steps=1_000,
                        publish_every_steps=100, device_prefetch=False,
                        xla_cpu_use_thunk_runtime=False),
  )


def _cpu_tiny() -> ExperimentConfig:
  return ExperimentConfig(
      name='cpu_tiny',
      games=('Breakout', 'Pong'),
      network=NETWORKS['resnet_cpu_tiny'],
      agent=AgentConfig(games_per_batch=2, transitions_per_game=4, target_update_period=10),
      data=DataConfig(data_dir='data/tiny', shuffle_buffer_per_game=500, min_fill_per_game=20,
                      prefetch_batches=1),
      # Tests: episodes are played out, so the cap bounds a round (2 games x 2 envs x 200 steps).
      eval=EvalConfig(steps_per_game=100, num_envs=2, num_evaluators=1,
                      eval_every_seconds=1.0, max_episode_frames=800),
      train=TrainConfig(num_steps=20, log_every_steps=5, checkpoint_every_steps=10,
                        publish_every_steps=5),
  )


def _base_configs() -> dict[str, Callable[[], ExperimentConfig]]:
  out: dict[str, Callable[[], ExperimentConfig]] = {}
  for game_set in _GAME_SETS:
    for data in _DATA:
      for network in _PAPER_NETWORKS:
        out[f'{game_set}_{data}_{network}'] = (
            lambda g=game_set, d=data, n=network: _paper_config(g, d, n))
  out['cpu_small'] = _cpu_small
  out['cpu_tiny'] = _cpu_tiny
  return out


_BASE = _base_configs()


def list_configs(with_variants: bool = False) -> list[str]:
  names = sorted(_BASE)
  if with_variants:
    names += sorted(f'{n}_{v}' for n in _BASE for v in VARIANTS)
  return names


def get_config(name: str) -> ExperimentConfig:
  """Returns the named config; raises `UnknownConfigError` listing the valid names."""
  if name in _BASE:
    return _BASE[name]()
  for variant, apply in VARIANTS.items():
    suffix = '_' + variant
    if name.endswith(suffix) and name[:-len(suffix)] in _BASE:
      base = name[:-len(suffix)]
      cfg = apply(_BASE[base]())
      game_set, data = base.split('_')[:2]
      if game_set in _GAME_SETS:  # a paper config: its experiment's length (paper_num_steps)
        cfg = cfg.replace(train=dict(num_steps=paper_num_steps(game_set, data, variant)))
      return dataclasses.replace(cfg, name=name)
  raise UnknownConfigError(
      f'unknown config {name!r}. Valid configs: {", ".join(list_configs())}; each may take a '
      f'variant suffix: {", ".join("_" + v for v in VARIANTS)}')


# ------------------------------------------------------------------------------------ transfer
# Section 5.2 / Appendix B.4. Both derive the fine-tuning run from the pre-training config `base`
# (the checkpoint's, so that the encoder fits): same network, one game, batch 32.

# Appendix B.4, written here only (`finetune_offline` and `scaled-ql finetune --help` read it; a
# run changes any of it with --set). Offline: "a batch size of 32", "α = 0.05", "the default
# learning rate of 5e-05", "the end of 300k gradient steps"; the data: 1% of the game's DQN-Replay
# run, spread over all of it (Section 5.2). Online: the C51 of DOPAMINE_C51 with n-step 3 and a
# learning rate from the paper's sweep {1e-05, 5e-05}.
FINETUNE_OFFLINE = dict(batch_size=32, cql_alpha=0.05, learning_rate=5e-5, num_steps=300_000,
                        selection='uniform:1')
FINETUNE_ONLINE = dict(n_step=3, learning_rate=5e-5)


def finetune_offline(base: ExperimentConfig, game: str, *, pretrained: str | None,
                     freeze_encoder: bool = False, data_dir: str | None = None
                     ) -> ExperimentConfig:
  """Offline fine-tuning to a new game with FINETUNE_OFFLINE (Appendix B.4); otherwise the
  pre-training hyperparameters (loss, atoms, target update period, replay sizes).
  `pretrained=None`: the same run from scratch."""
  games_lib.check_games([game], 'fine-tuning game')
  b4 = FINETUNE_OFFLINE
  suffix = 'scratch' if pretrained is None else ('frozen' if freeze_encoder else 'pretrained')
  return base.replace(
      name=f'finetune_offline_{game}_{suffix}', games=(game,),
      agent=dict(loss='c51', cql_alpha=b4['cql_alpha'], learning_rate=b4['learning_rate'],
                 games_per_batch=1, transitions_per_game=b4['batch_size'],
                 frozen_modules=('encoder',) if freeze_encoder else ()),
      data=dict(selection=b4['selection'], num_inserters=1,
                **({} if data_dir is None else dict(data_dir=data_dir))),
      eval=dict(num_evaluators=1, game_mode=None),
      train=dict(num_steps=b4['num_steps']),
      finetune=FinetuneConfig(pretrained=pretrained))


# Dopamine's C51 (dopamine/agents/rainbow/configs/c51.gin, Castro et al. 2018) with n-step 3
# (Appendix B.4). Dopamine counts target_update_period in environment steps (8000 = 2000 gradient
# steps at update_period 4); ours counts gradient steps.
DOPAMINE_C51 = dict(batch_size=32, v_max=10.0, adam_eps=0.0003125, target_update_period=2000,
                    replay_capacity=1_000_000, min_replay_history=20_000, update_period=4,
                    epsilon_train=0.01, epsilon_decay_period=250_000)


# Online fine-tuning budget (Section 5.2): "We fine-tune all methods except single-game DQN for 3M
# online frames" (Figure 8 caption); Figure A.1's axes are "Frames (in Millions)" 1..3, and its
# caption puts the 50M-frame DQN at "16x more data than our methods" (50M / 16 = 3.1M frames).
# Only Section 5.2's "50M steps, 16x more transitions" says steps; the ratio fits frames as well.
# Default: 3M frames = 750k agent steps (frame skip 4) = 187.5k gradient steps (update period 4).
# The other reading, 3M agent steps, is `online_frames=12_000_000` (750k gradient steps).
ONLINE_FINETUNE_FRAMES = 3_000_000
FRAME_SKIP = 4  # emulator frames per agent step (Table B.1)
# Online fine-tuning: the most environment steps the actors' params may lag the learner's (in
# publishes; docs/paper_fidelity.md, section 2).
ONLINE_PUBLISH_ENV_STEPS = 1000


def finetune_online(base: ExperimentConfig, game: str, mode: int | None, *,
                    pretrained: str | None, num_steps: int | None = None,
                    online_frames: int = ONLINE_FINETUNE_FRAMES,
                    learning_rate: float | None = None, freeze_encoder: bool = False,
                    scale: float = 1.0) -> ExperimentConfig:
  """Online C51 fine-tuning in a new game mode (Section 5.2, Appendix B.4): DOPAMINE_C51 with
  FINETUNE_ONLINE (`learning_rate` None: its learning rate).

  Length: `online_frames` emulator frames (default the paper's 3M; see ONLINE_FINETUNE_FRAMES for
  the other reading, 12M) = online_frames / 4 agent steps = online_frames / 16 gradient steps at
  Dopamine's update period 4; `num_steps` (gradient steps) overrides it.
  `scale` < 1 shrinks the replay capacity, warm-up, epsilon decay and target update period for
  CPU runs (documented in BUILD_NOTES.md, transfer section); 1.0 is Dopamine's C51.
  """
  games_lib.check_games([game], 'fine-tuning game')
  if not 0 < scale <= 1:
    raise ValueError(f'scale={scale} must be in (0, 1]')
  c = DOPAMINE_C51
  if num_steps is None:
    if online_frames < FRAME_SKIP * c['update_period']:
      raise ConfigError(f'online_frames={online_frames} is less than one gradient step '
                        f'({FRAME_SKIP * c["update_period"]} frames)')
    num_steps = online_frames // (FRAME_SKIP * c['update_period'])
  sized = lambda n, low=1: max(low, int(round(n * scale)))
  suffix = 'scratch' if pretrained is None else 'pretrained'
  mode_name = 'default' if mode is None else f'm{mode}'
  return base.replace(
      name=f'finetune_online_{game}_{mode_name}_{suffix}', games=(game,),
      agent=dict(loss='c51', cql_alpha=0.0, n_step=FINETUNE_ONLINE['n_step'],
                 learning_rate=(FINETUNE_ONLINE['learning_rate'] if learning_rate is None
                                else learning_rate),
                 adam_eps=c['adam_eps'], v_min=-c['v_max'], v_max=c['v_max'],
                 games_per_batch=1, transitions_per_game=c['batch_size'],
                 target_update_period=sized(c['target_update_period']),
                 frozen_modules=('encoder',) if freeze_encoder else (),
                 # The actors act with the online params, as Dopamine's agent does (a moving
                 # average of the pre-training config would lag the policy that collects data).
                 policy_params_ema=0.0),
      data=dict(shuffle_buffer_per_game=sized(c['replay_capacity'], 100),
                min_fill_per_game=sized(c['min_replay_history'], c['batch_size']),
                # Dopamine's i.i.d. replay, paced one batch per gradient step
                num_inserters=1, transitions_per_item=1, batches_per_fetch=1),
      eval=dict(num_evaluators=1, game_mode=mode),
      # No device prefetch: with the table paced, taking batch k+1 during step k would hold
      # step k's metrics and publish back until the actors' next inserts allow that batch.
      # Dopamine's agent acts with its online network at every step; our actors act with the
      # newest published params, so they are published at least every 1000 environment steps
      # (250 learner steps; the paper configs' 1000 would be 4000 environment steps behind).
      train=dict(num_steps=num_steps, device_prefetch=False,
                 publish_every_steps=min(base.train.publish_every_steps,
                                         ONLINE_PUBLISH_ENV_STEPS // c['update_period'])),
      finetune=FinetuneConfig(pretrained=pretrained, update_period=c['update_period'],
                              epsilon_end=c['epsilon_train'],
                              epsilon_decay_steps=sized(c['epsilon_decay_period'])))

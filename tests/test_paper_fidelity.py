"""Paper fidelity (issue 15): experiment lengths, online fine-tuning budget, evaluation cadence."""
import pytest

from scaled_ql import configs
from scaled_ql.launch.nodes import eval_due


@pytest.mark.parametrize('name, steps', [
    # Main 40-game runs: 10M gradient steps (Appendix B.3).
    ('atari40_suboptimal_resnet101', 10_000_000),
    ('atari40_nearoptimal_resnet50_mse', 10_000_000),
    # Table 2 (feature normalization, six games, initial 20% data): 50 iterations.
    ('atari6_suboptimal_resnet34', 3_125_000),
    ('atari6_suboptimal_resnet101_no_feature_norm', 3_125_000),
    # Table A.2 (no pessimism on the entire six-game data, and its CQL arm): 100 iterations.
    ('atari6_nearoptimal_resnet50_no_cql', 6_250_000),
    ('atari6_nearoptimal_resnet50', 6_250_000),
    # Figure A.3 (discrete BCQ): 100 epochs = 6.25M gradient steps.
    ('atari6_nearoptimal_resnet34_bcq', 6_250_000),
    ('atari6_suboptimal_resnet50_bcq', 6_250_000),
])
def test_paper_configs_train_for_their_experiments_length(name, steps):
  cfg = configs.get_config(name)
  assert cfg.train.num_steps == steps
  assert cfg.train.num_steps % configs.ITERATION_STEPS == 0
  assert cfg.eval.eval_every_steps == configs.ITERATION_STEPS == 62_500


def test_ablation_data_follows_the_name():
  assert configs.get_config('atari6_nearoptimal_resnet50_no_cql').data.selection == 'near_optimal'
  assert configs.get_config('atari6_suboptimal_resnet50_no_feature_norm').data.selection == \
      'suboptimal'
  assert configs.get_config('atari6_suboptimal_resnet50').games == (
      'Asterix', 'Breakout', 'Pong', 'Qbert', 'Seaquest', 'SpaceInvaders')


def test_cpu_configs_keep_a_time_cadence_and_their_length():
  for name in ('cpu_small', 'cpu_tiny', 'cpu_small_bcq'):
    cfg = configs.get_config(name)
    assert cfg.eval.eval_every_steps is None and cfg.eval.eval_every_seconds > 0
  assert configs.get_config('cpu_small_no_cql').train.num_steps == \
      configs.get_config('cpu_small').train.num_steps


def test_online_finetuning_length_is_3m_frames_by_default():
  base = configs.get_config('cpu_small')
  cfg = configs.finetune_online(base, 'Breakout', 12, pretrained=None)
  # 3M frames = 750k agent steps = 187.5k gradient steps at update period 4.
  assert cfg.train.num_steps * cfg.finetune.update_period * configs.FRAME_SKIP == 3_000_000
  other = configs.finetune_online(base, 'Breakout', 12, pretrained=None, online_frames=12_000_000)
  assert other.train.num_steps == 750_000  # the "3M agent steps" reading
  assert configs.finetune_online(base, 'Breakout', 12, pretrained=None,
                                 num_steps=7).train.num_steps == 7
  with pytest.raises(configs.ConfigError, match='online_frames'):
    configs.finetune_online(base, 'Breakout', 12, pretrained=None, online_frames=8)


def test_online_finetuning_publishes_params_at_least_every_1000_environment_steps():
  """Dopamine acts with its online network; ours with the newest published params: every 250
  learner steps (1000 environment steps at update period 4) from a paper config, whose own
  cadence is 1000 learner steps; a base that publishes more often keeps its cadence."""
  paper = configs.get_config('atari40_suboptimal_resnet101')
  assert paper.train.publish_every_steps == 1000
  cfg = configs.finetune_online(paper, 'Breakout', 12, pretrained=None)
  assert cfg.train.publish_every_steps * cfg.finetune.update_period == 1000
  small = configs.get_config('cpu_small')
  assert configs.finetune_online(small, 'Breakout', 12, pretrained=None).train \
      .publish_every_steps == small.train.publish_every_steps == 100


def test_step_cadence_evaluates_once_per_iteration():
  every = 62_500
  published = range(0, 300_001, 1000)  # the learner publishes every 1000 steps ...
  published = sorted(set(published) | set(range(0, 300_001, every)))  # ... and at iterations
  evaluated, last = [], -1
  for version in published:
    if eval_due(version, last, every):
      evaluated.append(version)
      last = version
  assert evaluated == [0, 62_500, 125_000, 187_500, 250_000]
  # A slow evaluator that sees only some versions still evaluates once per new iteration.
  assert eval_due(130_000, 62_500, every) and not eval_due(124_000, 62_500, every)
  # Time cadence: any newer version; after wake(): the final params, off the step grid.
  assert eval_due(1001, 1000, None) and not eval_due(1000, 1000, None)
  assert eval_due(300_001, 250_000, every, woken=True)

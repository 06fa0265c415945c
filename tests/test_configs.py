"""Named configs: the paper's settings, CPU sizes, variants, JSON round trip, bad names."""
import pytest

from scaled_ql import configs


def test_paper_setting_matches_table_b1():
  cfg = configs.get_config('atari40_suboptimal_resnet101')
  assert len(cfg.games) == 40
  a = cfg.agent
  assert (a.loss, a.cql_alpha, a.num_atoms, a.v_min, a.v_max) == ('c51', 0.05, 51, -20.0, 20.0)
  assert (a.n_step, a.discount, a.learning_rate, a.target_update_period) == (3, 0.99, 2e-4, 2000)
  assert (a.games_per_batch, a.transitions_per_game, a.batch_size) == (128, 4, 512)
  assert cfg.network.resnet_stage_sizes == (3, 4, 23, 3)
  assert cfg.data.selection == 'suboptimal'
  assert cfg.eval.epsilon == 0.001 and cfg.eval.sticky_action_prob == 0.0
  assert configs.get_config('atari40_nearoptimal_resnet50').data.selection == 'near_optimal'


@pytest.mark.parametrize('variant,check', [
    ('mse', lambda c: c.agent.loss == 'mse' and c.agent.cql_alpha == 0.1),
    ('no_cql', lambda c: c.agent.cql_alpha == 0.0 and c.agent.loss == 'c51'),
    ('bc', lambda c: c.agent.loss == 'bc'),
    ('bcq', lambda c: c.agent.loss == 'bcq'),
    ('no_feature_norm', lambda c: not c.network.feature_norm),
    ('feature_norm', lambda c: c.network.feature_norm),
    ('mean_pool', lambda c: not c.network.spatial_embedding),
])
def test_variants(variant, check):
  cfg = configs.get_config(f'cpu_small_{variant}')
  assert check(cfg)
  assert cfg.name == f'cpu_small_{variant}'


def test_cpu_small_recipe_and_paper_networks_keep_the_paper_input():
  """cpu_small's measured deviations (docs/learning.md) stay out of the paper's configs."""
  small = configs.get_config('cpu_small')
  assert small.network.input_norm == 'standardize' and not small.network.feature_norm
  assert small.agent.adam_eps == 1e-8
  assert small.agent.policy_params_ema == 0.998  # evaluators use the params' moving average
  # 64 transitions per game and step (16 left Pong and Breakout on their action priors)
  assert small.agent.games_per_batch * small.agent.transitions_per_game == 64 * len(small.games)
  # the demo's result is a mean over >= 3 whole episodes: a final budget above the periodic one
  assert small.eval.final_steps_per_game > small.eval.steps_per_game
  paper = configs.get_config('atari40_suboptimal_resnet101')
  assert paper.network.input_norm == 'scale' and paper.network.feature_norm
  assert paper.agent.adam_eps == 3.125e-4
  assert paper.agent.policy_params_ema == 0.0  # the paper evaluates the online params
  assert paper.eval.final_steps_per_game is None  # the paper's budget for every evaluation


def test_json_round_trip():
  for name in ['cpu_tiny', 'atari6_suboptimal_resnet34_mean_pool']:
    cfg = configs.get_config(name)
    import json
    assert configs.ExperimentConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_unknown_config_lists_valid_names():
  with pytest.raises(configs.UnknownConfigError, match='atari40_suboptimal_resnet101.*cpu_small'):
    configs.get_config('cpu_smal')


def test_online_finetuning_takes_one_paced_batch_at_a_time():
  """cpu_small fetches 4 batches at once and prefetches to the device; online fine-tuning derived
  from it does neither (its table lets one batch through per allowed step), and its pacing
  accepts it; the paper configs keep the defaults (1 per fetch, device prefetch on)."""
  from scaled_ql.datasets import reverb_tables
  small = configs.get_config('cpu_small')
  assert (small.data.batches_per_fetch, small.train.device_prefetch) == (4, False)
  paper = configs.get_config('atari40_suboptimal_resnet101')
  assert (paper.data.batches_per_fetch, paper.train.device_prefetch) == (1, True)
  online = configs.finetune_online(small, 'Breakout', None, pretrained=None)
  assert (online.data.batches_per_fetch, online.train.device_prefetch) == (1, False)
  assert reverb_tables.TablePacing.from_config(online).batch_size == online.agent.batch_size

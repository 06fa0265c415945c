"""The paper's baselines and ablations through the program's real nodes (issue 7), tiny sizes.

Every loss of Section 5.3 / Appendix A other than Scaled QL's (BC, discrete BCQ, MSE TD) and
the network ablations (no feature normalization, global mean pooling, an IMPALA encoder) train 3
steps and have their final params evaluated by the SAME nodes as Scaled QL: the Reverb node and
an inserter reading the generated TFDS files, the Learner node publishing its params, and an
evaluator node playing the real emulator. They run in this process (tests/local_program.py, the
nodes' own loop threads; only the seams are local), one program after the other: what makes a
baseline lives in the nodes and the learner, and the Ray wiring around them, the same for every
loss, is tested with Scaled QL's program in tests/test_program.py. (Three Ray programs side by
side took 175 s of the suite on 2 cores; these three take ~60 s, measured alone.) There is one
program run per loss, and the network ablations ride along with them (BC + mean pooling, BCQ +
IMPALA, MSE + no feature norm). No CQL is Scaled QL's program with alpha 0: alpha 0 trains
through the real learner in tests/test_learning_smoke.py. Each run is then checked for what makes
it that baseline, from its own outputs (learner metrics, the checkpoint, the evaluator log), not
from the config alone:
- the loss the learner minimised (`loss == td + alpha * cql` with the variant's alpha; BC's
  cross-entropy; BCQ's C51 TD + behaviour NLL with the tau-filtered bootstrap set),
- the network in the checkpoint (1 atom for BC/MSE; BCQ's behaviour model with the Q-network's
  architecture; no spatial-embedding params with mean pooling; IMPALA conv stages; unit-norm
  features or not),
- evaluator rows for every game at the final learner step.
The BCQ action filter itself is checked by hand-computed examples in tests/test_losses.py
(`test_bcq_action_filter_hand_computed`, `test_bcq_backup_maximises_only_over_filtered_actions`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from scaled_ql import configs
from scaled_ql.launch import run as launch_run

import local_program  # tests/local_program.py

NUM_STEPS = 3
# A CPU-tiny IMPALA-CNN (Espeholt et al. 2018 torso; channels scaled down like `impala_w1`'s
# (16, 32, 32)) with cpu_tiny's trunk sizes.
IMPALA_TINY = dataclasses.replace(
    configs.NETWORKS['impala_w1'], impala_channels=(2, 4, 4), spatial_embedding_features=2,
    trunk_first_dim=32, trunk_hidden_dims=(16, 16, 16))

# One program run per loss (the costly part of a run is starting its processes); the network
# ablations ride along: name -> (config name, network changes). cpu_tiny sizes throughout. The
# plain Scaled QL config runs through the Ray program in tests/test_program.py.
RUNS = {
    'bc_mean_pool': ('cpu_tiny_bc', dict(spatial_embedding=False)),
    'bcq_impala': ('cpu_tiny_bcq', dataclasses.asdict(IMPALA_TINY)),
    'mse_no_feature_norm': ('cpu_tiny_mse', dict(feature_norm=False)),
}


def _config(run: str, data_dir: str):
  name, network = RUNS[run]
  cfg = launch_run.resolve_config(name, data_dir, steps=NUM_STEPS, evaluators=1)
  # Final evaluation only (no periodic rounds while the learner trains), a short one.
  return cfg.replace(name=f'cpu_tiny_{run}', network=network,
                     eval=dict(steps_per_game=60, final_steps_per_game=60,
                               eval_every_seconds=1e6))


@pytest.fixture(scope='module')
def runs(tiny_dataset_dir, tmp_path_factory):
  """Runs every baseline's program once, one after the other: {run: (cfg, workdir, the learner
  node's status when its steps were done)}."""
  root = tmp_path_factory.mktemp('baselines')
  out = {}
  for run in RUNS:
    cfg, workdir = _config(run, tiny_dataset_dir), str(root / run)
    out[run] = (cfg, workdir, local_program.run_in_process(cfg, workdir, NUM_STEPS).learner)
  return out


def _eval_rows(workdir: str) -> list[dict]:
  rows = []
  for name in sorted(os.listdir(os.path.join(workdir, 'eval'))):
    with open(os.path.join(workdir, 'eval', name)) as f:
      rows += [json.loads(line) for line in f if line.strip()]
  return rows


def _checkpoint(workdir: str):
  from scaled_ql.agents import checkpointing
  return checkpointing.load_params(workdir)


def _features_and_logits(cfg, params):
  from scaled_ql.agents import builder, methods
  nets = builder.agent_networks(cfg)
  rng = np.random.default_rng(0)
  obs = rng.integers(0, 256, (4, 84, 84, 4), dtype=np.uint8)
  game_id = np.array([0, 1, 0, 1], np.int32)
  q_params = methods.get(cfg.agent.loss).q_params(params)
  out = nets.q.apply(q_params, obs, game_id)
  return np.asarray(out.features), np.asarray(out.logits)


@pytest.mark.parametrize('run', list(RUNS))
def test_baseline_trains_and_is_evaluated_by_the_real_nodes(runs, run):
  cfg, workdir, status = runs[run]
  assert status['steps'] == NUM_STEPS
  metrics = status['metrics']
  assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics
  # The evaluator node played every game with the final params.
  rows = [r for r in _eval_rows(workdir) if r['param_version'] == NUM_STEPS]
  assert {r['game'] for r in rows} == set(cfg.games), rows
  # A budget of 60 steps; every episode started is played to its end (eval/evaluator.py).
  assert all(math.isfinite(r['score']) and r['episodes'] >= 1 and r['budget'] == 60
             and r['steps'] >= 60 for r in rows)
  # The checkpoint holds this variant's config and network.
  saved_cfg, params, step = _checkpoint(workdir)
  assert step == NUM_STEPS and saved_cfg == cfg


def test_mse_loss_is_td_plus_its_alpha_times_cql(runs):
  cfg, _, status = runs['mse_no_feature_norm']
  alpha = 0.1  # the MSE ablation's alpha (Table B.1)
  assert cfg.agent.cql_alpha == alpha
  m = status['metrics']
  assert m['cql_loss'] > 0  # logsumexp over >= 2 actions exceeds Q(s, a_data)
  np.testing.assert_allclose(m['loss'], m['td_loss'] + alpha * m['cql_loss'], rtol=1e-5,
                             atol=1e-6)


def test_bc_minimises_the_cross_entropy_of_the_logged_action(runs):
  cfg, workdir, status = runs['bc_mean_pool']
  m = status['metrics']
  assert cfg.agent.loss == 'bc' and cfg.agent.cql_alpha == 0.0
  assert set(m) >= {'bc_loss', 'bc_accuracy'} and 'td_loss' not in m and 'cql_loss' not in m
  np.testing.assert_allclose(m['loss'], m['bc_loss'], rtol=1e-6)
  # Near uniform after 3 steps over Breakout's 4 / Pong's 6 actions (log 4 = 1.39, log 6 = 1.79).
  assert 1.0 < m['bc_loss'] < 2.5
  _, params, _ = _checkpoint(workdir)
  _, logits = _features_and_logits(cfg, params)
  assert logits.shape == (4, 6, 1)  # the same network with one output per action


def test_bcq_trains_behaviour_model_of_the_same_architecture_and_filters_with_tau(runs):
  cfg, workdir, status = runs['bcq_impala']
  m = status['metrics']
  assert cfg.agent.loss == 'bcq' and cfg.agent.bcq_tau == 0.3 and cfg.agent.cql_alpha == 0.0
  # C51 TD (no CQL) + the behaviour model's NLL, in one step.
  np.testing.assert_allclose(m['loss'], m['td_loss'] + m['behaviour_nll'], rtol=1e-5)
  # The filtered bootstrap set: at least the likeliest action, at most the game's actions.
  assert 1.0 <= m['bcq_allowed_actions'] <= 6.0
  _, params, _ = _checkpoint(workdir)
  assert set(params) == {'q', 'behaviour'}
  q_shapes = {k: {n: v.shape for n, v in p.items()} for k, p in params['q'].items()}
  b_shapes = {k: {n: v.shape for n, v in p.items()} for k, p in params['behaviour'].items()}
  # Same modules and shapes except the heads' output width (51 atoms vs 1 logit per action).
  heads = [k for k in q_shapes if k.split('/')[0] == 'heads']
  assert heads and {k: v for k, v in q_shapes.items() if k not in heads} == {
      k: v for k, v in b_shapes.items() if k not in heads}
  _, logits = _features_and_logits(cfg, params)
  assert logits.shape == (4, 6, cfg.agent.num_atoms)


def test_mse_has_one_value_per_action(runs):
  cfg, workdir, _ = runs['mse_no_feature_norm']
  assert cfg.agent.loss == 'mse'
  _, params, _ = _checkpoint(workdir)
  _, logits = _features_and_logits(cfg, params)
  assert logits.shape == (4, 6, 1)


def test_feature_normalization_on_and_off(runs):
  for run, unit in [('bc_mean_pool', True), ('mse_no_feature_norm', False)]:
    cfg, workdir, _ = runs[run]
    assert cfg.network.feature_norm == unit
    _, params, _ = _checkpoint(workdir)
    features, _ = _features_and_logits(cfg, params)
    norms = np.linalg.norm(features, axis=-1)
    assert np.allclose(norms, 1.0, atol=1e-4) == unit, (run, norms)


def _param_modules(workdir):
  _, params, _ = _checkpoint(workdir)
  return set(params['q'] if 'q' in params else params)


def test_mean_pool_has_no_spatial_embedding_and_impala_has_its_stages(runs):
  base = _param_modules(runs['mse_no_feature_norm'][1])  # the default spatial embedding
  assert any('spatial_embedding' in k for k in base)
  mean_pool = _param_modules(runs['bc_mean_pool'][1])
  assert not any('spatial_embedding' in k for k in mean_pool)
  assert mean_pool < base  # only the spatial embedding is gone
  impala = _param_modules(runs['bcq_impala'][1])
  assert any('stage_2_block_1_conv_1' in k for k in impala), sorted(impala)
  assert any('spatial_embedding' in k for k in impala)

"""Tests of scaled_ql/agents/methods/: the registry and the records' shared parts.

The losses themselves are tested in test_losses.py (per transition) and through the learner in
test_learner.py (every method, on a batch)."""
import numpy as np
import pytest

from scaled_ql.agents import builder, methods
from scaled_ql.configs import get_config


@pytest.mark.parametrize('variant', ['', '_mse', '_bc', '_bcq'])
def test_every_config_variant_names_a_registered_method(variant):
  cfg = get_config('cpu_tiny' + variant)
  method = methods.get(cfg.agent.loss)
  assert method.name == cfg.agent.loss
  nets = builder.agent_networks(cfg)
  assert nets.num_atoms == (cfg.agent.num_atoms if method.distributional else 1)
  assert (nets.behaviour is not None) == method.behaviour_model


def test_unknown_method_names_the_field():
  with pytest.raises(ValueError, match=r"agent.loss='dqn' is not one of \('c51', 'mse', 'bc', "
                                       r"'bcq'\)"):
    methods.get('dqn')


def test_policy_params_hold_the_behaviour_model_only_when_there_is_one():
  q, behaviour = {'heads': {'w': np.ones(2)}}, {'heads': {'w': np.zeros(2)}}
  bcq = methods.get('bcq').policy_params(q, behaviour)
  assert bcq == {'q': q, 'behaviour': behaviour} and methods.get('bcq').q_params(bcq) is q
  for name in ('c51', 'mse', 'bc'):
    assert methods.get(name).policy_params(q, {}) is q and methods.get(name).q_params(q) is q


def test_method_config_checks_run_in_the_builder():
  with pytest.raises(ValueError, match='no meaning for loss "bc"'):
    builder.check_agent_config(get_config('cpu_tiny_bc').replace(agent=dict(cql_alpha=0.1)))
  with pytest.raises(ValueError, match='num_atoms=1 must be >= 2'):
    builder.check_agent_config(get_config('cpu_tiny_bcq').replace(agent=dict(num_atoms=1)))

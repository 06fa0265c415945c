"""The imitation probe's closed-loop diagnostic (benchmarks/imitation_probe.py `closed_loop`).

It plays a trained policy under the evaluation protocol and asks the generator's scripted policy
for its action in the same states. Freeway's script always presses UP, so the agreement must be
exactly the share of the policy's own UP actions, whatever the (untrained) network does.
"""
import jax
import numpy as np
import pytest

from scaled_ql.agents import learner as learner_lib
from scaled_ql.agents import methods
from scaled_ql.configs import get_config
from scaled_ql.datasets import policies

import benchmark_modules  # tests/benchmark_modules.py


def _untrained_policy_params(cfg):
  state = learner_lib.initial_state(cfg, jax.random.PRNGKey(3))
  return methods.get(cfg.agent.loss).policy_params(state.params, state.behaviour_params)


def test_closed_loop_agreement_is_the_share_of_the_scripts_action():
  probe = benchmark_modules.load('imitation_probe')
  cfg = get_config('cpu_tiny').replace(games=('Freeway', 'Pong'),
                                       agent=dict(loss='bc', cql_alpha=0.0))
  # A high epsilon makes the untrained policy mix its actions, so the check is not 0 == 0.
  cfg = cfg.replace(eval=dict(epsilon=0.5))
  out = probe.closed_loop(cfg, _untrained_policy_params(cfg), 'Freeway', 0, steps=120)
  counts = np.asarray(out['script_by_agent_counts'])
  up = policies._action_indices('Freeway')['UP']
  assert counts.sum() == 120
  assert counts.sum(axis=1)[up] == 120  # the script's row: UP every step
  agent_up_share = counts[:, up].sum() / 120
  assert 0.0 < agent_up_share < 1.0
  assert out['agreement_with_script'] == round(agent_up_share, 3)
  assert out['game'] == 'Freeway' and out['episodes'] == len(out['scores'])


def test_the_gate_table_names_the_learner_and_judges_only_bc(capsys):
  gate = benchmark_modules.load('imitation_gate')
  behaviour = {'Freeway': (20.0, 5)}
  rows = {'Freeway': {'score': 19.0, 'episodes': 3}}  # (19 - 0) / (20 - 0) = 0.95
  gate.print_table('strided', ['Freeway'], behaviour, rows)
  out = capsys.readouterr().out
  assert '| BC    19.00 (3 episodes) | ratio 0.95' in out
  assert 'gate HOLDS for strided' in out
  gate.print_table('strided', ['Freeway'], behaviour, rows, label='cpu_small')
  out = capsys.readouterr().out
  assert '| cpu_small    19.00' in out and 'BC ' not in out.replace('for BC', '')
  assert 'ratio >= 0.8 on 1 of 1 games (the gate itself is for BC)' in out
  assert 'HOLDS' not in out


def test_a_script_driven_rollout_asks_the_policy_in_the_scripts_states_and_splits_breakouts_serve():
  probe = benchmark_modules.load('imitation_probe')
  cfg = get_config('cpu_tiny').replace(agent=dict(loss='bc', cql_alpha=0.0))  # Breakout, Pong
  params = _untrained_policy_params(cfg)
  out = probe.closed_loop(cfg, params, 'Breakout', 0, steps=60, driver='script', script_epsilon=0.0)
  split = out['by_state']
  assert split['ball_in_play']['states'] + split['not_ball_in_play']['states'] == 60
  # The game starts with the ball not in play, and the script serves there (FIRE).
  serve = np.asarray(split['not_ball_in_play']['script_by_agent_counts'])
  fire = policies._action_indices('Breakout')['FIRE']
  assert serve.sum() >= 1 and serve.sum(axis=1)[fire] == serve.sum()
  # Driven by the script at epsilon 0, the ball gets served: most states have it in play.
  assert split['ball_in_play']['states'] > split['not_ball_in_play']['states']
  assert np.asarray(out['script_by_agent_counts']).sum() == 60 and out['driver'] == 'script'
  with pytest.raises(ValueError, match="driver must be 'agent' or 'script'"):
    probe.closed_loop(cfg, params, 'Breakout', 0, steps=1, driver='policy')

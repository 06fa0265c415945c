"""Dopamine's C51 step (benchmarks/dopamine_c51.py), the FLOP/s baseline of learner_step.py.

The baseline is only honest if it is Dopamine's computation: the check that its XLA FLOP count
matches the layers Dopamine's RainbowNetwork has ('SAME' padding: 84 -> 21 -> 11 -> 11, a
7744-wide flatten) fails for a wrong padding, a missing layer or a forward run too few times.
"""
import jax
import numpy as np
import pytest

import benchmark_modules  # tests/benchmark_modules.py


# learner_step imports its sibling dopamine_c51, as the benchmark does.
learner_step = benchmark_modules.load('learner_step')
dopamine_c51 = learner_step.dopamine_c51


def _forward_macs(num_actions: int, num_atoms: int = 51) -> int:
  """Multiply-adds of one RainbowNetwork forward on one 84x84x4 state, layer by layer."""
  return (21 * 21 * 32 * (8 * 8 * 4)     # conv 32 8x8/4, SAME: 84 -> 21
          + 11 * 11 * 64 * (4 * 4 * 32)  # conv 64 4x4/2: 21 -> 11
          + 11 * 11 * 64 * (3 * 3 * 64)  # conv 64 3x3/1: 11 -> 11
          + 11 * 11 * 64 * 512           # dense 512 on the 7744-wide flatten
          + 512 * num_actions * num_atoms)  # dense A * 51


def test_dopamine_c51_step_runs_and_its_flops_are_the_layers():
  num_actions, batch = 6, 2
  step, state, make_batch = dopamine_c51.make_step(num_actions, batch)
  data = make_batch()
  compiled = step.lower(state, data).compile()
  new_state, metrics = compiled(state, data)

  loss = float(metrics['loss'])
  assert np.isfinite(loss) and loss > 0
  assert metrics['loss_per_example'].shape == (batch,)
  # One Adam step moves the online params; the target params are Dopamine's to sync, not the step's.
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), state.online_params,
                                 new_state.online_params)
  assert all(jax.tree_util.tree_leaves(moved))
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.target_params,
                         new_state.target_params)

  # fwd + bwd of the online network (~3 forwards) plus one target forward, 2 FLOPs per MAC.
  analytic = 2 * batch * 4 * _forward_macs(num_actions)
  assert learner_step.flops_of(compiled) == pytest.approx(analytic, rel=0.2)

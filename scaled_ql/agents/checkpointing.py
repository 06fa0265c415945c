"""Orbax checkpoints of the learner, and `load_params` for evaluators and transfer.

Layout: `<workdir>/checkpoints/<step>/{state,config}`: `state` is the whole `TrainState` (online,
target and behaviour params, Adam state, PRNG key, step) and `config` the resolved
ExperimentConfig as JSON. A checkpoint whose params are not all finite is refused (never written),
so the latest checkpoint is always a good one.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from scaled_ql.configs.base import ExperimentConfig

CHECKPOINT_SUBDIR = 'checkpoints'
MAX_TO_KEEP = 3
# Sub-configs that fix the shapes/meaning of the saved params: a restore must agree on them.
_PARAM_DEFINING = ('games', 'network', 'agent')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def make_manager(workdir: str, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=MAX_TO_KEEP, create=not read_only, read_only=read_only,
      # Synchronous: a save on SIGTERM must be complete before the process exits.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'config'))


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def save(manager: ocp.CheckpointManager, state: Any, cfg: ExperimentConfig) -> int:
  step = int(state.step)
  if not bool(_all_finite((state.params, state.behaviour_params, state.target_params))):
    raise FloatingPointError(
        f'refusing to checkpoint step {step}: the params contain NaN/inf; the last good '
        f'checkpoint (step {manager.latest_step()}) is kept in {manager.directory}')
  if manager.latest_step() == step:
    return step  # already saved (e.g. a periodic save followed by a SIGTERM save)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             config=ocp.args.JsonSave(cfg.to_dict())))
  manager.wait_until_finished()
  return step


def _check_compatible(saved: ExperimentConfig, cfg: ExperimentConfig, where: str) -> None:
  for field in _PARAM_DEFINING:
    if getattr(saved, field) != getattr(cfg, field):
      raise ValueError(f'checkpoint in {where} was written with a different {field!r} config: '
                       f'{getattr(saved, field)} != {getattr(cfg, field)}')


def restore(manager: ocp.CheckpointManager, abstract_state: Any, cfg: ExperimentConfig,
            step: Optional[int] = None) -> Optional[Any]:
  """Restores the latest (or given) step into `abstract_state` (a tree of ShapeDtypeStructs
  with shardings); None if there is no checkpoint."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  saved_cfg = ExperimentConfig.from_dict(
      manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
  _check_compatible(saved_cfg, cfg, str(manager.directory))
  out = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return out.state


def load_params(checkpoint_dir_or_workdir: str, step: Optional[int] = None
                ) -> tuple[ExperimentConfig, Any, int]:
  """(config, params, step) of the latest checkpoint in a learner workdir or its `checkpoints/`.

  `params` is what `actors.make_policy` takes: the online Q-network params (haiku dict), or for
  'bcq' {'q': ..., 'behaviour': ...}.
  """
  from scaled_ql.agents import builder, learner  # local: learner imports this module
  path = os.path.abspath(checkpoint_dir_or_workdir)
  if os.path.basename(path.rstrip('/')) == CHECKPOINT_SUBDIR:
    path = os.path.dirname(path)
  if not os.path.isdir(checkpoint_dir(path)):
    raise FileNotFoundError(f'no checkpoints in {checkpoint_dir_or_workdir!r} (expected a learner '
                            f'workdir containing {CHECKPOINT_SUBDIR}/ or that folder itself)')
  # Not read_only (orbax then logs warnings), but create=False; this manager never saves.
  manager = ocp.CheckpointManager(
      checkpoint_dir(path), item_names=('state', 'config'),
      options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{checkpoint_dir(path)} holds no complete checkpoint')
    cfg = ExperimentConfig.from_dict(
        manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    like = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(lambda: learner.init_state(cfg, jax.random.PRNGKey(0))))
    state = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like))).state
  finally:
    manager.close()
  return cfg, builder.policy_params(cfg, state.params, state.behaviour_params), int(state.step)

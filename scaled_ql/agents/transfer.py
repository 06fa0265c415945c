"""Transfer (Section 5.2, Figure 1): a new network that starts from a multi-game encoder.

    pretrained_cfg, pretrained, step = load_pretrained(checkpoint_dir)
    params = finetune_params(cfg, checkpoint_dir)        # fresh init, encoder from the checkpoint
    learner = Learner(cfg, batches, initial_params=params)

The encoder (conv torso + spatial embedding; `networks.encoder_param_filter`) of the checkpoint is
copied into a freshly initialized network of `cfg`; the MLP trunk and the heads keep their random
init (the paper "transfer[s] the weights from the visual encoder and reinitialize[s] the downstream
feed-forward component"). `cfg.agent.frozen_modules = ('encoder',)` keeps the encoder fixed during
training: `builder.make_optimizer` labels params with `builder.frozen_labels` and gives the frozen
ones zero updates (`optax.set_to_zero`) and no Adam state.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import haiku as hk
import jax
import numpy as np

from scaled_ql.agents import builder, checkpointing, learner, methods
from scaled_ql.configs.base import ExperimentConfig
from scaled_ql.networks import encoder_param_filter


class EncoderMismatchError(ValueError):
  """The checkpoint's encoder params do not fit the configured network."""


# Network settings that change what the encoder computes but not its params' shapes (which
# `transfer_encoder` checks too): the input's scaling, GroupNorm's grouping, and the stem (a
# 7x7/2 convolution + max-pool and a 7x7/7 patchify convolution have the same kernel).
ENCODER_SETTINGS = ('input_norm', 'group_norm_groups', 'stem')


def encoder_params(params: Any) -> Any:
  """The encoder part of a haiku params dict (`networks.encoder_param_filter`)."""
  encoder, _ = hk.data_structures.partition(encoder_param_filter, params)
  return encoder


def load_pretrained(checkpoint_dir: str, step: Optional[int] = None, *, online: bool = False
                    ) -> tuple[ExperimentConfig, Any, int]:
  """(config, Q-network params, step) of a multi-game learner checkpoint (workdir or its
  checkpoints/). For a method with a behaviour model (bcq) the Q-network's params only. The
  params its evaluators used (the moving average for a run with `agent.policy_params_ema` > 0),
  or with `online` its online params (`finetune.pretrained_online_params`)."""
  cfg, params, step = checkpointing.load_params(checkpoint_dir, step, online=online)
  params = methods.get(cfg.agent.loss).q_params(params)
  return cfg, jax.device_get(params), step


def settings_differences(pretrained: Any, configured: Any) -> list[str]:
  """`ENCODER_SETTINGS` on which two network configs (the checkpoint's, the configured one)
  differ, one line each."""
  return [f'network.{k}: checkpoint {getattr(pretrained, k)!r} vs configured network '
          f'{getattr(configured, k)!r}' for k in ENCODER_SETTINGS
          if getattr(pretrained, k) != getattr(configured, k)]


def transfer_encoder(fresh_params: Any, pretrained_params: Any, checkpoint_dir: str,
                     settings: Sequence[str] = ()) -> Any:
  """`fresh_params` with its encoder replaced by the encoder of `pretrained_params`.

  Raises EncoderMismatchError naming the checkpoint path and every mismatch: the `settings`
  that differ (`settings_differences`), and the parameters that the configured encoder lacks, or
  holds in another shape.
  """
  source = encoder_params(pretrained_params)
  target = encoder_params(fresh_params)
  if not target:
    raise EncoderMismatchError('the configured network has no encoder params to transfer into')
  problems = list(settings) + builder.param_differences(
      builder.param_shapes(source), builder.param_shapes(target), 'checkpoint',
      'configured network')
  if problems:
    raise EncoderMismatchError(
        f'the encoder of checkpoint {checkpoint_dir} does not match the configured network: '
        + '; '.join(problems))
  source = jax.tree_util.tree_map(np.asarray, source)
  return hk.data_structures.merge(fresh_params, source)


def finetune_params(cfg: ExperimentConfig, pretrained: Optional[str] = None,
                    loaded: Optional[tuple[ExperimentConfig, Any]] = None) -> Any:
  """Initial Q-network params of a fine-tuning run: a fresh init of `cfg`'s network (seed
  `cfg.train.seed`, the same init the Learner would make), with the encoder of the checkpoint in
  `pretrained` (default `cfg.finetune.pretrained`) copied in (the averaged or the online params,
  `cfg.finetune.pretrained_online_params`). From scratch (no checkpoint): the fresh init itself.
  `loaded` = (its config, its params) skips re-reading an already loaded checkpoint. Raises
  EncoderMismatchError when the checkpoint's encoder does not fit `cfg`'s network."""
  pretrained = cfg.finetune.pretrained if pretrained is None else pretrained
  if methods.get(cfg.agent.loss).behaviour_model:
    raise ValueError(f'fine-tuning supports the Q-network losses c51/mse, not {cfg.agent.loss}')
  fresh = jax.device_get(learner.initial_state(cfg, jax.random.PRNGKey(cfg.train.seed)).params)
  if pretrained is None:
    return fresh
  if loaded is None:
    loaded = load_pretrained(pretrained, online=cfg.finetune.pretrained_online_params)[:2]
  pretrained_cfg, pretrained_params = loaded
  return transfer_encoder(fresh, pretrained_params, pretrained,
                          settings_differences(pretrained_cfg.network, cfg.network))

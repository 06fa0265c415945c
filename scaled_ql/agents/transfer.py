"""Transfer (Section 5.2, Figure 1): a new network that starts from a multi-game encoder.

    pretrained_cfg, pretrained, step = load_pretrained(checkpoint_dir)
    params = finetune_params(cfg, checkpoint_dir)        # fresh init, encoder from the checkpoint
    learner = Learner(cfg, batches, workdir, initial_params=params)

The encoder (conv torso + spatial embedding; `networks.encoder_param_filter`) of the checkpoint is
copied into a freshly initialized network of `cfg`; the MLP trunk and the heads keep their random
init (the paper "transfer[s] the weights from the visual encoder and reinitialize[s] the downstream
feed-forward component"). `cfg.agent.frozen_modules = ('encoder',)` keeps the encoder fixed during
training: `builder.make_optimizer` labels params with `frozen_labels` and gives the frozen ones zero
updates (`optax.set_to_zero`) and no Adam state.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import haiku as hk
import jax
import numpy as np

from scaled_ql.agents import methods
from scaled_ql.configs.base import ExperimentConfig

MODULES = ('encoder', 'trunk', 'heads')  # top-level modules of `networks.make_q_network`
TRAINABLE = 'trainable'
FROZEN = 'frozen'


class EncoderMismatchError(ValueError):
  """The checkpoint's encoder params do not fit the configured network."""


def check_frozen_modules(frozen_modules: Sequence[str]) -> None:
  unknown = [m for m in frozen_modules if m not in MODULES]
  if unknown:
    raise ValueError(f'agent.frozen_modules={tuple(frozen_modules)!r}: unknown module(s) '
                     f'{unknown}; valid: {MODULES}')


def frozen_labels(params: Any, frozen_modules: Sequence[str]) -> Any:
  """The tree of `params` with FROZEN for leaves of `frozen_modules` and TRAINABLE otherwise.

  Works on any tree holding haiku params dicts ({module_name: {name: array}}), e.g. the learner's
  (params, behaviour_params) tuple: a leaf's module is the first component of the module name.
  """
  frozen = frozenset(frozen_modules)

  def label(path, _):
    module = _module_name(path)
    return FROZEN if module is not None and module.split('/', 1)[0] in frozen else TRAINABLE
  return jax.tree_util.tree_map_with_path(label, params)


def _module_name(path) -> Optional[str]:
  """The haiku module name of a leaf path (the dict key just above the leaf name)."""
  keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
  return keys[-2] if len(keys) >= 2 else None


def _shapes(params: Any) -> dict[str, tuple]:
  """'module/name' -> shape for a haiku params dict."""
  return {f'{m}/{n}': tuple(np.shape(v)) for m, d in params.items() for n, v in d.items()}


def check_same_structure(params: Any, reference: Any, what: str) -> None:
  """Raises ValueError naming the params of `params` missing from / extra to / shaped unlike
  those of `reference` (both haiku params dicts)."""
  got, want = _shapes(params), _shapes(reference)
  problems = _differences(got, want, 'given', 'network')
  if problems:
    raise ValueError(f'{what} do not fit the network: {"; ".join(problems)}')


def _differences(got: dict, want: dict, got_name: str, want_name: str, limit: int = 8) -> list:
  problems = [f'{k}: {got_name} {list(got[k])} vs {want_name} {list(want[k])}'
              for k in sorted(got.keys() & want.keys()) if got[k] != want[k]]
  problems += [f'{k}: missing from the {got_name} params' for k in sorted(want.keys() - got.keys())]
  problems += [f'{k}: not in the {want_name}' for k in sorted(got.keys() - want.keys())]
  if len(problems) > limit:
    problems = problems[:limit] + [f'... and {len(problems) - limit} more']
  return problems


def encoder_params(params: Any) -> Any:
  """The encoder part of a haiku params dict (`networks.encoder_param_filter`)."""
  from scaled_ql.networks import encoder_param_filter
  encoder, _ = hk.data_structures.partition(encoder_param_filter, params)
  return encoder


def load_pretrained(checkpoint_dir: str, step: Optional[int] = None
                    ) -> tuple[ExperimentConfig, Any, int]:
  """(config, Q-network params, step) of a multi-game learner checkpoint (workdir or its
  checkpoints/). For a method with a behaviour model (bcq) the Q-network's params only."""
  from scaled_ql.agents import checkpointing
  cfg, params, step = checkpointing.load_params(checkpoint_dir, step)
  params = methods.get(cfg.agent.loss).q_params(params)
  return cfg, jax.device_get(params), step


def transfer_encoder(fresh_params: Any, pretrained_params: Any, checkpoint_dir: str) -> Any:
  """`fresh_params` with its encoder replaced by the encoder of `pretrained_params`.

  Raises EncoderMismatchError naming the mismatching parameter(s) and the checkpoint path when the
  checkpoint's encoder does not have exactly the configured encoder's params and shapes.
  """
  source = encoder_params(pretrained_params)
  target = encoder_params(fresh_params)
  if not target:
    raise EncoderMismatchError('the configured network has no encoder params to transfer into')
  problems = _differences(_shapes(source), _shapes(target), 'checkpoint', 'configured network')
  if problems:
    raise EncoderMismatchError(
        f'the encoder of checkpoint {checkpoint_dir} does not match the configured network: '
        + '; '.join(problems))
  source = jax.tree_util.tree_map(np.asarray, source)
  return hk.data_structures.merge(fresh_params, source)


def finetune_params(cfg: ExperimentConfig, pretrained: Optional[str] = None,
                    pretrained_params: Any = None) -> Any:
  """Initial Q-network params of a fine-tuning run: a fresh init of `cfg`'s network (seed
  `cfg.train.seed`, the same init the Learner would make), with the encoder of the checkpoint in
  `pretrained` (default `cfg.finetune.pretrained`) copied in. From scratch (no checkpoint): the
  fresh init itself. `pretrained_params` skips re-reading an already loaded checkpoint."""
  from scaled_ql.agents import learner
  pretrained = cfg.finetune.pretrained if pretrained is None else pretrained
  if methods.get(cfg.agent.loss).behaviour_model:
    raise ValueError(f'fine-tuning supports the Q-network losses c51/mse, not {cfg.agent.loss}')
  init = learner._init_state_jit  # pylint: disable=protected-access  (the Learner's own init)
  fresh = jax.device_get(init(cfg, jax.random.PRNGKey(cfg.train.seed)).params)
  if pretrained is None:
    return fresh
  if pretrained_params is None:
    _, pretrained_params, _ = load_pretrained(pretrained)
  return transfer_encoder(fresh, pretrained_params, pretrained)

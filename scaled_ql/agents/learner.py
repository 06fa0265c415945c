"""The offline learner: Scaled QL's gradient step (Eq. 1) behind Acme's Learner seam.

    learner = Learner(cfg, iterator_of_transitions)
    metrics = learner.step()          # one gradient step on one batch
    params, = learner.get_variables() # what actors and evaluators use
    state = learner.save()            # the TrainState; learner.restore(state) puts one back

Read in order: `TrainState` (everything a step changes), `init_state` / `initial_state` (jitted),
`batch_loss` (the batch mean of the per-transition terms of the configured method, `methods/`),
`update` (the module-level jitted step: grad, Adam, periodic target copy; benchmarkable alone, see
benchmarks/learner_step.py), `pack_state` / `packed_update` (the same step on a state of a few
flat buffers, `train.packed_state`), `compile_update` (the update as the Learner runs it:
compiled ahead of time with the config's XLA options), `check_batch`, `Learner` (data-parallel
placement of the state and the batches). What a training process does around the steps
(checkpoints on disk, NaN checks, metrics, config.json, SIGTERM/SIGINT) is
`runner.LearnerRunner`'s.

Data parallelism: the batch is split over all local devices along a 1-D `('batch',)` mesh and the
train state is replicated; XLA inserts the gradient all-reduce. The result equals the 1-device
result up to float reassociation (tests/test_learner.py checks 1 vs 4 CPU devices).
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scaled_ql.agents import augmentation, builder, methods
from scaled_ql.agents.packing import Packing
from scaled_ql.configs.base import ExperimentConfig
from scaled_ql.networks import q_network
from scaled_ql.types import FrameWindows, Transition


class TrainState(NamedTuple):
  params: Any  # online Q-network (policy network for 'bc')
  behaviour_params: Any  # discrete BCQ's behaviour model; an empty dict otherwise
  target_params: Any  # copy of `params`, refreshed every agent.target_update_period steps
  opt_state: Any  # Adam state of (params, behaviour_params)
  rng: jax.Array  # PRNG key, split once per step (kept so that a resumed run is bit-identical)
  step: jax.Array  # int32 number of gradient steps taken


def init_state(cfg: ExperimentConfig, rng: jax.Array, params: Any = None) -> TrainState:
  """A fresh train state: the Q-network's `params` if given (e.g. `transfer.finetune_params`),
  else a random init; the target network, the optimizer state (and so a moving average of the
  params, `agent.policy_params_ema`) start from them."""
  nets = builder.agent_networks(cfg)
  init_rng, bcq_rng, rng = jax.random.split(rng, 3)
  if params is None:
    params = nets.q.init(init_rng, *builder.dummy_inputs())
  behaviour_params = nets.behaviour.init(bcq_rng, *builder.dummy_inputs()) if nets.behaviour else {}
  opt_state = builder.make_optimizer(cfg.agent).init((params, behaviour_params))
  return TrainState(params=params, behaviour_params=behaviour_params,
                    target_params=jax.tree_util.tree_map(jnp.copy, params), opt_state=opt_state,
                    rng=rng, step=jnp.zeros((), jnp.int32))


# `init_state` jitted (the config is static): what a Learner starts from, and the fresh network
# of a fine-tuning run (`transfer.finetune_params`).
initial_state = jax.jit(init_state, static_argnums=0)


def batch_loss(trainable: tuple[Any, Any], target_params: Any, batch: Transition,
               cfg: ExperimentConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over the batch of the per-transition terms of the method `cfg.agent.loss` names
  (`methods/`); returns (loss, terms)."""
  params, behaviour_params = trainable
  terms = methods.get(cfg.agent.loss).batch_loss(
      builder.agent_networks(cfg), params, behaviour_params, target_params, batch, cfg.agent)
  means = {k: jnp.mean(v) for k, v in terms.items()}
  return means['loss'], means


def augmentation_key(state: TrainState) -> jax.Array:
  """This step's key for `agent.random_shift`: the half of `state.rng` the step does not keep."""
  return jax.random.split(state.rng)[1]


def gradient_step(state: TrainState, batch: Transition, cfg: ExperimentConfig
                  ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One gradient step on `batch` as it is (`update` and `update_from_windows` augment first)."""
  optimizer = builder.make_optimizer(cfg.agent)
  trainable = (state.params, state.behaviour_params)
  grads, metrics = jax.grad(batch_loss, has_aux=True)(trainable, state.target_params, batch, cfg)
  updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
  params, behaviour_params = optax.apply_updates(trainable, updates)
  step = state.step + 1
  target_params = refreshed_target(step, params, state.target_params, cfg)
  rng, _ = jax.random.split(state.rng)
  # Of the trained params only: the frozen ones' gradients (set to zero by the optimizer) are
  # then read by nothing, and XLA drops a frozen encoder's backward pass.
  metrics['grad_norm'] = optax.global_norm(builder.trained_only(grads, cfg.agent.frozen_modules))
  new_state = TrainState(params=params, behaviour_params=behaviour_params,
                         target_params=target_params, opt_state=opt_state, rng=rng, step=step)
  return new_state, metrics


def refreshed_target(step: jax.Array, params: Any, target_params: Any, cfg: ExperimentConfig
                     ) -> Any:
  """The target network after step `step`: `params` every `agent.target_update_period` steps,
  else `target_params`. lax.cond, not jnp.where: between refreshes the (donated) target buffers
  pass through untouched instead of being read and rewritten every step."""
  refresh = (step % cfg.agent.target_update_period) == 0
  return jax.lax.cond(refresh, lambda: params, lambda: target_params)


@functools.partial(jax.jit, static_argnames=('cfg',), donate_argnums=(0,))
def update(state: TrainState, batch: Transition, cfg: ExperimentConfig
           ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One gradient step. Placement (data parallelism) follows the shardings of the inputs. With
  `agent.random_shift` > 0 each transition's observation and next observation first move by the
  same random shift."""
  pad = cfg.agent.random_shift
  if pad:
    offsets = augmentation.shift_offsets(augmentation_key(state), batch.action.shape[0], pad)
    batch = batch._replace(
        observation=augmentation.shift(batch.observation, offsets, pad, hw_axes=(0, 1)),
        next_observation=augmentation.shift(batch.next_observation, offsets, pad, hw_axes=(0, 1)))
  return gradient_step(state, batch, cfg)


def windows_batch(windows: FrameWindows, cfg: ExperimentConfig) -> Transition:
  """The `Transition` that `update` trains on, from frame windows, with jax.numpy (jittable).

  For a network with the strided patchify stem (`q_network.takes_frame_patches`, cpu_small's),
  the observations are `FramePatches`: every window frame is preprocessed and cut into patches
  once, for all the stack positions it fills (a P = 4 item: 10 frames for 32 frame uses), which
  halves the stem's cost (docs/history/performance_log.md). Otherwise uint8 stacks
  (`to_transition`)."""
  if not q_network.takes_frame_patches(cfg.network):
    return windows.to_transition()
  patches = q_network.frame_patches(jnp.asarray(windows.frames), cfg.network)
  item = windows.item_index()
  return Transition(
      observation=q_network.FramePatches(patches, item, jnp.asarray(windows.start, jnp.int32)),
      action=windows.action, reward=windows.reward, discount=windows.discount,
      next_observation=q_network.FramePatches(patches, item, windows.next_first()),
      game_id=windows.game_id)


@functools.partial(jax.jit, static_argnames=('cfg',), donate_argnums=(0,))
def update_from_windows(state: TrainState, windows: FrameWindows, cfg: ExperimentConfig
                        ) -> tuple[TrainState, dict[str, jax.Array]]:
  """`update` on frame windows (the Reverb path's batches): the observations are made from the
  windows on the device (`windows_batch`), fused into the step. With `agent.random_shift` > 0
  each item's frames first move by one random shift (all its transitions, both observations)."""
  pad = cfg.agent.random_shift
  if pad:
    offsets = augmentation.shift_offsets(augmentation_key(state), windows.frames.shape[0], pad)
    windows = windows._replace(
        frames=augmentation.shift(jnp.asarray(windows.frames), offsets, pad, hw_axes=(1, 2)))
  return gradient_step(state, windows_batch(windows, cfg), cfg)


# The fields of a TrainState that `pack_state` packs; rng and step stay as they are.
PACKED_FIELDS = ('params', 'behaviour_params', 'target_params', 'opt_state')


@functools.lru_cache(maxsize=None)
def state_packing(cfg: ExperimentConfig) -> dict[str, Packing]:
  """The layout of each packed field of the config's train state (from shapes alone)."""
  like = jax.eval_shape(lambda: init_state(cfg, jax.random.PRNGKey(0)))
  return {f: Packing.of(getattr(like, f)) for f in PACKED_FIELDS}


def pack_state(state: TrainState, cfg: ExperimentConfig) -> TrainState:
  """`state` with each of `PACKED_FIELDS` as a tuple of flat buffers, one per dtype
  (`packing.Packing`): 6 buffers (7 with discrete BCQ's behaviour model), against 143 leaves for
  cpu_small and 1615 for ResNet-101. What a Learner with `train.packed_state` holds and
  `packed_update` steps."""
  packing = state_packing(cfg)
  return state._replace(**{f: packing[f].pack(getattr(state, f)) for f in PACKED_FIELDS})


def unpack_state(packed: TrainState, cfg: ExperimentConfig) -> TrainState:
  """The TrainState of `pack_state`'s result: the trees checkpoints, policies and `update`
  take."""
  packing = state_packing(cfg)
  return packed._replace(**{f: packing[f].unpack(getattr(packed, f)) for f in PACKED_FIELDS})


# Both jitted (the config is static): new buffers, placed like their inputs. What a Learner with
# `train.packed_state` packs its state with (and the benchmarks theirs).
pack_state_jit = jax.jit(pack_state, static_argnums=1)
unpack_state_jit = jax.jit(unpack_state, static_argnums=1)


@functools.partial(jax.jit, static_argnames=('cfg',), donate_argnums=(0,))
def packed_update(packed: TrainState, batch: Transition | FrameWindows, cfg: ExperimentConfig
                  ) -> tuple[TrainState, dict[str, jax.Array]]:
  """`update_from_windows` (for `FrameWindows`) or `update` on a packed state (`pack_state`):
  the same step, with a few buffers crossing the jit boundary instead of every leaf
  (`train.packed_state`, docs/history/performance_log.md). The target refresh picks between the
  packed buffers, so that between refreshes the target's buffer passes through untouched."""
  step_fn = update_from_windows if isinstance(batch, FrameWindows) else update
  new_state, metrics = step_fn(unpack_state(packed, cfg), batch, cfg=cfg)
  packing = state_packing(cfg)
  new = new_state._replace(**{f: packing[f].pack(getattr(new_state, f))
                              for f in PACKED_FIELDS if f != 'target_params'})
  target = refreshed_target(new.step, new.params, packed.target_params, cfg)
  return new._replace(target_params=target), metrics


def compiler_options(cfg: ExperimentConfig, devices: Sequence[jax.Device]) -> dict[str, Any]:
  """The XLA options the learner's update is compiled with: XLA's classic CPU runtime when
  `train.xla_cpu_use_thunk_runtime` is False and the devices are CPUs; else none."""
  if cfg.train.xla_cpu_use_thunk_runtime or any(d.platform != 'cpu' for d in devices):
    return {}
  return {'xla_cpu_use_thunk_runtime': False}


def dilated_convolutions(hlo_text: str) -> list[str]:
  """The names of the dilated convolutions (strided convolutions' gradients) in HLO text."""
  return [line.split('=')[0].strip() for line in hlo_text.splitlines()
          if ' convolution(' in line and '_dilate=' in line]


def compile_update(state: TrainState, batch: Transition | FrameWindows, cfg: ExperimentConfig
                   ) -> jax.stages.Compiled:
  """`update_from_windows` (for `FrameWindows`) or `update`, or `packed_update` with
  `train.packed_state` (`state` then packed), compiled ahead of time for these arguments (their
  shapes and shardings) with `compiler_options` for the devices the state is on: what
  `Learner.step` runs.

  The classic CPU runtime of jaxlib 0.4.34 aborts the process on a dilated convolution (a strided
  convolution's gradient: it calls its threaded Eigen convolution without a completion callback,
  "Check failed: use_thread_pool == static_cast<bool>(done_callback)"). The config check refuses
  it for the networks known to have one (`q_network.has_strided_convolutions`); for any other
  update that has one, this raises ValueError before the first step."""
  if cfg.train.packed_state:
    step_fn = packed_update
  else:
    step_fn = update_from_windows if isinstance(batch, FrameWindows) else update
  options = compiler_options(cfg, list(jax.tree_util.tree_leaves(state)[0].devices()))
  compiled = step_fn.lower(state, batch, cfg=cfg).compile(compiler_options=options)
  if options:
    dilated = dilated_convolutions(compiled.as_text())
    if dilated:
      raise ValueError(
          f'train.xla_cpu_use_thunk_runtime=False ({cfg.name}): the update of this network has '
          f'{len(dilated)} dilated convolution(s) (strided convolutions\' gradients, e.g. '
          f'{dilated[0]}), on which XLA\'s classic CPU runtime aborts the process; set it to '
          f'True for this network')
  return compiled


def check_batch(batch: Transition | FrameWindows, cfg: ExperimentConfig, batch_size: int) -> None:
  """Raises ValueError naming the field of a malformed batch (host-side, cheap)."""
  if isinstance(batch, FrameWindows):
    per_item = cfg.data.transitions_per_item
    width = cfg.agent.n_step + 3 + per_item
    expected = dict(frames=((batch_size // per_item, width, 84, 84), np.uint8),
                    next_start=((batch_size,), np.int32), start=((batch_size,), np.int32))
  elif isinstance(batch, Transition):
    expected = dict(observation=((batch_size, 84, 84, 4), np.uint8),
                    next_observation=((batch_size, 84, 84, 4), np.uint8))
  else:
    raise TypeError('the data iterator must yield scaled_ql.types.Transition or FrameWindows, '
                    f'got {type(batch)}')
  expected.update(action=((batch_size,), np.int32), reward=((batch_size,), np.float32),
                  discount=((batch_size,), np.float32), game_id=((batch_size,), np.int32))
  for name, (shape, dtype) in expected.items():
    value = getattr(batch, name)
    if tuple(value.shape) != shape or np.dtype(value.dtype) != dtype:
      raise ValueError(f'batch.{name}: expected {np.dtype(dtype).name}{list(shape)}, got '
                       f'{np.dtype(value.dtype).name}{list(value.shape)}')
  game_id, action = np.asarray(batch.game_id), np.asarray(batch.action)
  if game_id.min() < 0 or game_id.max() >= len(cfg.games):
    raise ValueError(f'batch.game_id out of range [0, {len(cfg.games)}) for games {cfg.games}')
  counts = np.asarray(builder.agent_networks(cfg).action_mask.sum(axis=1))
  bad = (action < 0) | (action >= counts[game_id])
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f'batch.action {int(action[i])} is not a valid action of '
                     f'{cfg.games[game_id[i]]} (minimal action set of {counts[game_id[i]]})')


class Learner:
  """Acme's Learner seam: `step()`, `get_variables(names)`, `save()`, `restore(state)`, `steps`.

  It owns the train state, placed for data parallelism over `devices` (default: all local ones),
  and the iterator of batches. Nothing else: `runner.LearnerRunner` wraps it for a training
  process (Orbax checkpoints, NaN checks, metrics, config.json, signals).
  """

  def __init__(self, cfg: ExperimentConfig, iterator: Iterator[Transition], *,
               devices: Optional[Sequence[jax.Device]] = None, initial_params: Any = None):
    """`initial_params`: Q-network params to start from instead of a random init (online and
    target network; e.g. `transfer.finetune_params`). A restored state replaces them."""
    builder.check_agent_config(cfg)
    self._cfg = cfg
    self._iterator = iterator
    devices = list(devices or jax.local_devices())
    batch_size = cfg.agent.batch_size
    if batch_size % len(devices):
      raise ValueError(f'batch size {batch_size} (agent.games_per_batch x '
                       f'agent.transitions_per_game) is not divisible by the {len(devices)} '
                       f'local devices the batch is split over')
    self._batch_size = batch_size
    mesh = Mesh(np.asarray(devices), ('batch',))
    self._replicated = NamedSharding(mesh, PartitionSpec())
    self._batch_sharding = NamedSharding(mesh, PartitionSpec('batch'))
    rng = jax.random.PRNGKey(cfg.train.seed)
    if initial_params is not None:
      like = jax.eval_shape(lambda: init_state(cfg, rng)).params
      builder.check_same_structure(initial_params, like, 'initial_params')
    # The jitted init returns new buffers: the caller's `initial_params` stay valid although the
    # train state is donated to `update`.
    state = jax.device_put(initial_state(cfg, rng, initial_params), self._replicated)
    # Shapes, dtypes and shardings of the state: what a checkpoint restore fills.
    self._abstract_state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    if cfg.train.packed_state:
      state = jax.device_put(pack_state_jit(state, cfg), self._replicated)
    self._state = state
    self._steps = 0
    # The next batch on its way to the devices (or the exception taking it raised): see `step`.
    self._prefetched: Transition | FrameWindows | Exception | None = None
    # The update compiled for each batch type (`compile_update`), at its first step.
    self._compiled: dict[type, jax.stages.Compiled] = {}

  @property
  def cfg(self) -> ExperimentConfig:
    return self._cfg

  @property
  def steps(self) -> int:
    return self._steps

  @property
  def state(self) -> TrainState:
    """The train state as trees (with `train.packed_state`, a copy unpacked from the buffers
    the learner steps)."""
    if self._cfg.train.packed_state:
      return unpack_state_jit(self._state, self._cfg)
    return self._state

  @property
  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the state: the target of a checkpoint restore."""
    return self._abstract_state

  def step(self) -> dict[str, float]:
    """One gradient step on the next batch; returns the batch means of the loss terms (host
    floats, possibly non-finite: checking them is the caller's, see `runner.LearnerRunner`).

    With `train.device_prefetch` the batch after this one is taken, checked and put on the
    devices while this step runs. What that raises (the end of the data, a malformed batch, a
    data error) is raised by the next `step()`, the one that would have trained on it."""
    if self._prefetched is None:
      self._prefetched = self._next_device_batch()
    batch, self._prefetched = self._prefetched, None
    if isinstance(batch, Exception):
      raise batch  # (the next call takes the iterator's next batch, as without prefetch)
    update_fn = self._compiled.get(type(batch))
    if update_fn is None:
      update_fn = self._compiled[type(batch)] = compile_update(self._state, batch, self._cfg)
    self._state, metrics = update_fn(self._state, batch)  # dispatched, not done
    self._steps += 1
    if self._cfg.train.device_prefetch:
      self._prefetched = self._next_device_batch()
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

  def _next_device_batch(self) -> Transition | FrameWindows | Exception:
    """The iterator's next batch, checked and on its way to the devices; or what that raised."""
    try:
      batch = next(self._iterator)
      check_batch(batch, self._cfg, self._batch_size)
    except Exception as e:  # StopIteration included; KeyboardInterrupt etc. propagate now
      return e
    return jax.device_put(type(batch)(*map(np.asarray, batch)), self._batch_sharding)

  def get_variables(self, names: Sequence[str] = ('params',)) -> list[Any]:
    """Host copies. 'params': what `actors.make_policy` takes (`Method.policy_params`; for 'bcq'
    {'q', 'behaviour'}): the moving average of the online params when `agent.policy_params_ema`
    > 0 (`builder.policy_trainable`), else the online params; 'online_params': the online ones
    always; also 'target_params', 'behaviour_params', 'opt_state', 'step'."""
    s = self.state
    method = methods.get(self._cfg.agent.loss)
    policy = lambda trainable: method.policy_params(*trainable)
    table = dict(params=lambda: policy(builder.policy_trainable(
                     self._cfg.agent, (s.params, s.behaviour_params), s.opt_state)),
                 online_params=lambda: policy((s.params, s.behaviour_params)),
                 target_params=lambda: s.target_params,
                 behaviour_params=lambda: s.behaviour_params,
                 opt_state=lambda: s.opt_state, step=lambda: s.step)
    unknown = [n for n in names if n not in table]
    if unknown:
      raise KeyError(f'unknown variable(s) {unknown}; available: {sorted(table)}')
    return [jax.device_get(table[n]()) for n in names]

  def save(self) -> TrainState:
    """The whole train state (on the devices; Acme's `save`): what a checkpoint holds. Trees,
    whether or not the learner steps a packed state: checkpoints are the same either way."""
    return self.state

  def restore(self, state: TrainState) -> None:
    """Continues from `state` (e.g. a checkpoint's, shaped like `abstract_state`).

    The state is copied into buffers of XLA's own: `update` donates its state, and donating the
    buffers a checkpoint was restored into, to an update loaded from JAX's persistent compilation
    cache (JAX_COMPILATION_CACHE_DIR), corrupted the heap ('corrupted double-linked list', a
    segfault) or stepped to NaN, with jaxlib 0.4.34 on the CPU. With the copy the restored run is
    exact, cache or not (`benchmarks/compilation_cache_restore.py`).
    """
    state = jax.device_put(state, self._replicated)
    if self._cfg.train.packed_state:  # (packing writes new buffers too)
      self._state = jax.device_put(pack_state_jit(state, self._cfg), self._replicated)
    else:
      self._state = jax.tree_util.tree_map(lambda x: x.copy(), state)
    self._steps = int(self._state.step)

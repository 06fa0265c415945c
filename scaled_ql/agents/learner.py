"""The offline learner: Scaled QL's gradient step (Eq. 1) behind Acme's Learner seam.

    learner = Learner(cfg, iterator_of_transitions, workdir)
    learner.restore()                 # resume from the latest checkpoint, if any
    metrics = learner.step()          # one gradient step on one batch
    params, = learner.get_variables() # what actors and evaluators use

Read in order: `TrainState` (everything a step changes), `init_state`, `batch_loss` (the batch
mean of the per-transition terms of the configured method, `methods/`), `update` (the module-level jitted step: grad,
Adam, periodic target copy; benchmarkable alone, see benchmarks/learner_step.py), `Learner`
(data-parallel placement, NaN checks, metrics, checkpoints, SIGTERM/SIGINT handling).

Data parallelism: the batch is split over all local devices along a 1-D `('batch',)` mesh and the
train state is replicated; XLA inserts the gradient all-reduce. The result equals the 1-device
result up to float reassociation (tests/test_learner.py checks 1 vs 4 CPU devices).
"""
from __future__ import annotations

import functools
import os
import signal
import threading
import time
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scaled_ql import loggers as loggers_lib
from scaled_ql.agents import builder, checkpointing, methods
from scaled_ql.configs.base import ExperimentConfig
from scaled_ql.types import FrameWindows, McProbe, Transition


class TrainState(NamedTuple):
  params: Any  # online Q-network (policy network for 'bc')
  behaviour_params: Any  # discrete BCQ's behaviour model; an empty dict otherwise
  target_params: Any  # copy of `params`, refreshed every agent.target_update_period steps
  opt_state: Any  # Adam state of (params, behaviour_params)
  rng: jax.Array  # PRNG key, split once per step (kept so that a resumed run is bit-identical)
  step: jax.Array  # int32 number of gradient steps taken


class NonFiniteLossError(FloatingPointError):
  """A loss term or the gradient norm became NaN/inf; the run stops, the last checkpoint stays."""


class StopTraining(SystemExit):
  """Raised by `Learner.step` after a SIGTERM/SIGINT, once the state is checkpointed (exit 0)."""

  def __init__(self, message: str):
    super().__init__(0)
    self.message = message

  def __str__(self) -> str:
    return self.message


def probe_q_values(cfg: ExperimentConfig, params: Any, probe: McProbe) -> np.ndarray:
  """Q(s, a_data) of the probe's transitions under Q-network `params` (not for 'bc')."""
  return np.asarray(_probe_q(params, probe.observation, probe.game_id, probe.action, cfg=cfg))


@functools.partial(jax.jit, static_argnames=('cfg',))
def _probe_q(params, observation, game_id, action, cfg):
  nets = builder.agent_networks(cfg)
  logits = nets.q.apply(params, observation, game_id).logits
  q = methods.get(cfg.agent.loss).q_values(logits, jnp.asarray(nets.atoms))
  return jnp.take_along_axis(q, action[:, None], axis=1)[:, 0]


def init_state(cfg: ExperimentConfig, rng: jax.Array) -> TrainState:
  nets = builder.agent_networks(cfg)
  init_rng, bcq_rng, rng = jax.random.split(rng, 3)
  params = nets.q.init(init_rng, *builder.dummy_inputs())
  behaviour_params = nets.behaviour.init(bcq_rng, *builder.dummy_inputs()) if nets.behaviour else {}
  opt_state = builder.make_optimizer(cfg.agent).init((params, behaviour_params))
  return TrainState(params=params, behaviour_params=behaviour_params,
                    target_params=jax.tree_util.tree_map(jnp.copy, params), opt_state=opt_state,
                    rng=rng, step=jnp.zeros((), jnp.int32))


_init_state_jit = jax.jit(init_state, static_argnums=0)


def batch_loss(trainable: tuple[Any, Any], target_params: Any, batch: Transition,
               cfg: ExperimentConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over the batch of the per-transition terms of the method `cfg.agent.loss` names
  (`methods/`); returns (loss, terms)."""
  params, behaviour_params = trainable
  terms = methods.get(cfg.agent.loss).batch_loss(
      builder.agent_networks(cfg), params, behaviour_params, target_params, batch, cfg.agent)
  means = {k: jnp.mean(v) for k, v in terms.items()}
  return means['loss'], means


@functools.partial(jax.jit, static_argnames=('cfg',), donate_argnums=(0,))
def update(state: TrainState, batch: Transition, cfg: ExperimentConfig
           ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One gradient step. Placement (data parallelism) follows the shardings of the inputs."""
  optimizer = builder.make_optimizer(cfg.agent)
  trainable = (state.params, state.behaviour_params)
  grads, metrics = jax.grad(batch_loss, has_aux=True)(trainable, state.target_params, batch, cfg)
  updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
  params, behaviour_params = optax.apply_updates(trainable, updates)
  step = state.step + 1
  # lax.cond, not jnp.where: between refreshes the (donated) target buffers pass through untouched
  # instead of being read and rewritten every step.
  refresh = (step % cfg.agent.target_update_period) == 0
  target_params = jax.lax.cond(refresh, lambda: params, lambda: state.target_params)
  rng, _ = jax.random.split(state.rng)
  metrics['grad_norm'] = optax.global_norm(grads)
  new_state = TrainState(params=params, behaviour_params=behaviour_params,
                         target_params=target_params, opt_state=opt_state, rng=rng, step=step)
  return new_state, metrics


@functools.partial(jax.jit, static_argnames=('cfg',), donate_argnums=(0,))
def update_from_windows(state: TrainState, windows: FrameWindows, cfg: ExperimentConfig
                        ) -> tuple[TrainState, dict[str, jax.Array]]:
  """`update` on frame windows (the Reverb path's batches): the observation and next observation
  stacks are cut from the windows on the device, fused into the step."""
  return update(state, windows.to_transition(), cfg=cfg)


def check_batch(batch: Transition | FrameWindows, cfg: ExperimentConfig, batch_size: int) -> None:
  """Raises ValueError naming the field of a malformed batch (host-side, cheap)."""
  if isinstance(batch, FrameWindows):
    width = cfg.agent.n_step + 4
    expected = dict(frames=((batch_size, width, 84, 84), np.uint8),
                    next_start=((batch_size,), np.int32))
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
  """Acme-style learner: `step()`, `get_variables(names)`, `save()`, `restore()`, `steps`."""

  def __init__(self, cfg: ExperimentConfig, iterator: Iterator[Transition],
               workdir: Optional[str] = None, *, logger: Optional[loggers_lib.Logger] = None,
               handle_signals: bool = True, devices: Optional[Sequence[jax.Device]] = None,
               initial_params: Any = None, mc_probe: Optional[McProbe] = None):
    """`initial_params`: Q-network params to start from instead of a random init (online and
    target network; e.g. `transfer.finetune_params`). A checkpoint found by `restore()` wins.
    `mc_probe`: transitions whose Q(s, a_data) is logged against their Monte-Carlo return at
    every log step (`datasets.mc_probe.load_mc_probe`; ignored for 'bc': its outputs are not Q)."""
    builder.check_agent_config(cfg)
    self._mc_probe = mc_probe if methods.get(cfg.agent.loss).outputs_q else None
    if self._mc_probe is not None:
      probe = self._mc_probe
      if len(probe.action) == 0 or tuple(probe.observation.shape[1:]) != (84, 84, 4):
        raise ValueError('mc_probe: expected uint8 [P>0, 84, 84, 4] observations, got '
                         f'{tuple(probe.observation.shape)}')
      if int(np.max(probe.game_id)) >= len(cfg.games):
        raise ValueError(f'mc_probe.game_id out of range [0, {len(cfg.games)}) for {cfg.games}')
    self._cfg = cfg
    self._iterator = iterator
    self._workdir = workdir
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
    state = _init_state_jit(cfg, jax.random.PRNGKey(cfg.train.seed))
    if initial_params is not None:
      from scaled_ql.agents import transfer
      transfer.check_same_structure(initial_params, state.params, 'initial_params')
      # Copies: the train state is donated to `update`, the caller's arrays must stay valid.
      params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), initial_params)
      state = state._replace(params=params, target_params=jax.tree_util.tree_map(jnp.copy, params))
    self._state = jax.device_put(state, self._replicated)
    # Shapes, dtypes and shardings of the state: what a restore fills (even after a failure).
    self._abstract_state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self._state)
    self._steps = 0
    self._failure: Optional[str] = None  # set by a non-finite step: the state is gone
    self._logger = logger or loggers_lib.make_logger('learner', workdir)
    self._window: dict[str, float] = {}
    self._window_count = 0
    self._window_start = time.perf_counter()
    self._data_counts: dict[str, float] = {}  # set_data_counts
    self._compiled = False
    self._stop_signal: Optional[int] = None
    self._previous_handlers: dict[int, Any] = {}
    self._manager = None
    if workdir is not None:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
        f.write(cfg.to_json())
      self._manager = checkpointing.make_manager(workdir)
      if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
          self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

  # ----------------------------------------------------------------------------------------
  @property
  def steps(self) -> int:
    return self._steps

  @property
  def state(self) -> TrainState:
    return self._state

  def step(self) -> dict[str, float]:
    self._check_alive()
    batch = next(self._iterator)
    check_batch(batch, self._cfg, self._batch_size)
    batch = jax.device_put(type(batch)(*map(np.asarray, batch)), self._batch_sharding)
    step_fn = update_from_windows if isinstance(batch, FrameWindows) else update
    new_state, metrics = step_fn(self._state, batch, cfg=self._cfg)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    step = self._steps + 1
    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
    if bad:
      last = self._manager.latest_step() if self._manager else None
      kept = (f'the last good checkpoint (step {last}) is kept in {self._workdir}'
              if last is not None else 'no checkpoint was written yet')
      # The previous state was donated to `update`: this learner cannot continue or save.
      self._failure = (f'non-finite {", ".join(f"{k}={metrics[k]}" for k in bad)} at learner '
                       f'step {step} (config {self._cfg.name}); {kept}')
      raise NonFiniteLossError(self._failure)
    self._state, self._steps = new_state, step
    self._log(metrics)
    if self._manager is not None and step % self._cfg.train.checkpoint_every_steps == 0:
      self.save()
    if self._stop_signal is not None:
      name = signal.Signals(self._stop_signal).name
      if self._manager is not None:
        self.save()
      raise StopTraining(f'{name} received: stopped after step {step}'
                         + (f', checkpoint saved in {self._workdir}' if self._manager else ''))
    return metrics

  def run(self, num_steps: Optional[int] = None) -> int:
    """Steps until `num_steps` (default cfg.train.num_steps) in total, then saves; returns steps.

    A SIGTERM/SIGINT, or the end of the data, ends the loop early (with a checkpoint)."""
    num_steps = self._cfg.train.num_steps if num_steps is None else num_steps
    try:
      while self._steps < num_steps:
        self.step()
    except StopTraining as stop:
      print(stop.message, flush=True)
      return self._steps
    except StopIteration:
      print(f'the data iterator is exhausted after step {self._steps}', flush=True)
    if self._manager is not None and self._manager.latest_step() != self._steps:
      self.save()
    return self._steps

  def set_data_counts(self, counts: dict[str, float]) -> None:
    """Counters of the data pipeline (e.g. corrupt files and undecodable episodes the inserters
    skipped), logged as `data/<name>` with every metrics line from now on."""
    self._data_counts = {f'data/{k}': float(v) for k, v in counts.items()}

  def get_variables(self, names: Sequence[str] = ('params',)) -> list[Any]:
    """Host copies. 'params': what `actors.make_policy` takes (for 'bcq' {'q', 'behaviour'});
    also 'target_params', 'behaviour_params', 'opt_state', 'step'."""
    self._check_alive()
    s = self._state
    method = methods.get(self._cfg.agent.loss)
    table = dict(params=lambda: method.policy_params(s.params, s.behaviour_params),
                 target_params=lambda: s.target_params,
                 behaviour_params=lambda: s.behaviour_params,
                 opt_state=lambda: s.opt_state, step=lambda: s.step)
    unknown = [n for n in names if n not in table]
    if unknown:
      raise KeyError(f'unknown variable(s) {unknown}; available: {sorted(table)}')
    return [jax.device_get(table[n]()) for n in names]

  def save(self) -> None:
    if self._manager is None:
      raise ValueError('Learner.save: this learner has no workdir')
    self._check_alive()
    checkpointing.save(self._manager, self._state, self._cfg)

  def restore(self) -> bool:
    """Loads the latest checkpoint of the workdir, if any; returns whether one was loaded."""
    if self._manager is None:
      raise ValueError('Learner.restore: this learner has no workdir')
    restored = checkpointing.restore(self._manager, self._abstract_state, self._cfg)
    if restored is None:
      return False
    self._state = restored
    self._steps = int(restored.step)
    self._failure = None  # a learner stopped by a non-finite loss can resume from a good state
    return True

  def close(self) -> None:
    for sig, handler in self._previous_handlers.items():
      signal.signal(sig, handler)
    self._previous_handlers.clear()
    if self._manager is not None:
      self._manager.close()
    self._logger.close()

  # ----------------------------------------------------------------------------------------
  def _check_alive(self) -> None:
    if self._failure is not None:
      raise NonFiniteLossError(f'this learner stopped earlier: {self._failure}')

  def _on_signal(self, signum, frame) -> None:
    del frame
    if self._stop_signal is not None:  # a second signal: stop waiting for the step boundary
      previous = self._previous_handlers.get(signum, signal.SIG_DFL)
      self.close()
      if callable(previous):
        previous(signum, None)
      else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
      return
    self._stop_signal = signum

  def _log(self, metrics: dict[str, float]) -> None:
    if not self._compiled:  # the first step compiles: keep it out of the averages and steps/s
      self._compiled = True
      self._window_start = time.perf_counter()
      if self._steps % self._cfg.train.log_every_steps:
        return
    else:
      for k, v in metrics.items():
        self._window[k] = self._window.get(k, 0.0) + v
      self._window_count += 1
    if self._steps % self._cfg.train.log_every_steps:
      return
    if self._window_count == 0:  # logging right at the first step: report it alone
      self._logger.write(self._steps, {**metrics, **self._data_counts})
      return
    elapsed = time.perf_counter() - self._window_start
    out = {k: v / self._window_count for k, v in self._window.items()}
    out['steps_per_s'] = self._window_count / max(elapsed, 1e-9)
    out['samples_per_s'] = out['steps_per_s'] * self._batch_size
    out.update(self._data_counts)
    out.update(self._probe_metrics())
    self._logger.write(self._steps, out)
    self._window, self._window_count = {}, 0
    self._window_start = time.perf_counter()

  def _probe_metrics(self) -> dict[str, float]:
    if self._mc_probe is None:
      return {}
    q = probe_q_values(self._cfg, self._state.params, self._mc_probe)
    g = self._mc_probe.mc_return
    corr = float(np.corrcoef(q, g)[0, 1]) if q.std() > 0 and g.std() > 0 else 0.0
    return dict(probe_q_data=float(q.mean()), probe_mc_return=float(g.mean()),
                probe_q_minus_mc_return=float((q - g).mean()), probe_q_mc_corr=corr)

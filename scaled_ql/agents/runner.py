"""What a training process does around a Learner's steps (Acme's `CheckpointingRunner` habit).

    runner = LearnerRunner(Learner(cfg, batches), workdir)
    runner.restore()                  # resume from the latest checkpoint of the workdir, if any
    runner.run()                      # cfg.train.num_steps steps, then a final checkpoint
    runner.close()

`LearnerRunner` wraps a `learner.Learner` and adds, in this order around each `step()`: the NaN
check (a non-finite loss term or gradient norm stops the run, naming the step and the last good
checkpoint), the metric windows (means over `train.log_every_steps` steps, steps/s, the data
pipeline's counters, the Monte-Carlo probe), the periodic Orbax checkpoint, and the stop at a step
boundary after SIGTERM/SIGINT (with a checkpoint). With a workdir it writes WORKDIR/config.json
(`configs.overrides.write_file`) and checkpoints into WORKDIR/checkpoints (`checkpointing`).
"""
from __future__ import annotations

import collections
import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scaled_ql import compilation_cache, loggers as loggers_lib
from scaled_ql.agents import builder, checkpointing, losses, methods
from scaled_ql.agents.learner import Learner
from scaled_ql.configs import overrides
from scaled_ql.configs.base import ExperimentConfig
from scaled_ql.types import McProbe


class NonFiniteLossError(FloatingPointError):
  """A loss term or the gradient norm became NaN/inf; the run stops, the last checkpoint stays."""


class StopTraining(SystemExit):
  """Raised by `LearnerRunner.step` after a SIGTERM/SIGINT, once the state is checkpointed
  (exit 0)."""

  def __init__(self, message: str):
    super().__init__(0)
    self.message = message

  def __str__(self) -> str:
    return self.message


def probe_q_values(cfg: ExperimentConfig, params: Any, probe: McProbe) -> np.ndarray:
  """Q(s, a_data) of the probe's transitions under Q-network `params` (not for 'bc')."""
  q = probe_q_table(cfg, params, probe)
  return q[np.arange(len(probe.action)), probe.action]


def probe_q_table(cfg: ExperimentConfig, params: Any, probe: McProbe) -> np.ndarray:
  """Q(s, a) of every action at the probe's states, float32 [P, A_max]; -inf where `a` is not a
  valid action of the transition's game (not for 'bc')."""
  return np.asarray(_probe_q(params, probe.observation, probe.game_id, cfg=cfg))


@functools.partial(jax.jit, static_argnames=('cfg',))
def _probe_q(params, observation, game_id, cfg):
  nets = builder.agent_networks(cfg)
  logits = nets.q.apply(params, observation, game_id).logits
  q = methods.get(cfg.agent.loss).q_values(logits, jnp.asarray(nets.atoms))
  return jnp.where(jnp.asarray(nets.action_mask)[game_id], q, -jnp.inf)


@jax.jit
def _greedy_and_gap(q):
  """The losses' own greedy action and action gap of each row of a `probe_q_table` (-inf marks
  the actions a game does not have)."""
  valid = jnp.isfinite(q)
  return jax.vmap(losses.masked_argmax)(q, valid), jax.vmap(losses.action_gap)(q, valid)


def _corr(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation; 0.0 where either side is constant (or has fewer than 2 values)."""
  return float(np.corrcoef(x, y)[0, 1]) if len(x) > 1 and x.std() > 0 and y.std() > 0 else 0.0


def probe_game_metrics(q: np.ndarray, probe: McProbe, games: Sequence[str]) -> dict[str, float]:
  """Per-game diagnostics of the probe (`q`: `probe_q_table`), keyed `<game>/<name>`:

  - `greedy_is_data_action`: how often the greedy action (argmax over the game's valid actions;
    BCQ's policy also filters by its behaviour model, which this does not) is the data's;
  - `greedy_top_share`: the share of the game's probe states whose greedy action is the one the
    network picks most often there; 1.0 = one action everywhere (a collapsed policy: Atlantis'
    greedy NOOP on flawed data, docs/learning.md), to read against `data_top_share`, the same for
    the data's actions;
  - `action_gap`: best minus second-best valid Q, mean (0 = Q flat across actions);
  - `q_mc_corr`: the correlation of Q(s, a_data) with the Monte-Carlo return.

  The batch-mean diagnostics pool the games; one game can fail while the pool looks healthy."""
  out = {}
  greedy, gap = (np.asarray(x) for x in _greedy_and_gap(jnp.asarray(q)))
  q_data = q[np.arange(len(probe.action)), probe.action]

  def top(actions):
    return float(np.bincount(actions).max() / len(actions))

  for g, game in enumerate(games):
    idx = np.flatnonzero(probe.game_id == g)
    if not len(idx):
      continue
    out[f'{game}/greedy_is_data_action'] = float(np.mean(greedy[idx] == probe.action[idx]))
    out[f'{game}/greedy_top_share'] = top(greedy[idx])
    out[f'{game}/data_top_share'] = top(probe.action[idx])
    out[f'{game}/action_gap'] = float(gap[idx].mean())
    out[f'{game}/q_mc_corr'] = _corr(q_data[idx], probe.mc_return[idx])
  return out


def check_mc_probe(probe: McProbe, cfg: ExperimentConfig) -> None:
  if len(probe.action) == 0 or tuple(probe.observation.shape[1:]) != (84, 84, 4):
    raise ValueError('mc_probe: expected uint8 [P>0, 84, 84, 4] observations, got '
                     f'{tuple(probe.observation.shape)}')
  if int(np.max(probe.game_id)) >= len(cfg.games):
    raise ValueError(f'mc_probe.game_id out of range [0, {len(cfg.games)}) for {cfg.games}')


# `LearnerRunner.step` durations a runner keeps (~50 s of cpu_small's steps): the learner node's
# `status()['step_ms']` and benchmarks/program_throughput.py report their percentiles.
STEP_TIMES_KEPT = 1000


def step_time_percentiles(seconds: Sequence[float]) -> dict:
  """Step durations (seconds) -> {'p50', 'p90', 'p99': milliseconds, 'n': count}; {} for none.

  A learner slowed evenly (a busy neighbour all the time) moves p50; one stalled now and then (a
  burst of other work, a checkpoint) moves p90/p99 and the mean rate, not p50."""
  if len(seconds) == 0:
    return {}
  p50, p90, p99 = np.percentile(np.asarray(seconds, np.float64) * 1e3, [50, 90, 99])
  return dict(p50=float(p50), p90=float(p90), p99=float(p99), n=len(seconds))


class LearnerRunner:
  """A Learner with checkpoints, NaN checks, metrics and signal handling (see the module doc).

  The Learner's seam passes through: `step()`, `get_variables(names)`, `save()` and `restore()`
  (here: to and from the workdir's checkpoints), `steps`; `learner` is the wrapped Learner."""

  def __init__(self, learner: Learner, workdir: Optional[str] = None, *,
               logger: Optional[loggers_lib.Logger] = None, handle_signals: bool = True,
               mc_probe: Optional[McProbe] = None,
               game_logger: Optional[loggers_lib.Logger] = None,
               wake: Optional[Callable[[], None]] = None):
    """`mc_probe`: transitions whose Q(s, a_data) is logged against their Monte-Carlo return at
    every log step (`datasets.mc_probe.load_mc_probe`; ignored for 'bc': its outputs are not Q).
    With a probe, its per-game diagnostics (`probe_game_metrics`) go to `game_logger` (default,
    with a workdir: WORKDIR/learner_games.jsonl and TensorBoard, not stdout: 5 values per game).
    `handle_signals`: SIGTERM/SIGINT stop at the next step boundary with a checkpoint (with a
    workdir, in the main thread only). `wake`: called at the first such signal, to end a wait for
    data that no step boundary would end (`learn` closes its batches: the step waiting for one
    then ends the run as the end of the data does, with a checkpoint of the step it was at).
    An iterator that ends with `StopIteration(reason)` has its reason printed (`learn`: its Reverb
    server or an inserter died) instead of "the data iterator is exhausted"."""
    cfg = learner.cfg
    self._mc_probe = mc_probe if methods.get(cfg.agent.loss).outputs_q else None
    if self._mc_probe is not None:
      check_mc_probe(self._mc_probe, cfg)
    self._learner = learner
    self._cfg = cfg
    self._workdir = workdir
    self._failure: Optional[str] = None  # set by a non-finite step: the state is not usable
    self._logger = logger or loggers_lib.make_logger('learner', workdir)
    if game_logger is None and workdir is not None and self._mc_probe is not None:
      game_logger = loggers_lib.make_logger('learner_games', workdir, stdout=False)
    self._game_logger = game_logger if self._mc_probe is not None else None
    self._window: dict[str, float] = {}
    self._window_count = 0
    self._window_start = time.perf_counter()
    # Durations of the last STEP_TIMES_KEPT completed steps (data waits, logs and saves included).
    self._step_seconds: collections.deque = collections.deque(maxlen=STEP_TIMES_KEPT)
    self._data_counts: dict[str, float] = {}  # set_data_counts
    self._compiled = False
    self._stop_signal: Optional[int] = None
    self._wake = wake
    self._previous_handlers: dict[int, Any] = {}
    self._manager = None
    if workdir is not None:
      overrides.write_file(cfg, workdir)
      self._manager = checkpointing.make_manager(
          workdir, keep_period=cfg.train.keep_checkpoint_every_steps)
      if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
          self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

  # ----------------------------------------------------------------------------------------
  @property
  def learner(self) -> Learner:
    return self._learner

  @property
  def steps(self) -> int:
    return self._learner.steps

  @property
  def stop_signal(self) -> Optional[int]:
    """The SIGTERM/SIGINT that stopped the run, or None."""
    return self._stop_signal

  def step_ms(self, last: Optional[int] = None) -> dict:
    """`step_time_percentiles` of the last `last` steps (default: all STEP_TIMES_KEPT kept; {}
    before the first)."""
    kept = list(self._step_seconds)
    if last is not None:
      kept = kept[max(0, len(kept) - last):]
    return step_time_percentiles(kept)

  def step(self) -> dict[str, float]:
    started = time.perf_counter()
    self._check_alive()
    metrics = self._learner.step()
    step = self._learner.steps
    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
    if bad:
      last = self._manager.latest_step() if self._manager else None
      kept = (f'the last good checkpoint (step {last}) is kept in {self._workdir}'
              if last is not None else 'no checkpoint was written yet')
      # The learner now holds the non-finite state: no step, save or get_variables until a restore.
      self._failure = (f'non-finite {", ".join(f"{k}={metrics[k]}" for k in bad)} at learner '
                       f'step {step} (config {self._cfg.name}); {kept}')
      raise NonFiniteLossError(self._failure)
    self._log(metrics)
    if self._manager is not None and step % self._cfg.train.checkpoint_every_steps == 0:
      self.save()
    if self._stop_signal is not None:
      name = signal.Signals(self._stop_signal).name
      if self._manager is not None:
        self.save()
      raise StopTraining(f'{name} received: stopped after step {step}'
                         + (f', checkpoint saved in {self._workdir}' if self._manager else ''))
    self._step_seconds.append(time.perf_counter() - started)
    if len(self._step_seconds) == 1:  # this start's first step: its compiles (or cache loads)
      cache = compilation_cache.describe()
      print(f'learner: the first step of this start (step {step}) took '
            f'{self._step_seconds[0]:.1f} s (its compile and its wait for data included)'
            + (f'; {cache}' if cache else ''), flush=True)
    return metrics

  def run(self, num_steps: Optional[int] = None) -> int:
    """Steps until `num_steps` (default cfg.train.num_steps) in total, then saves; returns steps.

    A SIGTERM/SIGINT, or the end of the data, ends the loop early (with a checkpoint)."""
    num_steps = self._cfg.train.num_steps if num_steps is None else num_steps
    try:
      while self.steps < num_steps:
        self.step()
    except StopTraining as stop:
      print(stop.message, flush=True)
      return self.steps
    except StopIteration as end:
      if self._stop_signal is not None:  # woken from a wait for data (`wake`)
        print(f'{signal.Signals(self._stop_signal).name} received while waiting for data: '
              f'stopped after step {self.steps}', flush=True)
      else:
        reason = end.args[0] if end.args else 'the data iterator is exhausted'
        print(f'{reason}: stopped after step {self.steps}', flush=True)
    if self._manager is not None and self._manager.latest_step() != self.steps:
      self.save()
    return self.steps

  def set_data_counts(self, counts: dict[str, float]) -> None:
    """Counters of the data pipeline (e.g. corrupt files and undecodable episodes the inserters
    skipped), logged as `data/<name>` with every metrics line from now on."""
    self._data_counts = {f'data/{k}': float(v) for k, v in counts.items()}

  def get_variables(self, names: Sequence[str] = ('params',)) -> list[Any]:
    """`Learner.get_variables`, refused after a non-finite step."""
    self._check_alive()
    return self._learner.get_variables(names)

  def save(self) -> None:
    """Checkpoints the learner's state into WORKDIR/checkpoints (refused after a NaN)."""
    if self._manager is None:
      raise ValueError('LearnerRunner.save: this runner has no workdir')
    self._check_alive()
    checkpointing.save(self._manager, self._learner.save(), self._cfg)

  def restore(self) -> bool:
    """Loads the latest checkpoint of the workdir, if any; returns whether one was loaded."""
    if self._manager is None:
      raise ValueError('LearnerRunner.restore: this runner has no workdir')
    restored = checkpointing.restore(self._manager, self._learner.abstract_state, self._cfg)
    if restored is None:
      return False
    self._learner.restore(restored)
    self._failure = None  # a run stopped by a non-finite loss can resume from a good state
    return True

  def close(self) -> None:
    for sig, handler in self._previous_handlers.items():
      signal.signal(sig, handler)
    self._previous_handlers.clear()
    if self._manager is not None:
      self._manager.close()
    self._logger.close()
    if self._game_logger is not None:
      self._game_logger.close()

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
    if self._wake is not None:
      self._wake()

  def _log(self, metrics: dict[str, float]) -> None:
    steps = self.steps
    if not self._compiled:  # the first step compiles: keep it out of the averages and steps/s
      self._compiled = True
      self._window_start = time.perf_counter()
      if steps % self._cfg.train.log_every_steps:
        return
    else:
      for k, v in metrics.items():
        self._window[k] = self._window.get(k, 0.0) + v
      self._window_count += 1
    if steps % self._cfg.train.log_every_steps:
      return
    if self._window_count == 0:  # logging right at the first step: report it alone
      self._logger.write(steps, {**metrics, **self._data_counts})
      return
    elapsed = time.perf_counter() - self._window_start
    out = {k: v / self._window_count for k, v in self._window.items()}
    out['steps_per_s'] = self._window_count / max(elapsed, 1e-9)
    out['samples_per_s'] = out['steps_per_s'] * self._cfg.agent.batch_size
    out.update(self._data_counts)
    out.update(self._probe_metrics())
    self._logger.write(steps, out)
    self._window, self._window_count = {}, 0
    self._window_start = time.perf_counter()

  def _probe_metrics(self) -> dict[str, float]:
    if self._mc_probe is None:
      return {}
    probe = self._mc_probe
    table = probe_q_table(self._cfg, self._learner.state.params, probe)
    if self._game_logger is not None:
      self._game_logger.write(self.steps, probe_game_metrics(table, probe, self._cfg.games))
    q = table[np.arange(len(probe.action)), probe.action]
    g = probe.mc_return
    corr = _corr(q, g)
    return dict(probe_q_data=float(q.mean()), probe_mc_return=float(g.mean()),
                probe_q_minus_mc_return=float((q - g).mean()), probe_q_mc_corr=corr)

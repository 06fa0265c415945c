"""The nodes of the distributed program: plain classes that `program.py` turns into Ray actors.

Every node is self-driving: its constructor builds its component from the config and starts a
background thread that does the node's work (`_LoopNode`), so a node Ray restarts after a crash or
a kill carries on by itself (the learner from its last checkpoint). Meanwhile `status()` answers
the driver (the actors are threaded: `max_concurrency` > 1) and `stop()` ends the loop cleanly.
A loop that raises records the traceback in WORKDIR/logs/<node>.err and exits the process, so
Ray restarts the node (up to its `max_restarts`).

Heavy imports (JAX, TensorFlow, Reverb) happen inside the nodes, in their own processes.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable, Optional, Sequence

import ray

from scaled_ql.configs.base import ExperimentConfig
from scaled_ql.launch.variable_server import VariableClient, VariableServer

# How long a node waits between tries to reach a restarting Reverb server / params that are not
# yet published.
RETRY_SECONDS = 1.0


def _was_restarted() -> bool:
  if not ray.is_initialized():  # outside Ray (a unit test): ray.get_runtime_context() would
    return False                # start a local Ray cluster
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # Ray's own property uses a deprecated API internally
      return bool(ray.get_runtime_context().was_current_actor_reconstructed)
  except Exception:  # pylint: disable=broad-except  (not inside an actor: e.g. a unit test)
    return False


def _restarts() -> int:
  """How often this actor was restarted (0 outside Ray or on the first start)."""
  if not ray.is_initialized():
    return 0
  try:
    context = ray.get_runtime_context()
    if not _was_restarted():
      return 0
    from ray._private import state  # no public API for the count
    return int(state.actors(actor_id=context.get_actor_id()).get('NumRestarts', 1))
  except Exception:  # pylint: disable=broad-except
    return 0


class _LoopNode:
  """A background loop with stop/status; `_run_once()` returns False when the work is done."""

  name = 'node'

  def _start(self, workdir: Optional[str]) -> None:
    self._workdir = workdir
    self._stop = threading.Event()
    self._done = threading.Event()
    self._error: Optional[str] = None
    self._restarted = _was_restarted()
    self._started = time.time()
    self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
    self._thread.start()

  def _loop(self) -> None:
    try:
      while not self._stop.is_set():
        if self._run_once() is False:
          break
      self._done.set()
    except BaseException:  # pylint: disable=broad-except
      self._crash()

  def _crash(self) -> None:
    """Logs the traceback and ends the process, whatever fails on the way (stderr closed, disk
    full, `logs` not a directory): Ray restarts the node, and the driver sees every restart and
    ends the program on a crash loop (program.RestartBudget)."""
    try:
      self._error = traceback.format_exc()
      message = f'[{self.name}] crashed:\n{self._error}'
      try:
        print(message, file=sys.stderr, flush=True)
      finally:
        if self._workdir:
          os.makedirs(os.path.join(self._workdir, 'logs'), exist_ok=True)
          with open(os.path.join(self._workdir, 'logs', f'{self.name}.err'), 'a') as f:
            f.write(f'{time.strftime("%Y-%m-%d %H:%M:%S")} {message}\n')
    finally:
      os._exit(1)  # pylint: disable=protected-access

  def _run_once(self) -> Optional[bool]:
    raise NotImplementedError

  def _stop_loop(self, timeout: float = 60.0) -> None:
    self._stop.set()
    self._thread.join(timeout)

  def base_status(self) -> dict:
    return dict(name=self.name, pid=os.getpid(), restarted=self._restarted,
                done=self._done.is_set(), uptime_s=time.time() - self._started)

  def ping(self) -> int:
    return os.getpid()


class ReverbNode:
  """The Reverb server (one table per game) on the port chosen when the program was built, so a
  restarted server comes back at the same address and its clients reconnect by themselves
  (gRPC binds with SO_REUSEPORT, so the port is free again at once). Should binding fail, a free
  port is used and `address()` says which; clients then reconnect through a restart of their own
  node (their reconnect timeout)."""

  name = 'replay'

  def __init__(self, cfg: ExperimentConfig, port: int):
    from scaled_ql.datasets import reverb_tables
    self._cfg = cfg
    try:
      self._server = reverb_tables.make_server(cfg, port=port)
    except Exception as e:  # pylint: disable=broad-except  (port in use on this host)
      print(f'[replay] port {port} unavailable ({e}); using a free port', file=sys.stderr)
      self._server = reverb_tables.make_server(cfg, port=None)
    self._port = self._server.port
    self._restarted = _was_restarted()
    self._incarnation = f'{os.getpid()}-{time.time_ns()}'

  def address(self) -> str:
    host = ray.util.get_node_ip_address()
    return f'{host}:{self._port}'

  def incarnation(self) -> str:
    """Differs for every start of the server: a restarted server holds no data and counts its
    inserts from 0 (online fine-tuning's pacing starts over from it)."""
    return self._incarnation

  def status(self) -> dict:
    from scaled_ql.datasets import reverb_tables
    sizes = reverb_tables.table_sizes(f'localhost:{self._port}', self._cfg.games)
    return dict(name=self.name, pid=os.getpid(), restarted=self._restarted, table_sizes=sizes)

  def ping(self) -> int:
    return os.getpid()

  def stop(self) -> None:
    self._server.stop()


def _replay_incarnation(replay: str) -> Optional[str]:
  """`ReverbNode.incarnation()` of the replay node named `replay`; None while it restarts."""
  try:
    return ray.get(ray.get_actor(replay).incarnation.remote(), timeout=10)
  except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError):
    return None


def _reverb_address(replay: str) -> str:
  """The current address of the replay node named `replay`, waiting while it restarts.

  Nodes get the replay's actor NAME, not its handle: Ray cannot always restart an actor whose
  constructor arguments hold actor handles (ray-project/ray#53727)."""
  while True:
    try:
      return ray.get(ray.get_actor(replay).address.remote(), timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError):
      time.sleep(RETRY_SECONDS)


class InserterNode(_LoopNode):
  """Streams RLDS episodes of its share of the games (games[index::num_inserters]) into their
  Reverb tables, epoch after epoch (`reverb_tables.run_inserter`, which reconnects when the server
  comes back at its address).

  Throttle: `reverb_tables.InsertThrottle` (`DataConfig.samples_per_insert`), applied by
  `run_inserter` itself, so the `learn` command's inserter processes are throttled alike.
  """

  def __init__(self, cfg: ExperimentConfig, replay: str, index: int, num_inserters: int,
               workdir: Optional[str] = None):
    self.name = f'inserter_{index}'
    self._cfg, self._replay = cfg, replay
    self._games = tuple(cfg.games[index::num_inserters])
    if not self._games:
      raise ValueError(f'inserter {index} of {num_inserters} has no games ({len(cfg.games)} '
                       'games): lower DataConfig.num_inserters')
    self._throttle = None
    self._read_stats = None  # the reader's counters: episodes, corrupt files, undecodable episodes
    self._start(workdir)

  def _run_once(self) -> bool:
    from scaled_ql.datasets import reverb_tables
    address = _reverb_address(self._replay)
    # The throttle lives in the data layer (`reverb_tables.InsertThrottle`); kept here for status.
    self._throttle = reverb_tables.InsertThrottle(address, self._games,
                                                  self._cfg.data.samples_per_insert, self._stop)
    from scaled_ql.datasets import rlds_reader
    self._read_stats = self._read_stats or rlds_reader.ReadStats()
    reverb_tables.run_inserter(
        address, self._cfg, self._games,
        reverb_tables.rlds_episode_source(self._cfg, stats=self._read_stats),
        repeat=True, stop=self._stop, throttle=self._throttle)
    return False

  @property
  def throttled_s(self) -> float:
    return self._throttle.throttled_s if self._throttle is not None else 0.0

  def status(self) -> dict:
    # data: episodes read, corrupt (unreadable) files and undecodable episodes skipped so far.
    return dict(self.base_status(), games=list(self._games), throttled_s=self.throttled_s,
                data=self._read_stats.counts() if self._read_stats is not None else {})

  def stop(self) -> None:
    self._stop_loop(timeout=30)


class LearnerNode(_LoopNode):
  """The sharded jitted Learner fed by stratified batches from Reverb. Checkpoints into
  WORKDIR/checkpoints (the LearnerRunner's Orbax manager) and publishes its params, tagged with its
  step, every `publish_every_steps` without waiting on anyone. A restarted node resumes from the
  last checkpoint."""

  name = 'learner'
  offline_data = True  # cfg.data is read (the MC probe); False for online fine-tuning

  def __init__(self, cfg: ExperimentConfig, replay: str, variables: VariableServer, workdir: str,
               num_steps: int, initial_params: Any = None):
    from scaled_ql.agents.learner import Learner
    from scaled_ql.agents.runner import LearnerRunner
    from scaled_ql.datasets.mc_probe import load_mc_probe
    from scaled_ql.datasets import reverb_tables
    self._cfg, self._num_steps = cfg, num_steps
    # The iterator reconnects by itself when the server comes back at the same address.
    self._iterator = reverb_tables.stratified_batches(
        _reverb_address(replay), cfg.games, cfg, seed=cfg.train.seed + 1000 * _restarts())
    # initial_params (transfer: a pretrained encoder) seed a fresh run; a checkpoint wins.
    # mc_probe: Q(s, a_data) against Monte-Carlo returns of the offline data, in the metrics.
    probe = load_mc_probe(cfg) if self.offline_data else None
    self._learner = LearnerRunner(Learner(cfg, self._iterator, initial_params=initial_params),
                                  workdir, handle_signals=False, mc_probe=probe)
    self._learner.restore()  # a restarted node resumes from the last checkpoint
    self.resumed_from_step = int(self._learner.steps)
    self._publisher = variables.publisher()
    self._publisher.publish(self._params(), self._learner.steps)
    self._metrics: dict = {}
    self._rate_window: collections.deque = collections.deque()  # (time, steps) of the last 30 s
    self._start(workdir)

  def _params(self):
    return self._learner.get_variables(('params',))[0]

  def _run_once(self) -> Optional[bool]:
    if self._learner.steps >= self._num_steps:
      return False
    self._metrics = self._learner.step()
    steps = int(self._learner.steps)
    eval_every = self._cfg.eval.eval_every_steps  # the evaluators' step cadence needs these
    if (steps % self._cfg.train.publish_every_steps == 0 or steps >= self._num_steps
        or (eval_every and steps % eval_every == 0)):
      self._publisher.publish(self._params(), steps)
    now = time.monotonic()
    self._rate_window.append((now, steps))
    while now - self._rate_window[0][0] > 30.0:
      self._rate_window.popleft()
    return None

  def status(self) -> dict:
    window = list(self._rate_window)
    rate = ((window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
            if len(window) > 1 and window[-1][0] > window[0][0] else 0.0)
    if window and time.monotonic() - window[-1][0] > 30.0:
      rate = 0.0  # no step for 30 s (waiting for data or actors): not the last rate seen
    metrics = {k: float(v) for k, v in self._metrics.items() if _is_number(v)}
    return dict(self.base_status(), steps=int(self._learner.steps), num_steps=self._num_steps,
                steps_per_s=rate, resumed_from_step=self.resumed_from_step,
                published_version=self._publisher.last_version,
                publishes_skipped=self._publisher.skipped,
                reverb_reconnects=self._iterator.reconnects, metrics=metrics)

  def set_data_counts(self, counts: dict) -> None:
    """The inserters' bad-data counters (summed by the driver), logged with the learner's
    metrics (`Learner.set_data_counts`)."""
    self._learner.set_data_counts(counts)

  def stop(self) -> int:
    """Ends the loop, writes a final checkpoint and publishes the final params."""
    self._stop_loop()
    self._learner.save()
    self._publisher.publish(self._params(), self._learner.steps)
    self._publisher.flush(timeout=30)
    self._iterator.close()
    self._learner.close()
    return int(self._learner.steps)


def _is_number(v: Any) -> bool:
  try:
    float(v)
    return True
  except (TypeError, ValueError):
    return False


def eval_due(version: int, evaluated_version: int, every_steps: Optional[int],
             woken: bool = False) -> bool:
  """Whether an evaluator evaluates params `version` after `evaluated_version`: any newer params
  on a time cadence (`every_steps` None) or after wake(); on a step cadence (paper configs) the
  first params of each new multiple of `every_steps` (the learner publishes at those steps)."""
  if version <= evaluated_version:
    return False
  return not every_steps or woken or version // every_steps > evaluated_version // every_steps


class EvaluatorNode(_LoopNode):
  """Evaluates the newest params on its own games, once per `eval_every_steps` learner steps
  (paper configs) or on its own clock (every `eval_every_seconds`), and only params newer than the
  last it evaluated; writes per-game rows
  tagged with the param version to WORKDIR/eval/evaluator_<i>.jsonl and TensorBoard."""

  def __init__(self, cfg: ExperimentConfig, games: Sequence[str], variables: VariableServer,
               workdir: str, index: int):
    from scaled_ql.agents.actors import make_policy
    self.name = f'evaluator_{index}'
    self._cfg, self._games, self._index = cfg, tuple(games), index
    self._policy = make_policy(cfg, cfg.eval.epsilon)
    self._client = VariableClient(variables)
    self._evaluated_version = -1
    self._rounds = 0
    self._latest: dict[str, dict] = {}
    self._writer = None
    self._wake = threading.Event()
    self._woken = False
    self._evaluating_version = -1
    self._start(workdir)

  def _run_once(self) -> None:
    from scaled_ql.eval import evaluator
    started = time.monotonic()
    self._client.update_and_wait()
    every = self._cfg.eval.eval_every_steps
    if not eval_due(self._client.version, self._evaluated_version, every, self._woken):
      self._wake.wait(RETRY_SECONDS)
      self._wake.clear()
      return
    version, params = self._client.version, self._client.params
    self._evaluating_version = version  # a round in progress (lost if the node is killed)
    results = evaluator.evaluate(
        self._policy, params, self._games, self._cfg.eval, model_games=self._cfg.games,
        seed=self._cfg.train.seed + 1000 * self._index + self._rounds, param_version=version,
        evaluator=self.name, epsilon=self._cfg.eval.epsilon,
        jsonl_path=os.path.join(self._workdir, 'eval', f'{self.name}.jsonl'))
    self._evaluated_version = version
    self._evaluating_version = -1
    self._rounds += 1
    # score/normalized are None for a game with no completed episode (shown as text).
    self._latest = {game: dict(game=game, score=r.score, normalized=r.normalized,
                               episodes=r.episodes, truncated=r.truncated,
                               steps_per_s=r.steps / max(r.seconds, 1e-9),
                               param_version=version) for game, r in results.items()}
    self._write_tensorboard(version)
    if every:
      return  # step cadence: the next round waits for the next multiple of eval_every_steps
    # Own clock: the next round starts eval_every_seconds after this one started (or on wake()).
    self._wake.wait(max(0.0, self._cfg.eval.eval_every_seconds - (time.monotonic() - started)))
    self._wake.clear()

  def wake(self) -> None:
    """Start the next round now (e.g. to evaluate the final params at the end of training);
    from now on any newer params are due, whatever the step cadence."""
    self._woken = True
    self._wake.set()

  def _write_tensorboard(self, version: int) -> None:
    if self._writer is None:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(os.path.join(self._workdir, 'tb', self.name))
    from scaled_ql.eval import evaluator
    # Games with no completed episode write no scalar (never a number; eval/evaluator.py).
    for tag, value in evaluator.tensorboard_scalars(self._latest):
      self._writer.add_scalar(tag, value, version)
    self._writer.flush()

  def status(self) -> dict:
    return dict(self.base_status(), games=list(self._games), rounds=self._rounds,
                evaluated_version=self._evaluated_version,
                evaluating_version=self._evaluating_version, latest=self._latest)

  def stop(self) -> None:
    self._wake.set()
    self._stop_loop(timeout=120)
    if self._writer is not None:
      self._writer.close()


class FinetuneActorNode(_LoopNode):
  """Acts in a new environment (game + mode) with the newest params, epsilon-greedy (sticky
  actions 0.25, like the data collection), and writes every finished episode into the Reverb table
  of that game, in the same record format as the offline inserters, so a fine-tuning learner's
  `stratified_batches` samples it. The game must be one of `cfg.games` (its game_id and action
  set come from the config)."""

  def __init__(self, cfg: ExperimentConfig, game: str, mode: Optional[int],
               epsilon: 'float | Callable[[int], float]', variables: VariableServer, replay: str,
               index: int, workdir: Optional[str] = None, update_period: int = 100,
               seed: int = 0, max_episode_frames: int = 108_000,
               sticky_action_prob: float = 0.25,
               max_env_steps: Optional[Callable[[int], int]] = None):
    """`epsilon`: a constant, or a (picklable) schedule `epsilon(param_version) -> float` of the
    learner step that produced the acting params (e.g. `finetune.LinearEpsilon`).
    `max_env_steps(param_version)`: optional pacing (e.g. `finetune.ActorPacing`); a new episode
    starts only while this actor's env steps are below it, so acting keeps pace with learning.
    Pacing counts from the start of the current replay server: a restarted server (empty, its
    insert count back at 0) starts a new warm-up, on the learner's side too
    (`finetune.FinetuneLearnerNode`), or neither side could move again."""
    import jax
    import numpy as np
    from scaled_ql.agents.actors import make_policy
    from scaled_ql.envs.atari import AtariEnv
    if game not in cfg.games:
      raise ValueError(f'fine-tuning game {game!r} is not one of the config games {cfg.games}')
    self.name = f'actor_{index}'
    self._cfg, self._game, self._replay = cfg, game, replay
    self._game_id = np.asarray([cfg.games.index(game)], np.int32)
    seed = seed + 7919 * index + 104_729 * _restarts()
    self._env = AtariEnv(game, mode=mode, sticky_action_prob=sticky_action_prob, seed=seed,
                         max_episode_frames=max_episode_frames)
    # A schedule: the greedy policy plus exploration drawn here, per step.
    self._epsilon = epsilon if callable(epsilon) else None
    self._policy = make_policy(cfg, 0.0 if callable(epsilon) else epsilon)
    self._explore_rng = np.random.default_rng(seed)
    self._num_actions = self._env.num_actions
    self._max_env_steps = max_env_steps
    self._replay_seen: Optional[str] = None  # incarnation of the replay server paced against
    self._pace_base = (0, 0)  # (env steps, param version) when that server was first seen
    self.replay_restarts_seen = 0
    self.paced_s = 0.0
    self._client = VariableClient(variables, update_period=update_period)
    self._client.wait_for_version(0, timeout=600)
    self._rng = jax.random.PRNGKey(seed)
    self._writer = None
    self.items = 0
    self.episodes = 0
    self.env_steps = 0
    self.returns: list[float] = []
    self._start(workdir)

  def _act(self, observation) -> int:
    import jax
    self._client.update()
    if self._epsilon is not None:
      if self._explore_rng.random() < self._epsilon(self._client.version):
        return int(self._explore_rng.integers(self._num_actions))
    self._rng, key = jax.random.split(self._rng)
    return int(self._policy(self._client.params, key, observation[None], self._game_id)[0])

  def _run_once(self) -> None:
    # One episode as RLDS steps: step i holds observation i, the action taken there and the
    # reward that followed; the last step holds only the final observation.
    if self._max_env_steps is not None:
      started = time.monotonic()
      while not self._may_act():
        if self._stop.is_set():
          return
        self._client.update_and_wait(timeout=10)
        self._stop.wait(0.1)
      self.paced_s += time.monotonic() - started
    steps, episode_return = [], 0.0
    timestep = self._env.reset()
    while not timestep.last():
      if self._stop.is_set():
        return
      action = self._act(timestep.observation)
      steps.append(dict(observation=timestep.observation[..., -1:], action=action,
                        is_first=timestep.first(), is_last=False, is_terminal=False))
      timestep = self._env.step(action)
      steps[-1]['reward'] = float(timestep.reward)
      episode_return += float(timestep.reward)
      self.env_steps += 1
    steps.append(dict(observation=timestep.observation[..., -1:], action=0, reward=0.0,
                      is_first=False, is_last=True, is_terminal=timestep.discount == 0.0))
    self._insert(steps)
    self.episodes += 1
    self.returns.append(episode_return)

  def _may_act(self) -> bool:
    """Pacing: this actor's env steps since the current replay server started are within
    `max_env_steps` of the learner steps (param versions) since then."""
    incarnation = _replay_incarnation(self._replay)
    if incarnation is None:  # the replay node is restarting
      return False
    if incarnation != self._replay_seen:
      if self._replay_seen is not None:  # a new, empty server: pace from here
        self._pace_base = (self.env_steps, max(0, self._client.version))
        self.replay_restarts_seen += 1
        self._writer = None
      self._replay_seen = incarnation
    base_steps, base_version = self._pace_base
    return (self.env_steps - base_steps
            < self._max_env_steps(max(0, self._client.version - base_version)))

  def _insert(self, steps: list) -> None:
    import reverb
    from scaled_ql.datasets import reverb_tables
    if self._writer is None:
      client = reverb.Client(_reverb_address(self._replay))
      self._writer = reverb_tables.make_writer(client, self._cfg.agent.n_step,
                                               self._cfg.data.reverb_chunk_length)
    try:
      self.items += reverb_tables.write_episode(
          self._writer, reverb_tables.table_name(self._game), steps, self._cfg.agent.n_step,
          self._cfg.data.reverb_chunk_length)
    except (reverb.errors.ReverbError, RuntimeError) as e:
      # The server went away: drop this episode, reconnect for the next one.
      print(f'[{self.name}] lost the Reverb server ({type(e).__name__}); reconnecting',
            file=sys.stderr, flush=True)
      self._writer = None

  def status(self) -> dict:
    recent = self.returns[-10:]
    epsilon = self._epsilon(self._client.version) if self._epsilon is not None else None
    return dict(self.base_status(), game=self._game, episodes=self.episodes, epsilon=epsilon,
                paced_s=self.paced_s, replay_restarts_seen=self.replay_restarts_seen,
                env_steps=self.env_steps, items=self.items, param_version=self._client.version,
                mean_return=sum(recent) / len(recent) if recent else None)

  def stop(self) -> None:
    self._stop_loop(timeout=30)
    if self._writer is not None:
      self._writer.close()

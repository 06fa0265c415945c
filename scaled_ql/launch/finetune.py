"""Fine-tuning programs (Section 5.2): offline to a new game, online to a new game mode.

Offline (Scenario 1) is the training program of `program.build` with a fine-tuning config
(`configs.finetune_offline`: the new game only, 1% of its data, batch 32) and the learner started
from `transfer.finetune_params` (pretrained encoder, fresh trunk and heads).

Online (Scenario 2) is `program.build` without offline inserters, with fine-tuning actors and the
paced learner below (`build_args`):

       actor_0 .. actor_{A-1}     (FinetuneActorNode: AtariEnv(game, mode), epsilon-greedy with the
              |                    newest params, epsilon decaying with the learner step;
              |                    finished episodes -> the game's Reverb table)
           replay                 (ReverbNode: capacity = data.shuffle_buffer_per_game)
              |  stratified_batches (one game: plain uniform batches of 32)
           learner                (FinetuneLearnerNode: C51 without CQL, n-step 3; waits for the
              |                    replay warm-up and then takes ONE gradient step per
              |                    `finetune.update_period` transitions the actors inserted)
       variable server
              |
           evaluator_0            (EvaluatorNode in the same mode: cfg.eval.game_mode)

The 1:update_period ratio of gradient steps to environment steps is Dopamine's `update_period=4`;
in one process Dopamine interleaves acting and training, here both sides keep the ratio: the
learner reads the table's insert count (a learner ahead of the actors waits), and an actor starts
a new episode only while its env steps are within `ActorPacing` of the learner step of its params
(an actor ahead of the learner waits between episodes). Both sides count from the start of the
current replay server: a restarted server is empty and counts its inserts from 0, so both start a
new warm-up from there (`nodes.ReverbNode.incarnation`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

from scaled_ql.configs.base import ExperimentConfig
from scaled_ql.launch import nodes, program
from scaled_ql.launch.variable_server import VariableServer


@dataclasses.dataclass(frozen=True)
class LinearEpsilon:
  """Dopamine's linearly decaying epsilon, as a function of the learner step of the acting params.

  The learner takes no step during the replay warm-up and then one per `update_period`
  environment steps, so decaying over `decay_env_steps / update_period` learner steps is
  Dopamine's schedule (epsilon 1 during the warm-up, then linear to `end` over
  `decay_env_steps` environment steps), and it survives an actor restart."""
  start: float
  end: float
  decay_learner_steps: int

  def __call__(self, param_version: int) -> float:
    if param_version <= 0:
      return self.start
    frac = min(1.0, param_version / max(1, self.decay_learner_steps))
    return self.start + frac * (self.end - self.start)

  @classmethod
  def from_config(cls, cfg: ExperimentConfig) -> 'LinearEpsilon':
    f = cfg.finetune
    return cls(f.epsilon_start, f.epsilon_end, max(1, f.epsilon_decay_steps // f.update_period))


@dataclasses.dataclass(frozen=True)
class ActorPacing:
  """The env steps one actor may have taken when the acting params are of learner step
  `param_version`: its share of warm-up + update_period x (version + slack) steps.

  With `FinetuneLearnerNode`'s pacing this keeps the ratio of environment steps to gradient steps
  at Dopamine's `update_period` (4) in both directions, with a slack of `slack_learner_steps`
  (>= 2 publish periods, so a skipped publish cannot stall both sides). Actors check it only
  between episodes (the learner counts transitions once their episode is written), so an actor
  runs ahead by at most one episode."""
  warmup: int
  update_period: int
  slack_learner_steps: int
  num_actors: int

  def __call__(self, param_version: int) -> int:
    steps = self.warmup + self.update_period * (max(0, param_version) + self.slack_learner_steps)
    return -(-steps // self.num_actors)

  @classmethod
  def from_config(cls, cfg: ExperimentConfig) -> 'ActorPacing':
    return cls(cfg.data.min_fill_per_game, cfg.finetune.update_period,
               4 * cfg.train.publish_every_steps, cfg.finetune.num_actors)


def check_online_config(cfg: ExperimentConfig) -> None:
  """Raises ValueError naming the field at fault."""
  f = cfg.finetune
  if len(cfg.games) != 1:
    raise ValueError(f'online fine-tuning trains on one game, config {cfg.name!r} has {cfg.games}')
  if f.num_actors < 1:
    raise ValueError(f'finetune.num_actors={f.num_actors} must be >= 1')
  if f.update_period < 1:
    raise ValueError(f'finetune.update_period={f.update_period} must be >= 1')
  if not 0 <= f.epsilon_end <= f.epsilon_start <= 1:
    raise ValueError(f'finetune.epsilon_end={f.epsilon_end} and epsilon_start={f.epsilon_start} '
                     'must satisfy 0 <= end <= start <= 1')
  if f.epsilon_decay_steps < 1:
    raise ValueError(f'finetune.epsilon_decay_steps={f.epsilon_decay_steps} must be >= 1')


class FinetuneLearnerNode(nodes.LearnerNode):
  """The LearnerNode, paced by the actors: after `data.min_fill_per_game` transitions (the replay
  warm-up) it may take one gradient step per `finetune.update_period` transitions inserted,
  counted from the start of the current replay server (a restarted one starts from 0)."""

  offline_data = False  # its replay is filled by the actors; cfg.data is never read

  def __init__(self, cfg: ExperimentConfig, replay: str, variables: VariableServer, workdir: str,
               num_steps: int, initial_params: Any = None):
    # Set before the base class starts the loop thread.
    self._replay_name = replay
    self._allowed_steps = 0
    self._inserted = 0
    self._gate_client = None
    self._replay_seen: Optional[str] = None  # the replay server's incarnation paced against
    self._base_steps = 0  # learner steps when that server was first seen
    self.replay_restarts_seen = 0
    self.waited_s = 0.0
    super().__init__(cfg, replay, variables, workdir, num_steps, initial_params)

  def _update_allowance(self) -> None:
    import reverb
    from scaled_ql.datasets import reverb_tables
    if self._gate_client is None:
      address = nodes._reverb_address(self._replay_name)  # pylint: disable=protected-access
      self._gate_client = reverb.Client(address)
    incarnation = nodes._replay_incarnation(self._replay_name)  # pylint: disable=protected-access
    if incarnation is None:
      raise ConnectionError('the replay node is restarting')
    info = self._gate_client.server_info(timeout=10)
    table = info[reverb_tables.table_name(self._cfg.games[0])]
    inserted = int(table.rate_limiter_info.insert_stats.completed)
    steps = int(self._learner.steps)
    if incarnation != self._replay_seen:
      if self._replay_seen is None:
        # First look (a fresh or restarted learner): the steps its checkpoint holds beyond what
        # this server's inserts allow were paid for by data of an earlier server.
        self._base_steps = max(0, steps - allowed_steps(inserted, self._cfg))
      else:  # a new, empty server: a new warm-up from here
        self._base_steps = steps
        self.replay_restarts_seen += 1
      self._replay_seen = incarnation
    self._inserted = inserted
    self._allowed_steps = self._base_steps + allowed_steps(inserted, self._cfg)

  def _run_once(self) -> Optional[bool]:
    if self._learner.steps >= self._num_steps:
      return False
    if self._learner.steps >= self._allowed_steps:
      started = time.monotonic()
      try:
        self._update_allowance()
      except Exception:  # pylint: disable=broad-except  (replay restarting: wait)
        self._gate_client = None
      if self._learner.steps >= self._allowed_steps:
        self._stop.wait(0.05)
        self.waited_s += time.monotonic() - started
        return None
    return super()._run_once()

  def status(self) -> dict:
    return dict(super().status(), inserted=self._inserted, allowed_steps=self._allowed_steps,
                waited_for_actors_s=self.waited_s,
                replay_restarts_seen=self.replay_restarts_seen)


def allowed_steps(inserted: int, cfg: ExperimentConfig) -> int:
  """Gradient steps allowed once `inserted` transitions were collected (Dopamine's pacing)."""
  after_warmup = inserted - cfg.data.min_fill_per_game
  if after_warmup < 0:
    return 0
  return after_warmup // cfg.finetune.update_period + 1


def build_args(cfg: ExperimentConfig) -> dict:
  """The keyword arguments of `program.build` that make it the online fine-tuning program."""
  check_online_config(cfg)
  return dict(
      learner_node=FinetuneLearnerNode, num_inserters=0,
      actors=program.ActorSpec(
          cfg.games[0], cfg.eval.game_mode, cfg.finetune.num_actors,
          LinearEpsilon.from_config(cfg), max_episode_frames=cfg.eval.max_episode_frames,
          sticky_action_prob=cfg.finetune.actor_sticky_action_prob,
          max_env_steps=ActorPacing.from_config(cfg)))


def required_cpus(cfg: ExperimentConfig) -> int:
  """Logical CPUs of the online program (learner, evaluator, actors; no inserters)."""
  return program.required_cpus(cfg, num_actors=cfg.finetune.num_actors, num_inserters=0)


def format_actors(status: program.ProgramStatus) -> str:
  parts = []
  for s in status.actors:
    if s:
      ret = s.get('mean_return')
      parts.append(f"{s['name']} env_steps {s['env_steps']} episodes {s['episodes']} eps "
                   f"{s.get('epsilon') or 0:.2f}"
                   + (f' return {ret:.1f}' if ret is not None else ''))
  return ' | '.join(parts)


def run_online(cfg: ExperimentConfig, workdir: str, initial_params: Any = None, *,
               address: Optional[str] = None, num_cpus: Optional[int] = None,
               timeout_s: Optional[float] = None, log=None,
               final_eval_timeout_s: Optional[float] = 600.0,
               allow_config_change: bool = False) -> program.ProgramStatus:
  """Runs the online program until the learner's `train.num_steps` (or `timeout_s`), then a final
  evaluation; returns the last status (Ray stopped after, when it was started here). The workdir
  is checked and recorded first (`run.prepare_workdir`: ConfigError on a refused resume)."""
  from scaled_ql.launch import run
  log = log or (lambda line: print(line, flush=True))
  check_online_config(cfg)
  run.prepare_workdir(cfg, workdir, allow_config_change, log=log)
  started_here = run.init_ray(address, max(num_cpus or 0, required_cpus(cfg)), cfg)
  try:
    prog = program.build(cfg, workdir, 1, cfg.train.num_steps, initial_params=initial_params,
                         **build_args(cfg))
    last_actor_log = [0.0]

    def stop_when(status: program.ProgramStatus) -> bool:
      if time.time() - last_actor_log[0] > 10 and any(status.actors):
        last_actor_log[0] = time.time()
        log('  actors: ' + format_actors(status))
      return program.learner_done(status)

    return program.run(prog, log=log, stop_when=stop_when, timeout_s=timeout_s,
                       final_eval_timeout_s=final_eval_timeout_s)
  finally:
    if started_here:
      import ray
      ray.shutdown()

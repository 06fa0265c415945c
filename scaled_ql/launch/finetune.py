"""Fine-tuning programs (Section 5.2): offline to a new game, online to a new game mode.

Offline (Scenario 1) is the training program of `program.build` with a fine-tuning config
(`configs.finetune_offline`: the new game only, 1% of its data, batch 32) and the learner started
from `transfer.finetune_params` (pretrained encoder, fresh trunk and heads).

Online (Scenario 2) replaces the offline inserters by fine-tuning actors:

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
(an actor ahead of the learner waits between episodes).
"""
from __future__ import annotations

import dataclasses
import time
import uuid
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
  warm-up) it may take one gradient step per `finetune.update_period` transitions inserted."""

  def __init__(self, cfg: ExperimentConfig, replay: str, variables: VariableServer, workdir: str,
               num_steps: int, initial_params: Any = None):
    # Set before the base class starts the loop thread.
    self._replay_name = replay
    self._allowed_steps = 0
    self._inserted = 0
    self._gate_client = None
    self.waited_s = 0.0
    super().__init__(cfg, replay, variables, workdir, num_steps, initial_params)

  def _update_allowance(self) -> None:
    import reverb
    from scaled_ql.datasets import reverb_tables
    if self._gate_client is None:
      address = nodes._reverb_address(self._replay_name)  # pylint: disable=protected-access
      self._gate_client = reverb.Client(address)
    info = self._gate_client.server_info(timeout=10)
    table = info[reverb_tables.table_name(self._cfg.games[0])]
    self._inserted = int(table.rate_limiter_info.insert_stats.completed)
    self._allowed_steps = allowed_steps(self._inserted, self._cfg)

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
                waited_for_actors_s=self.waited_s)


def allowed_steps(inserted: int, cfg: ExperimentConfig) -> int:
  """Gradient steps allowed once `inserted` transitions were collected (Dopamine's pacing)."""
  after_warmup = inserted - cfg.data.min_fill_per_game
  if after_warmup < 0:
    return 0
  return after_warmup // cfg.finetune.update_period + 1


def build_online(cfg: ExperimentConfig, workdir: str, initial_params: Any = None,
                 learner_gpus: float = 0) -> program.Program:
  """Starts the online fine-tuning program (the graph in the module docstring)."""
  check_online_config(cfg)
  game = cfg.games[0]
  prefix = f'{cfg.name}_{uuid.uuid4().hex[:8]}_'
  replay_name = prefix + 'replay'
  actor = program._actor  # pylint: disable=protected-access  (the program's node options)
  replay = actor(nodes.ReverbNode, 'replay', name=replay_name).remote(cfg, program.free_port())
  variables = VariableServer.create(cfg.train.variable_server_shards, name_prefix=prefix,
                                    max_restarts=program.MAX_RESTARTS['variable_shard'])
  learner = actor(FinetuneLearnerNode, 'learner', num_gpus=learner_gpus).remote(
      cfg, replay_name, variables, workdir, cfg.train.num_steps, initial_params)
  evaluator = actor(nodes.EvaluatorNode, 'evaluator').remote(
      cfg, cfg.games, variables, workdir, 0)
  prog = program.Program(cfg, workdir, replay, replay_name, [], learner, variables, [evaluator],
                         [cfg.games])
  program.add_finetune_actors(
      prog, game, cfg.eval.game_mode, cfg.finetune.num_actors, LinearEpsilon.from_config(cfg),
      max_episode_frames=cfg.eval.max_episode_frames,
      sticky_action_prob=cfg.finetune.actor_sticky_action_prob,
      max_env_steps=ActorPacing.from_config(cfg))
  return prog


def required_cpus(cfg: ExperimentConfig) -> int:
  """Logical CPUs of the online program (learner, evaluator, actors)."""
  return (program.NUM_CPUS['replay'] + program.NUM_CPUS['learner'] + program.NUM_CPUS['evaluator']
          + cfg.finetune.num_actors * program.NUM_CPUS['actor'])


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
    prog = build_online(cfg, workdir, initial_params)
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

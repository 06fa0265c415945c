"""Fine-tuning programs (Section 5.2): offline to a new game, online to a new game mode.

Offline (Scenario 1) is the training program of `program.build` with a fine-tuning config
(`configs.finetune_offline`: the new game only, 1% of its data, batch 32) and the learner started
from `transfer.finetune_params` (pretrained encoder, fresh trunk and heads).

Online (Scenario 2) is `program.build` without offline inserters, with fine-tuning actors and the
paced learner below (`build_args`):

       actor_0 .. actor_{A-1}     (FinetuneActorNode: AtariEnv(game, mode), epsilon-greedy with the
              |                    newest params, epsilon decaying with the learner step;
              |                    each step -> the game's Reverb table)
           replay                 (ReverbNode: capacity = data.shuffle_buffer_per_game)
              |  stratified_batches (one game: plain uniform batches of 32)
           learner                (FinetuneLearnerNode: C51 without CQL, n-step 3; its sampler
              |                    waits for the replay warm-up and then gets ONE batch per
              |                    `finetune.update_period` transitions the actors inserted)
       variable server
              |
           evaluator_0            (EvaluatorNode in the same mode: cfg.eval.game_mode)

The 1:update_period ratio of gradient steps to environment steps is Dopamine's `update_period=4`;
in one process Dopamine interleaves acting and training. Here the ratio is a property of the
game's Reverb table (`reverb_tables.TablePacing`, a `SampleToInsertRatio` rate limiter, as in
Acme's DQN builder): a learner ahead of the actors waits in its sampler, an actor ahead of the
learner waits in its writer. Both count on the server, so a restarted (empty) server starts a new
warm-up for both by itself. Acting and exploration are `agents.actors` (EpsilonGreedyActor,
LinearEpsilon, EnvironmentLoop); this module only wires them.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from scaled_ql.configs.base import ExperimentConfig
from scaled_ql.launch import nodes, program
from scaled_ql.launch.variable_server import VariableServer


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
  """The LearnerNode of online fine-tuning. Its pacing is its table's (`TablePacing`, set on the
  replay node by `build_args`): the sampler waits for the actors. This class adds only status,
  read from the table: `inserted` (transitions inserted into the current server), `allowed_steps`
  (this step plus the whole batches the table still lets through; batches drawn ahead into the
  prefetch queue are not counted), `waited_for_actors_s` (time the learner waited for a batch)
  and `replay_restarts_seen`."""

  offline_data = False  # its replay is filled by the actors; cfg.data is never read

  def __init__(self, cfg: ExperimentConfig, replay: nodes.Replay, variables: VariableServer,
               workdir: str, num_steps: int, initial_params: Any = None):
    from scaled_ql.datasets import reverb_tables
    self._pacing = reverb_tables.TablePacing.from_config(cfg)
    self._restarts_seen = nodes._RestartsSeen(replay)  # pylint: disable=protected-access
    self._table_client = None
    self._last_table: dict = {}
    super().__init__(cfg, replay, variables, workdir, num_steps, initial_params)

  def _table_status(self) -> dict:
    import reverb
    from scaled_ql.datasets import reverb_tables
    try:
      if self._table_client is None:
        self._table_client = reverb.Client(self._address)
      info = self._table_client.server_info(timeout=5)[reverb_tables.table_name(self._cfg.games[0])]
      limiter = info.rate_limiter_info
      inserted, sampled = int(limiter.insert_stats.completed), int(limiter.sample_stats.completed)
    except Exception:  # pylint: disable=broad-except  (the replay node is restarting)
      self._table_client = None
      return self._last_table  # what was seen last
    may_sample = self._pacing.allowed_steps(inserted) * self._pacing.batch_size
    self._last_table = dict(inserted=inserted, allowed_steps=int(self._learner.steps)
                            + max(0, may_sample - sampled) // self._pacing.batch_size)
    return self._last_table

  def status(self) -> dict:
    return dict(super().status(), **self._table_status(),
                waited_for_actors_s=self._iterator.waited_s,
                replay_restarts_seen=self._restarts_seen())


def allowed_steps(inserted: int, cfg: ExperimentConfig) -> int:
  """Gradient steps allowed once `inserted` transitions were collected (Dopamine's pacing; the
  table enforces it: `reverb_tables.TablePacing`)."""
  from scaled_ql.datasets import reverb_tables
  return reverb_tables.TablePacing.from_config(cfg).allowed_steps(inserted)


def build_args(cfg: ExperimentConfig) -> dict:
  """The keyword arguments of `program.build` that make it the online fine-tuning program."""
  from scaled_ql.agents.actors import LinearEpsilon
  from scaled_ql.datasets import reverb_tables
  check_online_config(cfg)
  return dict(
      learner_node=FinetuneLearnerNode, num_inserters=0,
      replay_pacing=reverb_tables.TablePacing.from_config(cfg),
      actors=program.ActorSpec(
          cfg.games[0], cfg.eval.game_mode, cfg.finetune.num_actors,
          LinearEpsilon.from_config(cfg), max_episode_frames=cfg.eval.max_episode_frames,
          sticky_action_prob=cfg.finetune.actor_sticky_action_prob))


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
               allow_config_change: bool = False,
               deadline: Optional[float] = None) -> program.ProgramStatus:
  """Runs the online program until the learner's `train.num_steps` (or `timeout_s` of training,
  or the `deadline` of the whole run, the final evaluation included: `program.run`), then a final
  evaluation; returns the last status (Ray stopped after, when it was started here). The workdir
  is checked, locked and recorded first (`run.program_session`: ConfigError on a refused resume
  or a workdir another run holds)."""
  from scaled_ql.launch import run
  log = log or (lambda line: print(line, flush=True))
  check_online_config(cfg)
  with run.program_session(cfg, workdir, address, max(num_cpus or 0, required_cpus(cfg)),
                           allow_config_change, log) as started_here:
    if started_here:  # as `train`: an evaluator asking for GPUs Ray lacks would never start
      run.check_gpus(cfg)
    prog = program.build(cfg, workdir, 1, cfg.train.num_steps, initial_params=initial_params,
                         **build_args(cfg))
    last_actor_log = [0.0]

    def stop_when(status: program.ProgramStatus) -> bool:
      if time.time() - last_actor_log[0] > 10 and any(status.actors):
        last_actor_log[0] = time.time()
        log('  actors: ' + format_actors(status))
      return program.learner_done(status)

    return program.run(prog, log=log, stop_when=stop_when, timeout_s=timeout_s,
                       final_eval_timeout_s=final_eval_timeout_s, deadline=deadline)

"""Acting with a learned network: epsilon-greedy over the valid actions of each example's game.

    policy = make_policy(cfg, epsilon)                # jitted, batched (evaluators use it)
    actor = EpsilonGreedyActor(cfg, game, variables, LinearEpsilon.from_config(cfg), ...)
    loop = EnvironmentLoop(env, actor)                # Acme's seam: select_action, observe, update
    loop.run_episode()
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol

import dm_env
import jax
import jax.numpy as jnp
import numpy as np

from scaled_ql.agents import builder, losses, methods
from scaled_ql.configs.base import ExperimentConfig

Policy = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def make_policy(cfg: ExperimentConfig, epsilon: float) -> Policy:
  """Jitted `policy(params, rng, observation uint8 [E,84,84,4], game_id int32 [E]) -> int32 [E]`.

  Greedy action: argmax of the method's Q values (`Method.q_values`: the expected value of the
  C51 distribution; the scalar output for 'mse'; the logits for 'bc') over its allowed actions
  (`Method.allowed_actions`: the game's valid actions; for 'bcq' only those the behaviour model
  finds likely, Fujimoto et al. 2019). `params` is `Method.policy_params` (for 'bcq'
  {'q': ..., 'behaviour': ...}) as returned by `Learner.get_variables()` / `load_params`. With
  probability `epsilon` the action is uniform over the game's valid actions instead.
  """
  if not 0.0 <= epsilon <= 1.0:
    raise ValueError(f'epsilon={epsilon} must be in [0, 1]')
  method = methods.get(cfg.agent.loss)
  nets = builder.agent_networks(cfg)
  mask = jnp.asarray(nets.action_mask)
  atoms = jnp.asarray(nets.atoms)

  def policy(params, rng, observation, game_id):
    logits = nets.q.apply(method.q_params(params), observation, game_id).logits  # [E, A, K]
    valid = mask[game_id]
    q = method.q_values(logits, atoms)
    allowed = method.allowed_actions(nets, params, observation, game_id, valid, cfg.agent)
    greedy = jax.vmap(losses.masked_argmax)(q, allowed)
    explore_rng, action_rng = jax.random.split(rng)
    uniform_valid = jax.random.categorical(action_rng, jnp.where(valid, 0.0, -jnp.inf))
    explore = jax.random.uniform(explore_rng, greedy.shape) < epsilon
    return jnp.where(explore, uniform_valid, greedy).astype(jnp.int32)

  return jax.jit(policy)


# ------------------------------------------------------------------------------------- acting
# Acme's actor seam: an actor selects actions with params from a VariableSource and hands what it
# observes to an adder; `EnvironmentLoop` plays episodes with it. Nothing here knows Ray or Reverb:
# the node (launch/nodes.FinetuneActorNode) wires a VariableClient and a Reverb adder in.


class VariableSource(Protocol):
  """What an actor reads params from (Acme's VariableClient): the newest `params` it holds, their
  `version` (the learner step that produced them; -1 before the first fetch), `update()`, which
  never blocks, and `update_and_wait()` (launch.variable_server: VariableClient, or
  LocalVariableServer's client)."""
  params: Any
  version: int

  def update(self) -> Any:
    ...

  def update_and_wait(self) -> Any:
    ...


class Adder(Protocol):
  """Where an actor's experience goes (Acme's adder): the first timestep of an episode (which
  also ends an unfinished one where it stopped), then each action with the timestep it led to
  (datasets.reverb_tables.EpisodeAdder writes each step into Reverb as it comes)."""

  def add_first(self, timestep: dm_env.TimeStep) -> None:
    ...

  def add(self, action: int, next_timestep: dm_env.TimeStep) -> None:
    ...


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


class EpsilonGreedyActor:
  """Acts in one game of the config with the newest params of `variables`, epsilon-greedy.

  `epsilon`: a constant (the jitted policy explores: `make_policy(cfg, epsilon)`), or a schedule
  `epsilon(param_version) -> float` (e.g. `LinearEpsilon`): then the greedy policy acts and the
  exploration is drawn here, per step, uniform over the game's `num_actions`. `adder`: optional,
  receives every observed step (Acme's `observe_first` / `observe`)."""

  def __init__(self, cfg: ExperimentConfig, game: str, variables: VariableSource,
               epsilon: 'float | Callable[[int], float]', num_actions: int, *, seed: int,
               adder: Optional[Adder] = None):
    if game not in cfg.games:
      raise ValueError(f'game {game!r} is not one of the config games {cfg.games}')
    self._game_id = np.asarray([cfg.games.index(game)], np.int32)
    self._variables = variables
    # A schedule explores here (per step, by param version); a constant inside the jitted policy.
    self._explores_here = callable(epsilon)
    self._epsilon_at = epsilon if callable(epsilon) else (lambda version, e=float(epsilon): e)
    self._policy = make_policy(cfg, 0.0 if callable(epsilon) else epsilon)
    self._explore_rng = np.random.default_rng(seed)
    self._num_actions = num_actions
    self._rng = jax.random.PRNGKey(seed)
    self._adder = adder

  @property
  def epsilon(self) -> float:
    """The exploration rate of the params held now."""
    return float(self._epsilon_at(self._variables.version))

  def select_action(self, observation: np.ndarray) -> int:
    """uint8 [84, 84, 4] -> an action index of the game's minimal action set."""
    if self._variables.params is None:
      raise RuntimeError('the actor holds no params yet (wait for the first publish)')
    if self._explores_here and self._explore_rng.random() < self.epsilon:
      return int(self._explore_rng.integers(self._num_actions))
    self._rng, key = jax.random.split(self._rng)
    return int(self._policy(self._variables.params, key, observation[None], self._game_id)[0])

  def observe_first(self, timestep: dm_env.TimeStep) -> None:
    if self._adder is not None:
      self._adder.add_first(timestep)

  def observe(self, action: int, next_timestep: dm_env.TimeStep) -> None:
    if self._adder is not None:
      self._adder.add(action, next_timestep)

  def update(self, wait: bool = False) -> None:
    """Newer params, when the variable source has them; `wait`: fetch them now."""
    if wait:
      self._variables.update_and_wait()
    else:
      self._variables.update()


class EnvironmentLoop:
  """Acme's EnvironmentLoop for one actor: plays whole episodes and counts them. Each episode
  starts with the newest params (`update(wait=True)`); within it the actor updates every step
  without waiting.

  `should_stop()` is checked before every step; an episode it cuts short is not counted and
  `run_episode` returns None (what the adder wrote of it stays: `EpisodeAdder` keeps the
  transitions whose n-step windows it completed and that reached the server)."""

  def __init__(self, env: dm_env.Environment, actor: EpsilonGreedyActor,
               should_stop: Callable[[], bool] = lambda: False):
    self._env, self._actor, self._should_stop = env, actor, should_stop
    self.env_steps = 0
    self.episodes = 0
    self.returns: list[float] = []

  def run_episode(self) -> Optional[float]:
    """The episode's return, or None when stopped before its end."""
    self._actor.update(wait=True)
    timestep = self._env.reset()
    self._actor.observe_first(timestep)
    episode_return = 0.0
    while not timestep.last():
      if self._should_stop():
        return None
      action = self._actor.select_action(timestep.observation)
      timestep = self._env.step(action)
      self.env_steps += 1  # before `observe` writes the step: an adder's items <= env_steps
      self._actor.observe(action, timestep)
      self._actor.update()
      episode_return += float(timestep.reward)
    self.episodes += 1
    self.returns.append(episode_return)
    return episode_return

"""Online evaluation of a policy on the ALE with the paper's protocol (Appendix B.3, Table B.1).

Protocol (all from `EvalConfig`, whose defaults are the paper's):
- sticky actions OFF (`sticky_action_prob=0`, Lee et al. 2022's protocol; the data has 0.25),
- epsilon-greedy with epsilon 0.001 (inside the policy: `actors.make_policy(cfg, cfg.eval.epsilon)`),
- episodes cut at 108K emulator frames (27K agent steps), game over as the terminal condition,
- unclipped game score as the return,
- `steps_per_game` agent steps per game (paper: 125K, as in Castro et al. 2018), run as `num_envs`
  environments of the game, the network applied to a whole group of them in one jitted call per
  step (`env_groups` groups, double-buffered: see `evaluate_game`). The budget is split evenly
  between the environments.

Score of a game = mean return of the episodes COMPLETED within the budget (episodes still running
when the budget is spent are dropped, as Castro et al. 2018 count only finished episodes). If no
episode completed at all (tiny CPU budgets), the score is the mean partial return of the episodes in
progress, flagged `partial=True` with `episodes=0`. Dropping unfinished episodes slightly favours
short episodes. An episode lasts at most 27K steps, so with the paper's 125K steps and
`num_envs <= 4` (31K+ steps each) every environment completes at least one episode.

    policy = actors.make_policy(cfg, cfg.eval.epsilon)
    results = evaluate(policy, params, ['Pong', 'Breakout'], cfg.eval, model_games=cfg.games,
                       param_version=learner_step, jsonl_path='workdir/eval/evaluator_0.jsonl')
    results['Pong'].score, results['Pong'].normalized
"""
from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from scaled_ql import games as games_lib
from scaled_ql.configs.base import EvalConfig
from scaled_ql.envs.atari import AtariEnv
from scaled_ql.eval import normalization, report

# policy(params, rng, observation uint8 [E,84,84,4], game_id int32 [E]) -> actions int32 [E]
PolicyFn = Callable[[Any, Any, np.ndarray, np.ndarray], Any]


@dataclasses.dataclass(frozen=True)
class GameResult:
  game: str
  score: float  # mean raw return of completed episodes (or partial returns, see `partial`)
  normalized: float  # human-normalized score (fraction)
  episodes: int  # completed episodes averaged in `score`
  steps: int  # agent steps run
  seconds: float  # wall-clock time of the game's loop (network + emulator)
  partial: bool  # True: no episode completed, `score` is the mean partial return
  episode_returns: tuple[float, ...]  # returns of the completed episodes

  @property
  def steps_per_second(self) -> float:
    return self.steps / self.seconds if self.seconds > 0 else float('nan')


def make_eval_env(game: str, eval_cfg: EvalConfig, seed: int) -> AtariEnv:
  """An `AtariEnv` with the evaluation protocol's settings (sticky actions, episode cap, and the
  game mode `eval_cfg.game_mode`: None = the ROM default; online fine-tuning sets a new mode)."""
  return AtariEnv(game, mode=eval_cfg.game_mode, sticky_action_prob=eval_cfg.sticky_action_prob,
                  max_episode_frames=eval_cfg.max_episode_frames, seed=seed)


def env_seed(seed: int, game: str, index: int) -> int:
  """A distinct, reproducible emulator seed per (evaluation seed, game, environment index)."""
  return zlib.crc32(f'{seed}/{game}/{index}'.encode()) % (2**31 - 1)


def uniform_random_policy(model_games: Sequence[str]) -> PolicyFn:
  """A jitted policy of the evaluator's signature that picks a uniformly random valid action."""
  import jax
  import jax.numpy as jnp
  counts = jnp.asarray(games_lib.action_counts(model_games), jnp.int32)

  def policy(params, rng, observation, game_id):
    del params, observation
    return jax.random.randint(rng, game_id.shape, 0, counts[game_id]).astype(jnp.int32)

  return jax.jit(policy)


def _check_args(games: Sequence[str], model_games: Sequence[str], eval_cfg: EvalConfig,
                steps: int, num_envs: int, env_groups: int) -> None:
  games_lib.check_games(games, 'games')
  not_in_model = [g for g in games if g not in model_games]
  if not_in_model:
    raise ValueError(f'games {not_in_model} are not games of the model; it has '
                     f'{", ".join(model_games)}')
  if steps < 1:
    raise ValueError(f'steps_per_game must be >= 1, got {steps}')
  if num_envs < 1:
    raise ValueError(f'num_envs must be >= 1, got {num_envs}')
  if env_groups < 1:
    raise ValueError(f'env_groups must be >= 1, got {env_groups}')
  if not 0.0 <= eval_cfg.sticky_action_prob <= 1.0:
    raise ValueError(f'sticky_action_prob must be in [0, 1], got {eval_cfg.sticky_action_prob}')


def evaluate_game(policy_fn: PolicyFn, params: Any, game: str, game_id: int,
                  eval_cfg: EvalConfig, steps: int, num_envs: int, seed: int = 0,
                  env_groups: Optional[int] = None) -> GameResult:
  """Runs `steps` agent steps of `game` over `num_envs` environments (see the module docstring).

  The environments form `env_groups` (default `eval_cfg.env_groups`, at most `num_envs`) groups,
  each the batch of one jitted policy call per step. JAX dispatches the call asynchronously, so
  while the network computes one group's actions the emulators of the other groups step (double
  buffering on a machine with a core to spare); with one group it is plain lockstep. Each group's observation
  array is written only after its pending call has returned (the call may read it in place).
  """
  import jax
  groups_n = int(eval_cfg.env_groups if env_groups is None else env_groups)
  if groups_n < 1:
    raise ValueError(f'env_groups must be >= 1, got {groups_n}')
  groups_n = min(groups_n, num_envs)  # at most one group per environment
  envs = [make_eval_env(game, eval_cfg, env_seed(seed, game, i)) for i in range(num_envs)]
  budgets = [steps // num_envs + (1 if i < steps % num_envs else 0) for i in range(num_envs)]
  horizon = max(budgets)
  groups = [list(idx) for idx in np.array_split(np.arange(num_envs), groups_n)]
  observations = [np.stack([envs[i].reset().observation for i in g]) for g in groups]
  game_ids = [np.full((len(g),), game_id, np.int32) for g in groups]
  # One key per (step, group), made up front as numpy: no per-step device op for the split.
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), (horizon + 1) * groups_n))
  keys = keys.reshape((horizon + 1, groups_n) + keys.shape[1:])
  for k, g in enumerate(groups):  # compile every group shape before the clock starts
    jax.block_until_ready(policy_fn(params, keys[-1, k], observations[k], game_ids[k]))

  running = np.zeros(num_envs, np.float64)
  completed: list[float] = []
  start = time.perf_counter()
  pending = [policy_fn(params, keys[0, k], observations[k], game_ids[k])
             for k in range(groups_n)]
  for t in range(horizon):
    for k, g in enumerate(groups):
      actions = np.asarray(pending[k])  # waits for this group's call only
      obs = observations[k]
      for j, i in enumerate(g):
        if t >= budgets[i]:
          continue
        ts = envs[i].step(actions[j])
        running[i] += ts.reward
        if ts.last():
          completed.append(float(running[i]))
          running[i] = 0.0
          ts = envs[i].reset()
        obs[j] = ts.observation
      if t + 1 < horizon:
        pending[k] = policy_fn(params, keys[t + 1, k], obs, game_ids[k])
  seconds = time.perf_counter() - start
  for env in envs:
    env.close()

  if completed:
    score, partial = float(np.mean(completed)), False
  else:
    score, partial = float(np.mean(running)), True
  return GameResult(game=game, score=score,
                    normalized=float(normalization.human_normalized(game, score)),
                    episodes=len(completed), steps=sum(budgets), seconds=seconds,
                    partial=partial, episode_returns=tuple(completed))


def evaluate(policy_fn: PolicyFn, params: Any, games: Sequence[str], eval_cfg: EvalConfig, *,
             model_games: Optional[Sequence[str]] = None, steps_per_game: Optional[int] = None,
             num_envs: Optional[int] = None, env_groups: Optional[int] = None, seed: int = 0,
             param_version: int = -1,
             evaluator: str = 'evaluator', epsilon: Optional[float] = None,
             jsonl_path: Optional[str] = None, csv_path: Optional[str] = None,
             log: Optional[Callable[[str], None]] = None) -> dict[str, GameResult]:
  """Evaluates `policy_fn(params, ...)` on each game in turn; returns {game: GameResult}.

  model_games:    the games of the network (`cfg.games`); `game_id` = index into it. Default: games.
  steps_per_game: agent steps per game; default `eval_cfg.steps_per_game`.
  num_envs:       environments per game; default `eval_cfg.num_envs`.
  env_groups:     double-buffered groups of them (see `evaluate_game`); default
                  `eval_cfg.env_groups`.
  param_version:  learner step of `params`, written into every record (-1: unknown).
  jsonl_path / csv_path: if given, one `report.EvalRecord` per game is appended (after each game,
                  so a long evaluation leaves partial results behind).
  epsilon:        only recorded (the policy applies it).
  """
  model_games = tuple(games if model_games is None else model_games)
  steps = int(eval_cfg.steps_per_game if steps_per_game is None else steps_per_game)
  num_envs = int(eval_cfg.num_envs if num_envs is None else num_envs)
  env_groups = int(eval_cfg.env_groups if env_groups is None else env_groups)
  _check_args(games, model_games, eval_cfg, steps, num_envs, env_groups)
  results: dict[str, GameResult] = {}
  for game in games:
    r = evaluate_game(policy_fn, params, game, model_games.index(game), eval_cfg, steps,
                      num_envs, seed, env_groups)
    results[game] = r
    record = report.EvalRecord(
        game=game, score=r.score, normalized=r.normalized, param_version=int(param_version),
        evaluator=evaluator, episodes=r.episodes, time=time.time(), steps=r.steps,
        steps_per_second=r.steps_per_second, partial=r.partial, epsilon=epsilon)
    if jsonl_path:
      report.append_records(jsonl_path, [record])
    if csv_path:
      report.append_csv(csv_path, [record])
    if log:
      log(format_result(r))
  return results


def format_result(r: GameResult) -> str:
  note = ' (partial: no episode completed)' if r.partial else ''
  return (f'{r.game:<16} raw {r.score:>10.1f}  human-normalized {r.normalized * 100:>7.1f}%  '
          f'episodes {r.episodes:>3}  steps {r.steps}  {r.steps_per_second:.0f} steps/s{note}')


def results_table(results: Mapping[str, GameResult]) -> str:
  """The per-game lines plus the IQM/median over the games evaluated."""
  return '\n'.join([format_result(r) for r in results.values()] + [aggregate_line(results)])


def aggregate_line(results: Mapping[str, GameResult]) -> str:
  from scaled_ql.eval import metrics
  x = np.array([[r.normalized for r in results.values()]])
  return (f'{"aggregate":<16} IQM {metrics.iqm(x) * 100:.1f}%  median '
          f'{float(np.median(x)) * 100:.1f}%  over {x.shape[1]} game(s)')

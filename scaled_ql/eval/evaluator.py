"""Online evaluation of a policy on the ALE with the paper's protocol (Appendix B.3, Table B.1).

Protocol (all from `EvalConfig`, whose defaults are the paper's):
- sticky actions OFF (`sticky_action_prob=0`, Lee et al. 2022's protocol; the data has 0.25),
- epsilon-greedy with epsilon 0.001 (inside the policy: `actors.make_policy(cfg, cfg.eval.epsilon)`),
- episodes cut at 108K emulator frames (27K agent steps), game over as the terminal condition,
- unclipped game score as the return,
- a budget of `steps_per_game` agent steps per game (paper: 125K, Castro et al. 2018), played by
  `num_envs` environments of the game. `games_at_once` games play together (default: all of an
  evaluator's games), the network applied to a whole group of their environments in one jitted
  call per step (`env_groups` groups, double-buffered: see `evaluate_games`).

Score of a game = the mean return of COMPLETED episodes, counted as in Dopamine's
`Runner._run_one_phase` (Castro et al. 2018): an environment starts a new episode only while the
game's agent steps so far (all its environments together) are below the budget, and every episode
that was started is played to its end. The episode in progress when the budget runs out is
therefore finished, not dropped or cut, so no episode is ever truncated by the budget, and
whether an episode counts never depends on how it goes. (With more environments, more episodes
are in flight when the budget runs out, and all of them count.) With `num_envs=1` this is exactly
Dopamine's loop. An episode ends at game over or at the `max_episode_frames` cap (108K frames =
27K agent steps, Dopamine's `max_steps_per_episode`); an episode cut by the cap is counted with
the return it has at the cap, as Dopamine counts it, and the result says how many were
(`GameResult.truncated`). A game thus runs at least `steps_per_game` steps and at most
`steps_per_game + num_envs * 27K` (each environment's last episode is finished).

A game with no completed episode has no score: `score` and `normalized` are None, it is shown as
"no completed episode" and left out of every aggregate (`aggregate_line`, `report`). The loop
above always completes >= 1 episode, so today this comes from old logs (`report.EvalRecord`
reads their `partial` records this way) and is handled wherever scores are shown.

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


NO_EPISODE = report.NO_EPISODE  # how a game without a score is shown, everywhere


class Abandoned(Exception):
  """An evaluation stopped by its `should_stop` before its game ended: it has no score (a partial
  episode is never one). Games that finished before it keep their results and records."""


@dataclasses.dataclass(frozen=True)
class GameResult:
  game: str
  score: Optional[float]  # mean raw return of the completed episodes; None: none completed
  normalized: Optional[float]  # human-normalized `score` (fraction); None: no score
  episodes: int  # completed episodes averaged in `score`
  truncated: int  # of those, episodes that ended at the `max_episode_frames` cap (counted)
  steps: int  # agent steps run: >= `budget`, the last episodes are played to their end
  budget: int  # the step budget (`steps_per_game`)
  # Wall-clock time of the game's loop (network + emulator); for games played at once, the game's
  # share of their loop's, by its steps (`evaluate_games`).
  seconds: float
  cpu_seconds: float  # CPU time of this process over the same loop (all its threads), the same way
  episode_returns: tuple[float, ...]  # returns of the completed episodes
  games_at_once: int = 1  # games of the loop it was played in (they share its time)

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


def check_args(games: Sequence[str], model_games: Sequence[str], eval_cfg: EvalConfig,
               steps: int, num_envs: int, env_groups: int, games_at_once: int) -> None:
  """ValueError naming the evaluation argument at fault (also `launch.run.validate`'s check of
  the evaluators' settings, before any node starts)."""
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
  if games_at_once < 1:
    raise ValueError(f'games_at_once must be >= 1 (or None: all the games), got {games_at_once}')
  if not 0.0 <= eval_cfg.sticky_action_prob <= 1.0:
    raise ValueError(f'sticky_action_prob must be in [0, 1], got {eval_cfg.sticky_action_prob}')


class _KeyStream:
  """A fresh PRNG key per policy call, split in blocks as numpy (no device op per step)."""

  def __init__(self, seed: int, block: int = 1024):
    import jax
    self._base, self._block, self._blocks = jax.random.PRNGKey(seed), block, 0
    self._keys, self._next = None, block

  def __call__(self):
    if self._next == self._block:
      import jax
      self._keys = np.asarray(jax.random.split(jax.random.fold_in(self._base, self._blocks),
                                               self._block))
      self._blocks, self._next = self._blocks + 1, 0
    self._next += 1
    return self._keys[self._next - 1]


def policy_device(eval_cfg: EvalConfig, device: Optional[str] = None):
  """The JAX device the policy runs on: `device` ('cpu' | 'gpu' | 'tpu') if given, else the
  first GPU when `eval_cfg.gpus_per_evaluator` > 0 (an evaluator node given GPUs by Ray sees only
  those), else the CPU. ValueError, before any work, when JAX has no such device."""
  import jax
  platform = device or ('gpu' if eval_cfg.gpus_per_evaluator > 0 else 'cpu')
  if platform not in ('cpu', 'gpu', 'tpu'):
    raise ValueError(f'policy device must be cpu, gpu or tpu, got {platform!r}')
  try:
    return jax.devices(platform)[0]
  except RuntimeError as e:
    why = (f'eval.gpus_per_evaluator={eval_cfg.gpus_per_evaluator} (--evaluator-gpus)'
           if device is None else f'device={device!r}')
    raise ValueError(
        f'{why} puts the evaluator policy on a {platform}, but JAX {jax.__version__} has no '
        f'{platform} device here (it has {[str(d) for d in jax.devices()]}); install the '
        'accelerator build of JAX (`make gpu`) or evaluate on the CPU (--evaluator-gpus 0)') from e


def _bucket(live: int, size: int) -> int:
  """The batch a group of `size` shrinks to with `live` environments playing: the next power of
  two >= live (at most size)."""
  return min(size, 1 << max(live - 1, 0).bit_length())


def group_batch_sizes(size: int) -> set[int]:
  """Every batch shape a group of `size` environments can have (see `evaluate_games`, which
  compiles each with one policy call before its clock starts)."""
  return {size} | {_bucket(n, size) for n in range(1, size // 2 + 1)}


def evaluate_games(policy_fn: PolicyFn, params: Any, games: Sequence[tuple[str, int]],
                   eval_cfg: EvalConfig, steps: int, num_envs: int, seed: int = 0,
                   env_groups: Optional[int] = None, device: Any = None,
                   should_stop: Optional[Callable[[], bool]] = None) -> dict[str, GameResult]:
  """Plays each of `games` ((name, game_id) pairs) for a budget of `steps` agent steps over
  `num_envs` environments of its own, all the games at once, and finishes every episode started
  (the protocol of the module docstring, per game: a game's budget, episodes and score depend
  only on its own environments). Returns {game: GameResult}.

  The environments of all the games (at most `steps` per game) form `env_groups` (default
  `eval_cfg.env_groups`, at most one per environment) groups, each the batch of one jitted policy
  call per step, whatever games it mixes (the policy takes a game id per row). So G games of one
  environment each cost one call of batch G per step, not G calls of batch 1. JAX dispatches the
  call asynchronously, so while the network computes one group's actions the emulators of the
  other groups step (double buffering on a machine with a core to spare); with one group it is
  plain lockstep. Each group's observation array is written only after its pending call has
  returned (the call may read it in place). An environment whose last episode has ended idles
  in its slot; once at most half of a group plays, the group's batch shrinks to the next power
  of two (a few compiled shapes, all compiled before the clock starts), and a group with no
  episode left makes no more calls.

  Time: `seconds` and `cpu_seconds` of a result are its game's share of the whole loop's, by its
  share of the agent steps run (games played at once share every call), so each game's
  `steps_per_second` is the rate of the whole loop.

  `device`: a JAX device to put `params` on; the jitted policy then runs there (observations are
  copied to it per call). None: wherever `params` already are (JAX's default device for numpy).
  `should_stop`: asked once per step of the loop; True abandons every game of the loop (raises
  `Abandoned`), e.g. an evaluator dropping a round of old params to evaluate the final ones.
  """
  import jax
  if device is not None:
    params = jax.device_put(params, device)
  groups_n = int(eval_cfg.env_groups if env_groups is None else env_groups)
  if groups_n < 1:
    raise ValueError(f'env_groups must be >= 1, got {groups_n}')
  names = [name for name, _ in games]
  per_game = min(num_envs, steps)  # every environment plays at least one step of the budget
  # Slot i: environment `i % per_game` of game `owner[i]` (an index into `games`).
  owner = np.repeat(np.arange(len(games)), per_game)
  game_ids = np.asarray([gid for _, gid in games], np.int32)[owner]
  envs = [make_eval_env(names[o], eval_cfg, env_seed(seed, names[o], i % per_game))
          for i, o in enumerate(owner)]
  groups_n = min(groups_n, len(envs))
  groups = [list(idx) for idx in np.array_split(np.arange(len(envs)), groups_n)]
  observations = [np.stack([envs[i].reset().observation for i in g]) for g in groups]
  keys = _KeyStream(seed)
  # Compile every batch shape a group can have (its size, then the smaller buckets it shrinks
  # to, see below) before the clock starts; the jit cache keeps them for later calls.
  for size in sorted({b for g in groups for b in group_batch_sizes(len(g))}):
    jax.block_until_ready(policy_fn(params, keys(), np.zeros((size,) + observations[0].shape[1:],
                                                              np.uint8),
                                    np.full((size,), game_ids[0], np.int32)))

  playing = np.ones(len(envs), bool)  # an episode is in progress
  running = np.zeros(len(envs), np.float64)  # its return so far
  completed: list[list[float]] = [[] for _ in games]
  truncated = [0] * len(games)
  steps_run = [0] * len(games)
  start, cpu_start = time.perf_counter(), time.process_time()
  pending = [policy_fn(params, keys(), observations[k], game_ids[g])
             for k, g in enumerate(groups)]
  abandoned = False
  while any(p is not None for p in pending):
    if should_stop is not None and should_stop():
      abandoned = True
      break
    for k, g in enumerate(groups):
      if pending[k] is None:
        continue
      actions = np.asarray(pending[k])  # waits for this group's call only
      obs = observations[k]
      for j, i in enumerate(g):
        if not playing[i]:
          continue
        o = owner[i]
        ts = envs[i].step(actions[j])
        steps_run[o] += 1
        running[i] += ts.reward
        if ts.last():
          completed[o].append(float(running[i]))
          truncated[o] += int(ts.discount > 0)  # the frame cap (truncation), not game over
          running[i] = 0.0
          if steps_run[o] >= steps:  # the game's budget is spent: start no new episode here
            playing[i] = False
            continue
          ts = envs[i].reset()
        obs[j] = ts.observation
      live = [j for j, i in enumerate(g) if playing[i]]
      if not live:
        pending[k] = None
        continue
      if len(live) <= len(g) // 2:
        # At the end, when at most half of a group still plays, the batch shrinks to the next
        # power of two (padded with idle slots): a call costs about its batch on a CPU, and the
        # last, longest episodes would otherwise carry every finished environment along.
        size = _bucket(len(live), len(g))
        keep = live + [j for j in range(len(g)) if not playing[g[j]]][:size - len(live)]
        groups[k] = g = [g[j] for j in keep]
        observations[k] = obs = obs[keep]
      pending[k] = policy_fn(params, keys(), obs, game_ids[g])
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  for env in envs:
    env.close()
  if abandoned:
    left = [f'{names[o]} after {steps_run[o]} of {steps} agent steps' for o in range(len(games))
            if playing[owner == o].any()]
    raise Abandoned(f'evaluation abandoned: {", ".join(left)}')

  total = max(sum(steps_run), 1)
  results = {}
  for o, name in enumerate(names):
    score = float(np.mean(completed[o])) if completed[o] else None
    share = steps_run[o] / total
    results[name] = GameResult(
        game=name, score=score,
        normalized=None if score is None else float(normalization.human_normalized(name, score)),
        episodes=len(completed[o]), truncated=truncated[o], steps=steps_run[o], budget=steps,
        seconds=seconds * share, cpu_seconds=cpu_seconds * share,
        episode_returns=tuple(completed[o]), games_at_once=len(games))
  return results


def evaluate(policy_fn: PolicyFn, params: Any, games: Sequence[str], eval_cfg: EvalConfig, *,
             model_games: Optional[Sequence[str]] = None, steps_per_game: Optional[int] = None,
             num_envs: Optional[int] = None, env_groups: Optional[int] = None,
             games_at_once: Optional[int] = None, seed: int = 0, param_version: int = -1,
             param_lineage: int = -1, evaluator: str = 'evaluator', epsilon: Optional[float] = None,
             jsonl_path: Optional[str] = None, csv_path: Optional[str] = None,
             log: Optional[Callable[[str], None]] = None,
             device: Optional[str] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> dict[str, GameResult]:
  """Evaluates `policy_fn(params, ...)` on `games`, `games_at_once` of them at a time, batched
  in the same policy calls (`evaluate_games`); returns {game: GameResult}.

  model_games:    the games of the network (`cfg.games`); `game_id` = index into it. Default: games.
  steps_per_game: the step budget per game; default `eval_cfg.steps_per_game`.
  num_envs:       environments per game; default `eval_cfg.num_envs`.
  env_groups:     double-buffered groups of the environments played at once (see
                  `evaluate_games`); default `eval_cfg.env_groups`.
  games_at_once:  games played together; default `eval_cfg.games_at_once` (None: all of them).
  param_version:  learner step of `params`, written into every record (-1: unknown).
  param_lineage:  the learner start that produced them (the variable server's lineage; -1:
                  unknown), written into every record (`report.lost_params`).
  jsonl_path / csv_path: if given, one `report.EvalRecord` per game is appended (after each
                  `games_at_once` games, so a long evaluation leaves the finished ones behind).
  epsilon:        only recorded (the policy applies it).
  device:         'cpu' | 'gpu' | 'tpu' for the policy; default from `eval_cfg.gpus_per_evaluator`
                  (`policy_device`). The params are put there once, and every call runs there.
  should_stop:    see `evaluate_games`: raises `Abandoned`; the games of earlier
                  `games_at_once` groups keep their records.
  """
  model_games = tuple(games if model_games is None else model_games)
  steps = int(eval_cfg.steps_per_game if steps_per_game is None else steps_per_game)
  num_envs = int(eval_cfg.num_envs if num_envs is None else num_envs)
  env_groups = int(eval_cfg.env_groups if env_groups is None else env_groups)
  at_once = eval_cfg.games_at_once if games_at_once is None else games_at_once
  at_once = len(games) if at_once is None else int(at_once)
  check_args(games, model_games, eval_cfg, steps, num_envs, env_groups, at_once)
  import jax
  target = policy_device(eval_cfg, device)
  params = jax.device_put(params, target)
  results: dict[str, GameResult] = {}
  for first in range(0, len(games), at_once):
    together = [(g, model_games.index(g)) for g in games[first:first + at_once]]
    results.update(evaluate_games(policy_fn, params, together, eval_cfg, steps, num_envs, seed,
                                  env_groups, device=target, should_stop=should_stop))
    for game, _ in together:
      _record(results[game], eval_cfg, param_version, param_lineage, evaluator, epsilon,
              jsonl_path, csv_path, log)
  return results


def _record(r: GameResult, eval_cfg: EvalConfig, param_version: int, param_lineage: int,
            evaluator: str, epsilon: Optional[float],
            jsonl_path: Optional[str], csv_path: Optional[str],
            log: Optional[Callable[[str], None]]) -> None:
  """Appends `r` to the logs `evaluate` was given, and logs its line."""
  record = report.EvalRecord(
      game=r.game, score=r.score, normalized=r.normalized, param_version=int(param_version),
      evaluator=evaluator, episodes=r.episodes, time=time.time(), steps=r.steps,
      steps_per_second=r.steps_per_second, partial=r.score is None, epsilon=epsilon,
      truncated=r.truncated, budget=r.budget, param_lineage=int(param_lineage),
      game_mode=eval_cfg.game_mode, sticky_action_prob=float(eval_cfg.sticky_action_prob),
      max_episode_frames=int(eval_cfg.max_episode_frames))
  if jsonl_path:
    report.append_records(jsonl_path, [record])
  if csv_path:
    report.append_csv(csv_path, [record])
  if log:
    log(format_result(r))


def format_score(score: Optional[float], normalized: Optional[float]) -> str:
  """'raw X  human-normalized Y%', or NO_EPISODE: a game without a score never shows a number."""
  if score is None or normalized is None:
    return f'{NO_EPISODE:<44}'
  return f'raw {score:>10.1f}  human-normalized {normalized * 100:>7.1f}%'


def format_result(r: GameResult) -> str:
  cut = f' ({r.truncated} cut at the frame cap)' if r.truncated else ''
  rate = f'{r.steps_per_second:.0f} steps/s' + (
      f' (the loop of {r.games_at_once} games at once)' if r.games_at_once > 1 else '')
  return (f'{r.game:<16} {format_score(r.score, r.normalized)}  episodes {r.episodes:>3}{cut}  '
          f'steps {r.steps} (budget {r.budget})  {rate}')


def format_row(game: str, row: Mapping[str, Any]) -> str:
  """One line of an evaluator node's `latest` row (score, normalized, episodes, param_version)."""
  cut = f' ({row["truncated"]} cut at the frame cap)' if row.get('truncated') else ''
  return (f'{game:<16} {format_score(row.get("score"), row.get("normalized"))}  '
          f'episodes {row.get("episodes", "?")}{cut}  (params of step '
          f'{row.get("param_version", "?")})')


def tensorboard_scalars(latest: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, float]]:
  """(tag, value) of `eval/<game>/{score,normalized}` for the games WITH a score: a game with no
  completed episode writes no scalar (a missing point, never a number)."""
  return [(f'eval/{game}/{key}', float(row[key])) for game, row in latest.items()
          if row.get('score') is not None for key in ('score', 'normalized')]


def results_table(results: Mapping[str, GameResult]) -> str:
  """The per-game lines plus the IQM/median over the games with a score."""
  return '\n'.join([format_result(r) for r in results.values()] + [aggregate_line(results)])


def history_table(per_step: Sequence[tuple[int, Mapping[str, GameResult]]]) -> str:
  """One line per evaluated checkpoint step (`eval --step`): each game's raw score with its
  completed episodes, and the IQM of the human-normalized scores of the games that have one."""
  from scaled_ql.eval import metrics
  games = list(dict.fromkeys(g for _, results in per_step for g in results))
  lines = [f'{"step":>8}  ' + '  '.join(f'{g:>18}' for g in games) + f'  {"IQM":>8}']
  for step, results in per_step:
    cells = []
    for g in games:
      r = results.get(g)
      cells.append(f'{"-":>18}' if r is None or r.score is None else
                   f'{f"{r.score:.1f} ({r.episodes} ep)":>18}')
    scored = [r.normalized for r in results.values() if r.normalized is not None]
    iqm = f'{metrics.iqm(np.array([scored])) * 100:.1f}%' if scored else '-'
    lines.append(f'{step:>8}  ' + '  '.join(cells) + f'  {iqm:>8}')
  return '\n'.join(lines)


def _normalized(row: Any) -> Optional[float]:
  return row.get('normalized') if isinstance(row, Mapping) else row.normalized


def aggregate_line(results: Mapping[str, Any]) -> str:
  """IQM / median / mean of the human-normalized scores over the games that have one.

  `results`: {game: GameResult} or {game: dict with 'normalized'} (the evaluator node's `latest`
  rows). Games without a completed episode are left out and named, never counted as a number.
  """
  from scaled_ql.eval import metrics
  scored = {g: _normalized(r) for g, r in results.items() if _normalized(r) is not None}
  left_out = [g for g in results if g not in scored]
  note = f'; left out ({NO_EPISODE}): {", ".join(left_out)}' if left_out else ''
  if not scored:
    return f'{"aggregate":<16} none: no game has a completed episode{note}'
  x = np.array([list(scored.values())])
  return (f'{"aggregate":<16} IQM {metrics.iqm(x) * 100:.1f}%  median '
          f'{float(np.median(x)) * 100:.1f}%  mean {float(np.mean(x)) * 100:.1f}%  over '
          f'{x.shape[1]} game(s){note}')

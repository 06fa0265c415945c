"""Can the network imitate? BC through the REAL learner update on in-memory data, per-game
held-out greedy accuracy against the majority action's share (issue 11, the imitation gate's
fast diagnostic; minutes instead of the gate's 20-minute CLI run plus evaluation).

    .venv/bin/python benchmarks/imitation_probe.py --data-dir /tmp/gate/data \\
        --selection checkpoints:7-9 --steps 3000 [--game Pong] [--set network.feature_norm=true]

Reads every episode of the selection (per game, `rlds_reader.episodes_from_config`), cuts 1-step
transitions with the data path's numpy reference, and holds out 200-step chunks (one in seven,
staggered by episode) as the validation set. Trains `--config` (default cpu_small_bc) with
`learner.update` on stratified batches (the config's games_per_batch x transitions_per_game, in
runs of `data.transitions_per_item` consecutive transitions, as the Reverb items deliver), and
every `--every` steps prints one JSON line: steps/s, the batch loss, the greedy accuracy per game
on (a subsample of) the training set and on the held-out set, and the load average. A network
that only learned each game's action prior sits at the majority share printed at the start.
The transitions are cached in `--cache` (an .npz) for reruns.

Per game it also prints the held-out recall of each data action (how often the greedy action is
`a` where the data's is `a`). With `--rollout-steps N`, the trained greedy policy then plays N
steps of each game under the evaluation protocol (`evaluator.make_eval_env`, the evaluators'
epsilon), and at every step the generator's scripted policy (`policies.make_heuristic`) is asked
what it would do in the same state: the closed-loop agreement, the (script, agent) action counts
and the completed episodes' scores; `--driver script` lets the script act instead (at
`--script-epsilon`), so the policy is asked in the data's own states, and Breakout's counts are
split by "ball in play" (the serve is 0.42% of its states). `--checkpoint W --rollout-steps N`
skips training and asks the params of a run, e.g. the imitation gate's:

    .venv/bin/python benchmarks/imitation_probe.py --checkpoint runs/gate/strided \\
        --game Breakout --rollout-steps 5000 --driver script

Held-out accuracy is measured on the data's states; a policy
that drifts to states the data rarely shows (covariate shift) scores less than it predicts.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from scaled_ql.agents import actors, checkpointing, methods
from scaled_ql.agents import learner as learner_lib
from scaled_ql.configs import get_config, overrides
from scaled_ql.datasets import policies, rlds_reader
from scaled_ql.datasets import transitions as transitions_lib
from scaled_ql.eval import evaluator
from scaled_ql.types import Transition

# Held-out unit: contiguous 200-step chunks, so neighbours of a val frame are not trained on.
CHUNK = 200


def load(cfg, cache: str) -> dict[str, np.ndarray]:
  if cache and os.path.exists(cache):
    z = np.load(cache)
    return {k: z[k] for k in z.files}
  obs, act, gid, val = [], [], [], []
  for g, game in enumerate(cfg.games):
    for i, ep in enumerate(rlds_reader.episodes_from_config(cfg.data, game, seed=0)):
      steps = {k: np.asarray(v) for k, v in next(iter(ep['steps'].batch(1 << 20))).items()}
      tr = transitions_lib.episode_transitions(steps, 1, 0.99, 1.0, g)
      obs.append(tr.observation)
      act.append(tr.action)
      gid.append(tr.game_id)
      val.append((np.arange(len(tr.action)) // CHUNK + i) % 7 == 3)
  out = dict(obs=np.concatenate(obs), act=np.concatenate(act), gid=np.concatenate(gid),
             val=np.concatenate(val))
  if cache:
    np.savez(cache, **out)
  return out


# States worth counting apart, per game: {game: (name, predicate on the RAM)}. Breakout's serve is
# one state in ~240 of the data, and a policy that misses it stalls (docs/learning.md, 2026-12-02).
STATE_SPLITS = {'Breakout': ('ball_in_play', policies.breakout_ball_in_play)}


def _agreement(counts: np.ndarray) -> dict:
  total = int(counts.sum())
  return dict(states=total, agreement_with_script=(round(float(np.trace(counts) / total), 3)
                                                   if total else None),
              script_by_agent_counts=counts.tolist())


def closed_loop(cfg, params, game: str, game_id: int, steps: int, seed: int = 0,
                driver: str = 'agent', script_epsilon: float = 0.05) -> dict:
  """Plays `steps` steps of `game` under the evaluation protocol and, in every state, compares the
  greedy policy's action with the scripted policy's.

  driver='agent': the policy acts (with the evaluators' epsilon): closed loop, the states the
  policy reaches. driver='script': the script acts, a uniform random action with probability
  `script_epsilon` (the generator's near-optimal splits: 0.05-0.10): the states the data holds.
  Games in STATE_SPLITS also get the counts split by their predicate (`by_state`).
  """
  if driver not in ('agent', 'script'):
    raise ValueError(f"driver must be 'agent' or 'script', got {driver!r}")
  env = evaluator.make_eval_env(game, cfg.eval, seed)
  script = policies.make_heuristic(game)
  if script is None and driver == 'script':
    raise ValueError(f'{game} has no scripted policy to drive it (policies.make_heuristic)')
  policy = actors.make_policy(cfg, cfg.eval.epsilon if driver == 'agent' else 0.0)
  split_name, split = STATE_SPLITS.get(game, (None, None))
  key, rng = jax.random.PRNGKey(seed), np.random.default_rng(seed)
  a = env.num_actions
  counts = {True: np.zeros((a, a), np.int64), False: np.zeros((a, a), np.int64)}  # [script, agent]
  scores, score, timestep = [], 0.0, env.reset()
  for _ in range(steps):
    key, k = jax.random.split(key)
    action = int(policy(params, k, timestep.observation[None], np.full(1, game_id, np.int32))[0])
    if script is not None:
      flag = True if split is None else bool(split(env.ale.getRAM()))
      scripted = int(script(env))
      counts[flag][scripted, action] += 1
      if driver == 'script':
        action = int(rng.integers(a)) if rng.random() < script_epsilon else scripted
    timestep = env.step(action)
    score += float(timestep.reward)
    if timestep.last():
      scores.append(score)
      score, timestep = 0.0, env.reset()
  out = dict(game=game, driver=driver, episodes=len(scores),
             mean_score=round(float(np.mean(scores)), 2) if scores else None,
             scores=scores, **_agreement(counts[True] + counts[False]))
  if split is not None:
    out['by_state'] = {split_name: _agreement(counts[True]),
                       f'not_{split_name}': _agreement(counts[False])}
  return out


def rollouts(cfg, params, a, **tags) -> None:
  """`closed_loop` for each game of `cfg` (only `--game` when given), one JSON line each."""
  for g, game in enumerate(cfg.games):
    if a.game and game != a.game:
      continue
    loop = closed_loop(cfg, params, game, g, a.rollout_steps, driver=a.driver,
                       script_epsilon=a.script_epsilon)
    print(json.dumps(dict(tag=a.tag, **tags, closed_loop=loop,
                          load=round(os.getloadavg()[0], 2))), flush=True)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--data-dir', default='/tmp/gate/data')
  p.add_argument('--selection', default='checkpoints:7-9')
  p.add_argument('--config', default='cpu_small_bc')
  p.add_argument('--set', action='append', default=[], help='config overrides, as for the CLI')
  p.add_argument('--game', default='', help='train on this game of the config alone')
  p.add_argument('--steps', type=int, default=3000)
  p.add_argument('--every', type=int, default=500)
  p.add_argument('--cache', default='', help='an .npz to cache the transitions in')
  p.add_argument('--tag', default='')
  p.add_argument('--rollout-steps', type=int, default=0,
                 help='after training, play each game this many steps (closed-loop diagnostic)')
  p.add_argument('--driver', choices=('agent', 'script'), default='agent',
                 help="who acts in the rollout: the trained policy (closed loop) or the "
                      "generator's script at --script-epsilon (the data's states)")
  p.add_argument('--script-epsilon', type=float, default=0.05)
  p.add_argument('--checkpoint', default='',
                 help='no training: the rollout only, with the params of this run (a workdir)')
  a = p.parse_args(argv)
  if a.checkpoint:
    if not a.rollout_steps:
      p.error('--checkpoint needs --rollout-steps')
    cfg, params, step = checkpointing.load_params(a.checkpoint)
    rollouts(cfg, params, a, step=step, checkpoint=a.checkpoint)
    return
  cfg = get_config(a.config).replace(data=dict(data_dir=a.data_dir, selection=a.selection))
  cfg = overrides.apply(cfg, a.set)
  d = load(cfg, a.cache)
  obs, act, gid, val = d['obs'], d['act'], d['gid'], d['val']
  if a.game:
    keep = gid == list(cfg.games).index(a.game)
    obs, act, val = obs[keep], act[keep], val[keep]
    gid = np.zeros(int(keep.sum()), gid.dtype)
    cfg = cfg.replace(games=(a.game,))
  games, agent = cfg.games, cfg.agent
  train_idx = [np.where((gid == g) & ~val)[0] for g in range(len(games))]
  val_idx = [np.where((gid == g) & val)[0] for g in range(len(games))]
  for g, game in enumerate(games):
    counts = np.bincount(act[val_idx[g]])
    print(f'{game}: {len(train_idx[g])} train, {len(val_idx[g])} held-out transitions; majority '
          f'action share (held-out) {counts.max() / counts.sum():.3f}', flush=True)
  rng = np.random.default_rng(0)

  per_item = cfg.data.transitions_per_item  # runs of consecutive transitions, as Reverb items

  def draw(idx: np.ndarray) -> np.ndarray:
    if per_item == 1:
      return rng.choice(idx, agent.transitions_per_game)
    first = rng.integers(0, len(idx) - per_item + 1, agent.transitions_per_game // per_item)
    return idx[(first[:, None] + np.arange(per_item)).reshape(-1)]

  def batch() -> Transition:
    i = np.concatenate([draw(train_idx[k % len(games)]) for k in range(agent.games_per_batch)])
    zeros = np.zeros(len(i), np.float32)
    return Transition(obs[i], act[i].astype(np.int32), zeros, zeros + 1, obs[i],
                      gid[i].astype(np.int32))

  greedy = actors.make_policy(cfg, 0.0)  # the evaluators' own greedy policy
  method = methods.get(cfg.agent.loss)
  key = jax.random.PRNGKey(0)

  def predict(params, idx) -> np.ndarray:
    return np.concatenate([np.asarray(greedy(params, key, obs[idx[j:j + 256]],
                                             gid[idx[j:j + 256]].astype(np.int32)))
                           for j in range(0, len(idx), 256)])

  def accuracy(params, idx_per_game, recall=False) -> list:
    out = []
    for idx in idx_per_game:
      idx = idx[:1024]
      pred = predict(params, idx)
      acc = round(float(np.mean(pred == act[idx])), 3)
      if recall:  # {data action: share of its transitions where the greedy action is the same}
        acc = dict(accuracy=acc, recall={int(k): round(float(np.mean(pred[act[idx] == k] == k)), 2)
                                         for k in np.unique(act[idx])})
      out.append(acc)
    return out

  def policy_params(state):
    return method.policy_params(state.params, state.behaviour_params)

  state = learner_lib.initial_state(cfg, jax.random.PRNGKey(0))
  t_compiled = None
  for step in range(1, a.steps + 1):
    state, metrics = learner_lib.update(state, batch(), cfg=cfg)
    if step == 1:
      jax.block_until_ready(metrics)
      t_compiled = time.time()
    if step % a.every == 0:
      heldout = accuracy(policy_params(state), val_idx, recall=True)
      print(json.dumps(dict(
          tag=a.tag, step=step, steps_per_s=round((step - 1) / (time.time() - t_compiled), 2),
          loss=round(float(metrics['loss']), 3),
          train_acc=accuracy(policy_params(state), [i[::7] for i in train_idx]),
          heldout_acc=[h['accuracy'] for h in heldout],
          heldout_recall=[h['recall'] for h in heldout],
          load=round(os.getloadavg()[0], 2))), flush=True)
  if a.rollout_steps:
    rollouts(cfg, policy_params(state), a, step=a.steps)


if __name__ == '__main__':
  main()

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
and the completed episodes' scores. Held-out accuracy is measured on the data's states; a policy
that drifts to states the data rarely shows (covariate shift) scores less than it predicts.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from scaled_ql.agents import actors, methods
from scaled_ql.agents import learner as learner_lib
from scaled_ql.configs import get_config, overrides
from scaled_ql.datasets import policies, rlds_reader
from scaled_ql.datasets import transitions as transitions_lib
from scaled_ql.eval import evaluator
from scaled_ql.types import Transition

CHUNK = 200  # held-out unit: contiguous 200-step chunks, so neighbours of a val frame are not trained on


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


def closed_loop(cfg, params, game: str, game_id: int, steps: int, seed: int = 0) -> dict:
  """Plays the greedy policy in `game` for `steps` agent steps (evaluation protocol) and
  compares each action with the scripted policy's in the same state."""
  env = evaluator.make_eval_env(game, cfg.eval, seed)
  script = policies.make_heuristic(game)
  policy = actors.make_policy(cfg, cfg.eval.epsilon)
  key = jax.random.PRNGKey(seed)
  counts = np.zeros((env.num_actions, env.num_actions), np.int64)  # [script, agent]
  scores, score, timestep = [], 0.0, env.reset()
  for _ in range(steps):
    key, k = jax.random.split(key)
    action = int(policy(params, k, timestep.observation[None], np.full(1, game_id, np.int32))[0])
    if script is not None:
      counts[int(script(env)), action] += 1
    timestep = env.step(action)
    score += float(timestep.reward)
    if timestep.last():
      scores.append(score)
      score, timestep = 0.0, env.reset()
  total = counts.sum()
  return dict(game=game, episodes=len(scores),
              mean_score=round(float(np.mean(scores)), 2) if scores else None,
              scores=scores, agreement_with_script=(round(float(np.trace(counts) / total), 3)
                                                    if total else None),
              script_by_agent_counts=counts.tolist() if total else None)


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
  a = p.parse_args(argv)
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
          heldout_acc=[h['accuracy'] for h in heldout], heldout_recall=[h['recall'] for h in heldout],
          load=round(os.getloadavg()[0], 2))), flush=True)
  if a.rollout_steps:
    for g, game in enumerate(games):
      loop = closed_loop(cfg, policy_params(state), game, g, a.rollout_steps)
      print(json.dumps(dict(tag=a.tag, step=a.steps, closed_loop=loop,
                            load=round(os.getloadavg()[0], 2))), flush=True)


if __name__ == '__main__':
  main()

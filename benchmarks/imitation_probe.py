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
from scaled_ql.datasets import rlds_reader
from scaled_ql.datasets import transitions as transitions_lib
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

  def accuracy(params, idx_per_game) -> list[float]:
    out = []
    for idx in idx_per_game:
      idx = idx[:1024]
      pred = np.concatenate([np.asarray(greedy(params, key, obs[idx[j:j + 256]],
                                               gid[idx[j:j + 256]].astype(np.int32)))
                             for j in range(0, len(idx), 256)])
      out.append(round(float(np.mean(pred == act[idx])), 3))
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
      print(json.dumps(dict(
          tag=a.tag, step=step, steps_per_s=round((step - 1) / (time.time() - t_compiled), 2),
          loss=round(float(metrics['loss']), 3),
          train_acc=accuracy(policy_params(state), [i[::7] for i in train_idx]),
          heldout_acc=accuracy(policy_params(state), val_idx), load=round(os.getloadavg()[0], 2))),
          flush=True)


if __name__ == '__main__':
  main()

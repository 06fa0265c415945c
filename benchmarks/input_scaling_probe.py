"""Input scaling vs imitation on one game, with networks small enough to rule our design out.

    .venv/bin/python benchmarks/input_scaling_probe.py --game Pong --network nature \\
        --input scale,standardize,mean_frame --examples 256 --steps 300

BC (optax Adam, batch 64, softmax cross-entropy) on one game's transitions (the same data and
held-out split as `imitation_probe.py`, whose cache it shares), for each input scaling:
- scale: x / 255 (Dopamine; the paper);
- standardize: each frame minus its spatial mean over its spatial std + 1 (`NetworkConfig.input_norm
  ='standardize'`, `networks.q_network.preprocess`);
- mean_frame: minus the game's mean frame over the data, / 255 (needs dataset statistics).
Networks: 'nature' (Mnih et al. 2015: 8x8/4 32, 4x4/2 64, 3x3/1 64, Dense 512; no normalization
layers) or 'ours' (the config's Q-network, one game, one atom). `--examples N` fits N random
frames (can it memorize at all?); 0 trains on the whole training split and reports held-out
accuracy too. Prints the logit spread across examples at initialization: with x / 255 the frames
differ by about one grey level on average and the network's outputs barely differ.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import imitation_probe
from scaled_ql.configs import get_config
from scaled_ql.networks import q_network


def make_net(kind: str, scaling: str, num_actions: int, mean_frame: np.ndarray, cfg):
  def scale(o):
    if scaling == 'mean_frame':
      return (o.astype(jnp.float32) - mean_frame) / 255.0
    return q_network.preprocess(o, 'standardize' if scaling == 'standardize' else 'scale')

  if kind == 'ours':
    net_cfg = dataclasses.replace(cfg.network, input_norm='scale')
    game = (cfg.games[0],)

    def forward(o):  # our network, with the probe's scaling in front (its own /255 undone)
      x = scale(o)
      as_uint8_range = x * 255.0  # q_network divides by 255 again: feed it the scaled input * 255
      return q_network.q_network_forward(net_cfg, game, 1, as_uint8_range,
                                         jnp.zeros(o.shape[0], jnp.int32)).logits[..., 0]
  else:
    def forward(o):
      x = scale(o)
      x = jax.nn.relu(hk.Conv2D(32, 8, 4, padding='VALID')(x))
      x = jax.nn.relu(hk.Conv2D(64, 4, 2, padding='VALID')(x))
      x = jax.nn.relu(hk.Conv2D(64, 3, 1, padding='VALID')(x))
      return hk.Linear(num_actions)(jax.nn.relu(hk.Linear(512)(hk.Flatten()(x))))
  return hk.without_apply_rng(hk.transform(forward))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--data-dir', default='/tmp/gate/data')
  p.add_argument('--selection', default='checkpoints:7-9')
  p.add_argument('--cache', default='')
  p.add_argument('--game', default='Pong')
  p.add_argument('--network', default='nature', choices=('nature', 'ours'))
  p.add_argument('--input', default='scale,standardize,mean_frame')
  p.add_argument('--examples', type=int, default=256, help='0 = the whole training split')
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--lr', type=float, default=1e-3)
  a = p.parse_args(argv)
  cfg = get_config('cpu_small_bc').replace(data=dict(data_dir=a.data_dir, selection=a.selection))
  d = imitation_probe.load(cfg, a.cache)
  mine = d['gid'] == list(cfg.games).index(a.game)
  obs, act, val = d['obs'][mine], d['act'][mine], d['val'][mine]
  cfg = cfg.replace(games=(a.game,))
  num_actions = int(act.max()) + 1
  rng = np.random.default_rng(1)
  train = (np.where(~val)[0] if a.examples == 0
           else rng.choice(len(act), a.examples, replace=False))
  heldout = np.where(val)[0]
  mean_frame = obs[::10].astype(np.float32).mean(0)
  for scaling in a.input.split(','):
    net = make_net(a.network, scaling, num_actions, mean_frame, cfg)
    params = net.init(jax.random.PRNGKey(0), obs[:2])
    opt = optax.adam(a.lr)
    opt_state = opt.init(params)
    spread = float(np.asarray(net.apply(params, obs[train[:256]])).std(0).mean())

    @jax.jit
    def update(params, opt_state, o, y):
      loss, grads = jax.value_and_grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
          net.apply(q, o), y).mean())(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda q, o: jnp.argmax(net.apply(q, o), -1))

    def acc(params, idx):
      idx = idx[::max(1, len(idx) // 1024)]
      pred = np.concatenate([np.asarray(predict(params, obs[idx[j:j + 256]]))
                             for j in range(0, len(idx), 256)])
      return round(float(np.mean(pred == act[idx])), 3)

    print(f'[{a.network}, {scaling}] {a.game}: logit std across examples at init {spread:.4f}; '
          f'majority share {np.bincount(act[train]).max() / len(train):.3f}', flush=True)
    t0 = time.time()
    for step in range(1, a.steps + 1):
      b = rng.choice(train, 64)
      params, opt_state, loss = update(params, opt_state, obs[b], act[b])
      if step % max(1, a.steps // 5) == 0:
        extra = f', held-out acc {acc(params, heldout)}' if a.examples == 0 else ''
        print(f'  step {step}: loss {float(loss):.3f}, train acc {acc(params, train)}{extra} '
              f'({time.time() - t0:.0f} s)', flush=True)


if __name__ == '__main__':
  main()

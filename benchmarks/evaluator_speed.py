"""Evaluator throughput against the emulator + inference bound (issue 13: >= 0.9x the bound).

    flock /tmp/scaled_ql_heavy.lock .venv/bin/python benchmarks/evaluator_speed.py \
        [--config cpu_small] [--games Pong,Breakout] [--steps 4000] [--num-envs 4,16]
        [--env-groups 1] [--cpus 0] [--policy network,random] [--device cpu|gpu] [--repeats 2]
        [--together] [--set games=...]

Per (policy, num_envs, env_groups), each game measured in turn (with --together: all the games
at once, one call for all their environments, as `evaluate` plays them by default), alternating
with the raw emulator:
  raw:       num_envs `AtariEnv`s (the evaluation's preprocessing) per game stepped round robin
             with random numpy actions and no network, pinned to the first of --cpus: agent
             steps/s. Emulator cost = 1 / raw (more emulators cost a little more each: memory).
             With --together every game's emulators take turns, as in the evaluator, each game's
             steps timed on their own; the bound weighs each game by the steps the evaluator ran
             of it.
  network:   the jitted policy alone at the evaluator's batch (games x num_envs / env_groups), on
             random observations: seconds per observation in steady state (WARMUP_CALLS untimed
             calls, then at least 20 calls and 0.2 s). Measured right after the emulator loop, the
             first calls are slow (at batch 1 on cpu_small: ~1.2 ms, then ~0.6-0.9, then ~0.45):
             the emulator has evicted the network's caches. Timing them (10 calls after one warm-up,
             until 2026-12-05) put ~10% of that interference into the bound and lowered it.
  bound:     1 / (emulator s/step + network s/observation) (`bound_steps_per_second`; with
             several games, their emulators' time weighted by the steps run of each): the steps/s
             of a loop that does nothing but step the emulators and call the network, serially
             on the same core(s). It is the ceiling for a CPU evaluator; on an accelerator the
             network overlaps with the emulators (env_groups 2) and the bound is the emulator
             alone. The emulators and the network are measured right before the evaluator and
             again right after it, and the bound is the mean of the two (`bracketed`); `moved`
             (after / before) shows how far the machine's speed changed across the round.
  evaluator: `evaluate_games` agent steps/s (compile excluded). Every episode started is played
             to its end, so near the end the batch has idle slots; that cost is counted.
  ratio:     evaluator / bound (goal >= 0.9), and evaluator / raw, per measurement (raw, network
             and evaluator measured back to back, so a change of load hits all three), then the
             median over games x --repeats, and the median over the steady rounds only: those
             whose bound moved by at most STEADY (10%) across the round. On a VM whose speed
             jumps within seconds (2026-12-05 evening: single rounds 0.68-1.16 with the bound
             measured once, before) the steady rounds are the ones to read. The same ratio per
             CPU second of the process (`time.process_time`: steps per CPU-second of the
             evaluator against the bound in CPU-seconds) does not depend on how much of the core
             other jobs take, so it is the figure to trust on a loaded machine (the evaluator is
             pinned to one core); it does move with the VM's own speed.
The load average (`uptime`) is printed with every line, and each round's line adds the VM's steal
time over the round (`machine.py`: CPU time the host took back, which the load does not show).

--split (the network policy, one environment group): where each round's time goes against its
bound. The policy's calls are timed inside the loop (each waited for, as the one group's loop
waits anyway) by batch size, against the same batch timed back to back: a call's extra time in
the loop (the emulators between calls evict the network's caches), the played-out last
episodes' smaller batches, and the rest of the loop (the emulators and the loop's own Python)
against the raw emulators (`split_line`).

--full-eval: one evaluation of every game of the config with its `eval` settings (params at init):
what an evaluator round costs with played-out episodes.
--network-only: ms/observation and GFLOP/s of the policy at --batches, no emulator (e.g. the
ResNet-101 estimate: --config atari40_suboptimal_resnet101 --network-only --batches 1,8).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Mapping, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (a sibling module: the VM's steal time beside each figure)


def load() -> str:
  one, five, _ = os.getloadavg()
  return f'load {one:.2f}/{five:.2f}'


def raw_steps_per_second(games: Sequence[str], steps: int, num_envs: int = 1,
                         seed: int = 0) -> dict[str, tuple[float, float]]:
  """{game: (agent steps per wall-clock second, per CPU second of this process)} of `num_envs`
  emulators per game, all of them stepped round robin with random actions, no network: the
  emulator part of the bound, with as many emulators (and their memory) as the evaluator has,
  and the same alternation between games. Each game's steps are timed on their own."""
  from scaled_ql.configs.base import EvalConfig
  from scaled_ql.eval.evaluator import env_seed, make_eval_env
  envs = [(g, make_eval_env(g, EvalConfig(), env_seed(seed, g, i)))
          for g in games for i in range(num_envs)]
  rng = np.random.default_rng(seed)
  actions = rng.integers(0, 1 << 30, steps)
  for _, env in envs:
    env.reset()
  wall = dict.fromkeys(games, 0.0)
  cpu = dict.fromkeys(games, 0.0)
  count = dict.fromkeys(games, 0)
  for t, a in enumerate(actions):
    game, env = envs[t % len(envs)]
    w, c = time.perf_counter(), time.process_time()
    ts = env.step(a % env.num_actions)
    if ts.last():
      env.reset()
    wall[game] += time.perf_counter() - w
    cpu[game] += time.process_time() - c
    count[game] += 1
  return {g: (count[g] / wall[g], count[g] / cpu[g]) for g in games}


def bound_steps_per_second(steps: Mapping[str, int], raw: Mapping[str, float],
                           network_s: float) -> float:
  """Agent steps per second of a loop that only steps the emulators and calls the network:
  `steps[g]` steps of each game at its emulators' `raw[g]` steps/s, plus `network_s` seconds per
  observation for every step."""
  total = sum(steps.values())
  return total / (sum(n / raw[g] for g, n in steps.items()) + total * network_s)


STEADY = 0.10  # a round whose bound moved by more than this fraction is not steady


def bracketed(before: float, after: float) -> tuple[float, float]:
  """(the mean of a bound measured before and after the evaluator, after / before): the bound
  set against the round, and how far the machine's speed moved across it."""
  if before <= 0 or after <= 0:
    raise ValueError(f'bounds must be > 0, got {before} and {after}')
  return 0.5 * (before + after), after / before


def steady_median(ratios: Sequence[float], moved: Sequence[float],
                  tolerance: float = STEADY) -> tuple[float, int]:
  """(the median ratio over the rounds whose bound moved by at most `tolerance`, how many
  there were); (nan, 0) when none was steady."""
  kept = [r for r, m in zip(ratios, moved) if abs(m - 1.0) <= tolerance]
  return (float(np.median(kept)) if kept else float('nan')), len(kept)


WARMUP_CALLS = 5  # untimed: the first calls after other work run on cold caches (see above)


def policy_seconds_per_observation(policy, params, batch: int, calls: int = 20,
                                   min_seconds: float = 0.2, warmup: int = WARMUP_CALLS
                                   ) -> tuple[float, float]:
  """(wall, CPU) seconds of one jitted policy call on a batch, per observation (the network
  alone, in steady state): `warmup` untimed calls, then at least `calls` calls and
  `min_seconds`."""
  import jax
  obs = np.random.default_rng(0).integers(0, 256, (batch, 84, 84, 4), dtype=np.uint8)
  game_id = np.zeros((batch,), np.int32)
  key = np.asarray(jax.random.PRNGKey(0))
  for _ in range(max(1, warmup)):
    jax.block_until_ready(policy(params, key, obs, game_id))
  n, start, cpu = 0, time.perf_counter(), time.process_time()
  while n < calls or time.perf_counter() - start < min_seconds:
    jax.block_until_ready(policy(params, key, obs, game_id))
    n += 1
  return ((time.perf_counter() - start) / n / batch,
          (time.process_time() - cpu) / n / batch)


class TimedPolicy:
  """A policy that waits for each call's result and records (batch, seconds) per call."""

  def __init__(self, policy):
    self._policy, self.calls = policy, []

  def __call__(self, params, key, observation, game_id):
    import jax
    start = time.perf_counter()
    out = jax.block_until_ready(self._policy(params, key, observation, game_id))
    self.calls.append((observation.shape[0], time.perf_counter() - start))
    return out


def split_line(calls: Sequence[tuple[int, float]], warm_s: Mapping[int, float], loop_s: float,
               raw_s: float, full_batch: int) -> str:
  """Where a round's `loop_s` went: the policy's `calls` ((batch, seconds) each) against
  `warm_s[batch]` (one call back to back), split into the calls' extra time in the loop and
  the cost of the batches smaller than `full_batch` (their warm time minus what their
  observations cost at `full_batch`); the rest of the loop against `raw_s` (the raw emulators'
  time for the same steps)."""
  by_batch: dict[int, list[float]] = {}
  for batch, seconds in calls:
    by_batch.setdefault(batch, []).append(seconds)
  policy_s = sum(seconds for _, seconds in calls)
  extra_s = sum(sum(v) - len(v) * warm_s[b] for b, v in by_batch.items())
  per_obs = warm_s[full_batch] / full_batch
  small_s = sum(len(v) * (warm_s[b] - b * per_obs) for b, v in by_batch.items() if b < full_batch)
  batches = ', '.join(f'batch {b}: {len(v)} calls, {np.mean(v) * 1e6:.0f} us in the loop / '
                      f'{warm_s[b] * 1e6:.0f} back to back' for b, v in sorted(by_batch.items()))
  return (f'split: policy {policy_s:.2f}s ({batches}): calls slower in the loop {extra_s:+.2f}s, '
          f'batches under {full_batch} {small_s:+.2f}s; emulators + the loop\'s Python '
          f'{loop_s - policy_s:.2f}s against the raw emulators\' {raw_s:.2f}s '
          f'({loop_s - policy_s - raw_s:+.2f}s)')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='cpu_small')
  parser.add_argument('--games', default='Pong,Breakout')
  parser.add_argument('--steps', type=int, default=4000, help='step budget per measurement')
  parser.add_argument('--num-envs', default='4,16')
  parser.add_argument('--env-groups', default='1')
  parser.add_argument('--policy', default='network,random')
  parser.add_argument('--cpus', default='0', help='comma-separated CPU ids for the evaluator')
  parser.add_argument('--device', default='cpu', choices=('cpu', 'gpu', 'tpu'),
                      help='where the policy runs (evaluator.policy_device)')
  parser.add_argument('--repeats', type=int, default=1, help='measurements per game')
  parser.add_argument('--together', action='store_true',
                      help='play the --games at once, batched in the same calls (what '
                      'evaluate does by default, eval.games_at_once), not one after another')
  parser.add_argument('--network-only', action='store_true')
  parser.add_argument('--split', action='store_true',
                      help='time the policy\'s calls inside the loop: where each round\'s time '
                      'goes against its bound (one environment group)')
  parser.add_argument('--full-eval', action='store_true',
                      help='one evaluation of all the config\'s games with its eval settings '
                      '(params at init): what a round costs')
  parser.add_argument('--batches', default='1,4,16')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='config overrides, as for the CLI (e.g. games=BeamRider,Centipede,'
                      'Freeway,SpaceInvaders: the demo\'s network)')
  args = parser.parse_args()
  if args.split and args.env_groups != '1':
    parser.error('--split times each call waited for: it needs --env-groups 1')
  cpus = [int(c) for c in args.cpus.split(',')]
  os.sched_setaffinity(0, set(cpus))  # before JAX starts: XLA sizes its thread pool from it

  import jax

  from scaled_ql.agents import actors, builder
  from scaled_ql.eval import evaluator
  from scaled_ql.launch import run
  from scaled_ql.networks import analysis

  cfg = run.resolve_config(args.config, overrides=args.set)
  device = evaluator.policy_device(cfg.eval, args.device)
  games = [g.strip() for g in args.games.split(',')]
  nets = builder.agent_networks(cfg)
  params = jax.device_put(nets.q.init(jax.random.PRNGKey(0), *builder.dummy_inputs()), device)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  flops = analysis.flops_per_example(cfg.network, cfg.games, nets.atoms.shape[0])
  policies = {'network': actors.make_policy(cfg, cfg.eval.epsilon),
              'random': evaluator.uniform_random_policy(cfg.games)}
  print(f'config {cfg.name} ({n_params / 1e6:.2f}M params, {flops / 1e9:.3f} GFLOP/obs), '
        f'games {games}, budget {args.steps} steps, evaluator cpus {cpus}, raw cpu {cpus[0]}, '
        f'policy on {device}, jax {jax.__version__}, {load()}', flush=True)

  if args.full_eval:
    start = time.perf_counter()
    results = evaluator.evaluate(policies['network'], params, cfg.games, cfg.eval,
                                 model_games=cfg.games, device=args.device,
                                 log=lambda line: print(line, flush=True))
    print(evaluator.aggregate_line(results))
    print(f'one evaluation of {len(cfg.games)} games with the config\'s eval settings: '
          f'{sum(r.steps for r in results.values())} steps in {time.perf_counter() - start:.0f}s  '
          f'{load()}')
    return

  if args.network_only:
    for batch in [int(b) for b in args.batches.split(',')]:
      s, _ = policy_seconds_per_observation(policies['network'], params, batch, calls=5,
                                            min_seconds=0.0, warmup=1)
      print(f'network batch {batch:>4}: {s * 1e3:8.2f} ms/obs  {1 / s:8.1f} obs/s  '
            f'{flops / s / 1e9:7.1f} GFLOP/s  {load()}', flush=True)
    return

  def raw(unit, num_envs=1):
    os.sched_setaffinity(0, {cpus[0]})
    try:
      return raw_steps_per_second(unit, max(args.steps, 2000) * len(unit), num_envs)
    finally:
      os.sched_setaffinity(0, set(cpus))

  raw(games[:1])  # warm the emulator/cv2 code paths
  for name in args.policy.split(','):
    for num_envs in [int(n) for n in args.num_envs.split(',')]:
      for groups in [int(n) for n in args.env_groups.split(',')]:
        ratios, bound_ratios, cpu_ratios, moved = [], [], [], []
        for rep in range(args.repeats):
          for unit in ([games] if args.together else [[g] for g in games]):
            # Measured back to back, so that all of them see about the same load: the raw
            # emulators and the network alone at the evaluator's batch, the evaluator, then the
            # emulators and the network again.
            batch = -(-num_envs * len(unit) // groups)

            def emulators_and_network():
              return raw(unit, num_envs), (
                  policy_seconds_per_observation(policies[name], params, batch)
                  if name == 'network' else (0.0, 0.0))

            window = machine.Steal()  # the round: bound before, evaluator, bound after
            before = emulators_and_network()
            split = args.split and name == 'network'  # (the random policy has no bound to split)
            policy = TimedPolicy(policies[name]) if split else policies[name]
            results = evaluator.evaluate_games(
                policy, params, [(g, cfg.games.index(g)) for g in unit], cfg.eval,
                args.steps, num_envs, env_groups=groups, device=device)
            after = emulators_and_network()
            steps = sum(r.steps for r in results.values())
            seconds = sum(r.seconds for r in results.values())
            cpu_seconds = sum(r.cpu_seconds for r in results.values())
            # The loop's own mix of games: each game's steps at its emulators' rate, plus the
            # network per observation; on wall-clock time (i = 0) and per CPU second (i = 1).
            ran = {g: r.steps for g, r in results.items()}

            def bounds(i, with_network=True):
              return [bound_steps_per_second(ran, {g: raws[g][i] for g in ran},
                                             net[i] if with_network else 0.0)
                      for raws, net in (before, after)]

            raw_sps, _ = bracketed(*bounds(0, with_network=False))
            raw_cpu_sps, _ = bracketed(*bounds(1, with_network=False))
            bound, round_moved = bracketed(*bounds(0))
            cpu_bound, _ = bracketed(*bounds(1))  # per CPU second
            net_s = 0.5 * (before[1][0] + after[1][0])
            net_cpu_s = 0.5 * (before[1][1] + after[1][1])
            sps, cpu_sps = steps / seconds, steps / cpu_seconds
            ratios.append(sps / raw_sps)
            bound_ratios.append(sps / bound)
            cpu_ratios.append(cpu_sps / cpu_bound)
            moved.append(round_moved)
            budget = next(iter(results.values())).budget
            print(f'  {name:<8} envs {num_envs:>3} groups {groups} {",".join(unit):<9} rep {rep}: '
                  f'batch {batch} raw {raw_sps:6.0f} steps/s  network {net_s * 1e3:5.2f} ms/obs  '
                  f'bound {bound:6.0f} (moved x{round_moved:.2f})  evaluator {sps:6.0f} steps/s '
                  f'({steps} steps, budget {budget} per game)  ratio/bound {sps / bound:.2f}  | '
                  f'per CPU second: raw {raw_cpu_sps:6.0f} network {net_cpu_s * 1e3:5.2f} ms/obs '
                  f'bound {cpu_bound:6.0f} evaluator {cpu_sps:6.0f} ratio '
                  f'{cpu_sps / cpu_bound:.2f}  {load()}, steal over the round '
                  f'{machine.percent_text(window.percent())}', flush=True)
            if split:
              # evaluate_games first compiles every batch its one group can shrink to, before
              # its clock starts: those calls are not the loop's.
              compiled = len(evaluator.group_batch_sizes(batch))
              calls = policy.calls[compiled:]
              # The full batch back to back as the bound has it (before and after the round);
              # the smaller batches the last episodes ran at, timed now.
              warm = {b: policy_seconds_per_observation(policies[name], params, b)[0] * b
                      for b in sorted({b for b, _ in calls} - {batch})}
              warm[batch] = net_s * batch
              print('    ' + split_line(calls, warm, seconds, steps / raw_sps, batch),
                    flush=True)
        steady, n_steady = steady_median(bound_ratios, moved)
        print(f'policy {name:<8} num_envs {num_envs:>3} env_groups {groups}: ratio/bound median '
              f'{np.median(bound_ratios):.2f} (min {min(bound_ratios):.2f}, max '
              f'{max(bound_ratios):.2f}); steady rounds (bound moved <= {STEADY:.0%}): median '
              f'{steady:.2f} over {n_steady} of {len(moved)}; per CPU second '
              f'{np.median(cpu_ratios):.2f} (min {min(cpu_ratios):.2f}, max '
              f'{max(cpu_ratios):.2f}); ratio/raw median {np.median(ratios):.2f}; over '
              f'{len(ratios)} measurements  {load()}', flush=True)

if __name__ == '__main__':
  main()

"""Issue 11's first gate: can the CPU network imitate? BC on the near-optimal splits, per game.

    flock /tmp/scaled_ql_heavy.lock .venv/bin/python benchmarks/imitation_gate.py \
        --data-dir data/gate --workdir runs/gate --minutes 20 --variants strided

As a new user would, through the CLI: `scaled-ql data generate --checkpoints 10
--steps-per-checkpoint 10000` (skipped when the data is there; ~3.5 min on 2 cores), then per
network variant
`scaled-ql learn --config cpu_small_bc --set data.selection=checkpoints:7-9` stopped by SIGTERM
after --minutes (the learner checkpoints at the step boundary), then `scaled-ql eval --steps
--num-envs 1` (scores = means over completed episodes). Prints per game the random score (the
paper's table), the behaviour score of splits 7-9 (completed episodes, generation_info.json), the
BC score and the gate ratio (BC - random) / (behaviour - random); the gate is >= 0.8 everywhere.

Splits of 10000 steps, not the 2000 of the issue's first try: on 2000-step splits (6.4k Breakout
transitions in splits 7-9) the network learns the training set by heart within ~1000 steps and
its held-out accuracy falls (docs/learning.md, 2026-12-02), so the gate would measure memorizing.

`--config cpu_small` (or any other) runs the same recipe with that learner; its table is labelled
with the config's name, and only a run whose loss is BC (as its workdir's config.json says,
`--set` included) is judged against the gate.

Variants: 'strided' = cpu_small's 12x12/12 patchify stem; 'nature' = the Nature-DQN stem (8x8/4,
4x4/2, 3x3/1). Numbers, command and `uptime` go to docs/learning.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time


GAMES = ('Breakout', 'Boxing', 'Freeway', 'Pong')
VARIANTS = {
    'strided': [],
    'nature': ['--set', 'network.stem=nature'],
}
CLI = [sys.executable, '-m', 'scaled_ql.cli']


def uptime() -> str:
  return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()


def behaviour_score(data_dir: str, game: str, selection: str = 'checkpoints:7-9'
                    ) -> tuple[float, int]:
  """Mean raw score over the completed episodes of the selection (generation_info.json)."""
  from scaled_ql.configs import get_config
  from scaled_ql.datasets import generate
  cfg = get_config('cpu_small').replace(data=dict(data_dir=data_dir, selection=selection))
  score, count = generate.selection_score(cfg.data, game)
  return (float('nan') if score is None else score), count


def print_table(variant, games, behaviour, rows, label: str = 'BC') -> None:
  """label: what was trained (BC for the gate's own cpu_small_bc; the config's name otherwise)."""
  from scaled_ql.eval import normalization
  print(f'\n[gate] {variant}: ({label} - random) / (behaviour - random), gate >= 0.8 (for BC); '
        f'{uptime()}')
  ratios = []
  for g in games:
    rnd = normalization.RANDOM_SCORES[g]
    beh, n_beh = behaviour[g]
    r = rows.get(g, {})
    score = r.get('score')
    ratio = None if score is None or beh == rnd else (score - rnd) / (beh - rnd)
    ratios.append(ratio)
    print(f'  {g:10s} random {rnd:8.1f} | behaviour {beh:8.2f} ({n_beh} episodes) | {label} '
          f'{"n/a" if score is None else f"{score:8.2f}"} ({r.get("episodes", 0)} episodes) | '
          f'ratio {"n/a" if ratio is None else f"{ratio:.2f}"}')
  ok = all(x is not None and x >= 0.8 for x in ratios)
  if label == 'BC':
    print(f'  gate {"HOLDS" if ok else "does NOT hold"} for {variant}', flush=True)
  else:  # the gate is a BC gate: another learner's ratios are reported, not judged
    print(f'  {label}: ratio >= 0.8 on {sum(x is not None and x >= 0.8 for x in ratios)} of '
          f'{len(ratios)} games (the gate itself is for BC)', flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data-dir', default='data/gate')
  p.add_argument('--workdir', default='runs/gate')
  p.add_argument('--games', default=','.join(GAMES))
  p.add_argument('--config', default='cpu_small_bc')
  p.add_argument('--variants', default='strided')
  p.add_argument('--minutes', type=float, default=20.0,
                 help="training wall-clock per variant (the gate's budget: 20 on 2 idle cores)")
  p.add_argument('--eval-steps', type=int, default=5000)
  p.add_argument('--steps-per-checkpoint', type=int, default=10000)
  p.add_argument('--set', action='append', default=[], help='extra --set for every variant')
  args = p.parse_args(argv)
  games = args.games.split(',')
  print(f'[gate] start: {uptime()}', flush=True)
  t0 = time.time()
  subprocess.run(CLI + ['data', 'generate', '--games', args.games, '--out', args.data_dir,
                        '--checkpoints', '10', '--steps-per-checkpoint',
                        str(args.steps_per_checkpoint), '--skip-existing', '--no-progress'],
                 check=True)
  print(f'[gate] data ready after {time.time() - t0:.0f}s: {uptime()}', flush=True)
  behaviour = {g: behaviour_score(args.data_dir, g) for g in games}
  results = {}
  for variant in args.variants.split(','):
    workdir = os.path.join(args.workdir, variant)
    cmd = CLI + ['learn', '--config', args.config, '--games', args.games, '--data-dir',
                 args.data_dir, '--workdir', workdir, '--steps', '1000000', '--set',
                 'data.selection=checkpoints:7-9', '--no-resume'] + VARIANTS[variant]
    for s in args.set:
      cmd += ['--set', s]
    print(f'[gate] {variant}: {" ".join(cmd[2:])}  ({uptime()})', flush=True)
    proc = subprocess.Popen(cmd)
    try:
      proc.wait(timeout=args.minutes * 60)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGTERM)  # checkpoint at the step boundary, exit 0
      proc.wait(timeout=300)
    eval_jsonl = os.path.join(workdir, 'gate_eval.jsonl')
    subprocess.run(CLI + ['eval', '--checkpoint', workdir, '--steps', str(args.eval_steps),
                          '--num-envs', '1', '--jsonl', eval_jsonl], check=True)
    rows = [json.loads(l) for l in open(eval_jsonl)]
    results[variant] = {r['game']: r for r in rows}
    from scaled_ql.configs import overrides
    trained = overrides.load_file(workdir)  # the config the run used, its --set included
    label = 'BC' if trained.agent.loss == 'bc' else trained.name
    print_table(variant, games, behaviour, results[variant], label)

  print(f'[gate] done: {uptime()}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

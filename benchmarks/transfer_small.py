"""A CPU-sized transfer experiment (Section 5.2): pretrained encoder vs from scratch.

    .venv/bin/python benchmarks/transfer_small.py [--out runs/transfer_small] \
        [--pretrain-minutes 4] [--offline-steps 800] [--online-steps 400] [--scale 0.01]

1. Data: the `cpu_small` pre-training games (Breakout, Boxing, Freeway, Pong; the demo's local
   generated dataset in data/generated, made if missing) and a held-out game (Alien, not in
   cpu_small) generated into OUT/heldout_data (10 splits x --heldout-steps agent steps).
2. Pre-train `cpu_small` with `scaled-ql train` for --pretrain-minutes (skipped if OUT/pretrain
   already holds a checkpoint).
3. Offline fine-tuning to Alien (`scaled-ql finetune offline`, all of the small generated dataset
   standing in for the 1% subset, batch 32, lr 5e-5, alpha 0.05), pretrained vs --from-scratch.
4. Online fine-tuning to Breakout mode 12 (`scaled-ql finetune online`, C51 with Dopamine's
   settings shrunk by --scale), pretrained vs --from-scratch.
Each fine-tuning run ends with an evaluation of its final params (--eval-steps agent steps);
the table (final score, human-normalized, wall time) is printed and written to OUT/results.json.
Every stage is a subprocess of the real CLI (Ray, Reverb, emulator), one after the other.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = [sys.executable, '-m', 'scaled_ql.cli']
HELDOUT_GAME = 'Alien'
ONLINE_GAME, ONLINE_MODE = 'Breakout', 12


def _run(cmd: list[str], log_path: str) -> float:
  print('$ ' + ' '.join(cmd), flush=True)
  started = time.time()
  with open(log_path, 'w') as log:
    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
  if rc != 0:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise SystemExit(f'command failed ({rc}); log {log_path}:\n{tail}')
  return time.time() - started


def _final_eval(workdir: str) -> dict:
  path = os.path.join(workdir, 'eval', 'evaluator_0.jsonl')
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  last = max(rows, key=lambda r: (r['param_version'], r['time']))
  first = min(rows, key=lambda r: (r['param_version'], r['time']))
  return dict(score=last['score'], normalized=last['normalized'], episodes=last['episodes'],
              partial=last.get('partial', False), param_version=last['param_version'],
              first_score=first['score'], first_version=first['param_version'],
              rounds=len(rows))


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', default=os.path.join('runs', 'transfer_small'))
  p.add_argument('--data-dir', default=os.path.join('data', 'generated'))
  p.add_argument('--pretrain-minutes', type=float, default=4.0)
  p.add_argument('--heldout-steps', type=int, default=1000, help='agent steps per split (x10)')
  p.add_argument('--offline-steps', type=int, default=800)
  p.add_argument('--online-steps', type=int, default=400)
  p.add_argument('--scale', type=float, default=0.01, help='Dopamine C51 sizes x this (online)')
  p.add_argument('--eval-steps', type=int, default=2000)
  p.add_argument('--skip', default='', help='comma-separated stages to skip: offline,online')
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  logs = os.path.join(args.out, 'logs')
  os.makedirs(logs, exist_ok=True)
  skip = set(filter(None, args.skip.split(',')))
  results: dict = dict(command=' '.join([os.path.relpath(__file__)] + sys.argv[1:]), runs={})
  t0 = time.time()

  # 1. data
  from scaled_ql import configs
  from scaled_ql.datasets import generate
  from scaled_ql.launch import demo
  base = configs.get_config('cpu_small').replace(data=dict(data_dir=args.data_dir))
  demo.ensure_demo_data(base)
  heldout_dir = os.path.join(args.out, 'heldout_data')
  generate.generate([HELDOUT_GAME], heldout_dir, run=1, num_checkpoints=10,
                    steps_per_checkpoint=args.heldout_steps, seed=1, if_exists='skip',
                    progress=False)
  results['data_s'] = time.time() - t0

  # 2. pre-training
  pretrain = os.path.join(args.out, 'pretrain')
  if not os.path.isdir(os.path.join(pretrain, 'checkpoints')):
    results['pretrain_s'] = _run(
        CLI + ['train', '--config', 'cpu_small', '--data-dir', args.data_dir, '--workdir',
               pretrain, '--timeout-minutes', str(args.pretrain_minutes)],
        os.path.join(logs, 'pretrain.log'))
  from scaled_ql.agents import checkpointing
  _, _, pretrain_step = checkpointing.load_params(pretrain)
  results['pretrain_steps'] = pretrain_step
  print(f'pre-trained cpu_small: {pretrain_step} steps', flush=True)

  # 3./4. fine-tuning, pretrained vs scratch
  stages = []
  if 'offline' not in skip:
    stages.append(('offline', ['finetune', 'offline', '--game', HELDOUT_GAME, '--data-dir',
                               heldout_dir, '--selection', 'near_optimal', '--steps',
                               str(args.offline_steps)]))
  if 'online' not in skip:
    stages.append(('online', ['finetune', 'online', '--game', ONLINE_GAME, '--mode',
                              str(ONLINE_MODE), '--steps', str(args.online_steps), '--scale',
                              str(args.scale)]))
  for stage, argv in stages:
    for variant in ('pretrained', 'scratch'):
      workdir = os.path.join(args.out, f'{stage}_{variant}')
      cmd = CLI + argv + ['--pretrained', pretrain, '--workdir', workdir, '--eval-steps',
                          str(args.eval_steps)]
      if variant == 'scratch':
        cmd.append('--from-scratch')
      seconds = _run(cmd, os.path.join(logs, f'{stage}_{variant}.log'))
      row = dict(_final_eval(workdir), seconds=seconds)
      results['runs'][f'{stage}_{variant}'] = row
      print(f'{stage:<8} {variant:<11} final score {row["score"]:8.1f} '
            f'({100 * row["normalized"]:6.1f}% human-normalized, {row["episodes"]} episodes) '
            f'after {row["param_version"]} steps; first eval {row["first_score"]:.1f} at step '
            f'{row["first_version"]}; {seconds:.0f}s', flush=True)
      with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
  results['total_s'] = time.time() - t0
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())

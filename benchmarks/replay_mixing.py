"""How close a game's replay samples are to uniform over its data selection (issue 15, item 5).

    flock /tmp/scaled_ql_heavy.lock .venv/bin/python benchmarks/replay_mixing.py \
        --data-dir /tmp/mixing_bench/data --game Breakout --selection suboptimal near_optimal

Runs `scaled_ql.datasets.mixing.measure` (a real Reverb table fed by the real RLDS reader stream,
sampled at a learner's per-game rate, with the inserter's throttle) and prints one markdown row
per selection: checkpoints sampled in a window of learner steps vs selected, KS distance of the
sampled checkpoint indices (and of the position in the selection) vs uniform over the selection,
distinct episodes vs the number uniform sampling would hit, and how many transitions were inserted
after a sampled one (buffer age). Issue 15's target: >= 80% of the checkpoints, KS <= 0.1.

Scale (`--buffer`): the paper config's table holds 100k transitions of a game; a local dataset is
far smaller. The run keeps what decides mixing at the paper's values: the same per-game samples per
learner step (`--config`: 40 games, 128 x 4 draws; 12.8k samples per 1000 steps) and the same
share of the table replaced per window: samples_per_insert is raised by 100k / buffer so that a
window turns over buffer x (3.2k / 100k) transitions, as 1000 paper steps do. Generated episodes
are made short (`generate --max-episode-frames 400`, <= 100 steps) so that the buffer holds about
as many episodes (~50) as the paper's 100k table holds real ones (1-4k steps each).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))


def _use_reader_from(commit: str) -> None:
  """Installs scaled_ql/datasets/rlds_reader.py as of `commit` in place of today's."""
  import importlib.util
  import tempfile
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
  source = subprocess.run(['git', 'show', f'{commit}:scaled_ql/datasets/rlds_reader.py'],
                          capture_output=True, text=True, cwd=root, check=True).stdout
  path = os.path.join(tempfile.mkdtemp(), 'rlds_reader_at_commit.py')
  with open(path, 'w') as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location('scaled_ql.datasets.rlds_reader', path)
  module = importlib.util.module_from_spec(spec)
  sys.modules['scaled_ql.datasets.rlds_reader'] = module
  spec.loader.exec_module(module)
  import scaled_ql.datasets
  scaled_ql.datasets.rlds_reader = module


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='atari40_suboptimal_resnet101')
  p.add_argument('--data-dir', required=True)
  p.add_argument('--game', default='Breakout')
  p.add_argument('--selection', nargs='+', default=['suboptimal', 'near_optimal'])
  p.add_argument('--buffer', type=int, default=5000,
                 help='table size; samples_per_insert is scaled by paper_buffer / buffer')
  p.add_argument('--window-steps', type=int, default=1000)
  p.add_argument('--burn-in-steps', type=int, default=0)
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--cycle-length', type=int, default=None,
                 help='rlds_reader cycle_length (default: the reader\'s)')
  p.add_argument('--reader-commit', default=None,
                 help='measure the rlds_reader of this git commit (e.g. the one before the '
                      'mixing change) instead of the working tree\'s')
  args = p.parse_args(argv)
  if args.reader_commit:
    _use_reader_from(args.reader_commit)

  from scaled_ql import configs
  from scaled_ql.datasets import mixing
  base = configs.get_config(args.config)
  scale = base.data.shuffle_buffer_per_game / args.buffer
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  reader = args.reader_commit or 'working tree'
  print(f'# {" ".join(sys.argv)}\n# commit {commit} (reader: {reader})'
        f'; {os.popen("uptime").read().strip()}')
  print(f'# config {base.name}: {len(base.games)} games, {base.agent.games_per_batch} x '
        f'{base.agent.transitions_per_game} draws, buffer {args.buffer} (paper '
        f'{base.data.shuffle_buffer_per_game}), samples_per_insert '
        f'{base.data.samples_per_insert} x {scale:g}')
  reader_kwargs = {} if args.cycle_length is None else dict(cycle_length=args.cycle_length)
  header, rule = mixing.HEADER.split('\n')
  print('| selection | seed |' + header[1:] + ' time |')
  print('|---|---' + rule + '---|')
  failures = 0
  for selection in args.selection:
    cfg = base.replace(data=dict(
        data_dir=args.data_dir, selection=selection, shuffle_buffer_per_game=args.buffer,
        min_fill_per_game=min(args.buffer, base.data.min_fill_per_game),
        samples_per_insert=base.data.samples_per_insert * scale))
    index = mixing.selection_index(cfg, args.game)
    for seed in range(args.seeds):
      t = time.time()
      stats = mixing.measure(cfg, args.game, window_steps=args.window_steps,
                             burn_in_steps=args.burn_in_steps, seed=seed, index=index,
                             reader_kwargs=reader_kwargs)
      failures += not stats.passes()
      print(f'| {selection} | {seed} |' + stats.row()[1:] + f' {time.time() - t:.0f}s |',
            flush=True)
  print(f'# {failures} of {len(args.selection) * args.seeds} windows miss the target '
        f'(>= 80% of checkpoints, KS <= 0.1); {os.popen("uptime").read().strip()}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""Parameter counts (encoder/trunk/heads) and forward FLOPs per example of the named networks.

    .venv/bin/python benchmarks/network_sizes.py --games 40

Prints a markdown table. Nothing is initialised or compiled: shapes come from `jax.eval_shape`,
FLOPs from XLA's cost analysis of the lowered forward (see scaled_ql/networks/analysis.py).
"""
from __future__ import annotations

import argparse

from scaled_ql import configs
from scaled_ql import games as games_lib
from scaled_ql.networks import analysis

# Figure 6 / Section 5 of the paper (millions of parameters, as the paper states them).
PAPER_PARAMS_M = {'resnet34': '31', 'resnet50': '60', 'resnet101': '~80'}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--games', type=int, default=40,
                      help='number of heads: the first N of the 40 training games')
  parser.add_argument('--num_atoms', type=int, default=51)
  parser.add_argument('--networks', nargs='+', default=list(configs.NETWORKS))
  args = parser.parse_args()
  games = games_lib.TRAINING_GAMES_40[:args.games]
  print(f'{len(games)} games (sum of action counts {sum(games_lib.action_counts(games))}), '
        f'num_atoms {args.num_atoms}\n')
  print('| network | encoder M | trunk M | heads M | total M | enc+trunk M | paper M '
        '| GFLOP/ex total | GFLOP/ex encoder |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
  for name in args.networks:
    net_cfg = configs.NETWORKS[name]
    counts = analysis.param_counts(analysis.abstract_params(net_cfg, games, args.num_atoms))
    flops = analysis.flops_breakdown(net_cfg, games, args.num_atoms)
    m = {k: v / 1e6 for k, v in counts.items()}
    print(f'| {name} | {m["encoder"]:.2f} | {m["trunk"]:.2f} | {m["heads"]:.2f} | '
          f'{m["total"]:.2f} | {m["encoder"] + m["trunk"]:.2f} | {PAPER_PARAMS_M.get(name, "")} | '
          f'{flops["total"] / 1e9:.4f} | {flops["encoder"] / 1e9:.4f} |')


if __name__ == '__main__':
  main()

"""How long a node of a local Ray takes to start, with the program's environment variables given
as a job runtime_env or through the environment of the Ray processes (`run.start_local_ray`).

    flock /tmp/scaled_ql_heavy.lock .venv/bin/python benchmarks/node_start.py [--actors 8]

Each arm runs in a process of its own that starts a local Ray (2 CPUs, the variables of
`run.node_environment()` plus a probe), starts `--warm` actors first and keeps them (they take
the workers Ray starts ahead with the cluster, which an arm without a runtime_env would
otherwise get for free), then times `--actors` trivial actors started one after the other
(created, asked for the probe variable, killed): the machine's CPU (/proc/stat) and the wall
time; the difference between the arms is what a runtime_env costs per node start. The arms
alternate, `--rounds` times; the load and steal printed beside a round cover its whole arm.
BUILD_NOTES "Tests", 2026-12-07 evening.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (benchmarks/machine.py: /proc/stat, load average and steal)

ARMS = ('runtime_env', 'inherited')
PROBE = 'SCALED_QL_NODE_START_PROBE'


def arm(name: str, actors: int, warm: int) -> dict:
  """One arm, in this process: starts Ray, then times the actors' starts."""
  import ray
  from scaled_ql.launch import run
  env = {**run.node_environment(), PROBE: name}
  if name == 'runtime_env':  # start_local_ray as it was before 2026-12-07 evening
    ray.init(address='local', num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, runtime_env={'env_vars': env})
  else:
    run.start_local_ray(2, env, log_to_driver=False)

  @ray.remote(num_cpus=0)
  class Node:
    def probe(self):
      return os.environ.get(PROBE)

  try:
    kept = [Node.remote() for _ in range(warm)]
    assert ray.get([k.probe.remote() for k in kept], timeout=300) == [name] * warm
    busy, t0 = machine.busy_seconds(), time.time()
    for _ in range(actors):
      node = Node.remote()
      assert ray.get(node.probe.remote(), timeout=300) == name
      ray.kill(node)
    return dict(arm=name, cpu_s=machine.busy_seconds() - busy, wall_s=time.time() - t0)
  finally:
    ray.shutdown()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--actors', type=int, default=8, help='timed actor starts per arm and round')
  p.add_argument('--warm', type=int, default=3, help='actors started first, untimed, and kept')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--arm', choices=ARMS, help=argparse.SUPPRESS)  # (the arm's own process)
  args = p.parse_args(argv)
  if args.arm:
    print(json.dumps(arm(args.arm, args.actors, args.warm)))
    return 0
  results = {name: [] for name in ARMS}
  for r in range(args.rounds):
    for name in ARMS:
      window = machine.Steal()
      out = subprocess.run([sys.executable, __file__, '--arm', name, '--actors',
                            str(args.actors), '--warm', str(args.warm)],
                           capture_output=True, text=True, check=False)
      if out.returncode != 0:
        print(out.stdout + out.stderr[-3000:], file=sys.stderr)
        return 1
      result = json.loads(out.stdout.strip().splitlines()[-1])
      results[name].append(result)
      print(f'round {r + 1} {name:11s}: {args.actors} node starts in {result["wall_s"]:.1f} s, '
            f'{result["cpu_s"]:.1f} CPU-s ({result["wall_s"] / args.actors:.2f} s, '
            f'{result["cpu_s"] / args.actors:.2f} CPU-s each) | {machine.context(window)}',
            flush=True)
  per = {name: (sum(r['wall_s'] for r in rs) / (len(rs) * args.actors),
                sum(r['cpu_s'] for r in rs) / (len(rs) * args.actors))
         for name, rs in results.items()}
  print(f'per node start: a runtime_env {per["runtime_env"][0]:.2f} s, '
        f'{per["runtime_env"][1]:.2f} CPU-s; inherited {per["inherited"][0]:.2f} s, '
        f'{per["inherited"][1]:.2f} CPU-s')
  return 0


if __name__ == '__main__':
  sys.exit(main())

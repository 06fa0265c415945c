"""Where the test suite's time and CPU go: the numbers behind BUILD_NOTES "Tests".

    flock /tmp/scaled_ql_heavy.lock .venv/bin/python benchmarks/suite_cpu.py [--json F]
    .venv/bin/python benchmarks/suite_cpu.py -- tests/test_learner.py    # one file, serially

Runs pytest -q -p no:cacheprovider with CI's arguments (`-n 2 --dist loadfile
--no-loadscope-reorder tests`) or those given after `--`, and reports, with the load average and
steal beside them:
- the wall time and the machine's CPU time over the run (/proc/stat: user + nice + system), and
  how busy that kept the cores: near 100% means the suite is CPU-bound, so only less work per
  test shortens it (a third pytest process does not);
- every process's CPU over the run, polled every 0.5 s (psutil) and grouped by kind: the pytest
  processes (the one started here and its workers, by pid), each Ray actor class (`Ray
  ReverbNode`, ...), Ray's own daemons, `scaled-ql` and `reverb_tables` subprocesses, ...;
  processes that were running before count from the start, this tool included. A process is
  read until it ends, so what it spent in its last half second, and processes shorter than
  that, are missed: `sampled` says how much of the machine's CPU the table covers;
- per test file: test time (setup + call + teardown, summed; a module fixture's setup counts
  for the file's first test), the pytest process's own CPU, when one pytest process ran every
  test (no `-n`, `-n 0` or `-n 1`) the machine's CPU during its tests (every process's: the
  tests' Ray nodes and subprocesses, where a program test does most of its work, and this
  tool's polling), and the JAX work done in that
  process, from jax.monitoring: wall time while tracing to jaxprs, lowering to MLIR, and
  compiling or loading from the persistent cache (each the union of JAX's timed intervals:
  tracing nests, an outer jit traces inner ones), and executables loaded from the persistent
  cache / compiled with it on (requests to the cache that did not hit; not
  `scaled_ql.compilation_cache.counts()`'s `compiled`, which counts what JAX wrote: past its
  minimum compile time only). The Ray nodes' and subprocesses' JAX work is in the process
  table only (benchmarks/suite_cpu_plugin.py says how a test's events are told apart);
- the longest tests.
Nothing else should run meanwhile: the figures are the machine's.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (benchmarks/machine.py: /proc/stat, load average and steal)
import suite_cpu_plugin  # noqa: E402  (what it records: the plugin run in each pytest process)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_ARGS = ['-n', '2', '--dist', 'loadfile', '--no-loadscope-reorder', 'tests']

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'suite_cpu_plugin.py')
MACHINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'machine.py')

TRACE, LOWER, COMPILE = suite_cpu_plugin.TIMED
# A compile request that used the persistent cache and was not a hit was compiled (JAX records
# a "miss" only when it writes the executable, past its minimum compile time).
HITS = '/jax/compilation_cache/cache_hits'
REQUESTS = '/jax/compilation_cache/compile_requests_use_cache'
PYTEST = 'pytest process'


def process_kind(argv: list[str]) -> str:
  """A process's kind, from its argv (Ray renames an actor's process `ray::Class`): the program
  and its module or script only, not its arguments (which name temporary folders)."""
  if not argv:
    return 'other'
  if argv[0].startswith('ray::'):
    return 'Ray ' + argv[0][5:].split(':')[-1].split('.')[0]  # ray::[prefix:]Class[.method]
  program = os.path.basename(argv[0])
  if program in ('gcs_server', 'raylet'):
    return "Ray's daemons"
  if not program.startswith('python'):
    return program
  rest = argv[1:]
  while rest and rest[0].startswith('-') and rest[0] not in ('-m', '-c'):
    rest = rest[2:] if rest[0] in ('-X', '-W') else rest[1:]  # the interpreter's own flags
  if rest[:1] == ['-m'] and len(rest) > 1:
    module, args = rest[1], rest[2:]
    if module == 'pytest':
      return PYTEST
    if module == 'scaled_ql.cli' and args:
      return f'scaled-ql {args[0]} (subprocess)'
    if module == 'scaled_ql.datasets.reverb_tables' and args:
      return f'reverb_tables {args[0]} (subprocess)'
    return f'python -m {module}'
  if rest[:1] == ['-c']:
    code = rest[1] if len(rest) > 1 else ''
    if 'multiprocessing' in code:
      return 'multiprocessing child'
    return 'python -c'
  if not rest:
    return 'python'
  script = os.path.basename(rest[0])
  if script in ('default_worker.py', 'setup_worker.py'):
    return 'Ray worker (no actor seen)'
  if 'site-packages/ray/' in rest[0]:
    return "Ray's daemons"
  return f'python {script}'


class ProcessSampler(threading.Thread):
  """Every process's CPU seconds (user + system) over the sampling, polled with psutil until
  stopped; a process running at the start counts from there."""

  def __init__(self, period: float = 0.5):
    super().__init__(daemon=True)
    self.period, self.procs = period, {}
    self._stop_event = threading.Event()
    self._poll(first=True)

  def _poll(self, first: bool = False) -> None:
    for proc in psutil.process_iter(['pid', 'ppid', 'create_time', 'cpu_times', 'cmdline']):
      info = proc.info
      if info['cpu_times'] is None:
        continue  # ended, or not ours to read
      key = (info['pid'], info['create_time'])  # a reused pid is another process
      cpu = info['cpu_times'].user + info['cpu_times'].system
      p = self.procs.setdefault(key, dict(argv=[], start_cpu=cpu if first else 0.0, cpu=0.0,
                                          pid=info['pid'], ppid=info['ppid']))
      p['cpu'] = cpu - p['start_cpu']
      # The latest command line (a child seen between fork and exec shows its parent's; a Ray
      # worker is renamed when it takes an actor), but an actor's name over a later ray::IDLE.
      argv = info['cmdline'] or []
      if argv and not (argv[0] == 'ray::IDLE' and p['argv'][:1] != argv[:1]
                       and p['argv'][:1] and p['argv'][0].startswith('ray::')):
        p['argv'] = argv

  def run(self):
    while not self._stop_event.wait(self.period):
      self._poll()

  def stop(self):
    self._stop_event.set()
    self.join()
    self._poll()


def one_process(tests: list[dict]) -> bool:
  """Whether one pytest process ran the tests of these records (no xdist, `-n 0`, or `-n 1`),
  each with the machine's CPU recorded."""
  return bool(tests) and all(t.get('machine_cpu') is not None and t.get('workers') in (None, 1)
                             for t in tests)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--top', type=int, default=15, help='longest tests to list')
  p.add_argument('--json', default=None, help='also write every figure (and test) here')
  p.add_argument('pytest_args', nargs='*', help=f'after --: pytest\'s arguments (default: '
                 f'{" ".join(CI_ARGS)})')
  args = p.parse_args(argv)
  pytest_args = args.pytest_args or CI_ARGS
  with tempfile.TemporaryDirectory(prefix='suite_cpu_') as tmp:
    # Copied to a folder of its own first on PYTHONPATH: nothing else of benchmarks/ can then
    # shadow a module of the tests.
    shutil.copy(PLUGIN, os.path.join(tmp, 'suite_cpu_plugin.py'))
    # (the plugin reads /proc/stat with it; named so that no other `machine` can stand in)
    shutil.copy(MACHINE, os.path.join(tmp, 'suite_cpu_machine.py'))
    tests_file = os.path.join(tmp, 'tests.jsonl')
    env = dict(os.environ, SUITE_CPU_TESTS=tests_file,
               PYTHONPATH=tmp + (os.pathsep + os.environ['PYTHONPATH']
                                 if os.environ.get('PYTHONPATH') else ''))
    window = machine.Steal()
    print(f'suite_cpu: pytest {shlex.join(pytest_args)} | load {os.getloadavg()[0]:.2f}',
          flush=True)
    sampler = ProcessSampler()
    sampler.start()
    busy0, t0 = machine.busy_seconds(), time.time()
    pytest = subprocess.Popen([sys.executable, '-m', 'pytest', '-q', '-p', 'suite_cpu_plugin',
                               '-p', 'no:cacheprovider', *pytest_args], cwd=REPO, env=env)
    try:
      started = psutil.Process(pytest.pid).create_time()
    except psutil.NoSuchProcess:
      started = 0.0
    rc = pytest.wait()
    wall, used = time.time() - t0, machine.busy_seconds() - busy0
    context = machine.context(window)
    sampler.stop()
    tests = []
    if os.path.exists(tests_file):
      with open(tests_file, encoding='utf-8') as f:
        for line in f:
          try:
            tests.append(json.loads(line))
          except ValueError:
            pass  # a line cut short (its process killed while writing)
  cores = os.cpu_count() or 1
  print(f'\npytest exit {rc}; {len(tests)} tests; wall {wall:.1f} s; machine CPU {used:.1f} s '
        f'= {100 * used / (wall * cores):.0f}% of {cores} cores busy | {context}')
  kinds = collections.defaultdict(lambda: [0.0, 0])
  for (pid, created), proc in sampler.procs.items():
    # pytest's own processes by pid (and start, against a reused pid): the one started here and
    # its workers (xdist's execnet runs each as `python -c "...exec(eval(sys.stdin...))"`).
    ours = created >= started and (pid == pytest.pid or (
        proc['ppid'] == pytest.pid and 'sys.stdin.readline' in ' '.join(proc['argv'])))
    kind = PYTEST if ours else process_kind(proc['argv'])
    if kind == PYTEST and not ours:
      kind = 'other pytest'  # (a test's own pytest run)
    kinds[kind][0] += proc['cpu']
    kinds[kind][1] += 1 if proc['cpu'] > 0 else 0
  sampled = sum(cpu for cpu, _ in kinds.values())
  print(f'\nCPU by process kind over the run (sampled {sampled:.0f} s = '
        f'{100 * sampled / max(used, 1e-9):.0f}% of the machine\'s):')
  for kind, (cpu, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
    if cpu >= 0.5:
      print(f'  {cpu:8.1f} s {100 * cpu / max(used, 1e-9):5.1f}%  {n:4d} processes  {kind}')
  # When one pytest process ran every test, the machine's CPU during a test is the test's, its
  # nodes' and subprocesses' included (and the little of this tool's polling); beside other
  # pytest processes it is theirs too, so it is neither shown nor summed per file then (each
  # test's record keeps it).
  alone = one_process(tests)
  files = collections.defaultdict(collections.Counter)
  for t in tests:
    c = files[t['test'].split('::')[0]]
    c['tests'] += 1
    c['wall'] += t['wall']
    c['cpu'] += t['cpu']
    if alone:
      c['machine'] += t['machine_cpu']
    for name, key in ((TRACE, 'trace'), (LOWER, 'lower'), (COMPILE, 'compile')):
      c[key] += t['seconds'].get(name, 0.0)
    hits = t['counts'].get(HITS, 0)
    c['loaded'] += hits
    c['compiled'] += t['counts'].get(REQUESTS, 0) - hits
  total = sum(files.values(), collections.Counter())
  print('\nper test file: test time, the pytest process\'s own CPU, ' +
        ('the machine\'s CPU meanwhile (every process\'s), ' if alone else '') +
        'and the process\'s JAX work (seconds tracing, lowering, compiling or loading; '
        'executables loaded / compiled with the persistent cache on):')
  for name, c in sorted(files.items(), key=lambda kv: -kv[1]['wall']) + [('all', total)]:
    print(f'  {c["wall"]:7.1f} s  cpu {c["cpu"]:7.1f}  ' +
          (f'machine {c["machine"]:7.1f}  ' if alone else '') +
          f'trace {c["trace"]:6.1f}  lower {c["lower"]:5.1f}  compile {c["compile"]:6.1f}  '
          f'{c["loaded"]:3.0f}/{c["compiled"]:<3.0f} {c["tests"]:4d} tests  {name}')
  print(f'\nthe {args.top} longest tests:')
  for t in sorted(tests, key=lambda t: -t['wall'])[:args.top]:
    print(f'  {t["wall"]:7.1f} s  cpu {t["cpu"]:6.1f}  ' +
          (f'machine {t["machine_cpu"]:6.1f}  ' if alone else '') +
          t['test'])
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(dict(pytest_args=pytest_args, exit=rc, wall=wall, machine_cpu=used, context=context,
                     one_process=alone,
                     cores=cores, sampled=sampled,
                     kinds={k: dict(cpu=v[0], processes=v[1]) for k, v in kinds.items()},
                     files={k: dict(v) for k, v in files.items()}, tests=tests), f, indent=1)
  return rc


if __name__ == '__main__':
  sys.exit(main())

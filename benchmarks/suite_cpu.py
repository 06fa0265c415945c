"""Where the test suite's time and CPU go: the numbers behind BUILD_NOTES "Tests".

    flock /tmp/scaled_ql_heavy.lock .venv/bin/python benchmarks/suite_cpu.py [--json F]
    .venv/bin/python benchmarks/suite_cpu.py -- tests/test_learner.py    # one file, serially

Runs pytest (by default CI's command: `-n 2 --dist loadfile --no-loadscope-reorder tests`) and
reports, with the load average and steal beside them:
- the wall time and the machine's CPU time over the run (/proc/stat: user + nice + system), and
  how busy that kept the cores: near 100% means the suite is CPU-bound, so only less work per
  test shortens it (a third pytest process does not);
- every process's CPU, polled from /proc every 0.5 s and grouped by kind (the pytest processes,
  each Ray actor class, Ray's own daemons, Reverb servers, `scaled-ql` subprocesses, ...). A
  process is read until it ends, so what it spent in its last half second, and processes shorter
  than that, are missed: `sampled` says how much of the machine's CPU the table covers;
- per test file: test time (setup + call + teardown, summed), the pytest process's own CPU, and
  the JAX work it did in that process (jaxpr tracing, lowering to MLIR, XLA compiles; persistent
  cache hits and misses), from jax.monitoring; the Ray nodes' and subprocesses' JAX work is in
  the process table only;
- the longest tests.
Nothing else should run meanwhile: the figures are the machine's.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (benchmarks/machine.py: load average and steal)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_ARGS = ['-n', '2', '--dist', 'loadfile', '--no-loadscope-reorder', 'tests']

# The pytest plugin, written to a temporary folder put first on the pytest process's PYTHONPATH
# (a file of its own there, so that nothing else of benchmarks/ shadows a module): per test, its
# duration, this process's CPU and the JAX events this process recorded meanwhile.
PLUGIN = '''
import json, os, time
import pytest
_events = {}
_listening = False
def _listen():
  global _listening
  if _listening:
    return
  import jax
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **kw: _events.__setitem__(name, _events.get(name, 0.0) + secs))
  jax.monitoring.register_event_listener(
      lambda name, **kw: _events.__setitem__(name, _events.get(name, 0.0) + 1))
  _listening = True
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  _listen()
  before, cpu, wall = dict(_events), time.process_time(), time.time()
  yield
  events = {k: v - before.get(k, 0.0) for k, v in _events.items() if v != before.get(k, 0.0)}
  with open(os.environ['SUITE_CPU_TESTS'], 'a', encoding='utf-8') as f:
    f.write(json.dumps(dict(test=item.nodeid, wall=time.time() - wall,
                            cpu=time.process_time() - cpu, events=events)) + '\\n')
'''

TRACE, LOWER, COMPILE = ('/jax/core/compile/jaxpr_trace_duration',
                         '/jax/core/compile/jaxpr_to_mlir_module_duration',
                         '/jax/core/compile/backend_compile_duration')
HITS, MISSES = '/jax/compilation_cache/cache_hits', '/jax/compilation_cache/cache_misses'


def machine_cpu_seconds() -> tuple[float, float]:
  """(user + nice + system, steal) CPU-seconds of the whole machine since boot."""
  with open('/proc/stat', encoding='ascii') as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  tick = os.sysconf('SC_CLK_TCK')
  return sum(fields[:3]) / tick, (fields[7] if len(fields) > 7 else 0) / tick


def process_kind(cmd: str) -> str:
  """A process's kind, from its command line (Ray renames an actor's process `ray::Class`)."""
  if cmd.startswith('ray::'):
    name = cmd.split()[0][5:]
    return 'Ray actor ' + name.split(':')[-1].split('.')[0]  # [prefix:]Class[.method]
  for needle, kind in (('gcs_server', "Ray's daemons"), ('raylet', "Ray's daemons"),
                       ('dashboard', "Ray's daemons"), ('runtime_env', "Ray's daemons"),
                       ('log_monitor', "Ray's daemons"), ('autoscaler', "Ray's daemons"),
                       ('monitor.py', "Ray's daemons"),
                       ('default_worker.py', 'Ray worker (no actor seen)'),
                       ('setup_worker.py', 'Ray worker (no actor seen)'),
                       ('reverb_tables serve', 'Reverb server (subprocess)'),
                       ('reverb_tables insert', 'inserter (subprocess)'),
                       ('exec(eval(sys.stdin.readline()))', 'pytest process'),
                       ('pytest', 'pytest process'), ('gpu_suite', 'gpu_suite.py --tiny'),
                       ('multiprocessing', 'multiprocessing child')):
    if needle in cmd:
      return kind
  m = re.search(r'scaled_ql\.cli (\w+)', cmd)
  if m:
    return f'scaled-ql {m.group(1)} (subprocess)'
  return 'python -c (tests\' subprocesses)' if ' -c ' in cmd else 'other'


class ProcessSampler(threading.Thread):
  """Every process's CPU seconds (utime + stime), polled from /proc until stopped; processes
  that existed at the start are left out."""

  def __init__(self, period: float = 0.5):
    super().__init__(daemon=True)
    self.period, self.procs = period, {}
    self._stop_event = threading.Event()
    self._before = set(self._poll(record=False))

  def _poll(self, record: bool = True) -> list[str]:
    tick, seen = os.sysconf('SC_CLK_TCK'), []
    for pid in os.listdir('/proc'):
      if not pid.isdigit() or int(pid) == os.getpid():
        continue
      try:
        with open(f'/proc/{pid}/stat', encoding='ascii', errors='replace') as f:
          rest = f.read().rsplit(')', 1)[1].split()
        key = f'{pid}:{rest[19]}'  # pid and start time: a reused pid is another process
        seen.append(key)
        if not record or key in self._before:
          continue
        p = self.procs.setdefault(key, dict(cmd='', cpu=0.0))
        if not p['cmd'] or 'worker.py' in p['cmd'] or p['cmd'].startswith('ray::IDLE'):
          with open(f'/proc/{pid}/cmdline', 'rb') as f:
            p['cmd'] = f.read().replace(b'\0', b' ').decode(errors='replace').strip()
        p['cpu'] = (int(rest[11]) + int(rest[12])) / tick
      except (OSError, IndexError, ValueError):
        continue  # ended meanwhile
    return seen

  def run(self):
    while not self._stop_event.wait(self.period):
      self._poll()

  def stop(self):
    self._stop_event.set()
    self.join()
    self._poll()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--top', type=int, default=15, help='longest tests to list')
  p.add_argument('--json', default=None, help='also write every figure (and test) here')
  p.add_argument('pytest_args', nargs='*', help=f'after --: pytest\'s arguments (default: '
                 f'{" ".join(CI_ARGS)})')
  args = p.parse_args(argv)
  pytest_args = args.pytest_args or CI_ARGS
  with tempfile.TemporaryDirectory(prefix='suite_cpu_') as tmp:
    with open(os.path.join(tmp, 'suite_cpu_plugin.py'), 'w', encoding='utf-8') as f:
      f.write(PLUGIN)
    tests_file = os.path.join(tmp, 'tests.jsonl')
    env = dict(os.environ, SUITE_CPU_TESTS=tests_file,
               PYTHONPATH=tmp + (os.pathsep + os.environ['PYTHONPATH']
                                 if os.environ.get('PYTHONPATH') else ''))
    window = machine.Steal()
    print(f'suite_cpu: pytest {" ".join(pytest_args)} | load {os.getloadavg()[0]:.2f}',
          flush=True)
    sampler = ProcessSampler()
    sampler.start()
    cpu0, steal0 = machine_cpu_seconds()
    t0 = time.time()
    rc = subprocess.call([sys.executable, '-m', 'pytest', '-q', '-p', 'suite_cpu_plugin',
                          '-p', 'no:cacheprovider', *pytest_args], cwd=REPO, env=env)
    wall = time.time() - t0
    cpu1, steal1 = machine_cpu_seconds()
    sampler.stop()
    tests = []
    if os.path.exists(tests_file):
      with open(tests_file, encoding='utf-8') as f:
        tests = [json.loads(line) for line in f]
  used, cores = cpu1 - cpu0, os.cpu_count() or 1
  sampled = sum(p['cpu'] for p in sampler.procs.values())
  print(f'\npytest exit {rc}; {len(tests)} tests; wall {wall:.1f} s; machine CPU {used:.1f} s '
        f'= {100 * used / (wall * cores):.0f}% of {cores} cores busy; steal '
        f'{steal1 - steal0:.1f} s | {machine.context(window)}')
  kinds = collections.defaultdict(lambda: [0.0, 0])
  for proc in sampler.procs.values():
    kinds[process_kind(proc['cmd'])][0] += proc['cpu']
    kinds[process_kind(proc['cmd'])][1] += 1
  print(f'\nCPU by process kind (sampled {sampled:.0f} s = {100 * sampled / max(used, 1e-9):.0f}%'
        f' of the machine\'s):')
  for kind, (cpu, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
    if cpu >= 0.5:
      print(f'  {cpu:8.1f} s {100 * cpu / max(used, 1e-9):5.1f}%  {n:4d} processes  {kind}')
  files = collections.defaultdict(collections.Counter)
  for t in tests:
    c = files[t['test'].split('::')[0]]
    c['tests'] += 1
    c['wall'] += t['wall']
    c['cpu'] += t['cpu']
    for name, key in ((TRACE, 'trace'), (LOWER, 'lower'), (COMPILE, 'compile'), (HITS, 'hits'),
                      (MISSES, 'misses')):
      c[key] += t['events'].get(name, 0.0)
  total = sum(files.values(), collections.Counter())
  print('\nper test file: test time, the pytest process\'s CPU, and its JAX work (seconds; '
        'cache hits / misses):')
  for name, c in sorted(files.items(), key=lambda kv: -kv[1]['wall']) + [('all', total)]:
    print(f'  {c["wall"]:7.1f} s  cpu {c["cpu"]:7.1f}  trace {c["trace"]:6.1f}  lower '
          f'{c["lower"]:5.1f}  compile {c["compile"]:6.1f}  {c["hits"]:3.0f}/{c["misses"]:<3.0f} '
          f'{c["tests"]:4d} tests  {name}')
  print(f'\nthe {args.top} longest tests:')
  for t in sorted(tests, key=lambda t: -t['wall'])[:args.top]:
    print(f'  {t["wall"]:7.1f} s  cpu {t["cpu"]:6.1f}  {t["test"]}')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(dict(pytest_args=pytest_args, exit=rc, wall=wall, machine_cpu=used,
                     steal=steal1 - steal0, cores=cores, sampled=sampled,
                     kinds={k: dict(cpu=v[0], processes=v[1]) for k, v in kinds.items()},
                     files={k: dict(v) for k, v in files.items()}, tests=tests,
                     context=machine.context(window)), f, indent=1)
  return rc


if __name__ == '__main__':
  sys.exit(main())

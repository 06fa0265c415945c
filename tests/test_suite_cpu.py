"""benchmarks/suite_cpu.py: where the suite's time and CPU go (BUILD_NOTES "Tests")."""
import json
import os
import re
import textwrap

import benchmark_modules  # tests/benchmark_modules.py

suite_cpu = benchmark_modules.load('suite_cpu')
plugin = benchmark_modules.load('suite_cpu_plugin')

_BURN = textwrap.dedent('''
    import sys, time
    end = time.process_time() + float(sys.argv[1])
    while time.process_time() < end:
      pass
''')

_TESTS = textwrap.dedent('''
    import os, subprocess, sys, time

    def test_burns_cpu_in_its_process():
      end = time.process_time() + 0.8
      while time.process_time() < end:
        pass

    def test_compiles_then_loads_from_the_persistent_cache():
      import jax, jax.numpy as jnp
      f = lambda x: jnp.sin(x) * 3 + 1
      jax.jit(f)(jnp.arange(7.0)).block_until_ready()
      jax.clear_caches()  # the same program again: from the persistent cache
      jax.jit(f)(jnp.arange(7.0)).block_until_ready()

    def test_runs_a_subprocess_that_burns_cpu():
      burn = os.path.join(os.path.dirname(__file__), 'burn.py')
      subprocess.run([sys.executable, burn, '3'], check=True)
''')


def test_the_kinds_of_the_suites_processes():
  """By program and module, not arguments: pytest's temporary folders are in most of them."""
  kind = suite_cpu.process_kind
  tmp = '/tmp/pytest-of-root/pytest-3/popen-gw1/test_x0'
  assert kind(['ray::LearnerNode.__init__']) == 'Ray LearnerNode'
  assert kind(['ray::run_1_replay:ReverbNode.__init__']) == 'Ray ReverbNode'
  assert kind(['ray::IDLE']) == 'Ray IDLE'
  assert kind(['/v/bin/gcs_server', f'--log_dir={tmp}']) == "Ray's daemons"
  assert kind(['/v/bin/python', '/v/site-packages/ray/dashboard/agent.py', tmp]) == (
      "Ray's daemons")
  assert kind(['/v/bin/python', '/v/site-packages/ray/_private/workers/default_worker.py']) == (
      'Ray worker (no actor seen)')
  assert kind(['/v/bin/python', '-m', 'scaled_ql.cli', 'learn', '--workdir', tmp]) == (
      'scaled-ql learn (subprocess)')
  assert kind(['/v/bin/python', '-m', 'scaled_ql.datasets.reverb_tables', 'serve']) == (
      'reverb_tables serve (subprocess)')
  assert kind(['/v/bin/python', '-c', 'import jax', tmp]) == 'python -c'
  assert kind(['/v/bin/python', '-B', '-c', 'from multiprocessing.spawn import spawn_main']) == (
      'multiprocessing child')
  assert kind(['bash', 'benchmarks/gpu_suite.sh', '--out', tmp]) == 'bash'
  assert kind(['/v/bin/python', 'benchmarks/gpu_suite.py', '--out', tmp]) == 'python gpu_suite.py'
  assert kind(['/v/bin/python', '-m', 'pytest', tmp]) == suite_cpu.PYTEST
  # The interpreter's own flags, some with an argument, before -m or -c:
  assert kind(['/v/bin/python', '-W', 'ignore', '-B', '-c', 'from multiprocessing.spawn']) == (
      'multiprocessing child')
  assert kind(['/v/bin/python', '-X', 'importtime', '-u', '-m', 'pytest']) == suite_cpu.PYTEST


def test_timed_jax_events_are_summed_as_the_union_of_their_intervals():
  """Tracing nests (an outer jit traces the inner ones, each timed): a plain sum would count
  the inner time twice."""
  union = plugin.union_seconds
  assert union([]) == 0.0
  assert union([(0.0, 10.0), (2.0, 5.0)]) == 10.0  # nested
  assert union([(3.0, 8.0), (0.0, 5.0)]) == 8.0  # overlapping, in any order
  assert union([(0.0, 1.0), (2.0, 3.0), (2.5, 2.7)]) == 2.0  # apart, one nested


def test_it_reports_each_tests_time_cpu_and_jax_work_and_each_process(tmp_path, monkeypatch,
                                                                       capsys):
  """Two pytest processes, as CI runs the suite: each test's record comes from the process that
  ran it (its own CPU, the JAX work it did), and a subprocess's CPU is in the process table."""
  (tmp_path / 'test_work.py').write_text(_TESTS)
  (tmp_path / 'burn.py').write_text(_BURN)
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax_cache'))
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  monkeypatch.setenv('JAX_ENABLE_COMPILATION_CACHE', 'true')
  monkeypatch.delenv('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', raising=False)
  out = tmp_path / 'figures.json'
  assert suite_cpu.main(['--json', str(out), '--', '-n', '2', str(tmp_path / 'test_work.py')]) == 0
  figures = json.loads(out.read_text())
  tests = {t['test'].split('::')[-1]: t for t in figures['tests']}
  assert set(tests) == {'test_burns_cpu_in_its_process',
                        'test_compiles_then_loads_from_the_persistent_cache',
                        'test_runs_a_subprocess_that_burns_cpu'}
  assert 0.8 <= tests['test_burns_cpu_in_its_process']['cpu'] < 5
  assert tests['test_runs_a_subprocess_that_burns_cpu']['cpu'] < 1.0  # not the child's CPU
  # The machine's CPU during each test: its process's and more (the child's 3 CPU-s here).
  assert all(t['machine_cpu'] >= t['cpu'] - 0.05 for t in tests.values()), tests
  assert tests['test_runs_a_subprocess_that_burns_cpu']['machine_cpu'] >= 2.5
  jit = tests['test_compiles_then_loads_from_the_persistent_cache']
  assert all(jit['seconds'][e] > 0 for e in (suite_cpu.TRACE, suite_cpu.LOWER, suite_cpu.COMPILE))
  assert set(jit['seconds']) == set(plugin.TIMED)  # (not JAX's other timed events)
  # Each program (the jitted f, and jnp.arange's) compiled once, then loaded once.
  hits = jit['counts'][suite_cpu.HITS]
  assert hits >= 1 and jit['counts'][suite_cpu.REQUESTS] == 2 * hits, jit
  file = figures['files'][next(iter(figures['files']))]
  assert (file['loaded'], file['compiled'], file['tests']) == (hits, hits, 3)
  assert figures['kinds']['python burn.py']['cpu'] >= 2.0
  assert figures['kinds'][suite_cpu.PYTEST]['processes'] == 3  # pytest and its two workers
  assert 0.6 <= figures['sampled'] / figures['machine_cpu'] <= 1.1, figures
  assert figures['wall'] > 0 and figures['exit'] == 0
  printed = capsys.readouterr().out
  assert '; 3 tests; wall ' in printed and 'cores busy | load ' in printed
  assert '  python burn.py\n' in printed and '3 tests  all\n' in printed
  total, = [line for line in printed.splitlines() if line.endswith('3 tests  all')]
  assert 'machine' not in total  # two pytest processes: each test's share is unknown
  assert not figures['one_process'] and 'machine' not in file
  assert {t['worker'] for t in figures['tests']} == {'gw0', 'gw1'}  # (3 tests, 2 workers)
  assert {t['workers'] for t in figures['tests']} == {2}


def test_run_in_one_process_it_shows_the_machines_cpu_per_file_and_test(tmp_path, capsys):
  """One pytest process: the machine's CPU during a test counts its children's CPU too (here a
  1 CPU-s burn that the process's own CPU does not count). In a suite of two pytest processes
  the other one's work counts too, so the bound below is necessary, not sufficient; what
  `busy_seconds` counts is tested in tests/test_machine.py."""
  (tmp_path / 'test_child.py').write_text(textwrap.dedent('''
      import os, subprocess, sys

      def test_runs_a_subprocess_that_burns_cpu():
        burn = os.path.join(os.path.dirname(__file__), 'burn.py')
        subprocess.run([sys.executable, burn, '1'], check=True)
  '''))
  (tmp_path / 'burn.py').write_text(_BURN)
  out = tmp_path / 'figures.json'
  assert suite_cpu.main(['--json', str(out), '--', str(tmp_path / 'test_child.py')]) == 0
  figures = json.loads(out.read_text())
  test, = figures['tests']
  assert figures['one_process'] and test['worker'] is test['workers'] is None
  assert test['cpu'] < 0.5
  file, = figures['files'].values()
  assert test['machine_cpu'] >= 0.8 and file['machine'] == test['machine_cpu'], figures
  printed = capsys.readouterr().out
  rows = [line for line in printed.splitlines() if line.endswith(('test_child.py', '1 tests  all',
                                                                 'burns_cpu'))]
  assert len(rows) == 3 and all(float(row.split('machine')[1].split()[0]) >= 0.8
                                for row in rows), printed


def test_the_suites_file_order_and_fast_subset_name_tests_that_exist():
  """tests/conftest.py's SLOWEST_FIRST (the order `make test` hands files out in) and FAST (`make
  test-fast`) name files and tests by hand: a renamed one would drop out of either unseen. Here
  the files and the test functions; an entry that matched no collected test, a renamed
  parameter (`[...]`) too, is reported in `make test-fast`'s summary (not a failure)."""
  import conftest  # tests/conftest.py
  here = os.path.dirname(os.path.abspath(__file__))
  assert len(set(conftest.SLOWEST_FIRST)) == len(conftest.SLOWEST_FIRST)
  for name in conftest.SLOWEST_FIRST:
    assert os.path.isfile(os.path.join(here, name)), name
  for entry in conftest.FAST:
    file, _, test = entry.partition('::')
    assert os.path.isfile(os.path.join(here, file)), entry
    if test:
      with open(os.path.join(here, file), encoding='utf-8') as f:
        source = f.read()
      assert re.search(rf'^def {re.escape(test.split("[")[0])}\(', source, re.MULTILINE), entry

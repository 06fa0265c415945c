"""benchmarks/suite_cpu.py: where the suite's time and CPU go (BUILD_NOTES "Tests")."""
import json
import textwrap

import benchmark_modules  # tests/benchmark_modules.py

suite_cpu = benchmark_modules.load('suite_cpu')

_TESTS = textwrap.dedent('''
    import subprocess, sys, time

    def _burn(seconds):
      end = time.process_time() + seconds
      while time.process_time() < end:
        pass

    def test_burns_cpu_in_its_process():
      _burn(0.8)

    def test_compiles_with_jax():
      import jax, jax.numpy as jnp
      jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(7.0)).block_until_ready()

    def test_runs_a_subprocess_that_burns_cpu():
      subprocess.run([sys.executable, '-c', 'import time\\nend = time.process_time() + 1.5\\n'
                      'while time.process_time() < end: pass'], check=True)
''')


def test_the_kinds_of_the_suites_processes():
  kind = suite_cpu.process_kind
  assert kind('ray::LearnerNode.__init__') == 'Ray actor LearnerNode'
  assert kind('ray::run_1_replay:ReverbNode.__init__') == 'Ray actor ReverbNode'
  assert kind('/v/bin/python -u -c import sys;exec(eval(sys.stdin.readline()))') == 'pytest process'
  assert kind('/v/bin/gcs_server --log_dir=/tmp/ray') == "Ray's daemons"
  assert kind('/v/bin/python -m scaled_ql.cli learn --config cpu_tiny') == (
      'scaled-ql learn (subprocess)')
  assert kind('/v/bin/python -m scaled_ql.datasets.reverb_tables serve --port 1') == (
      'Reverb server (subprocess)')
  assert kind('/v/bin/python -c import jax') == "python -c (tests' subprocesses)"


def test_it_reports_each_tests_time_cpu_and_jax_work_and_each_process(tmp_path):
  """Two pytest processes, as CI runs the suite: each test's record comes from the process that
  ran it (its CPU, the JAX compile it did), and the subprocess's CPU is in the process table."""
  test_file = tmp_path / 'test_work.py'
  test_file.write_text(_TESTS)
  out = tmp_path / 'figures.json'
  assert suite_cpu.main(['--json', str(out), '--', '-n', '2', str(test_file)]) == 0
  figures = json.loads(out.read_text())
  tests = {t['test'].split('::')[-1]: t for t in figures['tests']}
  assert set(tests) == {'test_burns_cpu_in_its_process', 'test_compiles_with_jax',
                        'test_runs_a_subprocess_that_burns_cpu'}
  assert tests['test_burns_cpu_in_its_process']['cpu'] >= 0.8
  assert tests['test_runs_a_subprocess_that_burns_cpu']['cpu'] < 0.5  # not the child's CPU
  compiled = tests['test_compiles_with_jax']['events']
  assert compiled[suite_cpu.TRACE] > 0 and compiled[suite_cpu.COMPILE] > 0
  assert figures['kinds']["python -c (tests' subprocesses)"]['cpu'] >= 1.0
  assert figures['kinds']['pytest process']['processes'] >= 2  # the two pytest workers
  assert 0.5 <= figures['sampled'] / figures['machine_cpu'] <= 1.05
  assert figures['wall'] > 0 and figures['exit'] == 0

"""benchmarks/node_start.py: a node's start with a runtime_env against inherited variables."""
import benchmark_modules  # tests/benchmark_modules.py

node_start = benchmark_modules.load('node_start')


def test_both_arms_start_nodes_that_see_the_variables(capsys):
  """Each arm's nodes see the probe variable (asserted in the arm) and the figures are printed."""
  assert node_start.main(['--actors', '1', '--warm', '1', '--rounds', '1']) == 0
  out = capsys.readouterr().out
  assert 'round 1 runtime_env' in out and 'round 1 inherited' in out, out
  assert out.splitlines()[-1].startswith('per node start: a runtime_env '), out

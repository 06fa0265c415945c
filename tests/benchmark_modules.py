"""Imports a script of `benchmarks/` (not a package) as a module, for the tests of its functions."""
import importlib.util
import os

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')


def load(name: str):
  """benchmarks/NAME.py as a module (its siblings import as the script itself imports them)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module

"""benchmarks/data_pipeline.py's `--perf`: a profile of the learner's process, by symbol."""
import shutil
import subprocess

import numpy as np
import pytest

import benchmark_modules


def _perf_works(tmp_path) -> bool:
  out = subprocess.run(['perf', 'record', '-o', str(tmp_path / 'probe.data'), '--', 'true'],
                       capture_output=True, text=True)
  return out.returncode == 0


def test_perf_top_names_what_this_process_spends_its_time_on(tmp_path, capsys):
  if shutil.which('perf') is None or not _perf_works(tmp_path):
    pytest.skip('Linux perf is missing here, or not allowed to record')
  dp = benchmark_modules.load('data_pipeline')
  out = str(tmp_path / 'perf.data')
  perf = dp.start_perf(out, 1.5)
  a, b = np.ones(2**21), np.zeros(2**21)  # 16 MB each; copied into b (no fresh pages to fault)
  while perf.poll() is None:  # copies, as the sampler's memmoves do, until the recording ends
    np.copyto(b, a)
  dp.print_perf_top(perf, out, top=5)
  printed = capsys.readouterr().out
  rows = printed.splitlines()[1:]
  assert 1 <= len(rows) <= 5 and '%' in rows[0], printed
  assert 'memmove' in rows[0] or 'memcpy' in rows[0], printed  # the copies lead the profile


def test_perf_top_says_why_when_nothing_was_recorded(tmp_path):
  if shutil.which('perf') is None:
    pytest.skip('Linux perf is missing here')
  dp = benchmark_modules.load('data_pipeline')
  perf = subprocess.Popen(['perf', 'record', '-p', '999999999', '-o', str(tmp_path / 'x.data'),
                           '--', 'sleep', '0.1'], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  with pytest.raises(RuntimeError, match='perf recorded nothing'):
    dp.print_perf_top(perf, str(tmp_path / 'x.data'))

"""The pytest plugin of benchmarks/suite_cpu.py, loaded in each pytest process it runs (`-p
suite_cpu_plugin`, from a temporary folder of its own first on PYTHONPATH): per test, its
duration, the process's CPU, the machine's CPU meanwhile (every process's: the test's Ray nodes
and subprocesses, and in a run of several pytest processes theirs too), the xdist worker that
ran it (and how many there were), and the JAX work recorded meanwhile, as one JSON line
appended to $SUITE_CPU_TESTS. JAX records events from any thread: one a learner's prefetch
thread records after its test ended counts for the next test, or for none if it comes between
tests."""
import json
import os
import threading
import time

import pytest

try:  # benchmarks/machine.py, copied beside this file by suite_cpu.py under a name of its own
  from suite_cpu_machine import busy_seconds
except ImportError:  # (loaded some other way: no machine CPU is recorded)
  busy_seconds = None

# The timed JAX events kept, each summed as the union of its intervals: tracing nests (an outer
# jit traces the inner ones, each timed), so a plain sum would count the inner time twice.
TIMED = ('/jax/core/compile/jaxpr_trace_duration',
         '/jax/core/compile/jaxpr_to_mlir_module_duration',
         '/jax/core/compile/backend_compile_duration')  # compiling, or loading from the cache

_OUT = os.environ.get('SUITE_CPU_TESTS')
_lock = threading.Lock()
_spans = []  # (name, start, end)
_counts = {}
_listening = False


def union_seconds(spans) -> float:
  """The length of the union of (start, end) intervals."""
  total, end = 0.0, float('-inf')
  for start, stop in sorted(spans):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def _span(name, secs, **kwargs):
  del kwargs
  if name in TIMED and secs >= 0:
    end = time.time()
    with _lock:
      _spans.append((name, end - secs, end))


def _event(name, **kwargs):
  del kwargs
  with _lock:
    _counts[name] = _counts.get(name, 0) + 1


def _busy():
  """The machine's CPU seconds so far (None where unknown: not Linux, or loaded without it)."""
  try:
    return busy_seconds() if busy_seconds else None
  except OSError:
    return None


def _listen():
  global _listening
  if not _listening:
    import jax  # pylint: disable=import-outside-toplevel
    jax.monitoring.register_event_duration_secs_listener(_span)
    jax.monitoring.register_event_listener(_event)
    _listening = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  _listen()
  with _lock:
    first, counts = len(_spans), dict(_counts)
  cpu, wall = time.process_time(), time.time()
  busy = _busy()
  yield
  try:
    with _lock:
      spans, now = _spans[first:], dict(_counts)
      del _spans[:]
    workerinput = getattr(item.config, 'workerinput', {})
    timed = {}
    for name, start, stop in spans:
      timed.setdefault(name, []).append((start, stop))
    record = dict(test=item.nodeid, wall=time.time() - wall, cpu=time.process_time() - cpu,
                  machine_cpu=None if busy is None else _busy() - busy,
                  # (xdist's `workerinput`, not $PYTEST_XDIST_WORKER: a pytest run that a test
                  # of a worker starts inherits that variable; None: no xdist worker)
                  worker=workerinput.get('workerid'), workers=workerinput.get('workercount'),
                  seconds={name: union_seconds(s) for name, s in timed.items()},
                  counts={k: v - counts.get(k, 0) for k, v in now.items()
                          if v != counts.get(k, 0)})
    with open(_OUT, 'a', encoding='utf-8') as f:
      f.write(json.dumps(record) + '\n')
  except Exception as e:  # pylint: disable=broad-except  (never end the user's pytest run)
    print(f'suite_cpu_plugin: {item.nodeid}: {type(e).__name__}: {e}')

"""One polling helper for the tests that wait on a process, a node or a server."""
import time


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
  """Calls `predicate` every `poll` seconds until it returns a true value, and returns that value;
  an AssertionError naming `what` after `timeout` seconds."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(poll)
  raise AssertionError(f'timed out after {timeout:.0f}s waiting for {what}')

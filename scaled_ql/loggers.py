"""Metric loggers shared by every area (Acme's `Logger` seam): stdout, JSONL and TensorBoard.

    logger = loggers.make_logger('learner', workdir)   # stdout + workdir/learner.jsonl + TB
    logger.write(step, {'loss': 0.5, 'steps_per_s': 12.0})
    logger.close()

Values must be numbers (Python or 0-d numpy/JAX scalars); anything else raises `TypeError`
naming the key, so a bad metric is caught where it is produced.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping, Optional, Protocol, Sequence, TextIO


def write_atomically(path: str, text: str) -> None:
  """Replaces the file at `path` with `text`: written to a temporary file beside it, flushed to
  disk, given the old file's mode, then renamed over it, so that a reader or a kill never sees
  half a file; the temporary file never stays behind."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8', newline='') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    if os.path.exists(path):
      shutil.copymode(path, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def append_lines(path: str, lines: Sequence[str]) -> None:
  """Appends `lines` (without their newlines) to a text log in one write, flushed, creating its
  folder. A file whose last line a killed writer left torn gets the new lines on a fresh line,
  so that the fragment stays alone on its line (readers skip it)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  data = ''.join(line + '\n' for line in lines).encode()
  with open(path, 'a+b') as f:
    if f.seek(0, os.SEEK_END) > 0:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        data = b'\n' + data
    f.write(data)
    f.flush()


LEARNER_STARTS = 'learner_starts.jsonl'  # WORKDIR/: each learner start and the step it resumed


def read_learner_starts(workdir: str) -> Optional[list[dict]]:
  """The learner starts recorded in WORKDIR/learner_starts.jsonl, oldest first: dicts with
  `time`, `restart` and `resumed_from_step` (`launch.nodes.record_learner_start`). A start's
  index in this list is the lineage its params were published under. Lines torn by a kill are
  skipped. None when the file does not exist."""
  path = os.path.join(workdir, LEARNER_STARTS)
  if not os.path.exists(path):
    return None
  starts = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        starts.append(json.loads(line))
      except ValueError:
        continue  # a line torn by a kill
  return starts


def resume_steps(starts: Sequence[Mapping[str, Any]]) -> list[int]:
  """The step each learner start of `read_learner_starts` resumed from (0 for a line without it:
  every later lineage's params then count as the lost run's, the cautious reading)."""
  return [int(s.get('resumed_from_step', 0)) for s in starts]


def lost_bound(resumed_from: Sequence[int], lineage: int) -> Optional[int]:
  """For learner start `lineage` (its index in `resume_steps`): the step past which the params it
  published were lost, i.e. the smallest step any later start resumed from (a later start trains
  the steps past its checkpoint again, under a new lineage; the checkpoint's own step is the same
  params in both). None when no start came after it, or for a lineage the starts do not number
  (unknown, -1, or above their count): nothing of it is taken as lost. `report.lost_params`
  leaves out eval records past it, and an evaluator that moves to a new lineage forgets what it
  evaluated past it (`launch.nodes.first_lost_version`)."""
  later = resumed_from[lineage + 1:] if 0 <= lineage < len(resumed_from) else ()
  return min(int(step) for step in later) if later else None


class Logger(Protocol):
  def write(self, step: int, metrics: Mapping[str, Any]) -> None: ...
  def close(self) -> None: ...


def to_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """{key: float}; raises TypeError naming a key whose value is not a scalar number."""
  out = {}
  for key, value in metrics.items():
    try:
      out[key] = float(value)
    except (TypeError, ValueError) as e:
      raise TypeError(f'metric {key!r} is not a scalar number: {value!r}') from e
  return out


def _format(value: float) -> str:
  if value == 0 or not math.isfinite(value):
    return str(value)
  if abs(value) >= 1e5 or abs(value) < 1e-3:
    return f'{value:.3e}'
  return f'{value:.4g}'


class StdoutLogger:
  """One line per write: `[label] step 100 | loss 0.52 | q_data 1.3`."""

  def __init__(self, label: str, stream: Optional[TextIO] = None):
    self._label, self._stream = label, stream

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    values = to_scalars(metrics)
    parts = [f'[{self._label}] step {step}'] + [f'{k} {_format(v)}' for k, v in values.items()]
    print(' | '.join(parts), file=self._stream or sys.stdout, flush=True)

  def close(self) -> None:
    pass


class JsonlLogger:
  """Appends `{"step": .., "time": .., **metrics}` lines to `path` (non-finite values as strings)."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    self._file = open(path, 'a', encoding='utf-8')

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    values = {k: (v if math.isfinite(v) else str(v)) for k, v in to_scalars(metrics).items()}
    self._file.write(json.dumps({'step': int(step), 'time': time.time(), **values}) + '\n')
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class TensorBoardLogger:
  """Scalars under `<label>/<key>` in a tensorboardX event file in `logdir`."""

  def __init__(self, logdir: str, label: str):
    from tensorboardX import SummaryWriter  # import here: only runs that log to TB pay for it
    self._writer = SummaryWriter(logdir=logdir)
    self._label = label

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    for key, value in to_scalars(metrics).items():
      self._writer.add_scalar(f'{self._label}/{key}', value, global_step=int(step))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MultiLogger:
  def __init__(self, loggers: Sequence[Logger]):
    self._loggers = list(loggers)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    for logger in self._loggers:
      logger.write(step, metrics)

  def close(self) -> None:
    for logger in self._loggers:
      logger.close()


def make_logger(label: str, workdir: Optional[str] = None, stdout: bool = True,
                tensorboard: bool = True) -> Logger:
  """stdout (if `stdout`) + `workdir/<label>.jsonl` + TensorBoard in `workdir/tb` (if workdir)."""
  loggers: list[Logger] = []
  if stdout:
    loggers.append(StdoutLogger(label))
  if workdir is not None:
    loggers.append(JsonlLogger(os.path.join(workdir, f'{label}.jsonl')))
    if tensorboard:
      loggers.append(TensorBoardLogger(os.path.join(workdir, 'tb'), label))
  return MultiLogger(loggers)

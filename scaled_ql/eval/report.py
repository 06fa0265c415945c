"""Evaluation logs and the reports made from them (`scaled-ql report aggregate | run`).

Evaluation log schema (JSON Lines; one file per evaluator node, `WORKDIR/eval/<evaluator>.jsonl`)
-----------------------------------------------------------------------------------------------
One JSON object per line and per (evaluation, game), written by `scaled_ql.eval.evaluator.evaluate`
(the distributed evaluator node calls it with `jsonl_path=`). Fields (`EvalRecord`):

  game              str    RL Unplugged game name (`scaled_ql.games.ALL_GAMES`)
  score             float  mean undiscounted, unclipped return of the completed episodes; if no
                           episode completed within the step budget, the mean partial return of the
                           episodes in progress (then `partial` is true and `episodes` is 0)
  normalized        float  human-normalized `score` (fraction: 0 = random, 1 = human)
  param_version     int    learner step of the parameters evaluated (-1: unknown)
  evaluator         str    name of the evaluator that wrote the record
  episodes          int    number of completed episodes averaged in `score`
  time              float  unix time at which the record was written
  steps             int    agent steps (4 emulator frames each) run for this game
  steps_per_second  float  agent steps per wall-clock second, network included
  partial           bool   see `score`
  epsilon           float  epsilon of the epsilon-greedy policy (null if not given)

The first seven are required when reading; the rest are optional (older or hand-written logs).

Learning curves (`run_report`): per game, the normalized score against `param_version` (records of
the same game and version, e.g. from several evaluators, are averaged). The aggregate curve (IQM,
median and mean over games) at version v uses, for each game, its latest record with
`param_version <= v`; it starts at the first version by which every game of the logs has a record,
so evaluators that split the games between them, or evaluate games at different versions, still
give a well-defined curve (when one evaluator evaluates all games with one version, as `evaluate`
does, the curve is exactly the per-version aggregate).
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import json
import math
import os
import sys
import time as time_lib
from typing import Iterable, Optional, Sequence

import numpy as np

from scaled_ql import games as games_lib

REQUIRED_FIELDS = ('game', 'score', 'normalized', 'param_version', 'evaluator', 'episodes', 'time')


class EvalLogError(ValueError):
  """A malformed evaluation log; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class EvalRecord:
  """One line of an evaluation log (see the module docstring)."""
  game: str
  score: float
  normalized: float
  param_version: int
  evaluator: str
  episodes: int
  time: float
  steps: int = 0
  steps_per_second: float = 0.0
  partial: bool = False
  epsilon: Optional[float] = None

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=False)

  @classmethod
  def from_dict(cls, d: dict, where: str = 'record') -> 'EvalRecord':
    missing = [f for f in REQUIRED_FIELDS if f not in d]
    if missing:
      raise EvalLogError(f'{where}: missing field(s) {missing} (schema: scaled_ql/eval/report.py)')
    known = {f.name for f in dataclasses.fields(cls)}
    try:
      rec = cls(**{k: v for k, v in d.items() if k in known})
      rec = dataclasses.replace(
          rec, game=str(rec.game), score=float(rec.score), normalized=float(rec.normalized),
          param_version=int(rec.param_version), evaluator=str(rec.evaluator),
          episodes=int(rec.episodes), time=float(rec.time), steps=int(rec.steps),
          steps_per_second=float(rec.steps_per_second), partial=bool(rec.partial),
          epsilon=None if rec.epsilon is None else float(rec.epsilon))
    except (TypeError, ValueError) as e:
      raise EvalLogError(f'{where}: bad field value: {e}') from e
    if rec.game not in games_lib.GAME_INFO:
      raise EvalLogError(f'{where}: unknown game {rec.game!r}')
    if not (math.isfinite(rec.score) and math.isfinite(rec.normalized)):
      raise EvalLogError(f'{where}: non-finite score')
    return rec


def append_records(path: str, records: Iterable[EvalRecord]) -> None:
  """Appends records to a JSONL log (creating its folder), one line each, flushed."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'a') as f:
    for r in records:
      f.write(r.to_json() + '\n')
    f.flush()


CSV_FIELDS = tuple(f.name for f in dataclasses.fields(EvalRecord))


def append_csv(path: str, records: Iterable[EvalRecord]) -> None:
  """Appends records to a CSV (header written when the file is new or empty)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  new = not os.path.exists(path) or os.path.getsize(path) == 0
  with open(path, 'a', newline='') as f:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator='\n')
    if new:
      w.writeheader()
    for r in records:
      w.writerow(dataclasses.asdict(r))


def read_eval_logs(workdir: str) -> list[EvalRecord]:
  """All records of `WORKDIR/eval/*.jsonl`; raises `EvalLogError` naming the file:line at fault."""
  eval_dir = os.path.join(workdir, 'eval')
  if not os.path.isdir(eval_dir):
    raise EvalLogError(f'{workdir}: no eval/ folder (evaluator logs go to WORKDIR/eval/*.jsonl)')
  paths = sorted(glob.glob(os.path.join(eval_dir, '*.jsonl')))
  if not paths:
    raise EvalLogError(f'{eval_dir}: no *.jsonl evaluator logs')
  records = []
  for path in paths:
    with open(path) as f:
      lines = f.read().splitlines()
    last = max((i for i, l in enumerate(lines, 1) if l.strip()), default=0)
    for i, line in enumerate(lines, 1):
      line = line.strip()
      if not line:
        continue
      try:
        d = json.loads(line)
      except json.JSONDecodeError as e:
        # A line cut short by a killed evaluator is only tolerated as the file's last line.
        if i == last:
          print(f'warning: {path}:{i}: ignoring a truncated last line ({e.msg})', file=sys.stderr)
          break
        raise EvalLogError(f'{path}:{i}: not JSON: {e.msg}') from e
      if not isinstance(d, dict):
        raise EvalLogError(f'{path}:{i}: not a JSON object')
      records.append(EvalRecord.from_dict(d, f'{path}:{i}'))
  if not records:
    raise EvalLogError(f'{eval_dir}: the evaluator logs hold no records')
  return records


# ---- learning curves -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Curves:
  games: tuple[str, ...]
  per_game: dict[str, tuple[list[int], list[float]]]  # game -> (versions, normalized)
  raw_per_game: dict[str, tuple[list[int], list[float]]]  # game -> (versions, raw score)
  versions: list[int]  # versions of the aggregate curve
  iqm: list[float]
  median: list[float]
  mean: list[float]


def learning_curves(records: Sequence[EvalRecord]) -> Curves:
  """Per-game and aggregate (IQM/median/mean over games) curves; see the module docstring."""
  from scaled_ql.eval import metrics
  games = tuple(sorted({r.game for r in records}, key=games_lib.ALL_GAMES.index))
  sums: dict[tuple[str, int], list[float]] = {}
  raws: dict[tuple[str, int], list[float]] = {}
  for r in records:
    sums.setdefault((r.game, r.param_version), []).append(r.normalized)
    raws.setdefault((r.game, r.param_version), []).append(r.score)
  per_game, raw_per_game = {}, {}
  for g in games:
    vs = sorted(v for (gg, v) in sums if gg == g)
    per_game[g] = (vs, [float(np.mean(sums[(g, v)])) for v in vs])
    raw_per_game[g] = (vs, [float(np.mean(raws[(g, v)])) for v in vs])
  versions, iqm, median, mean = [], [], [], []
  for v in sorted({r.param_version for r in records}):
    latest = []
    for g in games:
      vs, vals = per_game[g]
      k = int(np.searchsorted(vs, v, side='right')) - 1
      if k < 0:
        break
      latest.append(vals[k])
    else:
      x = np.asarray(latest)[None, :]
      versions.append(v)
      iqm.append(metrics.iqm(x))
      median.append(float(np.median(x)))
      mean.append(float(np.mean(x)))
  return Curves(games, per_game, raw_per_game, versions, iqm, median, mean)


def run_report(workdir: str, out_dir: Optional[str] = None) -> dict[str, str]:
  """Learning-curve PNGs and a Markdown summary of a run's evaluator logs; returns their paths."""
  from scaled_ql.eval import plots
  records = read_eval_logs(workdir)
  out_dir = out_dir or os.path.join(workdir, 'report')
  os.makedirs(out_dir, exist_ok=True)
  c = learning_curves(records)
  paths = {
      'games_png': plots.per_game_grid_png(
          os.path.join(out_dir, 'learning_curves_games.png'), c.per_game,
          title=f'{os.path.basename(os.path.abspath(workdir))}: human-normalized score per game'),
  }
  if c.versions:
    paths['aggregate_png'] = plots.learning_curves_png(
        os.path.join(out_dir, 'learning_curve_aggregate.png'),
        {'IQM': (c.versions, c.iqm), 'median': (c.versions, c.median),
         'mean': (c.versions, c.mean)},
        'human-normalized score (%)', title=f'aggregate over {len(c.games)} games')
  md = _run_markdown(workdir, records, c, paths)
  paths['summary_md'] = os.path.join(out_dir, 'summary.md')
  with open(paths['summary_md'], 'w') as f:
    f.write(md)
  return paths


def _run_markdown(workdir: str, records: Sequence[EvalRecord], c: Curves,
                  paths: dict[str, str]) -> str:
  evaluators = sorted({r.evaluator for r in records})
  first, last = min(r.time for r in records), max(r.time for r in records)
  lines = [f'# Evaluation of {os.path.abspath(workdir)}', '',
           f'{len(records)} records from evaluator(s) {", ".join(evaluators)} between '
           f'{_fmt_time(first)} and {_fmt_time(last)}; games: {", ".join(c.games)}.', '']
  if c.versions:
    lines += ['## Aggregate (human-normalized, %)', '',
              '| learner step | IQM | median | mean |', '|---|---|---|---|']
    lines += [f'| {v} | {i * 100:.1f} | {m * 100:.1f} | {a * 100:.1f} |'
              for v, i, m, a in zip(c.versions, c.iqm, c.median, c.mean)]
    lines += ['', f'![aggregate]({os.path.basename(paths["aggregate_png"])})', '']
  else:
    lines += ['No learner step has a record for every game yet: no aggregate curve.', '']
  lines += ['## Latest score per game', '',
            '| game | learner step | raw score | human-normalized (%) | episodes |',
            '|---|---|---|---|---|']
  for g in c.games:
    v = c.per_game[g][0][-1]
    recs = [r for r in records if r.game == g and r.param_version == v]
    eps = sum(r.episodes for r in recs)
    partial = ' (partial)' if all(r.partial for r in recs) else ''
    lines.append(f'| {g} | {v} | {c.raw_per_game[g][1][-1]:.1f} | '
                 f'{c.per_game[g][1][-1] * 100:.1f} | {eps}{partial} |')
  lines += ['', f'![per game]({os.path.basename(paths["games_png"])})', '',
            'Schema and curve definitions: `scaled_ql/eval/report.py`.', '']
  return '\n'.join(lines)


def _fmt_time(t: float) -> str:
  return time_lib.strftime('%Y-%m-%d %H:%M:%S UTC', time_lib.gmtime(t))


# ---- aggregate report of a scores CSV ------------------------------------------------------------
def aggregate_report(scores_csv: str, out_dir: Optional[str] = None, reps: int = 2000,
                     seed: int = 0, tau_max: float = 4.0, task_bootstrap: Optional[bool] = None,
                     methods: Optional[Sequence[str]] = None) -> tuple[str, dict[str, str]]:
  """Aggregates a (method, game, score[, seed]) CSV: returns (text table, written file paths).

  `methods` keeps only those methods (each must be in the file). Writes `aggregate.md` (Markdown table), `aggregate.csv` (method, metric, point, lower, upper in
  percent) and `performance_profile.png` into `out_dir` (default `./<csv stem>_aggregate`).
  """
  from scaled_ql.eval import metrics, plots
  if tau_max <= 0:
    raise ValueError(f'--tau-max must be > 0, got {tau_max}')
  df = metrics.load_scores_csv(scores_csv)
  path = df.attrs['path']
  if methods:
    unknown = [m for m in methods if m not in set(df['method'])]
    if unknown:
      raise metrics.ScoresFileError(f'{path}: --methods {unknown} not in the file; its methods: '
                                    f'{list(dict.fromkeys(df["method"]))}')
    df = df[df['method'].isin(methods)].copy()
    df.attrs['path'] = path
  mats, games = metrics.normalized_score_matrices(df)
  table = metrics.aggregate(mats, reps=reps, seed=seed, task_bootstrap=task_bootstrap)
  taus = np.linspace(0.0, tau_max, 81)
  profiles, cis = metrics.performance_profiles(mats, taus, reps=reps, seed=seed,
                                               task_bootstrap=task_bootstrap)
  stem = os.path.splitext(os.path.basename(path))[0]
  out_dir = out_dir or f'{stem}_aggregate'
  os.makedirs(out_dir, exist_ok=True)
  paths = {
      'profile_png': plots.performance_profile_png(
          os.path.join(out_dir, 'performance_profile.png'), profiles, cis, taus,
          title=f'{stem}: {len(games)} games'),
      'markdown': os.path.join(out_dir, 'aggregate.md'),
      'csv': os.path.join(out_dir, 'aggregate.csv'),
  }
  with open(paths['markdown'], 'w') as f:
    f.write(f'# Aggregates of {path}\n\n' + metrics.markdown_table(table) +
            '\n![performance profile](performance_profile.png)\n')
  with open(paths['csv'], 'w', newline='') as f:
    w = csv.writer(f, lineterminator='\n')
    w.writerow(['method', 'metric', 'point', 'lower', 'upper'])
    for m, est in table.estimates.items():
      for name, e in est.items():
        w.writerow([m, name, f'{e.point * 100:.3f}', f'{e.lower * 100:.3f}',
                    f'{e.upper * 100:.3f}'])
  return metrics.format_table(table), paths

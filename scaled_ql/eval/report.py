"""Evaluation logs and the reports made from them (`scaled-ql report aggregate | run`).

Evaluation log schema (JSON Lines; one file per evaluator node, `WORKDIR/eval/<evaluator>.jsonl`)
-----------------------------------------------------------------------------------------------
One JSON object per line and per (evaluation, game), written by `scaled_ql.eval.evaluator.evaluate`
(the distributed evaluator node calls it with `jsonl_path=`). Fields (`EvalRecord`):

  game              str    RL Unplugged game name (`scaled_ql.games.ALL_GAMES`)
  score             float  mean undiscounted, unclipped return of the completed episodes (protocol:
                    |null  `scaled_ql/eval/evaluator.py`); null when no episode completed
  normalized        float  human-normalized `score` (fraction: 0 = random, 1 = human); null with it
                    |null
  param_version     int    learner step of the parameters evaluated (-1: unknown)
  evaluator         str    name of the evaluator that wrote the record
  episodes          int    number of completed episodes averaged in `score`
  time              float  unix time at which the record was written
  steps             int    agent steps (4 emulator frames each) run for this game
  steps_per_second  float  agent steps per wall-clock second, network included (of the whole
                           loop, for games played at once: `evaluator.evaluate_games`)
  partial           bool   true when no episode completed (then there is no score)
  epsilon           float  epsilon of the epsilon-greedy policy (null if not given)
  truncated         int    completed episodes that ended at the frame cap (`max_episode_frames`;
                           counted in score)
  budget            int    the step budget (`steps_per_game`); 0 = not recorded
  param_lineage     int    the learner start that produced the params (-1: unknown); records of
                           params a learner restart lost are left out when read (`lost_params`)
  game_mode         int    the ALE game mode played (`eval.game_mode`; online fine-tuning's new
                    |null  mode); null: the ROM's default mode
  sticky_action_prob float the emulator's sticky-action probability (`eval.sticky_action_prob`);
                    |null  null: the protocol was not recorded (a log from before 2026-12-06
                           evening), and then `game_mode` null says nothing either
  max_episode_frames int   the episode cap in emulator frames (`eval.max_episode_frames`); 0: not
                           recorded

The first seven are required when reading; the rest are optional (older or hand-written logs).
The last three are the protocol (`protocol_label`): `report run` names it, and says so when one
run's records mix protocols (e.g. an online fine-tuning's new mode beside the default mode).
Old logs (before the protocol of issue 10) wrote, for a game with no completed episode, the mean
PARTIAL return as `score` with `partial: true, episodes: 0`: such a number is not a score, and is
read as no score (`score`/`normalized` None). A record with `episodes` 0 never has a score.

Torn lines: a killed evaluator can leave its last line cut short, and a restarted one then appends
after it. `append_records` starts every write on a fresh line; `read_eval_logs` skips a line that
is not valid JSON anywhere in a file and counts it (`EvalLogs.torn`, shown by `report run`); if a
whole record follows the torn fragment on the same line (written by an older version without the
fresh-line rule), that record is kept.

Learning curves (`run_report`): per game, the normalized score against `param_version` (records of
the same game and version, e.g. a round and the final evaluation on a larger budget, or a restarted
evaluator's, are pooled over their completed episodes: `pooled`), from the records that HAVE
a score: a record without a completed episode is shown as such and is never a point or part of an
aggregate. The aggregate curve (IQM, median and mean over games) at version v uses, for each game,
its latest scored record with `param_version <= v`; it starts at the first version by which every
game has one, so evaluators that split the games between them, or evaluate games at different
versions, still give a well-defined curve (when one evaluator evaluates all games with one
version, as `evaluate` does, the curve is exactly the per-version aggregate). A game with no scored
record at all is left out of the aggregate and named in the summary. Beside each game's curve
and in its table row stands the behaviour score of the data the run trained on (`data_behaviour`:
the run's config.json's data dir and selection, read from our generator's generation_info.json;
absent, with the reason in the summary, for other data or a data dir not found from here).
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import math
import os
import sys
import time as time_lib
from typing import Iterable, Optional, Sequence

import numpy as np

from scaled_ql import games as games_lib

NO_EPISODE = 'no completed episode'  # how a game without a score is shown, everywhere
REQUIRED_FIELDS = ('game', 'score', 'normalized', 'param_version', 'evaluator', 'episodes', 'time')


class EvalLogError(ValueError):
  """A malformed evaluation log; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class EvalRecord:
  """One line of an evaluation log (see the module docstring)."""
  game: str
  score: Optional[float]  # None: no completed episode
  normalized: Optional[float]
  param_version: int
  evaluator: str
  episodes: int
  time: float
  steps: int = 0
  steps_per_second: float = 0.0
  partial: bool = False  # no completed episode (old logs: `score` was a partial return)
  epsilon: Optional[float] = None
  truncated: int = 0
  budget: int = 0
  # The learner start that produced the params (`launch/variable_server.py` lineages; -1: unknown,
  # e.g. `scaled-ql eval` or a log from before 2026-12-06).
  param_lineage: int = -1
  # The evaluation protocol (`EvalConfig`): mode (None: the ROM's default), sticky actions (None:
  # not recorded, an older log) and the frame cap (0: not recorded).
  game_mode: Optional[int] = None
  sticky_action_prob: Optional[float] = None
  max_episode_frames: int = 0

  @property
  def has_score(self) -> bool:
    return self.score is not None

  @property
  def protocol_label(self) -> Optional[str]:
    """The protocol of this record in words, e.g. 'mode 12, no sticky actions, 108000-frame
    cap, epsilon 0.001'; None when the record does not say (a log older than the fields). A mode
    equal to the game's default (`envs.atari.default_mode`) reads as the default."""
    if self.sticky_action_prob is None:
      return None
    from scaled_ql.envs import atari  # (the ROM's mode list; ale-py only where labels are made)
    # Mode 0 set explicitly is Breakout's default, and the same protocol as leaving it unset.
    default = self.game_mode is None or self.game_mode == atari.default_mode(self.game)
    mode = "the ROM's default mode" if default else f'mode {self.game_mode}'
    sticky = (f'sticky actions {self.sticky_action_prob:g}' if self.sticky_action_prob
              else 'no sticky actions')
    cap = (f'{self.max_episode_frames}-frame cap' if self.max_episode_frames
           else 'frame cap not recorded')
    epsilon = '' if self.epsilon is None else f', epsilon {self.epsilon:g}'
    return f'{mode}, {sticky}, {cap}{epsilon}'

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
      no_score = int(rec.episodes) == 0 or bool(rec.partial)  # old logs: a partial return
      rec = dataclasses.replace(
          rec, game=str(rec.game), score=None if no_score else float(rec.score),
          normalized=None if no_score else float(rec.normalized),
          param_version=int(rec.param_version), evaluator=str(rec.evaluator),
          episodes=int(rec.episodes), time=float(rec.time), steps=int(rec.steps),
          steps_per_second=float(rec.steps_per_second), partial=no_score,
          epsilon=None if rec.epsilon is None else float(rec.epsilon),
          truncated=int(rec.truncated), budget=int(rec.budget),
          param_lineage=int(rec.param_lineage),
          game_mode=None if rec.game_mode in (None, '') else _whole(rec.game_mode),
          sticky_action_prob=(None if rec.sticky_action_prob in (None, '')
                              else float(rec.sticky_action_prob)),
          max_episode_frames=_whole(rec.max_episode_frames or 0))
    except (TypeError, ValueError) as e:
      raise EvalLogError(f'{where}: bad field value: {e}') from e
    if rec.game not in games_lib.GAME_INFO:
      raise EvalLogError(f'{where}: unknown game {rec.game!r}')
    if rec.has_score and not (math.isfinite(rec.score) and math.isfinite(rec.normalized)):
      raise EvalLogError(f'{where}: non-finite score')
    if rec.episodes < 0 or not 0 <= rec.truncated <= rec.episodes:
      raise EvalLogError(f'{where}: bad episode counts (episodes {rec.episodes}, truncated '
                         f'{rec.truncated})')
    return rec


def _whole(value) -> int:
  """An int field of a record, also as a spreadsheet writes it ('12.0'); ValueError for 12.5."""
  number = float(value)
  if not number.is_integer():
    raise ValueError(f'{value!r} is not a whole number')
  return int(number)


def append_records(path: str, records: Iterable[EvalRecord]) -> None:
  """Appends records to a JSONL log (creating its folder), one line each, in one write, flushed.

  If the file does not end with a newline (a writer killed mid-line), the new records start on a
  fresh line, so that the torn fragment stays alone on its line.
  """
  from scaled_ql import loggers
  loggers.append_lines(path, [r.to_json() for r in records])


CSV_FIELDS = tuple(f.name for f in dataclasses.fields(EvalRecord))


def csv_columns(path: str) -> tuple[str, ...]:
  """The columns of an existing evaluation CSV (one begun by an older version lacks the newer
  fields, e.g. param_lineage; `upgrade_csv` adds them). EvalLogError when its header is not an
  evaluation CSV's (appended rows would be mostly blank)."""
  try:
    with open(path, newline='') as f:
      fields = tuple(next(csv.reader(f), None) or ())
  except (UnicodeDecodeError, csv.Error) as e:
    raise EvalLogError(f'{path}: not an evaluation CSV ({type(e).__name__}: {e}); write to a '
                       'new file') from e
  if not set(REQUIRED_FIELDS) <= set(fields) <= set(CSV_FIELDS):
    raise EvalLogError(f'{path}: not an evaluation CSV (its header is {list(fields)}); write to '
                       'a new file')
  return fields


def upgrade_csv(path: str) -> tuple[str, ...]:
  """The columns of an existing evaluation CSV (`csv_columns`), after giving one begun by an
  older version the newer fields' columns (e.g. the protocol's; its rows get the values that read
  back as "not recorded", the fields' defaults: lineage -1, sticky actions empty, frame cap 0), so
  that records appended to it keep every field. A row with more cells than the header is an
  EvalLogError naming it, and the file is left as it was (`scaled-ql eval --out` calls this
  before evaluating)."""
  fields = csv_columns(path)
  missing = [f for f in CSV_FIELDS if f not in fields]
  if not missing:
    return fields
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  for i, row in enumerate(rows, 2):
    if None in row:
      raise EvalLogError(f'{path}:{i}: more cells than its header has columns; mend or remove '
                         'the row, or write to a new file')
  defaults = {f.name: f.default for f in dataclasses.fields(EvalRecord) if f.name in missing}
  fields += tuple(missing)
  from scaled_ql import loggers
  text = io.StringIO()
  w = csv.DictWriter(text, fieldnames=fields, lineterminator='\n')
  w.writeheader()
  w.writerows({**defaults, **row} for row in rows)
  loggers.write_atomically(path, text.getvalue())
  return fields


def append_csv(path: str, records: Iterable[EvalRecord]) -> None:
  """Appends records to a CSV (header written when the file is new or empty; an older version's
  CSV gets the newer columns first, `upgrade_csv`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  new = not os.path.exists(path) or os.path.getsize(path) == 0
  fields = CSV_FIELDS if new else upgrade_csv(path)
  with open(path, 'a', newline='') as f:
    w = csv.DictWriter(f, fieldnames=fields, lineterminator='\n', extrasaction='ignore')
    if new:
      w.writeheader()
    for r in records:
      w.writerow(dataclasses.asdict(r))


def read_csv(path: str) -> list[EvalRecord]:
  """The records of an evaluation CSV (`append_csv`, `scaled-ql eval --out`): empty cells read as
  missing values, `partial` as a boolean. EvalLogError names the file and row at fault."""
  records = []
  with open(path, newline='', encoding='utf-8') as f:
    for i, row in enumerate(csv.DictReader(f), 2):
      d = {k: (None if v == '' else v) for k, v in row.items()}
      if d.get('partial') is not None:
        d['partial'] = str(d['partial']).strip().lower() in ('true', '1', 'yes')
      records.append(EvalRecord.from_dict(d, f'{path}:{i}'))
  return records


@dataclasses.dataclass(frozen=True)
class EvalLogs:
  records: list[EvalRecord]  # without those of params a learner restart lost (`lost_params`)
  torn: list[str]  # 'file:line' of every torn (not JSON) line skipped
  lost: int = 0  # records left out by `lost_params`


def lost_params(records: Sequence[EvalRecord], resumed_from: Sequence[int]) -> list[bool]:
  """Per record: whether its params were lost to a learner restart. `resumed_from[L]`: the step
  that learner start L (lineage L) resumed from (WORKDIR/learner_starts.jsonl). A start that
  resumed from the checkpoint of step C publishes a new lineage; the params its lost predecessors
  had published past C were never saved, and the new lineage trains those steps again. So a
  record of lineage L at a version past the resume step of any later lineage is of lost params:
  left out of curves and final scores, which would otherwise show the lost run's newest params as
  the run's result, or pool two different params at one step. A record at the resume step
  itself is of the saved checkpoint, and kept. Records of unknown lineage (-1) are kept."""
  from scaled_ql import loggers
  out = []
  for r in records:  # the smallest resume step of the starts after the record's lineage
    bound = loggers.lost_bound(resumed_from, r.param_lineage)  # None: -1, or not in the file
    out.append(bound is not None and r.param_version > bound)
  return out


def _parse_line(line: str) -> tuple[Optional[object], bool]:
  """(JSON value, torn). A torn line yields the whole record that follows its fragment on the
  same line, if there is one (value None otherwise)."""
  try:
    return json.loads(line), False
  except json.JSONDecodeError:
    pass
  decoder = json.JSONDecoder()
  start = line.find('{', 1)
  while start > 0:
    try:
      value, end = decoder.raw_decode(line, start)
      if isinstance(value, dict) and not line[end:].strip():
        return value, True
    except json.JSONDecodeError:
      pass
    start = line.find('{', start + 1)
  return None, True


def read_eval_logs(workdir: str) -> EvalLogs:
  """All records of `WORKDIR/eval/*.jsonl` and the torn lines skipped (see the module docstring);
  raises `EvalLogError` naming the file:line of any other fault."""
  eval_dir = os.path.join(workdir, 'eval')
  if not os.path.isdir(eval_dir):
    raise EvalLogError(f'{workdir}: no eval/ folder (evaluator logs go to WORKDIR/eval/*.jsonl)')
  paths = sorted(glob.glob(os.path.join(eval_dir, '*.jsonl')))
  if not paths:
    raise EvalLogError(f'{eval_dir}: no *.jsonl evaluator logs')
  records, torn = [], []
  for path in paths:
    with open(path, encoding='utf-8', errors='replace') as f:
      lines = f.read().splitlines()
    for i, line in enumerate(lines, 1):
      line = line.strip()
      if not line:
        continue
      d, is_torn = _parse_line(line)
      if is_torn:
        torn.append(f'{path}:{i}')
        print(f'warning: {path}:{i}: skipping a torn line (a write cut short by a killed '
              f'evaluator){"; kept the record appended after it" if d is not None else ""}',
              file=sys.stderr)
        if d is None:
          continue
      if not isinstance(d, dict):
        raise EvalLogError(f'{path}:{i}: not a JSON object')
      records.append(EvalRecord.from_dict(d, f'{path}:{i}'))
  if not records:
    raise EvalLogError(f'{eval_dir}: the evaluator logs hold no records' +
                       (f' ({len(torn)} torn line(s))' if torn else ''))
  from scaled_ql import loggers
  starts = loggers.read_learner_starts(workdir)
  if starts is None and any(r.param_lineage >= 0 for r in records):
    print(f'warning: {workdir}: no {loggers.LEARNER_STARTS}; records of params lost to a '
          'learner restart (if any) cannot be told apart and are all read', file=sys.stderr)
  lost = lost_params(records, loggers.resume_steps(starts or []))
  return EvalLogs([r for r, gone in zip(records, lost) if not gone], torn, sum(lost))


# ---- learning curves -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Curves:
  games: tuple[str, ...]  # every game of the records
  per_game: dict[str, tuple[list[int], list[float]]]  # game -> (versions, normalized); scored only
  raw_per_game: dict[str, tuple[list[int], list[float]]]  # game -> (versions, raw score)
  aggregate_games: tuple[str, ...]  # games with >= 1 scored record: those of the aggregate
  versions: list[int]  # versions of the aggregate curve
  iqm: list[float]
  median: list[float]
  mean: list[float]


def pooled(records: Sequence[EvalRecord]) -> tuple[float, float]:
  """(score, normalized) of scored records of one game and one param version, as if they were one
  evaluation: the mean over all their completed episodes (each record's mean weighted by its
  episodes). Within one run every episode is a return of the same params under the same protocol
  (a resumed run refuses to change it without --allow-config-change, `launch.run.RESUME_REFUSES`),
  so a round on the normal budget and the final evaluation on a larger one (or a restarted
  evaluator's second round) add up to one estimate, not two equal votes. Records of other
  protocols written into the same logs would be pooled too: `protocol_lines` says so in the
  report."""
  if not records or not all(r.has_score for r in records):
    raise ValueError('pooled: every record needs a score (a completed episode)')
  if len({(r.game, r.param_version) for r in records}) != 1:
    raise ValueError('pooled: records of one game and one param version only')
  weights = np.asarray([r.episodes for r in records], float)
  return (float(np.average([r.score for r in records], weights=weights)),
          float(np.average([r.normalized for r in records], weights=weights)))


def learning_curves(records: Sequence[EvalRecord]) -> Curves:
  """Per-game and aggregate (IQM/median/mean over games) curves of the records with a score; see
  the module docstring."""
  from scaled_ql.eval import metrics
  games = tuple(sorted({r.game for r in records}, key=games_lib.ALL_GAMES.index))
  scored: dict[tuple[str, int], list[EvalRecord]] = {}
  for r in records:
    if r.has_score:
      scored.setdefault((r.game, r.param_version), []).append(r)
  points = {key: pooled(recs) for key, recs in scored.items()}  # (raw, normalized)
  per_game, raw_per_game = {}, {}
  for g in games:
    vs = sorted(v for (gg, v) in points if gg == g)
    per_game[g] = (vs, [points[(g, v)][1] for v in vs])
    raw_per_game[g] = (vs, [points[(g, v)][0] for v in vs])
  agg_games = tuple(g for g in games if per_game[g][0])
  versions, iqm, median, mean = [], [], [], []
  for v in sorted({r.param_version for r in records if r.has_score}):
    latest = []
    for g in agg_games:
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
  return Curves(games, per_game, raw_per_game, agg_games, versions, iqm, median, mean)


def run_report(workdir: str, out_dir: Optional[str] = None) -> dict[str, str]:
  """Learning-curve PNGs and a Markdown summary of a run's evaluator logs; returns their paths."""
  from scaled_ql.eval import normalization, plots
  logs = read_eval_logs(workdir)
  out_dir = out_dir or os.path.join(workdir, 'report')
  os.makedirs(out_dir, exist_ok=True)
  c = learning_curves(logs.records)
  data, data_note = data_behaviour(workdir, c.games)
  paths = {
      'games_png': plots.per_game_grid_png(
          os.path.join(out_dir, 'learning_curves_games.png'), c.per_game,
          title=f'{os.path.basename(os.path.abspath(workdir))}: human-normalized score per game',
          references={g: {'data': normalization.human_normalized(g, score)}
                      for g, score in data.items()}),
  }
  if c.versions:
    paths['aggregate_png'] = plots.learning_curves_png(
        os.path.join(out_dir, 'learning_curve_aggregate.png'),
        {'IQM': (c.versions, c.iqm), 'median': (c.versions, c.median),
         'mean': (c.versions, c.mean)},
        'human-normalized score (%)', title=f'aggregate over {len(c.aggregate_games)} games')
  diagnostics = read_game_diagnostics(workdir)
  if diagnostics:
    paths['greedy_png'] = plots.per_game_grid_png(
        os.path.join(out_dir, 'greedy_top_share_games.png'),
        {g: (steps, [row[f'{g}/greedy_top_share'] for row in rows])
         for g, (steps, rows) in diagnostics.items()},
        ylabel='greedy top-action share', percent=False,
        title='share of the probe states whose greedy action is the most frequent one '
              '(1 = one action everywhere)')
  md = (_run_markdown(workdir, logs, c, paths, data, data_note)
        + _diagnostics_markdown(diagnostics, paths))
  paths['summary_md'] = os.path.join(out_dir, 'summary.md')
  with open(paths['summary_md'], 'w') as f:
    f.write(md)
  return paths


def data_behaviour(workdir: str, games: Sequence[str]) -> tuple[dict[str, float], str]:
  """Per game, the raw behaviour score of the data the run trained on: the completed episodes of
  the splits its config.json's data dir and selection read (`generate.selection_score`), for
  data written by our generator. Also a note naming why any game has none (empty when all do)."""
  from scaled_ql.configs import overrides as overrides_lib
  from scaled_ql.datasets import generate, rlds_reader
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return {}, f'no data line: {path} does not exist'
  try:
    cfg = overrides_lib.load(path)
  except ValueError as e:  # ConfigError is a ValueError
    return {}, f'no data line: {path}: {e}'
  out, missing = {}, []
  for game in games:
    try:
      score, _ = generate.selection_score(cfg.data, game)
    except rlds_reader.DatasetNotFoundError as e:
      missing.append(f'{game} ({e})')
      continue
    if score is None:
      missing.append(f'{game} (no generation_info.json with a completed episode in '
                     f'{cfg.data.selection!r})')
    else:
      out[game] = score
  note = ('no data line for ' + '; '.join(missing)) if missing else ''
  return out, note


def _run_markdown(workdir: str, logs: EvalLogs, c: Curves, paths: dict[str, str],
                  data: dict[str, float], data_note: str) -> str:
  records = logs.records
  evaluators = sorted({r.evaluator for r in records})
  first, last = min(r.time for r in records), max(r.time for r in records)
  no_score = sum(not r.has_score for r in records)
  lines = [f'# Evaluation of {os.path.abspath(workdir)}', '',
           f'{len(records)} records from evaluator(s) {", ".join(evaluators)} between '
           f'{_fmt_time(first)} and {_fmt_time(last)}; games: {", ".join(c.games)}.', '',
           f'Records with {NO_EPISODE} (no score, left out of every curve and aggregate): '
           f'{no_score}. Torn log lines skipped: {len(logs.torn)}' +
           (f' ({", ".join(os.path.relpath(t, workdir) for t in logs.torn)})' if logs.torn
            else '') + '.' +
           (f' Records of params lost to a learner restart, left out: {logs.lost}.'
            if logs.lost else ''), '']
  lines += protocol_lines(records)
  left_out = [g for g in c.games if g not in c.aggregate_games]
  if left_out:
    lines += [f'Left out of the aggregate ({NO_EPISODE} in any record): {", ".join(left_out)}.',
              '']
  if c.versions:
    lines += [f'## Aggregate over {len(c.aggregate_games)} games (human-normalized, %)', '',
              '| learner step | IQM | median | mean |', '|---|---|---|---|']
    lines += [f'| {v} | {i * 100:.1f} | {m * 100:.1f} | {a * 100:.1f} |'
              for v, i, m, a in zip(c.versions, c.iqm, c.median, c.mean)]
    lines += ['', f'![aggregate]({os.path.basename(paths["aggregate_png"])})', '']
  else:
    lines += ['No learner step has a score for every game yet: no aggregate curve.', '']
  lines += ['## Latest evaluation per game', '',
            'data: the behaviour score of the splits the run trained on (completed episodes; the '
            'dashed line in the per-game curves).' + (f' {data_note}.' if data_note else ''), '',
            '| game | learner step | raw score | human-normalized (%) | episodes (cut at cap) '
            '| data (raw) |',
            '|---|---|---|---|---|---|']
  for g in c.games:
    v = max(r.param_version for r in records if r.game == g)
    recs = [r for r in records if r.game == g and r.param_version == v]
    eps = sum(r.episodes for r in recs)
    cut = sum(r.truncated for r in recs)
    if any(r.has_score for r in recs):
      vs, vals = c.per_game[g]
      k = vs.index(v)
      cells = f'{c.raw_per_game[g][1][k]:.1f} | {vals[k] * 100:.1f}'
    else:
      cells = f'{NO_EPISODE} | {NO_EPISODE}'
    data_cell = f'{data[g]:.1f}' if g in data else 'n/a'
    lines.append(f'| {g} | {v} | {cells} | {eps} ({cut}) | {data_cell} |')
  lines += ['', f'![per game]({os.path.basename(paths["games_png"])})', '',
            'Schema and curve definitions: `scaled_ql/eval/report.py`; evaluation protocol: '
            '`scaled_ql/eval/evaluator.py`.', '']
  return '\n'.join(lines)


def by_protocol(records: Iterable[EvalRecord]) -> dict[str, list[EvalRecord]]:
  """The records of each evaluation protocol (`EvalRecord.protocol_label`), in order of first
  appearance; records that do not name theirs (logs from before the fields) are left out."""
  protocols: dict[str, list[EvalRecord]] = {}
  for r in records:
    label = r.protocol_label
    if label is not None:
      protocols.setdefault(label, []).append(r)
  return protocols


def protocol_lines(records: Sequence[EvalRecord]) -> list[str]:
  """The Markdown lines that name the records' evaluation protocol (`EvalRecord.protocol_label`);
  a warning, with each protocol's games and learner steps, when they mix several (the curves and
  the aggregate pool every record of a game and step, whatever its protocol). Records that do not
  say theirs (logs from before the fields) are counted, not taken for another protocol."""
  protocols = by_protocol(records)
  unrecorded = len(records) - sum(map(len, protocols.values()))
  older = (f' {unrecorded} older record{"s name" if unrecorded > 1 else " names"} none.'
           if unrecorded and protocols else
           ' The records do not record it (logs from before the protocol fields).' if unrecorded
           else '')
  if len(protocols) <= 1:
    label = next(iter(protocols), 'not recorded')
    return [f'Evaluation protocol: {label}.{older}', '']
  lines = ['**These records mix evaluation protocols**: the curves and the aggregate pool a '
           "game's records of one learner step whatever their protocol. Evaluate each protocol "
           f'into its own workdir (or CSV) to compare them.{older}', '']
  for label, recs in protocols.items():
    lo, hi = min(r.param_version for r in recs), max(r.param_version for r in recs)
    games = sorted({r.game for r in recs})
    lines.append(f'- {label}: {len(recs)} record{"s" if len(recs) > 1 else ""}; games '
                 f'{", ".join(games)}; learner steps {lo}' + (f' to {hi}' if hi > lo else ''))
  return lines + ['']


def read_game_diagnostics(workdir: str) -> dict[str, tuple[list[int], list[dict]]]:
  """{game: (learner steps, rows)} from WORKDIR/learner_games.jsonl (the learner's per-game Q
  diagnostics, `agents.runner.probe_game_metrics`); rows are the lines that hold the game. {} when
  the run has none (BC, online fine-tuning, or a run from before the file existed); a torn last
  line is skipped."""
  path = os.path.join(workdir, 'learner_games.jsonl')
  if not os.path.exists(path):
    return {}
  out: dict[str, tuple[list[int], list[dict]]] = {}
  for line in open(path, encoding='utf-8'):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    for game in sorted({k.split('/')[0] for k in row if '/' in k}):
      steps, rows = out.setdefault(game, ([], []))
      steps.append(int(row['step']))
      rows.append(row)
  return out


def _diagnostics_markdown(diagnostics: dict, paths: dict[str, str]) -> str:
  if not diagnostics:
    return ''
  names = ('greedy_is_data_action', 'greedy_top_share', 'data_top_share', 'action_gap',
           'q_mc_corr')
  lines = ['## Q diagnostics per game (latest learner log, `learner_games.jsonl`)', '',
           'On the learner\'s Monte-Carlo probe (the run\'s own data). A greedy top-action share '
           'near 1 where the data\'s is lower: the policy plays one action everywhere.', '',
           '| game | learner step | ' + ' | '.join(names) + ' |',
           '|---|' + '---|' * (len(names) + 1)]
  for game, (steps, rows) in diagnostics.items():
    cells = [f'{rows[-1].get(f"{game}/{n}", float("nan")):.3g}' for n in names]
    lines.append(f'| {game} | {steps[-1]} | ' + ' | '.join(cells) + ' |')
  lines += ['', f'![greedy top-action share]({os.path.basename(paths["greedy_png"])})', '']
  return '\n'.join(lines)


def _fmt_time(t: float) -> str:
  return time_lib.strftime('%Y-%m-%d %H:%M:%S UTC', time_lib.gmtime(t))


# ---- aggregate report of a scores CSV ------------------------------------------------------------
def aggregate_report(scores_csv: str, out_dir: Optional[str] = None, reps: int = 2000,
                     seed: int = 0, tau_max: float = 4.0, task_bootstrap: Optional[bool] = None,
                     methods: Optional[Sequence[str]] = None) -> tuple[str, dict[str, str]]:
  """Aggregates a (method, game, score[, seed]) CSV: returns (text table, written file paths).

  `methods` keeps only those methods (each must be in the file). `task_bootstrap=None` (auto)
  bootstraps each method over what its runs allow (`metrics.aggregate_by_runs`: over runs within
  each game with >= 2 runs; over games too with 1), in one table per kind. Writes `aggregate.md`
  (Markdown tables), `aggregate.csv` (method, metric, point, lower, upper in percent, ci_over) and
  `performance_profile.png` into `out_dir` (default `./<csv stem>_aggregate`). Rows without a
  completed episode leave their game out for every method; the text and `aggregate.md` say which.
  """
  from scaled_ql.eval import metrics, plots
  if tau_max <= 0:
    raise ValueError(f'--tau-max must be > 0, got {tau_max}')
  df = metrics.load_scores_csv(scores_csv)
  path = df.attrs['path']
  no_episode = df.attrs['no_episode']
  if methods:
    in_file = list(dict.fromkeys(list(df['method']) + [r[0] for r in no_episode]))
    unknown = [m for m in methods if m not in in_file]
    if unknown:
      raise metrics.ScoresFileError(f'{path}: --methods {unknown} not in the file; its methods: '
                                    f'{in_file}')
    df = df[df['method'].isin(methods)].copy()
    df.attrs.update(path=path, no_episode=[r for r in no_episode if r[0] in methods])
    if df.empty:
      raise metrics.ScoresFileError(f'{path}: --methods {methods}: no row with a score')
  mats, games = metrics.normalized_score_matrices(df)
  left_out = metrics.left_out_games(df)
  note = ''
  if left_out:
    note = (f'Left out of every aggregate, for every method ({NO_EPISODE}): ' + '; '.join(
        f'{g} ({", ".join(f"{m} seed {s}" for m, s in runs)})' for g, runs in left_out.items())
        + '.\n')
  # auto: each method gets the CI its runs allow (over runs within each game with >= 2 runs, over
  # games with 1), so a 1-run method does not widen the CIs of the methods that have seeds.
  tables = (metrics.aggregate_by_runs(mats, reps=reps, seed=seed) if task_bootstrap is None else
            [metrics.aggregate(mats, reps=reps, seed=seed, task_bootstrap=task_bootstrap)])
  if len(tables) > 1:
    note += ('Methods with several runs and methods with one are in separate tables: their CIs '
             'resample different things, so compare across the tables by point estimates only.\n')
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
    f.write(f'# Aggregates of {path}\n\n' + '\n'.join(map(metrics.markdown_table, tables)) +
            (f'\n{note}' if note else '') +
            '\n![performance profile](performance_profile.png)\n')
  with open(paths['csv'], 'w', newline='') as f:
    w = csv.writer(f, lineterminator='\n')
    w.writerow(['method', 'metric', 'point', 'lower', 'upper', 'ci_over'])
    for table in tables:
      for m, est in table.estimates.items():
        for name, e in est.items():
          w.writerow([m, name, f'{e.point * 100:.3f}', f'{e.lower * 100:.3f}',
                      f'{e.upper * 100:.3f}', table.ci_over])
  return '\n'.join(map(metrics.format_table, tables)) + note, paths

"""Side by side with the paper: `scaled-ql report compare RUN_OR_CSV ...`.

    text, paths = compare.compare(['runs/atari40', 'scores.csv'], table='c1', out_dir='cmp')

Each input is one of
- a run workdir (evaluator logs `WORKDIR/eval/*.jsonl`): one method named after the folder; per
  game its final evaluation, i.e. the records at the largest learner step that has a score for
  that game (several evaluators at that step are averaged);
- an evaluator CSV (`scaled-ql eval --out`: columns of `report.EvalRecord`, no `method`): the same,
  the method named after the file;
- a scores CSV (method, game, score[, seed]), or `paper:c1` / `paper:c2`, read by
  `metrics.load_scores_csv` (several seeds of a method = several runs).
Evaluations with no completed episode have no score (`report.EvalRecord.has_score`,
`metrics.load_scores_csv`): such a game is left out for every method and named. Runs and
evaluator CSVs whose records name different evaluation protocols (`EvalRecord.protocol_label`:
game mode, sticky actions, frame cap, epsilon) are compared all the same, with a note naming each.

They are compared with the rows of the paper's Table C.1 (sub-optimal data) or C.2 (near-optimal
data) for the same games (`table`; by default the `data.selection` in the runs' config.json), on
the games every input has a score for and the table lists: a per-game table of raw scores with
human-normalized (and, where a DQN reference score is given, DQN-normalized) percentages, and
IQM / median / mean / optimality gap of human-normalized scores with 95% stratified-bootstrap CIs
(`metrics.aggregate`, the same bootstrap for every method: with a single run per method it also
resamples games). The paper's aggregates over its 40 games are not these: only the common games
count here, and the text says how many.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Optional, Sequence

from scaled_ql import games as games_lib
from scaled_ql.eval import metrics, normalization, report

TABLES = {'c1': 'paper:c1', 'c2': 'paper:c2'}
SELECTION_TABLE = {'suboptimal': 'c1', 'near_optimal': 'c2'}
PAPER_EXCLUDED_METHODS = ('Human',)  # the normalization's own reference: 100% by definition


class CompareError(ValueError):
  """Inputs that cannot be compared; the message names the input at fault."""


@dataclasses.dataclass
class Source:
  """The scores one input contributes."""
  path: str
  rows: list  # (method, game, score, seed)
  no_episode: list  # (method, game, seed) evaluated without a completed episode
  selection: Optional[str] = None  # data.selection from the run's config.json
  notes: list = dataclasses.field(default_factory=list)
  # The evaluation protocols its records name (`report.EvalRecord.protocol_label`); empty for a
  # scores CSV or records that do not say.
  protocols: list = dataclasses.field(default_factory=list)
  method: Optional[str] = None  # the one method of a run or an evaluator CSV


def _final_scores(records: Sequence[report.EvalRecord], method: str, where: str) -> Source:
  """Per game: the score of the records at the largest learner step with a score, pooled over
  their completed episodes (`report.pooled`)."""
  src = Source(where, [], [])
  by_game: dict[str, list[report.EvalRecord]] = {}
  for r in records:
    by_game.setdefault(r.game, []).append(r)
  steps, used = [], []
  for game in sorted(by_game, key=games_lib.ALL_GAMES.index):
    scored = [r for r in by_game[game] if r.has_score]
    if not scored:
      src.no_episode.append((method, game, 0))
      continue
    last = max(r.param_version for r in scored)
    final = [r for r in scored if r.param_version == last]
    score, _ = report.pooled(final)
    src.rows.append((method, game, score, 0))
    steps.append(last)
    used += final
  if steps:
    src.notes.append(f'{method}: final evaluation of each game, learner step '
                     f'{min(steps)}' + (f'..{max(steps)}' if max(steps) != min(steps) else ''))
  src.method = method
  src.protocols = sorted(report.by_protocol(used))
  if len(src.protocols) > 1:
    src.notes.append(f'{method}: its final evaluations mix protocols: ' +
                     ' | '.join(src.protocols))
  return src


def _run_selection(workdir: str) -> Optional[str]:
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)['data']['selection']
  except (ValueError, KeyError, TypeError) as e:
    raise CompareError(f'{path}: cannot read data.selection: {e}') from e


def load_input(path: str) -> Source:
  """A run workdir, an evaluator CSV or a scores CSV (see the module docstring)."""
  if os.path.isdir(path):
    name = os.path.basename(os.path.normpath(path))
    try:
      logs = report.read_eval_logs(path)
    except report.EvalLogError as e:
      raise CompareError(str(e)) from e
    src = _final_scores(logs.records, name, path)
    src.selection = _run_selection(path)
    return src
  resolved = metrics.resolve_scores_path(path)
  if not os.path.isfile(resolved):
    raise CompareError(f'{path}: neither a run workdir (with eval/*.jsonl) nor a scores CSV')
  with open(resolved, newline='', encoding='utf-8') as f:
    header = next(csv.reader(f), [])
  if 'method' not in header and 'param_version' in header:  # `scaled-ql eval --out`
    try:
      records = report.read_csv(resolved)
    except report.EvalLogError as e:
      raise CompareError(str(e)) from e
    if not records:
      raise CompareError(f'{resolved}: no rows')
    name = os.path.splitext(os.path.basename(resolved))[0]
    return _final_scores(records, name, resolved)
  try:
    df = metrics.load_scores_csv(path)
  except metrics.ScoresFileError as e:
    raise CompareError(str(e)) from e
  rows = [(m, g, float(s), sd) for m, g, s, sd in
          df[['method', 'game', 'score', 'seed']].itertuples(index=False)]
  return Source(resolved, rows, list(df.attrs.get('no_episode', [])))


def _resolve_table(table: Optional[str], sources: Sequence[Source]) -> str:
  if table is not None:
    if table not in TABLES:
      raise CompareError(f'--table {table!r}: expected one of {", ".join(TABLES)}')
    return table
  inferred = {SELECTION_TABLE.get(s.selection) for s in sources if s.selection is not None}
  if len(inferred) == 1 and None not in inferred:
    return inferred.pop()
  found = sorted({s.selection for s in sources if s.selection is not None})
  raise CompareError(
      'pass --table c1 (Table C.1, sub-optimal data) or --table c2 (Table C.2, near-optimal '
      f'data): it cannot be read from the inputs (data.selection found: {found or "none"})')


@dataclasses.dataclass(frozen=True)
class Comparison:
  table: str
  games: tuple[str, ...]  # compared games
  methods: tuple[str, ...]  # inputs' methods, then the paper's
  paper_methods: tuple[str, ...]
  raw: dict  # method -> {game: mean raw score over seeds}
  aggregates: metrics.AggregateTable
  notes: tuple[str, ...]
  dqn_reference: dict  # game -> (score or None, source)


def compare(inputs: Sequence[str], table: Optional[str] = None, reps: int = 2000, seed: int = 0,
            dqn_reference: Optional[str] = None) -> Comparison:
  """Loads the inputs, picks the paper table and aggregates every method on the common games."""
  import pandas as pd
  if not inputs:
    raise CompareError('no RUN_OR_CSV given')
  if reps < 1:
    raise CompareError(f'--reps must be >= 1, got {reps}')
  sources = [load_input(p) for p in inputs]
  table = _resolve_table(table, sources)
  ref = normalization.load_dqn_reference(dqn_reference or normalization.DQN_REFERENCE_CSV)
  paper = metrics.load_scores_csv(TABLES[table])
  paper = paper[~paper['method'].isin(PAPER_EXCLUDED_METHODS)]
  paper_methods = tuple(dict.fromkeys(paper['method']))
  notes: list[str] = [n for s in sources for n in s.notes]
  named = [s for s in sources if s.protocols]
  if len({tuple(s.protocols) for s in named}) > 1:  # e.g. a new mode's fine-tuning run beside
    notes.append('the inputs were evaluated under different protocols: ' + '; '.join(  # others
        f'{s.method}: {" | ".join(s.protocols)}' for s in named))

  ours: list[tuple] = []
  methods: list[str] = []
  for s in sources:
    for m in dict.fromkeys(r[0] for r in s.rows + s.no_episode):
      if m in methods or m in paper_methods:
        raise CompareError(f'{s.path}: method {m!r} also comes from another input or the paper '
                           'table; rename it (a run is named after its folder, a CSV after its '
                           'file or its method column)')
      methods.append(m)
    ours.extend(s.rows)
  no_episode = sorted({(g, m) for s in sources for m, g, _ in s.no_episode})
  no_episode_games = {g for g, _ in no_episode}
  if no_episode:
    notes.append(f'left out, {report.NO_EPISODE}: ' + '; '.join(
        f'{g} ({m})' for g, m in no_episode))
  have = [{g for m2, g, _, _ in ours if m2 == m} for m in methods]
  in_paper = set(paper['game'])
  games = set.intersection(*have) if have else set()
  scored_somewhere = set.union(*have) if have else set()
  not_in_paper = sorted(scored_somewhere - in_paper, key=games_lib.ALL_GAMES.index)
  if not_in_paper:
    notes.append(f'not in {table_name(table)} (not one of the paper\'s 40 training games), left '
                 f'out: {", ".join(not_in_paper)}')
  partial = sorted((scored_somewhere & in_paper) - games - no_episode_games,
                   key=games_lib.ALL_GAMES.index)
  if partial:
    notes.append('scored by only some inputs, left out: ' + ', '.join(partial))
  games = tuple(sorted(games & in_paper - no_episode_games, key=games_lib.ALL_GAMES.index))
  if not games:
    raise CompareError(f'no game has a score in every input and a row in '
                       f'{table_name(table)}' + (f' ({"; ".join(notes)})' if notes else ''))
  rows = [r for r in ours if r[1] in games]
  rows += [(m, g, float(s), 0) for m, g, s in
           paper[paper['game'].isin(games)][['method', 'game', 'score']].itertuples(index=False)]
  df = pd.DataFrame(rows, columns=['method', 'game', 'score', 'seed'])
  df.attrs.update(path='compare', no_episode=[])
  mats, _ = metrics.normalized_score_matrices(df)
  # The paper's methods are one run each, so CIs resample games for every method here: the
  # comparison with the paper is the point, and it needs CIs of one kind.
  aggregates = metrics.aggregate(mats, reps=reps, seed=seed)
  raw = {m: df[df['method'] == m].groupby('game')['score'].mean().to_dict()
         for m in methods + list(paper_methods)}
  return Comparison(table=table, games=games, methods=tuple(methods) + paper_methods,
                    paper_methods=paper_methods, raw=raw, aggregates=aggregates,
                    notes=tuple(notes), dqn_reference=ref)


def table_name(table: str) -> str:
  return f'Table C.{table[1:]}'


def _cell(c: Comparison, method: str, game: str) -> str:
  score = c.raw[method][game]
  text = f'{score:.1f} ({normalization.human_normalized(game, score) * 100:.0f}%'
  dqn = c.dqn_reference.get(game, (None, ''))[0]
  if dqn is not None:
    text += f', DQN {normalization.dqn_normalized(game, score, dqn) * 100:.0f}%'
  return text + ')'


def per_game_rows(c: Comparison) -> list[list[str]]:
  head = ['game'] + [m + (' [paper]' if m in c.paper_methods else '') for m in c.methods]
  return [head] + [[g] + [_cell(c, m, g) for m in c.methods] for g in c.games]


def _plain(rows: list[list[str]]) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def _legend(c: Comparison) -> str:
  with_dqn = [g for g in c.games if c.dqn_reference.get(g, (None, ''))[0] is not None]
  dqn = (f'DQN-normalized where a DQN reference score is given ({len(with_dqn)} of '
         f'{len(c.games)} games)' if with_dqn else
         'no DQN-normalized column: the DQN reference table has no score for these games '
         '(scaled_ql/eval/normalization.py; --dqn-reference)')
  return f'Raw score (human-normalized %; {dqn}). [paper]: Kumar et al. 2023 {table_name(c.table)}.'


def format_text(c: Comparison) -> str:
  parts = [f'Compared on {len(c.games)} games with {table_name(c.table)} '
           f'({"sub-optimal" if c.table == "c1" else "near-optimal"} data).', '',
           _plain(per_game_rows(c)), _legend(c), '', metrics.format_table(c.aggregates)]
  if c.notes:
    parts += ['Notes:'] + [f'- {n}' for n in c.notes]
  return '\n'.join(parts).rstrip() + '\n'


def write_outputs(c: Comparison, out_dir: str) -> dict[str, str]:
  """compare.md (both tables) and compare.csv (method, game, raw, human-normalized %)."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {'markdown': os.path.join(out_dir, 'compare.md'),
           'csv': os.path.join(out_dir, 'compare.csv')}
  rows = per_game_rows(c)
  md = ['| ' + ' | '.join(rows[0]) + ' |', '|' + '---|' * len(rows[0])]
  md += ['| ' + ' | '.join(r) + ' |' for r in rows[1:]]
  with open(paths['markdown'], 'w') as f:
    f.write(f'# Compared with {table_name(c.table)} on {len(c.games)} games\n\n' +
            '\n'.join(md) + '\n\n' + _legend(c) + '\n\n' + metrics.markdown_table(c.aggregates) +
            ''.join(f'\n- {n}' for n in c.notes) + '\n')
  with open(paths['csv'], 'w', newline='') as f:
    w = csv.writer(f, lineterminator='\n')
    w.writerow(['method', 'source', 'game', 'score', 'human_normalized_pct', 'dqn_normalized_pct'])
    for m in c.methods:
      for g in c.games:
        score = c.raw[m][g]
        dqn = c.dqn_reference.get(g, (None, ''))[0]
        w.writerow([m, f'paper:{c.table}' if m in c.paper_methods else 'input', g,
                    f'{score:.6g}', f'{normalization.human_normalized(g, score) * 100:.3f}',
                    '' if dqn is None else
                    f'{normalization.dqn_normalized(g, score, dqn) * 100:.3f}'])
  return paths


def compare_report(inputs: Sequence[str], table: Optional[str] = None,
                   out_dir: Optional[str] = None, reps: int = 2000, seed: int = 0,
                   dqn_reference: Optional[str] = None) -> tuple[str, dict[str, str]]:
  """`scaled-ql report compare`: (text, written paths; none without `out_dir`)."""
  c = compare(inputs, table, reps=reps, seed=seed, dqn_reference=dqn_reference)
  return format_text(c), (write_outputs(c, out_dir) if out_dir else {})

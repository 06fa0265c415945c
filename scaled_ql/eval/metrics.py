"""Aggregate human-normalized scores over games with rliable (Agarwal et al. 2021).

The paper reports the interquartile mean (IQM) and the median of human-normalized scores over the 40
training games (Figures 4/5, Tables C.1/C.2); we also give the mean and the optimality gap, each with
a 95% stratified-bootstrap confidence interval, and performance profiles (fraction of runs with a
normalized score above tau).

Scores come as rows (method, game, score[, seed]); several seeds of a method form rliable's 'runs'
dimension, so every method's scores are a matrix [runs, games]:

    df = load_scores_csv('scores.csv')
    scores, games = normalized_score_matrices(df)    # {method: float [runs, games]}
    table = aggregate(scores, reps=2000, seed=0)      # {method: {'IQM': Estimate, ...}}
    print(format_table(table))

With one run per game (a paper table) a stratified bootstrap over runs has nothing to resample; then
the bootstrap also resamples games (rliable's `task_bootstrap`), which `task_bootstrap=None` (auto)
chooses and `aggregate` reports in its result.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Optional

import numpy as np

from scaled_ql import games as games_lib
from scaled_ql.eval import normalization

# The paper's tables shipped with the package: (file, description).
PAPER_TABLES: dict[str, tuple[str, str]] = {
    'paper:c1': ('table_c1_suboptimal.csv',
                 'Table C.1: raw scores, 40 games, sub-optimal (initial 20%) data'),
    'paper:c2': ('table_c2_near_optimal.csv',
                 'Table C.2: raw scores, 40 games, near-optimal (all) data'),
}
DATA_DIR = os.path.join(os.path.dirname(__file__), 'data')

AGGREGATES: tuple[str, ...] = ('IQM', 'Median', 'Mean', 'Optimality Gap')


class ScoresFileError(ValueError):
  """A scores CSV that cannot be aggregated; the message names the file and the fault."""


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A point estimate with its bootstrap confidence interval (fractions: 1.0 = human)."""
  point: float
  lower: float
  upper: float

  def format(self, scale: float = 100.0, digits: int = 1) -> str:
    return (f'{self.point * scale:.{digits}f} '
            f'[{self.lower * scale:.{digits}f}, {self.upper * scale:.{digits}f}]')


@dataclasses.dataclass(frozen=True)
class AggregateTable:
  estimates: dict[str, dict[str, Estimate]]  # method -> aggregate name -> Estimate
  num_games: int
  runs: dict[str, int]  # method -> number of runs (seeds)
  reps: int
  seed: int
  task_bootstrap: bool
  confidence: float

  @property
  def ci_over(self) -> str:
    """What the bootstrap resampled: 'runs and games' or 'runs within each game'."""
    return 'runs and games' if self.task_bootstrap else 'runs within each game'


def resolve_scores_path(path: str) -> str:
  """`paper:c1` / `paper:c2` name the paper's tables shipped in `scaled_ql/eval/data`."""
  if path in PAPER_TABLES:
    return os.path.join(DATA_DIR, PAPER_TABLES[path][0])
  return path


def load_scores_csv(path: str):
  """Reads a CSV with columns method, game, score and optionally seed; returns a pandas DataFrame.

  Raises `ScoresFileError` naming the file for a missing file/column, an unknown game, a
  non-numeric or non-finite score, or a (method, game, seed) given twice. Rows with an `episodes`
  column of 0 or a true `partial` column (evaluation logs: no completed episode) have no score:
  they are dropped here and listed by `left_out_games`.
  """
  import pandas as pd
  path = resolve_scores_path(path)
  if not os.path.isfile(path):
    raise ScoresFileError(
        f'{path}: no such file (or use one of the paper tables: {", ".join(PAPER_TABLES)})')
  try:
    df = pd.read_csv(path, dtype={'method': str, 'game': str}, skipinitialspace=True)
  except Exception as e:  # pandas raises several types for malformed CSVs
    raise ScoresFileError(f'{path}: cannot be read as CSV: {e}') from e
  missing = [c for c in ('method', 'game', 'score') if c not in df.columns]
  if missing:
    raise ScoresFileError(f'{path}: missing column(s) {missing}; found {list(df.columns)} '
                          '(need method, game, score and optionally seed)')
  if df.empty:
    raise ScoresFileError(f'{path}: no rows')
  for col in ('method', 'game'):
    empty = df[df[col].isna()]
    if len(empty):
      raise ScoresFileError(f'{path}: row {empty.index[0] + 2}: empty {col}')
  if 'seed' not in df.columns:
    df['seed'] = 0
  # Rows of evaluation logs (`scaled-ql eval --out`) with no completed episode have no score
  # (old logs: a partial return flagged `partial`): they are left out, and `left_out_games` names
  # them, never aggregated as numbers.
  no_episode = np.zeros(len(df), bool)
  if 'episodes' in df.columns:
    episodes = pd.to_numeric(df['episodes'], errors='coerce')
    if episodes.isna().any():
      raise ScoresFileError(f'{path}: row {int(np.flatnonzero(episodes.isna())[0]) + 2}: '
                            'episodes is not a number')
    no_episode |= (episodes == 0).to_numpy()
  if 'partial' in df.columns:
    no_episode |= df['partial'].astype(str).str.strip().str.lower().isin(
        ('true', '1', 'yes')).to_numpy()
  df['score'] = pd.to_numeric(df['score'], errors='coerce')
  bad = df[~no_episode & ~np.isfinite(df['score'].to_numpy(dtype=np.float64))]
  if len(bad):
    first = bad.index[0]
    raise ScoresFileError(f'{path}: row {first + 2}: score is not a finite number '
                          f'({len(bad)} such rows)')
  unknown = sorted(set(df['game']) - set(games_lib.ALL_GAMES))
  if unknown:
    raise ScoresFileError(f'{path}: unknown game(s) {unknown}; valid games: '
                          f'{", ".join(games_lib.ALL_GAMES)}')
  dup = df[df.duplicated(['method', 'game', 'seed'], keep=False)]
  if len(dup):
    m, g, s = dup.iloc[0][['method', 'game', 'seed']]
    raise ScoresFileError(f'{path}: method {m!r} game {g!r} seed {s!r} appears '
                          f'{int(((df.method == m) & (df.game == g) & (df.seed == s)).sum())} '
                          'times (add a seed column to give several runs)')
  dropped = df[no_episode]
  df = df[~no_episode].copy()
  df.attrs['path'] = path
  df.attrs['no_episode'] = [tuple(r) for r in dropped[['method', 'game', 'seed']].itertuples(
      index=False)]
  if df.empty:
    raise ScoresFileError(f'{path}: no row has a score: all {len(dropped)} rows have no '
                          'completed episode')
  return df


def left_out_games(df) -> dict[str, list[tuple]]:
  """{game: [(method, seed), ...]} of the rows without a completed episode: each such game is
  left out of the aggregates of EVERY method, so all methods are still compared on the same
  games."""
  out: dict[str, list[tuple]] = {}
  for method, game, seed in df.attrs.get('no_episode', []):
    out.setdefault(game, []).append((method, seed))
  return dict(sorted(out.items(), key=lambda kv: games_lib.ALL_GAMES.index(kv[0])))


def normalized_score_matrices(df) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
  """{method: human-normalized float [runs, games]} with the games (sorted) shared by all methods.

  Every method must cover the same games, and each game with the same seeds. Games with a row
  without a completed episode (`left_out_games`) are left out for every method.
  """
  path = df.attrs.get('path', 'scores')
  methods = list(dict.fromkeys(df['method']))  # first-appearance order
  left_out = left_out_games(df)
  games = tuple(sorted(set(df['game']) - set(left_out), key=games_lib.ALL_GAMES.index))
  if not games:
    raise ScoresFileError(f'{path}: no game is left to aggregate: every game has a row with no '
                          f'completed episode ({", ".join(left_out)})')
  df = df[df['game'].isin(games)]
  out: dict[str, np.ndarray] = {}
  for method in methods:
    rows = df[df['method'] == method]
    missing = [g for g in games if g not in set(rows['game'])]
    if missing:
      raise ScoresFileError(f'{path}: method {method!r} has no score for {missing}; every method '
                            f'needs the same games ({len(games)} in the file)')
    seeds = sorted(set(rows['seed']))
    table = rows.pivot(index='seed', columns='game', values='score').reindex(
        index=seeds, columns=list(games))
    if table.isna().any().any():
      holes = [(s, g) for s in seeds for g in games if np.isnan(table.loc[s, g])]
      raise ScoresFileError(f'{path}: method {method!r}: (seed, game) {holes[:5]} missing; every '
                            f'game needs a score for each of the method\'s seeds {seeds}')
    raw = table.to_numpy(np.float64)
    out[method] = np.stack(
        [normalization.human_normalized(g, raw[:, j]) for j, g in enumerate(games)], axis=1)
  return out, games


def _aggregate_fn(scores: np.ndarray) -> np.ndarray:
  from rliable import metrics as rly
  return np.array([rly.aggregate_iqm(scores), rly.aggregate_median(scores),
                   rly.aggregate_mean(scores), rly.aggregate_optimality_gap(scores)])


def iqm(scores: np.ndarray) -> float:
  """Interquartile mean over all runs x games (rliable's definition) of a [runs, games] matrix."""
  from rliable import metrics as rly
  return float(rly.aggregate_iqm(_check_matrix(scores)))


def _check_matrix(scores: np.ndarray) -> np.ndarray:
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or 0 in scores.shape:
    raise ValueError(f'scores must be a non-empty [runs, games] matrix, got shape {scores.shape}')
  return scores


def aggregate(score_matrices: Mapping[str, np.ndarray], reps: int = 2000, seed: int = 0,
              task_bootstrap: Optional[bool] = None, confidence: float = 0.95
              ) -> AggregateTable:
  """IQM, median, mean and optimality gap with stratified-bootstrap CIs for each method.

  `task_bootstrap=None` resamples games as well when some method has a single run. Each method is
  bootstrapped with its own `RandomState(seed)`, so its interval does not depend on the others.
  """
  if reps < 1:
    raise ValueError(f'reps must be >= 1, got {reps}')
  mats = {m: _check_matrix(s) for m, s in score_matrices.items()}
  if not mats:
    raise ValueError('no methods to aggregate')
  num_games = {s.shape[1] for s in mats.values()}
  if len(num_games) != 1:
    raise ValueError(f'methods have different numbers of games: {sorted(num_games)}')
  runs = {m: s.shape[0] for m, s in mats.items()}
  if task_bootstrap is None:
    task_bootstrap = min(runs.values()) == 1
  estimates: dict[str, dict[str, Estimate]] = {}
  for method, scores in mats.items():
    p, ci = _interval_estimates(scores, _aggregate_fn, reps, seed, task_bootstrap, confidence)
    estimates[method] = {name: Estimate(float(p[i]), float(ci[0, i]), float(ci[1, i]))
                         for i, name in enumerate(AGGREGATES)}
  return AggregateTable(estimates=estimates, num_games=num_games.pop(), runs=runs, reps=reps,
                        seed=seed, task_bootstrap=bool(task_bootstrap), confidence=confidence)


def aggregate_by_runs(score_matrices: Mapping[str, np.ndarray], reps: int = 2000,
                      seed: int = 0, confidence: float = 0.95) -> list[AggregateTable]:
  """`aggregate` with the CIs each method's runs allow: over runs within each game for the
  methods with >= 2 runs, over games for those with 1 (one table per kind, in that order; empty
  kinds left out). `aggregate(task_bootstrap=None)` resamples games for every method as soon as
  one has a single run, which widens the CIs of the methods that have seeds."""
  groups = [({m: s for m, s in score_matrices.items() if np.shape(s)[0] > 1}, False),
            ({m: s for m, s in score_matrices.items() if np.shape(s)[0] == 1}, True)]
  return [aggregate(g, reps=reps, seed=seed, task_bootstrap=task, confidence=confidence)
          for g, task in groups if g]


def performance_profiles(score_matrices: Mapping[str, np.ndarray], taus: np.ndarray,
                         reps: int = 2000, seed: int = 0,
                         task_bootstrap: Optional[bool] = None, confidence: float = 0.95
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Score distributions (fraction of runs x games with normalized score > tau) with CIs.

  Returns ({method: float [T]}, {method: float [2, T]} lower/upper), seeded like `aggregate`.
  `task_bootstrap=None` resamples games too for each method that has a single run, and only for
  it (a method's profile and CI never depend on the other methods).
  """
  from rliable import library
  taus = np.asarray(taus, np.float64)
  mats = {m: _check_matrix(s) for m, s in score_matrices.items()}
  profile_fn: Callable[[np.ndarray], np.ndarray] = (
      lambda x: library.score_distributions(x, taus))
  profiles, cis = {}, {}
  for method, scores in mats.items():
    task = scores.shape[0] == 1 if task_bootstrap is None else task_bootstrap
    profiles[method], cis[method] = _interval_estimates(
        scores, profile_fn, reps, seed, task, confidence)
  return profiles, cis


def _interval_estimates(scores, fn, reps, seed, task_bootstrap, confidence):
  """rliable's stratified bootstrap of `fn` on one [runs, games] matrix, seeded.

  rliable 1.2's `StratifiedBootstrap.update_indices` draws from numpy's GLOBAL RNG (its
  `random_state` only reaches arch), so the global RNG is seeded here and restored afterwards.
  """
  import warnings
  from rliable import library
  saved = np.random.get_state()
  np.random.seed(seed)
  try:
    with warnings.catch_warnings():
      # rliable 1.2 passes arch 7 the (deprecated, still honoured) `random_state=` keyword.
      warnings.filterwarnings('ignore', message='random_state is deprecated',
                              category=FutureWarning)
      points, cis = library.get_interval_estimates(
          {'m': scores}, fn, reps=reps, task_bootstrap=task_bootstrap,
          confidence_interval_size=confidence, random_state=np.random.RandomState(seed))
  finally:
    np.random.set_state(saved)
  return points['m'], cis['m']


def format_table(table: AggregateTable) -> str:
  """A plain-text table (percent of human; 95% CI in brackets) for the terminal."""
  rows = [['Method', 'Runs'] + list(AGGREGATES)]
  for method, est in table.estimates.items():
    rows.append([method, str(table.runs[method])] + [est[a].format() for a in AGGREGATES])
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines) + '\n' + _footnote(table)


def markdown_table(table: AggregateTable) -> str:
  head = '| Method | Runs | ' + ' | '.join(AGGREGATES) + ' |'
  sep = '|' + '---|' * (len(AGGREGATES) + 2)
  body = [f'| {m} | {table.runs[m]} | ' + ' | '.join(e[a].format() for a in AGGREGATES) + ' |'
          for m, e in table.estimates.items()]
  return '\n'.join([head, sep] + body) + '\n\n' + _footnote(table)


# Below this many runs per game, a bootstrap over runs within each game resamples so few values
# per game that its percentile intervals tend to be too narrow: the footnote says so.
FEW_RUNS = 5


def _footnote(table: AggregateTable) -> str:
  few = min(table.runs.values()) if table.runs else 0
  caution = (f' With {few} run{"s" if few != 1 else ""} per game (fewer than {FEW_RUNS}), these '
             'intervals are likely too narrow.' if not table.task_bootstrap and few < FEW_RUNS
             else '')
  return (f'Human-normalized scores in percent over {table.num_games} games; '
          f'{table.confidence:.0%} stratified-bootstrap CIs ({table.reps} reps over '
          f'{table.ci_over}, '
          f'seed {table.seed}). Optimality gap: lower is better.{caution}\n')

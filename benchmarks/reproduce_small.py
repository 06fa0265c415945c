"""A CPU-scale reproduction of the paper's claims (issue 7): Scaled QL vs its baselines/ablations.

    # The short check (a few minutes): 2 games, 2 methods, 1 seed, few steps
    .venv/bin/python benchmarks/reproduce_small.py --out runs/reproduce_short \\
        --games Breakout,Freeway --methods scaled_ql,bc --seeds 0 --steps 300 --eval-steps 1000
    # Flawed data on its 6 games (FLAWED_GAMES), 16 episodes per split, each run scored over 4
    # checkpoints of its second half (about 45 minutes per seed on 2 cores: BUILD_NOTES.md)
    .venv/bin/python benchmarks/reproduce_small.py --out runs/reproduce_flawed \\
        --data-dir data/reproduce_flawed --weak-episodes flawed \\
        --episodes-per-checkpoint 16 --methods scaled_ql,bc --seeds 0,1 --steps 12000 \\
        --late-checkpoints 4 --eval-steps 5400 --eval-envs 3 --minutes-per-run 40
    # ... and the paper's network (feature norm) with BC on the same network, same flags:
    #     --methods feature_norm,bc_feature_norm --seeds 0,1,2   (docs/learning.md, 2026-12-04)
    # The ~1 hour run on 2 cores (see BUILD_NOTES.md, baselines section for the budget it used)
    .venv/bin/python benchmarks/reproduce_small.py --out runs/reproduce_small \\
        --methods scaled_ql,bc,no_cql,mse,feature_norm,bcq --seeds 0,1,2 --steps 4000

What it does, top to bottom:
1. Data: the local generator (`scaled_ql.datasets.generate`, real emulator, scripted policies with
   epsilon falling over the "checkpoints" of a DQN-Replay-like run) writes `--checkpoints` splits
   of `--steps-per-checkpoint` agent steps (or `--episodes-per-checkpoint` episodes) per game
   into `--data-dir` (skipped when present); `--weak-episodes flawed` plays the weaker episodes
   with the game's flawed script (docs/data_generation.md). Training reads the `suboptimal`
   selection: the first 20% of the checkpoints, as in the paper.
2. Behaviour policy: the mean raw (unclipped) return of the episodes in those splits (from the
   generator's `generation_info.json`; an episode cut by a split's step budget is left out unless
   it is the split's only one), human-normalized.
3. Every method x seed runs through the real program (`scaled_ql.launch.program`: Reverb replay +
   inserters, the Learner node, the variable server, an evaluator node; one Ray session for the
   whole benchmark, programs one after another) for `--steps` learner steps (or until
   `--minutes-per-run`), and its evaluator evaluates the final params (`--eval-steps` agent steps
   per game x `--eval-envs`, epsilon 0.001). With `--late-checkpoints K` the run keeps K
   checkpoints evenly spaced over its second half and scores their mean per game (the K-1
   earlier ones are evaluated in this process after the program ends): one checkpoint's score
   is a draw. The config is `cpu_small` (network, batch and
   optimizer; `--batch-size`, `--learning-rate`, `--target-update-period` change them) on
   `--games`, plus the method's variant (`scaled_ql.configs.VARIANTS`).
4. Aggregates with rliable (`scaled_ql.eval.metrics`): IQM / median / mean / optimality gap of
   human-normalized scores with 95% stratified-bootstrap CIs over seeds (over games, in a table
   of their own, for the methods with one run: `--ablation-seeds`), a performance profile
   PNG, per-game raw scores, and a check of the paper's claims, written to OUT/results.md and
   printed.

A finished run leaves OUT/runs/<method>_seed<s>/result.json and is not run again (so an
interrupted benchmark resumes); an unfinished one is started afresh.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time

import numpy as np

from scaled_ql import configs
from scaled_ql import games as games_lib

# Method name -> (label, the scaled_ql.configs.VARIANTS applied to cpu_small, in order).
METHODS = {
    'scaled_ql': ('Scaled QL', ()),
    'bc': ('BC', ('bc',)),
    'bcq': ('BCQ (tau 0.3)', ('bcq',)),
    'no_cql': ('Scaled QL, no CQL', ('no_cql',)),
    'mse': ('Scaled QL, MSE TD', ('mse',)),
    'no_feature_norm': ('Scaled QL, no feature norm', ('no_feature_norm',)),
    # cpu_small's network runs WITHOUT feature norm (docs/learning.md); this arm puts it back,
    # so at this scale the feature-norm claim compares this arm with Scaled QL.
    'feature_norm': ('Scaled QL + feature norm (paper)', ('feature_norm',)),
    # BC on the feature-norm network: the same-network baseline of the arm above.
    'bc_feature_norm': ('BC + feature norm', ('bc', 'feature_norm')),
    'mean_pool': ('Scaled QL, mean pool', ('mean_pool',)),
}
BEHAVIOUR = 'Behaviour policy (data)'
# The paper's six-game ablation set (games.ABLATION_GAMES_6) with Boxing for Asterix, which has no
# scripted policy (docs/data_generation.md).
DEFAULT_GAMES = ('Breakout', 'Boxing', 'Pong', 'Qbert', 'Seaquest', 'SpaceInvaders')
# With --weak-episodes flawed: the scripted games whose flawed script errs in the script's own
# states AND loses points under the evaluation protocol (no sticky actions, epsilon 0.001), so
# the data holds the better action there as a minority and using it shows in the score
# (docs/data_generation.md, "Which games' flaws count"). Seaquest's and RoadRunner's flaws cost
# nothing there; Breakout's is not played in closed loop by this network (docs/learning.md).
FLAWED_GAMES = ('Atlantis', 'BeamRider', 'Boxing', 'Centipede', 'Freeway', 'SpaceInvaders')

def make_config(method: str, seed: int, args) -> configs.ExperimentConfig:
  """cpu_small + the method's variants, sized for this benchmark."""
  from scaled_ql.datasets import rlds_reader
  base = configs.get_config('cpu_small')
  for variant in METHODS[method][1]:
    base = configs.VARIANTS[variant](base)
  agent = {k: v for k, v in dict(
      games_per_batch=args.batch_size // 4 if args.batch_size else None,
      target_update_period=args.target_update_period,
      learning_rate=args.learning_rate).items() if v is not None}
  spacing = _spacing(args)
  return base.replace(
      name=f'reproduce_{method}_seed{seed}', games=tuple(args.games), agent=agent,
      # The table holds the whole selected data (about 20% of the generated steps) ~3 times: data
      # that fits twice is inserted until the table is full and then not streamed again
      # (reverb_tables.InsertThrottle, "resident"), so no inserter takes CPU from the learner.
      data=dict(data_dir=args.data_dir, selection='suboptimal',
                shuffle_buffer_per_game=args.shuffle_buffer_per_game or max(
                    1_000, 3 * rlds_reader.num_suboptimal_checkpoints(args.checkpoints)
                    * args.steps_per_checkpoint),
                min_fill_per_game=min(1_000, args.steps_per_checkpoint or 1_000)),
      # Only the final params matter here: no periodic evaluation while the learner trains
      # (the evaluator still plays the freshly initialized params once at the start).
      eval=dict(steps_per_game=args.eval_steps, num_envs=args.eval_envs, num_evaluators=1,
                eval_every_seconds=1e9),
      # --late-checkpoints K > 1: a checkpoint kept at each step that `late_steps` evaluates.
      train=dict(num_steps=args.steps, seed=seed, log_every_steps=100,
                 checkpoint_every_steps=spacing, publish_every_steps=100,
                 keep_checkpoint_every_steps=spacing if args.late_checkpoints > 1 else None))


def late_steps(steps: int, k: int) -> list[int]:
  """The checkpoint steps whose scores a run reports (their mean per game): `k` steps evenly
  spaced over the second half of a `steps`-step run, the last one `steps` itself.

  One checkpoint's score is a draw: on the flawed Boxing data it swings from -2 to 70 within
  2000 steps (docs/learning.md), so a late-training mean says more about a method than the
  final step alone."""
  if k < 1 or steps < 1:
    raise ValueError(f'need steps >= 1 and k >= 1, got {steps}, {k}')
  if k == 1:
    return [steps]
  if steps % (2 * k):
    raise ValueError(f'--steps {steps} must be a multiple of 2 x --late-checkpoints = {2 * k}')
  spacing = steps // (2 * k)
  return [steps - i * spacing for i in reversed(range(k))]


def _spacing(args) -> int:
  steps = late_steps(args.steps, args.late_checkpoints)
  return steps[1] - steps[0] if len(steps) > 1 else max(args.steps, 1)


def mean_scores(per_step: dict[int, dict[str, float | None]], games) -> dict[str, float]:
  """{game: mean of its scores over the evaluated steps} ({step: {game: score or None}}; None:
  no episode completed at that step, which fails: a mean over the other steps would not be the
  late-training mean the report labels it)."""
  out = {}
  for g in games:
    missing = [st for st, row in per_step.items() if row.get(g) is None]
    if missing:
      raise ValueError(f'{g}: no completed evaluation episode at step(s) {missing}')
    out[g] = float(np.mean([row[g] for row in per_step.values()]))
  return out


# ---------------------------------------------------------------------------------------- data
def ensure_data(args) -> None:
  from scaled_ql.datasets import generate, policies
  t0 = time.time()
  generate.generate(args.games, args.data_dir, num_checkpoints=args.checkpoints,
                    steps_per_checkpoint=args.steps_per_checkpoint, seed=0, if_exists='skip',
                    episodes_per_checkpoint=args.episodes_per_checkpoint,
                    skill=policies.SkillSchedule(weak=args.weak_episodes),
                    progress=False, workers=generate.default_workers())
  print(f'[data] {args.data_dir}: {", ".join(args.games)} ready in {time.time() - t0:.0f}s',
        flush=True)


def behaviour_scores(args) -> dict[str, dict]:
  """{game: {score, episodes, splits}}: mean raw return of the suboptimal splits' episodes."""
  from scaled_ql.datasets import generate, tfds_layout
  out = {}
  for game in args.games:
    path = os.path.join(args.data_dir, tfds_layout.ORDERED_BUILDER,
                        tfds_layout.config_name(game, 1))
    infos = [os.path.join(root, tfds_layout.GENERATION_INFO_FILE)
             for root, _, files in os.walk(path) if tfds_layout.GENERATION_INFO_FILE in files]
    if not infos:
      raise FileNotFoundError(f'{path}: no {tfds_layout.GENERATION_INFO_FILE}; the behaviour '
                              'score needs data written by scaled_ql.datasets.generate')
    with open(infos[0]) as f:
      info = json.load(f)
    # The generator's own summary: completed episodes only (scaled_ql.datasets.generate.behaviour).
    sub = generate.behaviour(game, info['splits'])['selections']['suboptimal']
    if sub['score'] is None:
      raise ValueError(f'{game}: no completed episode in the suboptimal splits {sub["splits"]}')
    out[game] = dict(score=sub['score'], episodes=sub['episodes'], splits=sub['splits'])
  return out


# ---------------------------------------------------------------------------------------- runs
def run_one(method: str, seed: int, args) -> dict:
  """Trains + evaluates one (method, seed) through the real program; returns its result."""
  from scaled_ql.launch import program, run
  cfg = make_config(method, seed, args)
  workdir = os.path.join(args.out, 'runs', f'{method}_seed{seed}')
  result_path = os.path.join(workdir, 'result.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      result = json.load(f)
    print(f'[run] {method} seed {seed}: done before (step {result["steps"]})', flush=True)
    return result
  if os.path.isdir(workdir):
    shutil.rmtree(workdir)  # an unfinished run starts afresh
  run.prepare_workdir(cfg, workdir)
  t0 = time.time()
  last = [0.0]

  def log(line: str) -> None:
    if time.time() - last[0] >= args.log_every_s:
      last[0] = time.time()
      print(f'[run] {method} seed {seed}: {line}', flush=True)

  prog = program.build(cfg, workdir, num_evaluators=1, num_steps=cfg.train.num_steps)
  status = program.run(prog, log=log, timeout_s=args.minutes_per_run * 60,
                       final_eval_timeout_s=600)
  steps = int(status.learner['steps']) if status and status.learner else 0
  scores = status.latest_scores() if status else {}
  missing = [g for g in cfg.games if g not in scores or scores[g]['param_version'] != steps]
  if missing:
    raise RuntimeError(f'{method} seed {seed}: no final evaluation (step {steps}) of {missing}; '
                       f'see {workdir}/logs and {workdir}/eval')
  per_step = {steps: {g: scores[g]['score'] for g in cfg.games}}
  episodes = {g: scores[g]['episodes'] for g in cfg.games}
  if args.late_checkpoints > 1:
    if steps != args.steps:
      raise RuntimeError(f'{method} seed {seed}: stopped at step {steps} of {args.steps} '
                         '(--minutes-per-run); its late checkpoints are not the planned ones')
    for step, row in evaluate_checkpoints(cfg, workdir, late_steps(steps, args.late_checkpoints)
                                          [:-1], seed).items():
      per_step[step] = {g: r.score for g, r in row.items()}
      for g, r in row.items():
        episodes[g] += r.episodes
    per_step = dict(sorted(per_step.items()))
  try:
    mean = mean_scores(per_step, cfg.games)
  except ValueError as e:
    raise RuntimeError(f'{method} seed {seed}: {e}; see {workdir}') from e
  from scaled_ql.eval import normalization
  result = dict(method=method, seed=seed, steps=steps, seconds=round(time.time() - t0, 1),
                scores=mean, scores_by_step={str(k): v for k, v in per_step.items()},
                normalized={g: normalization.human_normalized(g, mean[g]) for g in cfg.games},
                episodes=episodes, metrics=status.learner.get('metrics', {}))
  with open(result_path, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'[run] {method} seed {seed}: {steps} steps in {result["seconds"]:.0f}s; '
        + ' '.join(f'{g}={s:.1f}' for g, s in result['scores'].items()), flush=True)
  return result


def evaluate_checkpoints(cfg, workdir: str, steps: list[int], seed: int) -> dict[int, dict]:
  """{step: {game: GameResult}}: the run's kept checkpoints at `steps`, evaluated in this
  process as the program's evaluator evaluates the final params (the config's eval protocol,
  --eval-steps per game x --eval-envs)."""
  from scaled_ql.agents import actors, checkpointing
  from scaled_ql.eval import evaluator
  policy = actors.make_policy(cfg, cfg.eval.epsilon)
  out = {}
  for step in steps:
    _, params, got = checkpointing.load_params(workdir, step=step)
    out[got] = evaluator.evaluate(policy, params, cfg.games, cfg.eval, seed=seed + 1_000 * step,
                                  param_version=got, evaluator='reproduce_small',
                                  epsilon=cfg.eval.epsilon)
    print(f'[run] {cfg.name}: checkpoint {got}: ' + ' '.join(
        f'{g}={r.score if r.score is None else round(r.score, 1)}' for g, r in out[got].items()),
        flush=True)
  return out


MAIN_PAIR = ('scaled_ql', 'bc')  # the target's comparison: every seed of --seeds


def seeds_of(method: str, args) -> list[int]:
  return args.seeds if method in MAIN_PAIR else args.ablation_seeds


def finished_runs(args) -> list[dict]:
  """The result.json of every finished (method, seed) of args.methods x args.seeds in OUT."""
  out = []
  for seed in args.seeds:
    for method in args.methods:
      if seed not in seeds_of(method, args):
        continue
      path = os.path.join(args.out, 'runs', f'{method}_seed{seed}', 'result.json')
      if os.path.exists(path):
        with open(path) as f:
          out.append(json.load(f))
  return out


# ------------------------------------------------------------------------------------- report
CLAIMS = [
    # (claim, the method that should score higher, the one it is compared with)
    ('Scaled QL beats BC (same network, same data)', 'scaled_ql', 'bc'),
    ('pessimism helps: Scaled QL beats alpha = 0', 'scaled_ql', 'no_cql'),
    ('C51 helps: Scaled QL beats MSE TD', 'scaled_ql', 'mse'),
    ('feature normalization helps', 'scaled_ql', 'no_feature_norm'),
    ('feature normalization helps (CPU base has none; this arm adds it)', 'feature_norm',
     'scaled_ql'),
    ('Scaled QL beats BC on the feature-norm network (same network, same data)', 'feature_norm',
     'bc_feature_norm'),
    ('Scaled QL beats discrete BCQ', 'scaled_ql', 'bcq'),
    ('learned spatial embedding beats mean pooling', 'scaled_ql', 'mean_pool'),
]
# The arms whose IQM is held against 1.5x the behaviour's: Scaled QL on cpu_small's network and
# on the paper's (with feature norm).
RATIO_ARMS = ('scaled_ql', 'feature_norm')


TARGET_SEEDS = 3  # the learning target's CIs are over >= 3 seeds


def _seeds_note(runs: int) -> str:
  return '' if runs >= TARGET_SEEDS else f'; {runs} runs: the target asks for >= {TARGET_SEEDS}'


def _verdict(a, b, single_run: str = '', runs: int = TARGET_SEEDS) -> str:
  """a, b: IQM Estimates of the method claimed better and of the other. `single_run`: the label
  of a side that has one run while the other has several: their CIs resample different things
  (games / runs within each game), so only the point estimates are compared. `runs`: the fewer
  runs of the two (named when below the target's 3 seeds)."""
  if single_run:
    return (('holds' if a.point > b.point else 'does NOT hold')
            + f' (point estimates only: {single_run} has 1 run, no CI over seeds)')
  if a.point > b.point:
    return ('holds (95% CIs disjoint' if a.lower > b.upper
            else 'point estimate only (CIs overlap') + _seeds_note(runs) + ')'
  return ('does NOT hold' + (' (CIs disjoint' if a.upper < b.lower else ' (CIs overlap')
          + _seeds_note(runs) + ')')


def _ratio_verdict(est, data_iqm: float, runs: int) -> str:
  """A method's IQM `est` against 1.5x the data's, `data_iqm`: the IQM of the data's per-game
  scores taken as `runs` identical runs, so that both IQMs trim a matrix of the same shape. The
  data is one fixed set of episodes: its score does not vary over seeds, so the claim holds when
  the method's whole 95% CI (over its runs) is at or above 1.5x it. With the data at or below
  random (IQM <= 0) there is no ratio to claim."""
  gap = f'{100 * (est.point - data_iqm):+.1f} points from the data'
  if data_iqm <= 0:
    return (f'no ratio: the data\'s IQM is {100 * data_iqm:.1f}% <= 0 (random or worse); {gap} '
            '-> undefined')
  ratio = f'ratio {est.point / data_iqm:.2f}x'
  if runs < 2:
    return (f'{ratio} -> {"holds" if est.point >= 1.5 * data_iqm else "does NOT hold"} (point '
            'estimate only: 1 run, no CI over seeds)')
  if est.lower >= 1.5 * data_iqm:
    verdict = 'holds (its 95% CI is at or above 1.5x the data\'s IQM'
  elif est.point >= 1.5 * data_iqm:
    verdict = 'point estimate only (its 95% CI reaches below 1.5x the data\'s IQM'
  else:
    verdict = 'does NOT hold (the point estimate is below 1.5x the data\'s IQM'
  return f'{ratio} -> {verdict}{_seeds_note(runs)})'


def report(results: list[dict], behaviour: dict[str, dict], args, wall_s: float) -> str:
  from scaled_ql.eval import metrics, normalization, plots
  games = tuple(args.games)
  cfg = make_config('scaled_ql', 0, args)
  methods = [m for m in args.methods if any(r['method'] == m for r in results)]
  label = {m: METHODS[m][0] for m in methods}
  mats = {}
  for m in methods:
    rows = sorted((r for r in results if r['method'] == m), key=lambda r: r['seed'])
    mats[label[m]] = np.array([[normalization.human_normalized(g, r['scores'][g]) for g in games]
                               for r in rows])
  # --ablation-seeds 0: the 1-run methods get a table of their own, so that they do not widen
  # Scaled QL's and BC's CIs into a resampling of games.
  tables = metrics.aggregate_by_runs(mats, reps=args.reps, seed=0)
  behaviour_norm = np.array([[normalization.human_normalized(g, behaviour[g]['score'])
                              for g in games]])
  # One "run" (the data): its CI resamples games.
  behaviour_table = metrics.aggregate({BEHAVIOUR: behaviour_norm}, reps=args.reps, seed=0,
                                      task_bootstrap=True)
  taus = np.linspace(0.0, args.tau_max, 81)
  profiles, cis = metrics.performance_profiles(
      {**mats, BEHAVIOUR: behaviour_norm}, taus, reps=args.reps, seed=0, task_bootstrap=True)
  png = plots.performance_profile_png(
      os.path.join(args.out, 'performance_profile.png'), profiles, cis, taus,
      title=f'{len(games)} games, {len(args.seeds)} seed(s), {args.steps} learner steps')
  with open(os.path.join(args.out, 'scores.csv'), 'w', newline='') as f:
    w = csv.writer(f, lineterminator='\n')
    w.writerow(['method', 'game', 'score', 'seed', 'steps'])
    for r in results:
      for g in games:
        w.writerow([label[r['method']], g, r['scores'][g], r['seed'], r['steps']])
    for g in games:
      w.writerow([BEHAVIOUR, g, behaviour[g]['score'], 0, 0])

  iqm = {name: est['IQM'] for t in tables for name, est in t.estimates.items()}
  runs = {name: n for t in tables for name, n in t.runs.items()}
  b_iqm = behaviour_table.estimates[BEHAVIOUR]['IQM']
  lines = [f'# Scaled QL vs baselines at CPU scale ({len(games)} games, sub-optimal data)', '',
           f'Command: `{" ".join([os.path.relpath(sys.executable)] + sys.argv)}`', '',
           ('Report rebuilt with --report-only from finished runs (no run in this invocation); '
            if args.report_only else f'Wall time of this invocation {wall_s / 60:.1f} min; ')
           + f'the {len(results)} runs took '
           f'{sum(r["seconds"] for r in results) / 60:.1f} min in all (learner start to final '
           f'evaluation) on {os.cpu_count()} CPU cores; report written '
           f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}. Data: '
           f'{args.checkpoints} checkpoints x '
           + (f'{args.episodes_per_checkpoint} episodes' if args.episodes_per_checkpoint else
              f'{args.steps_per_checkpoint} agent steps') + ' per game, weak episodes '
           f'{args.weak_episodes}, '
           f'training on the first 20% ({", ".join(behaviour[games[0]]["splits"])}: a mixture of '
           f'scripted policies of rising skill, scaled_ql.datasets.policies.SkillSchedule). cpu_small\'s network '
           f'({_num_params(cfg)} params), batch {cfg.agent.batch_size}, '
           f'lr {cfg.agent.learning_rate:g}, target update every {cfg.agent.target_update_period} steps, '
           f'{args.steps} learner steps (runs cut at {args.minutes_per_run:g} min), evaluation '
           f'{args.eval_steps} agent steps per game x {args.eval_envs} env(s), epsilon 0.001'
           + (f'; a run\'s score is the mean over its checkpoints at steps '
              f'{", ".join(map(str, late_steps(args.steps, args.late_checkpoints)))}'
              if args.late_checkpoints > 1 else '; a run\'s score is its final params\'')
           + '.', '',
           '## Human-normalized aggregates (%), 95% CIs', '',
           '\n\n'.join(metrics.markdown_table(t).rstrip() for t in tables), '',
           f'{BEHAVIOUR}: IQM {b_iqm.format()}, median '
           f'{behaviour_table.estimates[BEHAVIOUR]["Median"].format()}, mean '
           f'{behaviour_table.estimates[BEHAVIOUR]["Mean"].format()} (one data set; its CI '
           'resamples games).', '',
           '![performance profile](performance_profile.png)', '',
           '## Mean raw score per game (mean over seeds; std in brackets)', '',
           '| method | ' + ' | '.join(games) + ' | learner steps |',
           '|---|' + '---|' * (len(games) + 1)]
  for m in methods:
    rows = [r for r in results if r['method'] == m]
    cells = []
    for g in games:
      s = np.array([r['scores'][g] for r in rows])
      cells.append(f'{s.mean():.1f} ({s.std():.1f})')
    steps = sorted({r['steps'] for r in rows})
    lines.append(f'| {label[m]} | ' + ' | '.join(cells) + f' | {",".join(map(str, steps))} |')
  lines.append(f'| {BEHAVIOUR} | ' + ' | '.join(
      f'{behaviour[g]["score"]:.1f} ({behaviour[g]["episodes"]} ep.)' for g in games) + ' | - |')
  lines.append('| (random / human) | ' + ' | '.join(
      f'{normalization.RANDOM_SCORES[g]:g} / {normalization.HUMAN_SCORES[g]:g}' for g in games)
      + ' | |')
  lines += ['', '## The paper\'s claims at this scale', '']
  for arm in RATIO_ARMS:
    name = METHODS[arm][0]
    est = iqm.get(name)
    if est is None:
      continue
    # The data's IQM on the method's matrix shape (its scores repeated to the method's runs):
    # rliable's IQM trims int(25% of runs x games) from each end, so a 1 x 6 and a 3 x 6 matrix
    # of the same scores have different IQMs.
    data_iqm = metrics.iqm(np.repeat(behaviour_norm, runs[name], axis=0))
    lines.append(f'- {name} >= 1.5x the behaviour policy\'s IQM: '
                 f'{_ratio_verdict(est, data_iqm, runs[name])} ({est.format()}; the data '
                 f'{100 * data_iqm:.1f} as {runs[name]} run(s)).')
  for claim, better, other in CLAIMS:
    if better in methods and other in methods:
      a, b = METHODS[better][0], METHODS[other][0]
      pair = {n: runs[n] for n in (a, b)}
      single = next((n for n, k in pair.items() if k == 1), '') if max(pair.values()) > 1 else ''
      lines.append(f'- {claim}: {_verdict(iqm[a], iqm[b], single, min(pair.values()))} (IQM '
                   f'{iqm[a].format()} vs {iqm[b].format()}).')
  lines += ['', f'Files: `scores.csv` (raw scores per method/game/seed), `{os.path.basename(png)}`,'
            ' `runs/<method>_seed<s>/` (each run\'s workdir: config, checkpoint, eval log, '
            'learner metrics, result.json).', '']
  md = '\n'.join(lines)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(md)
  return md


def _num_params(cfg) -> str:
  import jax
  from scaled_ql.agents import builder
  nets = builder.agent_networks(cfg)
  shapes = jax.eval_shape(lambda: nets.q.init(jax.random.PRNGKey(0), *builder.dummy_inputs()))
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  return f'{n / 1e6:.2f}M'


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--out', default='runs/reproduce_small', help='output folder')
  p.add_argument('--data-dir', default='data/reproduce_small', help='TFDS data dir (generated '
                 'there when missing)')
  p.add_argument('--games', default=None,
                 help=f'comma-separated (default: {",".join(DEFAULT_GAMES)}; with --weak-episodes '
                 f'flawed: {",".join(FLAWED_GAMES)})')
  p.add_argument('--methods', default='scaled_ql,bc,no_cql,mse,feature_norm',
                 help=f'comma-separated, of {", ".join(METHODS)}')
  p.add_argument('--extra-methods', default='',
                 help='methods run only after every seed of --methods (e.g. bcq if time allows)')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--ablation-seeds', default=None,
                 help='seeds of the methods other than scaled_ql and bc (default: --seeds), '
                      'e.g. 0 to fit the ablations into the budget once the main pair has 3')
  p.add_argument('--steps', type=int, default=3000, help='learner steps per run')
  p.add_argument('--minutes-per-run', type=float, default=10.0,
                 help='hard cap per run; the final evaluation then uses the params reached')
  p.add_argument('--batch-size', type=int, default=None,
                 help="a multiple of 4 (default: cpu_small's, 64 games x 4)")
  p.add_argument('--target-update-period', type=int, default=None, help="default: cpu_small's")
  p.add_argument('--learning-rate', type=float, default=None,
                 help="Adam learning rate (default: cpu_small's)")
  p.add_argument('--checkpoints', type=int, default=10, help='generated splits per game')
  budget = p.add_mutually_exclusive_group()
  budget.add_argument('--steps-per-checkpoint', type=int, default=None,
                      help='agent steps per generated split (default 5000)')
  budget.add_argument('--episodes-per-checkpoint', type=int, default=None,
                      help='whole episodes per generated split instead of a step budget')
  p.add_argument('--weak-episodes', choices=('noisy', 'flawed'), default='noisy',
                 help="how the data's weaker episodes play (scaled-ql data generate "
                 '--weak-episodes; docs/data_generation.md)')
  p.add_argument('--shuffle-buffer-per-game', type=int, default=None,
                 help='replay table size per game (default: 3 x the selected steps with '
                 '--steps-per-checkpoint, 60000 with --episodes-per-checkpoint)')
  p.add_argument('--late-checkpoints', type=int, default=1,
                 help='K: a run scores the mean of its checkpoints at K steps evenly spaced over '
                 'the second half of training (1: the final params only)')
  p.add_argument('--eval-steps', type=int, default=3000, help='agent steps per game')
  p.add_argument('--eval-envs', type=int, default=1)
  p.add_argument('--reps', type=int, default=2000, help='bootstrap repetitions')
  p.add_argument('--tau-max', type=float, default=1.5)
  p.add_argument('--log-every-s', type=float, default=20.0)
  p.add_argument('--report-only', action='store_true',
                 help='run nothing: aggregate the runs already finished in OUT')
  args = p.parse_args(argv)
  if args.games is None:
    args.games = ','.join(FLAWED_GAMES if args.weak_episodes == 'flawed' else DEFAULT_GAMES)
  args.games = games_lib.check_games([g for g in args.games.split(',') if g], '--games')
  args.core_methods = [m for m in args.methods.split(',') if m]
  args.extra_methods = [m for m in args.extra_methods.split(',')
                        if m and m not in args.core_methods]
  args.methods = args.core_methods + args.extra_methods
  unknown = [m for m in args.methods if m not in METHODS]
  if unknown:
    p.error(f'--methods: unknown {unknown}; valid: {", ".join(METHODS)}')
  try:
    args.seeds = [int(s) for s in args.seeds.split(',') if s]
  except ValueError:
    p.error(f'--seeds must be comma-separated integers, got {args.seeds!r}')
  if not args.seeds:
    p.error('--seeds: give at least one seed')
  try:
    args.ablation_seeds = (args.seeds if args.ablation_seeds is None else
                           [int(s) for s in args.ablation_seeds.split(',') if s])
  except ValueError:
    p.error(f'--ablation-seeds must be comma-separated integers, got {args.ablation_seeds!r}')
  if args.steps_per_checkpoint is None and args.episodes_per_checkpoint is None:
    args.steps_per_checkpoint = 5000
  if args.shuffle_buffer_per_game is None and args.episodes_per_checkpoint is not None:
    args.shuffle_buffer_per_game = 60_000  # held the 32 Boxing bouts of a 16-bout split's slice
  for name in ('steps', 'eval_steps', 'eval_envs', 'checkpoints', 'steps_per_checkpoint',
               'episodes_per_checkpoint', 'shuffle_buffer_per_game', 'late_checkpoints',
               'reps', 'target_update_period'):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      p.error(f'--{name.replace("_", "-")} must be >= 1')
  if args.learning_rate is not None and args.learning_rate <= 0:
    p.error(f'--learning-rate must be > 0, got {args.learning_rate}')
  if args.batch_size is not None and (args.batch_size < 4 or args.batch_size % 4):
    p.error(f'--batch-size must be a positive multiple of 4, got {args.batch_size}')
  if args.eval_steps % args.eval_envs:
    p.error('--eval-steps must be a multiple of --eval-envs')
  try:
    late_steps(args.steps, args.late_checkpoints)
  except ValueError as e:
    p.error(str(e))
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  started = time.time()
  os.makedirs(args.out, exist_ok=True)
  for m in args.methods:  # every config is valid before anything runs
    from scaled_ql.agents import builder
    from scaled_ql.launch import run
    cfg = make_config(m, args.seeds[0], args)
    builder.check_agent_config(cfg)
    run.validate(cfg)
  ensure_data(args)
  behaviour = behaviour_scores(args)
  print('[behaviour] ' + ' '.join(f'{g}={b["score"]:.1f} ({b["episodes"]} ep.)'
                                  for g, b in behaviour.items()), flush=True)
  if args.report_only:
    results = finished_runs(args)
    if not results:
      print(f'--report-only: no finished run in {args.out}/runs', file=sys.stderr)
      return 1
  else:
    import ray
    from scaled_ql.launch import run as run_lib
    run_lib.start_local_ray(max(4, os.cpu_count() or 1), run_lib.node_environment(),
                            log_to_driver=False)
    results = []
    try:
      # Seed-major: a cut-short benchmark still has every method; --extra-methods come last.
      for method_list in (args.core_methods, args.extra_methods):
        for seed in args.seeds:
          for method in method_list:
            if seed in seeds_of(method, args):
              results.append(run_one(method, seed, args))
    finally:
      ray.shutdown()
  md = report(results, behaviour, args, time.time() - started)
  print('\n' + md)
  return 0


if __name__ == '__main__':
  sys.exit(main())

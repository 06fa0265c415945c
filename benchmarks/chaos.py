"""Chaos benchmark (issue 12): kill -9 a random node every N seconds during a `cpu_tiny` run.

    flock /tmp/scaled_ql_heavy.lock .venv/bin/python benchmarks/chaos.py --minutes 6 --kill-every 40

The kills are spaced like preemptions on a cluster, not a crash loop: the victims go round a
shuffled cycle of the node kinds (learner, replay, inserter, evaluator, variable shard), so with
the defaults no node is killed more than twice in the run, below the program's crash-loop budget
(`train.crash_loop_restarts` within `train.crash_loop_window_s`). Each kill is a real SIGKILL of
the node's process (its pid from Ray's GCS), not `ray.kill`.

After the kill phase the run goes on until the learner has taken 3 checkpoint intervals past the
last restart (or `--steps`, if given, are done), then ends normally: final checkpoint, final
evaluation, every node stopped. Reported:
- kills survived: the node came back (a new process, Ray's state ALIVE) and the program went on;
- learner steps lost per learner kill: learner step in the last status before the kill minus the
  checkpoint step the restarted learner resumed from (at most one checkpoint interval + the steps
  taken between that status and the kill, a status poll being every 2 s);
- evaluator rows lost: rows of a round in progress when its evaluator was killed (the restarted
  evaluator evaluates the newest params instead) and torn JSONL lines;
- whether the run finished, and the processes of the run left after Ray shut down (by an
  environment tag every process of the run inherits).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid

TAG_VAR = 'SCALED_QL_CHAOS_TAG'


def _tagged_processes(tag: str) -> list[int]:
  pids = []
  for pid in os.listdir('/proc'):
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      with open(f'/proc/{pid}/environ', 'rb') as f:
        if f'{TAG_VAR}={tag}'.encode() in f.read():
          pids.append(int(pid))
    except OSError:
      continue
  return pids


def _eval_rows(workdir: str) -> tuple[int, int]:
  """(rows, torn lines) of every evaluator JSONL."""
  rows = torn = 0
  folder = os.path.join(workdir, 'eval')
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    with open(os.path.join(folder, name), errors='replace') as f:
      for line in f:
        if not line.strip():
          continue
        try:
          json.loads(line)
          rows += 1
        except ValueError:
          torn += 1
  return rows, torn


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='cpu_tiny')
  p.add_argument('--data-dir', default=None, help='default: generate a tiny dataset in --workdir')
  p.add_argument('--workdir', default=None, help='default: a new temporary directory')
  p.add_argument('--minutes', type=float, default=6.0, help='length of the kill phase')
  p.add_argument('--kill-every', type=float, default=40.0, help='seconds between kills')
  p.add_argument('--steps', type=int, default=None,
                 help='learner steps (default: run on until 3 checkpoints after the last kill)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--timeout-minutes', type=float, default=30.0)
  args = p.parse_args(argv)

  tag = uuid.uuid4().hex
  os.environ[TAG_VAR] = tag  # inherited by Ray's GCS, raylet and every worker started below
  import ray
  from scaled_ql.launch import program, run

  workdir = args.workdir or tempfile.mkdtemp(prefix='chaos_')
  data_dir = args.data_dir
  if data_dir is None:
    from scaled_ql.datasets import generate
    data_dir = os.path.join(workdir, 'data')
    base = run.resolve_config(args.config)
    generate.generate(base.games, data_dir, run=base.data.run, num_checkpoints=2,
                      steps_per_checkpoint=300, seed=args.seed, max_episode_frames=1_000,
                      progress=False, if_exists='skip')
  num_steps = args.steps  # None: the learner trains until this script stops the program
  cfg = run.resolve_config(args.config, data_dir, steps=num_steps, evaluators=1)
  ckpt_every = cfg.train.checkpoint_every_steps
  rng = random.Random(args.seed)
  print(f'[chaos] {cfg.name} games {cfg.games} workdir {workdir}; kill every '
        f'{args.kill_every:g}s for {args.minutes:g} min; checkpoint every {ckpt_every} steps; '
        f'crash loop = {cfg.train.crash_loop_restarts} restarts in '
        f'{cfg.train.crash_loop_window_s:g}s', flush=True)

  run.prepare_workdir(cfg, os.path.join(workdir, 'run'))
  wd = os.path.join(workdir, 'run')
  started_here = run.init_ray(None, None, cfg)
  kills: list[dict] = []
  cycle: list[str] = []
  learner_losses: list[int] = []
  evaluator_rows_lost = 0
  finished = False
  lost = None
  t_start = time.time()
  state = dict(next_kill=None, kill_phase_over=False, last_restart_step=0)
  try:
    prog = program.build(cfg, wd, 1, num_steps)
    nodes_by_kind = {
        'learner': [('learner', prog.learner)], 'replay': [('replay', prog.replay)],
        'inserter': [(f'inserter_{i}', h) for i, h in enumerate(prog.inserters)],
        'evaluator': [(f'evaluator_{i}', h) for i, h in enumerate(prog.evaluators)],
        'variable_shard': [(f'variable_shard_{i}', h)
                           for i, h in enumerate(prog.variables.shards)]}

    def kill_one(status: program.ProgramStatus) -> None:
      if not cycle:
        cycle.extend(rng.sample(sorted(nodes_by_kind), len(nodes_by_kind)))
      kind = cycle.pop(0)
      name, handle = rng.choice(nodes_by_kind[kind])
      info = program._gcs_actor_info(handle)  # pylint: disable=protected-access
      pid = int(info.get('Pid', 0) or 0)
      if info.get('State') != 'ALIVE' or pid <= 0:
        print(f'[chaos] {name} is not up ({info.get("State")}); skipping this kill', flush=True)
        return
      event = dict(name=name, kind=kind, pid=pid, at=time.time() - t_start,
                   restarts_before=int(info.get('NumRestarts', 0)), back=False)
      if kind == 'learner' and status.learner:
        event['steps_before'] = status.learner['steps']
      if kind == 'evaluator':
        i = int(name.rsplit('_', 1)[1])
        s = status.evaluators[i]
        event['evaluating_games'] = len(prog.evaluator_games[i]) if s and s.get(
            'evaluating_version', -1) >= 0 else 0
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        print(f'[chaos] {name} pid {pid} already gone; skipping this kill', flush=True)
        return
      kills.append(event)
      print(f'[chaos] {event["at"]:6.0f}s kill -9 {name} (pid {pid})', flush=True)

    def check_back(status: program.ProgramStatus) -> None:
      for event in kills:
        if event['back']:
          continue
        handle = dict(n for group in nodes_by_kind.values() for n in group)[event['name']]
        info = program._gcs_actor_info(handle)  # pylint: disable=protected-access
        if (info.get('State') == 'ALIVE' and int(info.get('NumRestarts', 0))
            > event['restarts_before'] and int(info.get('Pid', 0) or 0) != event['pid']):
          if event['kind'] == 'learner':
            s = status.learner
            if not (s and s['pid'] != event['pid']):
              continue  # back in Ray, not yet answering
            event['resumed_from'] = s['resumed_from_step']
            event['steps_lost'] = event.get('steps_before', 0) - s['resumed_from_step']
            learner_losses.append(event['steps_lost'])
            state['last_restart_step'] = s['resumed_from_step']
          event['back'] = True
          event['back_after_s'] = time.time() - t_start - event['at']

    def stop_when(status: program.ProgramStatus) -> bool:
      now = time.time() - t_start
      check_back(status)
      learner = status.learner
      if state['next_kill'] is None:
        if learner and learner['steps'] > 0:  # start once the program is up and learning
          state['next_kill'] = now + args.kill_every
          state['kill_start'] = now
        return False
      if not state['kill_phase_over']:
        if now - state['kill_start'] > args.minutes * 60:
          state['kill_phase_over'] = True
          print(f'[chaos] kill phase over at {now:.0f}s', flush=True)
        elif now >= state['next_kill']:
          kill_one(status)
          state['next_kill'] = now + args.kill_every
        return False
      if learner is None:
        return False
      done = (bool(learner['done']) if args.steps else
              all(e['back'] for e in kills)
              and learner['steps'] >= state['last_restart_step'] + 3 * ckpt_every)
      state['done'] = done
      return done

    try:
      last_progress = [0.0]

      def log(line: str) -> None:  # progress every 15 s; every other line as it comes
        if line.lstrip()[:1].isdigit() and line.split('|')[0].strip().endswith('s'):
          if time.time() - last_progress[0] < 15:
            return
          last_progress[0] = time.time()
        print(line, flush=True)

      final = program.run(prog, log=log, stop_when=stop_when,
                          timeout_s=args.timeout_minutes * 60, final_eval_timeout_s=300)
      final_step = final.learner['steps'] if final and final.learner else None
      # Finished: ended by its stop condition (not the time limit), every killed node back.
      finished = bool(state.get('done') and final_step and all(e['back'] for e in kills)
                      and (not args.steps or final_step == args.steps))
    except program.NodeLost as e:
      lost = str(e)
      final_step = None
  finally:
    if started_here:
      ray.shutdown()
  for event in kills:
    if event['kind'] == 'evaluator':
      evaluator_rows_lost += event.get('evaluating_games', 0)
  rows, torn = _eval_rows(wd)
  deadline = time.time() + 60
  while _tagged_processes(tag) and time.time() < deadline:
    time.sleep(1)
  left = _tagged_processes(tag)
  survived = sum(e['back'] for e in kills)
  load = os.getloadavg()
  print('\n[chaos] results')
  print(f'  kills: {len(kills)} ({", ".join(e["name"] for e in kills)}); survived (node back, '
        f'program went on): {survived}')
  for e in kills:
    extra = (f" steps {e.get('steps_before')} -> resumed from {e.get('resumed_from')}"
             if e['kind'] == 'learner' else '')
    print(f"    {e['at']:6.0f}s {e['name']:<16} back after "
          f"{e.get('back_after_s', float('nan')):5.0f}s{extra}")
  print(f'  learner steps lost per learner kill: {learner_losses} (checkpoint interval '
        f'{ckpt_every}; status polled every {program.STATUS_EVERY_SECONDS:g}s)')
  print(f'  evaluator rows lost: {evaluator_rows_lost} (rounds in progress at a kill) + {torn} '
        f'torn JSONL lines; {rows} rows written')
  print(f'  run finished: {finished} (final learner step {final_step}'
        + (f'; NodeLost: {lost.splitlines()[0]}' if lost else '') + ')')
  print(f'  processes of the run left after shutdown: {len(left)} {left or ""}')
  print(f'  wall {time.time() - t_start:.0f}s; load average {load[0]:.1f} {load[1]:.1f} '
        f'{load[2]:.1f}')
  return 0 if finished and not left and survived == len(kills) else 1


if __name__ == '__main__':
  sys.exit(main())

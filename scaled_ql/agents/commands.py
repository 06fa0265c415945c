"""`scaled-ql learn`: the offline learner alone (no Ray, no evaluators), see scaled_ql/cli.py.

It feeds the Learner stratified batches from a Reverb server: an existing one (`--reverb
HOST:PORT`, which must answer and serve the config's games) or, by default, a local server plus
inserter processes that stream the config's RLDS data into it. The data dir is read either way
(the Monte-Carlo probe). Checkpoints go to WORKDIR/checkpoints, metrics to stdout,
WORKDIR/learner.jsonl and TensorBoard (WORKDIR/tb), per-game Q diagnostics to
WORKDIR/learner_games.jsonl and TensorBoard. Ctrl-C / SIGTERM: checkpoint at the next step
boundary (or at once while waiting for data), then exit 0; a second one stops at once.
Evaluate afterwards with `scaled-ql eval --checkpoint WORKDIR`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from scaled_ql.configs import overrides
from scaled_ql.configs.overrides import ConfigError
from scaled_ql.launch import run


REVERB_CHECK_TIMEOUT_S = 30.0  # how long `--reverb HOST:PORT` may take to answer


def register(subparsers) -> None:
  p = subparsers.add_parser(
      'learn', help='run the offline learner alone on a Reverb-fed data stream (no Ray)',
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  overrides.add_flags(p)
  p.add_argument('--workdir', required=True, help='checkpoints, config.json, metrics')
  p.add_argument('--data-dir', default=None, help="TFDS data dir (default: the config's)")
  p.add_argument('--steps', type=int, default=None, help="gradient steps (default: the config's)")
  p.add_argument('--reverb', default=None, metavar='HOST:PORT',
                 help='sample from this running Reverb server instead of starting one locally')
  p.add_argument('--no-resume', action='store_true',
                 help='refuse to start if WORKDIR already holds checkpoints (default: resume)')
  p.set_defaults(handler=_learn)


def _resolve(args: argparse.Namespace, held: contextlib.ExitStack):
  """(the run's config with the flags applied, compared with what the workdir ran and recorded
  (config.json, config_history.jsonl); the learner's initial params, `run.initial_params`);
  raises ConfigError before anything expensive. The workdir's lock (`run.workdir_lock`) is
  entered on `held`, for the whole run."""
  from scaled_ql import compilation_cache
  from scaled_ql.agents import checkpointing
  cfg = run.resolve_config(args.config, args.data_dir, args.steps, games=args.games,
                           overrides=args.set)
  run.check_data(cfg)  # (with --reverb too: the learner's MC probe reads the run's data)
  run.check_initial_params(cfg)  # (its costly part, loading and compiling, comes below)
  run.check_workdir(args.workdir)
  if args.reverb is not None:  # it answers and serves the config's games, or the sampler waits
    from scaled_ql.datasets import reverb_tables
    try:
      reverb_tables.check_server(args.reverb, cfg.games, REVERB_CHECK_TIMEOUT_S)
    except ValueError as e:
      raise ConfigError(f'--reverb {args.reverb}: {e}') from None
  held.enter_context(run.workdir_lock(args.workdir))
  ckpts = checkpointing.checkpoint_dir(args.workdir)
  if args.no_resume and os.path.isdir(ckpts) and os.listdir(ckpts):
    raise ConfigError(f'--no-resume: {ckpts} already holds checkpoints')
  # Before anything compiles (a fine-tuning run's initial params, then the learner): a rerun
  # loads what the last one compiled (WORKDIR/compilation_cache).
  compilation_cache.use_run_cache(args.workdir)
  # An offline fine-tuning config (config.json of `finetune offline`) starts from its pretrained
  # encoder, as `train` starts it; an online one is refused (it needs actors).
  initial_params = run.initial_params(cfg)
  run.prepare_workdir(cfg, args.workdir, args.allow_config_change)
  return cfg, initial_params


def _learn(args: argparse.Namespace) -> int:
  with contextlib.ExitStack() as held:
    try:
      cfg, initial_params = _resolve(args, held)
    except ConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    return _run(args, cfg, initial_params)


def _run(args: argparse.Namespace, cfg, initial_params=None) -> int:
  # Wiring only (like launch): the agents library itself never imports the data layer.
  from scaled_ql.agents.learner import Learner
  from scaled_ql.agents.checkpointing import CheckpointWriteError, NoCheckpointLoadsError
  from scaled_ql.agents.runner import LearnerRunner, NonFiniteLossError
  from scaled_ql.datasets.mc_probe import load_mc_probe
  from scaled_ql.datasets import reverb_tables
  server, inserters, batches, learner, watch = None, [], None, None, None
  ended = []  # a data process of this run that ended while the learner trained
  try:
    address = args.reverb
    if address is None:
      server = reverb_tables.start_server_process(cfg)
      address = server.address
      inserters = reverb_tables.start_inserter_processes(address, cfg)
      print(f'reverb server at {address}, {len(inserters)} inserter(s)', flush=True)
    batches = reverb_tables.stratified_batches(address, cfg.games, cfg, seed=cfg.train.seed)

    def end_the_data(reason: str | None = None) -> None:
      batches.close(timeout_s=0, reason=reason)  # a step waiting for a batch then ends the run

    if server is not None:  # this run's own server and inserters: one that ends ends the run

      def data_process_ended(message: str) -> None:
        ended.append(message)
        end_the_data(message)

      watch = reverb_tables.watch_processes(
          {'the Reverb server': server.proc,
           **{f'inserter {i}': proc for i, proc in enumerate(inserters)}}, data_process_ended)
    # Q(s, a_data) against Monte-Carlo returns on a fixed set of the run's data, in the metrics.
    # A SIGTERM/SIGINT while the learner waits for data (tables below their warm-up, a server
    # that went away) closes the batches: the wait ends, with a checkpoint, as at a step's end.
    learner = LearnerRunner(
        Learner(cfg, batches, initial_params=initial_params),
        args.workdir, mc_probe=load_mc_probe(cfg), wake=end_the_data)
    if learner.restore():
      print(f'resumed from step {learner.steps} in {args.workdir}', flush=True)
    steps = learner.run()
    print(f'learner stopped at step {steps}; checkpoints in {args.workdir}/checkpoints',
          flush=True)
    # A Ctrl-C in a terminal also reaches the server and inserters (one process group): their
    # end is then this stop's, not a failure.
    if ended and learner.stop_signal is None:
      print(f'error: {ended[0]} while the learner trained: the run stopped after step {steps}, '
            'with a checkpoint of it; run the same command again to resume from it',
            file=sys.stderr)
      return 1
    return 0
  except NonFiniteLossError as e:
    print(f'scaled-ql learn: {e}', file=sys.stderr)
    return 1
  except (CheckpointWriteError, NoCheckpointLoadsError) as e:  # the message says what to do
    print(f'error: {e}', file=sys.stderr)
    return 1
  finally:
    if watch is not None:
      watch.set()  # what follows stops them on purpose
    if learner is not None:
      learner.close()
    if batches is not None:  # (its sampler may be stuck on a dead server: a daemon thread)
      batches.close(timeout_s=1.0 if ended else 10.0)
    reverb_tables.stop_processes(inserters)
    if server is not None:
      server.stop()

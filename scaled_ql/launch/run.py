"""Running a config: resolve it (with the command line's overrides), check its data and workdir,
start Ray and run the distributed program. The library behind `scaled-ql train`, `learn`,
`finetune` and `demo` (their `commands.py` modules only parse flags and call these).

Everything that can be checked without starting a process (config name, games, agent settings,
data directory and the games' datasets in it, evaluator count) is checked first, so a bad run
fails in a second with a `ConfigError` naming the flag/file/game at fault.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from typing import Iterator, Optional, Sequence

from scaled_ql.configs import base as configs_base
from scaled_ql.configs import overrides as overrides_lib
from scaled_ql.configs.overrides import ConfigError


def resolve_config(config: str, data_dir: Optional[str] = None, steps: Optional[int] = None,
                   evaluators: Optional[int] = None, *, games: Optional[str] = None,
                   overrides: Sequence[str] = (), evaluator_gpus: Optional[float] = None):
  """The run's ExperimentConfig: `config` (a name, or a config.json / workdir to rerun) with the
  command line's changes, validated; raises ConfigError. The flags are shorthands recorded like
  `--set` overrides (in `cfg.overrides`): --games -> games, --data-dir -> data.data_dir,
  --steps -> train.num_steps, --evaluators -> eval.num_evaluators, --evaluator-gpus ->
  eval.gpus_per_evaluator; `overrides` come last."""
  cfg = overrides_lib.load(config)
  if games is not None:
    cfg = overrides_lib.apply(cfg, [f'games={games}'], flag='--games')
    # The heads follow the games; so do the evaluators and inserters (at most one per game).
    follow = [f'{path}={len(cfg.games)}' for path in ('eval.num_evaluators', 'data.num_inserters')
              if overrides_lib.get(cfg, path) > len(cfg.games)]
    cfg = overrides_lib.apply(cfg, follow, flag='--games')
  if data_dir is not None:
    cfg = overrides_lib.apply(cfg, [f'data.data_dir={data_dir}'], flag='--data-dir')
  if steps is not None:
    if steps < 1:
      raise ConfigError(f'--steps must be >= 1, got {steps}')
    cfg = overrides_lib.apply(cfg, [f'train.num_steps={steps}'], flag='--steps')
  if evaluators is not None:
    cfg = overrides_lib.apply(cfg, [f'eval.num_evaluators={evaluators}'], flag='--evaluators')
  if evaluator_gpus is not None:
    cfg = overrides_lib.apply(cfg, [f'eval.gpus_per_evaluator={evaluator_gpus}'],
                              flag='--evaluator-gpus')
  cfg = overrides_lib.apply(cfg, overrides)
  validate(cfg)
  return cfg


# The ranges of the fields no other check covers (the agent's, the network's, the evaluator's,
# the driver's fault fields and the table pacing have their own): (section.field, valid?, what).
_RANGES = (
    ('train.num_steps', lambda v: v >= 1, '>= 1'),
    ('train.seed', lambda v: v >= 0, '>= 0 (numpy seeds from it)'),
    ('data.selection_seed', lambda v: v >= 0, '>= 0 (numpy seeds from it)'),
    ('data.samples_per_insert', lambda v: 0 < v < math.inf, '> 0 and finite'),
    ('data.reverb_chunk_length', lambda v: v >= 1, '>= 1'),
    ('data.prefetch_batches', lambda v: v >= 1, '>= 1'),
    ('data.reader_cycle_length', lambda v: v >= 1, '>= 1'),
    ('eval.eval_every_steps', lambda v: v is None or v >= 1, '>= 1 (or None: by the clock)'),
    ('eval.eval_every_seconds', lambda v: v > 0, '> 0'),
    ('finetune.num_actors', lambda v: v >= 1, '>= 1'),
    ('finetune.update_period', lambda v: v >= 1, '>= 1'),
    ('finetune.epsilon_start', lambda v: 0 <= v <= 1, 'in [0, 1]'),
    ('finetune.epsilon_end', lambda v: 0 <= v <= 1, 'in [0, 1]'),
    ('finetune.epsilon_decay_steps', lambda v: v >= 0, '>= 0'),
    ('finetune.actor_sticky_action_prob', lambda v: 0 <= v <= 1, 'in [0, 1]'),
)


def check_numbers(cfg) -> None:
  """No float field of any section is NaN (it passes every comparison a range check makes), and
  the fields of `_RANGES` are in range; ConfigError naming the field."""
  for section in dataclasses.fields(cfg):
    values = getattr(cfg, section.name)
    for field in dataclasses.fields(values) if dataclasses.is_dataclass(values) else ():
      value = getattr(values, field.name)
      if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f'{section.name}.{field.name} is nan')
  for path, valid, what in _RANGES:
    section, name = path.split('.')
    value = getattr(getattr(cfg, section), name)
    if not valid(value):
      raise ConfigError(f'{path} must be {what}, got {value}')


def validate(cfg) -> None:
  """The checks that need no data and no process; ConfigError naming the field/flag at fault."""
  from scaled_ql import games as games_lib
  try:
    games_lib.check_games(cfg.games, f'config {cfg.name!r} games')
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if not 1 <= cfg.eval.num_evaluators <= len(cfg.games):
    raise ConfigError(f'--evaluators (eval.num_evaluators) must be between 1 and the '
                      f'{len(cfg.games)} games of {cfg.name!r}, got {cfg.eval.num_evaluators}')
  if not 0 <= cfg.eval.gpus_per_evaluator < math.inf:  # (NaN too: named by its flag)
    raise ConfigError(f'--evaluator-gpus (eval.gpus_per_evaluator) must be >= 0 and finite, got '
                      f'{cfg.eval.gpus_per_evaluator}')
  check_numbers(cfg)
  if not 0 <= cfg.eval.epsilon <= 1:
    raise ConfigError(f'eval.epsilon must be in [0, 1], got {cfg.eval.epsilon}')
  check_eval_settings(cfg)
  # Counts the nodes divide by or loop on: caught here, not as a crash loop after Ray started.
  for name in ('variable_server_shards', 'checkpoint_every_steps', 'log_every_steps',
               'publish_every_steps'):
    if getattr(cfg.train, name) < 1:
      raise ConfigError(f'train.{name} must be >= 1, got {getattr(cfg.train, name)}')
  from scaled_ql.launch import program  # the driver's own checks of its fault-tolerance fields
  try:
    program.check_fault_config(cfg)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if cfg.finetune.pretrained_online_params and cfg.finetune.pretrained is None:
    raise ConfigError('finetune.pretrained_online_params (--online-params) needs a pretrained '
                      'run (finetune.pretrained, --pretrained), not a run from scratch')
  from scaled_ql.datasets import rlds_reader, tfds_layout
  try:
    rlds_reader.parse_selection(cfg.data.selection)
  except ValueError as e:
    raise ConfigError(f'data.selection: {e}') from e
  try:
    tfds_layout.check_run(cfg.data.run)
  except ValueError as e:
    raise ConfigError(f'data.{e}') from e
  keep, every = cfg.train.keep_checkpoint_every_steps, cfg.train.checkpoint_every_steps
  if keep is not None and (keep < 1 or keep % every):
    raise ConfigError(f'train.keep_checkpoint_every_steps must be a positive multiple of '
                      f'train.checkpoint_every_steps ({every}), got {keep}')
  if not 1 <= cfg.data.num_inserters <= len(cfg.games):
    raise ConfigError(f'data.num_inserters must be between 1 and the {len(cfg.games)} games, got '
                      f'{cfg.data.num_inserters}')
  try:
    configs_base.check_transitions_per_item(cfg)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  from scaled_ql.agents import builder  # the agent's own checks (loss, atoms, batch, ...)
  from scaled_ql.networks import q_network
  try:
    builder.check_agent_config(cfg)
    q_network.check_network_config(cfg.network)
  except ValueError as e:
    raise ConfigError(f'config {cfg.name!r}: {e}') from e


def check_eval_settings(cfg) -> None:
  """What the evaluator nodes would refuse at their first round, after Ray, the replay and the
  learner had started (a crash loop minutes later): their budgets, the emulator's settings, and
  `eval.game_mode` against every game's ROM (a mode one of the games lacks)."""
  e = cfg.eval
  from scaled_ql.envs import atari
  from scaled_ql.eval import evaluator
  try:  # the evaluator's and the emulator's own checks of their arguments
    evaluator.check_args(cfg.games, cfg.games, e, e.steps_per_game, e.num_envs, e.env_groups,
                         len(cfg.games) if e.games_at_once is None else e.games_at_once)
    atari.check_max_episode_frames(e.max_episode_frames)
  except ValueError as err:
    raise ConfigError(f'eval.{err}') from err
  if e.final_steps_per_game is not None and e.final_steps_per_game < 1:
    raise ConfigError(f'eval.final_steps_per_game must be >= 1 (or None: eval.steps_per_game), '
                      f'got {e.final_steps_per_game}')
  if e.game_mode is not None:
    lacking = {g: atari.available_modes(g) for g in cfg.games
               if e.game_mode not in atari.available_modes(g)}
    if lacking:
      raise ConfigError(f'eval.game_mode={e.game_mode}: not a mode of ' + '; '.join(
          f'{g} (its modes: {", ".join(map(str, modes))})' for g, modes in lacking.items()))


def check_data(cfg) -> None:
  """The data selection parses and the data dir holds every game's dataset: local dirs and
  gs:// alike (an unreachable bucket or missing credentials are reported as such)."""
  from scaled_ql import games as games_lib
  from scaled_ql.datasets import rlds_reader, tfds_layout
  try:
    selection = rlds_reader.parse_selection(cfg.data.selection)
  except ValueError as e:
    raise ConfigError(f'data.selection: {e}') from e
  data_dir = cfg.data.data_dir
  root = data_dir.rstrip('/') + '/' + cfg.data.builder
  if not _exists(data_dir):
    raise ConfigError(f'--data-dir {data_dir!r} does not exist (generate one with '
                      f'`scaled-ql data generate --games {",".join(cfg.games)} --out {data_dir}`)')
  missing = [g for g in cfg.games
             if not _exists(root + '/' + tfds_layout.config_name(g, cfg.data.run))]
  if missing:
    have = sorted(_listdir(root)) if _exists(root) else []
    raise ConfigError(f'--data-dir {data_dir!r} has no {cfg.data.builder} data for game(s) '
                      f'{missing} (run {cfg.data.run}); it has: {have or "nothing"}')
  # Each game's dataset is prepared (dataset_info.json) and holds the selected splits: empty or
  # half-written game folders fail here, not later in a node that crash-loops on them.
  for game in cfg.games:
    try:
      builder = rlds_reader.load_builder(data_dir, game, cfg.data.run, cfg.data.builder)
      ordered = cfg.data.builder == tfds_layout.ORDERED_BUILDER
      # The unordered builder has one 'train' split; the reader selects by checkpoint_id.
      selected = rlds_reader.selected_checkpoints(
          selection, rlds_reader.available_checkpoints(builder) if ordered
          else list(range(games_lib.num_checkpoints(game))))
      if not selected:
        raise rlds_reader.DatasetNotFoundError(
            f'{game} run {cfg.data.run}: data.selection {cfg.data.selection!r} selects no split')
      # A `data download` copy holds only the splits of its own selection (under the source's
      # whole split list): a wider selection would train on a part of its data, with warnings.
      if not ordered:
        continue
      absent = ([] if '://' in data_dir else
                sorted(set(selected) - set(rlds_reader.present_checkpoints(builder, selected))))
      if absent:
        raise rlds_reader.DatasetNotFoundError(
            f'{game} run {cfg.data.run}: data.selection {cfg.data.selection!r} needs checkpoint '
            f'split(s) {absent} whose files are not on disk (a copy of another selection?); '
            f'get them with `scaled-ql data download --games {game} --run {cfg.data.run} '
            f'--selection {cfg.data.selection} --out {data_dir}`')
    except rlds_reader.DatasetNotFoundError as e:
      raise ConfigError(f'--data-dir {data_dir!r}: {e}') from e


def _gcs_credentials() -> str:
  path = os.environ.get('GOOGLE_APPLICATION_CREDENTIALS')
  if path:
    return f'GOOGLE_APPLICATION_CREDENTIALS={path}' + ('' if os.path.isfile(path) else
                                                        ' (no such file)')
  adc = os.path.expanduser('~/.config/gcloud/application_default_credentials.json')
  if os.path.isfile(adc):
    return f'gcloud application-default credentials ({adc})'
  return ('none found (GOOGLE_APPLICATION_CREDENTIALS is unset and there are no gcloud '
          'application-default credentials; public buckets are read anonymously)')


def _remote_error(path: str, e: Exception) -> ConfigError:
  import tensorflow as tf
  detail = ' '.join(str(e).split())
  if isinstance(e, (tf.errors.PermissionDeniedError, tf.errors.UnauthenticatedError)):
    what = 'access to it was refused'
  else:
    what = 'it could not be reached'
  return ConfigError(f'--data-dir: {path!r}: {what} ({type(e).__name__}: {detail}). '
                     f'Credentials: {_gcs_credentials()}. Check the network and the credentials, '
                     'or use a local copy (scaled-ql data download)')


def _exists(path: str) -> bool:
  """os.path.isdir for local paths; tf.io.gfile for URLs, with a failure to reach the store (or
  to authenticate) raised as such rather than read as "does not exist"."""
  if '://' not in path:
    return os.path.isdir(path)
  import tensorflow as tf
  try:
    return tf.io.gfile.exists(path)
  except tf.errors.NotFoundError:
    return False
  except tf.errors.OpError as e:
    raise _remote_error(path, e) from e


def _listdir(path: str) -> list:
  if '://' not in path:
    return os.listdir(path)
  import tensorflow as tf
  try:
    return [p.rstrip('/') for p in tf.io.gfile.listdir(path)]
  except tf.errors.OpError as e:
    raise _remote_error(path, e) from e


# ------------------------------------------------------------------------------------ workdir

# What a resumed run may not change without --allow-config-change (issue 12): what the run is.
# The games, network, agent, the data (builder, run, selection) and seed, as the issue lists; and
# the evaluation protocol and fine-tuning setup, whose change would mix two runs in one learning
# curve. A field that matches none of these (the step budget, evaluation and logging cadences,
# where the data is read from and how the nodes run) may change; every change is listed anyway.
RESUME_REFUSES = (
    'games', 'network.', 'agent.', 'data.builder', 'data.run', 'data.selection',
    'data.selection_seed', 'train.seed',
    'eval.epsilon', 'eval.sticky_action_prob', 'eval.max_episode_frames', 'eval.game_mode',
    'finetune.pretrained', 'finetune.pretrained_online_params', 'finetune.update_period',
    'finetune.epsilon_',
    'finetune.actor_sticky_action_prob')
CONFIG_HISTORY = 'config_history.jsonl'


def resume_refuses(path: str) -> bool:
  """Whether a resumed run may change the field `path` only with --allow-config-change."""
  return any(path == p or (p.endswith(('.', '_')) and path.startswith(p)) for p in RESUME_REFUSES)


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = tuple(v) if isinstance(v, list) else v
  return out


def config_changes(old: dict, cfg) -> dict:
  """{field: (before, now)} between a workdir's config.json (as a dict) and `cfg`; a field the
  old file lacks (added to the code since) counts as a change only if `cfg` moved off its
  default. `overrides` (the record of how each was made) is not compared."""
  before, now = _flat(old), _flat(cfg.to_dict())
  defaults = {}
  for path, (cls, _) in overrides_lib.fields().items():
    f = {g.name: g for g in dataclasses.fields(cls)}[path.rsplit('.', 1)[-1]]
    if f.default is not dataclasses.MISSING:
      defaults[path] = f.default
  changes = {}
  for path in sorted(set(before) | set(now)):
    if path == 'overrides':
      continue
    if path not in before and path in defaults and now.get(path) == defaults[path]:
      continue
    if before.get(path, '(absent)') != now.get(path, '(absent)'):
      changes[path] = (before.get(path, '(absent)'), now.get(path, '(absent)'))
  return changes


def _checkpoint_steps(workdir: str) -> list[int]:
  """The checkpoint steps in WORKDIR/checkpoints (Orbax step folders), without loading any."""
  path = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def check_workdir(workdir: str) -> None:
  """--workdir can be created or written (nothing is created here)."""
  _check_writable_dir(workdir, '--workdir')


LOCK_FILE = 'run.lock'
_HELD_LOCKS: set[str] = set()  # the real paths of the workdirs this process holds


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/run.lock for the block, so that a second run cannot start in a workdir a run
  is using: both would resume from the same checkpoint, then write over each other's checkpoints
  (seen: one run's save failed on a folder the other's cleanup removed) and interleave two
  histories in the metrics logs. ConfigError names the holder (pid, host, start, command line).

  An exclusive, non-blocking `flock`, which the kernel drops when its process ends, however it
  ends: a killed run leaves no stale lock. The file stays (its content: the last holder).
  Re-entrant within a process (the demo holds it around `train`). A filesystem without locks:
  a warning, and the run goes on unguarded. Creates the workdir, once `check_workdir` passed."""
  import fcntl
  key = os.path.realpath(workdir)
  if key in _HELD_LOCKS:  # (the outer block releases it)
    yield
    return
  check_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # (not inherited by child processes)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _lock_holder(fd)
    os.close(fd)
    raise ConfigError(
        f'--workdir {workdir!r} is in use by another run ({holder}); two runs in one workdir '
        'would write over each other\'s checkpoints and logs. Stop that run first, or pass '
        f'another --workdir (the lock, {path}, goes with its process)') from None
  except OSError as e:  # e.g. ENOLCK on an NFS mount without a lock service
    os.close(fd)
    print(f'[workdir] warning: cannot lock {path} ({e.strerror}); a second run in this '
          'workdir would not be refused', file=sys.stderr, flush=True)
    fd = None
  if fd is None:
    yield
    return
  _write_lock_holder(fd)
  _HELD_LOCKS.add(key)
  try:
    yield
  finally:
    _HELD_LOCKS.discard(key)
    os.close(fd)  # (drops the flock)


def _write_lock_holder(fd: int) -> None:
  import datetime
  import json
  import socket
  started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), started=started,
                                command=' '.join(sys.argv))).encode(), 0)


def _lock_holder(fd: int) -> str:
  """'pid N on HOST since T: COMMAND' from the lock file (the holder may still be writing it)."""
  import json
  try:
    h = json.loads(os.pread(fd, 1 << 16, 0).decode())
    return f"pid {h['pid']} on {h['host']} since {h['started']}: {h['command']}"
  except (ValueError, KeyError, TypeError):
    return 'its details are not written yet'


def _check_local_path(path: str, flag: str) -> None:
  """Our outputs are written with local file I/O: a URL (gs://...) would become a local folder
  named after it (`./gs:/bucket/...`), as `--workdir gs://b/run` did before it crashed in the
  TensorBoard writer with Reverb and the inserters already started."""
  if '://' in path:
    raise ConfigError(f'{flag} {path!r} is a URL; it is written with local file I/O (its '
                      'config, logs, lock and reports), so it must be a local or mounted path: '
                      'a bucket mounted with gcsfuse, or a cluster\'s shared filesystem')


def _check_writable_dir(path: str, flag: str) -> None:
  _check_local_path(path, flag)
  path = os.path.abspath(path)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ConfigError(f'{flag} {path!r} exists and is not a directory')
    if not os.access(path, os.W_OK | os.X_OK):
      raise ConfigError(f'{flag} {path!r} is not writable')
    return
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ConfigError(f'{flag} {path!r}: {parent!r} is a file, not a directory')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f'{flag} {path!r}: cannot create it in {parent!r} (not writable)')


def check_output_file(path: str, flag: str) -> None:
  """An output file (e.g. `eval --out x.csv`) can be written: its directory exists (it is not
  created) and the path is not a directory. Checked before any work."""
  _check_local_path(path, flag)
  path_abs = os.path.abspath(path)
  parent = os.path.dirname(path_abs)
  if os.path.isdir(path_abs):
    raise ConfigError(f'{flag} {path!r} is a directory, not a file')
  if not os.path.exists(parent):
    raise ConfigError(f'{flag} {path!r}: directory {parent!r} does not exist')
  if not os.path.isdir(parent):
    raise ConfigError(f'{flag} {path!r}: {parent!r} is not a directory')
  if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path_abs)
                                                   and not os.access(path_abs, os.W_OK)):
    raise ConfigError(f'{flag} {path!r} is not writable')


def check_resume(cfg, workdir: str, allow_config_change: bool = False) -> dict:
  """Checks the workdir and compares `cfg` with the config it ran before (its config.json), if
  any; writes nothing. A change to a field of RESUME_REFUSES raises ConfigError listing each,
  unless `allow_config_change`. Returns every change {field: (before, now)}."""
  import json
  check_workdir(workdir)
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'--workdir {workdir!r}: cannot read its config.json ({e}); move it '
                      'away to start afresh') from e
  changes = config_changes(old, cfg)
  refused = {k: v for k, v in changes.items() if resume_refuses(k)}
  if refused and not allow_config_change:
    raise ConfigError(
        f'--workdir {workdir!r} ran a different config; resuming would change '
        + '; '.join(f'{k}: {b!r} -> {a!r}' for k, (b, a) in refused.items())
        + '. Pass --allow-config-change if that is intended, or use a new --workdir')
  # The learner restores only a checkpoint of the same games/network/agent (checkpointing
  # refuses the others): with checkpoints there, such a change cannot be resumed at all.
  params = [k for k in refused if k == 'games' or k.startswith(('network.', 'agent.'))]
  if params and _checkpoint_steps(workdir):
    raise ConfigError(
        f'--workdir {workdir!r} holds checkpoints (steps {_checkpoint_steps(workdir)}) of '
        f'another {"/".join(sorted({k.split(".")[0] for k in params}))} config ('
        + '; '.join(f'{k}: {changes[k][0]!r} -> {changes[k][1]!r}' for k in params)
        + '); the learner cannot resume from them, even with --allow-config-change. Use a '
        'new --workdir (finetune --pretrained starts from a checkpoint\'s encoder)')
  return changes


def prepare_workdir(cfg, workdir: str, allow_config_change: bool = False, log=None) -> dict:
  """`check_resume`, and only then the record of this start: config.json and one line appended
  to config_history.jsonl. Returns the changes {field: (before, now)} (logged)."""
  import datetime
  import json
  log = log or (lambda line: print(line, flush=True))
  changes = check_resume(cfg, workdir, allow_config_change)
  resumed = os.path.exists(os.path.join(workdir, overrides_lib.CONFIG_FILE))
  if changes:
    log(f'[workdir] resuming {workdir} with changes: '
        + '; '.join(f'{k}: {b!r} -> {a!r}' for k, (b, a) in changes.items()))
  os.makedirs(workdir, exist_ok=True)
  record = dict(time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                resumed=resumed, changes={k: list(v) for k, v in changes.items()},
                allow_config_change=allow_config_change, overrides=list(cfg.overrides),
                config=cfg.to_dict())
  with open(os.path.join(workdir, CONFIG_HISTORY), 'a', encoding='utf-8') as f:
    f.write(json.dumps(record, sort_keys=True) + '\n')
  overrides_lib.write_file(cfg, workdir)
  return changes


def start_local_ray(num_cpus: int, env: Optional[dict[str, str]] = None,
                    log_to_driver: bool = True) -> None:
  """Starts a new Ray on this machine (no dashboard): what `train` without --address, the
  benchmarks and the tests start. A new one (`address='local'`) even when RAY_ADDRESS is set or
  a `ray start` cluster runs on the machine: a plain `ray.init()` joins that cluster instead, and
  fails on `num_cpus` (seen: "When connecting to an existing cluster, num_cpus and num_gpus must
  not be provided"). Joining one is what `--address` asks for.

  `env` reaches every node through the environment of the Ray processes started here, which
  their workers inherit (this process's own environment is as it was once Ray has started).
  Not as a runtime_env: Ray then starts every worker through its setup_worker.py shim (one more
  Python start, and a call to its runtime-env agent), which made each node start ~0.55 s and
  ~0.57 CPU-s slower on 2 cores (`benchmarks/node_start.py`; BUILD_NOTES "Tests"). A cluster joined
  with `--address` still gets it as a runtime_env (`init_ray`): its processes started elsewhere.
  (Evaluators sharing a GPU have a runtime_env of their own, `program.build`: they still start
  through the shim.) While `ray.init` runs, this process's other threads and subprocesses see
  `env` too: start Ray before any."""
  import ray
  with _environment(env or {}):
    ray.init(address='local', num_cpus=num_cpus, include_dashboard=False,
             log_to_driver=log_to_driver, configure_logging=False)


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
  """This process's environment with `env` set, restored on exit (also when setting fails).
  Only `env`'s names are touched: `unittest.mock.patch.dict(os.environ)` restores by clearing
  the whole environment first, which threads running meanwhile would see."""
  before = {name: os.environ.get(name) for name in env}
  try:
    os.environ.update(env)
    yield
  finally:
    for name, value in before.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


def node_environment() -> dict[str, str]:
  """The environment variables every node of a program gets: TensorFlow's C++ logs off, and
  glibc's MALLOC_* settings (`host_memory.malloc_environment`)."""
  from scaled_ql import host_memory
  return {'TF_CPP_MIN_LOG_LEVEL': '2', **host_memory.malloc_environment()}


def init_ray(address: Optional[str], num_cpus: Optional[int], cfg) -> bool:
  """Connects to `address` or starts a local Ray sized for the program (`start_local_ray`; also
  for `--address local`); True if started here."""
  import ray
  from scaled_ql.launch import program
  env = node_environment()
  if address and address != 'local':
    ray.init(address=address, runtime_env={'env_vars': env}, log_to_driver=True)
    return False
  needed = program.required_cpus(cfg)
  start_local_ray(max(num_cpus or 0, needed, os.cpu_count() or 1), env)
  return True


@contextlib.contextmanager
def program_session(cfg, workdir: str, address: Optional[str], num_cpus: Optional[int],
                    allow_config_change: bool = False, log=None) -> Iterator[bool]:
  """The frame of a program's run (`train`, `run_online`): the workdir checked, locked for the
  block (`workdir_lock`) and recorded (`prepare_workdir`), then Ray (`init_ray`), stopped at
  the end when it was started here. Yields whether it was. ConfigError before Ray starts."""
  with workdir_lock(workdir):
    prepare_workdir(cfg, workdir, allow_config_change, log=log)
    started_here = init_ray(address, num_cpus, cfg)
    try:
      yield started_here
    finally:
      if started_here:
        import ray
        ray.shutdown()


def check_gpus(cfg, learner_gpus: float = 0) -> None:
  """The local Ray has the GPUs the learner (--learner-gpus) and the evaluators (--evaluator-gpus
  x evaluators) ask for; without them their actors would wait forever (seen: `train
  --learner-gpus 1` on a machine without one printed "learner (starting)" until it was killed).
  ConfigError before any node starts."""
  import ray
  evaluators = cfg.eval.gpus_per_evaluator * cfg.eval.num_evaluators
  need = learner_gpus + evaluators
  have = float(ray.cluster_resources().get('GPU', 0.0))
  if need > have:
    asks = [f'--learner-gpus {learner_gpus:g}'] if learner_gpus else []
    if evaluators:
      asks.append(f'--evaluator-gpus {cfg.eval.gpus_per_evaluator:g} x '
                  f'{cfg.eval.num_evaluators} evaluator(s)')
    raise ConfigError(f'{" and ".join(asks)} need {need:g} GPU(s); Ray sees {have:g} on this '
                      'machine (0 runs that node on the CPU)')


def train(cfg, workdir: str, address: Optional[str] = None, num_cpus: Optional[int] = None,
          timeout_s: Optional[float] = None, learner_gpus: float = 0, log=None,
          initial_params=None, allow_config_change: bool = False,
          deadline: Optional[float] = None):
  """Runs the program to the end and returns its last `ProgramStatus` (Ray stopped after, when
  it was started here). `initial_params`: the learner's start (offline fine-tuning). `timeout_s`
  bounds the training; `deadline` (a `time.time()`) the whole run, the final evaluation included
  (`program.run`). Bad data or workdir (or a refused config change on resume, or a workdir
  another run holds: `workdir_lock`) raise ConfigError before anything starts."""
  from scaled_ql.launch import program
  if not learner_gpus >= 0:
    raise ConfigError(f'--learner-gpus must be >= 0, got {learner_gpus:g}')
  check_data(cfg)
  with program_session(cfg, workdir, address, num_cpus, allow_config_change, log) as started_here:
    if started_here:  # (a cluster may still be adding GPU nodes)
      check_gpus(cfg, learner_gpus)
    prog = program.build(cfg, workdir, cfg.eval.num_evaluators, cfg.train.num_steps,
                         learner_gpus=learner_gpus, initial_params=initial_params)
    return program.run(prog, log=log or (lambda line: print(line, flush=True)),
                       timeout_s=timeout_s, deadline=deadline)


def print_scores(status) -> None:
  """The latest evaluation of every game in a `ProgramStatus` (None: nothing to print)."""
  if status is None:
    return
  scores = status.latest_scores()
  if not scores:
    print('no evaluation finished yet')
    return
  from scaled_ql.eval import evaluator
  for game, r in sorted(scores.items()):  # 'no completed episode' instead of a score
    print(f'  {evaluator.format_row(game, r)}')


# ----------------------------------------------------------------- fine-tuning (Section 5.2)

def check_initial_params(cfg) -> None:
  """`initial_params`'s checks that cost nothing (nothing loaded or compiled): an online
  fine-tuning config, or a `finetune.pretrained` that holds no checkpoints or is a URL
  (`checkpointing.check_readable`): ConfigError."""
  if cfg.name.startswith('finetune_online'):
    raise ConfigError(f'config {cfg.name!r} is an online fine-tuning run (actors, no offline '
                      'data); `train` and `learn` run the offline program. Use scaled-ql '
                      'finetune online')
  if cfg.finetune.pretrained is not None:
    from scaled_ql.agents import checkpointing
    try:
      checkpointing.check_readable(cfg.finetune.pretrained)
    except FileNotFoundError as e:  # (the message `initial_params` gave after its loads before)
      raise ConfigError(f'finetune.pretrained: {e}') from e


def initial_params(cfg):
  """The learner's start for a config `train` or `learn` runs: None (a fresh init), or for an
  offline fine-tuning config (`finetune.pretrained` set, e.g. rerun from its workdir's
  config.json) the pretrained encoder with a fresh trunk and heads, as `finetune offline` starts
  it. An online fine-tuning config is not a `train` program: ConfigError."""
  check_initial_params(cfg)
  if cfg.finetune.pretrained is None:
    return None
  from scaled_ql.agents import transfer
  try:
    return transfer.finetune_params(cfg)
  except FileNotFoundError as e:
    raise ConfigError(f'finetune.pretrained: {e}') from e
  except ValueError as e:  # transfer.EncoderMismatchError
    raise ConfigError(str(e)) from e


def finetune_config(kind: str, game: str, *, pretrained: Optional[str] = None,
                    config: Optional[str] = None, from_scratch: bool = False,
                    frozen_encoder: bool = False, steps: Optional[int] = None,
                    eval_steps: Optional[int] = None, data_dir: Optional[str] = None,
                    selection: Optional[str] = None, mode: Optional[int] = None,
                    actors: Optional[int] = None, scale: float = 1.0,
                    online_params: bool = False, overrides: Sequence[str] = (), log=None):
  """(config, initial params or None) of an offline ('offline') or online ('online') fine-tuning
  run: `configs.finetune_offline/online` (Appendix B.4) of the base config (`config`, or the
  checkpoint's in `pretrained`), then the flags and `overrides` (recorded like --set). The
  initial params are the pretrained encoder with a fresh trunk and heads (None: from scratch):
  the encoder of the params the pretrained run's evaluators used, or of its online params with
  `online_params` (`finetune.pretrained_online_params`).
  Everything is checked before returning, and every flag before the checkpoint's params are read
  (its config alone is read first); ConfigError names the flag at fault."""
  from scaled_ql import configs, games as games_lib
  log = log or (lambda line: print(line, flush=True))
  try:
    games_lib.check_games([game], '--game')
  except ValueError as e:
    raise ConfigError(str(e)) from e
  for flag, value in (('--steps', steps), ('--eval-steps', eval_steps), ('--actors', actors)):
    if value is not None and value < 1:
      raise ConfigError(f'{flag} must be >= 1, got {value}')
  if pretrained is None and not (from_scratch and config):
    raise ConfigError('--pretrained is required (or --from-scratch with --config NAME)')
  if from_scratch and frozen_encoder:
    raise ConfigError('--encoder frozen needs a pretrained encoder (drop --from-scratch)')
  base = overrides_lib.load(config) if config is not None else None
  if pretrained is not None:
    # The checkpoint's config only: the params are read once every flag is checked.
    from scaled_ql.agents import checkpointing
    try:
      saved_cfg, step = checkpointing.load_config(pretrained)
    except FileNotFoundError as e:
      raise ConfigError(f'--pretrained: {e}') from e
    log(f'[finetune] pretrained checkpoint {pretrained} step {step} ({saved_cfg.name}, '
        f'games {", ".join(saved_cfg.games)})')
    if game in saved_cfg.games:
      log(f'[finetune] warning: {game} is one of the pre-training games (not held out)')
    base = base or saved_cfg
  source = None if from_scratch else pretrained
  flags = [('--steps', 'train.num_steps', steps), ('--eval-steps', 'eval.steps_per_game',
                                                   eval_steps),
           ('--online-params', 'finetune.pretrained_online_params', online_params or None)]
  if kind == 'offline':
    cfg = configs.finetune_offline(base, game, pretrained=source, freeze_encoder=frozen_encoder)
    flags += [('--data-dir', 'data.data_dir', data_dir), ('--selection', 'data.selection',
                                                          selection)]
  elif kind == 'online':
    from scaled_ql.envs.atari import AtariEnv
    try:
      AtariEnv(game, mode=mode).close()  # the mode exists for this game
      cfg = configs.finetune_online(base, game, mode, pretrained=source,
                                    freeze_encoder=frozen_encoder, scale=scale)
    except ValueError as e:
      raise ConfigError(f'--mode/--scale: {e}') from e
    flags += [('--actors', 'finetune.num_actors', actors)]
  else:
    raise ValueError(f'kind={kind!r}: offline or online')
  for flag, path, value in flags:
    if value is not None:
      cfg = overrides_lib.apply(cfg, [f'{path}={value}'], flag=flag)
  cfg = overrides_lib.apply(cfg, overrides)
  validate(cfg)
  if kind == 'offline':
    check_data(cfg)
  else:
    from scaled_ql.launch import finetune
    try:
      finetune.check_online_config(cfg)
    except ValueError as e:
      raise ConfigError(str(e)) from e
  if source is None:
    return cfg, None  # from scratch: the learner's own random init
  from scaled_ql.agents import transfer
  try:
    loaded_cfg, params, loaded = transfer.load_pretrained(
        pretrained, online=cfg.finetune.pretrained_online_params)
  except FileNotFoundError as e:  # (no checkpoint loads: checkpointing.NoCheckpointLoadsError)
    raise ConfigError(f'--pretrained: {e}') from e
  from scaled_ql.agents import builder
  online = cfg.finetune.pretrained_online_params
  log(f'[finetune] the encoder of {builder.policy_params_label(loaded_cfg.agent, online)} of '
      f'the pretrained run' + (' (finetune.pretrained_online_params)' if online else
                               ', what its evaluators used'))
  if loaded != step:  # the newest did not load, or a running learner saved a newer one
    log(f'[finetune] the flags were checked against the config of step {step}; the encoder is '
        f'step {loaded}\'s')
    if loaded_cfg.network != saved_cfg.network:
      raise ConfigError(f'--pretrained {pretrained}: the network of step {loaded} (loaded) is not '
                        f'that of step {step} (whose config the flags were checked against)')
  try:
    return cfg, transfer.finetune_params(cfg, pretrained, (loaded_cfg, params))
  except ValueError as e:  # transfer.EncoderMismatchError
    raise ConfigError(str(e)) from e

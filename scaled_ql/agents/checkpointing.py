"""Orbax checkpoints of the learner (written by `runner.LearnerRunner`), and `load_params` for
evaluators and transfer.

Layout: `<workdir>/checkpoints/<step>/{state,config}`: `state` is the whole `TrainState` (online,
target and behaviour params, Adam state, PRNG key, step) and `config` the resolved
ExperimentConfig as JSON. A checkpoint whose params are not all finite is refused (never written).

A checkpoint that does not load (truncated or damaged files: a disk filling up, a copy cut short)
is skipped with a warning, and loading falls back to the newest checkpoint that loads (`restore`,
`load_params`). The learner (`restore`, the workdir's only writer) then moves the skipped ones
aside to `checkpoints/corrupt-<step>/`, naming both paths; readers (`load_params`: `eval`,
`finetune --pretrained`) move nothing. When none loads, nothing is moved and
`NoCheckpointLoadsError` names every step and its error: a cause common to all of them (the
filesystem, a code change) must not send a run back to step 0 with its checkpoints renamed. A
checkpoint written with a different config is not corruption: that raises `ConfigMismatchError`.
Orbax's temporary folders left by an interrupted save (`<step>.orbax-checkpoint-tmp-*`) are
removed when the learner's manager is made (`make_manager`; only the learner writes checkpoints).

A save that fails for want of space (ENOSPC, or EDQUOT: a quota) removes its temporary folder
and raises `CheckpointWriteError`, which names the folder, the space left and the newest
complete checkpoint, from which a rerun resumes.
"""
from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from scaled_ql import compilation_cache
from scaled_ql.agents import builder, learner, methods
from scaled_ql.configs.base import ExperimentConfig

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = 'checkpoints'
CORRUPT_PREFIX = 'corrupt-'
MAX_TO_KEEP = 3
# Sub-configs that fix the shapes/meaning of the saved params: a restore must agree on them.
_PARAM_DEFINING = ('games', 'network', 'agent')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


class ConfigMismatchError(ValueError):
  """The checkpoint was written with a different games/network/agent config."""


class NoCheckpointLoadsError(FileNotFoundError):
  """A workdir holds checkpoints but none of them loads (`_newest_that_loads`)."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written: the filesystem is full (or over its quota)."""


_NO_SPACE = {errno.ENOSPC: ('ENOSPC', 'No space left on device'),
             errno.EDQUOT: ('EDQUOT', 'Disk quota exceeded')}


class _AbandonedWrites(logging.Filter):
  """asyncio's "Task exception was never retrieved" reports of the failed save's other writes."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not ('never retrieved' in record.getMessage() and error is not None
                and _no_space(error) is not None)


def _drop_reports_of_abandoned_writes() -> None:
  """After a save failed for want of space: Orbax's other writes of that save are abandoned
  asyncio tasks, and Python reports each one when it is collected or the interpreter shuts down
  (asyncio's "Task exception was never retrieved" with the same ENOSPC, or "Exception ignored in:
  <coroutine object _write_shard ...>"): hundreds of traceback lines after the error. Drops
  those reports, and only those (no-space errors; coroutines of Orbax's code); anything else
  still goes to the logger and to the unraisable hook that was there."""
  asyncio_log = logging.getLogger('asyncio')
  if not any(isinstance(f, _AbandonedWrites) for f in asyncio_log.filters):
    asyncio_log.addFilter(_AbandonedWrites())
  previous = sys.unraisablehook
  if getattr(previous, 'scaled_ql_drops_orbax_writes', False):
    return

  def hook(report):
    code = getattr(report.object, 'cr_code', None)
    if code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename:
      return
    previous(report)

  hook.scaled_ql_drops_orbax_writes = True
  sys.unraisablehook = hook


def _no_space(error: BaseException) -> Optional[str]:
  """'No space left on device' / 'Disk quota exceeded' when `error` or an exception it was raised
  from is one (an OSError's errno, or the text of TensorStore's errors, which Orbax raises as
  ValueError: RESOURCE_EXHAUSTED ... [OS error 28: ENOSPC ...]); else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
      return _NO_SPACE[error.errno][1]
    for code, text in _NO_SPACE.values():
      if code in str(error) or text in str(error):
        return text
    error = error.__cause__ or error.__context__
  return None


def make_manager(workdir: str, read_only: bool = False, keep_period: Optional[int] = None
                 ) -> ocp.CheckpointManager:
  """`keep_period`: steps that are multiples of it are kept beyond MAX_TO_KEEP
  (`train.keep_checkpoint_every_steps`)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=MAX_TO_KEEP, keep_period=keep_period, create=not read_only,
      read_only=read_only,
      # Interrupted saves leave `<step>.orbax-checkpoint-tmp-*` folders: the (single) writer
      # removes them on start.
      cleanup_tmp_directories=not read_only,
      # Synchronous: a save on SIGTERM must be complete before the process exits.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'config'))


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# How long a failed save's partial folder is retried: TensorStore's writes of the save can still
# be creating files in it after the save raised.
PARTIAL_SAVE_REMOVAL_S = 10.0


def _remove_partial_save(directory: str, step: int) -> list[str]:
  """Removes `<step>.orbax-checkpoint-tmp-*` (the space is the problem), retrying while writes
  still in flight add files to it (or make it again), until it has stayed away for a second;
  returns what is left after PARTIAL_SAVE_REMOVAL_S."""
  pattern = os.path.join(directory, f'{step}.orbax-checkpoint-tmp-*')
  deadline = time.monotonic() + PARTIAL_SAVE_REMOVAL_S
  gone_since = None
  while True:
    left = glob.glob(pattern)
    for tmp in left:
      shutil.rmtree(tmp, ignore_errors=True)
    left = [tmp for tmp in left if os.path.exists(tmp)]
    now = time.monotonic()
    gone_since = (gone_since or now) if not left else None
    if (gone_since is not None and now - gone_since >= 1.0) or now > deadline:
      return left
    time.sleep(0.2)


def _cache_note(workdir: str) -> str:
  """'; WORKDIR/compilation_cache, N MiB of compiled code, may be deleted' where the workdir
  holds the run's compilation cache (`scaled_ql.compilation_cache`), else ''."""
  size = compilation_cache.size_bytes(workdir)
  folder = os.path.join(workdir, compilation_cache.FOLDER)
  return f'; {folder}, {size / 2**20:.1f} MiB of compiled code, may be deleted' if size else ''


def save(manager: ocp.CheckpointManager, state: Any, cfg: ExperimentConfig) -> int:
  step = int(state.step)
  if not bool(_all_finite((state.params, state.behaviour_params, state.target_params))):
    raise FloatingPointError(
        f'refusing to checkpoint step {step}: the params contain NaN/inf; the last good '
        f'checkpoint (step {manager.latest_step()}) is kept in {manager.directory}')
  if manager.latest_step() == step:
    return step  # already saved (e.g. a periodic save followed by a SIGTERM save)
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               config=ocp.args.JsonSave(cfg.to_dict())))
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    reason = _no_space(e)
    if reason is None:
      raise
    _drop_reports_of_abandoned_writes()
    directory = os.fspath(manager.directory)
    left = _remove_partial_save(directory, step)
    free = shutil.disk_usage(directory).free
    latest = manager.latest_step()
    removed = (f'could not remove the partial save {left[0]}' if left else
               'after removing the partial save')
    raise CheckpointWriteError(
        f'checkpoint {step} could not be written to {directory}: {reason} ({free / 2**20:.1f} '
        f'MiB free there now, {removed}{_cache_note(os.path.dirname(directory))}). '
        + (f'The newest complete checkpoint is step {latest}: free some space (or move the '
           'workdir) and run the same command again to resume from it.' if latest is not None
           else 'No checkpoint is complete: free some space (or choose another --workdir) and '
           'run the same command again.')) from e
  return step


def _check_compatible(saved: ExperimentConfig, cfg: ExperimentConfig, where: str) -> None:
  for field in _PARAM_DEFINING:
    if getattr(saved, field) != getattr(cfg, field):
      raise ConfigMismatchError(
          f'checkpoint in {where} was written with a different {field!r} config: '
          f'{getattr(saved, field)} != {getattr(cfg, field)}')


def quarantine(manager: ocp.CheckpointManager, step: int, error: BaseException
               ) -> Optional[str]:
  """Moves checkpoint `step` to `checkpoints/corrupt-<step>[-k]/`, warns naming both paths and
  the error; returns the new path (None if the step is gone). The manager forgets the step.
  Only the learner calls it, on its own workdir: a reader renaming a step that the running
  learner's max_to_keep is deleting (its files go first, the folder last, so it fails to load as
  damage does) would make that delete fail."""
  directory = os.fspath(manager.directory)
  source = os.path.join(directory, str(step))
  if not os.path.isdir(source):
    manager.reload()
    return None
  target = os.path.join(directory, f'{CORRUPT_PREFIX}{step}')
  k = 1
  while os.path.exists(target):
    k += 1
    target = os.path.join(directory, f'{CORRUPT_PREFIX}{step}-{k}')
  os.rename(source, target)
  manager.reload()
  log.warning('checkpoint %s does not load (%s: %s); moved it to %s (an older one loaded)',
              source, type(error).__name__, _first_line(error), target)
  return target


def _newest_that_loads(manager: ocp.CheckpointManager, load: Callable[[int], Any], *,
                       move_aside: bool) -> Optional[tuple[int, Any]]:
  """(step, load(step)) for the newest step whose load succeeds; None if there is no step. The
  newer steps that failed are warned about and, with `move_aside` (the learner), quarantined once
  an older one has loaded. If none loads, nothing is moved: NoCheckpointLoadsError names each
  step and its error. A ConfigMismatchError (a valid checkpoint of another run) and running out
  of memory (the machine, not the checkpoint) are raised at once."""
  failed: list[tuple[int, BaseException]] = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      loaded = load(step)
    except ConfigMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any damage: JSON, OCDBT, tensorstore)
      if _is_out_of_memory(e):
        raise
      log.warning('checkpoint %s in %s does not load (%s: %s); trying an older one', step,
                  manager.directory, type(e).__name__, _first_line(e))
      failed.append((step, e))
      continue
    if move_aside:
      for bad, error in failed:
        quarantine(manager, bad, error)
    return step, loaded
  if failed:
    raise NoCheckpointLoadsError(
        f'{manager.directory} holds no complete checkpoint that loads; nothing was moved or '
        'deleted. Each step, newest first: ' + '; '.join(
            f'{step}: {type(e).__name__}: {_first_line(e)}' for step, e in failed) +
        '. If the files are damaged, move the step folders aside to start from an older one or '
        'from scratch; if every step fails alike, the cause is elsewhere (the filesystem, or '
        'code that no longer reads this run\'s state)')
  return None


def _first_line(error: BaseException) -> str:
  return str(error).splitlines()[0][:300] if str(error) else ''


def _is_out_of_memory(e: BaseException) -> bool:
  text = str(e)
  return isinstance(e, MemoryError) or 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text


def _restore_config(manager: ocp.CheckpointManager, step: int) -> ExperimentConfig:
  return ExperimentConfig.from_dict(
      manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)


def _state_of(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """The learner state saved at `step`. A step without its state item (a partial copy) is
  damaged: Orbax restores a missing item as None, which read as "no checkpoint" would restart
  the run from scratch."""
  state = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state
  if state is None:
    raise FileNotFoundError(f'checkpoint {step} in {manager.directory} has no learner state '
                            f'(its {step}/state folder is missing)')
  return state


def restore(manager: ocp.CheckpointManager, abstract_state: Any, cfg: ExperimentConfig,
            step: Optional[int] = None) -> Optional[Any]:
  """Restores the latest step that loads (or exactly `step`) into `abstract_state` (a tree of
  ShapeDtypeStructs with shardings); None if there is no checkpoint."""

  def load(s: int) -> Any:
    _check_compatible(_restore_config(manager, s), cfg, str(manager.directory))
    return _state_of(manager, s, abstract_state)

  if step is not None:
    return load(step)
  found = _newest_that_loads(manager, load, move_aside=True)
  return None if found is None else found[1]


def _workdir(checkpoint_dir_or_workdir: str) -> str:
  path = os.path.abspath(checkpoint_dir_or_workdir)
  if os.path.basename(path.rstrip('/')) == CHECKPOINT_SUBDIR:
    path = os.path.dirname(path)
  return path


def saved_steps(checkpoint_dir_or_workdir: str) -> list[int]:
  """Steps of the checkpoints in a learner workdir (or its `checkpoints/`), oldest first; [] if
  there are none (in-progress saves and checkpoints moved aside are not listed)."""
  directory = checkpoint_dir(_workdir(checkpoint_dir_or_workdir))
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def check_readable(checkpoint_dir_or_workdir: str) -> str:
  """The checkpoints folder of a learner workdir or of that folder itself, without reading it;
  FileNotFoundError names the path when it is a URL or holds no checkpoints folder."""
  if '://' in checkpoint_dir_or_workdir:  # (as a local path: "no checkpoints", a wrong reason)
    raise FileNotFoundError(f'{checkpoint_dir_or_workdir!r} is a URL; checkpoints are read from '
                            'a local or mounted path (a bucket mounted with gcsfuse)')
  folder = checkpoint_dir(_workdir(checkpoint_dir_or_workdir))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'no checkpoints in {checkpoint_dir_or_workdir!r} (expected a learner '
                            f'workdir containing {CHECKPOINT_SUBDIR}/ or that folder itself)')
  return folder


def _reader(checkpoint_dir_or_workdir: str) -> ocp.CheckpointManager:
  """A manager that reads the checkpoints of a learner workdir or its `checkpoints/`;
  FileNotFoundError names the path when there are none (`check_readable`)."""
  folder = check_readable(checkpoint_dir_or_workdir)
  # Not read_only (orbax then logs warnings), but create=False; this manager never saves.
  return ocp.CheckpointManager(
      folder, item_names=('state', 'config'),
      options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False))


def load_config(checkpoint_dir_or_workdir: str) -> tuple[ExperimentConfig, int]:
  """(config, step) of the newest checkpoint whose config reads, without reading any array: what
  a command checks its flags against before it loads the params (`load_params`). Like it, this
  leaves every checkpoint as it is."""
  manager = _reader(checkpoint_dir_or_workdir)
  errors = []
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        return _restore_config(manager, step), int(step)
      except Exception as e:  # pylint: disable=broad-except  (damage: load_params handles it)
        log.warning('the config of checkpoint %s does not read (%s: %s)', step,
                    type(e).__name__, _first_line(e))
        errors.append(f'step {step}: {type(e).__name__}: {e}')
  finally:
    manager.close()
  raise FileNotFoundError(f'{checkpoint_dir(_workdir(checkpoint_dir_or_workdir))} holds no '
                          'checkpoint whose config reads' +
                          (f' (the newest: {errors[0][:300]})' if errors else ''))


def load_params(checkpoint_dir_or_workdir: str, step: Optional[int] = None, *,
                online: bool = False) -> tuple[ExperimentConfig, Any, int]:
  """(config, params, step) of the latest checkpoint in a learner workdir or its `checkpoints/`.

  `params` is what `actors.make_policy` takes (`Method.policy_params`): the Q-network params
  (haiku dict), or for a method with a behaviour model (bcq) {'q': ..., 'behaviour': ...}. They
  are what the run's evaluators used: the moving average of the online params for a run with
  `agent.policy_params_ema` > 0, unless `online`; otherwise the online params.
  """
  path = _workdir(checkpoint_dir_or_workdir)
  manager = _reader(checkpoint_dir_or_workdir)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def load(s: int) -> tuple[ExperimentConfig, Any]:
    cfg = _restore_config(manager, s)
    like = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(lambda: learner.init_state(cfg, jax.random.PRNGKey(0))))
    return cfg, _state_of(manager, s, like)

  try:
    if step is not None:
      cfg, state = load(step)
    else:  # the newest checkpoint that loads (a reader moves none aside)
      found = _newest_that_loads(manager, load, move_aside=False)
      if found is None:
        raise FileNotFoundError(f'{checkpoint_dir(path)} holds no complete checkpoint')
      cfg, state = found[1]
  finally:
    manager.close()
  trainable = (state.params, state.behaviour_params)
  if not online:
    trainable = builder.policy_trainable(cfg.agent, trainable, state.opt_state)
  return cfg, methods.get(cfg.agent.loss).policy_params(*trainable), int(state.step)

"""orbax CheckpointManager: periodic async saves, keep N, auto-resume.

Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save never leaves a half-written checkpoint that
would be restored: a run loses at most the steps since the last save.
"""

import errno as errno_lib
import os
import re
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from mim_jax import errors
from mim_jax import optim


class IncompatibleCheckpointError(errors.WorkdirError):
  """The checkpoint holds another model or optimizer state than the
  config builds (a config change, not a damaged file)."""


def make_manager(workdir: str, *, keep: int, async_save: bool = True,
                 subdir: str = 'checkpoints') -> ocp.CheckpointManager:
  """The manager of `workdir/subdir` ('checkpoints': the latest states;
  'best': the state of the best evaluation, keep=1)."""
  # The save interval is applied by `save` (orbax would also save step 1).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), subdir)
      if '://' not in workdir else f'{workdir.rstrip("/")}/{subdir}',
      options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: Any, every: int,
         force: bool = False) -> bool:
  """Saves `state` (a TrainState pytree) if `step % every == 0` or `force`.

  Raises:
    CheckpointSaveError (one line: path and errno) if this save, or an
    earlier asynchronous one, failed.
  """
  if not force and step % every:
    return False
  # apply_fn and tx are static fields: the pytree holds step, params,
  # opt_state and ema_params.
  try:
    return mgr.save(step, args=ocp.args.StandardSave(state), force=True)
  except Exception as e:  # pylint: disable=broad-except
    raise checkpoint_error(e, mgr.directory) from e


def check_saves(mgr: ocp.CheckpointManager) -> None:
  """Raises CheckpointSaveError if a finished asynchronous save
  failed (called after every step, so a failure surfaces in the main
  thread at once, not at the next save or at exit)."""
  try:
    mgr.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    raise checkpoint_error(e, mgr.directory) from e


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: Any,
                   step: Optional[int] = None):
  """Restores the latest (or given) step into `abstract_state`.

  Args:
    mgr: the manager.
    abstract_state: the target: ShapeDtypeStructs with shardings (see
      `state_lib.create_train_state(materialize=False)`) or arrays.
    step: the step to restore; default the latest.

  Returns:
    (state, step) or (None, None) when the directory has no checkpoint.
  """
  step = mgr.latest_step() if step is None else step
  if step is None:
    return None, None
  logging.info('Restoring checkpoint of step %d from %s', step,
               mgr.directory)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  check_compatible(mgr, step, target)
  try:
    try:
      state = mgr.restore(step, args=ocp.args.StandardRestore(target))
    except ValueError as e:
      if not _is_legacy(e, target):
        raise
      state = _restore_legacy(mgr, step, target)
  except (ValueError, KeyError) as e:
    raise errors.WorkdirError(
        f'Checkpoint at step {step} in {mgr.directory} does not match this '
        f'model/optimizer ({e}). Use a fresh --workdir or the config the '
        'checkpoint was written with.') from e
  return state, step


def restore_with_fallback(mgr: ocp.CheckpointManager, abstract_state: Any,
                          damaged_dir: Optional[str] = None):
  """Restores the newest checkpoint that can be restored.

  A checkpoint that cannot be read (a truncated or missing file, a
  half-copied folder) is logged with the reason and the one before it is
  tried. The unreadable ones are then moved to `damaged_dir` (default:
  `<checkpoints>_damaged` next to the checkpoints), so later saves of those
  steps do not collide with them. A checkpoint of another model or
  optimizer is not damage: that error is raised at once.

  Returns:
    (state, step).

  Raises:
    IncompatibleCheckpointError: the config does not fit the checkpoints.
    errors.WorkdirError: no checkpoint could be restored (each step's
      reason).
  """
  failed = []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      state, _ = restore_latest(mgr, abstract_state, step)
    except IncompatibleCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      reason = f'{type(e).__name__}: {e}'.splitlines()[0][:300]
      logging.warning('Checkpoint of step %d in %s cannot be restored (%s); '
                      'trying the one before it.', step, mgr.directory,
                      reason)
      failed.append((step, reason))
      continue
    if failed:
      where = damaged_dir or str(mgr.directory).rstrip('/') + '_damaged'
      for bad, _ in failed if jax.process_index() == 0 else ():
        _move_aside(os.path.join(str(mgr.directory), str(bad)),
                    os.path.join(where, str(bad)))
      mgr.reload()
      logging.warning('Resumed from step %d, the newest checkpoint that '
                      'restores; unreadable steps %s moved to %s.', step,
                      [b for b, _ in failed], where)
    return state, step
  raise errors.WorkdirError(
      f'No checkpoint in {mgr.directory} can be restored: ' + '; '.join(
          f'step {s}: {r}' for s, r in failed) + '. Restore a copy of the '
      'checkpoints, or use a fresh --workdir.')


def _move_aside(src: str, dst: str) -> None:
  """Moves a damaged step folder out of the checkpoints (local paths; on
  object stores it is left in place and logged)."""
  if '://' in src:
    logging.warning('%s is unreadable; remove it by hand before this run '
                    'saves that step again.', src)
    return
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  if os.path.exists(dst):
    shutil.rmtree(dst)
  shutil.move(src, dst)


# TrainState fields of checkpoints written before target providers had a
# `target_state` field (mim_jax before M5).
_LEGACY_FIELDS = ('step', 'params', 'opt_state', 'ema_params')


def _is_legacy(error: ValueError, target) -> bool:
  """A checkpoint without the (empty) `target_state` field."""
  return ('target_state' in str(error) and
          getattr(target, 'target_state', 0) is None)


def _restore_legacy(mgr: ocp.CheckpointManager, step: int, target):
  """Restores a pre-M5 checkpoint (no `target_state`) into `target`: the
  stored fields are exactly those of the state without target providers,
  so nothing is lost or guessed."""
  logging.info('Step %d was written before TrainState.target_state '
               'existed; restoring its fields %s.', step, _LEGACY_FIELDS)
  fields = {k: getattr(target, k) for k in _LEGACY_FIELDS}
  restored = mgr.restore(step, args=ocp.args.StandardRestore(fields))
  return target.replace(**restored)


def _flat_shapes(tree) -> dict:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = '/'.join(optim.path_names(path))
    out[name] = tuple(getattr(leaf, 'shape', ()) or ())
  return out


def mismatches(mgr: ocp.CheckpointManager, step: int, target) -> list[str]:
  """How the arrays stored at `step` differ from the restore target, read
  from the checkpoint's metadata (nothing else is read): lines for the
  shape mismatches (both shapes) and the paths only on one side; [] when
  they fit or the metadata cannot be read (orbax's own restore checks then
  apply)."""
  try:
    meta = mgr.item_metadata(step)
    if meta is None:  # a freshly opened manager knows no item metadata yet
      meta = ocp.StandardCheckpointer().metadata(
          os.path.join(str(mgr.directory), str(step), 'default'))
      meta = getattr(meta, 'item_metadata', meta)
  except Exception:  # pylint: disable=broad-except
    return []
  meta = getattr(meta, 'tree', meta)
  if meta is None:
    return []
  stored, wanted = _flat_shapes(meta), _flat_shapes(target)
  only_ckpt = sorted(set(stored) - set(wanted))
  only_model = sorted(set(wanted) - set(stored))
  shapes = [f'{k}: checkpoint {stored[k]} vs model {wanted[k]}'
            for k in sorted(set(stored) & set(wanted))
            if stored[k] != wanted[k]]
  lines = []
  for title, items in (('shape mismatches', shapes),
                       ('only in the checkpoint', only_ckpt),
                       ('only in the model', only_model)):
    if items:
      lines.append(f'{len(items)} {title}: ' + '; '.join(items))
  return lines


def check_compatible(mgr: ocp.CheckpointManager, step: int, target) -> None:
  """Compares the stored arrays with the restore target, before reading.

  Raises:
    IncompatibleCheckpointError listing every path missing on either side
    and every shape mismatch, with both shapes (a restore onto another
    model).
  """
  lines = mismatches(mgr, step, target)
  if lines:
    raise IncompatibleCheckpointError(
        f'Checkpoint at step {step} in {mgr.directory} does not fit this '
        'model/optimizer: ' + ' | '.join(lines) + '. Use a fresh --workdir '
        'or the config the checkpoint was written with.')


class CheckpointSaveError(OSError):
  """A checkpoint could not be written."""


def _os_error(e: BaseException) -> Optional[OSError]:
  """The first OSError in `e`'s cause / context chain."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


# tensorstore reports OS errors inside a ValueError's text:
# 'Error writing local file "PATH": ... [os_error_code=\'20\']'.
_TS_ERRNO = re.compile(r"os_error_code='(\d+)'")
_TS_PATH = re.compile(r'"(/[^"]+)"')


# The errno of an OSError subclass raised with a message only.
_ERRNO_OF = {FileNotFoundError: errno_lib.ENOENT,
             NotADirectoryError: errno_lib.ENOTDIR,
             IsADirectoryError: errno_lib.EISDIR,
             PermissionError: errno_lib.EACCES,
             FileExistsError: errno_lib.EEXIST}


def checkpoint_error(e: BaseException, directory) -> CheckpointSaveError:
  """A one-line error for a failed save into `directory`: the path and
  the OS error (errno) when there is one."""
  os_err = _os_error(e)
  text = str(e)
  code, path = None, str(directory)
  if os_err is not None and (os_err.errno or type(os_err) in _ERRNO_OF):
    # (libraries raise e.g. NotADirectoryError(message) without an errno)
    code = os_err.errno or _ERRNO_OF[type(os_err)]
    path = os_err.filename or path
  elif _TS_ERRNO.search(text):
    code = int(_TS_ERRNO.search(text).group(1))
    found = _TS_PATH.search(text)
    path = found.group(1) if found else path
  if code:
    what = (f'[Errno {code} {errno_lib.errorcode.get(code, "")}] '
            f'{os.strerror(code)}')
  else:
    what = f'{type(e).__name__}: {text}'.splitlines()[0]
  return CheckpointSaveError(
      f'checkpoint save failed in {path}: {what}. Training stopped; the '
      'newest complete checkpoint is intact. Make the checkpoint directory '
      'writable (or free space), then rerun with the same --workdir.')

"""What keeps a long run safe on the host side: the non-finite monitor,
stop signals, and checkpoint-save failures.

- `NonFiniteMonitor` reads the train step's `skipped` / `nonfinite_at`
  metrics (`steps.make_train_step(guard=True)` has already kept the state
  unchanged on such a step) and stops the run after `max_consecutive`
  skips in a row, or at the first with `action='stop'`. It reads each
  step's flags one step late, so the host never waits for the step it has
  just dispatched.
- `StopSignals` turns SIGTERM / SIGINT into a flag the train loop reads
  after each step: the loop saves, waits for pending saves and exits with
  `EXIT_STOPPED`.
- `checkpoint_error` turns a failed (asynchronous) save into one line that
  names the path and the OS error.
- `user_errors` marks the errors of a run's setup (bad config, missing
  data, unreadable files) so the CLI prints them without a traceback.
"""

import contextlib
import errno as errno_lib
import os
import re
import signal
import threading
from typing import Callable, Optional, Sequence

import numpy as np
from absl import logging

# The exit status after a stop signal once the state is saved (EX_TEMPFAIL:
# "try again"): a supervisor restarts the job, which resumes.
EXIT_STOPPED = 75
NONFINITE_ACTIONS = ('skip', 'stop')


# Errors a run's setup raises for bad input (config, data, checkpoint or
# weights files): the CLI prints them as one line, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError,
               IsADirectoryError, PermissionError)


@contextlib.contextmanager
def user_errors():
  """Marks USER_ERRORS raised inside as the user's (`is_user_error`); they
  propagate unchanged."""
  try:
    yield
  except USER_ERRORS as e:
    mark_user_error(e)
    raise


def mark_user_error(e: BaseException) -> BaseException:
  """`e`, marked as the user's (see `user_errors`)."""
  e.mim_jax_user_error = True
  return e


def is_user_error(e: BaseException) -> bool:
  return bool(getattr(e, 'mim_jax_user_error', False))


class NonFiniteError(FloatingPointError):
  """Training met non-finite values it may not skip (any more)."""


class Stopped(Exception):
  """The run stopped on a signal after saving its state."""

  def __init__(self, message: str, exit_code: int = EXIT_STOPPED):
    super().__init__(message)
    self.exit_code = exit_code


class CheckpointSaveError(OSError):
  """A checkpoint could not be written."""


class NonFiniteMonitor:
  """Host side of the non-finite guard (see the module docstring).

  Args:
    action: 'skip' (stop after `max_consecutive` skipped steps in a row) or
      'stop' (stop at the first).
    max_consecutive: K.
    names: `steps.nonfinite_names(state)`: the name of each checked array.
    latest_checkpoint: returns the newest saved step (None: none yet).
  """

  def __init__(self, action: str, max_consecutive: int,
               names: Sequence[str],
               latest_checkpoint: Callable[[], Optional[int]]):
    self.action, self.max_consecutive = action, max_consecutive
    self.names = list(names)
    self.latest_checkpoint = latest_checkpoint
    self.consecutive = self.total = 0
    self._pending = []

  def observe(self, step: int, metrics: dict) -> None:
    """Queues the metrics of `step` (device arrays) and checks the steps
    before it."""
    self._pending.append((step, metrics['skipped'], metrics['nonfinite_at']))
    while len(self._pending) > 1:
      self._check(*self._pending.pop(0))

  def settle(self) -> None:
    """Checks every queued step (waits for the last one): before a save
    and at the end."""
    while self._pending:
      self._check(*self._pending.pop(0))

  def _check(self, step: int, skipped, where) -> None:
    if not float(np.asarray(skipped)):
      self.consecutive = 0
      return
    self.consecutive += 1
    self.total += 1
    name = self.names[int(np.asarray(where))]
    logging.warning('Step %d: non-finite %s; the update was skipped (%d in '
                    'a row, %d in this run).', step, name, self.consecutive,
                    self.total)
    if self.action == 'skip' and self.consecutive < self.max_consecutive:
      return
    latest = self.latest_checkpoint()
    why = ('nonfinite=stop' if self.action == 'stop' else
           f'{self.consecutive} steps in a row were skipped '
           f'(max_consecutive_skips={self.max_consecutive})')
    resume = (f'the newest checkpoint, step {latest}, holds only finite '
              f'values; rerun with the same --workdir to resume from it'
              if latest is not None else 'no checkpoint was written yet')
    raise NonFiniteError(
        f'non-finite {name} at step {step}: {why}. The state was never '
        f'updated with non-finite values; {resume}. Fixes: lower the lr, '
        'set --config.optim.grad_clip_norm, use float32 compute, or check '
        'the data.')


class StopSignals:
  """Context manager: SIGTERM and SIGINT set `received` (the signal
  number) instead of ending the process, so the train loop can finish its
  step and save. A second signal of the same kind acts as usual (a second
  Ctrl-C interrupts at once). Installed only in the main thread of a
  single-process run: multi-host runs keep JAX's preemption notice
  (`CheckpointManager.reached_preemption`), which every host agrees on.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool = True):
    self.enabled = enabled and (threading.current_thread()
                                is threading.main_thread())
    self.received = None
    self._old = {}

  def _handler(self, signum, _frame):
    self.received = signum
    logging.warning('%s received: finishing this step, saving, then '
                    'stopping (send it again to stop at once).',
                    signal.Signals(signum).name)
    signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

  def __enter__(self):
    if self.enabled:
      for s in self.SIGNALS:
        self._old[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old = {}
    return False

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name if self.received else ''


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

"""Stop signals: SIGTERM / SIGINT end a run cleanly, after a save.

`StopSignals` turns the signals into a flag that the checkpoint hook reads
after each step (`mim_jax.hooks.Checkpointer`): it saves the state, waits
for the save and raises `Stopped`, and the CLI exits with `EXIT_STOPPED`
so that a supervisor reruns the job, which resumes.
"""

import signal
import threading

from absl import logging

# The exit status after a stop signal once the state is saved (EX_TEMPFAIL:
# "try again"): a supervisor restarts the job, which resumes.
EXIT_STOPPED = 75


class Stopped(Exception):
  """The run stopped on a signal after saving its state."""

  def __init__(self, message: str, exit_code: int = EXIT_STOPPED):
    super().__init__(message)
    self.exit_code = exit_code


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

"""One training run per workdir: a lock file, DIR/run.lock.

Two runs on one workdir would both train from the same checkpoints,
interleave their rows in metrics.jsonl and overwrite each other's
checkpoints, and both exit 0. `RunLock` makes the second one stop at once
with `WorkdirBusyError`, one line naming the owner and the fix.

The lock is a small JSON file (`Owner`): host, pid, pid namespace, start
time, a heartbeat time, the last step reported, the command line, and a
random token that tells this lock from any other. On a pod only process 0
takes it (`enabled=False` elsewhere makes every method a no-op).

Taking the lock:
- No file: create it. On a local filesystem that is an atomic create
  (O_CREAT | O_EXCL): of two runs starting together exactly one wins. On
  an object store (gs://, via tf.io.gfile) there is no atomic create
  through gfile, so the run writes the file, waits `settle_s` and reads it
  back: it owns the lock if its token is still there. That is safe unless
  another run read "no lock" and wrote its own more than `settle_s` later
  (a stall of seconds between two requests); GCS reads after writes are
  strongly consistent, so the read back sees the last write.
- A live owner's file: refuse (`WorkdirBusyError`), or with `wait_s` poll
  until it is released or goes stale.
- A stale file: take it over, with a log line. Stale means its heartbeat is
  older than `stale_after_s`, or its owner ran on this host (same host name
  and pid namespace) and its pid is gone (killed with SIGKILL, a crashed
  VM's restart) or is a zombie. A file that cannot be parsed is judged by
  its modification time.

While the run lives, `heartbeat()` rewrites the heartbeat time, at most
every `heartbeat_every_s` (otherwise it only compares two floats), and a
daemon thread (`keepalive`) does the same, so a long compile, evaluation
or checkpoint save never lets the lock go stale. A failed write is logged
as a warning and retried at the next interval; it never stops training.
Before each write the file is read: if another run has taken it over
(this run's heartbeat was judged stale), `heartbeat()` raises
`WorkdirBusyError` in the training thread, and the run must stop without
saving, since the checkpoints now belong to the other run.

`release()` (or leaving the `with` block, normally or by an exception)
stops the thread and removes the file if it is still this run's.

Limits: staleness compares this host's clock with the heartbeat time
written by the owner's host (keep clocks in sync; NTP is enough for the
default 300 s). A takeover first re-reads the file and removes it only if
it is still the stale one; two runs taking over the same stale lock at the
same instant are caught by the atomic create (local) or the read back
(object stores).
"""

import dataclasses
import datetime
import json
import os
import socket
import sys
import threading
import time
from typing import Optional
import uuid

from absl import logging

from mim_jax import errors

LOCK_FILE = 'run.lock'
# A heartbeat older than this marks the lock stale (10 missed heartbeats).
STALE_AFTER_S = 300.0
# Seconds between two writes of the heartbeat.
HEARTBEAT_EVERY_S = 30.0
# Object stores: seconds between writing the lock and reading it back.
SETTLE_S = 2.0
# Seconds between two looks at a busy lock when waiting (`wait_s`).
POLL_S = 10.0
BACKENDS = ('auto', 'local', 'gfile')

# Tokens of the locks this process holds: a second RunLock of this process
# on the same workdir is refused, while a lock left with this process's pid
# by an earlier process (a reused pid) is stale.
_HELD = set()


class WorkdirBusyError(errors.WorkdirError):
  """Another run holds the workdir's lock (or took it over from this one).
  """


def _now_iso(t: float) -> str:
  return datetime.datetime.fromtimestamp(
      t, datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')


def _pid_namespace() -> Optional[str]:
  """This process's pid namespace ('pid:[4026531836]'; None off Linux):
  two containers may share a host name but not their pids."""
  try:
    return os.readlink('/proc/self/ns/pid')
  except OSError:
    return None


def pid_alive(pid: int) -> bool:
  """Whether process `pid` of this host runs (a zombie does not)."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # EPERM: it exists, as another user
    return True
  try:
    with open(f'/proc/{pid}/stat') as f:
      state = f.read().rsplit(')', 1)[1].split()[0]
  except (OSError, IndexError):
    return True
  return state != 'Z'


@dataclasses.dataclass(frozen=True)
class Owner:
  """The content of a lock file (JSON)."""
  host: str
  pid: int
  pid_namespace: Optional[str]
  started_at: float
  heartbeat_at: float
  token: str
  step: Optional[int] = None
  command: str = ''

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    d['started'] = _now_iso(self.started_at)
    d['heartbeat'] = _now_iso(self.heartbeat_at)
    return json.dumps(d, indent=1) + '\n'

  @classmethod
  def from_json(cls, text: str) -> 'Owner':
    """Raises ValueError (or KeyError / TypeError) on a damaged file."""
    d = json.loads(text)
    return cls(host=str(d['host']), pid=int(d['pid']),
               pid_namespace=d.get('pid_namespace'),
               started_at=float(d['started_at']),
               heartbeat_at=float(d['heartbeat_at']), token=str(d['token']),
               step=None if d.get('step') is None else int(d['step']),
               command=str(d.get('command', '')))


@dataclasses.dataclass(frozen=True)
class _Unreadable:
  """A lock file that exists but does not parse (being written, or
  damaged); judged by its modification time."""
  why: str
  mtime: float


class _LocalFiles:
  """Lock files on a local (POSIX) filesystem: atomic create and replace."""

  atomic_create = True

  def makedirs(self, path: str) -> None:
    os.makedirs(path, exist_ok=True)

  def read(self, path: str) -> Optional[str]:
    try:
      with open(path) as f:
        return f.read()
    except FileNotFoundError:
      return None

  def mtime(self, path: str) -> float:
    return os.stat(path).st_mtime

  def create(self, path: str, text: str) -> bool:
    """Writes `text` to a new file; False if `path` exists."""
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    return True

  def write(self, path: str, text: str) -> None:
    """Replaces the file atomically (readers never see half of it)."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)

  def remove(self, path: str) -> None:
    try:
      os.remove(path)
    except FileNotFoundError:
      pass


class _GFiles:
  """Lock files through tf.io.gfile (gs:// and other object stores): no
  atomic create, so `RunLock` reads its write back after `settle_s`."""

  atomic_create = False

  def __init__(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.gfile, self.errors = tf.io.gfile, tf.errors

  def makedirs(self, path: str) -> None:
    self.gfile.makedirs(path)

  def read(self, path: str) -> Optional[str]:
    try:
      with self.gfile.GFile(path, 'r') as f:
        return f.read()
    except self.errors.NotFoundError:
      return None

  def mtime(self, path: str) -> float:
    return self.gfile.stat(path).mtime_nsec / 1e9

  def create(self, path: str, text: str) -> bool:
    if self.gfile.exists(path):
      return False
    self.write(path, text)
    return True

  def write(self, path: str, text: str) -> None:
    with self.gfile.GFile(path, 'w') as f:
      f.write(text)

  def remove(self, path: str) -> None:
    try:
      self.gfile.remove(path)
    except self.errors.NotFoundError:
      pass


def _files(workdir: str, backend: str):
  if backend not in BACKENDS:
    raise ValueError(f'run lock backend={backend!r}: use one of {BACKENDS}.')
  if backend == 'local' or (backend == 'auto' and '://' not in workdir):
    return _LocalFiles()
  return _GFiles()


def read_owner(workdir: str, backend: str = 'auto') -> Optional[Owner]:
  """The owner recorded in `workdir`'s lock file (None: no lock, or one
  that does not parse)."""
  files = _files(workdir, backend)
  text = files.read(os.path.join(workdir, LOCK_FILE))
  try:
    return None if text is None else Owner.from_json(text)
  except (ValueError, KeyError, TypeError):
    return None


def _transient_errors(files) -> tuple:
  if isinstance(files, _GFiles):
    return (OSError, files.errors.OpError)
  return (OSError,)


class RunLock:
  """The lock of one run on `workdir` (see the module docstring).

  Use as a context manager, or call `acquire()` and `release()`:

    with runlock.RunLock(workdir, enabled=jax.process_index() == 0) as lock:
      for step in ...:
        ...
        lock.heartbeat(step)

  Args:
    workdir: the run's folder (local or gs://); created if missing.
    enabled: False: every method does nothing (the other processes of a
      pod).
    stale_after_s: a heartbeat older than this makes the lock stale.
    heartbeat_every_s: the least time between two heartbeat writes.
    keepalive: also write the heartbeat from a daemon thread, every
      `heartbeat_every_s`, so it never depends on the training loop.
    wait_s: when the lock is busy, poll it (every `POLL_S`) up to this
      long for it to be released or go stale before refusing.
    settle_s: object stores: the wait between writing the lock and reading
      it back.
    backend: 'auto' (gfile for paths with '://', else the local
      filesystem), 'local' or 'gfile'.
  """

  def __init__(self, workdir: str, *, enabled: bool = True,
               stale_after_s: float = STALE_AFTER_S,
               heartbeat_every_s: float = HEARTBEAT_EVERY_S,
               keepalive: bool = True, wait_s: float = 0.0,
               settle_s: float = SETTLE_S, backend: str = 'auto'):
    if not 0 < heartbeat_every_s < stale_after_s:
      raise ValueError(
          f'run lock: heartbeat_every_s={heartbeat_every_s} must be in '
          f'(0, stale_after_s={stale_after_s}).')
    self.workdir, self.enabled = workdir, enabled
    self.path = os.path.join(workdir, LOCK_FILE)
    self.stale_after_s = float(stale_after_s)
    self.heartbeat_every_s = float(heartbeat_every_s)
    self.keepalive, self.wait_s, self.settle_s = keepalive, wait_s, settle_s
    self._files = _files(workdir, backend) if enabled else None
    self.host, self.pid = socket.gethostname(), os.getpid()
    self.token = uuid.uuid4().hex
    self.held = False
    # The owner that took the lock over from this run, once seen.
    self.lost_to: Optional[Owner] = None
    self._started = self._last_write = 0.0
    self._step = None
    self._mutex = threading.Lock()
    self._stop = threading.Event()
    self._thread = None

  # ------------------------------------------------------------- acquire

  def __enter__(self) -> 'RunLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> 'RunLock':
    """Takes the lock, or raises WorkdirBusyError (one line: the owner and
    the fix)."""
    if not self.enabled or self.held:
      return self
    self._files.makedirs(self.workdir)
    deadline = time.time() + self.wait_s
    while True:
      try:
        self._try_acquire()
        break
      except WorkdirBusyError as e:
        left = deadline - time.time()
        if left <= 0:
          raise
        logging.info('%s Waiting up to %.0f s more.', e, left)
        time.sleep(min(POLL_S, left))
    self.held = True
    self._last_write = self._started
    _HELD.add(self.token)
    logging.info('Run lock %s taken (host %s, pid %d).', self.path,
                 self.host, self.pid)
    if self.keepalive:
      self._thread = threading.Thread(target=self._keepalive, daemon=True,
                                      name='run-lock-heartbeat')
      self._thread.start()
    return self

  def _record(self, now: float) -> Owner:
    return Owner(host=self.host, pid=self.pid,
                 pid_namespace=_pid_namespace(),
                 started_at=self._started, heartbeat_at=now,
                 token=self.token, step=self._step,
                 command=' '.join(sys.argv)[:500])

  def _read(self):
    """The lock file: None (absent), an Owner, or _Unreadable."""
    text = self._files.read(self.path)
    if text is None:
      return None
    try:
      return Owner.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
      try:
        mtime = self._files.mtime(self.path)
      except _transient_errors(self._files):
        return None  # removed meanwhile
      return _Unreadable(f'{type(e).__name__}: {e}'.splitlines()[0], mtime)

  def _try_acquire(self) -> None:
    # A racing run may create or remove the file between two of our steps:
    # each round reads afresh.
    for _ in range(3):
      current = self._read()
      if current is not None:
        why = self.stale(current)
        if why is None:
          raise WorkdirBusyError(self.busy_message(current))
        if not self._remove_if_same(current):
          continue
      self._started = time.time()
      if not self._files.create(self.path,
                                self._record(self._started).to_json()):
        continue
      if not self._files.atomic_create:
        time.sleep(self.settle_s)
        back = self._read()
        if not (isinstance(back, Owner) and back.token == self.token):
          raise WorkdirBusyError(self.busy_message(back))
      if current is not None:
        logging.warning('Took over the run lock %s of a dead run (%s): %s.',
                        self.path, self.describe(current), why)
      return
    raise WorkdirBusyError(self.busy_message(self._read()))

  def _remove_if_same(self, seen) -> bool:
    """Removes the lock file if it still is `seen`; False if it changed."""
    now = self._read()
    if now is None:
      return True
    same = (now.token == seen.token if isinstance(now, Owner)
            and isinstance(seen, Owner) else now == seen)
    if same:
      self._files.remove(self.path)
    return same

  def stale(self, owner) -> Optional[str]:
    """Why the lock of `owner` (an Owner or unreadable) may be taken over,
    or None while it is live."""
    now = time.time()
    if isinstance(owner, _Unreadable):
      age = now - owner.mtime
      return (f'unreadable and unchanged for {age:.0f} s' if
              age > self.stale_after_s else None)
    age = now - owner.heartbeat_at
    if age > self.stale_after_s:
      return (f'its last heartbeat is {age:.0f} s old (over '
              f'{self.stale_after_s:.0f} s)')
    if (owner.host == self.host and owner.pid_namespace == _pid_namespace()):
      if owner.pid == self.pid and owner.token not in _HELD:
        return 'left with this pid by an earlier process'
      if owner.pid != self.pid and not pid_alive(owner.pid):
        return f'pid {owner.pid} no longer runs on this host'
    return None

  def describe(self, owner) -> str:
    """'host H, pid P, started at T, last heartbeat N s ago (step S)'."""
    if isinstance(owner, _Unreadable):
      return (f'an unreadable lock file ({owner.why}) written '
              f'{time.time() - owner.mtime:.0f} s ago')
    step = f' at step {owner.step}' if owner.step is not None else ''
    return (f'host {owner.host}, pid {owner.pid}, started at '
            f'{_now_iso(owner.started_at)}, last heartbeat '
            f'{max(0.0, time.time() - owner.heartbeat_at):.0f} s ago{step}')

  def busy_message(self, owner) -> str:
    if owner is None:
      return (f'{self.workdir} is being taken by another run (its lock file '
              f'{self.path} changed while this run took it). Wait, or use '
              'another --workdir.')
    return (f'{self.workdir} is in use by another run ({self.describe(owner)}'
            '); a second run would mix its checkpoints and metrics with it. '
            f'Wait for that run to end, or, if it is dead, remove {self.path}'
            ' (a lock is also taken over once its heartbeat is over '
            f'{self.stale_after_s:.0f} s old).')

  # ----------------------------------------------------------- heartbeat

  def heartbeat(self, step: Optional[int] = None) -> None:
    """Notes `step` and, at most every `heartbeat_every_s`, rewrites the
    heartbeat time. Cheap between writes; a failed write logs a warning.

    Raises:
      WorkdirBusyError: another run has taken the lock over from this one
        (it judged this run dead): stop without saving anything.
    """
    if not self.held:
      return
    if step is not None:
      self._step = int(step)
    if time.time() - self._last_write >= self.heartbeat_every_s:
      self._beat()
    if self.lost_to is not None:
      raise WorkdirBusyError(
          f'{self.workdir} was taken over by another run '
          f'({self.describe(self.lost_to)}) that judged this run dead (no '
          f'heartbeat for {self.stale_after_s:.0f} s). Stopping this run '
          'without saving: the workdir now belongs to the other one.')

  def _beat(self) -> None:
    with self._mutex:
      now = time.time()
      if self.lost_to is not None or (
          now - self._last_write < self.heartbeat_every_s):
        return
      self._last_write = now
      try:
        current = self._read()
        if isinstance(current, Owner) and current.token != self.token:
          self.lost_to = current
          logging.error('The run lock %s was taken over by %s.', self.path,
                        self.describe(current))
          return
        if current is None:
          logging.warning('The run lock %s was removed while this run '
                          'holds it; writing it again.', self.path)
        self._files.write(self.path, self._record(now).to_json())
      except _transient_errors(self._files) as e:
        logging.warning('Could not refresh the run lock %s (%s: %s); '
                        'training goes on, next try in %.0f s.', self.path,
                        type(e).__name__, e, self.heartbeat_every_s)

  def _keepalive(self) -> None:
    while not self._stop.wait(self.heartbeat_every_s):
      try:
        self._beat()
      except Exception as e:  # pylint: disable=broad-except
        # The thread must outlive any error: the loop's own heartbeat
        # reports it.
        logging.warning('Run lock heartbeat thread: %s: %s',
                        type(e).__name__, e)

  # ------------------------------------------------------------- release

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still this
    run's. Never raises (it also runs while an exception propagates)."""
    if not self.held:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=60)
    self.held = False
    _HELD.discard(self.token)
    try:
      current = self._read()
      if isinstance(current, Owner) and current.token == self.token:
        self._files.remove(self.path)
        logging.info('Run lock %s released.', self.path)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not remove the run lock %s (%s: %s); the next '
                      'run takes it over once it is stale.', self.path,
                      type(e).__name__, e)


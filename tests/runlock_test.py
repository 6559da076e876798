"""The run lock (mim_jax/runlock.py) with real processes and real files."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from mim_jax import runlock

# Takes the lock on argv[1], says 'held' (or 'busy <message>' and exits 3),
# then holds it until its stdin closes.
HOLDER = """
import sys
from mim_jax import runlock
try:
  lock = runlock.RunLock(sys.argv[1]).acquire()
except runlock.WorkdirBusyError as e:
  print('busy', e, flush=True)
  sys.exit(3)
print('held', flush=True)
sys.stdin.read()
lock.release()
"""


def _start(workdir):
  return subprocess.Popen(
      [sys.executable, '-c', HOLDER, str(workdir)], cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.PIPE,
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _hold(workdir):
  proc = _start(workdir)
  assert proc.stdout.readline().strip() == 'held'
  return proc


def _lock_file(workdir) -> dict:
  with open(os.path.join(workdir, runlock.LOCK_FILE)) as f:
    return json.load(f)


def _write_owner(workdir, **fields):
  now = time.time()
  owner = dict(host='elsewhere', pid=12345, pid_namespace=None,
               started_at=now - 3600, heartbeat_at=now, token='other',
               step=7)
  owner.update(fields)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, runlock.LOCK_FILE)
  with open(path, 'w') as f:
    f.write(runlock.Owner(**owner).to_json())
  return path


@pytest.fixture
def warnings(caplog):
  caplog.set_level(logging.INFO)
  return caplog


def test_a_second_process_is_refused_with_one_line_naming_the_owner(
    tmp_path):
  wd = tmp_path / 'run'
  holder = _hold(wd)
  try:
    with pytest.raises(runlock.WorkdirBusyError) as e:
      runlock.RunLock(str(wd)).acquire()
    msg = str(e.value)
    assert '\n' not in msg
    assert f'pid {holder.pid}, started at ' in msg
    assert 'last heartbeat 0 s ago' in msg
    assert f'if it is dead, remove {wd}/run.lock' in msg
    # A third process is refused the same way.
    other = _start(wd)
    line = other.stdout.readline()
    assert other.wait(timeout=30) == 3
    assert line.startswith('busy ') and f'pid {holder.pid}' in line
  finally:
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
  # Released on exit: the next run takes it.
  assert not (wd / runlock.LOCK_FILE).exists()
  with runlock.RunLock(str(wd)) as lock:
    assert _lock_file(wd)['token'] == lock.token
  assert not (wd / runlock.LOCK_FILE).exists()


def test_of_runs_started_together_exactly_one_takes_the_lock(tmp_path):
  wd = tmp_path / 'run'
  procs = [_start(wd) for _ in range(4)]
  try:
    first = [p.stdout.readline().split()[0] for p in procs]
    assert sorted(first) == ['busy', 'busy', 'busy', 'held']
  finally:
    for p in procs:
      p.stdin.close()
      p.wait(timeout=30)


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, warnings):
  wd = tmp_path / 'run'
  holder = _hold(wd)
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait(timeout=30)
  assert _lock_file(wd)['pid'] == holder.pid  # left behind
  with runlock.RunLock(str(wd)) as lock:
    assert _lock_file(wd)['token'] == lock.token
  assert f'pid {holder.pid} no longer runs on this host' in warnings.text


def test_a_stale_heartbeat_is_taken_over_a_fresh_one_refused(tmp_path,
                                                            warnings):
  wd = str(tmp_path / 'run')
  _write_owner(wd, heartbeat_at=time.time() - 20)
  with pytest.raises(runlock.WorkdirBusyError,
                     match=r'host elsewhere, pid 12345, .*last heartbeat '
                     r'20 s ago at step 7\)'):
    runlock.RunLock(wd, stale_after_s=60).acquire()
  with runlock.RunLock(wd, stale_after_s=10, heartbeat_every_s=1) as lock:
    assert _lock_file(wd)['token'] == lock.token
  assert 'last heartbeat is 20 s old (over 10 s)' in warnings.text
  # An unreadable file (a run writing it, or damage) goes by its age.
  path = os.path.join(wd, runlock.LOCK_FILE)
  with open(path, 'w') as f:
    f.write('{"host": ')
  with pytest.raises(runlock.WorkdirBusyError, match='unreadable lock file'):
    runlock.RunLock(wd).acquire()
  os.utime(path, (time.time() - 1000,) * 2)
  with runlock.RunLock(wd):
    pass


def test_heartbeat_is_rate_limited_and_survives_write_errors(tmp_path,
                                                            warnings):
  wd = str(tmp_path / 'run')
  with runlock.RunLock(wd, heartbeat_every_s=0.3, keepalive=False) as lock:
    start = _lock_file(wd)
    lock.heartbeat(3)  # too soon: nothing written
    assert _lock_file(wd) == start
    time.sleep(0.35)
    lock.heartbeat(4)
    now = _lock_file(wd)
    assert now['step'] == 4 and now['heartbeat_at'] > start['heartbeat_at']
    assert now['started_at'] == start['started_at']

    def fail(*unused):
      raise OSError('transient')

    lock._files.write = fail  # pylint: disable=protected-access
    time.sleep(0.35)
    lock.heartbeat(5)  # logs, does not raise
    assert 'Could not refresh the run lock' in warnings.text
    assert _lock_file(wd) == now


def test_the_keepalive_thread_beats_without_the_loop(tmp_path):
  wd = str(tmp_path / 'run')
  lock = runlock.RunLock(wd, heartbeat_every_s=0.1).acquire()
  start = _lock_file(wd)['heartbeat_at']
  time.sleep(0.5)
  assert _lock_file(wd)['heartbeat_at'] > start
  lock.release()
  assert not os.path.exists(os.path.join(wd, runlock.LOCK_FILE))
  assert not lock._thread.is_alive()  # pylint: disable=protected-access


def test_released_on_an_exception_and_refused_twice_in_one_process(
    tmp_path):
  wd = str(tmp_path / 'run')
  with pytest.raises(RuntimeError, match='boom'):
    with runlock.RunLock(wd):
      with pytest.raises(runlock.WorkdirBusyError, match=f'pid {os.getpid()}'):
        runlock.RunLock(wd).acquire()
      raise RuntimeError('boom')
  assert not os.path.exists(os.path.join(wd, runlock.LOCK_FILE))
  # Other processes of a pod take nothing.
  with runlock.RunLock(wd, enabled=False) as lock:
    lock.heartbeat(1)
    assert not os.path.exists(os.path.join(wd, runlock.LOCK_FILE))


def test_a_run_whose_lock_was_taken_over_is_told_to_stop(tmp_path):
  wd = str(tmp_path / 'run')
  lock = runlock.RunLock(wd, heartbeat_every_s=0.1, keepalive=False)
  lock.acquire()
  path = _write_owner(wd, token='newer')
  time.sleep(0.15)
  with pytest.raises(runlock.WorkdirBusyError,
                     match='taken over by another run .*host elsewhere'):
    lock.heartbeat(9)
  lock.release()  # leaves the new owner's file
  assert _lock_file(wd)['token'] == 'newer'
  os.remove(path)


def test_the_gfile_backend_keeps_the_same_protocol(tmp_path, warnings):
  """gs:// paths go through tf.io.gfile (write, settle, read back); here on
  a local path."""
  wd = str(tmp_path / 'run')
  gfile = dict(backend='gfile', settle_s=0.01)
  lock = runlock.RunLock(wd, heartbeat_every_s=0.1, keepalive=False,
                         **gfile).acquire()
  with pytest.raises(runlock.WorkdirBusyError, match='in use by another'):
    runlock.RunLock(wd, **gfile).acquire()
  first = _lock_file(wd)
  time.sleep(0.15)
  lock.heartbeat(2)
  assert _lock_file(wd)['heartbeat_at'] > first['heartbeat_at']
  assert runlock.read_owner(wd, backend='gfile').step == 2
  lock.release()
  assert runlock.read_owner(wd, backend='gfile') is None
  _write_owner(wd, heartbeat_at=time.time() - 1000)
  with runlock.RunLock(wd, **gfile) as lock:
    assert _lock_file(wd)['token'] == lock.token
  assert 'Took over the run lock' in warnings.text


def test_wait_s_polls_until_the_lock_goes_stale(tmp_path, monkeypatch):
  wd = str(tmp_path / 'run')
  monkeypatch.setattr(runlock, 'POLL_S', 0.1)
  _write_owner(wd, heartbeat_at=time.time() - 9.0)
  with pytest.raises(runlock.WorkdirBusyError):
    runlock.RunLock(wd, stale_after_s=10, heartbeat_every_s=1,
                    wait_s=0.05).acquire()
  t = time.time()
  with runlock.RunLock(wd, stale_after_s=10, heartbeat_every_s=1,
                       wait_s=5) as lock:
    assert _lock_file(wd)['token'] == lock.token
  assert time.time() - t < 3

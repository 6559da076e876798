"""End to end: the CLI trains, logs, checkpoints, draws, and resumes."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import PipelineCrash
from conftest import ROOT
from conftest import crash_train_pipeline
from conftest import tiny_mae_config
from mim_jax import errors
from mim_jax import train

SMALL = ['--config.total_steps=40', '--config.warmup_steps=4',
         '--config.log_every_steps=4', '--config.ckpt_every_steps=4',
         '--config.vis_every_steps=20', '--config.input.batch_size=16']


def _cmd(workdir):
  return [sys.executable, '-m', 'mim_jax.main',
          '--config=configs/mae_tiny.py', f'--workdir={workdir}', *SMALL]


def _env():
  return dict(os.environ, PYTHONPATH=ROOT)


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_cli_killed_and_restarted_resumes(tmp_path):
  """README command 1, killed after its first checkpoint, then the very same
  command again: it resumes from the last checkpoint and trains to the end."""
  wd = str(tmp_path / 'run')
  proc = subprocess.Popen(_cmd(wd), env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  first_ckpt = os.path.join(wd, 'checkpoints', '4')
  deadline = time.time() + 300
  while not os.path.isdir(first_ckpt) and proc.poll() is None:
    assert time.time() < deadline, 'no checkpoint after 300 s'
    time.sleep(0.2)
  assert proc.poll() is None, 'finished before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  done = [d for d in os.listdir(os.path.join(wd, 'checkpoints'))
          if d.isdigit()]
  last = max(int(d) for d in done)
  assert last < 40

  res = subprocess.run(_cmd(wd), capture_output=True, text=True, env=_env(),
                       cwd=ROOT, timeout=400)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f'Resumed from step {last}' in res.stderr
  rows = _rows(wd)
  steps = [r['step'] for r in rows]
  assert steps == list(range(4, 41, 4))  # one row per logged step
  for r in rows:
    for k in ('train/loss', 'train/lr', 'train/l2_grads',
              'train/images_per_sec'):
      assert np.isfinite(r[k]), (k, r)
  assert rows[-1]['train/loss'] < rows[0]['train/loss']
  # The kNN monitor (the other tests' runs leave it off) ran at the end.
  assert 0 < rows[-1]['knn/top1'] <= 1 and 'knn/top1' not in rows[-2]
  assert glob.glob(os.path.join(wd, 'events.out.tfevents.*'))
  assert os.path.exists(os.path.join(wd, 'recon_0000040.png'))
  assert '40' in os.listdir(os.path.join(wd, 'checkpoints'))


@pytest.mark.slow
def test_resume_after_crash_is_exact(tmp_path, monkeypatch):
  """A run killed during step 6 (last checkpoint: step 4) and restarted ends
  where an uninterrupted run ends: same params, since masks and crops depend
  on (seed, step); metrics.jsonl keeps one row per step."""
  full = train.train_and_evaluate(tiny_mae_config(), str(tmp_path / 'a'))

  wd = str(tmp_path / 'b')
  restore = crash_train_pipeline(monkeypatch, 5)
  with pytest.raises(PipelineCrash):
    train.train_and_evaluate(tiny_mae_config(), wd)
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['2', '4']
  assert [r['step'] for r in _rows(wd)] == [1, 2, 3, 4, 5]
  restore()
  resumed = train.train_and_evaluate(tiny_mae_config(), wd)
  assert int(resumed.step) == 6
  diffs = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
      full.params, resumed.params))
  assert max(diffs) <= 1e-6
  rows = _rows(wd)
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_step_batch_names_what_the_step_expects():
  """A host batch of the wrong dtype or shape fails in one line naming the
  array, what it is and what the step takes (uint8 images since M13)."""
  # pylint: disable-next=protected-access
  check = train._step_batch
  spec = {'image': jax.ShapeDtypeStruct((4, 8, 8, 3), np.uint8),
          'label': jax.ShapeDtypeStruct((4,), np.int32)}
  ok = {'image': np.zeros((4, 8, 8, 3), np.uint8),
        'label': np.zeros(4, np.int32), 'step': np.zeros(4, np.int32)}
  assert set(check(ok, spec)) == {'image', 'label'}
  with pytest.raises(errors.DataError,
                     match=r"'image'\] is float32 \(4, 8, 8, 3\); the step "
                     r'expects uint8 \(4, 8, 8, 3\)'):
    check(dict(ok, image=ok['image'].astype(np.float32)), spec)
  with pytest.raises(errors.DataError, match="gave no 'label'"):
    check({'image': ok['image']}, spec)

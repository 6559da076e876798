"""End to end: the CLI trains, logs, checkpoints, draws, and resumes."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT
from mim_jax import config_lib
from mim_jax import input_pipeline
from mim_jax import train

SMALL = ['--config.total_steps=8', '--config.warmup_steps=2',
         '--config.log_every_steps=2', '--config.ckpt_every_steps=4',
         '--config.vis_every_steps=4', '--config.input.batch_size=16']


def _main(workdir, *extra):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run(
      [sys.executable, '-m', 'mim_jax.main', '--config=configs/mae_tiny.py',
       f'--workdir={workdir}', *SMALL, *extra],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_cli_trains_logs_and_resumes(tmp_path):
  wd = str(tmp_path / 'run')
  res = _main(wd)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = _rows(wd)
  assert [r['step'] for r in rows] == [2, 4, 6, 8]
  for r in rows:
    for k in ('train/loss', 'train/lr', 'train/l2_grads',
              'train/images_per_sec'):
      assert np.isfinite(r[k]), (k, r)
  assert glob.glob(os.path.join(wd, 'events.out.tfevents.*'))
  assert os.path.exists(os.path.join(wd, 'recon_0000004.png'))
  assert os.path.exists(os.path.join(wd, 'recon_0000008.png'))
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['4', '8']

  # The same command with a longer schedule continues from step 8.
  res = _main(wd, '--config.total_steps=12')
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'Resumed from step 8' in res.stderr
  steps = [r['step'] for r in _rows(wd)]
  assert steps == [2, 4, 6, 8, 10, 12]


def _tiny_config(**kw):
  c = config_lib.tiny_overrides(config_lib.mae_config())
  c.input.batch_size = 8
  c.total_steps = 6
  c.warmup_steps = 2
  c.log_every_steps = 1
  c.ckpt_every_steps = 2
  c.vis_every_steps = 100
  c.async_ckpt = False
  c.update(kw)
  return c


class _Crash(Exception):
  pass


def test_resume_after_crash_is_exact(tmp_path, monkeypatch):
  """A run killed during step 6 (last checkpoint: step 4) and restarted ends
  where an uninterrupted run ends: same params, since masks and crops depend
  on (seed, step); metrics.jsonl keeps one row per step."""
  full = train.train_and_evaluate(_tiny_config(), str(tmp_path / 'a'))

  real = input_pipeline.make_train_dataset

  def crashing(*args, **kw):
    ds = real(*args, **kw)

    class Wrapped:

      def as_numpy_iterator(self):
        for i, b in enumerate(ds.as_numpy_iterator()):
          if i == 5:
            raise _Crash()
          yield b

    return Wrapped()

  wd = str(tmp_path / 'b')
  monkeypatch.setattr(input_pipeline, 'make_train_dataset', crashing)
  with pytest.raises(_Crash):
    train.train_and_evaluate(_tiny_config(), wd)
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['2', '4']
  assert [r['step'] for r in _rows(wd)] == [1, 2, 3, 4, 5]
  monkeypatch.setattr(input_pipeline, 'make_train_dataset', real)
  resumed = train.train_and_evaluate(_tiny_config(), wd)
  assert int(resumed.step) == 6
  diffs = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
      full.params, resumed.params))
  assert max(diffs) <= 1e-6
  rows = _rows(wd)
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]

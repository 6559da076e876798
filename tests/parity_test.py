"""check_parity on the official MAE fixture, and that it catches errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import FIXTURES, ROOT
from mim_jax.parity import core

MAE = os.path.join(FIXTURES, 'mae')


@pytest.fixture(scope='module')
def report():
  return core.run(MAE)


def test_mae_fixture_passes(report):
  assert report['pass'], report['failures']
  fwd = report['forward']
  assert fwd['loss_rel']['loss'] <= 1e-5
  assert fwd['tensors']['compared'] == 5  # pred, mask, latent, ids, target
  assert fwd['tensors']['worst_rel_to_max'] <= 1e-5
  assert report['grads']['compared'] == 84
  assert report['grads']['worst_rel_to_max'] <= 2e-5
  assert report['grads']['worst_zero_part_abs'] <= 1e-7
  curve = report['curve']
  assert curve['steps'] == 30
  assert curve['decay_groups_match']
  assert curve['loss_max_rel'] <= 1e-5
  assert curve['final_params']['worst_rel_to_max'] <= 2e-5


def test_bfloat16_replay_reports_its_deviation(report):
  """check_parity --dtype: the curve in bf16 compute moves off the float32
  one (so bf16 took effect) by well under a percent (0.35% measured)."""
  out = core.dtype_curve(MAE, 'bfloat16', report['curve']['losses'])
  assert out['steps'] == 30 and out['dtype'] == 'bfloat16'
  assert 1e-4 < out['vs_float32']['max_rel'] < 0.02
  assert out['float32_vs_fixture']['max_rel'] <= 1e-5


def test_cli_fails_on_wrong_recipe(tmp_path):
  """Leaving cls/mask tokens out of weight decay must be caught (exit 1)."""
  bad = tmp_path / 'mae_bad'
  shutil.copytree(MAE, bad)
  with open(bad / 'train_curve.json') as f:
    curve = json.load(f)
  for g in curve['param_groups']:
    if g['weight_decay'] > 0:
      g['params'] = [p for p in g['params']
                     if p not in ('cls_token', 'mask_token')]
    else:
      g['params'] += ['cls_token', 'mask_token']
  with open(bad / 'train_curve.json', 'w') as f:
    json.dump(curve, f)
  env = dict(os.environ, PYTHONPATH=ROOT)
  res = subprocess.run(
      [sys.executable, '-m', 'mim_jax.tools.check_parity', str(bad)],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert res.returncode == 1, res.stderr[-2000:]
  out = json.loads(res.stdout)
  assert not out['pass']
  assert any('weight-decay groups differ' in f for f in out['failures'])


@pytest.mark.parametrize('name', ['cae', 'bootmae'])
def test_fixtures_pass_with_scan(name):
  """The stacked layout (scan=True: every block group stacked, BootMAE's
  taps as scan segments) gives the official outputs and every gradient
  under the official keys (check_parity --scan also replays the curve;
  MAE's scan is checked against its loop in models_test)."""
  report = core.run(os.path.join(FIXTURES, name), scan=True, curve=False)
  assert report['scan'] and report['pass'], report['failures']
  assert report['grads']['compared'] == {'cae': 144, 'bootmae': 163}[name]

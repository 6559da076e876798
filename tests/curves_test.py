"""Loss curves against the official PyTorch runs: compare_curves on
hand-written logs of every format, the official init reproduced and matched,
and a short run of the reference recipe against the reference's first
epochs (a regression in training dynamics fails here)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import CURVES
from conftest import CURVES_SHORT_EPOCHS
from conftest import FIXTURES
from conftest import ROOT
from mim_jax import errors
from mim_jax.methods.mae import parity
from mim_jax.methods.mae import torch_init
from mim_jax.tools import compare_curves as cc

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import curves_vs_pytorch  # pylint: disable=g-import-not-at-top,g-bad-import-order

REFERENCE = os.path.join(CURVES, 'curves.json')
SPE = 32


@pytest.fixture(scope='module')
def ref():
  with open(REFERENCE) as f:
    return json.load(f)


def _workdir(path, losses, lrs, every=1, spe=SPE, config=True):
  """A mim_jax workdir whose metrics.jsonl logs the per-step `losses` as
  means over `every` steps, as the trainer does."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    for end in range(every, len(losses) + 1, every):
      f.write(json.dumps({
          'step': end, 'train/loss': float(np.mean(losses[end - every:end])),
          'train/lr': float(np.mean(lrs[end - every:end])),
          'train/l2_grads': 1.0}) + '\n')
  if config:
    with open(os.path.join(path, 'config.json'), 'w') as f:
      json.dump({'input': {'num_train_examples': spe * 32,
                           'batch_size': 32}}, f)
  return str(path)


def _lr():
  with open(os.path.join(CURVES, 'config.json')) as f:
    return json.load(f)['schedule']['lr_per_step']


def test_our_epoch_means_are_upstreams_global_avg(tmp_path, ref):
  """Seed 0's per-step losses logged every 4 steps give back its logged
  epoch means; straddling intervals are refused."""
  losses = ref['per_step']['per_seed']['0']
  run = cc.read_ours(_workdir(tmp_path / 'a', losses, _lr(), every=4))
  for e in ref['epochs']:
    assert math.isclose(run.epoch_loss[e['epoch']], e['per_seed']['0'],
                        rel_tol=1e-12)
    assert math.isclose(run.epoch_lr[e['epoch']], e['train_lr'],
                        rel_tol=1e-6)
  with pytest.raises(ValueError, match='spans epochs 0 and 1'):
    cc.read_ours(_workdir(tmp_path / 'b', losses, _lr(), every=5))


def test_matching_run_passes_and_wrong_schedule_fails(tmp_path, ref):
  """The CLI: seed 0 replayed as our run passes (exit 0, PNG, JSON); the
  same recipe with a 4x longer warmup fails (exit 1) from epoch 1 on, and
  the report shows the lr mismatch that explains it."""
  lr = _lr()
  good = _workdir(tmp_path / 'good', ref['per_step']['per_seed']['3'], lr)
  mean = np.asarray(ref['per_step']['mean'])
  # A 4x longer warmup: the loss lags the reference (stretched in time).
  slow = [mean[min(int(t / 4), len(mean) - 1)] if t < 256 else mean[t]
          for t in range(len(mean))]
  slow_lr = [lr[min(t // 4, len(lr) - 1)] if t < 256 else lr[t]
             for t in range(len(lr))]
  bad = _workdir(tmp_path / 'bad', slow, slow_lr)

  def cli(*args):
    res = subprocess.run(
        [sys.executable, '-m', 'mim_jax.tools.compare_curves', *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=dict(os.environ, PYTHONPATH=ROOT))
    return res.returncode, res.stdout.strip().splitlines()[-1], res.stderr

  png = str(tmp_path / 'good.png')
  code, out, err = cli(f'--ours={good}', f'--reference={REFERENCE}',
                       f'--out={png}')
  assert code == 0, err[-2000:]
  report = json.loads(out)
  assert report['pass'] and report['first_outside'] is None
  assert len(report['points']) == 15 and report['reference_seeds'] == 8
  assert report['lr_max_abs_rel'] < 1e-9
  assert abs(report['final']['rel']) < 0.01
  assert os.path.getsize(png) > 10_000

  code, out, _ = cli(f'--ours={bad}', f'--reference={REFERENCE}',
                     '--tolerance_sigma=3')
  assert code == 1
  report = json.loads(out)
  assert not report['pass']
  assert report['first_outside']['epoch'] == 1
  assert report['first_outside']['z'] > 3
  assert report['lr_max_abs_rel'] > 0.5


def test_official_logs_are_seeds_of_one_reference(tmp_path, ref):
  """The 8 upstream log.txt files read as one reference equal curves.json;
  a single log has no spread, so the relative tolerance applies."""
  logs = [os.path.join(CURVES, f'log_seed{s}.txt') for s in range(8)]
  ours = _workdir(tmp_path / 'a', ref['per_step']['per_seed']['5'], _lr())
  from_logs = cc.run([ours], logs)
  from_json = cc.run([ours], [REFERENCE])
  for a, b in zip(from_logs['points'], from_json['points']):
    assert math.isclose(a['reference'], b['reference'], rel_tol=1e-12)
    assert math.isclose(a['sigma'], b['sigma'], rel_tol=1e-9)
  one = cc.run([ours], logs[:1])
  assert all(p['z'] is None for p in one['points'])
  assert one['pass'] == all(abs(p['rel']) <= 0.02 for p in one['points']
                            if p['epoch'] >= 1)
  # By step: the reference's per-step means over the same intervals.
  by_step = cc.run([ours], [REFERENCE], align='step')
  assert len(by_step['points']) == 480 and by_step['pass']
  with pytest.raises(ValueError, match='epoch means only'):
    cc.run([ours], logs, align='step')


def test_mmpretrain_logs(tmp_path, ref):
  """mmengine scalars.json (global step) and mmcv log.json (iter within the
  epoch, an env_info first line), 1-based epochs, logged every 8 iters."""
  losses, lr = ref['per_step']['per_seed']['1'], _lr()
  engine, mmcv = [], [json.dumps({'env_info': 'x', 'seed': 1})]
  for end in range(8, 481, 8):
    epoch, it = (end - 1) // SPE + 1, (end - 1) % SPE + 1
    row = {'loss': float(np.mean(losses[end - 8:end])),
           'lr': float(np.mean(lr[end - 8:end])), 'epoch': epoch}
    engine.append(json.dumps(dict(row, iter=it, step=end, time=0.1)))
    mmcv.append(json.dumps(dict(row, mode='train', iter=it, time=0.1)))
  paths = []
  for name, rows in (('scalars.json', engine), ('x.log.json', mmcv)):
    paths.append(str(tmp_path / name))
    with open(paths[-1], 'w') as f:
      f.write('\n'.join(rows) + '\n')
  ours = _workdir(tmp_path / 'a', losses, lr)
  for path in paths:
    r = cc.read_reference(path).seeds[0]
    assert r.steps_per_epoch == SPE
    for e in ref['epochs']:
      assert math.isclose(r.epoch_loss[e['epoch']], e['per_seed']['1'],
                          rel_tol=1e-9)
    step = cc.run([ours], [path], align='step')
    assert len(step['points']) == 60
    assert max(abs(p['rel']) for p in step['points']) < 1e-9


def test_bad_input(tmp_path, ref):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no metrics.jsonl'):
    cc.run([str(tmp_path / 'empty')], [REFERENCE])
  ours = _workdir(tmp_path / 'a', ref['per_step']['mean'], _lr())
  unknown = tmp_path / 'other.json'
  unknown.write_text('{"accuracy": 0.5}\n')
  with pytest.raises(ValueError, match='unknown log format. Known formats'):
    cc.run([ours], [str(unknown)])
  with pytest.raises(errors.MissingFileError, match='does not exist'):
    cc.run([ours], [str(tmp_path / 'missing.txt')])
  with pytest.raises(errors.MissingFileError, match='--ours .* does not'):
    cc.run([str(tmp_path / 'nowhere')], [REFERENCE])
  # The CLI: one line, exit status 2 (1 means the curves differ).
  res = subprocess.run(
      [sys.executable, '-m', 'mim_jax.tools.compare_curves', f'--ours={ours}',
       f'--reference={tmp_path / "missing.txt"}'], capture_output=True,
      text=True, cwd=ROOT, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
  assert res.returncode == 2, res.stderr[-2000:]
  assert res.stderr.strip().splitlines()[-1].startswith(
      'compare_curves: error: --reference')
  assert 'Traceback' not in res.stderr
  nocfg = _workdir(tmp_path / 'b', ref['per_step']['mean'], _lr(),
                   config=False)
  with pytest.raises(ValueError, match='needs the steps per epoch'):
    cc.run([nocfg], [REFERENCE])
  assert cc.run([nocfg], [REFERENCE], steps_per_epoch=SPE)['pass']


def test_official_init_rule_is_the_official_init():
  """torch_init.official_init redraws the fixture's official state dict
  bit for bit from its seed (order of draws included)."""
  with open(os.path.join(FIXTURES, 'mae', 'config.json')) as f:
    fc = json.load(f)
  sd = torch_init.official_init(parity.experiment_config(fc), fc['seed'])
  ref = np.load(os.path.join(FIXTURES, 'mae', 'state_dict.npz'))
  assert sorted(sd) == sorted(ref.files)
  for k in ref.files:
    np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)


@pytest.mark.slow
def test_initial_loss_distribution_matches_the_official_init():
  """The loss at initialisation over 12 seeds of each init, on the same two
  batches, through the same (fixture-checked) forward: one distribution."""
  c = curves_vs_pytorch.recipe()
  batches = curves_vs_pytorch.first_batches(c, 2)
  ours = curves_vs_pytorch.initial_losses(c, range(12), batches, False)
  theirs = curves_vs_pytorch.initial_losses(c, range(100, 112), batches,
                                            True)
  assert stats.ks_2samp(ours, theirs).pvalue > 0.01, (ours, theirs)
  assert abs(ours.mean() - theirs.mean()) < 3 * math.hypot(
      ours.std(ddof=1), theirs.std(ddof=1)) / math.sqrt(12)


@pytest.mark.slow
@pytest.mark.parametrize('epochs', [CURVES_SHORT_EPOCHS])
def test_short_run_tracks_the_reference(curves_short_workdir, epochs):
  """configs/mae_curves_tiny.py for its first 2 epochs (1 seed) against the
  official seeds' first epochs: within 3 sigma at every epoch, and the lr
  equal to upstream's per-step schedule."""
  report = cc.run([curves_short_workdir], [REFERENCE])
  assert [p['epoch'] for p in report['points']] == list(range(epochs))
  assert report['pass'], report['first_outside']
  assert all(abs(p['z']) < 3 for p in report['points'])
  assert report['lr_max_abs_rel'] < 1e-5


@pytest.mark.slow
def test_benchmark_smoke(curves_short_workdir, tmp_path):
  """benchmarks/curves_vs_pytorch.py --smoke on the shared short run."""
  os.symlink(curves_short_workdir, tmp_path / 'seed0')
  res = subprocess.run(
      [sys.executable, 'benchmarks/curves_vs_pytorch.py', '--smoke',
       f'--workdir={tmp_path}'], capture_output=True, text=True, cwd=ROOT,
      timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out['curves']['reference_seeds'] == 8
  assert len(out['points']) == CURVES_SHORT_EPOCHS
  assert out['init']['seeds'] == 4 and out['init']['official']['std'] > 0


@pytest.mark.slow
def test_logged_throughput_uses_the_planners_flop_count(curves_short_workdir):
  """train/tflops_per_device and train/mfu of the shared run follow from
  the planner's FLOPs per step (`train.step_flops`, one count for both)."""
  from mim_jax import sharding  # pylint: disable=g-import-not-at-top
  from mim_jax import train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  c = curves_vs_pytorch.recipe()
  flops = train.step_flops(c, sharding.make_mesh(c.mesh))
  # 2 x params x tokens is the bulk: a few MFLOPs per image, not zero.
  assert 1e6 < flops / c.input.batch_size < 1e9
  with open(os.path.join(curves_short_workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  for r in rows:
    want = flops * r['train/steps_per_sec'] / jax.device_count() / 1e12
    assert math.isclose(r['train/tflops_per_device'], want, rel_tol=1e-6)
    assert math.isclose(r['train/mfu'], want / 0.5, rel_tol=1e-6)
  assert train.peak_tflops_of(c) is None  # CPUs: no known peak, no MFU
  c.peak_tflops = 275.0
  assert train.peak_tflops_of(c) == 275.0
  c.peak_tflops = 0.0
  with pytest.raises(ValueError, match='peak_tflops=0.0 must be > 0'):
    train.validate_config(c, 1, 1)

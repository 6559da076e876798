"""CAE and BootMAE against their official reference curves (made by the
unmodified official code, tests/fixtures/curves_{cae,bootmae}_tiny): a short
run of each reference recipe, every logged loss term, the schedules step by
step, and compare_curves' choice of term. A regression in either method's
training dynamics fails here."""

import json
import os
import sys

import pytest

from conftest import CURVES_SHORT_EPOCHS
from conftest import FIXTURES
from conftest import ROOT
from conftest import shared_curves_short
from mim_jax.tools import compare_curves as cc

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import curves_vs_pytorch  # pylint: disable=g-import-not-at-top,g-bad-import-order

# Our metric names of the per-step schedules each reference records.
SCHEDULES = {'cae': {'lr_per_step'},
             'bootmae': {'lr_per_step', 'momentum_per_step',
                         'feature_weight_per_step'}}


@pytest.fixture(scope='module', params=sorted(SCHEDULES))
def short_run(request, tmp_path_factory, worker_id):
  """(method, workdir of its reference recipe's first 2 epochs)."""
  return request.param, shared_curves_short(tmp_path_factory, worker_id,
                                            request.param)


@pytest.mark.slow
def test_short_run_tracks_every_term(short_run):
  """Each logged term of the first 2 epochs (1 seed) within 3 sigma of the
  official seeds at every epoch, the first included."""
  method, workdir = short_run
  for term in curves_vs_pytorch.TERMS[method]:
    report = cc.run([workdir], [curves_vs_pytorch.reference_path(method)],
                    term=term)
    assert [p['epoch'] for p in report['points']] == list(
        range(CURVES_SHORT_EPOCHS)), term
    assert report['reference_seeds'] == 8
    bad = [(p['epoch'], p['ours'], p['reference'], p['z'])
           for p in report['points'] if abs(p['z']) >= 3]
    assert not bad, (method, term, bad)


@pytest.mark.slow
def test_schedules_are_upstreams_step_by_step(short_run):
  """Our lr (and BootMAE's EMA momentum and feature weight) at every step
  equal to the values upstream set, as the reference recorded them."""
  method, workdir = short_run
  worst = curves_vs_pytorch.schedules(method, [workdir])
  assert set(worst) == SCHEDULES[method]
  assert all(v < 1e-5 for v in worst.values()), worst


@pytest.mark.slow
def test_a_term_the_reference_lacks_is_named(short_run, tmp_path):
  """compare_curves names the missing term and lists the reference's."""
  method, workdir = short_run
  ref = curves_vs_pytorch.reference_path(method)
  other = 'loss_align' if method == 'bootmae' else 'loss_pixel'
  with pytest.raises(ValueError) as e:
    cc.run([workdir], [ref], term=other)
  msg = str(e.value)
  assert repr(other) in msg
  for term in curves_vs_pytorch.TERMS[method]:
    assert term in msg
  # A log.txt without the term, too (its train_<name> keys listed).
  log = tmp_path / 'log.txt'
  log.write_text(json.dumps({'epoch': 0, 'train_loss': 1.0,
                             'train_lr': 0.1, 'train_Rloss': 0.5}) + '\n')
  with pytest.raises(ValueError, match=r"no term 'loss_pixel'.*Rloss"):
    cc.read_reference(str(log), term='loss_pixel')


@pytest.mark.parametrize('method', sorted(SCHEDULES))
def test_reference_fixture_is_complete(method):
  """8 official seeds, every term per epoch and per step, the recipe."""
  folder = os.path.join(FIXTURES, f'curves_{method}_tiny')
  with open(os.path.join(folder, 'curves.json')) as f:
    data = json.load(f)
  assert data['seeds'] == list(range(8))
  assert len(data['epochs']) == 15 and data['steps_per_epoch'] == 32
  terms = set(curves_vs_pytorch.TERMS[method]) - {'loss'}
  assert set(data['terms']) >= terms
  for t in terms:
    assert len(data['terms'][t]['epochs']) == 15
    assert all(len(v) == 480 for v in
               data['terms'][t]['per_step']['per_seed'].values())
  with open(os.path.join(folder, 'config.json')) as f:
    sched = json.load(f)['schedule']
  assert all(len(sched[k]) == 480 for k in SCHEDULES[method])
  for s in range(8):
    assert os.path.exists(os.path.join(folder, f'log_seed{s}.txt'))

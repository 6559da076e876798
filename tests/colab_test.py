"""The colabs' code cells run (with shorter schedules), so they cannot rot;
every colab installs the project in its first cell and is saved stripped."""

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import types

import pytest

from conftest import CURVES_SHORT_EPOCHS
from conftest import ROOT

COLABS = os.path.join(ROOT, 'colabs')
NOTEBOOK = os.path.join(COLABS, 'mae_tiny_reconstructions.ipynb')


def _code(path: str) -> str:
  with open(path) as f:
    nb = json.load(f)
  cells = [''.join(c['source']) for c in nb['cells']
           if c['cell_type'] == 'code']
  return '\n'.join(line for cell in cells for line in cell.splitlines()
                   if not line.lstrip().startswith(('!', '%')))


def _run(code: str, path: str, monkeypatch, namespace=None) -> list:
  """Runs notebook code with IPython.display stubbed; returns what it
  displayed (its globals land in `namespace`)."""
  shown = []
  display = types.ModuleType('IPython.display')
  display.Image = lambda p: p
  display.display = shown.append
  # What matplotlib asks of IPython: its version (>= 8.24 needs no backend
  # fix-up) and the running shell (none: a plain interpreter).
  ipython = types.ModuleType('IPython')
  ipython.version_info = (8, 24, 0)
  ipython.get_ipython = lambda: None
  monkeypatch.setitem(sys.modules, 'IPython', ipython)
  monkeypatch.setitem(sys.modules, 'IPython.display', display)
  namespace = {} if namespace is None else namespace
  namespace['__name__'] = '__colab__'
  exec(compile(code, path, 'exec'), namespace)  # pylint: disable=exec-used
  return shown


def _replaced(code: str, pairs) -> str:
  """`code` with each (old, new) replaced; every old must occur (a renamed
  notebook line fails here, not as a silently longer schedule)."""
  for old, new in pairs:
    assert old in code, old
    code = code.replace(old, new)
  return code


def _rows(workdir) -> list:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_cae_bootmae_colab_runs(tmp_path, monkeypatch):
  """Also the end-to-end check that cae_tiny and bootmae_tiny train, log
  their loss terms and draw reconstructions."""
  path = os.path.join(COLABS, 'cae_bootmae_tiny.ipynb')
  code = _replaced(_code(path), [
      ('STEPS = 200', 'STEPS = 4'),
      ("f'/tmp/{name}_colab'", f"'{tmp_path}/' + name"),
      ("f'/tmp/{name}_recon.png'", f"'{tmp_path}/' + name + '.png'"),
      ("config.warmup_steps = STEPS // 10",
       "config.warmup_steps = 1; config.input.batch_size = 8; "
       "config.log_every_steps = 2; config.knn.data = None"),
  ])
  ns = {}
  shown = _run(code, path, monkeypatch, ns)
  assert shown == [f'{tmp_path}/cae_tiny.png', f'{tmp_path}/bootmae_tiny.png']
  for p in shown:
    assert os.path.getsize(p) > 1000
  for name, terms in (('cae_tiny', ('loss_main', 'loss_align')),
                      ('bootmae_tiny', ('loss_pixel', 'loss_feature'))):
    assert int(ns['states'][name].step) == 4
    with open(f'{tmp_path}/{name}/metrics.jsonl') as f:
      rows = [json.loads(line) for line in f]
    assert [r['step'] for r in rows] == [2, 4]
    for r in rows:
      for k in ('loss',) + terms:
        assert math.isfinite(r[f'train/{k}']), (name, k, r)
    assert os.path.exists(f'{tmp_path}/{name}/recon_0000004.png')


@pytest.mark.slow
def test_colab_cells_run(tmp_path, monkeypatch):
  code = _replaced(_code(NOTEBOOK), [
      ('config.total_steps = 300',
       'config.total_steps = 3; config.warmup_steps = 1; '
       'config.input.batch_size = 8; config.log_every_steps = 1'),
      ("'/tmp/mae_tiny_colab'", repr(str(tmp_path / 'run'))),
      ("'/tmp/recon.png'", repr(str(tmp_path / 'recon.png'))),
  ])
  shown = _run(code, NOTEBOOK, monkeypatch)
  assert shown == [str(tmp_path / 'recon.png')]
  assert os.path.getsize(tmp_path / 'recon.png') > 1000


@pytest.mark.slow
def test_pretrain_and_probe_colab_runs(tmp_path, monkeypatch, capsys):
  """One MAE run pretrained in stages, a linear probe of its encoder after
  each stage and of a random encoder, and the plot of probe accuracy
  against pretraining steps."""
  path = os.path.join(COLABS, 'pretrain_and_probe.ipynb')
  code = _replaced(_code(path), [
      ('PROBE_STEPS = 600', 'PROBE_STEPS = 4'),   # before 'STEPS = 600'
      ('STEPS = 600', 'STEPS = 4'),
      ('PROBE_AT = [STEPS // 8, STEPS // 4, STEPS // 2, STEPS]',
       'PROBE_AT = [2, STEPS]'),
      ('pretrain.warmup_steps = STEPS // 12',
       'pretrain.warmup_steps = 1; pretrain.input.batch_size = 8; '
       'pretrain.log_every_steps = 1; pretrain.async_ckpt = False; '
       'pretrain.knn.data = None'),
      ('c.ckpt_every_steps = PROBE_STEPS',
       'c.ckpt_every_steps = PROBE_STEPS; c.input.batch_size = 8; '
       'c.async_ckpt = False'),
      ("'/tmp/mae_tiny_probed'", repr(str(tmp_path / 'mae'))),
      ("'/tmp/mae_tiny_probes'", repr(str(tmp_path / 'probes'))),
      ("'/tmp/probe_vs_steps.png'", repr(str(tmp_path / 'probe.png'))),
  ])
  ns = {}
  shown = _run(code, path, monkeypatch, ns)
  assert shown == [str(tmp_path / 'probe.png')]
  assert os.path.getsize(tmp_path / 'probe.png') > 10_000
  # One probe per pretraining step, each the final eval/top1 of its own
  # workdir, the random encoder's at step 0.
  assert sorted(ns['top1']) == [0, 2, 4]
  for step, acc in ns['top1'].items():
    assert 0.0 <= acc <= 1.0, (step, acc)
    evals = [r for r in _rows(tmp_path / 'probes' / f'step_{step}')
             if 'eval/top1' in r]
    assert [r['step'] for r in evals] == [4]
    assert evals[0]['eval/top1'] == acc
  # The stages are one run: a checkpoint at each probed step, one loss row
  # per step, and the loss went down.
  assert int(ns['state'].step) == 4
  assert {'2', '4'} <= set(os.listdir(tmp_path / 'mae' / 'checkpoints'))
  logged = [(r['step'], r['train/loss']) for r in _rows(tmp_path / 'mae')
            if 'train/loss' in r]
  assert [s for s, _ in logged] == [1, 2, 3, 4]
  assert logged[-1][1] < logged[0][1], logged
  out = capsys.readouterr().out
  assert 'step 0 (random init): linear-probe top-1' in out
  assert f'{4:5d}  {ns["top1"][4]:.3f}' in out


@pytest.mark.slow
def test_compare_with_pytorch_colab_runs(curves_short_workdir, tmp_path,
                                         monkeypatch, capsys):
  """The comparison with the official curves on the session's 2-epoch run
  of MAE's reference recipe: the notebook's training call finds it finished
  and trains nothing; the figure and a table per term. The notebook loops
  over MAE, CAE and BootMAE alike; the test runs the loop for MAE (CAE's
  and BootMAE's runs against their references, every term, are
  tests/curves_methods_test.py)."""
  # A copy: the training call rewrites config.json, and other tests read
  # the shared workdir meanwhile.
  workdir = str(tmp_path / 'curves_mae')
  shutil.copytree(curves_short_workdir, workdir)
  before = _rows(workdir)
  path = os.path.join(COLABS, 'compare_with_pytorch.ipynb')
  code = _replaced(_code(path), [
      ("METHODS = ['mae', 'cae', 'bootmae']", "METHODS = ['mae']"),
      ('EPOCHS = 15', f'EPOCHS = {CURVES_SHORT_EPOCHS}'),
      ("'/tmp/mim_jax_curves'", repr(str(tmp_path / 'curves'))),
      ("FIGURES = '/tmp'", f'FIGURES = {str(tmp_path)!r}'),
  ])
  ns = {}
  shown = _run(code, path, monkeypatch, ns)
  assert shown == [str(tmp_path / 'curves_vs_pytorch_mae.png')]
  assert os.path.getsize(shown[0]) > 10_000
  assert int(ns['states']['mae'].step) == 32 * CURVES_SHORT_EPOCHS
  assert _rows(workdir) == before            # nothing trained
  assert set(ns['TERMS']) == {'mae', 'cae', 'bootmae'}
  out = capsys.readouterr().out
  assert set(ns['reports']) == {('mae', 'loss')}
  report = ns['reports']['mae', 'loss']
  assert [p['epoch'] for p in report['points']] == list(
      range(CURVES_SHORT_EPOCHS))
  assert isinstance(report['pass'], bool)
  assert 'mae loss\n' in out
  for p in report['points']:
    assert math.isclose(p['z'], (p['ours'] - p['reference']) / p['sigma'])
    assert f"{p['epoch']:5d} {p['ours']:8.4f} {p['reference']:8.4f}" in out
  unjudged = [line.split()[0] for line in out.splitlines()
              if 'not judged' in line]
  assert unjudged == ['0'], out
  assert f"max |z| {report['max_abs_z']:.2f}" in out


def test_every_colab_installs_the_project_first():
  """Colab starts without the project: the first cell clones and installs
  it, and says how to add jax's TPU plugin."""
  paths = sorted(glob.glob(os.path.join(COLABS, '*.ipynb')))
  assert len(paths) >= 4, paths
  for path in paths:
    with open(path) as f:
      first = json.load(f)['cells'][0]
    text = ''.join(first['source'])
    assert first['cell_type'] == 'code', path
    assert 'git clone' in text and 'pip install -q -r requirements.txt -e .' \
        in text, path
    assert 'pip install -U "jax[tpu]"' in text, path


def test_colabs_are_saved_without_outputs():
  """nbstripout --verify: no outputs, execution counts or volatile
  metadata in git (strip them with `nbstripout colabs/*.ipynb`)."""
  paths = sorted(glob.glob(os.path.join(COLABS, '*.ipynb')))
  proc = subprocess.run(
      [sys.executable, '-m', 'nbstripout', '--verify'] + paths,
      capture_output=True, text=True, check=False)
  dirty = [p for p in paths if p in proc.stdout]
  assert proc.returncode == 0 and not dirty, (
      f'not stripped: {dirty or proc.stdout + proc.stderr}; run '
      f'`nbstripout colabs/*.ipynb`')

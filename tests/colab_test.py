"""The colab's code cells run (with a shorter schedule), so it cannot rot."""

import json
import math
import os
import sys
import types

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
  monkeypatch.setitem(sys.modules, 'IPython', types.ModuleType('IPython'))
  monkeypatch.setitem(sys.modules, 'IPython.display', display)
  namespace = {} if namespace is None else namespace
  namespace['__name__'] = '__colab__'
  exec(compile(code, path, 'exec'), namespace)  # pylint: disable=exec-used
  return shown


def test_cae_bootmae_colab_runs(tmp_path, monkeypatch):
  """Also the end-to-end check that cae_tiny and bootmae_tiny train, log
  their loss terms and draw reconstructions."""
  path = os.path.join(COLABS, 'cae_bootmae_tiny.ipynb')
  code = _code(path)
  for old, new in [
      ('STEPS = 200', 'STEPS = 4'),
      ("f'/tmp/{name}_colab'", f"'{tmp_path}/' + name"),
      ("f'/tmp/{name}_recon.png'", f"'{tmp_path}/' + name + '.png'"),
      ("config.warmup_steps = STEPS // 10",
       "config.warmup_steps = 1; config.input.batch_size = 8; "
       "config.log_every_steps = 2"),
  ]:
    assert old in code, old
    code = code.replace(old, new)
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


def test_colab_cells_run(tmp_path, monkeypatch):
  code = _code(NOTEBOOK)
  for old, new in [
      ('config.total_steps = 300',
       'config.total_steps = 3; config.warmup_steps = 1; '
       'config.input.batch_size = 8; config.log_every_steps = 1'),
      ("'/tmp/mae_tiny_colab'", repr(str(tmp_path / 'run'))),
      ("'/tmp/recon.png'", repr(str(tmp_path / 'recon.png'))),
  ]:
    assert old in code, old
    code = code.replace(old, new)
  shown = _run(code, NOTEBOOK, monkeypatch)
  assert shown == [str(tmp_path / 'recon.png')]
  assert os.path.getsize(tmp_path / 'recon.png') > 1000

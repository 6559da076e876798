"""The colab's code cells run (with a shorter schedule), so it cannot rot."""

import json
import os
import sys
import types

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, 'colabs', 'mae_tiny_reconstructions.ipynb')


def test_colab_cells_run(tmp_path, monkeypatch):
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  cells = [''.join(c['source']) for c in nb['cells']
           if c['cell_type'] == 'code']
  code = '\n'.join(line for cell in cells for line in cell.splitlines()
                   if not line.lstrip().startswith(('!', '%')))
  for old, new in [
      ('config.total_steps = 300',
       'config.total_steps = 3; config.warmup_steps = 1; '
       'config.input.batch_size = 8; config.log_every_steps = 1'),
      ("'/tmp/mae_tiny_colab'", repr(str(tmp_path / 'run'))),
      ("'/tmp/recon.png'", repr(str(tmp_path / 'recon.png'))),
  ]:
    assert old in code, old
    code = code.replace(old, new)
  shown = []
  display = types.ModuleType('IPython.display')
  display.Image = lambda path: path
  display.display = shown.append
  monkeypatch.setitem(sys.modules, 'IPython', types.ModuleType('IPython'))
  monkeypatch.setitem(sys.modules, 'IPython.display', display)
  exec(compile(code, NOTEBOOK, 'exec'), {'__name__': '__colab__'})  # pylint: disable=exec-used
  assert shown == [str(tmp_path / 'recon.png')]
  assert os.path.getsize(tmp_path / 'recon.png') > 1000

"""Export a run to an official state dict, load it back, draw it."""

import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from conftest import ROOT
from mim_jax import experiment
from mim_jax import train
from mim_jax import weights
from mim_jax.convert import core
from mim_jax.methods.mae import config as mae_config


@pytest.mark.slow
def test_export_import_and_visualize(tmp_path):
  c = mae_config.get_config('tiny')
  c.input.batch_size = 8
  c.total_steps, c.warmup_steps, c.log_every_steps = 2, 1, 1
  c.vis_every_steps, c.async_ckpt = 100, False
  c.knn.data = None
  wd = str(tmp_path / 'run')
  state = train.train_and_evaluate(c, wd)
  model = experiment.build_model(c)

  params, step = weights.from_workdir(c, model, wd)
  assert step == 2
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  pth = str(tmp_path / 'export.safetensors')  # read with no pickle
  core.save_state_dict(weights.to_torch(c, model, params), pth)
  back = weights.from_torch(c, model, pth)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  out = str(tmp_path / 'recon.png')
  res = subprocess.run(
      [sys.executable, '-m', 'mim_jax.tools.visualize',
       '--config=configs/mae_tiny.py', f'--torch_ckpt={pth}', f'--out={out}',
       '--num_images=3'],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert res.returncode == 0, res.stderr[-3000:]
  img = np.asarray(Image.open(out))
  # 3 rows, 4 columns of 128 px tiles with 2 px gaps.
  assert img.shape == (3 * 130 - 2, 4 * 130 - 2, 3)
  assert img.std() > 10  # a picture, not a blank

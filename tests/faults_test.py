"""Faults the trainer survives (M12), found by trying it as a new user
would: two runs on one workdir, a bad file in the evaluation data, a hook
that fails after training steps, a bug in model code, a setup that fails
on a fresh workdir."""

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from conftest import ROOT
from conftest import tiny_mae_config
from mim_jax import config_lib
from mim_jax import errors
from mim_jax import hooks
from mim_jax import train
from mim_jax.methods.classifier import config as recipe

TIMEOUT_S = 300
CLI = [sys.executable, '-m', 'mim_jax.main']
ENV = dict(os.environ, PYTHONPATH=ROOT)


def _saved_steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir,
                                                         'checkpoints'))
                if d.isdigit())


def _owner(path):
  """The lock file's JSON, or None while it is absent or half written."""
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, ValueError):
    return None


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_is_refused_naming_the_owner(
    tmp_path):
  """Run A takes the workdir; run B on it stops in one line naming A's host
  and pid (exit 2) and writes nothing; A goes on to train, saves on
  SIGTERM (held from the start of its setup), and its lock is gone once it
  ends."""
  wd = tmp_path / 'wd'
  args = [f'--workdir={wd}', '--config=configs/mae_tiny.py',
          '--config.knn.data=None', '--config.total_steps=100000',
          '--config.warmup_steps=5', '--config.log_every_steps=5']
  a = subprocess.Popen(CLI + args, cwd=ROOT, env=ENV,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
  try:
    deadline = time.time() + TIMEOUT_S
    owner = None
    while owner is None:  # until A holds the workdir
      assert a.poll() is None and time.time() < deadline
      time.sleep(0.5)
      owner = _owner(wd / 'run.lock')
    assert owner['pid'] == a.pid
    b = subprocess.run(CLI + args, cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=TIMEOUT_S)
    last = b.stderr.strip().splitlines()[-1]
    assert b.returncode == 2, b.stderr[-3000:]
    assert 'in use by another run' in last and f'pid {a.pid}' in last, last
    assert 'Traceback' not in b.stderr
    assert a.poll() is None  # A trains on
  finally:
    a.terminate()  # SIGTERM: A saves and stops (exit 75)
    _, err = a.communicate(timeout=TIMEOUT_S)
  assert a.returncode == 75, err[-3000:]
  assert not os.path.exists(wd / 'run.lock')
  assert _saved_steps(wd)  # A trained and saved
  steps = [json.loads(line)['step'] for line in open(wd / 'metrics.jsonl')]
  assert steps == sorted(set(steps))  # one run's rows only


def _jpeg(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(
      buf, format='JPEG')
  return buf.getvalue()


def _labelled_folder(root, truncated: str) -> str:
  """Classes a/ and b/, four JPEGs each; `truncated` is cut short."""
  for j, c in enumerate('ab'):
    os.makedirs(os.path.join(root, c))
    for i in range(4):
      data = _jpeg(10 * j + i)
      rel = f'{c}/{i}.jpg'
      with open(os.path.join(root, rel), 'wb') as f:
        f.write(data[:len(data) // 2] if rel == truncated else data)
  return str(root)


def _probe(eval_folder: str, **eval_fields):
  c = recipe.get_config('linprobe', 'mae', 'tiny')
  c.total_steps = 2
  c.warmup_steps = 1
  c.log_every_steps = 1
  c.input.batch_size = 16
  c.eval.data = f'folder:{eval_folder}'
  c.eval.split = None
  c.eval.batch_size = 8
  c.eval.update(eval_fields)
  return c


def test_a_bad_evaluation_file_stops_the_run_before_it_starts(tmp_path):
  """A truncated JPEG in the evaluation folder: one line naming it and the
  field to drop it, before the workdir is made; with eval.bad_images=drop
  the run trains, evaluates the 7 good files and saves."""
  folder = _labelled_folder(tmp_path / 'val', truncated='b/2.jpg')
  wd = tmp_path / 'wd'
  with pytest.raises(errors.DataError,
                     match=r'b/2\.jpg.*eval\.bad_images=drop') as e:
    train.train_and_evaluate(_probe(folder), str(wd))
  assert '\n' not in str(e.value)
  assert not wd.exists()
  train.train_and_evaluate(_probe(folder, bad_images='drop'), str(wd))
  assert _saved_steps(wd) == [2]


@pytest.mark.slow
def test_a_failing_hook_loses_no_training(tmp_path, monkeypatch):
  """A figure that fails at step 3 (no checkpoint is due there): the run
  stops with that error, after saving step 3."""

  def broken(self, step, state, info):
    if step == 3:
      raise RuntimeError('figure failed')

  monkeypatch.setattr(hooks.Figures, '__call__', broken)
  wd = str(tmp_path / 'wd')
  with pytest.raises(RuntimeError, match='figure failed'):
    train.train_and_evaluate(
        tiny_mae_config(ckpt_every_steps=100, vis_every_steps=3), wd)
  assert _saved_steps(wd) == [3]
  assert not os.path.exists(os.path.join(wd, 'run.lock'))


PLANTED = """
import sys
from mim_jax import main
from mim_jax.methods.mae import model

def planted(self, *args, **kwargs):
  raise ValueError('a planted bug in model code')

model.MAE.__call__ = planted
sys.argv = ['main'] + sys.argv[1:]
main.run()
"""


@pytest.mark.slow
def test_a_value_error_in_model_code_shows_its_traceback(tmp_path):
  """Only the user-error types print as one line: a ValueError from a bug
  in model code prints its traceback (exit 1)."""
  res = subprocess.run(
      [sys.executable, '-c', PLANTED, '--config=configs/mae_tiny.py',
       f'--workdir={tmp_path / "wd"}', '--config.knn.data=None'],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert res.returncode == 1, res.stderr[-3000:]
  assert 'Traceback' in res.stderr
  assert 'a planted bug in model code' in res.stderr
  assert 'error: a planted bug' not in res.stderr  # not a one-liner


def test_a_failed_setup_leaves_no_workdir(tmp_path):
  """The headline ViT-L config without ImageNet prepared fails on its
  data, before anything is written: no workdir, no checkpoints/, no
  config.json, no events file."""
  config = config_lib.load_config_file('configs/cae_vitl.py')
  config.input.tfds_data_dir = str(tmp_path / 'no_tfds')
  wd = tmp_path / 'wd'
  with pytest.raises(errors.UserError, match='input.data'):
    train.train_and_evaluate(config, str(wd))
  assert not wd.exists()


def test_a_bad_knn_data_spec_names_knn_data(tmp_path):
  """The kNN monitor's sets are opened with config.input's fields, but a
  bad spec is named as the field the user set, knn.data (not input.data),
  before the workdir is made."""
  wd = tmp_path / 'wd'
  config = tiny_mae_config()
  config.knn.data = 'digits'
  with pytest.raises(errors.DataError, match="Unknown knn.data='digits'"):
    train.train_and_evaluate(config, str(wd))
  config.knn.data = 'embedded:skimage'
  with pytest.raises(errors.DataError,
                     match="knn.data='embedded:skimage'.*no labels"):
    train.train_and_evaluate(config, str(wd))
  assert not wd.exists()


def test_none_turns_an_optional_field_off():
  """`--config.knn.data=None` reaches the config as the text 'None': the
  CLI reads it as off."""
  config = tiny_mae_config()
  config.knn.data = 'None'
  config.input.tfds_data_dir = 'None'
  config_lib.none_for_off(config)
  assert config.knn.data is None and config.input.tfds_data_dir is None

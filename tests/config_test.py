"""Every config builds; bad input fails early with a clear message."""

import glob
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT
from mim_jax import config_lib
from mim_jax import experiment
from mim_jax import state as state_lib
from mim_jax import train
from mim_jax.methods.mae import config as mae_config

CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


@pytest.mark.slow
@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_builds_model(path):
  config = config_lib.load_config_file(path)
  train.validate_config(config, 8, 8)
  model = experiment.build_model(config)
  shapes = experiment.batch_spec(config, batch_size=2)
  params = jax.eval_shape(lambda: state_lib.init_params(model, shapes, 0))
  assert 'encoder' in params and len(params) > 1


def test_official_recipes():
  for v, width, depth in (('b', 768, 12), ('l', 1024, 24), ('h', 1280, 32)):
    c = config_lib.load_config_file(
        os.path.join(ROOT, 'configs', f'mae_vit{v}.py'))
    assert c.input.batch_size == 4096 and c.base_lr == 1.5e-4
    assert c.optim.b2 == 0.95 and c.optim.weight_decay == 0.05
    assert c.total_epochs == 800 and c.warmup_epochs == 40
    assert c.input.mask.ratio == 0.75 and c.loss.norm_pix_loss
    assert c.model.dtype == 'bfloat16'   # the tiny runs: float32
    model = experiment.build_model(c)
    assert model.encoder['width'] == width
    assert model.encoder['depth'] == depth
    assert (model.decoder_width, model.decoder_depth,
            model.decoder_num_heads) == (512, 8, 16)


def _tiny(**kw):
  c = mae_config.get_config('tiny')
  for k, v in kw.items():
    node = c
    *path, last = k.split('.')
    for part in path:
      node = node[part]
    node[last] = v
  return c


@pytest.mark.parametrize('overrides, words', [
    ({'input.image_size': 30}, ['image_size=30', 'patch_size=4']),
    ({'input.mask.ratio': 0.0}, ['input.mask.ratio=0.0', 'between 0 and 1']),
    ({'input.mask.ratio': 1.0}, ['input.mask.ratio=1.0']),
    ({'input.mask.ratio': 1.5}, ['input.mask.ratio=1.5']),
    ({'input.batch_size': 12}, ['batch size 12', '8 data-parallel']),
    ({'grad_accum_steps': 4, 'input.batch_size': 16},
     ['batch size 16', 'x 4 accumulation']),
    ({'model.dtype': 'bf16'}, ["model.dtype='bf16'", "'bfloat16'"]),
])
def test_bad_config_fails_before_compiling(tmp_path, overrides, words):
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(_tiny(**overrides), str(tmp_path))
  for w in words:
    assert w in str(e.value), str(e.value)
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_unknown_model_field():
  c = _tiny()
  c.model.unlock()
  c.model.decoder_widht = 3
  with pytest.raises(ValueError, match='decoder_widht'):
    experiment.build_model(c)


def test_unknown_mesh_axis_and_size():
  from mim_jax import sharding  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='model'):
    sharding.make_mesh([('model', -1)])
  with pytest.raises(ValueError, match='3 slots but there are 8'):
    sharding.make_mesh([('data', 3)])
  assert dict(sharding.make_mesh([('data', -1), ('fsdp', 2)]).shape) == {
      'data': 4, 'fsdp': 2}


def test_unknown_config_key_on_the_command_line(tmp_path):
  res = subprocess.run(
      [sys.executable, '-m', 'mim_jax.main', '--config=configs/mae_tiny.py',
       f'--workdir={tmp_path}', '--config.input.batch_sise=8'],
      capture_output=True, text=True, cwd=ROOT, timeout=120,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert res.returncode != 0
  assert "Unknown config key 'input.batch_sise'" in res.stderr
  assert 'batch_size' in res.stderr  # lists the known fields


@pytest.mark.parametrize('data, words', [
    ('tfds:mnist', ['mnist', 'tfds build']),
    ('folder:EMPTY', ['EMPTY', '.jpg']),
    ('parquet:EMPTY', ['EMPTY', 'No parquet files']),
])
def test_missing_data_fails_before_compiling(tmp_path, monkeypatch, data,
                                             words):
  """An unprepared TFDS dataset / empty image or parquet folder is reported
  before the state is created (nothing is compiled)."""
  empty = tmp_path / 'empty_folder'
  empty.mkdir()
  data = data.replace('EMPTY', str(empty))
  words = [w.replace('EMPTY', str(empty)) for w in words]

  def no_compile(*a, **k):
    raise AssertionError('state created before the data check')

  monkeypatch.setattr(state_lib, 'create_train_state', no_compile)
  c = _tiny(**{'input.data': data})
  c.input.tfds_data_dir = str(tmp_path / 'tfds')
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  for w in words:
    assert w in str(e.value), str(e.value)


def test_cae_vitl_without_imagenet_fails_early(tmp_path):
  """The mission's command on a machine without ImageNet: the data error
  comes first (before the tokenizer file, before compiling)."""
  res = subprocess.run(
      [sys.executable, '-m', 'mim_jax.main', '--config=configs/cae_vitl.py',
       f'--workdir={tmp_path / "wd"}',
       f'--config.input.tfds_data_dir={tmp_path / "tfds"}'],
      capture_output=True, text=True, cwd=ROOT, timeout=120,
      env=dict(os.environ, PYTHONPATH=ROOT, HOME=str(tmp_path)))
  assert res.returncode != 0
  last = res.stderr.strip().splitlines()[-1]
  assert "TFDS data set 'imagenet2012' is not prepared" in last
  assert 'ILSVRC2012_img_train.tar' in last and 'tfds build' in last
  ckpts = tmp_path / 'wd' / 'checkpoints'
  assert not ckpts.exists() or not any(ckpts.iterdir())


# ---------------------------------------------------------------------------
# One mask ratio: input.mask.ratio. The fields that once also held it
# (top-level mask_ratio, model.mask_ratio) are refused in configs and read
# away from the config.json of older workdirs.

OLD_CONFIG = '''
from mim_jax.methods.mae import config


def get_config():
  c = config.get_config('tiny')
  c.mask_ratio = 0.6
  c.input.mask.ratio = c.get_ref('mask_ratio')
  return c
'''


def test_removed_mask_fields_in_a_config_fail_before_the_workdir(tmp_path):
  old = tmp_path / 'old_config.py'
  old.write_text(OLD_CONFIG)
  c = config_lib.load_config_file(str(old))
  with pytest.raises(ValueError, match=r'config\.mask_ratio was removed') as e:
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert '--config.input.mask.ratio=0.75' in str(e.value)
  assert not (tmp_path / 'wd').exists()
  c = _tiny()
  c.model.mask_ratio = 0.75
  with pytest.raises(ValueError, match=r'config\.model\.mask_ratio was '
                     r'removed.*set input\.mask\.ratio instead'):
    experiment.build_model(c)


@pytest.mark.parametrize('key', ['mask_ratio', 'model.mask_ratio'])
def test_removed_mask_fields_on_the_command_line(key):
  with pytest.raises(ValueError, match=rf'config\.{key} was removed'):
    config_lib.check_overrides(['--config=configs/mae_tiny.py',
                                f'--config.{key}=0.6'])


def test_the_model_masks_the_pipeline_ratio():
  c = _tiny(**{'input.mask.ratio': 0.5})
  assert experiment.build_model(c).mask_ratio == 0.5
  del c.input.mask['ratio']
  with pytest.raises(ValueError, match='input.mask.ratio is unset'):
    experiment.build_model(c)


def test_config_json_of_an_older_workdir():
  """An older run's config.json also has mask_ratio and model.mask_ratio:
  resuming it refuses nothing (model.* is a layout field) and changes
  nothing; its config builds the model without them."""
  c = _tiny()
  saved = config_lib.flat_json(c)
  saved.update({'mask_ratio': 0.75, 'model.mask_ratio': 0.75})
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  saved = traverse_util.unflatten_dict(saved, sep='.')
  assert config_lib.resume_changes(saved, c) == ([], [])
  up = config_lib.upgrade_saved(saved)
  assert 'mask_ratio' not in up and 'mask_ratio' not in up['model']
  assert up['input']['mask']['ratio'] == 0.75 and saved['mask_ratio'] == 0.75
  # A run of ratio 0.6 resumed with 0.75: a change like any other.
  saved['input']['mask']['ratio'] = saved['mask_ratio'] = 0.6
  saved['model']['mask_ratio'] = 0.6
  assert config_lib.resume_changes(saved, c) == (
      [], ['input.mask.ratio: 0.6 -> 0.75'])
  saved['model']['dtype'] = 'bfloat16'   # the compute dtype: no layout
  saved['model']['remat_policy'] = 'full'  # what backward recomputes: none
  assert config_lib.resume_changes(saved, c)[0] == []
  saved['model']['mask_ratio'] = 0.5
  with pytest.raises(ValueError, match='model.mask_ratio=0.5 but '
                     'input.mask.ratio=0.6'):
    config_lib.upgrade_saved(saved)

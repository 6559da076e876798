"""`convert export --format=timm`: a run's encoder as a timm ViT state dict.

Real timm (CPU torch) loads the files with strict=True, and its
forward_features matches our encoder on whole images, for MAE, CAE (q/v
biases, layer scale) and BootMAE (and its momentum encoder), in both pooling
layouts.
"""

import functools
import os
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ROOT
from mim_jax import checkpoint
from mim_jax import experiment
from mim_jax import sharding
from mim_jax import state as state_lib
from mim_jax import weights
from mim_jax.convert import core
from mim_jax.convert import timm_vit
from mim_jax.methods.bootmae import config as bootmae_config
from mim_jax.methods.cae import config as cae_config
from mim_jax.methods.classifier import convert as classifier_convert
from mim_jax.methods.classifier import model as classifier_model
from mim_jax.methods.mae import config as mae_config
from mim_jax.models import vit
from mim_jax.tools import convert as convert_tool

torch = pytest.importorskip('torch')

RECIPES = {'mae': mae_config, 'cae': cae_config, 'bootmae': bootmae_config}
MU = dict(width=32, depth=2, num_heads=2, mlp_dim=128, patch_size=4)


def _timm_vit(kwargs):
  """timm's VisionTransformer of `kwargs`, or skip; timm's torchvision
  import warns that the C ops (which ViT does not use) failed to load."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    timm = pytest.importorskip('timm')
  return timm.models.vision_transformer.VisionTransformer(**kwargs).eval()


def _config(name, scan=False):
  c = RECIPES[name].get_config('tiny')
  if 'scan' in c.model:
    c.model.scan = scan
  return c


def _perturb(tree, seed):
  """Noise on every param, so zero or one inits (biases, q/v biases,
  LayerNorms, gammas) are checked too."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([
      np.asarray(x + 0.05 * jax.random.normal(k, x.shape, x.dtype))
      for x, k in zip(leaves, keys)])


@functools.cache
def _params(name, scan=False):
  """{'encoder': perturbed params}, initialised from the method's encoder
  fields (`Method.encoder`) alone, and checked against the encoder of the
  method's full model (abstractly: compiling whole models is slower)."""
  c = _config(name, scan)
  _, images = _images()
  encoder = vit.Encoder(**experiment.method_of(c).encoder(c))
  params = nn.meta.unbox(jax.jit(encoder.init)(jax.random.key(0), images))
  model, batch = experiment.build_model(c), experiment.batch_spec(c, 1)
  full = jax.eval_shape(lambda: state_lib.init_params(model, batch, c.seed))
  shapes = lambda t: jax.tree.map(np.shape, t)
  assert shapes(params['params']) == shapes(full['encoder'])
  return {'encoder': _perturb(params['params'], 1)}


def _images(n=2, size=32):
  x = np.random.RandomState(0).randn(n, 3, size, size).astype(np.float32)
  return torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))


def _ours(config, encoder_params, pool):
  """Our encoder on whole images: after the final norm ('token'), or the
  last block's output ('avg', timm's forward_features with fc_norm)."""
  fields = dict(experiment.method_of(config).encoder(config))
  if pool == 'avg':
    fields['final_norm'] = False
    encoder_params = {k: v for k, v in encoder_params.items() if k != 'norm'}
  _, images = _images()
  latent, _ = jax.jit(vit.Encoder(**fields).apply)(
      {'params': encoder_params}, images)
  return np.asarray(latent)


def _timm_features(kwargs, sd):
  tm = _timm_vit(kwargs)
  tm.load_state_dict({k: torch.tensor(v) for k, v in sd.items()},
                     strict=True)
  x, _ = _images()
  with torch.no_grad():
    return tm, tm.forward_features(x).numpy()


def _rel_err(got, want):
  return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize('name,pool,scan', [
    ('mae', 'token', True), ('mae', 'avg', False),
    ('cae', 'token', False), ('cae', 'avg', True),
    ('bootmae', 'token', False), ('bootmae', 'avg', False),
])
@pytest.mark.slow
def test_strict_load_and_forward_features_match(name, pool, scan):
  c = _config(name, scan)
  params = _params(name, scan)
  sd, kwargs = weights.to_timm(c, params, pool)
  assert kwargs == weights.timm_kwargs(c, pool)
  assert kwargs['global_pool'] == pool and kwargs['num_classes'] == 0
  assert kwargs['fc_norm'] == (pool == 'avg')
  assert ('norm.weight' in sd) == (pool == 'token')
  tm, got = _timm_features(kwargs, sd)
  assert _rel_err(got, _ours(c, params['encoder'], pool)) < 1e-5
  if pool == 'avg':  # fc_norm starts fresh, as MAE / BEiT fine-tuning
    np.testing.assert_array_equal(sd['fc_norm.weight'], 1.0)
    np.testing.assert_array_equal(sd['fc_norm.bias'], 0.0)
    assert isinstance(tm.norm, torch.nn.Identity)


def test_cae_qv_bias_and_layer_scale_map_exactly():
  c = _config('cae')
  params = _params('cae')
  sd, kwargs = weights.to_timm(c, params, 'token')
  assert kwargs['qkv_bias'] is True
  assert kwargs['init_values'] == c.model.encoder.layer_scale
  block = params['encoder']['blocks_1']
  d = c.model.encoder.width
  qkv_bias = sd['blocks.1.attn.qkv.bias']
  np.testing.assert_array_equal(qkv_bias[:d], block['attn']['q_bias'])
  np.testing.assert_array_equal(qkv_bias[d:2 * d], 0.0)
  np.testing.assert_array_equal(qkv_bias[2 * d:], block['attn']['v_bias'])
  np.testing.assert_array_equal(sd['blocks.1.ls1.gamma'], block['gamma_1'])
  np.testing.assert_array_equal(sd['blocks.1.ls2.gamma'], block['gamma_2'])
  assert not any('q_bias' in k or 'gamma_' in k for k in sd)


@pytest.mark.parametrize('row_first', [False, True])
def test_pos_embed_is_the_sincos_table(row_first):
  """MAE's column-first and the BEiT family's row-first tables, cls row
  zero, land in timm's learned pos_embed."""
  name = 'cae' if row_first else 'mae'
  c = _config(name)
  sd, _ = weights.to_timm(c, _params(name), 'token')
  assert sd['pos_embed'].shape == (1, 1 + 8 * 8, c.model.encoder.width)
  np.testing.assert_array_equal(sd['pos_embed'][0, 0], 0.0)
  enc = vit.Encoder(**experiment.method_of(c).encoder(c))
  assert enc.posemb_row_first == row_first
  np.testing.assert_array_equal(sd['pos_embed'],
                                enc.pos_embed(np.zeros((1, 32, 32, 3))))


def test_learned_posemb_without_qkv_bias():
  """The generic mapping on bare encoder fields: a learned pos_embed param
  and no qkv bias (qkv_bias=False in timm)."""
  fields = dict(MU, posemb='learned', qkv_bias=False)
  _, images = _images()
  encoder = vit.Encoder(**fields)
  params = _perturb(nn.meta.unbox(jax.jit(encoder.init)(
      jax.random.key(0), images))['params'], 3)
  sd, kwargs = timm_vit.encoder_to_timm(params, fields, 32, 'token')
  assert kwargs['qkv_bias'] is False and 'blocks.0.attn.qkv.bias' not in sd
  np.testing.assert_array_equal(sd['pos_embed'], params['pos_embed'])
  _, got = _timm_features(kwargs, sd)
  want, _ = jax.jit(encoder.apply)({'params': params}, images)
  assert _rel_err(got, np.asarray(want)) < 1e-5


def test_avg_export_loads_into_the_classifier():
  """Round trip: the 'avg' file is a fine-tuning checkpoint without head;
  our classifier loads it and pools what timm pools."""
  c = _config('mae')
  sd, kwargs = weights.to_timm(c, _params('mae'), 'avg')
  tm, _ = _timm_features(kwargs, sd)
  model = classifier_model.Classifier(
      encoder=dict(c.model.encoder, posemb='learned'), num_classes=5,
      pool='avg')
  x, images = _images()
  init = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0),
                                            {'image': images}))
  loaded = classifier_convert.to_flax(sd, model, init['params'], 32,
                                      strict=False)
  _, out = jax.jit(model.apply)({'params': loaded}, {'image': images})
  with torch.no_grad():
    want = tm.forward_head(tm.forward_features(x), pre_logits=True).numpy()
  assert _rel_err(np.asarray(out['features']), want) < 1e-5


# Errors that name the problem and the fix.


@pytest.mark.parametrize('fields,size,pool,message', [
    (dict(MU, rel_pos_bias=True), 32, 'token', 'relative position bias'),
    (dict(MU, layernorm_eps=1e-5), 32, 'token', 'eps=1e-05'),
    (dict(MU, width=44, num_heads=4, mlp_dim=60), 32, 'token',
     'MLP width 60'),
    (dict(MU, final_norm=False), 32, 'token', "use pool 'avg'"),
    (MU, 30, 'token', 'not a multiple of the patch size 4'),
    (MU, 32, 'cls', "use one of ('token', 'avg')"),
])
def test_unrepresentable_encoders_raise(fields, size, pool, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(
      ')', r'\)')):
    timm_vit.timm_kwargs(fields, size, pool)


def test_every_problem_is_listed_together():
  with pytest.raises(ValueError) as e:
    timm_vit.timm_kwargs(dict(MU, rel_pos_bias=True, layernorm_eps=1e-5),
                         32, 'token')
  assert 'relative position bias' in str(e.value)
  assert 'LayerNorm epsilon 1e-05' in str(e.value)


def test_params_of_another_architecture_are_named():
  c = _config('mae')
  with c.unlocked():
    c.model.encoder.depth = 3
  with pytest.raises(core.ConversionError, match='blocks.3.attn.qkv.weight'):
    weights.to_timm(c, _params('mae'), 'token')


def test_a_method_without_encoder_raises():
  c = ml_collections.ConfigDict(dict(model_name='classifier',
                                     input=dict(image_size=32)))
  with pytest.raises(ValueError, match='declares no pretraining encoder'):
    weights.timm_kwargs(c, 'token')


def _workdir(config, path):
  """A workdir whose checkpoint (step 0) holds a train state of the
  config's shapes with random params and a different random EMA (filled in
  on the host: initialising the whole model would compile it)."""
  mesh = sharding.make_mesh([('data', 1)], jax.devices()[:1])
  abstract = state_lib.create_train_state(
      config, experiment.build_model(config), mesh,
      experiment.batch_spec(config, 1), materialize=False)[0]
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  state = state.replace(params=_perturb(state.params, 1),
                        ema_params=_perturb(state.ema_params, 2))
  mgr = checkpoint.make_manager(path, keep=1, async_save=False)
  checkpoint.save(mgr, 0, state, 1, force=True)
  mgr.wait_until_finished()
  return state


def test_ema_export_needs_an_ema(tmp_path):
  with pytest.raises(ValueError, match='mae run keeps no EMA'):
    convert_tool.export_timm(_config('mae'), str(tmp_path / 'run'),
                             str(tmp_path / 'x.pth'), ema=True)


def _cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'mim_jax.tools.convert', *args],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.slow
def test_cli_exports_the_bootmae_momentum_encoder(tmp_path):
  c = _config('bootmae')
  wd, out = str(tmp_path / 'run'), str(tmp_path / 'vit.safetensors')
  state = _workdir(c, wd)
  res = _cli('export', '--format=timm', '--config=configs/bootmae_tiny.py',
             f'--workdir={wd}', f'--out={out}', '--timm_pool=avg',
             '--timm_ema', '--safetensors')
  assert res.returncode == 0, res.stderr[-3000:]
  kwargs = weights.timm_kwargs(c, 'avg')
  assert timm_vit.constructor(kwargs) in res.stderr
  assert 'momentum (EMA) encoder of step 0' in res.stderr
  assert f'safetensors.torch.load_file({out!r})' in res.stderr
  sd = core.load_state_dict(out)  # no pickle
  _, got = _timm_features(kwargs, sd)
  want = _ours(c, state.ema_params['encoder'], 'avg')
  assert _rel_err(got, want) < 1e-5
  assert _rel_err(got, _ours(c, state.params['encoder'], 'avg')) > 1e-3


def test_cli_rejects_bad_flags():
  res = _cli('export', '--format=onnx', '--config=configs/mae_tiny.py',
             '--workdir=x', '--out=x.pth')
  assert res.returncode != 0
  assert "--format=onnx" in res.stderr and 'official|timm' in res.stderr
  res = _cli('export', '--timm_pool=avg', '--config=configs/mae_tiny.py',
             '--workdir=x', '--out=x.pth')
  assert res.returncode != 0
  assert '--timm_pool only apply to export --format=timm' in res.stderr
  res = _cli('export', '--safetensors', '--config=configs/mae_tiny.py',
             '--workdir=x', '--out=dir/x.pth')
  assert res.returncode != 0
  assert ('--out=dir/x.pth does not end in .safetensors: use '
          '--out=dir/x.safetensors' in res.stderr)

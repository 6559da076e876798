"""BootMAE: parity with the official code (momentum encoder included),
conversion both ways, the EMA schedule and bad input."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import FIXTURES
from mim_jax import experiment
from mim_jax import method
from mim_jax import methods
from mim_jax import optim
from mim_jax import state as state_lib
from mim_jax import steps
from mim_jax.methods.bootmae import config as bootmae_config
from mim_jax.methods.bootmae import convert as convert_bootmae
from mim_jax.methods.bootmae import model as bootmae
from mim_jax.parity import core

BOOTMAE = os.path.join(FIXTURES, 'bootmae')


@pytest.fixture(scope='module')
def report():
  return core.run(BOOTMAE)


@pytest.mark.slow
def test_bootmae_fixture_passes(report):
  assert report['pass'], report['failures']
  fwd = report['forward']
  assert set(fwd['loss_rel']) == {'loss', 'loss_pixel', 'loss_feature'}
  assert max(fwd['loss_rel'].values()) <= 1e-5
  # predictions, targets, their LayerNorms, the patch statistics, encoder
  # taps and latents (patch order) and both decoders' outputs.
  assert fwd['tensors']['compared'] >= 14
  assert fwd['tensors']['worst_rel_to_max'] <= 1e-5
  assert report['grads']['compared'] == 163
  assert report['grads']['worst_rel_to_max'] <= 2e-5
  curve = report['curve']
  assert curve['steps'] == 30 and curve['decay_groups_match']
  assert curve['loss_max_rel'] <= 1e-5 and curve['lr_max_rel'] <= 1e-5
  assert max(curve['terms_max_rel'].values()) <= 1e-5
  # Online params and the momentum encoder (model_ema.*) after 30 steps.
  final = curve['final_params']
  assert final['compared'] == 218 and final['worst_rel_to_max'] <= 2e-5


def _model_and_params():
  fx, meth, _, model, batch, params = core.load_converted(BOOTMAE)
  return fx, model, params, meth.parity.initial_ema(fx, model, params), batch


def test_export_writes_the_official_keys_momentum_encoder_included():
  fx, model, params, ema, _ = _model_and_params()
  conv = methods.get('bootmae').converter
  sd = conv.to_torch(params, model, 32)
  sd.update(conv.ema_to_torch(ema, model, 32))
  assert set(sd) == set(fx['state_dict'])
  for k, v in fx['state_dict'].items():
    np.testing.assert_allclose(sd[k], v, atol=1e-6, err_msg=k)
  back = conv.to_flax(sd, model, params, 32)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  ema_back = conv.ema_to_flax(sd, model, params, 32)
  for a, b in zip(jax.tree.leaves(ema_back), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(a, b)
  # A file without the momentum encoder (e.g. an encoder export) has none.
  online = {k: v for k, v in sd.items() if not k.startswith('model_ema.')}
  assert conv.ema_to_flax(online, model, params, 32) is None


def test_pixel_head_is_the_transposed_conv():
  """Our per-patch head equals torch's ConvTranspose2d(k=p, s=p)."""
  import torch  # pylint: disable=g-import-not-at-top
  fx, model, params, _, batch = _model_and_params()
  del fx, batch
  w = convert_bootmae.to_torch(params, model, 32)['lm_head.proj.weight']
  b = np.asarray(params['pixel_head']['bias'])
  x = np.random.default_rng(0).standard_normal((2, 64, 48)).astype(
      np.float32)
  ours = bootmae.PatchHead(4, 3).apply({'params': params['pixel_head']},
                                       x)
  grid = torch.from_numpy(x.reshape(2, 8, 8, 48).transpose(0, 3, 1, 2))
  ref = torch.nn.functional.conv_transpose2d(
      grid, torch.from_numpy(w), torch.from_numpy(b), stride=4).numpy()
  from mim_jax.models import layers  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(
      layers.unpatchify(np.asarray(ours), 4, (8, 8), 3),
      ref.transpose(0, 2, 3, 1), atol=1e-5)


def test_decoder_head_dim_quirk():
  """512 wide with 12 heads: 12 x 42 = 504 attention dims, as upstream."""
  model = bootmae.Model(encoder=dict(width=48, depth=2, num_heads=12,
                                     patch_size=4, mlp_dim=96),
                        decoder_width=512, decoder_depth=1, taps=(0, 1))
  shapes = {'image': jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32),
            'mask': jax.ShapeDtypeStruct((1, 16), jnp.float32)}
  p = jax.eval_shape(lambda: state_lib.init_params(model, shapes, 0))
  blk = p['pixel_blocks_0']
  assert blk['attn']['qkv']['kernel'].shape == (512, 3 * 504)
  assert blk['attn']['proj']['kernel'].shape == (504, 512)
  assert blk['c_attn']['kv']['kernel'].shape == (48, 2 * 504)
  assert blk['c_attn']['q_bias'].shape == (504,)


def test_ema_schedule_official_and_bad_values():
  c = ml_collections.ConfigDict(dict(
      input=dict(batch_size=4096, num_train_examples=1281167),
      ema=dict(momentum=[0.999, 0.9999, 0.99999],
               boundary_epochs=[0, 100, 400])))
  m = optim.ema_momentum_schedule(c)
  spe = 1281167 // 4096
  at = (0, spe - 1, 50 * spe, 100 * spe, 250 * spe, 400 * spe, 800 * spe)
  want = [0.999, 0.999, 0.99945, 0.9999, 0.999945, 0.99999, 0.99999]
  np.testing.assert_allclose([float(m(s)[0]) for s in at], want, rtol=1e-7)
  # 1 - momentum is exact to float32 precision (not 1 - float32(m)).
  np.testing.assert_allclose([float(m(s)[1]) for s in at],
                             [1 - w for w in want], rtol=1e-6)
  for bad, words in (({'momentum': [0.999, 1.0]}, 'outside [0, 1)'),
                     ({'momentum': [-0.1, 0.9]}, 'outside [0, 1)'),
                     ({'boundary_epochs': [100, 0, 400]}, 'must increase'),
                     ({'momentum': []}, 'not set')):
    c2 = ml_collections.ConfigDict(c.to_dict())
    c2.ema.update(bad)
    with pytest.raises(ValueError, match=words.replace('[', r'\[').replace(
        ')', r'\)')):
      optim.ema_momentum_schedule(c2)


def test_taps_outside_the_encoder_are_rejected():
  model = bootmae.Model(encoder=dict(width=32, depth=2, num_heads=2,
                                     patch_size=4), decoder_width=32,
                        decoder_depth=1, taps=(0, 5))
  shapes = {'image': jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32),
            'mask': jax.ShapeDtypeStruct((1, 16), jnp.float32)}
  with pytest.raises(ValueError, match=r'model.taps=\[0, 5\]'):
    jax.eval_shape(lambda: state_lib.init_params(model, shapes, 0))


@pytest.mark.parametrize('override, words', [
    ({'model.taps': (0, 4)}, ['model.taps=[0, 4]', '[-4, 3]']),
    ({'ema.momentum': (0.99, 1.0)}, ['outside [0, 1)']),
    ({'input.mask.total_masked': 65}, ['total_masked=65', '64 patches']),
])
def test_bad_bootmae_config_fails_before_building(override, words):
  from mim_jax import train  # pylint: disable=g-import-not-at-top
  c = bootmae_config.get_config('tiny')
  (key, value), = override.items()
  node = c
  *path, last = key.split('.')
  for part in path:
    node = node[part]
  node[last] = value
  with pytest.raises(ValueError) as e:
    train.validate_config(c, 8, 8)
  for w in words:
    assert w in str(e.value), str(e.value)


@pytest.mark.slow
def test_bootmae_tiny_steps_checkpoint_and_shard_the_ema_like_the_params(
    tmp_path):
  """bootmae_tiny on the embedded photos (masks from tf.data): the EMA moves
  towards the online encoder each step, is sharded exactly like it (FSDP
  over 8 devices), and is checkpointed, restored and exported with it."""
  from mim_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from mim_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from mim_jax import sharding  # pylint: disable=g-import-not-at-top
  from mim_jax import weights  # pylint: disable=g-import-not-at-top
  # (train_and_evaluate on bootmae_tiny runs in colab_test.)
  c = bootmae_config.get_config('tiny')
  c.total_steps, c.warmup_steps = 4, 1
  c.input.batch_size = 16
  c.min_shard_size = 0
  model = experiment.build_model(c)
  mesh = sharding.make_mesh(c.mesh)
  shapes = experiment.batch_spec(c)
  assert set(shapes) == {'image', 'mask'}
  state, state_sh, _, schedule = state_lib.create_train_state(
      c, model, mesh, shapes)
  train_step = steps.jit_train_step(c, model, experiment.build_loss(c),
                                    schedule, mesh, state_sh)
  ds = input_pipeline.make_train_dataset(c.input, patch_size=4, seed=0,
                                         process_index=0, process_count=1)
  for _, local in zip(range(4), ds.as_numpy_iterator()):
    batch = sharding.to_global({k: local[k] for k in shapes},
                               sharding.data_sharding(mesh))
    state, metrics = train_step(state, batch, {})  # no frozen targets
    assert np.isfinite(float(metrics['loss']))
  mgr = checkpoint.make_manager(str(tmp_path), keep=3, async_save=False)
  checkpoint.save(mgr, 4, state, 1, force=True)
  assert int(state.step) == 4
  params, ema = state.params['encoder'], state.ema_params['encoder']
  for p, e in zip(jax.tree.leaves(params), jax.tree.leaves(ema)):
    assert p.sharding == e.sharding
  sharded = [e for e in jax.tree.leaves(ema)
             if not e.sharding.is_fully_replicated]
  assert len(sharded) > 10
  # Not a copy: momentum 0.99.. keeps it behind the online encoder.
  diff = max(float(jnp.abs(p - e).max())
             for p, e in zip(jax.tree.leaves(params), jax.tree.leaves(ema)))
  assert 0 < diff

  abstract = state_lib.create_train_state(c, model, mesh, shapes,
                                      materialize=False)[0]
  restored, step = checkpoint.restore_latest(mgr, abstract)
  assert step == 4
  for a, b in zip(jax.tree.leaves(restored.ema_params),
                  jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(a, b)

  # Export (the convert tool's path) writes the momentum encoder too, and
  # `init_from` reads it back.
  saved, _ = weights.state_from_workdir(c, model, str(tmp_path))
  sd = weights.to_torch(c, model, saved.params, ema=saved.ema_params)
  assert 'model_ema.blocks.3.attn.qkv.weight' in sd
  path = str(tmp_path / 'bootmae_tiny.pth')
  from mim_jax.convert import core as convert_core  # pylint: disable=g-import-not-at-top,line-too-long
  convert_core.save_state_dict(sd, path)
  # The official scripts' layout: {'model': ..., 'model_ema': ...}.
  import torch  # pylint: disable=g-import-not-at-top
  wrapped = str(tmp_path / 'checkpoint-3.pth')
  torch.save({'model': {k: torch.from_numpy(np.array(v)) for k, v in
                        sd.items() if not k.startswith('model_ema.')},
              'model_ema': {k[len('model_ema.'):]: torch.from_numpy(
                  np.array(v)) for k, v in sd.items()
                            if k.startswith('model_ema.')},
              'epoch': 3}, wrapped)
  for file in (path, wrapped):
    params = weights.from_torch(c, model, file)
    ema = weights.ema_from_torch(c, model, file, params)['encoder']
    want = dict(saved.ema_params['encoder'])
    # Upstream never reads the momentum encoder's final norm (nor stores
    # it in the fixtures): it comes from the online model.
    np.testing.assert_array_equal(ema.pop('norm')['scale'],
                                  params['encoder']['norm']['scale'])
    want.pop('norm')
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)


def test_official_recipes():
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  for v, depth, min_lr, ema in (
      ('b', 12, 1e-4, (0.999, 0.9999, 0.99999)),
      ('l', 24, 1e-5, (0.999, 0.9999))):
    c = config_lib.load_config_file(os.path.join(
        os.path.dirname(FIXTURES), '..', 'configs', f'bootmae_vit{v}.py'))
    assert optim.peak_lr(c) == pytest.approx(2.4e-3)
    assert (c.optim.b1, c.optim.b2, c.optim.weight_decay) == (0.9, 0.95,
                                                              0.05)
    assert c.optim.grad_clip_norm is None and 'cls_token' in (
        c.optim.wd_exclude)
    assert c.schedule.min_lr == min_lr and c.schedule.warmup == 'linspace'
    assert c.total_epochs == 800 and c.warmup_epochs == 40
    assert tuple(c.input.mean) == tuple(c.input.std) == (0.5, 0.5, 0.5)
    m = c.input.mask
    assert (m.num_masking_patches, m.min_num_patches, m.max_num_patches,
            m.variant, m.roll) == (120, 16, 60, 'bootmae', 3)
    assert tuple(c.ema.momentum) == ema
    model = experiment.build_model(c)
    assert model.tap_indices() == (0, depth - 1)
    assert (model.decoder_width, model.decoder_depth,
            model.feature_depth) == (512, 2, 2)
    assert c.loss.feature_ramp_fraction == 0.25


def test_feature_weight_ramps_per_epoch_over_the_first_quarter():
  """Upstream: fw(epoch) = min(4 fw (1 + epoch) / epochs, fw)."""
  from mim_jax.methods.bootmae import loss as bootmae_loss  # pylint: disable=g-import-not-at-top
  spe, epochs = 10, 800
  at = lambda step: float(bootmae_loss.feature_weight_at(
      step, feature_weight=1.0, feature_ramp_fraction=0.25,
      total_steps=epochs * spe, steps_per_epoch=spe))
  for epoch in (0, 1, 57, 198, 199, 200, 799):
    want = min(4 * (1 + epoch) / epochs, 1.0)
    assert at(epoch * spe) == pytest.approx(want)
    assert at(epoch * spe + spe - 1) == pytest.approx(want)  # per epoch
  assert float(bootmae_loss.feature_weight_at(
      123, feature_weight=0.5, feature_ramp_fraction=0.0, total_steps=1,
      steps_per_epoch=1)) == 0.5
  # The loss reads the lengths from its schedule; a ramp needs them.
  rng = np.random.default_rng(0)
  batch = {'image': rng.standard_normal((1, 8, 8, 3)).astype(np.float32),
           'feature_target': np.ones((1, 4, 2), np.float32)}
  out = {'mask': np.array([[1, 0, 1, 0]], np.float32),
         'pred_feature': np.zeros((1, 4, 2), np.float32)}
  pred = np.zeros((1, 4, 48), np.float32)
  schedule = method.Schedule(total_steps=epochs * spe, steps_per_epoch=spe)
  for epoch in (0, 57, 200):
    _, aux = bootmae_loss.loss_fn(pred, out, batch, step=epoch * spe + 3,
                                  schedule=schedule)
    assert float(aux['feature_weight']) == pytest.approx(
        min(4 * (1 + epoch) / epochs, 1.0))
  with pytest.raises(ValueError, match='training'):
    bootmae_loss.loss_fn(pred, out, batch, step=0,
                         schedule=method.Schedule())

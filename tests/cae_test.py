"""CAE: parity with the official code, conversion, losses and options."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, ROOT
from mim_jax import experiment
from mim_jax import method
from mim_jax import state as state_lib
from mim_jax.convert import core as convert_core
from mim_jax.methods.cae import config as cae_config
from mim_jax.methods.cae import convert as convert_cae
from mim_jax.methods.cae import loss as cae_loss
from mim_jax.methods.cae import model as cae
from mim_jax.methods.cae import parity as parity_cae
from mim_jax.parity import core

CAE = os.path.join(FIXTURES, 'cae')


@pytest.fixture(scope='module')
def report():
  return core.run(CAE)


@pytest.mark.slow
def test_cae_fixture_passes(report):
  assert report['pass'], report['failures']
  fwd = report['forward']
  assert max(fwd['loss_rel'].values()) <= 1e-5
  # logits, latent_predict, latent_target, encoder_out, teacher, mlm_acc
  assert fwd['tensors']['compared'] == 6
  assert fwd['tensors']['worst_rel_to_max'] <= 1e-5
  assert report['grads']['compared'] == 144
  assert report['grads']['worst_rel_to_max'] <= 2e-5
  # regressor norm1_k.bias: a true zero gradient, compared in absolute terms
  assert report['grads']['worst_zero_part_abs'] <= 1e-7
  curve = report['curve']
  assert curve['steps'] == 30 and curve['decay_groups_match']
  assert curve['loss_max_rel'] <= 1e-5 and curve['lr_max_rel'] <= 1e-5
  assert curve['final_params']['worst_rel_to_max'] <= 2e-5


def _model_and_params():
  fx, _, _, model, batch, params = core.load_converted(CAE)
  return fx, model, params, batch


def test_export_writes_the_official_keys_teacher_included():
  fx, model, params, _ = _model_and_params()
  sd = convert_cae.to_torch(params, model, 32)
  assert set(sd) == set(fx['state_dict'])
  for k, v in fx['state_dict'].items():
    np.testing.assert_allclose(sd[k], v, atol=1e-6, err_msg=k)
  back = convert_cae.to_flax(sd, model, params, 32)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_wrong_architecture_is_named():
  fx, model, params, _ = _model_and_params()
  sd = dict(fx['state_dict'])
  sd.pop('regresser.regressor_blocks.1.norm2_cross.weight')
  sd['decoder.head.weight'] = sd['decoder.head.weight'][:10]
  with pytest.raises(convert_core.ConversionError) as e:
    convert_cae.to_flax(sd, model, params, 32)
  msg = str(e.value)
  assert 'regressor_blocks_1/norm2_cross/scale' in msg
  assert 'decoder.head.weight: got (10, 64)' in msg


@pytest.mark.slow
def test_teacher_is_the_encoder_under_stop_gradient():
  fx, model, params, batch = _model_and_params()
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  def align(p):
    _, out = model.apply({'params': p}, batch)
    return out['latent_target'].sum()

  g = jax.jit(jax.grad(align))(params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))
  # Same weights on the masked patches: the teacher's cls row equals an
  # encoder pass over those patches.
  _, out = jax.jit(lambda p: model.apply({'params': p}, batch))(params)
  np.testing.assert_allclose(out['alignment_encoder_out'],
                             fx['outputs']['alignment_encoder_out'],
                             rtol=0, atol=1e-5)


@pytest.mark.slow
def test_pixel_targets_train_without_a_tokenizer():
  fx, _, _, batch = _model_and_params()
  config = parity_cae.experiment_config(fx['config'])
  config.model.target = 'pixels'
  model = experiment.build_model(config)
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != 'token_ids'}
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in batch.items()}
  params = state_lib.init_params(model, shapes, 0)
  assert params['decoder_head']['kernel'].shape == (64, 4 * 4 * 3)
  pred, out = model.apply({'params': params}, batch)
  loss, aux = cae_loss.loss_fn(pred, out, batch, step=0,
                               schedule=method.Schedule())
  assert np.isfinite(float(loss)) and 'mlm_acc' not in aux
  with pytest.raises(ValueError, match='token_ids'):
    model_t = cae.Model(encoder=dict(width=64, depth=1, num_heads=4,
                                     patch_size=4), decoder_width=64,
                        decoder_num_heads=4, regressor_depth=1,
                        decoder_depth=1, vocab_size=16)
    p = state_lib.init_params(model_t, shapes, 0)
    pred, out = model_t.apply({'params': p}, batch)
    cae_loss.loss_fn(pred, out, batch, step=0, schedule=method.Schedule())


def test_token_targets_without_a_tokenizer_fail_before_building():
  from mim_jax import train  # pylint: disable=g-import-not-at-top
  c = cae_config.get_config('B/16')
  assert c.tokenizer.weights.endswith('dall_e/encoder.pkl')
  c.tokenizer.weights = ''
  with pytest.raises(ValueError, match='tokenizer.weights'):
    train.validate_config(c, 8, 8)
  assert c.input.mask.kind == 'block' and c.lr == 1.5e-3
  assert c.optim.grad_clip_norm == 3.0 and c.loss.align_weight == 2.0


@pytest.mark.slow
def test_cae_tiny_checkpoint_round_trips_through_a_pth(tmp_path):
  """`--config.init_from=x.pth` and the convert tool's export, for CAE:
  encoder, regressor and decoder (teacher keys written, then skipped); the
  same file loads into the nn.scan layout, with the same outputs."""
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mim_jax import weights  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file(os.path.join(ROOT, 'configs',
                                               'cae_tiny.py'))
  model = experiment.build_model(c)
  params = state_lib.init_params(model, experiment.batch_spec(c, 1), 3)
  sd = weights.to_torch(c, model, params)
  assert any(k.startswith('alignment_encoder.') for k in sd)
  assert any(k.startswith('regresser.') for k in sd)
  path = str(tmp_path / 'cae_tiny.pth')
  convert_core.save_state_dict(sd, path)
  back = weights.from_torch(c, model, path)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)

  c.model.scan = True
  scan_model = experiment.build_model(c)
  scanned = weights.from_torch(c, scan_model, path)
  assert scanned['decoder_blocks']['norm1']['scale'].shape == (2, 64)
  assert set(weights.to_torch(c, scan_model, scanned)) == set(sd)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  mask = np.tile(np.r_[np.ones(32), np.zeros(32)], (2, 1)).astype(np.float32)
  batch = {'image': images, 'mask': mask}
  want = model.apply({'params': params}, batch)[0]
  got = scan_model.apply({'params': scanned}, batch)[0]
  np.testing.assert_allclose(got, want, atol=1e-5)

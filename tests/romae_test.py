"""Robust MAE: attention-probability dropout, population-statistics targets,
encoder mask tokens, their configs, checks, conversion and cost."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import FIXTURES, ROOT
from mim_jax import config_lib
from mim_jax import experiment
from mim_jax import masking
from mim_jax import methods
from mim_jax import sharding
from mim_jax import state as state_lib
from mim_jax import train
from mim_jax import weights
from mim_jax.methods.mae import config as mae_config
from mim_jax.methods.mae import loss as mae_loss
from mim_jax.methods.mae import model as mae_model
from mim_jax.models import layers
from mim_jax.models import vit
from mim_jax.parity import core
from mim_jax.targets import pixels
from mim_jax.tools import plan

MAE = methods.get('mae')


def _robust_tiny():
  """configs/romae_tiny.py: every switch on."""
  return config_lib.load_config_file(os.path.join(ROOT, 'configs',
                                                  'romae_tiny.py'))


def _images(n=4, size=32, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, 3))


# ---------------------------------------------------------------------------
# Switches off: the official computation, bit for bit.


@pytest.mark.slow
def test_switches_off_give_identical_parity_reports(monkeypatch):
  base = core.run(os.path.join(FIXTURES, 'mae'))
  adapter = MAE.parity

  def explicit_off(fc):
    c = adapter.experiment_config(fc)
    c.model.update(decoder_attn_drop=0.0, encoder_attn_drop=0.0,
                   insert_block=None, insert_ratio=0.5)
    c.loss.update(pop_norm='none', pop_axis='pixel', pop_momentum=0.5,
                  inserted_in_loss=False)
    return c

  patched = dataclasses.replace(MAE, parity=dataclasses.replace(
      adapter, experiment_config=explicit_off))
  monkeypatch.setattr(methods, 'get',
                      lambda name: patched if name == 'mae' else
                      methods.REGISTRY[name])
  off = core.run(os.path.join(FIXTURES, 'mae'))
  assert base['pass'] and off['pass']
  assert off == base


# ---------------------------------------------------------------------------
# Attention-probability dropout.


def _probe_attention(rate, train_mode, n=64, t=32, seed=0):
  """Attention whose output rows are its (dropped) probabilities: q = k =
  0 (uniform 1/t), v = the one-hot token, proj = identity."""
  att = layers.Attention(num_heads=1, attn_drop=rate)
  x = jnp.broadcast_to(jnp.eye(t), (n, t, t))
  eye = np.eye(t, dtype=np.float32)
  params = {'qkv': {'kernel': np.concatenate(
      [np.zeros((t, 2 * t), np.float32), eye], 1),
                    'bias': np.zeros(3 * t, np.float32)},
            'proj': {'kernel': eye, 'bias': np.zeros(t, np.float32)}}
  return np.asarray(att.apply({'params': params}, x,
                              deterministic=not train_mode,
                              rngs={'dropout': jax.random.PRNGKey(seed)}))


def test_attention_dropout_is_identity_at_eval():
  np.testing.assert_allclose(_probe_attention(0.3, False), 1 / 32,
                             rtol=1e-6)


@pytest.mark.parametrize('rate', [0.1, 0.3])
def test_attention_dropout_drops_the_rate_and_rescales(rate):
  probs = _probe_attention(rate, True)          # 64 * 32 * 32 = 65,536
  dropped = np.mean(probs == 0)
  assert abs(dropped - rate) < 0.01             # 5 sigma ~ 0.009
  kept = probs[probs != 0]
  np.testing.assert_allclose(kept, 1 / 32 / (1 - rate), rtol=1e-5)


def test_mae_attention_dropout_reaches_encoder_and_decoder_in_training_only():
  c = mae_config.get_config('tiny')
  batch = {'image': _images(2),
           'noise': jax.random.uniform(jax.random.PRNGKey(1), (2, 64))}
  plain = MAE.build_model(c)
  params = state_lib.init_params(plain, experiment.batch_spec(c, 2), 0)
  rng = {'dropout': jax.random.PRNGKey(2)}
  ref_eval = plain.apply({'params': params}, batch)[0]
  ref_train = plain.apply({'params': params}, batch, train=True, rngs=rng)[0]
  for key in ('decoder_attn_drop', 'encoder_attn_drop'):
    c2 = mae_config.get_config('tiny')
    c2.model[key] = 0.3
    m = MAE.build_model(c2)
    np.testing.assert_array_equal(m.apply({'params': params}, batch)[0],
                                  ref_eval)
    got = m.apply({'params': params}, batch, train=True, rngs=rng)[0]
    assert np.abs(np.asarray(got) - np.asarray(ref_train)).max() > 1e-3


# ---------------------------------------------------------------------------
# Population statistics: each mode's formula on a hand-made batch.


def _patches(seed=0, n=3, l=5, p=2):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, l, p * p * 3)) *
          np.tile([1.0, 2.0, 0.5], p * p) +
          np.tile([0.5, -1.0, 2.0], p * p)).astype(np.float32)


@pytest.mark.parametrize('axis', ['channel', 'pixel'])
def test_population_batch_mode_formula(axis):
  x = _patches()
  mu, sigma = mae_loss.population(jnp.asarray(x), {}, mode='batch',
                                  axis=axis, mean=None, std=None, eps=1e-6)
  flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
  if axis == 'pixel':
    want_mu, want_var = flat.mean(0), flat.var(0)     # biased
  else:
    per_c = flat.reshape(-1, 3)
    want_mu = np.tile(per_c.mean(0), 4)
    want_var = np.tile(per_c.var(0), 4)
  np.testing.assert_allclose(mu, want_mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sigma, np.sqrt(want_var + 1e-6), rtol=1e-5)


def test_population_fixed_mode_and_target_order():
  x = _patches()
  mean, std = (0.1, -0.2, 0.3), (2.0, 0.5, 1.0)
  mu, sigma = mae_loss.population(jnp.asarray(x), {}, mode='fixed',
                                  axis='channel', mean=mean, std=std,
                                  eps=1e-6)
  np.testing.assert_array_equal(mu, np.tile(mean, 4).astype(np.float32))
  np.testing.assert_array_equal(sigma, np.tile(std, 4).astype(np.float32))
  # The loss target: population first, then MAE's per-patch norm.
  pred = np.zeros_like(x)
  out = {'target': jnp.asarray(x), 'mask': jnp.ones(x.shape[:2])}
  _, aux = mae_loss.loss_fn(pred, out, {}, step=0, schedule=None,
                            norm_pix_loss=True, pop_norm='fixed',
                            pop_mean=mean, pop_std=std)
  z = (x - np.tile(mean, 4)) / np.tile(std, 4)
  want = (z - z.mean(-1, keepdims=True)) / np.sqrt(
      z.var(-1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(aux['target'], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('axis', ['channel', 'pixel'])
def test_population_running_mode_is_the_debiased_ema(axis):
  m = 0.9
  state = {'mean': jnp.zeros(12), 'var': jnp.zeros(12),
           'count': jnp.zeros(())}
  batches = [_patches(s) for s in range(3)]
  ms, vs = np.zeros(12), np.zeros(12)
  for t, b in enumerate(batches, 1):
    state = pixels.running_fold(state, jnp.asarray(b), axis, m)
    mu, var = pixels.population_moments(jnp.asarray(b), axis)
    ms = m * ms + (1 - m) * np.asarray(mu, np.float64)
    vs = m * vs + (1 - m) * np.asarray(var, np.float64)
    got_mu, got_var = pixels.running_stats(state, m)
    np.testing.assert_allclose(got_mu, ms / (1 - m ** t), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(got_var, vs / (1 - m ** t), rtol=1e-5)
    if t == 1:   # after one batch: that batch's own moments
      np.testing.assert_allclose(got_var, var, rtol=1e-5)
  assert int(state['count']) == 3


def test_running_provider_folds_the_batch_it_normalises():
  c = mae_config.get_config('tiny')
  c.loss.pop_norm = 'running'
  (prov,) = MAE.targets(c)
  assert prov.kind == 'running' and prov.name == 'population'
  state = prov.init(None)
  batch = {'image': _images(4)}
  got = prov.compute(state, batch)
  x = layers.patchify(batch['image'], 4)
  mu, var = pixels.population_moments(x, 'channel')
  np.testing.assert_allclose(got['pop_mean'], mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['pop_std'], np.sqrt(var + 1e-6), rtol=1e-5)
  new = prov.update(state, batch, 0)
  assert float(new['count']) == 1.0


def test_batch_mode_targets_do_not_depend_on_the_mesh():
  """pop_norm='batch' on 8 devices (data-sharded batch) == on 1 device."""
  c = mae_config.get_config('tiny')
  c.loss.pop_norm = 'batch'
  c.loss.pop_axis = 'pixel'
  loss_fn = experiment.build_loss(c)
  images = _images(8)
  x = layers.patchify(images, 4)
  out = {'target': x, 'mask': jnp.ones(x.shape[:2])}

  def targets(target):
    return loss_fn(jnp.zeros_like(target), dict(out, target=target), {},
                   0)[1]['target']

  one = jax.jit(targets)(jax.device_put(x, jax.devices()[0]))
  mesh = sharding.make_mesh([('data', 8)], jax.devices()[:8])
  xs = jax.device_put(x, NamedSharding(mesh, P('data')))
  eight = jax.jit(targets)(xs)
  assert len(xs.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(eight), np.asarray(one), rtol=1e-6,
                             atol=1e-6)


# ---------------------------------------------------------------------------
# Encoder mask tokens.


def _encoder_fields(**kw):
  return dict(config_lib.TINY_ENCODER, **kw)


def test_inserted_tokens_enter_at_the_block_and_positions():
  """Taps: blocks before the insertion see 1 + K tokens (and equal the
  encoder without insertion); from the insertion block on, 1 + K + M."""
  n, block = 2, 2
  images = _images(n)
  noise = jax.random.uniform(jax.random.PRNGKey(3), (n, 64))
  ids_keep, _, _ = mae_model.ids_from_noise(noise, 16)
  ids_insert = jnp.argsort(noise, 1)[:, 16:32]
  enc = vit.Encoder(**_encoder_fields(taps=(0, 1, 2, 3)))
  variables = enc.init(jax.random.PRNGKey(0), images, ids_keep)
  token = jax.random.normal(jax.random.PRNGKey(4), (1, 1, 64))
  _, plain = enc.apply(variables, images, ids_keep)
  latent, out = enc.apply(variables, images, ids_keep,
                          insert=(block, ids_insert, token))
  assert [t.shape[1] for t in out['taps']] == [17, 17, 33, 33]
  assert latent.shape == (n, 33, 64)
  for i in range(block):
    np.testing.assert_array_equal(out['taps'][i], plain['taps'][i])
  # The inserted tokens are the token + the position rows of ids_insert:
  # moving them to other patches changes their outputs.
  other = jnp.roll(ids_insert, 1, axis=1)
  latent2, _ = enc.apply(variables, images, ids_keep,
                         insert=(block, other, token))
  np.testing.assert_allclose(latent2[:, 17:], jnp.roll(latent[:, 17:], 1, 1),
                             rtol=1e-5, atol=1e-5)
  # Reference: the blocks after the insertion applied to the tap of the
  # block before it, with the token and position rows appended by hand.
  pos = enc.pos_embed(images)[0, 1:]
  seq = jnp.concatenate([out['taps'][block - 1],
                         jnp.take(pos, ids_insert, axis=0) + token], 1)
  params = variables['params']
  for i in range(block, 4):
    seq, _ = layers.Block(num_heads=4, mlp_dim=256).apply(
        {'params': params[f'blocks_{i}']}, seq)
  np.testing.assert_allclose(out['taps'][3], seq, rtol=1e-5, atol=1e-5)


def test_mae_inserts_the_next_masked_patches_of_the_noise_order():
  c = _robust_tiny()
  model = MAE.build_model(c)
  batch = {'image': _images(3),
           'noise': jax.random.uniform(jax.random.PRNGKey(5), (3, 64))}
  params = state_lib.init_params(model, experiment.batch_spec(c, 3), 0)
  assert params['encoder_mask_token'].shape == (1, 1, 64)
  pred, out = model.apply({'params': params}, batch)
  order = np.argsort(np.asarray(batch['noise']), 1)
  np.testing.assert_array_equal(out['ids_insert'], order[:, 16:32])
  inserted = np.asarray(out['inserted'])
  assert (inserted.sum(1) == masking.num_inserted(64, 0.75, 0.25)).all()
  assert (inserted <= np.asarray(out['mask'])).all()  # only masked patches
  assert out['latent'].shape == (3, 1 + 16 + 16, 64)
  assert pred.shape == (3, 64, 48)
  # The loss counts the inserted patches, or leaves them out.
  c.loss.pop_norm = 'none'    # (the running statistics need the step)
  loss_fn = experiment.build_loss(c)
  full, aux = loss_fn(pred, out, batch, 0)
  c.loss.inserted_in_loss = False
  part, _ = experiment.build_loss(c)(pred, out, batch, 0)
  per = np.asarray(aux['loss_per_patch'])
  mask = np.asarray(out['mask'])
  np.testing.assert_allclose(full, (per * mask).sum() / mask.sum(),
                             rtol=1e-5)
  keep = mask * (1 - inserted)
  np.testing.assert_allclose(part, (per * keep).sum() / keep.sum(),
                             rtol=1e-5)


@pytest.mark.slow
def test_insertion_with_scan_matches_the_loop():
  c = _robust_tiny()
  batch = {'image': _images(2),
           'noise': jax.random.uniform(jax.random.PRNGKey(6), (2, 64))}
  loop = MAE.build_model(c)
  params = state_lib.init_params(loop, experiment.batch_spec(c, 2), 0)
  c.model.scan = True
  scan = MAE.build_model(c)
  scan_params = vit.loop_to_scan(params)
  shapes = jax.eval_shape(lambda: state_lib.init_params(
      scan, experiment.batch_spec(c, 2), 0))
  assert jax.tree.structure(shapes) == jax.tree.structure(scan_params)
  assert 'blocks' in scan_params['encoder']   # one stacked tree, as MAE's
  ref, _ = loop.apply({'params': params}, batch)
  got, _ = scan.apply({'params': scan_params}, batch)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  # Gradients flow to every layer of the split stack and to the token.
  grads = jax.grad(lambda p: scan.apply(
      {'params': p}, batch, train=True,
      rngs={'dropout': jax.random.PRNGKey(0)})[0].sum())(scan_params)
  qkv = grads['encoder']['blocks']['attn']['qkv']['kernel']
  assert (np.abs(np.asarray(qkv)).reshape(4, -1).max(1) > 0).all()
  assert np.abs(np.asarray(grads['encoder_mask_token'])).max() > 0


def test_insertion_token_converts_as_an_extra_key():
  c = _robust_tiny()
  model = MAE.build_model(c)
  params = state_lib.init_params(model, experiment.batch_spec(c, 1), 0)
  conv = MAE.converter
  sd = conv.to_torch(params, model, 32)
  assert sd['encoder_mask_token'].shape == (1, 1, 64)
  back = conv.to_flax(sd, model, params, 32)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # An official MAE state dict (no such key) loads with strict=False ...
  official = {k: v for k, v in sd.items() if k != 'encoder_mask_token'}
  loose = conv.to_flax(official, model, params, 32, strict=False)
  np.testing.assert_array_equal(loose['encoder_mask_token'],
                                params['encoder_mask_token'])
  with pytest.raises(ValueError, match='encoder_mask_token'):
    conv.to_flax(official, model, params, 32)
  # ... and the robust one has the official MAE keys plus that one.
  plain = mae_config.get_config('tiny')
  pm = MAE.build_model(plain)
  plain_sd = conv.to_torch(
      state_lib.init_params(pm, experiment.batch_spec(plain, 1), 0), pm, 32)
  assert set(sd) - set(plain_sd) == {'encoder_mask_token'}
  # The fine-tuning encoder ignores it.
  assert 'encoder_mask_token' not in weights.encoder_state_dict('mae', sd)


def test_planner_counts_the_inserted_tokens():
  flops = {}
  for name, block in (('none', None), ('late', 3), ('early', 0)):
    c = mae_config.get_config('tiny')
    c.model.insert_block = block
    flops[name] = plan.forward_flops_per_image(c)
  assert flops['none'] < flops['late'] < flops['early']
  # Blocks 0..3 on 16 + 1 more tokens: the early insertion's extra cost is
  # at least the blocks' matmuls on 16 tokens (2 * 16 * 12 * 64^2 * 4).
  assert flops['early'] - flops['none'] > 2 * 16 * 12 * 64 ** 2 * 4


# ---------------------------------------------------------------------------
# Bad input: stopped before anything compiles.


@pytest.mark.parametrize('edit,match', [
    (lambda c: c.model.update(insert_block=4), r'insert_block=4 .*0\.\.3'),
    (lambda c: c.model.update(insert_block=-1), 'outside the encoder'),
    (lambda c: c.model.update(insert_ratio=0.8), 'only 48 of the 64'),
    (lambda c: c.model.update(decoder_attn_drop=1.0), 'decoder_attn_drop'),
    (lambda c: c.model.update(encoder_attn_drop=-0.1), 'encoder_attn_drop'),
    (lambda c: c.loss.update(pop_norm='population'), "'population' is not"),
    (lambda c: c.loss.update(pop_axis='row'), 'pop_axis'),
    (lambda c: c.loss.update(pop_norm='fixed', pop_std=(1.0, 1.0)),
     'give 3 .* or 48'),
    (lambda c: c.loss.update(pop_norm='running', pop_momentum=1.0),
     'pop_momentum'),
    (lambda c: c.input.mask.update(ratio=0.2),
     'asks for 16 .* only 13 of the 64'),
])
def test_bad_robust_config_fails_before_compiling(edit, match):
  c = _robust_tiny()
  edit(c)
  with pytest.raises(ValueError, match=match):
    train.validate_config(c, 1, 1)


def test_bad_config_fails_in_the_cli_before_the_workdir(tmp_path):
  c = _robust_tiny()
  c.model.insert_block = 9
  with pytest.raises(ValueError, match='insert_block=9'):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert not os.path.exists(tmp_path / 'wd' / 'checkpoints')


# ---------------------------------------------------------------------------
# Training: the running statistics survive the checkpoint.


def _train_config():
  c = _robust_tiny()
  c.input.batch_size = 8
  c.total_steps = 4
  c.warmup_steps = 2
  c.log_every_steps = 1
  c.ckpt_every_steps = 2
  c.vis_every_steps = 4
  c.knn.data = ''             # no kNN monitor
  c.async_ckpt = False
  return c


@pytest.mark.slow
def test_romae_trains_and_checkpoints_its_statistics(tmp_path):
  """(Resume exactness is the trainer's, tested in train_test.py: the
  inserted patches come from the pipeline's noise like the mask.)"""
  full = train.train_and_evaluate(_train_config(), str(tmp_path / 'a'))
  stats = full.target_state['population']
  assert float(stats['count']) == 4.0
  assert np.isfinite(np.asarray(stats['var'])).all()
  assert os.path.exists(tmp_path / 'a' / 'recon_0000004.png')
  # Restored from the step-4 checkpoint: the same bits.
  c = _train_config()
  state, step = weights.state_from_workdir(c, MAE.build_model(c),
                                           str(tmp_path / 'a'))
  assert step == 4
  for k in ('mean', 'var', 'count'):
    np.testing.assert_array_equal(np.asarray(state.target_state[
        'population'][k]), np.asarray(stats[k]))


def test_running_statistics_are_replicated_on_the_mesh():
  c = _robust_tiny()
  mesh = sharding.make_mesh([('data', 2), ('fsdp', 4)], jax.devices()[:8])
  model = MAE.build_model(c)
  state, shardings, _, _ = state_lib.create_train_state(
      c, model, mesh, experiment.batch_spec(c), materialize=False)
  for leaf in jax.tree.leaves(shardings.target_state):
    assert leaf.spec == P()
  assert state.target_state['population']['mean'].shape == (48,)

"""The optax chain against the official recipe and torch, and grad accum."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util

from conftest import FIXTURES
from mim_jax import optim
from mim_jax import sharding
from mim_jax import steps
from mim_jax.convert import core
from mim_jax.methods.mae import config as mae_config
from mim_jax.methods.mae import convert as convert_mae
from mim_jax.methods.mae import parity as parity_mae

MAE_FIXTURE = os.path.join(FIXTURES, 'mae')


def _curve():
  with open(os.path.join(MAE_FIXTURE, 'train_curve.json')) as f:
    return json.load(f)


def _mae_lr(t, peak, warmup, total, min_lr):
  """util/lr_sched.adjust_learning_rate of the official MAE, in float64."""
  if t < warmup:
    return peak * t / warmup
  return min_lr + (peak - min_lr) * 0.5 * (
      1.0 + math.cos(math.pi * (t - warmup) / (total - warmup)))


# ---------------------------------------------------------------------------
# Schedule.


def test_warmup_cosine_formula():
  peak, warmup, total, min_lr = 2e-3, 40, 800, 1e-5
  schedule = optim.warmup_cosine(peak, warmup, total, min_lr)
  assert float(schedule(0)) == 0.0
  for t in (1, 17, 39, 40, 41, 200, 420, 799, 800):
    want = _mae_lr(t, peak, warmup, total, min_lr)
    np.testing.assert_allclose(float(schedule(t)), want, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(warmup)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(total)), min_lr, rtol=1e-5)
  with pytest.raises(ValueError, match='must exceed warmup'):
    optim.warmup_cosine(peak, 10, 10)


def test_schedule_matches_fixture_curve():
  curve = _curve()
  config = ml_collections.ConfigDict(
      optim.tx_config_from_curve(curve, batch_size=4))
  schedule = optim.make_schedule(config)
  ref = curve['lr']
  assert len(ref) == curve['steps'] == 30 and ref[0] == 0.0
  ours = np.asarray([float(schedule(t)) for t in range(len(ref))])
  assert ours[0] == 0.0
  np.testing.assert_allclose(ours[1:], ref[1:], rtol=1e-5)
  # The same numbers as the formula the fixture documents.
  np.testing.assert_allclose(
      ref, [_mae_lr(t, 1e-3, 5, 30, 0.0) for t in range(30)], rtol=1e-12)


def test_peak_lr_and_steps():
  c = mae_config.get_config('B/16')
  assert c.lr is None
  assert optim.peak_lr(c) == pytest.approx(1.5e-4 * 4096 / 256)  # 2.4e-3
  c.input.batch_size = 1024
  assert optim.peak_lr(c) == pytest.approx(1.5e-4 * 1024 / 256)
  steps_per_epoch = 1_281_167 // 1024   # 1251, the last partial batch dropped
  assert optim.steps_from(c, 'total') == 800 * steps_per_epoch
  assert optim.steps_from(c, 'warmup') == 40 * steps_per_epoch
  c.lr = 0.01
  assert optim.peak_lr(c) == 0.01   # an absolute lr wins over base_lr
  c.total_steps = 1000
  with pytest.raises(ValueError, match='exactly one of config.total_steps'):
    optim.steps_from(c, 'total')
  c.total_epochs = None
  assert optim.steps_from(c, 'total') == 1000
  c.total_steps = None
  with pytest.raises(ValueError, match='exactly one of config.total_steps'):
    optim.steps_from(c, 'total')
  c.input.num_train_examples = None
  with pytest.raises(ValueError, match='num_train_examples'):
    optim.steps_from(c, 'warmup')


# ---------------------------------------------------------------------------
# Weight-decay grouping.


def _fixture_model_shapes():
  with open(os.path.join(MAE_FIXTURE, 'config.json')) as f:
    fc = json.load(f)
  model = steps.build_model(parity_mae.experiment_config(fc))
  batch = {'image': jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
           'noise': jax.ShapeDtypeStruct((2, 64), jnp.float32)}
  return jax.eval_shape(lambda: steps.init_params(model, batch, 0))


def test_decay_mask():
  shapes = _fixture_model_shapes()
  mask = traverse_util.flatten_dict(optim.decay_mask(shapes))
  flat = traverse_util.flatten_dict(shapes)
  assert set(mask) == set(flat)
  for path, decay in mask.items():
    if path[-1] in ('kernel', 'cls_token', 'mask_token'):
      assert decay is True, path
    else:
      assert path[-1] in ('bias', 'scale') and decay is False, path
  assert mask[('encoder', 'cls_token')]
  assert mask[('decoder', 'mask_token')]
  assert mask[('encoder', 'patch_embed', 'kernel')]
  assert not mask[('encoder', 'blocks_0', 'norm1', 'scale')]
  assert not mask[('decoder', 'pred', 'bias')]
  # Exactly the official parameter groups, by torch name.
  decayed = {k for k, v in core.flax_to_torch(
      optim.decay_mask(shapes), convert_mae.RULES).items() if v}
  groups = {g['weight_decay']: set(g['params'])
            for g in _curve()['param_groups']}
  assert decayed == groups[0.05]
  assert not decayed & groups[0.0]


# ---------------------------------------------------------------------------
# Against torch.


def _random_grads(seed, shapes=((7, 5), (5,), (3, 4, 2), (11,))):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize('max_norm', [0.5, 1e3])
def test_clip_matches_torch(max_norm):
  grads = _random_grads(1)
  total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
  assert (total > max_norm) == (max_norm == 0.5)
  ts = [torch.zeros(g.shape, requires_grad=True) for g in grads]
  for t, g in zip(ts, grads):
    t.grad = torch.from_numpy(g.copy())
  torch_norm = torch.nn.utils.clip_grad_norm_(ts, max_norm)
  clip = optim.clip_by_global_norm_torch(max_norm)
  ours, _ = clip.update([jnp.asarray(g) for g in grads], clip.init(None))
  np.testing.assert_allclose(float(optim.global_norm(grads)),
                             float(torch_norm), rtol=1e-6)
  for o, t, g in zip(ours, ts, grads):
    np.testing.assert_allclose(np.asarray(o), t.grad.numpy(), rtol=1e-6,
                               atol=1e-7)
    if max_norm > total:
      np.testing.assert_array_equal(np.asarray(o), g)
  if max_norm < total:
    np.testing.assert_allclose(float(optim.global_norm(ours)), max_norm,
                               rtol=1e-5)


def test_adamw_matches_torch():
  wd, peak = 0.1, 1e-2
  curve = dict(peak_lr=peak, steps=10, warmup_steps=2, betas=[0.9, 0.95],
               weight_decay=wd)
  config = ml_collections.ConfigDict(
      optim.tx_config_from_curve(curve, batch_size=8))
  rng = np.random.default_rng(0)
  init = {
      'cls_token': rng.standard_normal((1, 1, 6)),
      'fc': {'kernel': rng.standard_normal((6, 4)),
             'bias': rng.standard_normal((4,))},
      'norm': {'scale': 1 + 0.1 * rng.standard_normal((6,)),
               'bias': rng.standard_normal((6,))},
  }
  init = jax.tree.map(lambda x: x.astype(np.float32), init)
  tx, schedule = optim.make_tx(config, init)

  # torch: the timm grouping (no decay for ndim <= 1), lr set per step.
  flat = traverse_util.flatten_dict(init, sep='.')
  tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy()))
             for k, v in flat.items()}
  decay = [p for k, p in tparams.items() if p.ndim > 1]
  no_decay = [p for k, p in tparams.items() if p.ndim <= 1]
  assert len(decay) == 2 and len(no_decay) == 3
  topt = torch.optim.AdamW(
      [{'params': no_decay, 'weight_decay': 0.0},
       {'params': decay, 'weight_decay': wd}],
      lr=0.0, betas=(0.9, 0.95), eps=1e-8)

  params = jax.tree.map(jnp.asarray, init)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(4):   # lr 0 at t=0: only Adam's moments move
    grads = jax.tree.map(
        lambda x: rng.standard_normal(x.shape).astype(np.float32), init)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for group in topt.param_groups:
      group['lr'] = _mae_lr(t, peak, 2, 10, 0.0)
    for k, g in traverse_util.flatten_dict(grads, sep='.').items():
      tparams[k].grad = torch.from_numpy(np.asarray(g).copy())
    topt.step()
    ours = traverse_util.flatten_dict(params, sep='.')
    for k, p in tparams.items():
      np.testing.assert_allclose(np.asarray(ours[k]), p.detach().numpy(),
                                 atol=1e-6, rtol=0, err_msg=f'{k} step {t}')
    np.testing.assert_allclose(float(schedule(t)), group['lr'], rtol=1e-6)
  # Every leaf moved by far more than the tolerance (lr * wd * |p| alone is
  # ~1e-3 per step for the decayed leaves), so the comparison has teeth.
  for k, v in flat.items():
    assert np.abs(np.asarray(ours[k]) - v).max() > 1e-3, k


# ---------------------------------------------------------------------------
# Gradient accumulation through the real train step.


def _tiny_config():
  return ml_collections.ConfigDict(dict(
      seed=0,
      model_name='mae',
      model=dict(encoder=dict(width=32, depth=1, num_heads=2, mlp_dim=64,
                              patch_size=4),
                 decoder_width=32, decoder_depth=1, decoder_num_heads=2),
      loss=dict(norm_pix_loss=True),
      # eps 1e-3 instead of 1e-8: the first Adam step is then not just
      # lr * sign(g), so the params see the gradients' scale, and entries
      # with |g| ~ 1e-8 (the key bias has g = 0 plus rounding) do not turn
      # float32 rounding into O(lr) moves.
      optim=dict(name='adamw', b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.05,
                 grad_clip_norm=None),
      schedule=dict(min_lr=0.0),
      lr=1e-3,
      total_steps=10,
      warmup_steps=0,
      input=dict(batch_size=8, mask=dict(kind='random', ratio=0.75)),
  ))


def _rel_to_max(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_grad_accumulation_matches_full_batch():
  config = _tiny_config()
  model = steps.build_model(config)
  loss_fn = steps.build_loss(config)
  rng = np.random.default_rng(0)
  batch = {'image': rng.standard_normal((8, 32, 32, 3)).astype(np.float32),
           'noise': rng.random((8, 64)).astype(np.float32)}
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in batch.items()}
  mesh = sharding.make_mesh([('data', 1)], jax.devices()[:1])
  state0, _, _, schedule = steps.create_train_state(config, model, mesh,
                                                    shapes)
  results = {}
  for accum in (1, 2):
    step = jax.jit(steps.make_train_step(model, loss_fn, schedule,
                                         seed=config.seed,
                                         accum_steps=accum))
    results[accum] = step(state0, batch, {})
  (s1, m1), (s2, m2) = results[1], results[2]
  assert int(s1.step) == int(s2.step) == 1
  np.testing.assert_allclose(float(m2['loss']), float(m1['loss']),
                             rtol=1e-6)
  # Grads are averaged, not summed.
  np.testing.assert_allclose(float(m2['l2_grads']), float(m1['l2_grads']),
                             rtol=1e-6)
  flat0 = traverse_util.flatten_dict(state0.params, sep='/')
  flat1 = traverse_util.flatten_dict(s1.params, sep='/')
  flat2 = traverse_util.flatten_dict(s2.params, sep='/')
  for k, v in flat1.items():
    a, b, init = np.asarray(flat2[k]), np.asarray(v), np.asarray(flat0[k])
    assert np.abs(b - init).max() > 0, k
    if np.any(init):
      assert _rel_to_max(a, b) <= 1e-6, k
    else:
      # Zero-initialised biases hold just the first step, about
      # lr * g / (|g| + eps): compare it relative to lr (observed 1e-6 lr).
      assert np.abs(a - b).max() <= 1e-5 * config.lr, k

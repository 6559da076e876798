"""The optax chain against the official recipe and torch, grad accum, and
any optax optimizer by name."""

import glob
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
from conftest import ROOT
from conftest import tiny_mae_config
from mim_jax import config_lib
from mim_jax import experiment
from mim_jax import optim
from mim_jax import sharding
from mim_jax import state as state_lib
from mim_jax import steps
from mim_jax import train
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
  model = experiment.build_model(parity_mae.experiment_config(fc))
  batch = {'image': jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
           'noise': jax.ShapeDtypeStruct((2, 64), jnp.float32)}
  return jax.eval_shape(lambda: state_lib.init_params(model, batch, 0))


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
  model = experiment.build_model(config)
  loss_fn = experiment.build_loss(config)
  rng = np.random.default_rng(0)
  batch = {'image': rng.standard_normal((8, 32, 32, 3)).astype(np.float32),
           'noise': rng.random((8, 64)).astype(np.float32)}
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in batch.items()}
  mesh = sharding.make_mesh([('data', 1)], jax.devices()[:1])
  state0, _, _, schedule = state_lib.create_train_state(config, model, mesh,
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


# ---------------------------------------------------------------------------
# Any optax optimizer by name.


def _named_config(name, **fields):
  """A tiny schedule (constant lr 0.01 from step 0) and `optim.name`, the
  other optim fields given (None: unset)."""
  c = ml_collections.ConfigDict(dict(
      lr=0.01, total_steps=10, warmup_steps=0, schedule=dict(min_lr=0.01),
      input=dict(batch_size=8),
      optim=dict(name=name, weight_decay=0.1, wd_exclude=('bias', 'scale'),
                 grad_clip_norm=None, mu_dtype=None)))
  c.optim.update(fields)
  return c


def _small_params():
  rng = np.random.default_rng(0)
  f32 = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
  return {'encoder': {'cls_token': f32(1, 1, 6),
                      'blocks_0': {'fc': {'kernel': f32(6, 4),
                                          'bias': f32(4)}},
                      'norm': {'scale': 1 + 0.1 * f32(6), 'bias': f32(6)}},
          'head': {'kernel': f32(6, 3), 'bias': f32(3)}}


def _updates(tx, params, grads_list):
  state = tx.init(params)
  out = []
  for grads in grads_list:
    u, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out, state


def _random_like(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(
      rng.standard_normal(x.shape).astype(np.float32)), params)


def test_optax_optimizer_is_plain_optax_inside_the_generic_pieces():
  """lion by name = optax.lion(schedule, weight_decay, mask) bit for bit;
  layer decay multiplies its updates by the per-layer scales."""
  params = _small_params()
  grads = [_random_like(params, s) for s in (1, 2, 3)]
  config = _named_config('lion', b1=0.9, b2=0.99)
  tx, schedule = optim.make_tx(config, params)
  ref = optax.lion(schedule, b1=0.9, b2=0.99, weight_decay=0.1,
                   mask=optim.decay_mask(params, ('bias', 'scale')))
  ours, state = _updates(tx, params, grads)
  want, _ = _updates(ref, params, grads)
  for o, w in zip(ours, want):
    jax.tree.map(np.testing.assert_array_equal, o, w)
  assert any(isinstance(s, optax.ScaleByLionState)
             for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
                 x, optax.ScaleByLionState)))
  config.optim.update(layer_decay=0.5, num_layers=1)
  tx, _ = optim.make_tx(config, params)
  scales = optim.layer_decay_scales(params, 0.5, 1)
  decayed, _ = _updates(tx, params, grads[:1])
  jax.tree.map(lambda o, w, c: np.testing.assert_allclose(o, w * c,
                                                          rtol=1e-6),
               decayed[0], want[0], scales)
  assert scales['encoder']['cls_token'] == 0.25   # layer 0 of 1


def test_weight_decay_rule():
  """With zero gradients the update is the weight decay alone: through the
  optimizer's own argument where it has one (lion: lr * wd * p; adafactor:
  wd * p, optax does not multiply it by the lr), else added to the
  gradient (adam: L2, so Adam's first step lr * sign(wd * p)); never on
  the params wd_exclude names."""
  params = _small_params()
  zeros = [jax.tree.map(jnp.zeros_like, params)]
  lr, wd = 0.01, 0.1
  kernel = params['encoder']['blocks_0']['fc']['kernel']
  cases = {   # name: (update of the kernel, rtol)
      'lion': (lr * wd * kernel, 1e-6),
      'adafactor': (wd * kernel, 1e-6),
      # g / (|g| + eps) with eps 1e-8 and |g| >= 1e-5 here.
      'adam': (lr * jnp.sign(kernel), 1e-3),
  }
  assert float(jnp.abs(wd * kernel).min()) > 1e-5
  for name, (want, rtol) in cases.items():
    (u,), _ = _updates(optim.make_tx(_named_config(name), params)[0],
                       params, zeros)
    np.testing.assert_allclose(u['encoder']['blocks_0']['fc']['kernel'],
                               -want, rtol=rtol, err_msg=name)
    for excluded in (u['encoder']['blocks_0']['fc']['bias'],
                     u['encoder']['norm']['scale'], u['head']['bias']):
      assert float(jnp.abs(excluded).max()) == 0.0, name
    assert float(jnp.abs(u['encoder']['cls_token']).max()) > 0, name
  # weight_decay 0 turns off optax's own default (lion: 1e-3).
  (u,), _ = _updates(optim.make_tx(_named_config('lion', weight_decay=0.0),
                                   params)[0], params, zeros)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))


def test_mu_dtype_goes_to_the_optimizers_moment():
  params = _small_params()
  dtypes = {}
  for name, state_type, field in [
      ('lion', optax.ScaleByLionState, 'mu'),
      ('adafactor', optax.EmaState, 'ema'),   # adafactor's momentum
      ('sgd', optax.TraceState, 'trace')]:
    config = _named_config(name, mu_dtype='bfloat16')
    if name == 'adafactor':
      config.optim.momentum = 0.9
    state = optim.make_tx(config, params)[0].init(params)
    found = [s for s in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, state_type))
             if isinstance(s, state_type)]
    assert len(found) == 1, name
    dtypes[name] = {x.dtype for x in jax.tree.leaves(
        getattr(found[0], field))}
  assert all(d == {jnp.dtype('bfloat16')} for d in dtypes.values()), dtypes


@pytest.mark.parametrize('name, fields, match', [
    ('lino', {}, r"'lino': optax has no function.*any optax optimizer "
                 r"function by name.*Did you mean 'lion'"),
    ('chain', {}, r'optax.chain is no optimizer'),
    ('lbfgs', {}, r'line search'),
    ('rprop', {}, r'constant learning_rate'),
    ('lion', dict(eps=1e-8), r"optax.lion takes no \['eps'\] "
                             r'\(config.optim.eps=1e-08\)'),
    ('sgd', dict(b1=0.9, b2=0.95), r"our 'sgd' takes no \['b1', 'b2'\]"),
    ('adam', dict(learning_rate=1.0),
     r'config.optim.learning_rate=1.0 is set by make_tx'),
    ('adafactor', dict(weight_decay_rate=0.1),
     r'config.optim.weight_decay_rate=0.1 is set by make_tx'),
    ('lars', dict(mu_dtype='bfloat16'),
     r"config.optim.mu_dtype='bfloat16': our 'lars' keeps no moment"),
    ('adamw', dict(mu_dtype='bfloat17'), r"mu_dtype='bfloat17' is not a"),
    ('novograd', {}, r'novograd decays every param.*wd_exclude'),
    ('adamw', dict(layer_decay=0.75), r'needs config.optim.num_layers'),
])
def test_config_errors_name_the_field(name, fields, match):
  config = _named_config(name, **fields)
  with pytest.raises(ValueError, match=match):
    optim.validate_config(config)
  with pytest.raises(ValueError, match=match):   # before anything is built
    optim.make_tx(config, _small_params())


def test_none_fields_are_unset():
  """A field set to None takes optax's default (how a config drops
  adamw's eps to switch to lion)."""
  spec = optim.optimizer_spec(_named_config('lion', b1=None, eps=None).optim)
  assert spec.kwargs == {} and spec.wd_arg == 'weight_decay'
  assert spec.mask_arg == 'mask'
  assert {'lion', 'adafactor', 'lamb', 'adam', 'sgd'} <= set(
      optim.optax_optimizers())


def test_every_shipped_config_names_a_valid_optimizer():
  paths = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
  assert len(paths) > 20
  for path in paths:
    optim.validate_config(config_lib.load_config_file(path))


@pytest.mark.slow
@pytest.mark.parametrize('name, fields, state_type', [
    ('lion', dict(eps=None, b2=0.99), optax.ScaleByLionState),
    # min_dim_size_to_factor 16: the tiny model's matrices are factored.
    ('adafactor', dict(b1=None, b2=None, eps=1e-30, momentum=0.9,
                       min_dim_size_to_factor=16, mu_dtype='bfloat16'),
     optax.FactoredState),
])
def test_tiny_mae_trains_with_an_optax_optimizer(tmp_path, name, fields,
                                                 state_type):
  config = tiny_mae_config(total_steps=4, warmup_steps=1,
                           ckpt_every_steps=4)
  config.optim.name = name
  config.optim.update(fields)
  if name == 'lion':
    config.lr = 3e-4   # Lion's updates are sign(.) * lr: a smaller lr
  state = train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    losses = [json.loads(l)['train/loss'] for l in f]
  assert len(losses) == 4 and all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0] - 0.1, losses
  found = [s for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, state_type))
           if isinstance(s, state_type)]
  assert len(found) == 1, jax.tree.structure(state.opt_state)
  if name == 'adafactor':
    kernel = state.params['encoder']['blocks_0']['mlp']['fc1']['kernel']
    v_row = found[0].v_row['encoder']['blocks_0']['mlp']['fc1']['kernel']
    assert v_row.size < kernel.size   # factored second moments
    ema = [s for s in jax.tree.leaves(
        state.opt_state, is_leaf=lambda x: isinstance(x, optax.EmaState))
           if isinstance(s, optax.EmaState)]
    assert {x.dtype for x in jax.tree.leaves(ema[0].ema)} == {
        jnp.dtype('bfloat16')}

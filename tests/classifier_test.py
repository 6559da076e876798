"""Classifier (fine-tuning and probing) against timm, and its converter."""

import pickle
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mim_jax import experiment
from mim_jax import weights
from mim_jax.convert import core
from mim_jax.convert import timm_vit
from mim_jax.methods import classifier as classifier_lib
from mim_jax.methods.classifier import config as recipe
from mim_jax.methods.classifier import convert
from mim_jax.methods.classifier import model as model_lib
from mim_jax.models import layers
from mim_jax.models import vit

torch = pytest.importorskip('torch')

IMG = 32
NUM_CLASSES = 10
MU = dict(width=32, depth=2, num_heads=2, patch_size=8)


def _timm():
  """timm, or skip; its torchvision import warns that the C ops (which
  ViT and BEiT do not use) failed to load."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return pytest.importorskip('timm')


def _images(n=2, seed=0):
  """(torch NCHW, our {'image': NHWC}) of the same normalised images."""
  x = np.random.RandomState(seed).randn(n, 3, IMG, IMG).astype(np.float32)
  return torch.from_numpy(x), {'image': jnp.asarray(x.transpose(0, 2, 3, 1))}


def _numpy_state_dict(module):
  return {k: v.detach().numpy().copy() for k, v in
          module.state_dict().items()}


def _perturb(module, seed=0):
  """Adds noise to every param, so the timm inits that are zeros or ones
  (biases, LayerNorms, q/v biases) are checked too."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=gen))
  return module


def _shapes(model, batch, collection='params'):
  variables = nn.meta.unbox(
      jax.eval_shape(model.init, jax.random.key(0), batch))
  return variables.get(collection, {})


def _init(model, batch, seed=0):
  """The model's variables (jitted: eager init compiles op by op)."""
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), batch))


def _timm_vit(width, heads, global_pool, depth=12, patch=16):
  vt = _timm().models.vision_transformer
  torch.manual_seed(0)
  return _perturb(vt.VisionTransformer(
      img_size=IMG, patch_size=patch, embed_dim=width, depth=depth,
      num_heads=heads, num_classes=NUM_CLASSES, global_pool=global_pool,
      fc_norm=True if global_pool == 'avg' else None)).eval()


def _rel_err(got, want):
  return np.abs(np.asarray(got) - want).max() / np.abs(want).max()


def _assert_same_state_dict(got, want, skip=()):
  want = {k: v for k, v in want.items() if not k.endswith(skip or '\0')}
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)


# ---------------------------------------------------------------------------
# Parity with timm's fine-tuning architectures.


@pytest.mark.parametrize('width,heads,global_pool,scan', [
    (384, 6, 'avg', False),    # ViT-S shape, MAE fine-tuning (global pool)
    (384, 6, 'token', True),   # ViT-S shape, cls token
    (192, 3, 'avg', True),     # ViT-Ti shape (the mapping is width-blind)
    (192, 3, 'token', True),
])
@pytest.mark.slow
def test_timm_vit_parity(width, heads, global_pool, scan):
  tm = _timm_vit(width, heads, global_pool)
  sd = _numpy_state_dict(tm)
  x_t, batch = _images()
  with torch.no_grad():
    want = tm(x_t).numpy()
  pool = 'avg' if global_pool == 'avg' else 'cls'
  model = model_lib.Classifier(
      encoder=dict(width=width, depth=12, num_heads=heads, patch_size=16,
                   posemb='learned'),
      num_classes=NUM_CLASSES, pool=pool, scan=scan)
  params = convert.to_flax(sd, model, _shapes(model, batch), IMG)
  logits, out = jax.jit(model.apply)({'params': params}, batch)
  assert _rel_err(logits, want) < 1e-5
  with torch.no_grad():
    feats = tm.forward_head(tm.forward_features(x_t), pre_logits=True)
  assert _rel_err(out['features'], feats.numpy()) < 1e-5
  _assert_same_state_dict(convert.to_torch(params, model, IMG), sd)


def test_timm_beit_parity_abs_posemb_layer_scale():
  """timm Beit with learned absolute positions and layer scale, without
  the relative position bias (q/v biases, gamma_1/gamma_2, fc_norm)."""
  beit = _timm().models.beit
  torch.manual_seed(0)
  tm = _perturb(beit.Beit(
      img_size=IMG, patch_size=8, embed_dim=64, depth=2, num_heads=4,
      num_classes=NUM_CLASSES, use_abs_pos_emb=True, use_rel_pos_bias=False,
      init_values=0.1, global_pool='avg')).eval()
  sd = _numpy_state_dict(tm)
  assert 'blocks.1.gamma_2' in sd and 'blocks.0.attn.v_bias' in sd
  x_t, batch = _images()
  with torch.no_grad():
    want = tm(x_t).numpy()
  model = model_lib.Classifier(
      encoder=dict(width=64, depth=2, num_heads=4, patch_size=8,
                   qkv_bias='qv', layer_scale=0.1, posemb='learned',
                   posemb_row_first=True),
      num_classes=NUM_CLASSES)
  params = convert.to_flax(sd, model, _shapes(model, batch), IMG)
  np.testing.assert_array_equal(
      params['encoder']['blocks_1']['gamma_2'], sd['blocks.1.gamma_2'])
  logits, _ = model.apply({'params': params}, batch)
  assert _rel_err(logits, want) < 1e-5
  _assert_same_state_dict(convert.to_torch(params, model, IMG), sd)


BEIT_ENC = dict(width=64, depth=2, num_heads=4, patch_size=8, qkv_bias='qv',
                layer_scale=0.1, posemb_row_first=True, rel_pos_bias=True)


def _timm_beit_rel_pos(posemb):
  """timm Beit with the per-block relative position bias (CAE's fine-tuning
  model), every param perturbed (the bias tables included, which start at
  zeros), plus the `relative_position_index` buffers that the official
  BEiT / CAE code saves and timm does not. posemb='sincos' sets pos_embed
  to the fixed row-first table, as CAE's `--sin_pos_emb` file holds it."""
  beit = _timm().models.beit
  torch.manual_seed(0)
  tm = _perturb(beit.Beit(
      img_size=IMG, patch_size=8, embed_dim=64, depth=2, num_heads=4,
      num_classes=NUM_CLASSES, use_abs_pos_emb=True, use_rel_pos_bias=True,
      init_values=0.1, global_pool='avg')).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for block in tm.blocks:
      # Large enough that a wrong index moves the logits well past 1e-5.
      table = block.attn.relative_position_bias_table
      table.copy_(torch.randn(table.shape, generator=gen))
    if posemb == 'sincos':
      tm.pos_embed.copy_(torch.from_numpy(
          layers.posemb_sincos_2d(4, 4, 64, row_first=True)))
  sd = _numpy_state_dict(tm)
  assert 'blocks.0.attn.relative_position_index' not in sd
  for i, block in enumerate(tm.blocks):
    sd[f'blocks.{i}.attn.relative_position_index'] = (
        block.attn.relative_position_index.numpy().copy())
  return tm, sd


def _beit_model(posemb='sincos', scan=False):
  return model_lib.Classifier(encoder=dict(BEIT_ENC, posemb=posemb),
                              num_classes=NUM_CLASSES, scan=scan)


@pytest.mark.parametrize('posemb', ['learned', 'sincos'])
def test_timm_beit_rel_pos_bias_parity_scan_and_round_trip(posemb):
  """CAE's fine-tuning ViT: per-block relative position bias, layer scale,
  q/v biases; the same logits in the loop and scan layouts."""
  tm, sd = _timm_beit_rel_pos(posemb)
  x_t, batch = _images()
  with torch.no_grad():
    want = tm(x_t).numpy()
  got = {}
  for scan in (False, True):
    model = _beit_model(posemb, scan)
    params = convert.to_flax(sd, model, _shapes(model, batch), IMG)
    if scan:
      assert params['encoder']['blocks']['attn'][
          'relative_position_bias_table'].shape == (2, 7 * 7 + 3, 4)
    got[scan], _ = jax.jit(model.apply)({'params': params}, batch)
    assert _rel_err(got[scan], want) < 1e-5
    # The index buffers (and the fixed table) are written back.
    _assert_same_state_dict(convert.to_torch(params, model, IMG), sd)
  np.testing.assert_allclose(got[True], got[False], rtol=1e-6, atol=1e-6)
  # timm's own state dict, without the index buffers, loads too.
  timm_sd = {k: v for k, v in sd.items()
             if not k.endswith('relative_position_index')}
  model = _beit_model(posemb)
  convert.to_flax(timm_sd, model, _shapes(model, batch), IMG)


def test_rel_pos_bias_conversion_errors():
  _, sd = _timm_beit_rel_pos('sincos')
  model = _beit_model()
  _, batch = _images()
  shapes = _shapes(model, batch)
  key = 'blocks.1.attn.relative_position_index'
  bad = dict(sd, **{key: sd[key][::-1].copy()})
  with pytest.raises(core.ConversionError, match=key):
    convert.to_flax(bad, model, shapes, IMG)
  # Another image size: the index and the table no longer fit the grid.
  with pytest.raises(core.ConversionError, match=key):
    convert.to_flax(sd, model, shapes, 2 * IMG)
  table = 'blocks.0.attn.relative_position_bias_table'
  with pytest.raises(core.ConversionError, match='relative_position_bias'):
    convert.to_flax({k: v for k, v in sd.items() if k != table}, model,
                    shapes, IMG)
  # BEiT's shared table is out of scope and says so.
  shared = dict(sd, **{'rel_pos_bias.relative_position_bias_table':
                       sd[table]})
  with pytest.raises(core.ConversionError, match='shared by all blocks'):
    convert.to_flax(shared, model, shapes, IMG)
  # Without rel_pos_bias the keys are unknown.
  plain = model_lib.Classifier(
      encoder=dict(BEIT_ENC, rel_pos_bias=False), num_classes=NUM_CLASSES)
  with pytest.raises(core.ConversionError, match=table):
    convert.to_flax(sd, plain, _shapes(plain, batch), IMG)


def test_pretrained_encoder_without_tables_starts_them_at_zeros():
  """A CAE pretraining encoder has no relative position bias: fine-tuning
  starts the tables at zeros (BEiT's init), as the official script does."""
  _, sd = _timm_beit_rel_pos('sincos')
  encoder_sd = {k: v for k, v in sd.items()
                if not k.startswith(('head.', 'fc_norm.'))
                and 'relative_position' not in k}
  model = _beit_model()
  _, batch = _images()
  params = _init(model, batch, 0)['params']
  loaded = classifier_lib.from_encoder(encoder_sd, model, params, IMG)
  for i in range(2):
    attn = loaded['encoder'][f'blocks_{i}']['attn']
    assert not np.any(attn['relative_position_bias_table'])
    np.testing.assert_array_equal(attn['proj']['kernel'],
                                  sd[f'blocks.{i}.attn.proj.weight'].T)


def _pretrained_encoder(scan=False, seed=1, **fields):
  """(params, fields) of a pretraining-style 'mu' encoder (fixed sin-cos
  table, final norm), its params perturbed so no init value is special."""
  fields = dict(MU, scan=scan, **fields)
  enc = vit.Encoder(**fields)
  params = _init(enc, jnp.zeros((1, IMG, IMG, 3)), seed)['params']
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda a: np.asarray(a) + 0.01 * rng.standard_normal(
      a.shape).astype(np.float32), params), fields


@pytest.mark.parametrize('src_scan,dst_scan', [(False, False), (True, False),
                                               (False, True)])
def test_workdir_encoder_loads_as_is_like_its_official_file(src_scan,
                                                           dst_scan):
  """A pretraining run's params['encoder'] (either layout) lands in the
  classifier unchanged, exactly as the same encoder's timm-named file does;
  the global-pool classifier drops the final norm and its learned position
  embedding starts from the pretraining sin-cos table."""
  src, fields = _pretrained_encoder(src_scan)
  model = _mu_model(scan=dst_scan)
  _, batch = _images()
  params = _init(model, batch, 0)['params']
  loaded = classifier_lib.from_encoder_params(src, fields, model, params)
  sd, _ = timm_vit.encoder_to_timm(src, fields, IMG, 'token')
  via_file = classifier_lib.from_encoder(sd, model, params, IMG)
  flat = lambda t: traverse_util.flatten_dict(t, sep='/')
  assert sorted(flat(loaded)) == sorted(flat(via_file))
  for k, v in flat(via_file).items():
    np.testing.assert_array_equal(np.asarray(flat(loaded)[k]), v, err_msg=k)
  loop = lambda t: vit.scan_to_loop(t) if 'blocks' in t else t
  want, got = flat(loop(src)), flat(loop(loaded['encoder']))
  assert set(want) - {'norm/scale', 'norm/bias'} == set(got) - {'pos_embed'}
  for k in set(want) & set(got):
    np.testing.assert_array_equal(want[k], got[k], err_msg=k)
  np.testing.assert_array_equal(
      got['pos_embed'], layers.posemb_sincos_2d(IMG // 8, IMG // 8, 32))
  for k in ('head', 'fc_norm'):
    for a, b in zip(jax.tree.leaves(params[k]),
                    jax.tree.leaves(loaded[k])):
      np.testing.assert_array_equal(a, b)


def test_workdir_encoder_keeps_fresh_tables_and_names_what_does_not_fit():
  """Layer scale and relative position bias that the pretraining encoder
  lacks start fresh; anything else that does not fit is named by its path
  (missing, extra, mis-shaped, another fixed table)."""
  src, fields = _pretrained_encoder(qkv_bias='qv', posemb_row_first=True)
  model = _mu_model(encoder=dict(qkv_bias='qv', layer_scale=0.1,
                                 posemb='sincos', posemb_row_first=True,
                                 rel_pos_bias=True))
  _, batch = _images()
  params = _init(model, batch, 0)['params']
  loaded = classifier_lib.from_encoder_params(src, fields, model, params)
  block = loaded['encoder']['blocks_1']
  assert not np.any(block['attn']['relative_position_bias_table'])
  np.testing.assert_array_equal(block['gamma_1'],
                                np.full(32, 0.1, np.float32))
  np.testing.assert_array_equal(block['attn']['q_bias'],
                                src['blocks_1']['attn']['q_bias'])

  src, fields = _pretrained_encoder()

  def refused(match, **encoder):
    model = _mu_model(encoder=encoder)
    params = _init(model, batch, 0)['params']
    with pytest.raises(ValueError, match=match):
      classifier_lib.from_encoder_params(src, fields, model, params)

  refused(r'lacks 12 params: \[.blocks_2/attn/proj/bias', depth=3)
  refused(r"shape mismatches \(\d+\): \['blocks_0/attn/proj/bias: "
          r'\(32,\) pretrained, \(64,\) in this model', width=64)
  refused(r"lacks 4 params: \['blocks_0/attn/q_bias'.*does not have: "
          r"\['blocks_0/attn/qkv/bias'", qkv_bias='qv')
  refused(r'fixed sin-cos position tables differ: posemb_row_first=False '
          r'pretrained, True here', posemb='sincos', posemb_row_first=True)


# ---------------------------------------------------------------------------
# Checkpoint layouts and errors.


def _mu_model(**kw):
  enc = dict(MU, posemb='learned')
  enc.update(kw.pop('encoder', {}))
  return model_lib.Classifier(encoder=enc, num_classes=NUM_CLASSES, **kw)


def _mae_finetuned_state_dict():
  """A state dict with the keys of `mae_finetuned_vit_base.pth` (global
  pool: fc_norm and head, no norm), at the 'mu' size."""
  sd = _numpy_state_dict(_timm_vit(32, 2, 'avg', depth=2, patch=8))
  assert 'fc_norm.weight' in sd and not any(k.startswith('norm.')
                                            for k in sd)
  return sd


@pytest.mark.parametrize('scan', [False, True])
def test_mae_finetuned_layout_loads_strict_and_round_trips(scan):
  sd = _mae_finetuned_state_dict()
  model = _mu_model(scan=scan)
  _, batch = _images()
  shapes = _shapes(model, batch)
  params = convert.to_flax(sd, model, shapes, IMG, strict=True)
  assert set(params) == {'encoder', 'fc_norm', 'head'}
  assert 'norm' not in params['encoder']
  assert (jax.tree.map(np.shape, params) ==
          jax.tree.map(lambda s: s.shape, shapes))
  _assert_same_state_dict(convert.to_torch(params, model, IMG), sd)
  grads_keys = convert.to_torch_keys(params)
  assert sorted(grads_keys) == sorted(sd)


def test_conversion_errors_name_the_key():
  sd = _mae_finetuned_state_dict()
  model = _mu_model()
  _, batch = _images()
  shapes = _shapes(model, batch)
  missing = {k: v for k, v in sd.items() if k != 'fc_norm.weight'}
  with pytest.raises(core.ConversionError, match='fc_norm/scale'):
    convert.to_flax(missing, model, shapes, IMG)
  bad = dict(sd, **{'head.weight': np.zeros((NUM_CLASSES + 1, 32))})
  with pytest.raises(core.ConversionError, match=r'head\.weight'):
    convert.to_flax(bad, model, shapes, IMG)
  # A cls-token checkpoint (norm.*) into a global-pool model.
  extra = dict(sd, **{'norm.weight': np.ones(32), 'norm.bias': np.zeros(32)})
  with pytest.raises(core.ConversionError, match=r'norm\.weight'):
    convert.to_flax(extra, model, shapes, IMG)
  # A fixed sin-cos model rejects a trained pos_embed.
  fixed = _mu_model(encoder=dict(posemb='sincos'))
  with pytest.raises(core.ConversionError, match='pos_embed'):
    convert.to_flax(sd, fixed, _shapes(fixed, batch), IMG)


def test_fixed_posemb_is_a_buffer():
  """With posemb='sincos' pos_embed is written on export and checked on
  import, not a param (the row-first table for BEiT-family encoders)."""
  model = _mu_model(encoder=dict(posemb='sincos', posemb_row_first=True))
  _, batch = _images()
  params = _init(model, batch, 0)['params']
  assert 'pos_embed' not in params['encoder']
  sd = convert.to_torch(params, model, IMG)
  np.testing.assert_array_equal(
      sd['pos_embed'], layers.posemb_sincos_2d(4, 4, 32, row_first=True))
  back = convert.to_flax(sd, model, params, IMG)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.slow
def test_mae_linprobe_layout_bn_stats_and_parity():
  """MAE main_linprobe: head = Sequential(BatchNorm1d(affine=False,
  eps=1e-6), Linear) on the cls token; the BN buffers go to batch_stats."""
  tm = _timm_vit(32, 2, 'token', depth=2, patch=8)
  tm.head = torch.nn.Sequential(
      torch.nn.BatchNorm1d(32, affine=False, eps=1e-6), tm.head)
  x_t, batch = _images(n=4)
  tm.train()
  with torch.no_grad():
    tm(x_t)                      # moves the running stats off (0, 1)
  tm.eval()
  sd = _numpy_state_dict(tm)
  assert 'head.0.running_var' in sd and 'head.1.weight' in sd
  with torch.no_grad():
    want = tm(x_t).numpy()
  model = _mu_model(pool='cls', head='bn_linear')
  variables = _init(model, batch, 0)
  params = convert.to_flax(sd, model, variables['params'], IMG)
  stats = convert.batch_stats_to_flax(sd, model, variables['batch_stats'])
  np.testing.assert_array_equal(stats['head']['bn']['var'],
                                sd['head.0.running_var'])
  logits, _ = model.apply({'params': params, 'batch_stats': stats}, batch)
  assert _rel_err(logits, want) < 1e-5
  # num_batches_tracked is dropped; torch loads the export strictly.
  back = convert.to_torch(params, model, IMG, batch_stats=stats)
  _assert_same_state_dict(back, sd, skip='num_batches_tracked')
  tm.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()},
                     strict=True)
  with pytest.raises(core.ConversionError, match='head/bn/mean'):
    convert.batch_stats_to_flax(
        {k: v for k, v in sd.items() if k != 'head.0.running_mean'}, model,
        variables['batch_stats'])


def test_bn_linear_head_stats_follow_torch():
  model = _mu_model(pool='cls', head='bn_linear', head_init_std=0.01)
  _, batch = _images(n=4)
  variables = _init(model, batch, 0)
  # The BatchNorm has no scale or bias: only statistics.
  assert set(variables['params']['head']) == {'linear'}
  assert set(variables['batch_stats']['head']['bn']) == {'mean', 'var'}
  (_, out), new = model.apply(variables, batch, train=True,
                              mutable=['batch_stats'])
  feats = torch.from_numpy(np.array(out['features']))
  bn = torch.nn.BatchNorm1d(32, affine=False, eps=1e-6)
  bn.train()
  bn(feats)
  got = new['batch_stats']['head']['bn']
  np.testing.assert_allclose(got['mean'], bn.running_mean.numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['var'], bn.running_var.numpy(),
                             rtol=1e-5, atol=1e-6)
  # Eval uses the running statistics (and leaves them as they are).
  bn.eval()
  lin = variables['params']['head']['linear']
  want = bn(feats).detach().numpy() @ np.asarray(lin['kernel']) + np.asarray(
      lin['bias'])
  variables = dict(variables, batch_stats=new['batch_stats'])
  logits, _ = model.apply(variables, batch, train=False)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def _torch_attentive_reference(tokens, sd, num_heads, ln_eps, bn_eps):
  """CAE's attentive probe, rewritten from its description with torch ops:
  LayerNorms on q, k, v inputs, cross attention with q/v biases, proj,
  then BatchNorm (running stats) and the linear head."""
  f = torch.nn.functional
  t = lambda k: torch.from_numpy(sd[k])
  p = 'attentive_blocks.0.'
  d = tokens.shape[-1]
  norm = lambda x, name: f.layer_norm(x, (d,), t(f'{p}{name}.weight'),
                                      t(f'{p}{name}.bias'), ln_eps)
  query = t('query_token').expand(tokens.shape[0], -1, -1)
  q = f.linear(norm(query, 'norm_q'), t(f'{p}cross_attn.q.weight'),
               t(f'{p}cross_attn.q_bias'))
  k = f.linear(norm(tokens, 'norm_k'), t(f'{p}cross_attn.k.weight'))
  v = f.linear(norm(tokens, 'norm_v'), t(f'{p}cross_attn.v.weight'),
               t(f'{p}cross_attn.v_bias'))
  split = lambda z: z.reshape(z.shape[0], z.shape[1], num_heads, -1
                              ).transpose(1, 2)
  att = f.scaled_dot_product_attention(split(q), split(k), split(v))
  att = att.transpose(1, 2).reshape(tokens.shape[0], 1, d)
  x = f.linear(att, t(f'{p}cross_attn.proj.weight'),
               t(f'{p}cross_attn.proj.bias'))[:, 0]
  x = f.batch_norm(x, t('fc_norm.running_mean'), t('fc_norm.running_var'),
                   training=False, eps=bn_eps)
  return f.linear(x, t('head.weight'), t('head.bias'))


@pytest.mark.slow
def test_attentive_probe_cae_layout_parity():
  """CAE's attentive probe (--use_cls): the query attends over all tokens
  after the encoder's final norm; keys query_token, attentive_blocks.0.*,
  fc_norm (BatchNorm buffers) and head.*."""
  tm = _timm_vit(32, 2, 'token', depth=2, patch=8)
  x_t, batch = _images()
  with torch.no_grad():
    tokens = tm.forward_features(x_t)
  model = _mu_model(pool='cls', head='attentive', head_init_std=0.01)
  variables = _init(model, batch, 1)
  rng = np.random.RandomState(0)
  noisy = jax.tree.map(
      lambda a: np.asarray(a) + 0.1 * rng.randn(*a.shape).astype(np.float32),
      {k: v for k, v in variables['params'].items() if k != 'encoder'})
  sd = dict(_numpy_state_dict(tm))
  sd.update(convert.to_torch_keys(noisy))
  sd['fc_norm.running_mean'] = rng.randn(32).astype(np.float32)
  sd['fc_norm.running_var'] = rng.rand(32).astype(np.float32) + 0.5
  sd['fc_norm.num_batches_tracked'] = np.array(3)
  assert 'attentive_blocks.0.cross_attn.v_bias' in sd
  assert not any('cross_attn.k_bias' in k for k in sd)
  params = convert.to_flax(sd, model, variables['params'], IMG)
  stats = convert.batch_stats_to_flax(sd, model, variables['batch_stats'])
  logits, _ = model.apply({'params': params, 'batch_stats': stats}, batch)
  with torch.no_grad():
    want = _torch_attentive_reference(tokens, sd, 2, 1e-6, 1e-5).numpy()
  assert _rel_err(logits, want) < 1e-5
  back = convert.to_torch(params, model, IMG, batch_stats=stats)
  _assert_same_state_dict(back, sd, skip='num_batches_tracked')


def test_attentive_head_shapes_and_frozen_encoder_grads():
  model = _mu_model(pool='cls', head='attentive', freeze_encoder=True)
  _, batch = _images(n=3)
  variables = _init(model, batch, 0)
  params = variables['params']
  assert params['query_token'].shape == (1, 1, 32)
  assert not np.any(params['query_token'])
  assert set(params['attentive_block']) == {'norm_q', 'norm_k', 'norm_v',
                                            'cross_attn'}
  assert set(params['attentive_block']['cross_attn']) == {
      'q', 'k', 'v', 'q_bias', 'v_bias', 'proj'}

  def loss(p):
    (logits, out), _ = model.apply(
        {'params': p, 'batch_stats': variables['batch_stats']}, batch,
        train=True, mutable=['batch_stats'])
    assert logits.shape == (3, NUM_CLASSES)
    assert out['features'].shape == (3, 32)
    return jnp.sum(logits ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  for g in jax.tree.leaves(grads['encoder']):
    assert not np.any(np.asarray(g))
  assert np.any(np.asarray(grads['head']['kernel']))
  assert np.any(np.asarray(grads['attentive_block']['cross_attn']['v'][
      'kernel']))


# ---------------------------------------------------------------------------
# A timm VisionTransformer state dict through config.init_from.


def _refuse(*args, **kw):
  raise AssertionError('a safetensors file was read through pickle')


class _RefusingUnpickler(pickle.Unpickler):

  def __init__(self, *args, **kw):  # pylint: disable=super-init-not-called
    _refuse()


def _no_pickle(monkeypatch):
  """Makes every pickle (and torch.load) read fail."""
  for name in ('load', 'loads'):
    monkeypatch.setattr(pickle, name, _refuse)
  monkeypatch.setattr(pickle, 'Unpickler', _RefusingUnpickler)
  monkeypatch.setattr(torch, 'load', _refuse)


@pytest.mark.parametrize('task,method,pool,suffix', [
    ('finetune', 'mae', 'avg', 'safetensors'),   # head loads too
    ('linprobe', 'mae', 'token', 'pth'),         # timm's .mae layout
    ('finetune', 'cae', 'avg', 'safetensors'),   # 'encoder.' prefix, qv, ls
])
def test_init_from_a_timm_state_dict_gives_timm_features(
    task, method, pool, suffix, tmp_path, monkeypatch):
  """A real timm ViT's state dict (perturbed random weights) starts a
  classifier config whatever its init_method: our encoder's tokens equal
  timm's forward_features and, where the head fits, our logits its
  logits. CAE: no `encoder.*` keys, so the file is read as timm's; its
  qkv bias (key part dropped) and ls1/ls2 gammas map onto q/v biases and
  gamma_1/gamma_2, and its pos_embed must be the fixed row-first table."""
  cae = method == 'cae'
  torch.manual_seed(0)
  tm = _perturb(_timm().models.vision_transformer.VisionTransformer(
      img_size=IMG, patch_size=8, embed_dim=32, depth=2, num_heads=2,
      num_classes=NUM_CLASSES if task == 'finetune' else 0,
      global_pool=pool, fc_norm=pool == 'avg',
      init_values=0.1 if cae else None)).eval()
  if cae:
    with torch.no_grad():
      tm.pos_embed.copy_(torch.from_numpy(
          layers.posemb_sincos_2d(4, 4, 32, row_first=True)))
  sd = {k: v.contiguous() for k, v in tm.state_dict().items()}
  path = str(tmp_path / f'vit.{suffix}')
  if suffix == 'safetensors':
    pytest.importorskip('safetensors.torch').save_file(sd, path)
    _no_pickle(monkeypatch)
  else:
    torch.save(sd, path)
  c = recipe.get_config(task, method, 'tiny')
  c.model.encoder.update(MU, mlp_dim=128)
  c.model.scan = cae
  c.init_from = path
  model = experiment.build_model(c)
  params, _ = weights.initial_params(c, model)
  monkeypatch.undo()
  x_t, batch = _images()
  with torch.no_grad():
    want, logits_t = tm.forward_features(x_t).numpy(), tm(x_t).numpy()
  tokens, _ = jax.jit(vit.Encoder(**model.encoder_fields(), scan=cae).apply)(
      {'params': params['encoder']}, batch['image'])
  assert _rel_err(tokens, want) < 1e-5
  if method == 'mae' and task == 'finetune':   # head and fc_norm too
    logits, _ = model.apply({'params': params}, batch)
    assert _rel_err(logits, logits_t) < 1e-5
  if cae:   # read as timm's, as init_method='timm' asks
    assert (sorted(weights.encoder_state_dict('cae', sd)) ==
            sorted(weights.encoder_state_dict('timm', sd)))
    block = vit.scan_to_loop(params['encoder'])['blocks_1']
    np.testing.assert_array_equal(block['gamma_1'], sd['blocks.1.ls1.gamma'])
    np.testing.assert_array_equal(block['attn']['v_bias'],
                                  sd['blocks.1.attn.qkv.bias'][64:])


# ---------------------------------------------------------------------------
# Encoder options and feature taps.


def _encoder_params(**kw):
  enc = vit.Encoder(**MU, **kw)
  _, batch = _images()
  return enc, nn.meta.unbox(enc.init(jax.random.key(0), batch['image']))


def test_encoder_defaults_unchanged():
  _, default = _encoder_params()
  # The tree of every pretraining checkpoint: no pos_embed param.
  assert set(default['params']) == {'cls_token', 'patch_embed', 'blocks_0',
                                    'blocks_1', 'norm'}
  _, explicit = _encoder_params(posemb='sincos', final_norm=True)
  jax.tree.map(np.testing.assert_array_equal, explicit, default)


@pytest.mark.parametrize('row_first', [False, True])
def test_learned_posemb_starts_at_the_sincos_table(row_first):
  enc, learned = _encoder_params(posemb='learned',
                                 posemb_row_first=row_first)
  _, batch = _images()
  table = layers.posemb_sincos_2d(4, 4, 32, row_first=row_first)
  np.testing.assert_array_equal(learned['params']['pos_embed'], table)
  # The same function at init, and the other params are untouched.
  fixed_enc, fixed = _encoder_params(posemb_row_first=row_first)
  rest = {k: v for k, v in learned['params'].items() if k != 'pos_embed'}
  jax.tree.map(np.testing.assert_array_equal, rest, fixed['params'])
  np.testing.assert_allclose(enc.apply(learned, batch['image'])[0],
                             fixed_enc.apply(fixed, batch['image'])[0],
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='bogus'):
    vit.Encoder(**MU, posemb='bogus').init(jax.random.key(0), batch['image'])


def test_final_norm_off_has_no_norm():
  enc, variables = _encoder_params(final_norm=False)
  assert 'norm' not in variables['params']
  _, batch = _images()
  latent, _ = enc.apply(variables, batch['image'])
  tapped = vit.Encoder(**MU, taps=(1,))
  _, out = tapped.apply(dict(params=dict(variables['params'], norm=dict(
      scale=jnp.ones(32), bias=jnp.zeros(32)))), batch['image'])
  np.testing.assert_array_equal(latent, out['taps'][0])


@pytest.mark.parametrize('pool', ['avg', 'cls'])
def test_feature_block_pools_that_blocks_output(pool):
  model = model_lib.Classifier(encoder=dict(MU, depth=3),
                               num_classes=NUM_CLASSES, pool=pool,
                               feature_block=1)
  _, batch = _images()
  params = _init(model, batch, 0)['params']
  _, out = model.apply({'params': params}, batch)
  enc = vit.Encoder(**dict(MU, depth=3), taps=(1,),
                    final_norm=pool == 'cls')
  _, enc_out = enc.apply({'params': params['encoder']}, batch['image'])
  tap = enc_out['taps'][0]
  if pool == 'avg':
    ln, ln_params = nn.LayerNorm(1e-6), params['fc_norm']
    want = ln.apply({'params': ln_params}, tap[:, 1:].mean(1))
  else:
    ln, ln_params = nn.LayerNorm(1e-6), params['encoder']['norm']
    want = ln.apply({'params': ln_params}, tap[:, 0])
  np.testing.assert_allclose(out['features'], want, rtol=1e-5, atol=1e-5)


def test_bad_options_raise_before_compiling():
  _, batch = _images()
  for kw, msg in [(dict(feature_block=2), r'depth 2.*0\.\.1'),
                  (dict(feature_block=-1), r'depth 2.*0\.\.1'),
                  (dict(pool='max'), 'pool'),
                  (dict(head='mlp'), 'head'),
                  (dict(encoder=dict(final_norm=True)), 'final_norm')]:
    with pytest.raises(ValueError, match=msg):
      jax.eval_shape(_mu_model(**kw).init, jax.random.key(0), batch)


def test_model_factory_from_variant():
  model = model_lib.Model(variant='mu/8', num_classes=NUM_CLASSES,
                          pool='cls', head='bn_linear', head_init_std=0.01)
  _, batch = _images()
  shapes = _shapes(model, batch)
  assert shapes['head']['linear']['kernel'].shape == (32, NUM_CLASSES)
  assert shapes['encoder']['norm']['scale'].shape == (32,)

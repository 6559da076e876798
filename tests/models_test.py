"""MAE model: shapes, masking convention, pos-embs, patchify, scan, remat."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from mim_jax import errors
from mim_jax import masking
from mim_jax.data import masks
from mim_jax.methods.mae import model as mae
from mim_jax.models import layers
from mim_jax.models import vit

MAE_FIXTURE = os.path.join(FIXTURES, 'mae')
TINY_ENC = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4)
SIZE, P = 32, 4
L = (SIZE // P) ** 2  # 64 patches


def _tiny(**kw):
  kw = dict(dict(decoder_width=32, decoder_depth=2, decoder_num_heads=2,
                 decoder_mlp_dim=64, mask_ratio=0.75), **kw)
  return mae.MAE(encoder=TINY_ENC, **kw)


def _inputs(n=2, seed=0):
  """A batch as MAE reads it: images and the masking noise."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((n, SIZE, SIZE, 3)).astype(np.float32)
  noise = rng.random((n, L)).astype(np.float32)
  return {'image': jnp.asarray(images), 'noise': jnp.asarray(noise)}


def _abstract_params(model, *args):
  """Plain (unboxed) param shapes: model.init returns params boxed with
  their logical axis names."""
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                      *args)['params'])


def _random_params(model, *args, seed=0):
  """Random params of `model` without compiling its init: eval_shape for the
  shapes, numpy for the values (every leaf non-trivial, no zero biases)."""
  args = args or (_inputs(),)
  shapes = _abstract_params(model, *args)
  rng = np.random.default_rng(seed)

  def value(path, s):
    base = 1.0 if path[-1].key == 'scale' else 0.0  # LayerNorm scales ~1
    return (base + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(value, shapes)


@functools.lru_cache(maxsize=None)
def _tiny_params():
  return _random_params(_tiny())


def _max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) -
                             np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------
# Forward shapes and masking.


@pytest.mark.parametrize('ratio', [0.75, 0.6])
def test_forward_shapes(ratio):
  model = _tiny(mask_ratio=ratio)
  pred, out = model.apply({'params': _tiny_params()}, _inputs())
  len_keep = int(L * (1 - ratio))  # 16 and 25 (truncated from 25.6)
  assert len_keep == masking.num_visible(L, ratio)
  assert pred.shape == (2, L, P * P * 3)
  assert pred.dtype == jnp.float32
  assert out['mask'].shape == (2, L)
  np.testing.assert_array_equal(np.sum(out['mask'] == 0, axis=1),
                                [len_keep] * 2)
  np.testing.assert_array_equal(np.sum(out['mask'] == 1, axis=1),
                                [L - len_keep] * 2)
  assert out['latent'].shape == (2, 1 + len_keep, TINY_ENC['width'])
  assert out['ids_keep'].shape == (2, len_keep)
  assert out['ids_restore'].shape == (2, L)
  assert out['target'].shape == (2, L, P * P * 3)


def test_bad_mask_ratio_and_noise_shape():
  with pytest.raises(ValueError, match=r'must be in \(0, 1\)'):
    masking.num_visible(L, 1.0)
  batch = dict(_inputs(), noise=jnp.zeros((2, L - 1)))
  with pytest.raises(ValueError, match='patches'):
    jax.eval_shape(_tiny().init, jax.random.PRNGKey(0), batch)


def test_ids_from_noise_keeps_smallest_noise_in_noise_order():
  rng = np.random.default_rng(3)
  noise = rng.random((4, 10)).astype(np.float32)
  len_keep = 3
  ids_keep, ids_restore, mask = map(
      np.asarray, mae.ids_from_noise(jnp.asarray(noise), len_keep))
  for n in range(4):
    order = sorted(range(10), key=lambda l, n=n: noise[n, l])
    assert list(ids_keep[n]) == order[:len_keep]
    # Ascending noise order, not raster order.
    assert np.all(np.diff(noise[n, ids_keep[n]]) > 0)
    # ids_restore is the inverse permutation of ids_shuffle.
    shuffle = np.asarray(order)
    np.testing.assert_array_equal(shuffle[ids_restore[n]], np.arange(10))
    np.testing.assert_array_equal(ids_restore[n][shuffle], np.arange(10))
    expected = np.ones(10, np.float32)
    expected[order[:len_keep]] = 0.0
    np.testing.assert_array_equal(mask[n], expected)
  assert mask.dtype == np.float32


def test_noise_for_mask_makes_the_model_mask_exactly_those_patches():
  """Masks reach MAE only as noise: the pipeline's noise_for_mask replays
  any mask with the right count."""
  rng = np.random.default_rng(4)
  len_keep = masking.num_visible(L, 0.75)
  mask = np.ones((2, L), np.float32)
  for n in range(2):
    mask[n, rng.choice(L, len_keep, replace=False)] = 0.0
  uniform = rng.random((2, L)).astype(np.float32)
  noise = np.asarray(masks.noise_for_mask(mask, uniform), np.float32)
  batch = dict(_inputs(), noise=jnp.asarray(noise))
  _, out = _tiny().apply({'params': _tiny_params()}, batch)
  np.testing.assert_array_equal(out['mask'], mask)
  for n in range(2):
    np.testing.assert_array_equal(np.sort(out['ids_keep'][n]),
                                  np.flatnonzero(mask[n] == 0))


# ---------------------------------------------------------------------------
# Position embedding and patchify.


def _posemb_reference(gh, gw, dim):
  q = dim // 4
  omega = 1.0 / 10000 ** (np.arange(q) / q)
  rows = [np.zeros(dim)]
  for i in range(gh):
    for j in range(gw):
      rows.append(np.concatenate([np.sin(j * omega), np.cos(j * omega),
                                  np.sin(i * omega), np.cos(i * omega)]))
  return np.stack(rows)[None].astype(np.float32)


@pytest.mark.parametrize('gh,gw,dim', [(4, 4, 16), (3, 5, 24)])
def test_posemb_sincos_2d(gh, gw, dim):
  emb = layers.posemb_sincos_2d(gh, gw, dim)
  assert emb.shape == (1, 1 + gh * gw, dim) and emb.dtype == np.float32
  np.testing.assert_array_equal(emb[0, 0], np.zeros(dim))
  grid = emb[0, 1:].reshape(gh, gw, dim)
  half = dim // 2
  # First half: the same for every row i (depends on the column j only);
  # second half: the same for every column j (depends on the row i only).
  np.testing.assert_array_equal(grid[:, :, :half],
                                np.broadcast_to(grid[:1, :, :half],
                                                grid[:, :, :half].shape))
  np.testing.assert_array_equal(grid[:, :, half:],
                                np.broadcast_to(grid[:, :1, half:],
                                                grid[:, :, half:].shape))
  assert not np.allclose(grid[0, 0, :half], grid[0, 1, :half])
  assert not np.allclose(grid[0, 0, half:], grid[1, 0, half:])
  np.testing.assert_allclose(emb, _posemb_reference(gh, gw, dim), atol=1e-7)
  no_cls = layers.posemb_sincos_2d(gh, gw, dim, cls_token=False)
  np.testing.assert_array_equal(no_cls, emb[:, 1:])


def test_posemb_matches_official_tables_and_rejects_bad_dim():
  with np.load(os.path.join(MAE_FIXTURE, 'state_dict.npz')) as sd:
    # float64 then float32, like upstream: bit-identical tables.
    np.testing.assert_array_equal(layers.posemb_sincos_2d(8, 8, 64),
                                  sd['pos_embed'])
    np.testing.assert_array_equal(layers.posemb_sincos_2d(8, 8, 48),
                                  sd['decoder_pos_embed'])
  with pytest.raises(ValueError, match='dim % 4'):
    layers.posemb_sincos_2d(4, 4, 30)


def test_patchify_layout_and_round_trip():
  rng = np.random.default_rng(5)
  n, h, w, c, p = 2, 8, 12, 3, 4
  img = rng.standard_normal((n, h, w, c)).astype(np.float32)
  x = np.asarray(layers.patchify(jnp.asarray(img), p))
  gw = w // p
  assert x.shape == (n, (h // p) * gw, p * p * c)
  for l in range(x.shape[1]):
    i, j = divmod(l, gw)
    for a in range(p):
      for b in range(p):
        for ch in range(c):
          assert x[0, l, (a * p + b) * c + ch] == img[0, i * p + a,
                                                      j * p + b, ch]
  # Vectorised check for every sample, against the fixture's formula.
  ref = img.transpose(0, 3, 1, 2).reshape(n, c, h // p, p, gw, p)
  ref = ref.transpose(0, 2, 4, 3, 5, 1).reshape(n, -1, p * p * c)
  np.testing.assert_array_equal(x, ref)
  back = layers.unpatchify(jnp.asarray(x), p, (h // p, gw), c)
  np.testing.assert_array_equal(back, img)


def test_patchify_matches_official_target():
  with np.load(os.path.join(MAE_FIXTURE, 'inputs.npz')) as f:
    imgs = f['imgs'].transpose(0, 2, 3, 1)
  with np.load(os.path.join(MAE_FIXTURE, 'outputs.npz')) as f:
    target = f['target']
  np.testing.assert_array_equal(layers.patchify(imgs, 4), target)


# ---------------------------------------------------------------------------
# Scan / remat / dtype / dropout.


def test_scan_matches_loop_with_converted_params():
  params = _tiny_params()
  scanned = vit.loop_to_scan(jax.tree.map(np.asarray, params))
  qkv = scanned['encoder']['blocks']['attn']['qkv']['kernel']
  assert qkv.shape == (2, 32, 96)
  np.testing.assert_array_equal(
      qkv[1], params['encoder']['blocks_1']['attn']['qkv']['kernel'])
  assert 'blocks' in scanned['decoder']
  assert not any(k.startswith('blocks_') for k in scanned['encoder'])
  # The scanned model's own init has exactly this structure and these shapes.
  batch = _inputs()
  scan_model = _tiny(scan=True)
  shapes = _abstract_params(scan_model, batch)
  assert (jax.tree.map(np.shape, shapes) ==
          jax.tree.map(np.shape, scanned))
  pred_l, out_l = _tiny().apply({'params': params}, batch)
  pred_s, out_s = scan_model.apply({'params': scanned}, batch)
  assert _max_abs(pred_s, pred_l) <= 1e-5
  assert _max_abs(out_s['latent'], out_l['latent']) <= 1e-5
  # Round trip back to the loop layout is exact.
  back = vit.scan_to_loop(scanned)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_remat_gives_same_loss_and_grads():
  batch = _inputs()
  images = batch['image']
  ids_keep = mae.ids_from_noise(batch['noise'], 16)[0]
  params = _random_params(vit.Encoder(**TINY_ENC), images, ids_keep)

  def loss_and_grads(policy):
    enc = vit.Encoder(**TINY_ENC, remat_policy=policy)

    def loss(p):
      latent, _ = enc.apply({'params': p}, images, ids_keep, train=True)
      return jnp.sum(jnp.sin(latent) * latent)

    return jax.jit(jax.value_and_grad(loss))(params)

  loss0, g0 = loss_and_grads('none')
  for policy in ('full', 'dots', 'dots_no_batch', 'linears'):
    loss1, g1 = loss_and_grads(policy)
    assert abs(float(loss1) - float(loss0)) <= 1e-5 * abs(float(loss0))
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      assert _max_abs(a, b) <= 1e-5 * float(np.abs(b).max())


def test_linears_remat_stacks_fewer_activations_than_no_remat():
  """The recipes' 'linears' policy keeps no attention probabilities and one
  MLP hidden array per block, so a scanned stack's backward needs less
  temporary memory than without remat (XLA's own accounting)."""
  images = jnp.asarray(np.random.default_rng(0).standard_normal(
      (4, 64, 64, 3)).astype(np.float32))
  ids_keep = jnp.tile(jnp.arange(256)[None], (4, 1))  # every patch: 256

  def temp_bytes(policy):
    enc = vit.Encoder(**dict(TINY_ENC, depth=4), scan=True,
                      remat_policy=policy)
    params = _abstract_params(enc, images, ids_keep)

    def loss(p):
      latent, _ = enc.apply({'params': p}, images, ids_keep, train=True)
      return jnp.sum(latent * latent)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  none, linears = temp_bytes('none'), temp_bytes('linears')
  # Per block: (4, 2, 256, 256) probabilities alone are 2 MiB.
  assert linears < 0.6 * none, (linears, none)


def test_unknown_remat_policy_is_named():
  with pytest.raises(ValueError, match='bogus'):
    layers.get_remat_policy('bogus')
  batch = _inputs()
  with pytest.raises(ValueError, match='bogus'):
    jax.eval_shape(_tiny(remat_policy='bogus').init, jax.random.PRNGKey(0),
                   batch)


def test_bfloat16_layer_norm_takes_float32_statistics():
  """flax's LayerNorm under dtype=bfloat16 reduces in float32: inputs with
  a large mean (bf16 spacing 2 at 300) still normalise to bf16 precision."""
  x = 300.0 + jax.random.normal(jax.random.PRNGKey(0), (4, 64))
  ln = layers.layer_norm(1e-6, jnp.bfloat16)
  params = ln.init(jax.random.PRNGKey(0), x)
  y = ln.apply(params, x)
  y32 = layers.layer_norm(1e-6, jnp.float32).apply(params, x)
  assert y.dtype == jnp.bfloat16
  assert _max_abs(y, y32) < 0.02


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(dtype=jnp.bfloat16)
  batch = _inputs()
  shapes = _abstract_params(model, batch)
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype('float32')}
  params = _tiny_params()
  pred, out = jax.jit(model.apply)({'params': params}, batch)
  assert pred.dtype == jnp.float32
  assert out['latent'].dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(pred)))
  # bf16 compute stays close to the float32 model with the same params.
  pred32, _ = _tiny().apply({'params': params}, batch)
  assert _max_abs(pred, pred32) < 0.1 * float(np.abs(pred32).max()) + 0.1


def test_decoder_attention_dropout():
  params = _tiny_params()
  batch = _inputs()
  ref, _ = _tiny().apply({'params': params}, batch)
  drop = _tiny(decoder_attn_drop=0.5)
  rngs = {'dropout': jax.random.PRNGKey(7)}
  evl, _ = drop.apply({'params': params}, batch, train=False,
                      rngs=rngs)
  np.testing.assert_array_equal(evl, ref)
  trn, _ = drop.apply({'params': params}, batch, train=True,
                      rngs=rngs)
  assert _max_abs(trn, ref) > 1e-3
  trn2, _ = drop.apply({'params': params}, batch, train=True,
                       rngs={'dropout': jax.random.PRNGKey(8)})
  assert _max_abs(trn2, trn) > 1e-3
  # Without attn_drop, train=True is deterministic (no dropout elsewhere).
  nodrop, _ = _tiny().apply({'params': params}, batch, train=True,
                            rngs=rngs)
  np.testing.assert_array_equal(nodrop, ref)


# ---------------------------------------------------------------------------
# Published sizes.


def _block_params(d, mlp):
  attn = 3 * d * d + 3 * d + d * d + d   # qkv + proj
  mlp_p = d * mlp + mlp + mlp * d + d     # fc1 + fc2
  norms = 4 * d                           # norm1, norm2 (weight + bias)
  return attn + mlp_p + norms


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_vit_b16_param_count():
  model = mae.Model(variant='B/16', decoder_width=512, decoder_depth=8,
                    decoder_num_heads=16)
  shapes = _abstract_params(
      model, {'image': jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
              'noise': jax.ShapeDtypeStruct((1, 196), jnp.float32)})
  d, mlp, p, depth = 768, 3072, 16, 12
  enc = (d * 3 * p * p + d           # patch_embed conv
         + d                         # cls_token
         + depth * _block_params(d, mlp)
         + 2 * d)                    # final norm
  dd, dmlp = 512, 2048
  dec = (d * dd + dd                 # decoder_embed
         + dd                        # mask_token
         + 8 * _block_params(dd, dmlp)
         + 2 * dd                    # decoder_norm
         + dd * p * p * 3 + p * p * 3)  # decoder_pred
  assert _count(shapes['encoder']) == enc
  assert _count(shapes['decoder']) == dec
  # 85,647,360 trainable; with the frozen (1, 197, 768) pos-embed table the
  # official encoder's state dict holds the published ~85.8M.
  assert 85.79e6 < enc + (1 + 196) * d < 85.81e6


def test_decode_variant():
  assert vit.decode_variant('B/16') == dict(
      width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16)
  assert vit.decode_variant('L/16') == dict(
      width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=16)
  assert vit.decode_variant('H/14') == dict(
      width=1280, depth=32, num_heads=16, mlp_dim=5120, patch_size=14)
  assert vit.decode_variant(None) == {}
  for bad in ('X/16', 'B16', 'B/'):
    with pytest.raises(ValueError, match='Unknown ViT variant'):
      vit.decode_variant(bad)
  with pytest.raises(ValueError, match='X/16'):
    vit.decode_variant('X/16')


def test_fixed_count_split_recovers_every_count_from_its_ratio():
  """CAE/BootMAE take the mask ratio as masking.ratio_for(M, L) (M / L
  itself loses a patch for some pairs); every M must come back."""
  for num_patches, num_masked in ((49, 36), (64, 39), (196, 147), (12, 5),
                                  (196, 98)):
    mask = np.zeros((1, num_patches), np.float32)
    mask[0, :num_masked] = 1
    side = int(num_patches ** 0.5)
    grid = (side, num_patches // side)
    ratio = masking.ratio_for(num_masked, num_patches)
    vis, masked = vit.split_by_mask(mask, grid, ratio)
    assert masked.shape[1] == num_masked, (num_patches, num_masked)
    assert vis.shape[1] == num_patches - num_masked


def _index_reference(gh, gw):
  """BEiT's relative_position_index by its definition, pair by pair."""
  n = (2 * gh - 1) * (2 * gw - 1) + 3
  cells = [(i, j) for i in range(gh) for j in range(gw)]
  ref = np.full((len(cells) + 1,) * 2, n - 3)   # cls -> patch
  ref[:, 0] = n - 2                             # patch -> cls
  ref[0, 0] = n - 1                             # cls -> cls
  for a, (i, j) in enumerate(cells):
    for b, (k, l) in enumerate(cells):
      ref[a + 1, b + 1] = (i - k + gh - 1) * (2 * gw - 1) + (j - l + gw - 1)
  return ref


def test_rel_pos_bias_index_grid_and_zero_init():
  for gh, gw in [(1, 1), (2, 3), (4, 4)]:
    np.testing.assert_array_equal(layers.relative_position_index(gh, gw),
                                  _index_reference(gh, gw))
  assert layers.token_grid(17) == (4, 4)
  with pytest.raises(ValueError, match='square grid'):
    layers.token_grid(16)
  with pytest.raises(ValueError, match='2x3'):
    layers.token_grid(17, (2, 3))
  # A non-square image: the encoder passes its grid; the tables start at
  # zeros, so the output equals the encoder without the bias.
  images = jnp.asarray(np.random.default_rng(0).standard_normal(
      (2, 8, 12, 3)).astype(np.float32))
  enc = vit.Encoder(**TINY_ENC, rel_pos_bias=True)
  variables = enc.init(jax.random.key(0), images)
  table = variables['params']['blocks_1']['attn'][
      'relative_position_bias_table']
  assert nn.get_partition_spec(table) == jax.sharding.PartitionSpec(
      None, 'heads')
  assert nn.meta.unbox(table).shape == (3 * 5 + 3, 2)
  plain = nn.meta.unbox(vit.Encoder(**TINY_ENC).init(jax.random.key(0),
                                                     images))
  np.testing.assert_array_equal(
      enc.apply(variables, images)[0],
      vit.Encoder(**TINY_ENC).apply(plain, images)[0])
  with pytest.raises(ValueError, match='ids_keep'):
    enc.apply(variables, images, jnp.zeros((2, 3), jnp.int32))


def test_block_attention_computes_in_the_block_dtype():
  block = layers.Block(num_heads=2, mlp_dim=64, dtype=jnp.bfloat16)
  x = jnp.ones((1, 5, 32), jnp.float32)
  variables = block.init(jax.random.key(0), x)
  _, state = block.apply(variables, x, capture_intermediates=True)
  assert state['intermediates']['attn']['__call__'][0].dtype == jnp.bfloat16


class _ShiftDrop(nn.Module):
  """Test block: shifts its (N, depth) carry left and appends what its
  drop path makes of a 1 (0, or 1 / keep), so after `depth` blocks column
  i holds block i's draws."""
  drop_path: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, rate=None):
    kept = layers.DropPath(self.drop_path)(jnp.ones_like(x[:, :1]),
                                          self.deterministic, rate)
    return jnp.concatenate([x[:, 1:], kept], axis=1), None


class _Stack(nn.Module):
  scan: bool
  taps: tuple = ()

  @nn.compact
  def __call__(self, x):
    return layers.block_stack(
        x, depth=4, block_kwargs={}, scan=self.scan, deterministic=False,
        drop_path_rates=vit.drop_path_rates(0.6, 4), block=_ShiftDrop,
        taps=self.taps)


@pytest.mark.parametrize('scan,taps', [(False, ()), (True, ()),
                                       (True, (1,))])
def test_drop_path_rates_are_upstreams_linspace_per_layer(scan, taps):
  """Block i drops with linspace(0, 0.6, 4)[i], per sample: block 0 never
  (x / 1 exactly), a kept sample is scaled by 1 / (1 - rate_i); also in a
  scan cut into segments by a tap."""
  rates = np.linspace(0, 0.6, 4)
  assert vit.drop_path_rates(0.6, 4) == tuple(rates)
  assert layers.scan_rates(vit.drop_path_rates(0.6, 4))[0] == 0.0
  np.testing.assert_array_equal(
      layers.scan_rates(vit.drop_path_rates(0.6, 4))[1],
      rates.astype(np.float32))
  out = _Stack(scan, taps).apply({}, jnp.zeros((256, 4)),
                                 rngs={'dropout': jax.random.PRNGKey(0)})
  x = np.asarray(out[0] if taps else out)
  np.testing.assert_array_equal(x[:, 0], 1.0)
  for i in range(1, 4):
    kept = x[:, i] != 0
    np.testing.assert_allclose(x[kept, i], 1 / (1 - rates[i]), rtol=1e-6)
    assert abs(1 - kept.mean() - rates[i]) < 0.1, (i, kept.mean())
  assert len({tuple(x[:, i] != 0) for i in (1, 2, 3)}) == 3  # own draws


def test_per_block_rates_and_taps_with_scan_match_the_loop():
  """A per-block drop_path_rate list, taps and an insertion split: the
  scanned encoder (one stacked tree) computes what the loop does;
  a list of the wrong length is refused before building, naming the
  depth."""
  fields = dict(TINY_ENC, depth=4, drop_path_rate=(0.0, 0.2, 0.1, 0.3),
                taps=(2, 0))
  images = _inputs()['image']
  insert = (1, jnp.array([[3, 5], [1, 2]]), jnp.ones((1, 1, 32)))
  ids_keep = jnp.tile(jnp.arange(8)[None], (2, 1))
  loop = vit.Encoder(**fields)
  params = _random_params(loop, images, ids_keep)
  scan = vit.Encoder(**fields, scan=True)
  run = lambda m, p: jax.jit(lambda p: m.apply(
      {'params': p}, images, ids_keep, insert=insert))(p)
  want = run(loop, params)
  got = run(scan, vit.loop_to_scan(params))
  assert [t.shape[1] for t in got[1]['taps']] == [11, 9]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert _max_abs(a, b) <= 1e-5
  with pytest.raises(errors.ConfigError, match='give 4 rates'):
    vit.validate_drop_path(dict(encoder=dict(fields, drop_path_rate=(.1,))))

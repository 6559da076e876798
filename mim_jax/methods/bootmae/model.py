"""BootMAE (Dong et al. 2022), as in LightDXY/BootMAE.

  encoder on [cls] + visible patches, tapping a low-level (first block) and
  a high-level (last block) feature before the final norm;
  pixel regressor: Linear(D -> Dd) of the normed latents, mask tokens with
    decoder sin-cos positions (mask tokens only), then blocks of
    self-attention -> cross-attention to the low-level feature -> MLP, a
    LayerNorm and a per-patch transposed-conv head to pixels;
  feature predictor: the same at width D, its own mask token with the
    encoder positions, cross-attending to the high-level feature, LayerNorm
    and Linear(D -> D).

The target of the feature predictor comes from the momentum encoder
(`TrainState.ema_params['encoder']`, an EMA of the online encoder, the
method's 'ema' target provider): the last block's output on the full image,
in eval mode, cls dropped, no gradient (`ema_targets`). Visible and masked patches are each taken in increasing
patch order (the official outputs do not depend on the order).

Heads: the decoders use the encoder's head count. With a 512-wide decoder
and 12 heads (ViT-B) the official attention works in 12 x (512 // 12) = 504
dims (BEiT's `all_head_dim`); `floor_head_dim` reproduces that.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models import init_rules as ir
from mim_jax.models import layers
from mim_jax.models import vit


class CrossAttention(nn.Module):
  """q = Linear(x) + q_bias; (k, v) = Linear(feature) + (0, v_bias)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, feature):
    d = x.shape[-1]
    inner = layers.inner_dim(d, self.num_heads, True)
    q_bias, v_bias = layers.qv_biases(self, inner)
    q = layers.dense(inner, ('embed', 'heads'), self.dtype, 'q',
                     use_bias=False)(x) + q_bias.astype(self.dtype)
    kv = layers.dense(2 * inner, ('embed', 'heads'), self.dtype, 'kv',
                      use_bias=False)(feature)
    k, v = kv[..., :inner], kv[..., inner:] + v_bias.astype(self.dtype)
    out = layers.attend(q, k, v, self.num_heads, self.dtype)
    return layers.dense(d, ('heads', 'embed'), self.dtype, 'proj')(out)


class DecodeBlock(nn.Module):
  """x += SelfAttn(LN1 x); x += CrossAttn(LN3 x, LN4 feature);
  x += MLP(LN2 x). Called as a `layers.block_stack` block: (x, rate,
  feature) -> (x, None); BootMAE's decoders have no drop path (`drop_path`
  and `rate` stay 0, the identity)."""
  num_heads: int
  mlp_dim: int
  layernorm_eps: float = 1e-6
  drop_path: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, rate, feature):
    ln = lambda name: layers.layer_norm(self.layernorm_eps, self.dtype, name)
    drop = lambda y: layers.DropPath(self.drop_path)(y, self.deterministic,
                                                     rate)
    x = x + drop(layers.Attention(self.num_heads, 'qv', floor_head_dim=True,
                                  dtype=self.dtype, name='attn')(
                                      ln('norm1')(x)))
    x = x + drop(CrossAttention(self.num_heads, self.dtype, name='c_attn')(
        ln('norm3')(x), ln('norm4')(feature)))
    return x + drop(layers.Mlp(self.mlp_dim, self.dtype, name='mlp')(
        ln('norm2')(x))), None


class PatchHead(nn.Module):
  """ConvTranspose2d(D, C, k=p, s=p) on the token grid, written as what it
  is: one linear map per token to its p x p x C pixels, one bias per
  channel. kernel (D, p, p, C) is torch's (D, C, p, p) weight transposed;
  the output is in `layers.patchify` layout (N, L, p*p*C)."""
  patch_size: int
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p, c = self.patch_size, self.channels
    kernel = self.param(
        'kernel', layers.logical(layers.xavier_uniform,
                                 ('embed', None, None, None)),
        (x.shape[-1], p, p, c))
    bias = self.param('bias', layers.logical(nn.initializers.zeros_init(),
                                             (None,)), (c,))
    y = jnp.einsum('nld,dabc->nlabc', x, kernel.astype(self.dtype))
    y = y + bias.astype(self.dtype)
    return y.reshape(*x.shape[:2], p * p * c)


class BootMAE(nn.Module):
  """Params: encoder; pixel regressor pixel_{down, mask_token, blocks_{i},
  norm, head}; feature predictor feature_{down, mask_token, blocks_{i},
  norm, head}. `scan=True` stacks the encoder's and both decoders' blocks
  (`blocks`, `pixel_blocks`, `feature_blocks`, leading layer axis); the
  taps then cut the encoder's scan into segments (`layers.block_stack`)."""
  encoder: dict
  decoder_width: int = 512
  decoder_depth: int = 2
  feature_depth: Optional[int] = None   # default: decoder_depth
  taps: Sequence[int] = (0, -1)         # (low, high) encoder blocks
  # Not a config.model field: build_model passes config.input.mask.ratio.
  mask_ratio: float = 0.75
  in_chans: int = 3
  scan: bool = False
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  def tap_indices(self) -> tuple[int, int]:
    depth = self.encoder['depth']
    taps = tuple(int(t) for t in self.taps)
    if len(taps) != 2 or not all(-depth <= t < depth for t in taps):
      raise ValueError(
          f'model.taps={list(self.taps)}: give two encoder block indices '
          f'(low, high) in [-{depth}, {depth - 1}], e.g. [0, {depth - 1}].')
    return tuple(t % depth for t in taps)

  def encoder_fields(self) -> dict:
    enc = dict(qkv_bias='qv', posemb_row_first=True)
    enc.update(self.encoder)
    return dict(enc, scan=self.scan, remat_policy=self.remat_policy,
                dtype=self.dtype)

  def _predictor(self, z, feature, ids_vis, ids_masked, pos, width, depth,
                 prefix, num_heads, eps):
    """One decoder: Linear(z) on [cls] + visible, mask tokens + pos, in
    patch order, `depth` decode blocks, LayerNorm; returns (N, 1 + L,
    width), cls first."""
    n, num_vis = z.shape[0], z.shape[1] - 1
    x_vis = layers.dense(width, ('embed', None), self.dtype,
                         f'{prefix}_down')(z)
    token = self.param(f'{prefix}_mask_token', layers.token_param,
                       (1, 1, width))
    x_mask = token.astype(self.dtype) + pos[ids_masked]
    num_patches = num_vis + ids_masked.shape[1]
    x = jnp.zeros((n, num_patches, width), x_vis.dtype)
    rows = jnp.arange(n)[:, None]
    x = x.at[rows, ids_vis].set(x_vis[:, 1:])
    x = x.at[rows, ids_masked].set(x_mask)
    x = jnp.concatenate([x_vis[:, :1], x], axis=1)
    x = layers.block_stack(
        x, depth=depth, block_kwargs=dict(
            num_heads=num_heads, mlp_dim=4 * width, layernorm_eps=eps,
            dtype=self.dtype),
        scan=self.scan, remat_policy=self.remat_policy,
        name=f'{prefix}_blocks', block=DecodeBlock, broadcast=(feature,))
    return layers.layer_norm(eps, self.dtype, f'{prefix}_norm')(x)

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = False):
    """Forward pass.

    Args:
      batch: 'image' (N, H, W, C) normalised images (BootMAE: mean = std =
        0.5) and 'mask' (N, L), 1 = masked; every row masks the same count,
        masking.num_masked(L, mask_ratio).
      train: unused (no dropout or drop path in BootMAE pretraining).

    Returns:
      (pred, out): pred (N, L, p*p*C) pixels of every patch (the MAE
      layout); out holds 'mask', 'pred_feature' (N, L, D), 'encoder_out'
      (N, 1 + V, D), 'taps' (low and high features) and the decoder outputs.
    """
    del train
    images, mask = batch['image'], batch['mask']
    low, high = self.tap_indices()
    enc = vit.Encoder(**self.encoder_fields(), taps=(low, high),
                      name='encoder')
    grid_hw = enc.grid(images)
    ids_vis, ids_masked = vit.split_by_mask(mask, grid_hw, self.mask_ratio)
    latent, enc_out = enc(images, ids_vis)
    feat_low, feat_high = enc_out['taps']
    eps, heads, width = enc.layernorm_eps, enc.num_heads, enc.width

    de_pos = layers.posemb_sincos_2d(*grid_hw, self.decoder_width,
                                     cls_token=False, row_first=True)[0]
    pix = self._predictor(latent, feat_low, ids_vis, ids_masked,
                          jnp.asarray(de_pos, self.dtype), self.decoder_width,
                          self.decoder_depth, 'pixel', heads, eps)
    p = enc.patch_size
    pred = PatchHead(p, self.in_chans, self.dtype, name='pixel_head')(
        pix[:, 1:])

    pos = jnp.asarray(enc.pos_embed(images)[0, 1:], self.dtype)
    feat = self._predictor(latent, feat_high, ids_vis, ids_masked, pos, width,
                           self.feature_depth or self.decoder_depth, 'feature',
                           heads, eps)
    pred_feature = layers.dense(width, ('embed', None), self.dtype,
                                'feature_head')(feat[:, 1:])
    out = dict(mask=mask, ids_masked=ids_masked, encoder_out=latent,
               taps=(feat_low, feat_high), pix_decoder_out=pix,
               feat_decoder_out=feat,
               pred_feature=pred_feature.astype(jnp.float32))
    return pred.astype(jnp.float32), out


# Upstream's constructor, after building its modules: trunc_normal(0.02)
# mask tokens truncated at +-0.02 (its trunc_normal_ passes a=-std, b=std),
# then every Linear redrawn xavier-uniform with zero bias, a fused qkv per
# q/k/v (the cross-attention's fused kv as one weight), cls normal(1e-6),
# the patch embedding xavier on its (D, C*p*p) view with zero bias. The
# pixel head, a ConvTranspose2d, is not re-initialised: PyTorch's default,
# U(+-1/sqrt(fan_in)) for weight and bias with fan_in = C*p*p (its weight is
# (D, C, p, p) and torch takes fan_in from dim 1).
def init_rules(model: BootMAE) -> tuple:
  """The official init, beyond the modules' own (see `mim_jax.models.
  init_rules`)."""
  p = vit.Encoder(**model.encoder_fields(), parent=None).patch_size
  head = 1.0 / float(model.in_chans * p * p) ** .5
  return (
      ir.Rule(r'(.*/)?qkv/kernel', ir.xavier_uniform(parts=3)),
      ir.Rule(r'encoder/patch_embed/bias', ir.zeros),
      ir.Rule(r'encoder/cls_token', ir.normal(1e-6)),
      ir.Rule(r'(pixel|feature)_mask_token', ir.trunc_normal(.02, -.02, .02)),
      ir.Rule(r'pixel_head/(kernel|bias)', ir.uniform(head)),
  )


def ema_targets(model: BootMAE, ema_params, batch) -> dict:
  """The momentum encoder's target: its last block's output (before the
  final norm) on the full image, cls dropped. (N, L, D)."""
  depth = model.encoder['depth']
  # A standalone module (parent=None): the teacher has its own params.
  enc = vit.Encoder(**model.encoder_fields(), taps=(depth - 1,), parent=None)
  _, out = enc.apply({'params': ema_params['encoder']}, batch['image'])
  return {'feature_target': out['taps'][0][:, 1:].astype(jnp.float32)}


def init_ema(params) -> dict:
  """The momentum encoder starts as a copy of the online encoder."""
  return {'encoder': params['encoder']}


def Model(*, variant: Optional[str] = None, encoder: Optional[dict] = None,
          **kw) -> BootMAE:
  """Builds BootMAE from a ViT variant ('B/16') and/or encoder fields."""
  if 'taps' in kw:
    kw['taps'] = tuple(kw['taps'])
  return BootMAE(encoder=vit.encoder_fields(variant, encoder), **kw)

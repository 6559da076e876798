"""CAE, Context Autoencoder (Chen et al. 2022), v1 as in Atten4Vis/CAE.

  encoder (visible patches + cls) -> latent regressor (cross-attention from
  mask-token queries to [visible latents, queries]) -> decoder on the
  predicted masked latents only -> token logits (or pixels).

The alignment target is the *same* encoder under stop-gradient, run on the
masked patches (upstream copies the encoder into `alignment_encoder` before
every forward: momentum 0, no EMA). Masks come from the pipeline (block-wise,
a fixed count per image); visible and masked patches are each taken in
increasing patch order, as upstream's boolean indexing does.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import errors
from mim_jax.models import init_rules as ir
from mim_jax.models import layers
from mim_jax.models import vit


class CrossAttention(nn.Module):
  """Separate q/k/v projections, q and v biases, no key bias."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q_in, k_in, v_in):
    d = q_in.shape[-1]
    q_bias, v_bias = layers.qv_biases(self, d)
    q = layers.dense(d, ('embed', 'heads'), self.dtype, 'q',
                     use_bias=False)(q_in) + q_bias.astype(self.dtype)
    k = layers.dense(d, ('embed', 'heads'), self.dtype, 'k',
                     use_bias=False)(k_in)
    v = layers.dense(d, ('embed', 'heads'), self.dtype, 'v',
                     use_bias=False)(v_in) + v_bias.astype(self.dtype)
    out = layers.attend(q, k, v, self.num_heads, self.dtype)
    return layers.dense(d, ('heads', 'embed'), self.dtype, 'proj')(out)


class RegressorBlock(nn.Module):
  """x = x_q + g1 * CrossAttn(LN_q(x_q + pos_q), LN_k(kv + pos_k), LN_v(kv))
  with kv = [z_vis, x_q]; x = LN_2(x) (post-norm); x = x + g2 * MLP(x).
  Only the queries move. Called as a `layers.block_stack` block: `rate`
  overrides `drop_path`, and it returns (x, None)."""
  num_heads: int
  mlp_dim: int
  layer_scale: float = 0.1
  drop_path: float = 0.0
  layernorm_eps: float = 1e-6
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_q, rate, z_vis, pos_q, pos_k):
    ln = lambda name: layers.layer_norm(self.layernorm_eps, self.dtype, name)
    x_kv = jnp.concatenate([z_vis, x_q], axis=1)
    y = CrossAttention(self.num_heads, self.dtype, name='cross_attn')(
        ln('norm1_q')(x_q + pos_q), ln('norm1_k')(x_kv + pos_k),
        ln('norm1_v')(x_kv))
    drop = layers.DropPath(self.drop_path)
    scale = lambda name, y: layers.layer_scale(self, name, y,
                                               self.layer_scale)
    x = x_q + drop(scale('gamma_1_cross', y), self.deterministic, rate)
    x = ln('norm2_cross')(x)
    y = layers.Mlp(self.mlp_dim, self.dtype, name='mlp_cross')(x)
    return x + drop(scale('gamma_2_cross', y), self.deterministic, rate), None


class CAE(nn.Module):
  """Params: encoder, mask_token, regressor, decoder (+ encoder_to_regressor
  when the decoder width differs from the encoder's)."""
  encoder: dict
  decoder_width: Optional[int] = None     # default: the encoder width
  decoder_num_heads: int = 12
  regressor_depth: int = 4
  decoder_depth: int = 4
  decoder_layer_scale: float = 0.1
  decoder_mlp_dim: Optional[int] = None
  # Stochastic depth of the regressor and decoder, each linearly from 0 at
  # its first block; None = the encoder's drop_path_rate, as upstream passes
  # one --drop_path to all three stacks.
  decoder_drop_path_rate: Optional[float] = None
  vocab_size: int = 8192
  target: str = 'tokens'                  # or 'pixels' (CAE paper Table 8)
  # Not a config.model field: build_model passes config.input.mask.ratio.
  mask_ratio: float = 0.5
  in_chans: int = 3
  scan: bool = False
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  def encoder_fields(self) -> dict:
    """The vit.Encoder fields of the encoder (BEiT-style blocks)."""
    enc = dict(qkv_bias='qv', posemb_row_first=True, layer_scale=0.1)
    enc.update(self.encoder)
    return dict(enc, scan=self.scan, remat_policy=self.remat_policy,
                dtype=self.dtype)

  def decoder_rate(self) -> float:
    """The drop-path rate that the regressor and decoder rise to.

    Raises:
      errors.ConfigError: the encoder lists per-block rates and no
        decoder_drop_path_rate is set.
    """
    if self.decoder_drop_path_rate is not None:
      return float(self.decoder_drop_path_rate)
    rate = self.encoder.get('drop_path_rate', 0.0)
    if np.ndim(rate):
      raise errors.ConfigError(
          'model.encoder.drop_path_rate lists per-block rates: set '
          'model.decoder_drop_path_rate (one number) for the regressor and '
          'decoder.')
    return float(rate)

  def _encoder(self) -> vit.Encoder:
    return vit.Encoder(**self.encoder_fields(), name='encoder')

  def _regress(self, z_vis, pos_vis, pos_masked, mlp_dim: int, eps: float,
               rate: float, train: bool):
    """The latent regressor: mask-token queries cross-attending to [visible
    latents, queries], drop path rising linearly to `rate`; returns the
    normed predicted latents of the masked patches (N, M, width)."""
    (n, num_masked), width = pos_masked.shape[:2], z_vis.shape[-1]
    mask_token = self.param('mask_token', layers.token_param, (1, 1, width))
    x = jnp.broadcast_to(mask_token.astype(self.dtype),
                         (n, num_masked, width))
    pos_kv = jnp.concatenate([pos_vis, pos_masked], axis=1)
    x = layers.block_stack(
        x, depth=self.regressor_depth,
        block_kwargs=dict(num_heads=self.decoder_num_heads, mlp_dim=mlp_dim,
                          layer_scale=self.decoder_layer_scale,
                          layernorm_eps=eps, dtype=self.dtype),
        scan=self.scan, remat_policy=self.remat_policy,
        deterministic=not train, name='regressor_blocks',
        drop_path_rates=vit.drop_path_rates(rate, self.regressor_depth),
        block=RegressorBlock, broadcast=(z_vis, pos_masked, pos_kv))
    return layers.layer_norm(eps, self.dtype, 'regressor_norm')(x)

  def _decode(self, y, mlp_dim: int, eps: float, rate: float, train: bool):
    """The decoder blocks on the predicted latents (+ positions), drop path
    rising linearly to `rate`, and its final norm."""
    y = layers.block_stack(
        y, depth=self.decoder_depth,
        block_kwargs=dict(num_heads=self.decoder_num_heads, mlp_dim=mlp_dim,
                          qkv_bias='qv', layer_scale=self.decoder_layer_scale,
                          layernorm_eps=eps,
                          dtype=self.dtype),
        scan=self.scan, remat_policy=self.remat_policy,
        deterministic=not train, name='decoder_blocks',
        drop_path_rates=vit.drop_path_rates(rate, self.decoder_depth))
    return layers.layer_norm(eps, self.dtype, 'decoder_norm')(y)

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = False):
    """Forward pass.

    Args:
      batch: 'image' (N, H, W, C) normalised images and 'mask' (N, L) with
        1 = masked; every row masks the same count,
        masking.num_masked(L, mask_ratio).
      train: enables drop path.

    Returns:
      (pred, out): pred (N, M, vocab_size) token logits (or (N, M, p*p*C)
      pixels) for the masked patches in increasing patch order; out holds
      'mask', 'ids_masked', 'latent_predict', 'latent_target' (N, M, D),
      'encoder_out' and 'alignment_encoder_out' (cls first).
    """
    if self.target not in ('tokens', 'pixels'):
      raise ValueError(f"CAE target {self.target!r}: use 'tokens' (dVAE ids)"
                       " or 'pixels' (normalised pixels).")
    enc = self._encoder()
    images, mask = batch['image'], batch['mask']
    grid_hw = enc.grid(images)
    num_patches = grid_hw[0] * grid_hw[1]
    ids_vis, ids_masked = vit.split_by_mask(mask, grid_hw, self.mask_ratio)
    width = self.decoder_width or enc.width
    mlp_dim = self.decoder_mlp_dim or 4 * width
    eps = enc.layernorm_eps

    latent, _ = enc(images, ids_vis, train=train)
    teacher, _ = enc(images, ids_masked, train=train)
    teacher = jax.lax.stop_gradient(teacher)
    z_vis, target = latent[:, 1:], teacher[:, 1:]
    if width != enc.width:
      proj = layers.dense(width, (None, 'embed'), self.dtype,
                          'encoder_to_regressor')
      norm = layers.layer_norm(eps, self.dtype,
                               'encoder_to_regressor_norm')
      z_vis = norm(proj(z_vis))
      target = jax.lax.stop_gradient(norm(proj(target)))

    rd = jnp.asarray(layers.posemb_sincos_2d(
        *grid_hw, width, cls_token=False, row_first=True)[0], self.dtype)
    pos_vis, pos_masked = rd[ids_vis], rd[ids_masked]
    n = images.shape[0]
    rate = self.decoder_rate()
    latent_predict = self._regress(z_vis, pos_vis, pos_masked, mlp_dim, eps,
                                   rate, train)
    y = self._decode(latent_predict + pos_masked, mlp_dim, eps, rate, train)
    p = enc.patch_size
    out_dim = self.vocab_size if self.target == 'tokens' else (
        p * p * self.in_chans)
    pred = layers.dense(out_dim, ('embed', None), self.dtype,
                        'decoder_head')(y)
    out = dict(mask=mask, ids_masked=ids_masked,
               latent_predict=latent_predict.astype(jnp.float32),
               latent_target=target.astype(jnp.float32),
               encoder_out=latent, alignment_encoder_out=teacher)
    if self.target == 'pixels':
      out['target'] = layers.patchify(images.astype(jnp.float32), p)
      # The masked predictions on the full grid (visible rows zero), the
      # layout of MAE's pred, for reconstruction figures.
      out['pred_patches'] = jnp.zeros(
          (n, num_patches, out_dim), jnp.float32).at[
              jnp.arange(n)[:, None], ids_masked].set(
                  pred.astype(jnp.float32))
    return pred.astype(jnp.float32), out


def Model(*, variant: Optional[str] = None, encoder: Optional[dict] = None,
          **kw) -> CAE:
  """Builds CAE from a ViT variant ('B/16') and/or explicit encoder fields."""
  return CAE(encoder=vit.encoder_fields(variant, encoder), **kw)


# Upstream: the encoder draws its patch embedding and cls token from
# trunc_normal(0.02) truncated at +-0.02 (its trunc_normal_ passes a=-std,
# b=std) with zero conv bias, the mask token likewise; then the model applies
# xavier-uniform with zero bias to every Linear (the modules' own init here)
# and LayerNorm 1/0 (fix_init_weight=False, every official script).
_TRUNC = ir.trunc_normal(.02, -.02, .02)
INIT_RULES = (
    ir.Rule(r'encoder/patch_embed/kernel', _TRUNC),
    ir.Rule(r'encoder/patch_embed/bias', ir.zeros),
    ir.Rule(r'encoder/cls_token', _TRUNC),
    ir.Rule(r'mask_token', _TRUNC),
)

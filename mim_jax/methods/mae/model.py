"""MAE (He et al. 2021): ViT encoder on visible patches + light decoder.

Masking follows the official code exactly: per-sample noise, ids_shuffle =
argsort(noise) ascending, the first int(L * (1 - mask_ratio)) are kept in
that (noise) order, ids_restore = argsort(ids_shuffle). The noise comes from
the input pipeline (`batch['noise']`), so masks are reproducible per
(seed, step, example) and the official fixtures can be replayed. The count
is `masking.num_visible`, shared with the pipeline.

Robust MAE (methods.md section 1; our reading of a paper whose method
sections are not public) adds three switches, all off by default so the
official computation is unchanged:
- `decoder_attn_drop` / `encoder_attn_drop`: dropout on the attention
  probabilities of the decoder ("drop edge at the decoding") / encoder
  blocks (the encoder one exists for the ablation). Fine-tuning never uses
  the pretraining decoder, and the fine-tuning encoder has its own config:
  neither rate reaches it.
- `insert_block` / `insert_ratio`: learnable encoder mask tokens. Before
  block `insert_block` (0-based: the paper's "8th layer" is taken as the
  8th block, index 7, after 7 blocks on the visible tokens), the param
  `encoder_mask_token` + the encoder's position embedding is appended for
  M = masking.num_inserted(L, mask_ratio, insert_ratio) patches: the first
  M masked patches in noise order, ids_shuffle[len_keep:len_keep + M], so
  they come from the same per-example noise as the mask (uniform over the
  masked set; resume stays exact). The later blocks see 1 + K + M tokens;
  the decoder gets the encoder outputs at visible and inserted positions and
  its own mask token at the remaining L - K - M. `out['inserted']` (N, L)
  marks the inserted patches (the loss may leave them out).
- population-statistics targets: the loss's (loss.py), not the model's.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax import masking
from mim_jax.models import layers
from mim_jax.models import vit


def ids_from_noise(noise: jax.Array, len_keep: int):
  """Official MAE masking from noise (N, L).

  Returns:
    ids_keep (N, len_keep), ids_restore (N, L), mask (N, L) float32 with
    1 = removed (masked), 0 = kept.
  """
  return ids_from_shuffle(jnp.argsort(noise, axis=1), len_keep)


def ids_from_shuffle(ids_shuffle: jax.Array, len_keep: int):
  """`ids_from_noise` given ids_shuffle = argsort(noise) (N, L)."""
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :len_keep]
  n, num_patches = ids_shuffle.shape
  mask = jnp.ones((n, num_patches), jnp.float32).at[:, :len_keep].set(0.0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return ids_keep, ids_restore, mask


class MAEDecoder(nn.Module):
  """decoder_embed -> mask tokens + unshuffle -> pos -> blocks -> norm -> pred.

  `attn_drop` is the robust-MAE dropout on the decoder attention
  probabilities (0 in the official MAE).
  """
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_dim: Optional[int] = None
  out_dim: int = 768
  attn_drop: float = 0.0
  layernorm_eps: float = 1e-6
  scan: bool = False
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latent, ids_restore, grid_hw, *, train: bool = False):
    n, _, _ = latent.shape
    num_patches = ids_restore.shape[1]
    # Encoder width -> decoder width: only the decoder side is named, as a
    # logical axis may appear once per array.
    x = layers.dense(self.width, (None, 'embed'), self.dtype,
                     'decoder_embed')(latent)
    mask_token = self.param('mask_token', layers.token_param,
                            (1, 1, self.width))
    num_mask = num_patches + 1 - x.shape[1]
    x_ = jnp.concatenate(
        [x[:, 1:], jnp.broadcast_to(mask_token.astype(self.dtype),
                                    (n, num_mask, self.width))], axis=1)
    x_ = vit.gather_tokens(x_, ids_restore)
    x = jnp.concatenate([x[:, :1], x_], axis=1)
    pos = layers.posemb_sincos_2d(*grid_hw, self.width)
    x = x + jnp.asarray(pos, self.dtype)
    x = layers.block_stack(
        x, depth=self.depth,
        block_kwargs=dict(num_heads=self.num_heads,
                          mlp_dim=self.mlp_dim or 4 * self.width,
                          attn_drop=self.attn_drop,
                          layernorm_eps=self.layernorm_eps, dtype=self.dtype),
        scan=self.scan, remat_policy=self.remat_policy,
        deterministic=not train, name='blocks')
    x = layers.layer_norm(self.layernorm_eps, self.dtype, 'norm')(x)
    x = layers.dense(self.out_dim, ('embed', None), self.dtype, 'pred')(x)
    return x[:, 1:]


class MAE(nn.Module):
  """Masked autoencoder. Params: {'encoder': ..., 'decoder': ...}."""
  encoder: dict
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  decoder_mlp_dim: Optional[int] = None
  decoder_attn_drop: float = 0.0
  encoder_attn_drop: float = 0.0
  insert_block: Optional[int] = None
  insert_ratio: float = 0.25
  # Not a config.model field: build_model passes config.input.mask.ratio.
  mask_ratio: float = 0.75
  in_chans: int = 3
  scan: bool = False
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  def setup(self):
    self.enc = vit.Encoder(**self.encoder, attn_drop=self.encoder_attn_drop,
                           scan=self.scan,
                           remat_policy=self.remat_policy, dtype=self.dtype,
                           name='encoder')
    p = self.enc.patch_size
    self.dec = MAEDecoder(
        width=self.decoder_width, depth=self.decoder_depth,
        num_heads=self.decoder_num_heads, mlp_dim=self.decoder_mlp_dim,
        out_dim=p * p * self.in_chans, attn_drop=self.decoder_attn_drop,
        layernorm_eps=self.enc.layernorm_eps, scan=self.scan,
        remat_policy=self.remat_policy, dtype=self.dtype, name='decoder')
    if self.insert_block is not None:
      self.encoder_mask_token = self.param(
          'encoder_mask_token', layers.token_param,
          (1, 1, self.enc.width))

  def __call__(self, batch: dict, *, train: bool = False):
    """Forward pass.

    Args:
      batch: 'image' (N, H, W, C) normalised images (NHWC) and 'noise'
        (N, L) float, the masking noise (official convention: the
        int(L * (1 - mask_ratio)) patches of smallest noise are kept, in
        noise order).
      train: enables dropout / drop path.

    Returns:
      (pred, out): pred (N, L, p*p*C) in the float32 target space; out holds
      'mask', 'ids_restore', 'ids_keep', 'latent' and 'target' (patchified
      input, not normalised: the loss applies norm_pix), and with encoder
      mask tokens 'ids_insert' (N, M) and 'inserted' (N, L) float32, 1 at
      the inserted patches (a subset of the masked ones).
    """
    images, noise = batch['image'], batch['noise']
    grid_hw = self.enc.grid(images)
    num_patches = grid_hw[0] * grid_hw[1]
    len_keep = masking.num_visible(num_patches, self.mask_ratio)
    if noise.shape[1] != num_patches:
      raise ValueError(f'noise has {noise.shape[1]} patches per row but '
                       f'the images have {num_patches} ({grid_hw}).')
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_keep, ids_restore, mask = ids_from_shuffle(ids_shuffle, len_keep)
    out = dict(mask=mask, ids_restore=ids_restore, ids_keep=ids_keep)
    insert = None
    if self.insert_block is not None:
      count = masking.num_inserted(num_patches, self.mask_ratio,
                                   self.insert_ratio)
      # The next `count` patches of the noise order: the decoder's
      # unshuffle (ids_restore) then puts their outputs in place unchanged.
      ids_insert = ids_shuffle[:, len_keep:len_keep + count]
      insert = (self.insert_block, ids_insert, self.encoder_mask_token)
      out.update(ids_insert=ids_insert, inserted=jax.nn.one_hot(
          ids_insert, num_patches, dtype=jnp.float32).sum(1))
    latent, _ = self.enc(images, ids_keep, insert=insert, train=train)
    pred = self.dec(latent, ids_restore, grid_hw, train=train)
    target = layers.patchify(images.astype(jnp.float32), self.enc.patch_size)
    out.update(latent=latent, target=target)
    return pred.astype(jnp.float32), out


def Model(*, variant: Optional[str] = None, encoder: Optional[dict] = None,
          **kw) -> MAE:
  """Builds MAE from a ViT variant ('B/16') and/or explicit encoder fields."""
  return MAE(encoder=vit.encoder_fields(variant, encoder), **kw)

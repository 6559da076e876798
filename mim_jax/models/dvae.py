"""The DALL-E dVAE encoder (Ramesh et al. 2021), CAE's tokenizer, in Flax.

Architecture of openai/DALL-E `dall_e/encoder.py` (group_count 4, n_hid 256,
2 blocks per group, vocab 8192): a 7x7 input conv, four groups of residual
blocks (widths 1, 2, 4, 8 x n_hid) with 2x2 max pooling after the first
three, and a ReLU + 1x1 conv to vocabulary logits. A block is
id_path(x) + (1 / n_layers**2) * res_path(x), res_path =
relu-conv3x3 (to n_out / 4) - relu-conv3x3 - relu-conv3x3 - relu-conv1x1
(to n_out), id_path a 1x1 conv when the width changes.

A 112 x 112 view (pixels mapped by `map_pixels`) gives 14 x 14 token ids:
one per 16 px patch of the 224 px image.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: jax.Array) -> jax.Array:
  """[0, 1] pixels -> the dVAE's input range, (1 - 2 eps) x + eps."""
  return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def _conv(features: int, size: int, name: str) -> nn.Conv:
  return nn.Conv(features, (size, size), padding=(size - 1) // 2, name=name)


class ResPath(nn.Module):
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x):
    for i, (width, size) in enumerate(((self.hidden, 3), (self.hidden, 3),
                                       (self.hidden, 3), (self.out, 1)), 1):
      x = _conv(width, size, f'conv_{i}')(nn.relu(x))
    return x


class EncoderBlock(nn.Module):
  out: int
  num_layers: int

  @nn.compact
  def __call__(self, x):
    identity = x if x.shape[-1] == self.out else _conv(
        self.out, 1, 'id_path')(x)
    post_gain = 1.0 / self.num_layers ** 2
    return identity + post_gain * ResPath(self.out // 4, self.out,
                                          name='res_path')(x)


class Encoder(nn.Module):
  """(N, H, W, 3) mapped pixels -> (N, H/8, W/8, vocab) logits."""
  hidden: int = 256
  groups: int = 4
  blocks_per_group: int = 2
  vocab_size: int = 8192

  @nn.compact
  def __call__(self, x):
    num_layers = self.groups * self.blocks_per_group
    x = _conv(self.hidden, 7, 'input')(x)
    for g in range(1, self.groups + 1):
      width = self.hidden * 2 ** (g - 1)
      for b in range(1, self.blocks_per_group + 1):
        x = EncoderBlock(width, num_layers, name=f'group_{g}_block_{b}')(x)
      if g < self.groups:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return _conv(self.vocab_size, 1, 'output')(nn.relu(x))


def token_ids(encoder: Encoder, params, images01: jax.Array) -> jax.Array:
  """(N, H, W, 3) pixels in [0, 1] -> (N, H/8 * W/8) int32 token ids, in
  row-major patch order (the CAE targets)."""
  logits = encoder.apply({'params': params}, map_pixels(images01))
  n = logits.shape[0]
  return jnp.argmax(logits, axis=-1).reshape(n, -1).astype(jnp.int32)

"""Pixel targets: per-patch normalisations and their inverses for figures.

  normalize_patches:        MAE norm-pix: per patch, over its p*p*C values,
                            (x - mean) / sqrt(var + eps), UNBIASED variance
                            (torch.var default), eps 1e-6.
  patch_channel_normalize:  BootMAE: per patch and channel, over its p*p
                            values, biased variance, eps 1e-5.

The inverses map a prediction back with the original patch's statistics, as
the official MAE demo draws norm-pix reconstructions (otherwise they "look
like noise").
"""

import jax.numpy as jnp
import numpy as np

from mim_jax.models import layers


def normalize_patches(target, eps: float = 1e-6):
  """MAE's norm_pix target (see module docstring), (..., p*p*C)."""
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return (target - mean) / jnp.sqrt(var + eps)


def denormalize_patches(pred, images, patch_size: int,
                        eps: float = 1e-6) -> np.ndarray:
  """Inverse of `normalize_patches` with the statistics of `images`'
  patches, in float64 numpy: (N, L, p*p*C)."""
  target = layers.patchify(np.asarray(images, np.float64), patch_size)
  mean = target.mean(-1, keepdims=True)
  var = target.var(-1, keepdims=True, ddof=1)
  return np.asarray(pred, np.float64) * np.sqrt(var + eps) + mean


def to_input_space(pred, images, patch_size: int, norm_pix: bool,
                   eps: float = 1e-6) -> np.ndarray:
  """Predictions of pixel patches (plain, or norm-pix when `norm_pix`) in
  the input's normalised pixel space, float64: a method's `to_pixels`."""
  if not norm_pix:
    return np.asarray(pred, np.float64)
  return denormalize_patches(pred, images, patch_size, eps)


def patch_channel_normalize(images, patch_size: int, eps: float = 1e-5):
  """(N, H, W, C) -> (N, L, p*p*C) patches normalised per patch and per
  channel (mean over the p*p pixels, biased variance), with the (N, L, C)
  means and stds."""
  n, _, _, c = images.shape
  x = layers.patchify(images.astype(jnp.float32), patch_size)
  x = x.reshape(n, x.shape[1], -1, c)
  mean = x.mean(axis=2, keepdims=True)
  std = jnp.sqrt(((x - mean) ** 2).mean(axis=2, keepdims=True) + eps)
  return ((x - mean) / std).reshape(n, x.shape[1], -1), mean[:, :, 0], std[
      :, :, 0]


def patch_channel_denormalize(pred, images, patch_size: int) -> np.ndarray:
  """Inverse of `patch_channel_normalize` with `images`' statistics."""
  pred = np.asarray(pred, np.float64)
  n, c = pred.shape[0], images.shape[-1]
  _, mean, std = patch_channel_normalize(images, patch_size)
  per_channel = pred.reshape(n, pred.shape[1], -1, c)
  return (per_channel * np.asarray(std, np.float64)[:, :, None] +
          np.asarray(mean, np.float64)[:, :, None]).reshape(pred.shape)

"""Reconstruction figures in un-normalised pixels, also for norm-pix targets.

Reconstructions of norm-pix models look like noise when the per-patch
normalised prediction is shown as is. Here the prediction is mapped back with
each patch's own mean and std (from the original image, as the MAE demo
does) and then un-normalised with the dataset mean/std.
"""

import io
from typing import Sequence

import numpy as np
from PIL import Image

from mim_jax import weights
from mim_jax.losses import bootmae as bootmae_loss
from mim_jax.models import layers


def pred_to_pixels(pred, images, patch_size: int, norm_pix,
                   eps: float = 1e-6):
  """Maps predictions (N, L, p*p*C) back into the input's normalised space.

  norm_pix: False/None (plain pixels), True or 'patch' (MAE: stats over
  each patch, unbiased variance + 1e-6) or 'patch_channel' (BootMAE: stats
  per patch and channel, biased variance + 1e-5).
  """
  pred = np.asarray(pred, np.float64)
  n, h, w, c = images.shape
  if norm_pix == 'patch_channel':
    # The statistics of BootMAE's own target (one definition, in its loss).
    _, mean, std = bootmae_loss.patch_channel_normalize(images, patch_size)
    per_channel = pred.reshape(n, pred.shape[1], -1, c)
    pred = (per_channel * np.asarray(std, np.float64)[:, :, None] +
            np.asarray(mean, np.float64)[:, :, None]).reshape(pred.shape)
  elif norm_pix:
    target = layers.patchify(np.asarray(images, np.float64), patch_size)
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    pred = pred * np.sqrt(var + eps) + mean
  return layers.unpatchify(pred, patch_size, (h // patch_size, w // patch_size),
                          c)


def reconstruction_grid(images, pred, mask, *, patch_size: int,
                        mean: Sequence[float], std: Sequence[float],
                        norm_pix: bool, min_side: int = 128) -> np.ndarray:
  """uint8 grid: one row per image, columns original | masked |
  reconstruction | reconstruction with the visible patches pasted in.

  Args:
    images: (N, H, W, C) normalised input images.
    pred: (N, L, p*p*C) model predictions (target space).
    mask: (N, L), 1 = masked.
    patch_size: patch size p.
    mean, std: the input normalisation (per channel, [0, 1] units).
    norm_pix: the target normalisation of `pred` (see `pred_to_pixels`).
    min_side: small images are upscaled (nearest) to at least this side.
  """
  images = np.asarray(images, np.float64)
  n, h, w, c = images.shape
  p = patch_size
  recon = pred_to_pixels(pred, images, p, norm_pix)
  m = layers.unpatchify(
      np.repeat(np.asarray(mask, np.float64)[..., None], p * p * c, -1),
      p, (h // p, w // p), c)
  mean = np.asarray(mean).reshape(1, 1, 1, -1)
  std = np.asarray(std).reshape(1, 1, 1, -1)
  to01 = lambda x: np.clip(x * std + mean, 0.0, 1.0)
  orig = to01(images)
  masked = orig * (1 - m) + 0.5 * m
  rec = to01(recon)
  pasted = orig * (1 - m) + rec * m
  cols = [orig, masked, rec, pasted]
  scale = max(1, -(-min_side // h))
  gap = 2
  tile_h, tile_w = h * scale, w * scale
  grid = np.ones((n * (tile_h + gap) - gap, len(cols) * (tile_w + gap) - gap,
                  c))
  for i in range(n):
    for j, col in enumerate(cols):
      tile = np.kron(col[i], np.ones((scale, scale, 1)))
      grid[i * (tile_h + gap):i * (tile_h + gap) + tile_h,
           j * (tile_w + gap):j * (tile_w + gap) + tile_w] = tile
  return (grid * 255 + 0.5).astype(np.uint8)


def save_png(grid: np.ndarray, path: str):
  """Writes a uint8 HWC array as PNG (local or gs:// paths)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(grid).save(buf, format='PNG')
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(buf.getvalue())


def render(config, forward, params, batch) -> np.ndarray | None:
  """Runs `forward(params, batch) -> (pred, out)` and draws the grid with the
  config's patch size, normalisation and target type (None when the model
  predicts no pixels, e.g. token targets)."""
  pred, out = forward(params, batch)
  # Methods that predict only the masked patches (CAE) put them on the full
  # grid in out['pred_patches']; token-target models have no pixels to show.
  pixels = np.asarray(out.get('pred_patches', pred))
  p = weights.patch_size_of(config)
  if pixels.shape[1] != out['mask'].shape[1] or (
      pixels.shape[-1] != p * p * batch['image'].shape[-1]):
    return None
  return reconstruction_grid(
      batch['image'], pixels, np.asarray(out['mask']),
      patch_size=weights.patch_size_of(config), mean=config.input.mean,
      std=config.input.std,
      norm_pix=target_norm(config))


def target_norm(config):
  """How the config's pixel targets are normalised: the loss module's
  `PIXEL_NORM` if it has one (BootMAE), else MAE's norm-pix switch."""
  import importlib  # pylint: disable=g-import-not-at-top
  mod = importlib.import_module(f'mim_jax.losses.{config.loss_name}')
  fixed = getattr(mod, 'PIXEL_NORM', None)
  if fixed is not None:
    return fixed
  return bool(config.get('loss', {}).get('norm_pix_loss', False))

"""Reconstruction figures in un-normalised pixels, also for norm-pix targets.

Reconstructions of norm-pix models look like noise when the per-patch
normalised prediction is shown as is. The method's `to_pixels` maps the
prediction back into the input's normalised space (with each patch's own
mean and std, as the MAE demo does); here it is un-normalised with the
dataset mean/std and drawn.
"""

import io
from typing import Sequence

import numpy as np
from PIL import Image

from mim_jax.models import layers
from mim_jax.models import vit


def reconstruction_grid(images, pixels, mask, *, patch_size: int,
                        mean: Sequence[float], std: Sequence[float],
                        min_side: int = 128) -> np.ndarray:
  """uint8 grid: one row per image, columns original | masked |
  reconstruction | reconstruction with the visible patches pasted in.

  Args:
    images: (N, H, W, C) normalised input images.
    pixels: (N, L, p*p*C) predictions in the input's normalised space
      (`Method.to_pixels`).
    mask: (N, L), 1 = masked.
    patch_size: patch size p.
    mean, std: the input normalisation (per channel, [0, 1] units).
    min_side: small images are upscaled (nearest) to at least this side.
  """
  images = np.asarray(images, np.float64)
  n, h, w, c = images.shape
  p = patch_size
  recon = layers.unpatchify(np.asarray(pixels, np.float64), p,
                            (h // p, w // p), c)
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


def render(method, config, forward, params, batch) -> np.ndarray | None:
  """Runs `forward(params, batch) -> (pred, out, model_batch)`
  (`steps.make_forward`: `model_batch` holds the normalised images the
  model saw) and draws the grid of `method.to_pixels` (None when the config
  predicts no pixels, e.g. token targets)."""
  if method.to_pixels is None:
    return None
  pred, out, batch = forward(params, batch)
  batch = {k: np.asarray(v) for k, v in batch.items()}
  pixels = method.to_pixels(config, pred, out, batch)
  if pixels is None:
    return None
  p = vit.patch_size_of(config.model)
  want = (*np.shape(out['mask']), p * p * batch['image'].shape[-1])
  if np.shape(pixels) != want:
    raise ValueError(f'{method.name}.to_pixels gave {np.shape(pixels)}; '
                     f'figures need {want} (N, L, p*p*C).')
  return reconstruction_grid(
      batch['image'], pixels, np.asarray(out['mask']), patch_size=p,
      mean=config.input.mean, std=config.input.std)

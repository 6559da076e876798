"""Pixel targets: per-patch normalisations and their inverses for figures.

  normalize_patches:        MAE norm-pix: per patch, over its p*p*C values,
                            (x - mean) / sqrt(var + eps), UNBIASED variance
                            (torch.var default), eps 1e-6.
  patch_channel_normalize:  BootMAE: per patch and channel, over its p*p
                            values, biased variance, eps 1e-5.
  population_moments:       robust MAE: statistics over every patch of a
                            batch (per channel or per pixel position), the
                            "population statistics" applied before the
                            per-patch normalisation (see `population`).

The inverses map a prediction back with the original patch's statistics, as
the official MAE demo draws norm-pix reconstructions (otherwise they "look
like noise").
"""

import jax.numpy as jnp
import numpy as np

from mim_jax import errors
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
                   eps: float = 1e-6, population=None) -> np.ndarray:
  """Predictions of pixel patches (plain, or norm-pix when `norm_pix`) in
  the input's normalised pixel space, float64: a method's `to_pixels`.

  `population`: (mean, std) broadcastable to (N, L, p*p*C), when the
  targets were (x - mean) / std before the per-patch normalisation.
  """
  pred = np.asarray(pred, np.float64)
  if population is None:
    return denormalize_patches(pred, images, patch_size,
                               eps) if norm_pix else pred
  mean, std = (np.asarray(a, np.float64) for a in population)
  if norm_pix:
    patches = (layers.patchify(np.asarray(images, np.float64), patch_size) -
               mean) / std
    pred = (pred * np.sqrt(patches.var(-1, keepdims=True, ddof=1) + eps) +
            patches.mean(-1, keepdims=True))
  return pred * std + mean


POPULATION_MODES = ('none', 'fixed', 'batch', 'running')
POPULATION_AXES = ('channel', 'pixel')


def population_moments(patches, axis: str, channels: int = 3):
  """Mean and BIASED variance over every patch of a batch, (P,) each for
  patches (..., P), P = p*p*C in patchify order (row, col, channel):

    axis='channel': mu_c = mean of x[..., j] over all leading axes and all
      positions j of channel c; var_c = mean of (x - mu_c)^2 over the same;
      both repeated to the P positions of that channel.
    axis='pixel': mu_j, var_j over the leading axes only, per position j.

  Inside jit with a batch sharded over devices, the means are global (XLA
  reduces across the devices), so they do not depend on the mesh.
  """
  if axis not in POPULATION_AXES:
    raise ValueError(f'population axis {axis!r}: use one of '
                     f'{POPULATION_AXES}.')
  x = patches.astype(jnp.float32)
  dim = x.shape[-1]
  if axis == 'pixel':
    flat = x.reshape(-1, dim)
    mean = flat.mean(0)
    return mean, ((flat - mean) ** 2).mean(0)
  per_c = x.reshape(-1, channels)
  mean = per_c.mean(0)
  var = ((per_c - mean) ** 2).mean(0)
  reps = dim // channels
  return jnp.tile(mean, reps), jnp.tile(var, reps)


def expand_channels(values, dim: int, channels: int = 3):
  """Per-channel values (C,) -> (P,) in patchify order, or (P,) as is.

  Raises:
    errors.ConfigError: another number of values (config.loss.pop_mean /
      pop_std).
  """
  values = jnp.asarray(values, jnp.float32)
  if values.shape == (channels,):
    return jnp.tile(values, dim // channels)
  if values.shape != (dim,):
    raise errors.ConfigError(
        f'population statistics of shape {values.shape} (config.loss.'
        f'pop_mean / pop_std): give {channels} (per channel) or {dim} (per '
        'pixel position) values.')
  return values


def running_fold(state: dict, patches, axis: str, momentum: float,
                 channels: int = 3) -> dict:
  """One EMA update of running population statistics with a batch:

    count_t = count_{t-1} + 1
    m_t = momentum * m_{t-1} + (1 - momentum) * mu_t      (m_0 = 0)
    v_t = momentum * v_{t-1} + (1 - momentum) * var_t     (v_0 = 0)

  with mu_t, var_t the batch's `population_moments` (biased variance).
  `running_stats` debiases them (as Adam's moments).
  """
  mean, var = population_moments(patches, axis, channels)
  return {'mean': momentum * state['mean'] + (1 - momentum) * mean,
          'var': momentum * state['var'] + (1 - momentum) * var,
          'count': state['count'] + 1}


def running_stats(state: dict, momentum: float):
  """Debiased (mean, var) of `running_fold`'s state: m_t / (1 -
  momentum^t), v_t / (1 - momentum^t); after one batch, that batch's own
  moments."""
  weight = 1.0 - jnp.power(jnp.float32(momentum), state['count'])
  weight = jnp.maximum(weight, jnp.finfo(jnp.float32).tiny)
  return state['mean'] / weight, state['var'] / weight


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

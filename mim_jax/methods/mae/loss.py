"""MAE loss: per-patch MSE averaged over the masked (removed) patches.

Targets, in order (each optional):
1. population statistics (robust MAE; methods.md 1.3, our reading): every
   target patch x (p*p*C values, in the input's normalised space) becomes
   (x - mu) / sigma, with (mu, sigma) of `population` below, per channel or
   per pixel position within the patch (`pop_axis`);
2. MAE's per-patch normalisation (`norm_pix_loss`).
"""

import jax.numpy as jnp

from mim_jax.targets import pixels


def population(target, out, *, mode: str, axis: str, mean, std,
               eps: float, channels: int = 3):
  """(mu, sigma), each (P,) with P = p*p*C, of the population-statistics
  target normalisation, for target patches (N, L, P):

    mode='fixed':   mu, sigma from the config (`pop_mean`, `pop_std`: C
                    values per channel, or P per pixel position), in the
                    input's normalised space; no epsilon.
    mode='batch':   mu, var = `pixels.population_moments` of this batch
                    (every patch of every image; biased variance; global
                    over the devices), sigma = sqrt(var + eps).
    mode='running': debiased EMA of the batches' mu and var
                    (`pixels.running_fold` / `running_stats`, this batch
                    included), sigma = sqrt(var + eps): out['pop_mean'] /
                    out['pop_std'], from the 'population' target provider.
  """
  dim = target.shape[-1]
  if mode == 'fixed':
    return (pixels.expand_channels(mean, dim, channels),
            pixels.expand_channels(std, dim, channels))
  if mode == 'batch':
    mu, var = pixels.population_moments(target, axis, channels)
    return mu, jnp.sqrt(var + eps)
  if mode == 'running':
    return out['pop_mean'], out['pop_std']
  raise ValueError(f'loss.pop_norm={mode!r}: use one of '
                   f'{pixels.POPULATION_MODES}.')


def loss_fn(pred, out, batch, *, step, schedule, norm_pix_loss: bool = False,
            norm_pix_eps: float = 1e-6, pop_norm: str = 'none',
            pop_axis: str = 'channel', pop_mean=(0.0, 0.0, 0.0),
            pop_std=(1.0, 1.0, 1.0), pop_momentum: float = 0.99,
            pop_eps: float = 1e-6, inserted_in_loss: bool = True):
  """Returns (loss, aux).

  Args:
    pred: (N, L, p*p*C) decoder predictions.
    out: the model's out dict, with 'target' (patchified input) and 'mask'
      (1 = masked); with encoder mask tokens 'inserted' (1 = inserted); with
      pop_norm='running' the provider's 'pop_mean' / 'pop_std'.
    batch: unused.
    step: unused (the contract's signature).
    schedule: unused.
    norm_pix_loss: regress per-patch normalised pixels (the released MAE
      checkpoints use it; `targets.pixels.normalize_patches`).
    norm_pix_eps: epsilon of the per-patch normalisation.
    pop_norm: population statistics before the per-patch normalisation:
      'none' (official MAE), 'fixed', 'batch' or 'running' (`population`).
    pop_axis: 'channel' or 'pixel' (position within the patch).
    pop_mean: 'fixed' only.
    pop_std: 'fixed' only.
    pop_momentum: 'running' only (read by the target provider).
    pop_eps: 'batch' and 'running'.
    inserted_in_loss: whether patches that got an encoder mask token count
      in the loss (they are masked patches either way).

  Returns:
    loss (scalar float32) and aux: {'target': the regression target,
    'loss_per_patch': (N, L)}.
  """
  del batch, step, schedule, pop_momentum
  target = out['target'].astype(jnp.float32)
  if pop_norm != 'none':
    mu, sigma = population(target, out, mode=pop_norm, axis=pop_axis,
                           mean=pop_mean, std=pop_std, eps=pop_eps)
    target = (target - mu) / sigma
  if norm_pix_loss:
    target = pixels.normalize_patches(target, norm_pix_eps)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  mask = out['mask'].astype(jnp.float32)
  if 'inserted' in out and not inserted_in_loss:
    mask = mask * (1.0 - out['inserted'])
  loss = jnp.sum(per_patch * mask) / jnp.sum(mask)
  return loss, {'target': target, 'loss_per_patch': per_patch}

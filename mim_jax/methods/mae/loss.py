"""MAE loss: per-patch MSE averaged over the masked (removed) patches."""

import jax.numpy as jnp

from mim_jax.targets import pixels


def loss_fn(pred, out, batch, *, step, schedule, norm_pix_loss: bool = False,
            norm_pix_eps: float = 1e-6):
  """Returns (loss, aux).

  Args:
    pred: (N, L, p*p*C) decoder predictions.
    out: the model's out dict, with 'target' (patchified input) and 'mask'
      (1 = masked).
    batch: unused.
    step: unused (the contract's signature).
    schedule: unused.
    norm_pix_loss: regress per-patch normalised pixels (the released MAE
      checkpoints use it; `targets.pixels.normalize_patches`).
    norm_pix_eps: epsilon of the per-patch normalisation.

  Returns:
    loss (scalar float32) and aux: {'target': the regression target,
    'loss_per_patch': (N, L)}.
  """
  del batch, step, schedule
  target = out['target'].astype(jnp.float32)
  if norm_pix_loss:
    target = pixels.normalize_patches(target, norm_pix_eps)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  mask = out['mask'].astype(jnp.float32)
  loss = jnp.sum(per_patch * mask) / jnp.sum(mask)
  return loss, {'target': target, 'loss_per_patch': per_patch}

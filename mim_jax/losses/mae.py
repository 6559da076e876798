"""MAE loss: per-patch MSE averaged over the masked (removed) patches."""

import jax.numpy as jnp


def normalize_patches(target, eps: float = 1e-6):
  """MAE's norm_pix target: per patch, (x - mean) / sqrt(var + eps) with the
  UNBIASED variance (torch.var default), exactly as the official code."""
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return (target - mean) / jnp.sqrt(var + eps)


def loss_fn(pred, out, batch=None, *, norm_pix_loss: bool = False,
            norm_pix_eps: float = 1e-6):
  """Returns (loss, aux).

  Args:
    pred: (N, L, p*p*C) decoder predictions.
    out: the model's out dict, with 'target' (patchified input) and 'mask'
      (1 = masked).
    batch: unused (kept for the common loss signature).
    norm_pix_loss: regress per-patch normalised pixels (the released MAE
      checkpoints use it).
    norm_pix_eps: epsilon of the per-patch normalisation.

  Returns:
    loss (scalar float32) and aux: {'target': the regression target,
    'loss_per_patch': (N, L)}.
  """
  del batch
  target = out['target'].astype(jnp.float32)
  if norm_pix_loss:
    target = normalize_patches(target, norm_pix_eps)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  mask = out['mask'].astype(jnp.float32)
  loss = jnp.sum(per_patch * mask) / jnp.sum(mask)
  return loss, {'target': target, 'loss_per_patch': per_patch}

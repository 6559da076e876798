"""BootMAE loss: weighted pixel loss + feature_weight x weighted feature loss.

  R = mean(w * (pred - target)^2) / mean(mask), over every pixel; target =
      the image normalised per patch AND per channel (biased var + 1e-5);
  P = mean(w * (LN(teacher) - LN(pred_feature))^2) / mean(mask), over
      every patch and channel; LN without affine, eps 1e-6;
  w = mask * (1 + AvgPool3x3(mask)) on the patch grid (count_include_pad:
      / 9), 0 on visible patches ("--weight_mask"), or the plain mask.

The feature weight ramps linearly over the first `feature_ramp_fraction` of
training, per epoch as upstream: fw(step) = feature_weight *
min(1, (epoch + 1) * steps_per_epoch / (fraction * total_steps)).
"""

import jax
import jax.numpy as jnp

from mim_jax.targets import pixels


def weight_mask(mask: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
  """(N, L) binary mask -> mask * (1 + 3x3 average of the mask)."""
  n = mask.shape[0]
  m = mask.reshape(n, *grid_hw).astype(jnp.float32)
  summed = jax.lax.reduce_window(m, 0.0, jax.lax.add, (1, 3, 3), (1, 1, 1),
                                 ((0, 0), (1, 1), (1, 1)))
  return (m * (1.0 + summed / 9.0)).reshape(n, -1)


def _layer_norm(x, eps: float = 1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps)


def feature_weight_at(step, *, feature_weight: float,
                      feature_ramp_fraction: float, total_steps,
                      steps_per_epoch: int):
  """The ramped feature weight at `step` (a traced int is fine).

  Raises:
    ValueError: a ramp without a training length.
  """
  if not feature_ramp_fraction:
    return jnp.float32(feature_weight)
  if not total_steps:
    raise ValueError('the BootMAE feature-weight ramp needs the training '
                     'length: set config.total_steps or total_epochs, or '
                     'loss.feature_ramp_fraction=0.')
  spe = max(int(steps_per_epoch), 1)
  ramp = feature_ramp_fraction * total_steps
  epoch = jnp.asarray(step) // spe
  return feature_weight * jnp.minimum(1.0, (epoch + 1) * spe / ramp)


def loss_fn(pred, out, batch, *, step, schedule,
            feature_weight: float = 1.0, feature_ramp_fraction: float = 0.25,
            weighted_mask: bool = True):
  """Returns (loss, aux).

  Args:
    pred: (N, L, p*p*C) predicted pixels of every patch.
    out: the model's out dict ('mask', 'pred_feature').
    batch: 'image' and 'feature_target' (N, L, D), the momentum encoder's
      features (added by the train step, see model.ema_targets).
    step: the optimiser step (a traced int).
    schedule: `mim_jax.method.Schedule`: the ramp spans a fraction of
      `total_steps` and moves once per epoch (`steps_per_epoch`), as
      upstream.
    feature_weight: weight of the feature loss after the ramp.
    feature_ramp_fraction: fraction of training over which the weight ramps
      up linearly (0: constant).
    weighted_mask: upstream's --weight_mask (on in every script).

  Returns:
    loss and aux: loss_pixel, loss_feature (unweighted), feature_weight,
    and the targets (pixel_target, patch_mean, patch_std,
    feature_target_ln, pred_feature_ln).
  """
  if 'feature_target' not in batch:
    raise ValueError('BootMAE needs batch["feature_target"] from the '
                     'momentum encoder (TrainState.ema_params).')
  mask = out['mask'].astype(jnp.float32)
  _, h, w_px, c = batch['image'].shape
  p = int(round((pred.shape[-1] // c) ** 0.5))
  w = weight_mask(mask, (h // p, w_px // p)) if weighted_mask else mask
  mask_mean = mask.mean()
  target, mean, std = pixels.patch_channel_normalize(batch['image'], p)
  loss_pixel = jnp.mean(w[..., None] * (pred - target) ** 2) / mask_mean
  teacher = _layer_norm(jax.lax.stop_gradient(batch['feature_target']))
  student = _layer_norm(out['pred_feature'])
  loss_feature = jnp.mean(w[..., None] * (teacher - student) ** 2) / mask_mean
  fw = feature_weight_at(
      step, feature_weight=feature_weight,
      feature_ramp_fraction=feature_ramp_fraction,
      total_steps=schedule.total_steps,
      steps_per_epoch=schedule.steps_per_epoch)
  return loss_pixel + fw * loss_feature, dict(
      loss_pixel=loss_pixel, loss_feature=loss_feature,
      feature_weight=jnp.float32(fw), pixel_target=target, patch_mean=mean,
      patch_std=std, feature_target_ln=teacher, pred_feature_ln=student)

"""Classification losses and evaluation metrics (fine-tuning and probes)."""

import jax
import jax.numpy as jnp

from mim_jax import mixup


def loss_fn(pred, out, batch, *, step, schedule, label_smoothing=0.0):
  """Soft-target cross-entropy, as timm's SoftTargetCrossEntropy.

  The targets are the batch's mixed soft labels ('targets', made by the
  mixup/cutmix batch transform, smoothing included) when present, else the
  one-hot labels smoothed by `label_smoothing` (timm's
  LabelSmoothingCrossEntropy gives the same value).

  Args:
    pred: (B, K) logits.
    out: the model's out dict (unused).
    batch: 'label' (B,) int and optionally 'targets' (B, K).
    step: unused.
    schedule: unused.
    label_smoothing: used only without 'targets'.

  Returns:
    (mean loss, aux with the training top-1 accuracy against 'label').
  """
  del out, step, schedule
  num_classes = pred.shape[-1]
  targets = batch.get('targets')
  if targets is None:
    targets = mixup.smooth_one_hot(batch['label'], num_classes,
                                   label_smoothing)
  loss = jnp.mean(mixup.soft_cross_entropy(pred, targets))
  top1 = jnp.mean((jnp.argmax(pred, -1) == batch['label']).astype(
      jnp.float32))
  return loss, {'top1': top1}


def eval_metrics(pred, out, batch) -> dict:
  """Per-example top-1 / top-5 correctness and cross-entropy (no
  smoothing), for `LabelledTask.eval_metrics`."""
  del out
  logits = pred.astype(jnp.float32)
  label = batch['label']
  k = min(5, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hit = top == label[:, None]
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), label[:, None],
                            axis=-1)[:, 0]
  return {'top1': hit[:, 0].astype(jnp.float32),
          'top5': jnp.any(hit, -1).astype(jnp.float32),
          'loss': ce}

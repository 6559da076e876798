"""CAE loss: token cross-entropy (or pixel MSE) on the masked patches plus
lambda x MSE between the regressor's latents and the stop-gradient target."""

import jax
import jax.numpy as jnp

from mim_jax.targets import pixels


def loss_fn(pred, out, batch, *, step, schedule, align_weight: float = 2.0,
            norm_pix_loss: bool = True, norm_pix_eps: float = 1e-6):
  """Returns (loss, aux).

  Args:
    pred: (N, M, vocab) token logits, or (N, M, p*p*C) pixels when the model
      was built with target='pixels' (then `out` has 'target').
    out: the model's out dict ('ids_masked', 'latent_predict',
      'latent_target', ...).
    batch: holds 'token_ids' (N, L) int for token targets (from the
      tokenizer provider, or given by a fixture).
    step: unused (the contract's signature).
    schedule: unused.
    align_weight: lambda of the alignment MSE (2 in every official recipe).
    norm_pix_loss: pixel targets normalised per patch (as MAE's norm-pix).
    norm_pix_eps: epsilon of the per-patch normalisation (pixel targets).

  Returns:
    loss and aux: loss_main, loss_align (weighted),
    loss_align_unweighted_mse, and mlm_acc for token targets.
  """
  del step, schedule
  ids = out['ids_masked']
  if 'target' in out:   # normalised pixels of the masked patches
    target = jnp.take_along_axis(out['target'], ids[..., None], axis=1)
    if norm_pix_loss:
      target = pixels.normalize_patches(target, norm_pix_eps)
    main = jnp.mean((pred - target) ** 2)
    aux = {}
  else:
    if 'token_ids' not in batch:
      raise ValueError('CAE token targets need batch["token_ids"] (N, L) '
                       'from a tokenizer (config.tokenizer); set '
                       'model.target="pixels" to train without one.')
    labels = jnp.take_along_axis(batch['token_ids'].astype(jnp.int32), ids,
                                 axis=1)
    logp = jax.nn.log_softmax(pred.astype(jnp.float32), axis=-1)
    main = -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))
    aux = {'mlm_acc': jnp.mean(
        (jnp.argmax(pred, axis=-1) == labels).astype(jnp.float32))}
  mse = jnp.mean((out['latent_predict'] -
                  jax.lax.stop_gradient(out['latent_target'])) ** 2)
  aux.update(loss_main=main, loss_align=align_weight * mse,
             loss_align_unweighted_mse=mse)
  return main + align_weight * mse, aux

"""Parity adapter for CAE fixtures (Atten4Vis/CAE `modeling_cae.py`, v1).

config.json carries `constructor_kwargs`, the training `recipe` and the
official weight-decay groups; train_curve.json has per-step records.
"""

import ml_collections
import numpy as np

from mim_jax import masking
from mim_jax import method
from mim_jax import optim
from mim_jax.methods.cae import config as cae_config


def experiment_config(fc: dict) -> ml_collections.ConfigDict:
  a, r = fc['constructor_kwargs'], fc.get('recipe', {})
  num_masked = fc['derived']['num_masked']
  num_patches = fc['derived']['num_patches']
  return ml_collections.ConfigDict(dict(
      seed=0,
      model_name='cae',
      model=dict(
          encoder=dict(width=a['embed_dim'], depth=a['depth'],
                       num_heads=a['num_heads'], patch_size=a['patch_size'],
                       mlp_dim=int(a['embed_dim'] * a['mlp_ratio']),
                       layer_scale=a['init_values'],
                       layernorm_eps=r.get('ln_eps', 1e-6)),
          decoder_width=a['decoder_embed_dim'],
          decoder_num_heads=a['decoder_num_heads'],
          regressor_depth=a['regressor_depth'],
          decoder_depth=a['decoder_depth'],
          decoder_layer_scale=a['decoder_layer_scale_init_value'],
          vocab_size=a['decoder_num_classes'],
          in_chans=a.get('in_chans', 3)),
      # The fixtures give the token ids: no tokenizer.
      loss=dict(align_weight=r.get('align_loss_weight', 2.0)),
      # The fixtures give the masks too; the ratio gives their count.
      input=dict(image_size=a['img_size'],
                 mask=dict(kind='block', variant='cae',
                           ratio=masking.ratio_for(num_masked,
                                                   num_patches))),
  ))


def frozen_keys(fc: dict) -> tuple[str, ...]:
  return tuple(fc['params_without_grad'])


def _batch(imgs, mask, token_ids):
  return {'image': np.asarray(imgs, np.float32).transpose(0, 2, 3, 1),
          'mask': np.asarray(mask, np.float32),
          'token_ids': np.asarray(token_ids, np.int32)}


def batch_from_inputs(inputs: dict, fc: dict) -> dict:
  del fc
  return _batch(inputs['imgs'], inputs['bool_masked_pos'],
                inputs['token_ids'])


def curve_batches(arrays: dict, fc: dict) -> list[dict]:
  del fc
  return [_batch(*a) for a in zip(arrays['imgs'], arrays['bool_masked_pos'],
                                  arrays['token_ids'])]


def curve_reference(fx: dict):
  steps = fx['curve']['per_step']
  return [s['loss'] for s in steps], [s['lr'] for s in steps]


def reference_decay(fx: dict) -> list[str]:
  return fx['config']['optimizer']['decay_params']


def tx_config(fc: dict, curve: dict, batch_size: int) -> dict:
  """The recipe: AdamW, BEiT linspace warmup + cosine, torch-style clip."""
  r, o = fc['recipe'], fc['optimizer']
  return dict(
      lr=r['lr'], total_steps=curve['steps'], warmup_steps=r['warmup_steps'],
      schedule=dict(min_lr=r.get('min_lr', 0.0), warmup='linspace'),
      optim=dict(name='adamw', b1=o['betas'][0], b2=o['betas'][1],
                 eps=o['eps'], weight_decay=o['weight_decay'],
                 wd_exclude=optim.NO_DECAY + cae_config.NO_DECAY,
                 grad_clip_norm=r.get('clip_grad'),
                 mu_dtype=None),
      input=dict(batch_size=batch_size))


def forward_outputs(loss, pred, out, aux) -> dict:
  return dict(loss=loss, loss_main=aux['loss_main'],
              loss_align=aux['loss_align'],
              loss_align_unweighted_mse=aux['loss_align_unweighted_mse'],
              mlm_acc=aux['mlm_acc'],
              logits=np.asarray(pred).reshape(-1, pred.shape[-1]),
              latent_predict=out['latent_predict'],
              latent_target=out['latent_target'],
              encoder_out=out['encoder_out'],
              alignment_encoder_out=out['alignment_encoder_out'])


def zero_gradient_slices(state_dict: dict, fc: dict) -> dict:
  """Key-side LayerNorm biases of the regressor shift every attention logit
  of a query by the same amount: softmax removes it, the gradient is 0."""
  del fc
  return {k: [np.s_[:]] for k in state_dict if k.endswith('norm1_k.bias')}


ADAPTER = method.ParityAdapter(
    experiment_config=experiment_config, batch_from_inputs=batch_from_inputs,
    curve_batches=curve_batches, forward_outputs=forward_outputs,
    frozen_keys=frozen_keys, zero_gradient_slices=zero_gradient_slices,
    tx_config=tx_config, curve_reference=curve_reference,
    reference_decay=reference_decay)

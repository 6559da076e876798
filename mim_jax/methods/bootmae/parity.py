"""Parity adapter for BootMAE fixtures (LightDXY/BootMAE
`run_pretraining.train_one_epoch`).

config.json: `constructor`, `feature_predictor_depth`, `masking`, `train`
(optimiser, schedule, momentum) and `conventions`; train_curve.json holds
per-step lr, momentum, feature weight and losses.
"""

import ml_collections
import numpy as np

from mim_jax import masking
from mim_jax import method
from mim_jax import optim
from mim_jax.methods.bootmae import convert as convert_bootmae
from mim_jax.models import layers


def experiment_config(fc: dict) -> ml_collections.ConfigDict:
  a, m, t = fc['constructor'], fc['masking'], fc['train']
  fw = t.get('feature_weight', 1.0)
  return ml_collections.ConfigDict(dict(
      seed=0,
      model_name='bootmae',
      model=dict(
          encoder=dict(width=a['embed_dim'], depth=a['depth'],
                       num_heads=a['num_heads'], patch_size=a['patch_size'],
                       mlp_dim=int(a['embed_dim'] * a['mlp_ratio']),
                       layernorm_eps=1e-6),
          decoder_width=a['decode_dim'], decoder_depth=a['decoder_depth'],
          feature_depth=fc.get('feature_predictor_depth',
                               a['decoder_depth']),
          taps=tuple(a['fea_list']),
          in_chans=a.get('in_chans', 3)),
      # The fixtures hold the feature weight constant (no ramp).
      loss=dict(feature_weight=fw, feature_ramp_fraction=0.0,
                weighted_mask=bool(m.get('weight_mask', True))),
      # The fixtures give the masks; the ratio gives their count.
      input=dict(image_size=a['img_size'],
                 mask=dict(kind='block', variant='bootmae',
                           ratio=masking.ratio_for(m['mask_len'],
                                                   m['num_patches']))),
  ))


def initial_ema(fx: dict, model, params):
  """The fixture's momentum encoder (`model_ema.*`)."""
  return convert_bootmae.ema_to_flax(fx['state_dict'], model, params,
                                     fx['config']['constructor']['img_size'])


def frozen_keys(fc: dict) -> tuple[str, ...]:
  del fc
  return ('pos_embed', 'de_pos_embed', 'model_ema.pos_embed')


def _batch(imgs, mask):
  return {'image': np.asarray(imgs, np.float32).transpose(0, 2, 3, 1),
          'mask': np.asarray(mask, np.float32)}


def batch_from_inputs(inputs: dict, fc: dict) -> dict:
  del fc
  return _batch(inputs['imgs'], inputs['mask'])


def curve_batches(arrays: dict, fc: dict) -> list[dict]:
  del fc
  return [_batch(*a) for a in zip(arrays['imgs'], arrays['mask'])]


def curve_reference(fx: dict):
  c = fx['curve']
  return c['loss'], c['lr']


def reference_decay(fx: dict) -> list[str]:
  return [k for g in fx['config']['train']['param_groups']
          if g['weight_decay'] > 0 for k in g['params']]


def tx_config(fc: dict, curve: dict, batch_size: int) -> dict:
  """AdamW (0.9, 0.95), BEiT linspace warmup + cosine, no clipping, no
  decay on cls; the EMA momentum of every step, as listed."""
  t = fc['train']
  return dict(
      lr=t['peak_lr'], total_steps=curve['steps'],
      warmup_steps=t['warmup_steps'],
      schedule=dict(min_lr=t.get('final_lr', 0.0), warmup='linspace'),
      optim=dict(name='adamw', b1=t['betas'][0], b2=t['betas'][1],
                 eps=t['eps'], weight_decay=t['weight_decay'],
                 wd_exclude=optim.NO_DECAY + ('cls_token',),
                 grad_clip_norm=t.get('grad_clip'), mu_dtype=None),
      ema=dict(momentum=list(curve['momentum']),
               boundary_steps=list(range(len(curve['momentum'])))),
      input=dict(batch_size=batch_size))


def _nchw(patches, image_hw, p, c):
  x = layers.unpatchify(np.asarray(patches), p,
                        (image_hw[0] // p, image_hw[1] // p), c)
  return x.transpose(0, 3, 1, 2)


def forward_outputs(loss, pred, out, aux) -> dict:
  c = aux['patch_mean'].shape[-1]
  p = int(round((pred.shape[-1] // c) ** 0.5))
  h = w = int(round(pred.shape[1] ** 0.5)) * p  # the fixtures are square
  return dict(
      loss=loss, loss_pixel=aux['loss_pixel'],
      loss_feature=aux['loss_feature'], feature_weight=aux['feature_weight'],
      pred_pixel=_nchw(pred, (h, w), p, c),
      pixel_target=_nchw(aux['pixel_target'], (h, w), p, c),
      patch_mean=aux['patch_mean'], patch_std=aux['patch_std'],
      pred_feature=out['pred_feature'], feat_target=out['feature_target'],
      feat_target_ln=aux['feature_target_ln'],
      pred_feature_ln=aux['pred_feature_ln'],
      enc_block0_sorted=out['taps'][0], enc_block_last_sorted=out['taps'][1],
      enc_latent_sorted=out['encoder_out'],
      pix_decoder_out=out['pix_decoder_out'],
      feat_decoder_out=out['feat_decoder_out'])


def zero_gradient_slices(state_dict: dict, fc: dict) -> dict:
  del state_dict, fc
  return {}


ADAPTER = method.ParityAdapter(
    experiment_config=experiment_config, batch_from_inputs=batch_from_inputs,
    curve_batches=curve_batches, forward_outputs=forward_outputs,
    frozen_keys=frozen_keys, zero_gradient_slices=zero_gradient_slices,
    tx_config=tx_config, curve_reference=curve_reference,
    reference_decay=reference_decay, initial_ema=initial_ema,
    # Loss terms of the curve, besides the loss.
    curve_terms=('loss_pixel', 'loss_feature'))

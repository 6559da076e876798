"""Parity adapter for MAE fixtures (facebookresearch/mae `models_mae.py`)."""

import ml_collections
import numpy as np

from mim_jax import method
from mim_jax import optim


def experiment_config(fc: dict) -> ml_collections.ConfigDict:
  """Our experiment config for the fixture's constructor arguments."""
  a = fc['constructor_args']
  eps = fc.get('layernorm_eps', 1e-6)
  return ml_collections.ConfigDict(dict(
      seed=0,
      model_name='mae',
      model=dict(
          encoder=dict(width=a['embed_dim'], depth=a['depth'],
                       num_heads=a['num_heads'], patch_size=a['patch_size'],
                       mlp_dim=int(a['embed_dim'] * a['mlp_ratio']),
                       layernorm_eps=eps),
          decoder_width=a['decoder_embed_dim'],
          decoder_depth=a['decoder_depth'],
          decoder_num_heads=a['decoder_num_heads'],
          decoder_mlp_dim=int(a['decoder_embed_dim'] * a['mlp_ratio']),
          in_chans=a.get('in_chans', 3)),
      loss=dict(norm_pix_loss=bool(a.get('norm_pix_loss', False))),
      input=dict(image_size=a['img_size'],
                 mask=dict(kind='random', ratio=fc['mask_ratio'])),
  ))


def frozen_keys(fc: dict) -> tuple[str, ...]:
  return tuple(fc.get('frozen_params', ('pos_embed', 'decoder_pos_embed')))


def _batch(imgs, noise):
  return {'image': np.asarray(imgs, np.float32).transpose(0, 2, 3, 1),
          'noise': np.asarray(noise, np.float32)}


def batch_from_inputs(inputs: dict, fc: dict) -> dict:
  del fc
  return _batch(inputs['imgs'], inputs['noise'])


def curve_batches(arrays: dict, fc: dict) -> list[dict]:
  del fc
  return [_batch(i, n) for i, n in zip(arrays['imgs_per_step'],
                                       arrays['noise_per_step'])]


def forward_outputs(loss, pred, out, aux) -> dict:
  return dict(loss=loss, pred=pred, mask=out['mask'],
              latent=out['latent'], ids_restore=out['ids_restore'],
              target=aux['target'])


def zero_gradient_slices(state_dict: dict, fc: dict) -> dict:
  """The key third of every fused qkv bias has a true gradient of zero."""
  del fc
  out = {}
  for k, v in state_dict.items():
    if k.endswith('attn.qkv.bias'):
      d = v.shape[0] // 3
      out[k] = [np.s_[d:2 * d]]
  return out


def tx_config(fc: dict, curve: dict, batch_size: int) -> dict:
  del fc
  return optim.tx_config_from_curve(curve, batch_size=batch_size)


ADAPTER = method.ParityAdapter(
    experiment_config=experiment_config, batch_from_inputs=batch_from_inputs,
    curve_batches=curve_batches, forward_outputs=forward_outputs,
    frozen_keys=frozen_keys, zero_gradient_slices=zero_gradient_slices,
    tx_config=tx_config,
    # Compared exactly rather than with a tolerance.
    exact_outputs=('mask', 'ids_restore'))

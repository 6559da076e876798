"""MAE (He et al. 2021) as one `Method` record.

Files: model.py (encoder on visible patches + light decoder), loss.py
(masked-patch MSE, norm-pix option), convert.py (official key names),
parity.py (fixture adapter), config.py (the recipe, every variant).
"""

import functools

from mim_jax import method
from mim_jax.methods.mae import convert
from mim_jax.methods.mae import loss
from mim_jax.methods.mae import model
from mim_jax.methods.mae import parity
from mim_jax.models import vit
from mim_jax.targets import pixels


def batch_spec(config, batch_size: int) -> dict:
  """Images and the masking noise (MAE masks by argsort(noise))."""
  return method.image_batch(config, batch_size,
                            vit.patch_size_of(config.model),
                            ('image', 'noise'))


def to_pixels(config, pred, out, batch):
  """Every patch's prediction; norm-pix targets are mapped back with each
  patch's own mean and std, as the official MAE demo does."""
  del out
  return pixels.to_input_space(
      pred, batch['image'], vit.patch_size_of(config.model),
      config.loss.get('norm_pix_loss', False),
      config.loss.get('norm_pix_eps', 1e-6))


def encoder(config) -> dict:
  """The encoder's vit.Encoder fields (params['encoder'])."""
  m = method.model_from_config(model.Model, config)
  return dict(m.encoder, scan=m.scan, dtype=m.dtype)


METHOD = method.Method(
    name='mae',
    build_model=functools.partial(method.model_from_config, model.Model),
    batch_spec=batch_spec,
    loss=loss.loss_fn,
    to_pixels=to_pixels,
    converter=method.Converter(to_flax=convert.to_flax,
                               to_torch=convert.to_torch,
                               to_torch_keys=convert.to_torch_keys,
                               encoder_prefix=''),
    parity=parity.ADAPTER,
    encoder=encoder)

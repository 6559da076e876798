"""BootMAE (Dong et al. 2022) as one `Method` record.

Files: model.py (encoder taps, pixel regressor and feature predictor with
feature injection; the momentum encoder's targets), loss.py (weighted
pixels + ramped features), convert.py (official keys incl. `model_ema.*`),
parity.py (fixture adapter), config.py (the recipe, every variant),
finetune.py (its encoder's classifier card: fine-tuning and probe recipes).
The momentum encoder is the method's 'ema' target provider: its weights are
`TrainState.ema_params`.
"""

import functools

from mim_jax import config_lib
from mim_jax import method
from mim_jax import optim
from mim_jax.methods.bootmae import convert
from mim_jax.methods.bootmae import finetune
from mim_jax.methods.bootmae import loss
from mim_jax.methods.bootmae import model
from mim_jax.methods.bootmae import parity
from mim_jax.models import vit
from mim_jax.targets import pixels


def build_model(config):
  """The model of `config.model`, masking `config_lib.mask_ratio(config)`
  (input.mask.ratio) of the patches."""
  return method.model_from_config(model.Model, config,
                                  mask_ratio=config_lib.mask_ratio(config))


def batch_spec(config, batch_size: int) -> dict:
  """Images and the (block + random) mask."""
  return method.image_batch(config, batch_size,
                            vit.patch_size_of(config.model),
                            ('image', 'mask'))


def targets(config) -> tuple:
  """The momentum encoder: `feature_target` from `ema_params`."""
  net = build_model(config)
  return (method.TargetProvider(
      name='momentum_encoder', kind='ema',
      compute=functools.partial(model.ema_targets, net),
      outputs=('feature_target',), init=model.init_ema),)


def validate_config(config) -> None:
  """Checks taps and the EMA schedule before anything is built.

  Raises:
    ValueError: taps outside the encoder, or a bad config.ema (e.g. a
      momentum outside [0, 1)).
  """
  build_model(config).tap_indices()
  optim.ema_momentum_schedule(config)


def to_pixels(config, pred, out, batch):
  """Every patch's prediction, mapped back with its patch's per-channel
  statistics (the target is normalised per patch and channel)."""
  del out
  return pixels.patch_channel_denormalize(pred, batch['image'],
                                          vit.patch_size_of(config.model))


def encoder(config) -> dict:
  """The encoder's vit.Encoder fields (params['encoder'])."""
  return build_model(config).encoder_fields()


def init_rules(config) -> tuple:
  return model.init_rules(build_model(config))


METHOD = method.Method(
    name='bootmae',
    build_model=build_model,
    batch_spec=batch_spec,
    loss=loss.loss_fn,
    to_pixels=to_pixels,
    converter=method.Converter(
        to_flax=convert.to_flax, to_torch=convert.to_torch,
        to_torch_keys=convert.to_torch_keys,
        ema_to_flax=convert.ema_to_flax,
        ema_to_torch=convert.ema_to_torch_keys),
    parity=parity.ADAPTER,
    targets=targets,
    validate_config=validate_config,
    classifier=finetune.CARD,
    encoder=encoder,
    init_rules=init_rules)

"""MAE (He et al. 2021) as one `Method` record.

Files: model.py (encoder on visible patches + light decoder), loss.py
(masked-patch MSE, norm-pix option), convert.py (official key names),
parity.py (fixture adapter), config.py (the recipe, every variant),
finetune.py (its encoder's classifier card: fine-tuning and probe recipes).
"""

import jax.numpy as jnp

from mim_jax import config_lib
from mim_jax import errors
from mim_jax import masking
from mim_jax import method
from mim_jax.methods.mae import convert
from mim_jax.methods.mae import finetune
from mim_jax.methods.mae import loss
from mim_jax.methods.mae import model
from mim_jax.methods.mae import parity
from mim_jax.models import layers
from mim_jax.models import vit
from mim_jax.targets import pixels


def batch_spec(config, batch_size: int) -> dict:
  """Images and the masking noise (MAE masks by argsort(noise))."""
  return method.image_batch(config, batch_size,
                            vit.patch_size_of(config.model),
                            ('image', 'noise'))


def build_model(config):
  """The model of `config.model`, masking `config_lib.mask_ratio(config)`
  (input.mask.ratio) of the patches."""
  return method.model_from_config(model.Model, config,
                                  mask_ratio=config_lib.mask_ratio(config))

_CHANNELS = 3


def _patch_dim(config) -> int:
  return vit.patch_size_of(config.model) ** 2 * _CHANNELS


def _population_options(config) -> dict:
  """The loss's population-statistics options, with their defaults."""
  keys = ('pop_norm', 'pop_axis', 'pop_mean', 'pop_std', 'pop_momentum',
          'pop_eps')
  defaults = dict(zip(keys, ('none', 'channel', (0.0,) * 3, (1.0,) * 3,
                             0.99, 1e-6)))
  return {k: config.loss.get(k, defaults[k]) for k in keys}


def targets(config) -> tuple:
  """pop_norm='running': the running population statistics of the pixel
  targets (`TrainState.target_state['population']`, replicated, about
  2 * p*p*3 floats), folded with each step's batch (`loss.population`)."""
  opts = _population_options(config)
  if opts['pop_norm'] != 'running':
    return ()
  p = vit.patch_size_of(config.model)
  dim, axis = _patch_dim(config), opts['pop_axis']
  momentum, eps = float(opts['pop_momentum']), float(opts['pop_eps'])

  def fold(state, batch):
    patches = layers.patchify(batch['image'].astype(jnp.float32), p)
    return pixels.running_fold(state, patches, axis, momentum, _CHANNELS)

  def compute(state, batch):
    mean, var = pixels.running_stats(fold(state, batch), momentum)
    return {'pop_mean': mean, 'pop_std': jnp.sqrt(var + eps)}

  def init(params):
    del params
    return {'mean': jnp.zeros((dim,), jnp.float32),
            'var': jnp.zeros((dim,), jnp.float32),
            'count': jnp.zeros((), jnp.float32)}

  return (method.TargetProvider(
      name='population', kind='running', compute=compute,
      outputs=('pop_mean', 'pop_std'), init=init,
      update=lambda state, batch, step: fold(state, batch)),)


def validate_config(config) -> None:
  """Checks the robust-MAE switches before anything is built.

  Raises:
    ValueError: an attention dropout rate outside [0, 1), an encoder
      insertion block outside the encoder or a ratio larger than the masked
      share, or an unknown population-statistics mode or axis (or fixed
      statistics of the wrong size).
  """
  m = config.model
  for key in ('decoder_attn_drop', 'encoder_attn_drop'):
    rate = float(m.get(key, 0.0))
    if not 0.0 <= rate < 1.0:
      raise errors.ConfigError(
          f'config.model.{key}={rate}: a dropout rate must be '
          'in [0, 1) (robust MAE uses 0.3 on the decoder).')
  if m.get('insert_block') is not None:
    depth = vit.encoder_fields(m.get('variant'), m.get('encoder')).get(
        'depth', vit.Encoder.depth)
    block = int(m.insert_block)
    if not 0 <= block < depth:
      raise errors.ConfigError(
          f'config.model.insert_block={block} is outside the encoder\'s '
          f'{depth} blocks: use 0..{depth - 1} (0-based; the paper\'s "8th '
          'layer" is 7), or None for no encoder mask tokens.')
    num_patches = (int(config.input.image_size) //
                   vit.patch_size_of(m)) ** 2
    ratio = m.get('insert_ratio', 0.25)
    mask_ratio = config_lib.mask_ratio(config)
    count = masking.num_inserted(num_patches, mask_ratio, ratio)
    if (count == masking.num_masked(num_patches, mask_ratio) and
        not config.loss.get('inserted_in_loss', True)):
      raise errors.ConfigError(
          f'config.model.insert_ratio={ratio} gives every masked patch an '
          'encoder mask token and loss.inserted_in_loss=False leaves them '
          'all out of the loss: lower the ratio or count them.')
  opts = _population_options(config)
  if opts['pop_norm'] not in pixels.POPULATION_MODES:
    raise errors.ConfigError(
        f'config.loss.pop_norm={opts["pop_norm"]!r} is not a '
        f'population-statistics mode: use one of '
        f'{pixels.POPULATION_MODES}.')
  if opts['pop_axis'] not in pixels.POPULATION_AXES:
    raise errors.ConfigError(
        f'config.loss.pop_axis={opts["pop_axis"]!r}: use one '
        f'of {pixels.POPULATION_AXES}.')
  if opts['pop_norm'] == 'fixed':
    for key in ('pop_mean', 'pop_std'):
      pixels.expand_channels(opts[key], _patch_dim(config), _CHANNELS)
    if min(opts['pop_std']) <= 0:
      raise errors.ConfigError(
          f'config.loss.pop_std={opts["pop_std"]}: the fixed '
          'standard deviations must be positive.')
  if opts['pop_norm'] == 'running' and not 0.0 <= float(
      opts['pop_momentum']) < 1.0:
    raise errors.ConfigError(
        f'config.loss.pop_momentum={opts["pop_momentum"]}: '
        'use a momentum in [0, 1) (0.99 by default).')


def to_pixels(config, pred, out, batch):
  """Every patch's prediction; norm-pix targets are mapped back with each
  patch's own mean and std, as the official MAE demo does. Population
  statistics come from `out` when it holds the provider's (training), else
  from the figure's own batch ('running' and 'batch' modes)."""
  opts = _population_options(config)
  population = None
  if 'pop_mean' in out:
    population = (out['pop_mean'], out['pop_std'])
  elif opts['pop_norm'] != 'none':
    target = layers.patchify(jnp.asarray(batch['image'], jnp.float32),
                             vit.patch_size_of(config.model))
    mode = 'batch' if opts['pop_norm'] == 'running' else opts['pop_norm']
    population = loss.population(
        target, out, mode=mode, axis=opts['pop_axis'],
        mean=opts['pop_mean'], std=opts['pop_std'], eps=opts['pop_eps'])
  return pixels.to_input_space(
      pred, batch['image'], vit.patch_size_of(config.model),
      config.loss.get('norm_pix_loss', False),
      config.loss.get('norm_pix_eps', 1e-6), population)


def encoder(config) -> dict:
  """The encoder's vit.Encoder fields (params['encoder'])."""
  m = build_model(config)
  return dict(m.encoder, scan=m.scan, dtype=m.dtype)


METHOD = method.Method(
    name='mae',
    build_model=build_model,
    batch_spec=batch_spec,
    loss=loss.loss_fn,
    to_pixels=to_pixels,
    converter=method.Converter(to_flax=convert.to_flax,
                               to_torch=convert.to_torch,
                               to_torch_keys=convert.to_torch_keys,
                               to_hf=convert.to_hf,
                               from_hf=convert.from_hf),
    parity=parity.ADAPTER,
    targets=targets,
    validate_config=validate_config,
    classifier=finetune.CARD,
    encoder=encoder)

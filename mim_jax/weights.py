"""Getting params in and out: official PyTorch files and our checkpoints.

One place for what the trainer (`config.init_from`), the conversion tool and
the reconstruction visualiser share.
"""

import importlib
from typing import Optional

import jax
import numpy as np
from absl import logging

from mim_jax import checkpoint
from mim_jax import sharding
from mim_jax import steps
from mim_jax import tokenizer
from mim_jax.convert import core
from mim_jax.models import vit


def patch_size_of(config) -> int:
  m = config.model
  if m.get('encoder') and m.encoder.get('patch_size'):
    return int(m.encoder.patch_size)
  if m.get('variant'):
    return vit.decode_variant(m.variant)['patch_size']
  raise ValueError('Set config.model.variant ("B/16") or '
                   'config.model.encoder.patch_size.')


def batch_shapes(config, batch_size: Optional[int] = None) -> dict:
  """ShapeDtypeStructs of what the train step gets: image, noise, mask, and
  token_ids for token targets (made on the devices from the tokenizer view,
  see mim_jax/tokenizer.py)."""
  bs = config.input.batch_size if batch_size is None else batch_size
  size = config.input.image_size
  n = (size // patch_size_of(config)) ** 2
  shapes = {'image': jax.ShapeDtypeStruct((bs, size, size, 3), np.float32),
            'noise': jax.ShapeDtypeStruct((bs, n), np.float32),
            'mask': jax.ShapeDtypeStruct((bs, n), np.float32)}
  if tokenizer.uses_tokenizer(config):
    shapes['token_ids'] = jax.ShapeDtypeStruct((bs, n), np.int32)
  return shapes


def converter(config):
  """The `mim_jax.convert.<model_name>` module."""
  return importlib.import_module(f'mim_jax.convert.{config.model_name}')


def from_torch(config, model, path: str, strict: bool = True):
  """Params from an official PyTorch state dict (.pth/.pt/.npz).

  With strict=False, params missing from the file (the decoder of the
  released encoder-only MAE checkpoints) keep a fresh initialisation.
  """
  shapes = batch_shapes(config, 1)
  init = lambda: steps.init_params(model, shapes, config.seed)
  target = jax.eval_shape(init) if strict else init()
  sd = core.load_state_dict(path)
  logging.info('Loading %d tensors from %s.', len(sd), path)
  return converter(config).to_flax(sd, model, target,
                                   config.input.image_size, strict=strict)


def ema_from_torch(config, model, path: str, params):
  """The momentum encoder of an official file (BootMAE `model_ema.*`), or
  None when the method has none or the file lacks it."""
  conv = converter(config)
  if not hasattr(conv, 'ema_to_flax'):
    return None
  return conv.ema_to_flax(core.load_state_dict(path), model, params,
                          config.input.image_size)


def state_from_workdir(config, model, workdir: str,
                       step: Optional[int] = None):
  """(TrainState, step) of a training run's checkpoint (latest default)."""
  mesh = sharding.make_mesh([('data', -1)])
  abstract = steps.create_train_state(
      config, model, mesh, batch_shapes(config, 1), materialize=False)[0]
  mgr = checkpoint.make_manager(workdir, keep=10**6, async_save=False)
  state, step = checkpoint.restore_latest(mgr, abstract, step)
  if state is None:
    raise ValueError(f'No checkpoint in {workdir}/checkpoints: train first, '
                     'or pass a PyTorch checkpoint instead.')
  return jax.device_get(state), step


def from_workdir(config, model, workdir: str, step: Optional[int] = None):
  """(params, step) of a training run's checkpoint (latest by default)."""
  state, step = state_from_workdir(config, model, workdir, step)
  return state.params, step


def to_torch(config, model, params, ema=None) -> dict[str, np.ndarray]:
  """params (and the EMA target, for methods that have one) -> state dict
  with the official key names."""
  kw = {} if ema is None else {'ema': jax.device_get(ema)}
  return converter(config).to_torch(jax.device_get(params), model,
                                    config.input.image_size, **kw)

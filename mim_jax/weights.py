"""Getting params in and out: official PyTorch files and our checkpoints.

One place for what the trainer (`config.init_from`), the conversion tool and
the reconstruction visualiser share; the key names and layouts come from the
method's converter (`Method.converter`).
"""

from typing import Optional

import jax
import numpy as np
from absl import logging

from mim_jax import checkpoint
from mim_jax import sharding
from mim_jax import steps
from mim_jax.convert import core


def from_torch(config, model, path: str, strict: bool = True):
  """Params from an official PyTorch state dict (.pth/.pt/.npz).

  With strict=False, params missing from the file (the decoder of the
  released encoder-only MAE checkpoints) keep a fresh initialisation.
  """
  shapes = steps.batch_spec(config, 1)
  init = lambda: steps.init_params(model, shapes, config.seed)
  target = jax.eval_shape(init) if strict else init()
  sd = core.load_state_dict(path)
  logging.info('Loading %d tensors from %s.', len(sd), path)
  return steps.method_of(config).converter.to_flax(
      sd, model, target, config.input.image_size, strict=strict)


def ema_from_torch(config, model, path: str, params):
  """The EMA target of an official file (BootMAE `model_ema.*`), or None
  when the method has none or the file lacks it."""
  conv = steps.method_of(config).converter
  if conv.ema_to_flax is None:
    return None
  return conv.ema_to_flax(core.load_state_dict(path), model, params,
                          config.input.image_size)


def state_from_workdir(config, model, workdir: str,
                       step: Optional[int] = None):
  """(TrainState, step) of a training run's checkpoint (latest default)."""
  mesh = sharding.make_mesh([('data', -1)])
  abstract = steps.create_train_state(
      config, model, mesh, steps.batch_spec(config, 1),
      materialize=False)[0]
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
  conv = steps.method_of(config).converter
  size = config.input.image_size
  sd = conv.to_torch(jax.device_get(params), model, size)
  if ema is not None and conv.ema_to_torch is not None:
    sd.update(conv.ema_to_torch(jax.device_get(ema), model, size))
  return sd

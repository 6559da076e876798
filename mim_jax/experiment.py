"""What a config builds through its method's record: the one place generic
code turns `config.model_name` into the method (`mim_jax.methods.get`) and
binds the config to the method's functions.

The trainer, the state creation, the planner, the parity checker and the
tools all read a config's model, loss, batch spec, schedule and target
providers here.
"""

from typing import Callable, Optional

from mim_jax import method as method_lib
from mim_jax import methods
from mim_jax import optim
from mim_jax import providers as providers_lib
from mim_jax import sharding


def method_of(config) -> method_lib.Method:
  """The record of `config.model_name`."""
  return methods.get(config.model_name)


def build_model(config):
  """The config's model (`method.build_model(config)`)."""
  return method_of(config).build_model(config)


def schedule_of(config) -> method_lib.Schedule:
  """The training lengths of `config` (None where it sets none; one step
  per epoch when the dataset size is unknown)."""
  try:
    total = optim.steps_from(config, 'total')
  except ValueError:
    total = None  # no training length (e.g. a forward-only check)
  n = config.get('input', {}).get('num_train_examples')
  spe = max(n // config.input.batch_size, 1) if n else 1
  return method_lib.Schedule(total_steps=total, steps_per_epoch=spe)


def build_loss(config) -> Callable:
  """`(pred, out, batch, step) -> (loss, aux)`: the method's loss with
  `config.loss` and the config's schedule bound."""
  loss = method_of(config).loss
  kw = dict(config.get('loss', {}))
  schedule = schedule_of(config)

  def loss_fn(pred, out, batch, step):
    return loss(pred, out, batch, step=step, schedule=schedule, **kw)

  return loss_fn


def batch_spec(config, batch_size: Optional[int] = None) -> dict:
  """ShapeDtypeStructs of the arrays the step takes from the pipeline."""
  bs = config.input.batch_size if batch_size is None else batch_size
  return method_of(config).batch_spec(config, bs)


def init_rules_of(config) -> tuple:
  """The method's official-init rules (`Method.init_rules`)."""
  return tuple(method_of(config).init_rules(config))


def batch_transform(config) -> Optional[Callable]:
  """The labelled task's on-device batch transform (mixup / cutmix), None
  for pretraining methods."""
  labelled = method_of(config).labelled
  return None if labelled is None else labelled.batch_transform(config)


def providers_of(config) -> tuple:
  """The config's target providers, checked (`providers.check`)."""
  method = method_of(config)
  return providers_lib.check(method.name, method.targets(config))


def ema_schedule(config) -> Optional[Callable]:
  """The EMA momentum schedule when the method has an EMA target, else
  None."""
  if providers_lib.ema_of(providers_of(config)) is None:
    return None
  return optim.ema_momentum_schedule(config)


def frozen_targets(config, mesh, abstract: bool = False) -> dict:
  """{name: weights} of the config's 'frozen' providers, read from their
  files and replicated on `mesh` (abstract: ShapeDtypeStructs, no file
  read)."""
  return providers_lib.frozen_weights(
      providers_of(config), config, sharding.replicated(mesh), abstract)

"""The train state and its creation: step, params, optimizer state, the
method's target state (an EMA copy, running statistics) and the model's
other collections, built directly with their shardings."""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh

from mim_jax import experiment
from mim_jax import images
from mim_jax import optim
from mim_jax import providers as providers_lib
from mim_jax import sharding
from mim_jax.models import init_rules


@struct.dataclass
class TrainState(train_state.TrainState):
  """flax TrainState plus the state of the method's target providers
  (`mim_jax.method.TargetProvider`).

  `ema_params` is the 'ema' provider's momentum copy (BootMAE's momentum
  encoder), None for methods without one. It is set at init and updated
  inside the jitted step after the optimizer update; it is sharded and
  checkpointed with `params`.

  `target_state` holds the 'running' providers' statistics by provider
  name (None without any), updated in the step and checkpointed.

  `model_state` holds the model's variable collections other than
  'params' (e.g. BatchNorm's 'batch_stats' of a probe head), None for models
  without; updated by the training forward, read by evaluation,
  checkpointed.
  """
  ema_params: Optional[Any] = None
  target_state: Optional[Any] = None
  model_state: Optional[Any] = None

def _rules(config) -> tuple:
  return sharding.rules_from_config(config)


def _min_shard(config) -> int:
  return config.get('min_shard_size', sharding.DEFAULT_MIN_SHARD_SIZE)


def init_variables(model, batch_shapes: dict, seed: int, rules=()):
  """Initialises the boxed variables (params carry their logical axes);
  `rules` (init_rules_of(config)) redraw params as the official code
  initialises them."""
  dummy = {k: jnp.zeros(v.shape, v.dtype)
           for k, v in images.model_shapes(batch_shapes).items()}
  key = jax.random.PRNGKey(seed)
  variables = dict(model.init({'params': key,
                               'dropout': jax.random.PRNGKey(0)},
                              dummy, train=False))
  variables['params'] = init_rules.apply(
      variables['params'], rules, jax.random.fold_in(key, 1))
  return variables


def init_params(model, batch_shapes: dict, seed: int, rules=()):
  """Initialises plain params from ShapeDtypeStructs (no data needed)."""
  return nn.meta.unbox(
      init_variables(model, batch_shapes, seed, rules)['params'])


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def box_like(boxed, tree):
  """`tree` (plain arrays) in the boxes of `boxed` (same structure)."""
  if tree is None:
    return None
  return jax.tree.map(lambda b, v: b.replace_boxed(v), boxed, tree,
                      is_leaf=_is_box)


def param_specs(model, batch_shapes: dict):
  """(abstract boxed params, logical PartitionSpec per param), without
  compute."""
  boxed = jax.eval_shape(
      functools.partial(init_variables, model, batch_shapes, 0))['params']
  return boxed, nn.get_partition_spec(boxed)


def param_shardings(config, model, mesh: Mesh, batch_shapes: dict):
  """(abstract params, NamedSharding per param) under the config's rules."""
  boxed, specs = param_specs(model, batch_shapes)
  abstract = nn.meta.unbox(boxed)
  shardings = sharding.param_shardings(specs, abstract, mesh, _rules(config),
                                       _min_shard(config))
  return abstract, shardings


def create_train_state(config, model, mesh: Mesh, batch_shapes: dict,
                       params=None, materialize: bool = True, ema=None,
                       model_state=None):
  """Creates the TrainState directly with its shardings.

  The state is traced with eval_shape first, with boxed params: the
  optimizer moments, the EMA and running target statistics inherit the
  params' logical axes (flax metadata), and `nn.get_partition_spec` gives
  the logical spec of every leaf, mapped onto the mesh by the config's
  rules (FSDP; small or indivisible arrays replicated). A jitted init with
  those out_shardings then builds every array in place, so nothing is
  materialised whole on one device. The state itself holds plain arrays.

  Args:
    config: experiment config (optimizer, schedule, seed, sharding rules).
    model: the flax module.
    mesh: device mesh.
    batch_shapes: ShapeDtypeStructs of a batch (`batch_spec`).
    params: initial params (e.g. converted from PyTorch); None = fresh init.
    materialize: if False, return the abstract state instead (leaves are
      ShapeDtypeStructs carrying their sharding), the restore target of a
      checkpoint: nothing is initialised that the restore would overwrite.
    ema: initial `ema_params` (e.g. an official checkpoint's momentum
      encoder); None = the EMA provider's `init(params)`.
    model_state: initial non-param collections (e.g. a trained probe's
      BatchNorm statistics); None = the model's init.

  Returns:
    (state, state_shardings, tx, schedule).
  """
  providers = experiment.providers_of(config)
  boxed_params, _ = param_specs(model, batch_shapes)
  tx, schedule = optim.make_tx(config, nn.meta.unbox(boxed_params))

  def make_state(params, ema=None, model_state=None):
    variables = dict(init_variables(model, batch_shapes, config.seed,
                                    experiment.init_rules_of(config)))
    fresh = variables.pop('params')
    if params is None:
      params = fresh
    if model_state is not None:
      variables = model_state
    return TrainState.create(
        apply_fn=model.apply, params=params, tx=tx,
        model_state=variables or None,
        **providers_lib.initial_state(providers, params, ema))

  if ema is not None:
    ema = box_like(providers_lib.abstract_ema(providers, boxed_params), ema)
  params = box_like(boxed_params, params)
  boxed_state = jax.eval_shape(make_state, params, ema, model_state)
  abstract = nn.meta.unbox(boxed_state)
  shardings = sharding.state_shardings(
      nn.get_partition_spec(boxed_state), abstract, mesh, _rules(config),
      _min_shard(config))
  if not materialize:
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, shardings)
  else:
    if params is not None:
      params = jax.device_put(params, box_like(boxed_params,
                                               shardings.params))
    state = jax.jit(lambda p, e, m: nn.meta.unbox(make_state(p, e, m)),
                    out_shardings=shardings)(params, ema, model_state)
  return state, shardings, tx, schedule

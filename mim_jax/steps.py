"""Model/loss selection, the pure train step and sharded state creation.

Shared by the trainer (`train.py`) and the parity checker, so the fixtures
are replayed through exactly the code that trains.
"""

import functools
import importlib
import inspect
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mim_jax import optim
from mim_jax import sharding
from mim_jax.state import TrainState


def _import(kind: str, name: str):
  try:
    return importlib.import_module(f'mim_jax.{kind}.{name}')
  except ModuleNotFoundError as e:
    raise ValueError(f'Unknown {kind[:-1]} {name!r}: there is no '
                     f'mim_jax/{kind}/{name}.py.') from e


def model_module(config):
  """The module `mim_jax.models.<config.model_name>`."""
  return _import('models', config.model_name)


def build_model(config):
  """`mim_jax.models.<config.model_name>.Model(**config.model)`."""
  mod = model_module(config)
  kw = config.model.to_dict()
  if 'dtype' in kw:
    kw['dtype'] = jnp.dtype(kw['dtype'])
  try:
    return mod.Model(**kw)
  except TypeError as e:
    raise ValueError(
        f'config.model does not fit model {config.model_name!r}: {e}. Remove '
        f'or rename the key; the fields are those of mim_jax/models/'
        f'{config.model_name}.py.') from e


def _accepts(fn: Callable, name: str) -> bool:
  fn = getattr(fn, 'func', fn)
  return name in inspect.signature(fn).parameters


def build_loss(config) -> Callable:
  """`mim_jax.losses.<config.loss_name>.loss_fn` bound to `config.loss`.

  A loss that takes `total_steps` / `steps_per_epoch` (a schedule inside
  the loss, e.g. BootMAE's feature-weight ramp) gets them from the config
  unless config.loss sets them.
  """
  mod = _import('losses', config.loss_name)
  kw = dict(config.get('loss', {}))
  if _accepts(mod.loss_fn, 'total_steps') and 'total_steps' not in kw:
    try:
      kw['total_steps'] = optim.steps_from(config, 'total')
    except ValueError:
      pass  # no training length (e.g. a forward-only check)
  n = config.get('input', {}).get('num_train_examples')
  if _accepts(mod.loss_fn, 'steps_per_epoch') and n and (
      'steps_per_epoch' not in kw):
    kw['steps_per_epoch'] = max(n // config.input.batch_size, 1)
  return functools.partial(mod.loss_fn, **kw)


# The batch entries that go to the devices (the rest is bookkeeping).
# `tokenizer_image` is turned into `token_ids` before the step
# (mim_jax/tokenizer.py).
DEVICE_KEYS = ('image', 'noise', 'mask', 'token_ids', 'tokenizer_image')


def model_inputs(batch: dict) -> dict:
  """The mask inputs a model takes from a batch (noise and/or mask)."""
  return {k: batch[k] for k in ('noise', 'mask') if k in batch}


def _model_hook(model, name: str):
  """A function of the module that defines `model`'s class (e.g.
  `mim_jax.models.bootmae.ema_targets`), or None."""
  return getattr(importlib.import_module(type(model).__module__), name, None)


def make_loss_fn(model, loss_fn: Callable) -> Callable:
  """(params, batch, rng, train, *, ema_params, step) -> (loss, (pred, out,
  aux)).

  Methods with an EMA target (their module defines `ema_targets(model,
  ema_params, batch) -> dict`) get those targets added to the batch, under
  stop_gradient; a loss that takes `step` gets the optimiser step.
  """
  targets_fn = _model_hook(model, 'ema_targets')
  pass_step = _accepts(loss_fn, 'step')

  def compute(params, batch, rng, train: bool = True, *, ema_params=None,
              step=None):
    targets = {}
    if targets_fn is not None:
      if ema_params is None:
        raise ValueError(f'{type(model).__name__} needs the EMA params '
                         '(TrainState.ema_params) for its targets.')
      targets = jax.lax.stop_gradient(targets_fn(model, ema_params, batch))
      batch = dict(batch, **targets)
    pred, out = model.apply({'params': params}, batch['image'],
                            **model_inputs(batch), train=train,
                            rngs={'dropout': rng})
    out = dict(out, **targets)
    kw = {'step': step} if pass_step and step is not None else {}
    loss, aux = loss_fn(pred, out, batch, **kw)
    return loss, (pred, out, aux)

  return compute


def grads_and_metrics(compute: Callable, params, batch, rng,
                      accum_steps: int = 1):
  """Loss, grads and scalar metrics, optionally over `accum_steps`
  microbatches (summed in a lax.scan: memory of one microbatch)."""
  grad_fn = jax.value_and_grad(compute, has_aux=True)
  if accum_steps == 1:
    (loss, (_, _, aux)), grads = grad_fn(params, batch, rng)
    return loss, grads, aux
  # Strided split keeps the sharded batch dim in place (no resharding):
  # microbatch k holds examples k, k + accum, k + 2 accum, ...
  micro = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps,
                          *x.shape[1:]).swapaxes(0, 1), batch)

  def body(carry, xs):
    mb, k = xs
    (loss, _), grads = grad_fn(params, mb, jax.random.fold_in(rng, k))
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32),
           jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(body, zeros,
                                  (micro, jnp.arange(accum_steps)))
  scale = 1.0 / accum_steps
  return loss * scale, jax.tree.map(lambda g: g * scale, grads), {}


def make_train_step(model, loss_fn: Callable, schedule, *, seed: int = 0,
                    accum_steps: int = 1, ema_momentum=None):
  """Returns the pure `train_step(state, batch) -> (state, metrics)`.

  With `ema_momentum` (step -> (m, 1 - m)), `state.ema_params` is updated
  after the optimizer update: ema = m * ema + (1 - m) * new params.
  """
  compute = make_loss_fn(model, loss_fn)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    step_compute = functools.partial(compute, ema_params=state.ema_params,
                                     step=state.step)
    loss, grads, aux = grads_and_metrics(step_compute, state.params, batch,
                                         rng, accum_steps)
    # The loss terms (scalars of the loss's aux) are logged with the loss.
    metrics = {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
    metrics.update({
        'loss': loss,
        'l2_grads': optim.global_norm(grads),
        'lr': schedule(state.step),
    })
    new_state = state.apply_gradients(grads=grads)
    if state.ema_params is not None:
      if ema_momentum is None:
        raise ValueError('the state has ema_params but no EMA momentum '
                         'schedule was given (config.ema).')
      m, rate = ema_momentum(state.step)
      new_state = new_state.replace(ema_params=optim.ema_update(
          state.ema_params, new_state.params, m, rate))
      metrics['ema_momentum'] = m
    metrics['l2_params'] = optim.global_norm(new_state.params)
    return new_state, metrics

  return train_step


def init_variables(model, batch_shapes: dict, seed: int):
  """Initialises the boxed variables (params carry their logical axes)."""
  dummy = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_shapes.items()}
  return model.init(
      {'params': jax.random.PRNGKey(seed), 'dropout': jax.random.PRNGKey(0)},
      dummy['image'], **model_inputs(dummy), train=False)


def init_params(model, batch_shapes: dict, seed: int):
  """Initialises plain params from ShapeDtypeStructs (no data needed)."""
  return nn.meta.unbox(init_variables(model, batch_shapes, seed)['params'])


def param_specs(model, batch_shapes: dict):
  """(abstract params, logical PartitionSpec per param), without compute."""
  boxed = jax.eval_shape(
      functools.partial(init_variables, model, batch_shapes, 0))['params']
  return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def param_shardings(config, model, mesh: Mesh, batch_shapes: dict):
  """(abstract params, NamedSharding per param) under the config's rules."""
  abstract, specs = param_specs(model, batch_shapes)
  shardings = sharding.param_shardings(
      specs, abstract, mesh, sharding.rules_from_config(config),
      config.get('min_shard_size', sharding.DEFAULT_MIN_SHARD_SIZE))
  return abstract, shardings


def create_train_state(config, model, mesh: Mesh, batch_shapes: dict,
                       params=None, materialize: bool = True, ema=None):
  """Creates the TrainState directly with its shardings.

  The state is traced with eval_shape first; params, optimizer state and
  `ema_params` get the shardings of the logical rules (FSDP), and a jitted
  init with those out_shardings builds every array in place, so nothing is
  materialised whole on one device.

  Args:
    config: experiment config (optimizer, schedule, seed, sharding rules).
    model: the flax module.
    mesh: device mesh.
    batch_shapes: ShapeDtypeStructs of a batch (image, noise/mask).
    params: initial params (e.g. converted from PyTorch); None = fresh init.
    materialize: if False, return the abstract state instead (leaves are
      ShapeDtypeStructs carrying their sharding), the restore target of a
      checkpoint: nothing is initialised that the restore would overwrite.
    ema: initial `ema_params` (e.g. an official checkpoint's momentum
      encoder); None = the model's `init_ema(params)` when it has an EMA.

  Returns:
    (state, state_shardings, tx, schedule).
  """
  abstract_params, param_sh = param_shardings(config, model, mesh,
                                              batch_shapes)
  tx, schedule = optim.make_tx(config, abstract_params)

  init_ema = _model_hook(model, 'init_ema')

  def make_state(params, ema=None):
    if params is None:
      params = init_params(model, batch_shapes, config.seed)
    if init_ema is not None and ema is None:
      ema = init_ema(params)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             ema_params=ema)

  if params is not None:
    params = jax.device_put(params, param_sh)
  if ema is not None:
    ema = jax.device_put(ema, {k: param_sh[k] for k in ema})
  abstract = jax.eval_shape(make_state, params, ema)
  shardings = sharding.state_shardings(abstract, abstract_params, param_sh,
                                       mesh)
  if not materialize:
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, shardings)
  else:
    state = jax.jit(make_state, out_shardings=shardings)(params, ema)
  return state, shardings, tx, schedule


def ema_schedule(config, model):
  """The EMA momentum schedule when the model has an EMA target, else None."""
  if _model_hook(model, 'init_ema') is None:
    return None
  return optim.ema_momentum_schedule(config)


def jit_train_step(config, model, loss_fn: Callable, schedule, mesh: Mesh,
                   state_shardings):
  """The train step jitted with explicit in/out shardings, the state
  donated, and activations constrained by the config's logical rules."""
  step = make_train_step(model, loss_fn, schedule, seed=config.seed,
                         accum_steps=config.get('grad_accum_steps', 1),
                         ema_momentum=ema_schedule(config, model))
  rules = sharding.rules_from_config(config)

  def sharded_step(state, batch):
    with sharding.activation_sharding(mesh, rules):
      return step(state, batch)

  return jax.jit(
      sharded_step,
      in_shardings=(state_shardings, sharding.data_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))


def make_forward(model, mesh: Mesh | None = None):
  """Jitted eval forward `(params, batch) -> (pred, out)`.

  With a mesh the outputs are replicated, so every process (of a multi-host
  run) can read them; the batch is the same host-side array everywhere.
  """
  fwd = lambda params, batch: model.apply(  # pylint: disable=g-long-lambda
      {'params': params}, batch['image'], **model_inputs(batch), train=False)
  if mesh is None:
    return jax.jit(fwd)
  return jax.jit(fwd, out_shardings=sharding.replicated(mesh))

"""The pure train step and sharded state creation, for any method.

Shared by the trainer (`train.py`), the planner and the parity checker, so
the fixtures are replayed through exactly the code that trains. Everything
method-specific comes from the method's record (`mim_jax.method.Method`),
found by `config.model_name` in the registry.
"""

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mim_jax import method as method_lib
from mim_jax import methods
from mim_jax import optim
from mim_jax import sharding
from mim_jax.models import init_rules
from mim_jax.models import vit
from mim_jax.state import TrainState


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


def provider_states(providers, state: TrainState, frozen: dict) -> dict:
  """{provider name: its state}: the EMA in `state.ema_params`, running
  statistics in `state.target_state`, frozen weights in `frozen`."""
  out = {}
  for p in providers:
    if p.kind == 'ema':
      out[p.name] = state.ema_params
    elif p.kind == 'running':
      out[p.name] = state.target_state[p.name]
    else:
      out[p.name] = frozen[p.name]
  return out


def make_loss_fn(model, loss_fn: Callable, providers=()) -> Callable:
  """(params, batch, rng, train, *, targets, step, model_state) -> (loss,
  (pred, out, aux, new_model_state)).

  The providers' targets (from `targets`, {provider name: state}) are added
  to the batch and to the model's out dict under stop_gradient, then the
  model and the loss run. `model_state` holds the model's collections
  besides 'params' (None without): mutable in training, and returned
  updated (unchanged in evaluation).
  """

  def compute(params, batch, rng, train: bool = True, *, targets=None,
              step=0, model_state=None):
    new = {}
    for p in providers:
      new.update(p.compute((targets or {})[p.name], batch))
    new = jax.lax.stop_gradient(new)
    batch = dict(batch, **new)
    variables = {'params': params, **(model_state or {})}
    if model_state and train:
      (pred, out), model_state = model.apply(
          variables, batch, train=True, rngs={'dropout': rng},
          mutable=list(model_state))
      model_state = dict(model_state)
    else:
      pred, out = model.apply(variables, batch, train=train,
                              rngs={'dropout': rng})
    out = dict(out, **new)
    loss, aux = loss_fn(pred, out, batch, step)
    return loss, (pred, out, aux, model_state)

  return compute


def _scalars(aux: dict) -> dict:
  return {k: v for k, v in aux.items() if jnp.ndim(v) == 0}


def grads_and_metrics(compute: Callable, params, batch, rng,
                      accum_steps: int = 1, model_state=None):
  """Loss, grads, aux and the updated model state, optionally over
  `accum_steps` microbatches (summed in a lax.scan: memory of one
  microbatch; the model state, e.g. BatchNorm statistics, goes through the
  microbatches in order).

  With accumulation, aux holds the scalar metrics of the loss, each the
  mean over the microbatches (weighted like the loss: equally).
  """
  grad_fn = jax.value_and_grad(compute, has_aux=True)
  if accum_steps == 1:
    (loss, (_, _, aux, model_state)), grads = grad_fn(
        params, batch, rng, model_state=model_state)
    return loss, grads, aux, model_state
  # Strided split keeps the sharded batch dim in place (no resharding):
  # microbatch k holds examples k, k + accum, k + 2 accum, ...
  micro = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps,
                          *x.shape[1:]).swapaxes(0, 1), batch)

  def body(carry, xs):
    sums, ms = carry
    mb, k = xs
    (loss, (_, _, aux, ms)), grads = grad_fn(
        params, mb, jax.random.fold_in(rng, k), model_state=ms)
    return (jax.tree.map(jnp.add, sums, (loss, grads, _scalars(aux))),
            ms), None

  first = jax.tree.map(lambda x: x[0], micro)
  aux_shapes = _scalars(jax.eval_shape(
      functools.partial(compute, model_state=model_state), params, first,
      rng)[1][2])
  zeros = (jnp.zeros((), jnp.float32),
           jax.tree.map(jnp.zeros_like, params),
           {k: jnp.zeros(v.shape, v.dtype) for k, v in aux_shapes.items()})
  ((loss, grads, aux), model_state), _ = jax.lax.scan(
      body, (zeros, model_state), (micro, jnp.arange(accum_steps)))
  scale = 1.0 / accum_steps
  return (loss * scale, jax.tree.map(lambda g: g * scale, grads),
          jax.tree.map(lambda a: a * scale, aux), model_state)


# Folded into the step's key for the batch transform (mixup / cutmix), so
# it draws independently of dropout.
_TRANSFORM_KEY = 0x6D6978


def checked_trees(loss, grads, state: TrainState) -> list:
  """What the non-finite guard checks, in order: the loss, the gradients
  and the updated params and optimizer state (so the updates too)."""
  return [('loss', loss), ('grads', grads), ('params', state.params),
          ('opt_state', state.opt_state)]


def nonfinite_names(state: TrainState) -> list[str]:
  """The name of each flag of the step's `nonfinite_at` metric (index ->
  'loss', 'grads/...', 'params/...' or 'opt_state/...'), from a state or
  its abstract version."""
  return ['/'.join([prefix, *optim.path_names(path)])
          for prefix, tree in checked_trees(0.0, state.params, state)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]] + [
              'overflow (a sum of squares beyond float32: |values| > 1e19)']


def _all_finite(loss, grads, state: TrainState, grad_norm, param_norm):
  """(every checked value finite, index of the first non-finite one in
  `nonfinite_names` order or -1), on the devices.

  The test itself uses the loss and one norm per tree (the gradients' and
  the new params' are the logged ones, already computed): a non-finite
  value makes it non-finite. Only when it fails are the arrays checked one
  by one, to name the first; if none is (finite values whose squares
  overflow float32), the index is that of the last name, 'overflow'.
  """
  trees = checked_trees(loss, grads, state)
  ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        & jnp.isfinite(param_norm)
        & jnp.isfinite(optim.global_norm(state.opt_state)))

  def first_bad():
    flags = jnp.stack([jnp.all(jnp.isfinite(x)) for _, tree in trees
                       for x in jax.tree.leaves(tree)] + [jnp.array(False)])
    return jnp.argmin(flags).astype(jnp.int32)

  return ok, jax.lax.cond(ok, lambda: jnp.int32(-1), first_bad)


def _keep_if_not(ok, new, old):
  """`new` if `ok`, else `old`, for float arrays; integer arrays (the
  optimizer's step counts) always advance, so the lr schedule stays on the
  step."""
  if jnp.issubdtype(jnp.result_type(new), jnp.inexact):
    return jnp.where(ok, new, old)
  return new


def make_train_step(model, loss_fn: Callable, schedule, providers=(), *,
                    seed: int = 0, accum_steps: int = 1, ema_momentum=None,
                    batch_transform: Optional[Callable] = None,
                    guard: bool = True):
  """Returns the pure `train_step(state, batch, frozen) -> (state,
  metrics)`.

  `frozen` holds the weights of 'frozen' providers ({} without). The
  method's `batch_transform` (mixup, ...) runs first, on the devices. After
  the optimizer update, an 'ema' provider's `state.ema_params` moves with
  `ema_momentum` (step -> (m, 1 - m)): ema = m * ema + (1 - m) * params;
  'running' providers update their `state.target_state` entry; the model's
  own state (BatchNorm statistics) is replaced by the forward's update.

  With `guard`, a step whose loss, gradients, new params or new optimizer
  state hold a non-finite value changes nothing but the step counts (the
  state's and the optimizer's, so the lr schedule stays on the step):
  params, optimizer moments, EMA, target and model state stay as they
  were. Its metrics say so: `skipped` (1.0) and `nonfinite_at` (the index
  of the first non-finite array in `nonfinite_names`; -1 when finite); its
  other metrics describe the rejected update, and the trainer leaves them
  out of the logged means. The host decides whether to go on
  (`mim_jax.guards.NonFiniteMonitor`).
  """
  compute = make_loss_fn(model, loss_fn, providers)
  has_ema = any(p.kind == 'ema' for p in providers)
  running = [p for p in providers if p.kind == 'running']
  if has_ema and ema_momentum is None:
    raise ValueError('the method has an EMA target but no EMA momentum '
                     'schedule was given (config.ema).')

  def train_step(state: TrainState, batch, frozen):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    if batch_transform is not None:
      batch = batch_transform(batch, jax.random.fold_in(rng, _TRANSFORM_KEY))
    step_compute = functools.partial(
        compute, targets=provider_states(providers, state, frozen),
        step=state.step)
    loss, grads, aux, model_state = grads_and_metrics(
        step_compute, state.params, batch, rng, accum_steps,
        model_state=state.model_state)
    # The loss terms (scalars of the loss's aux) are logged with the loss.
    metrics = _scalars(aux)
    metrics.update({
        'loss': loss,
        'l2_grads': optim.global_norm(grads),
        'lr': schedule(state.step),
    })
    new_state = state.apply_gradients(grads=grads)
    if model_state is not None:
      new_state = new_state.replace(model_state=model_state)
    if has_ema:
      m, rate = ema_momentum(state.step)
      new_state = new_state.replace(ema_params=optim.ema_update(
          state.ema_params, new_state.params, m, rate))
      metrics['ema_momentum'] = m
    if running:
      new_state = new_state.replace(target_state=dict(
          state.target_state, **{
              p.name: p.update(state.target_state[p.name], batch, state.step)
              for p in running}))
    metrics['l2_params'] = optim.global_norm(new_state.params)
    if guard:
      ok, metrics['nonfinite_at'] = _all_finite(
          loss, grads, new_state, metrics['l2_grads'], metrics['l2_params'])
      metrics['skipped'] = 1.0 - ok.astype(jnp.float32)
      kept = {k: jax.tree.map(functools.partial(_keep_if_not, ok),
                              getattr(new_state, k), getattr(state, k))
              for k in ('params', 'opt_state', 'ema_params', 'target_state',
                        'model_state')}
      new_state = new_state.replace(**kept)
    return new_state, metrics

  return train_step


def init_rules_of(config) -> tuple:
  """The method's official-init rules (`Method.init_rules`)."""
  return tuple(method_of(config).init_rules(config))


def init_variables(model, batch_shapes: dict, seed: int, rules=()):
  """Initialises the boxed variables (params carry their logical axes);
  `rules` (init_rules_of(config)) redraw params as the official code
  initialises them."""
  dummy = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_shapes.items()}
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


def _rules(config) -> tuple:
  return sharding.rules_from_config(config)


def _min_shard(config) -> int:
  return config.get('min_shard_size', sharding.DEFAULT_MIN_SHARD_SIZE)


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
  providers = method_of(config).providers(config)
  ema_provider = next((p for p in providers if p.kind == 'ema'), None)
  running = [p for p in providers if p.kind == 'running']
  boxed_params, _ = param_specs(model, batch_shapes)
  tx, schedule = optim.make_tx(config, nn.meta.unbox(boxed_params))

  def make_state(params, ema=None, model_state=None):
    variables = dict(init_variables(model, batch_shapes, config.seed,
                                    init_rules_of(config)))
    fresh = variables.pop('params')
    if params is None:
      params = fresh
    if model_state is not None:
      variables = model_state
    if ema_provider is not None and ema is None:
      ema = ema_provider.init(params)
    target_state = {p.name: p.init(params) for p in running} or None
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             ema_params=ema, target_state=target_state,
                             model_state=variables or None)

  if ema is not None:
    ema = box_like(jax.eval_shape(ema_provider.init, boxed_params), ema)
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


def ema_schedule(config):
  """The EMA momentum schedule when the method has an EMA target, else
  None."""
  if method_of(config).ema_provider(config) is None:
    return None
  return optim.ema_momentum_schedule(config)


def frozen_targets(config, mesh: Mesh, abstract: bool = False) -> dict:
  """{name: weights} of the config's 'frozen' providers, read from their
  files and replicated on `mesh` (abstract: ShapeDtypeStructs, no file
  read)."""
  repl = sharding.replicated(mesh)
  out = {}
  for p in method_of(config).providers(config):
    if p.kind != 'frozen':
      continue
    if abstract:
      out[p.name] = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
          p.abstract(config))
    else:
      out[p.name] = jax.device_put(p.init(config), repl)
  return out


def jit_train_step(config, model, loss_fn: Callable, schedule, mesh: Mesh,
                   state_shardings):
  """The train step jitted with explicit in/out shardings, the state
  donated, and activations constrained by the config's logical rules
  (`nn.logical_axis_rules` on the mesh, read by the layers'
  `nn.with_logical_constraint`)."""
  providers = method_of(config).providers(config)
  step = make_train_step(model, loss_fn, schedule, providers,
                         seed=config.seed,
                         accum_steps=config.get('grad_accum_steps', 1),
                         ema_momentum=ema_schedule(config),
                         batch_transform=method_of(config).batch_transform(
                             config))
  rules = sharding.activation_rules(_rules(config), mesh)

  def sharded_step(state, batch, frozen):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
        nn.logical_axis_rules(rules):
      return step(state, batch, frozen)

  return jax.jit(
      sharded_step,
      in_shardings=(state_shardings, sharding.data_sharding(mesh),
                    sharding.replicated(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))


def make_eval_step(model, metrics_fn: Callable, mesh: Mesh, state_shardings):
  """Jitted `(params, model_state, batch) -> {name: sum over the valid
  examples}, plus 'count'`: one batch of an evaluation pass.

  `metrics_fn` is the method's `eval_metrics` ((pred, out, batch) -> {name:
  (B,) values}); `batch['valid']` (0 for padding) weights the sums, which
  come back replicated, so every host reads the same totals. `params` may
  be the EMA weights (sharded like the params).
  """

  def step(params, model_state, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      variables = {'params': params, **(model_state or {})}
      pred, out = model.apply(variables, batch, train=False)
      valid = batch['valid'].astype(jnp.float32)
      sums = {k: jnp.sum(v.astype(jnp.float32) * valid)
              for k, v in metrics_fn(pred, out, batch).items()}
      sums['count'] = jnp.sum(valid)
      return sums

  return jax.jit(step, in_shardings=(state_shardings.params,
                                     state_shardings.model_state,
                                     sharding.data_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


FEATURES = ('cls', 'avg')


def make_features(config, mesh: Mesh, feature: str = 'cls'):
  """Jitted `(params, batch) -> (features, label, valid)` of whole images
  through the method's encoder (`Method.encoder`, params['encoder']), in
  inference mode, replicated so every host reads the global batch.

  feature: 'cls' (the cls token after the final norm) or 'avg' (the mean of
  the normalised patch tokens).

  Raises:
    ValueError: the method declares no encoder, or an unknown feature.
  """
  method = method_of(config)
  if method.encoder is None:
    raise ValueError(f'method {method.name!r} declares no encoder '
                     '(Method.encoder): it has no features to monitor.')
  if feature not in FEATURES:
    raise ValueError(f'feature={feature!r}; use one of {FEATURES}.')
  encoder = vit.Encoder(**method.encoder(config))

  def features(params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      latent, _ = encoder.apply({'params': params['encoder']},
                                batch['image'])
    latent = latent.astype(jnp.float32)
    f = latent[:, 0] if feature == 'cls' else jnp.mean(latent[:, 1:], 1)
    return f, batch['label'], batch['valid']

  return jax.jit(features, out_shardings=sharding.replicated(mesh))


def make_forward(model, mesh: Mesh | None = None):
  """Jitted eval forward `(params, batch) -> (pred, out)`.

  With a mesh the outputs are replicated, so every process (of a multi-host
  run) can read them; the batch is the same host-side array everywhere.
  """
  fwd = lambda params, batch: model.apply(  # pylint: disable=g-long-lambda
      {'params': params}, batch, train=False)
  if mesh is None:
    return jax.jit(fwd)
  return jax.jit(fwd, out_shardings=sharding.replicated(mesh))

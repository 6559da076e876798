"""The step builders: the pure train step and its jitted, sharded form, and
the jitted evaluation, feature and forward passes, for any method.

Shared by the trainer (`train.py`), the planner and the parity checker, so
the fixtures are replayed through exactly the code that trains. What the
config builds (model, loss, providers) comes from `mim_jax.experiment`;
the target providers' behaviour from `mim_jax.providers`; the non-finite
guard from `mim_jax.nonfinite`. Every jitted pass turns the pipeline's uint8
images into the model's input first, on the devices, with
`images.model_batch` (once per batch).
"""

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mim_jax import errors
from mim_jax import experiment
from mim_jax import images as images_lib
from mim_jax import nonfinite
from mim_jax import optim
from mim_jax import providers as providers_lib
from mim_jax import sharding
from mim_jax.models import vit
from mim_jax.state import TrainState


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
    new = providers_lib.compute(providers, targets or {}, batch)
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


# Folded into the step's key for the batch transform (mixup / cutmix) and
# for the random-erasing fill, so they draw independently of dropout.
_TRANSFORM_KEY = 0x6D6978
_ERASE_KEY = 0x657261


def make_train_step(model, loss_fn: Callable, schedule, providers=(), *,
                    seed: int = 0, accum_steps: int = 1, ema_momentum=None,
                    batch_transform: Optional[Callable] = None,
                    guard: bool = True,
                    image_input: Optional[images_lib.ImageInput] = None):
  """Returns the pure `train_step(state, batch, frozen) -> (state,
  metrics)`.

  `frozen` holds the weights of 'frozen' providers ({} without). First, on
  the devices, uint8 images are normalised with `image_input` and their
  random-erasing boxes filled (`images.model_batch`; float images pass as
  they are); then the method's `batch_transform` (mixup, ...) runs. After
  the optimizer update, an 'ema' provider's `state.ema_params` moves with
  `ema_momentum` (step -> (m, 1 - m)): ema = m * ema + (1 - m) * params;
  'running' providers update their `state.target_state` entry; the model's
  own state (BatchNorm statistics) is replaced by the forward's update.

  With `guard`, a step whose loss, gradients, new params or new optimizer
  state hold a non-finite value changes nothing but the step counts (the
  state's and the optimizer's, so the lr schedule stays on the step):
  params, optimizer moments, EMA, target and model state stay as they
  were. Its metrics say so: `skipped` (1.0) and `nonfinite_at` (the index
  of the first non-finite array in `nonfinite.names`; -1 when finite); its
  other metrics describe the rejected update, and the trainer leaves them
  out of the logged means. The host decides whether to go on
  (`mim_jax.nonfinite.Monitor`).
  """
  compute = make_loss_fn(model, loss_fn, providers)
  providers_lib.check_schedule(providers, ema_momentum)

  def train_step(state: TrainState, batch, frozen):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    batch = images_lib.model_batch(batch, image_input,
                                   jax.random.fold_in(rng, _ERASE_KEY))
    if batch_transform is not None:
      batch = batch_transform(batch, jax.random.fold_in(rng, _TRANSFORM_KEY))
    step_compute = functools.partial(
        compute, targets=providers_lib.step_states(providers, state, frozen),
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
    new_state, provider_metrics = providers_lib.update(
        providers, state, new_state, batch, ema_momentum)
    metrics.update(provider_metrics)
    metrics['l2_params'] = optim.global_norm(new_state.params)
    if guard:
      new_state, metrics = nonfinite.guard_step(loss, grads, state,
                                                new_state, metrics)
    return new_state, metrics

  return train_step


def jit_train_step(config, model, loss_fn: Callable, schedule, mesh: Mesh,
                   state_shardings):
  """The train step jitted with explicit in/out shardings, the state
  donated, and activations constrained by the config's logical rules
  (`nn.logical_axis_rules` on the mesh, read by the layers'
  `nn.with_logical_constraint`)."""
  step = make_train_step(
      model, loss_fn, schedule, experiment.providers_of(config),
      seed=config.seed, accum_steps=config.get('grad_accum_steps', 1),
      ema_momentum=experiment.ema_schedule(config),
      batch_transform=experiment.batch_transform(config),
      image_input=images_lib.ImageInput.from_config(config))
  rules = sharding.activation_rules(sharding.rules_from_config(config), mesh)

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


def make_eval_step(model, metrics_fn: Callable, mesh: Mesh, param_shardings,
                   model_state_shardings=None, *,
                   image_input: Optional[images_lib.ImageInput] = None):
  """Jitted `(params, model_state, batch) -> {name: sum over the valid
  examples}, plus 'count'`: one batch of an evaluation pass (its uint8
  images normalised with `image_input`).

  `metrics_fn` is the method's `eval_metrics` ((pred, out, batch) -> {name:
  (B,) values}); `batch['valid']` (0 for padding) weights the sums, which
  come back replicated, so every host reads the same totals. `params` may
  be the EMA weights (sharded like the params).
  """

  def step(params, model_state, batch):
    batch = images_lib.model_batch(batch, image_input)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      variables = {'params': params, **(model_state or {})}
      pred, out = model.apply(variables, batch, train=False)
      valid = batch['valid'].astype(jnp.float32)
      sums = {k: jnp.sum(v.astype(jnp.float32) * valid)
              for k, v in metrics_fn(pred, out, batch).items()}
      sums['count'] = jnp.sum(valid)
      return sums

  return jax.jit(step, in_shardings=(param_shardings, model_state_shardings,
                                     sharding.data_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


FEATURES = ('cls', 'avg')


def make_features(config, mesh: Mesh, feature: str = 'cls'):
  """Jitted `(params, batch) -> (features, label, valid)` of whole images
  (uint8, normalised with the config's input.mean/std) through the method's
  encoder (`Method.encoder`, params['encoder']), in
  inference mode, replicated so every host reads the global batch.

  feature: 'cls' (the cls token after the final norm) or 'avg' (the mean of
  the normalised patch tokens).

  Raises:
    ValueError: the method declares no encoder, or an unknown feature.
  """
  method = experiment.method_of(config)
  if method.encoder is None:
    raise ValueError(f'method {method.name!r} declares no encoder '
                     '(Method.encoder): it has no features to monitor.')
  if feature not in FEATURES:
    raise errors.ConfigError(f'knn.feature={feature!r}; use one of '
                             f'{FEATURES}.')
  encoder = vit.Encoder(**method.encoder(config))
  image_input = images_lib.ImageInput.from_config(config)

  def features(params, batch):
    batch = images_lib.model_batch(batch, image_input)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      latent, _ = encoder.apply({'params': params['encoder']},
                                batch['image'])
    latent = latent.astype(jnp.float32)
    f = latent[:, 0] if feature == 'cls' else jnp.mean(latent[:, 1:], 1)
    return f, batch['label'], batch['valid']

  return jax.jit(features, out_shardings=sharding.replicated(mesh))


def make_forward(model, mesh: Mesh | None = None, *,
                 image_input: Optional[images_lib.ImageInput] = None):
  """Jitted eval forward `(params, batch) -> (pred, out, model_batch)`:
  `model_batch` is the batch the model saw (uint8 images normalised with
  `image_input`), for figures in its normalised pixel space.

  With a mesh the outputs are replicated, so every process (of a multi-host
  run) can read them; the batch is the same host-side array everywhere.
  """

  def fwd(params, batch):
    batch = images_lib.model_batch(batch, image_input)
    pred, out = model.apply({'params': params}, batch, train=False)
    return pred, out, batch

  if mesh is None:
    return jax.jit(fwd)
  return jax.jit(fwd, out_shardings=sharding.replicated(mesh))

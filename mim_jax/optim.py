"""The optax chain: schedule, AdamW with the official decay grouping, clipping.

Everything MAE-family recipes need, built from `config`:
- lr = base_lr * global_batch / 256 (or an absolute `lr`);
- per-step linear warmup from 0, then half-cycle cosine to `min_lr`
  (MAE `util/lr_sched.py`, evaluated per iteration);
- AdamW (decoupled decay) where biases and LayerNorm scales get no decay and
  everything else, cls and mask tokens included, does (timm
  `param_groups_weight_decay`, as `main_pretrain.py` uses it);
- optional gradient clipping with torch's `clip_grad_norm_` formula;
- optional layer-wise lr decay (fine-tuning).
"""

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def peak_lr(config) -> float:
  """`config.lr` if set, else `config.base_lr * batch_size / 256`."""
  if config.get('lr') is not None:
    return float(config.lr)
  return float(config.base_lr) * config.input.batch_size / 256


def steps_from(config, key: str) -> int:
  """Reads `{key}_steps` or `{key}_epochs` (x steps per epoch)."""
  steps, epochs = config.get(f'{key}_steps'), config.get(f'{key}_epochs')
  if (steps is None) == (epochs is None):
    raise ValueError(f'Set exactly one of config.{key}_steps and '
                     f'config.{key}_epochs (got {steps} and {epochs}).')
  if steps is not None:
    return int(steps)
  n = config.input.get('num_train_examples')
  if not n:
    raise ValueError(f'config.{key}_epochs needs '
                     'config.input.num_train_examples (e.g. 1281167 for '
                     'ImageNet-1k).')
  return int(round(epochs * (n // config.input.batch_size)))


WARMUPS = ('linear', 'linspace')


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int,
                  min_lr: float = 0.0, warmup: str = 'linear'):
  """Warmup from 0, then a half-cycle cosine from peak to min_lr.

  Step t is 0-based and is the lr of the t-th update, so lr(0) = 0 exactly
  as in the official per-iteration schedules. warmup='linear' is MAE's
  lr = peak * t / W; 'linspace' is BEiT's `cosine_scheduler` (CAE, BootMAE):
  linspace(0, peak, W), which reaches the peak at t = W - 1.
  """
  if warmup not in WARMUPS:
    raise ValueError(f'schedule.warmup={warmup!r}; use one of {WARMUPS}.')
  span = max(warmup_steps - (warmup == 'linspace'), 1)
  if total_steps <= warmup_steps:
    raise ValueError(f'total steps ({total_steps}) must exceed warmup steps '
                     f'({warmup_steps}).')

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = peak * t / span
    frac = (t - warmup_steps) / (total_steps - warmup_steps)
    cos = min_lr + (peak - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    return jnp.where(t < warmup_steps, warm, cos)

  return schedule


def make_schedule(config):
  total = steps_from(config, 'total')
  warmup = steps_from(config, 'warmup')
  return warmup_cosine(peak_lr(config), warmup, total,
                       config.schedule.get('min_lr', 0.0),
                       config.schedule.get('warmup', 'linear'))


def ema_momentum_schedule(config):
  """`step -> (momentum, 1 - momentum)` of the EMA target, piecewise linear.

  1 - momentum is interpolated directly: in float32, 1 - 0.99999 computed
  from the momentum would be off by 0.6%, while upstream multiplies by the
  exactly computed python float.

  config.ema.momentum lists the values at config.ema.boundary_epochs (the
  momentum moves once per epoch, as upstream sets it per epoch) or at
  config.ema.boundary_steps; it is constant outside the first and last
  boundary. BootMAE ViT-B: momentum (0.999, 0.9999, 0.99999) at epochs
  (0, 100, 400).

  Raises:
    ValueError: a momentum outside [0, 1), boundaries that do not increase,
      or lists of different lengths.
  """
  ema = config.get('ema') or {}
  values = [float(m) for m in ema.get('momentum') or ()]
  by_epoch = ema.get('boundary_epochs') is not None
  bounds = ema.get('boundary_epochs' if by_epoch else 'boundary_steps')
  bounds = [float(b) for b in (bounds if bounds is not None else [0])]
  if not values:
    raise ValueError('config.ema.momentum is not set: give the EMA momentum, '
                     'e.g. [0.999, 0.9999] with boundary_epochs [0, 100].')
  bad = [m for m in values if not 0.0 <= m < 1.0]
  if bad:
    raise ValueError(f'config.ema.momentum={values}: {bad} outside [0, 1); '
                     'an EMA momentum m keeps m of the old weights per step.')
  if len(bounds) != len(values) or any(
      b >= a for b, a in zip(bounds, bounds[1:])):
    raise ValueError(
        f'config.ema boundaries {bounds} must increase and match '
        f'momentum {values} one to one.')
  spe = 1
  if by_epoch:
    n = config.input.get('num_train_examples')
    if not n:
      raise ValueError('config.ema.boundary_epochs needs '
                       'config.input.num_train_examples.')
    spe = max(n // config.input.batch_size, 1)
  xs = jnp.asarray(bounds, jnp.float32)
  rates = jnp.asarray([1.0 - m for m in values], jnp.float32)

  def schedule(step):
    unit = (jnp.asarray(step) // spe).astype(jnp.float32)
    rate = jnp.interp(unit, xs, rates)
    return 1.0 - rate, rate

  return schedule


def ema_update(ema, params, momentum, rate):
  """ema <- momentum * ema + rate * params (rate = 1 - momentum), for the
  subtrees of `params` that `ema` holds (e.g. {'encoder': ...})."""
  return jax.tree.map(lambda e, p: momentum * e + rate * p,
                      ema, {k: params[k] for k in ema})


# Leaves of the shared layers (models/layers.py) without weight decay in the
# official recipes (timm / BEiT rule: 1-D params and biases): biases,
# LayerNorm scales, BEiT-style q/v biases and layer-scale gammas. A method
# with more such leaves adds their names in its recipe's `wd_exclude`.
NO_DECAY = ('bias', 'scale', 'q_bias', 'v_bias', 'gamma_1', 'gamma_2')


def decay_mask(params, exclude: Sequence[str] = NO_DECAY):
  """True where weight decay applies: every leaf whose name is not in
  `exclude` (by name, so a scanned stack of biases is still excluded)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: k[-1] not in exclude for k in flat})


def global_norm(tree) -> jax.Array:
  """L2 norm over all leaves, in float32 (stable across optax versions)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (norm + 1e-6))."""

  def update(updates, state, params=None):
    del params
    norm = global_norm(updates)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(
      lambda _: optax.EmptyState(), update)


def layer_id_for(path: tuple, num_layers: int) -> int:
  """MAE/BEiT layer ids: embeddings 0, block i -> i + 1, rest num_layers + 1."""
  name = '/'.join(path)
  if re.search(r'(cls_token|patch_embed|pos_embed)', name):
    return 0
  m = re.search(r'blocks_(\d+)/', name)
  if m:
    return int(m.group(1)) + 1
  return num_layers + 1


def layer_decay_scales(params, layer_decay: float, num_layers: int):
  """decay ** (num_layers + 1 - layer_id) per leaf (loop layout only)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({
      k: layer_decay ** (num_layers + 1 - layer_id_for(k, num_layers))
      for k in flat})


def make_tx(config, params=None) -> tuple[optax.GradientTransformation, Any]:
  """Builds (tx, schedule) from `config.optim` / `config.schedule`.

  Args:
    config: the experiment ConfigDict.
    params: params tree (or shapes), needed for the decay mask and layer
      decay.

  Returns:
    The optax transformation and the lr schedule (for logging).
  """
  oc = config.optim
  schedule = make_schedule(config)
  chain = []
  if oc.get('grad_clip_norm'):
    chain.append(clip_by_global_norm_torch(float(oc.grad_clip_norm)))
  if oc.get('name', 'adamw') != 'adamw':
    raise ValueError(f'Unknown optimizer {oc.name!r}; supported: adamw.')
  mu_dtype = oc.get('mu_dtype')
  chain.append(optax.scale_by_adam(
      b1=oc.b1, b2=oc.b2, eps=oc.eps,
      mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None))
  if oc.weight_decay:
    mask = decay_mask(params, tuple(oc.get('wd_exclude', NO_DECAY)))
    chain.append(optax.add_decayed_weights(oc.weight_decay, mask))
  if oc.get('layer_decay'):
    scales = layer_decay_scales(params, oc.layer_decay, oc.num_layers)
    chain.append(optax.GradientTransformation(
        lambda _: optax.EmptyState(),
        lambda u, s, p=None: (jax.tree.map(lambda g, c: g * c, u, scales), s)))
  chain.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*chain), schedule


def tx_config_from_curve(curve: dict, batch_size: int) -> dict:
  """Optimizer/schedule config fields from a fixture's train_curve.json."""
  return dict(
      lr=curve['peak_lr'],
      total_steps=curve['steps'],
      warmup_steps=curve['warmup_steps'],
      schedule=dict(min_lr=curve.get('min_lr', 0.0)),
      optim=dict(name='adamw', b1=curve['betas'][0], b2=curve['betas'][1],
                 eps=curve.get('eps', 1e-8),
                 weight_decay=curve['weight_decay'],
                 grad_clip_norm=curve.get('grad_clip'), mu_dtype=None),
      input=dict(batch_size=batch_size),
  )



"""The optax chain: schedule, AdamW with the official decay grouping, clipping.

Everything MAE-family recipes need, built from `config`:
- lr = base_lr * global_batch / 256 (or an absolute `lr`);
- per-step linear warmup from 0, then half-cycle cosine to `min_lr`
  (MAE `util/lr_sched.py`, evaluated per iteration);
- AdamW (decoupled decay) where biases and LayerNorm scales get no decay and
  everything else, cls and mask tokens included, does (timm
  `param_groups_weight_decay`, as `main_pretrain.py` uses it);
- optional gradient clipping with torch's `clip_grad_norm_` formula;
- optional layer-wise lr decay (fine-tuning), in loop or scan layout;
- LARS (linear probes) and SGD with momentum (attentive probes), as the
  official MAE `util/lars.py` and torch's SGD;
- frozen parameters (`optim.freeze`, probes): no update and no optimizer
  state.
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


def path_names(path) -> tuple[str, ...]:
  """The names along a tree path (jax.tree_util key entries): dict keys,
  attribute names and sequence indices."""
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
               for k in path)


def decay_mask(params, exclude: Sequence[str] = NO_DECAY):
  """True where weight decay applies: every leaf whose name is not in
  `exclude` (by name, so a scanned stack of biases is still excluded).
  Masked-out subtrees (optax.MaskedNode of frozen params) stay masked."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path_names(path)[-1] not in exclude, params)


def _stacked_depth(names: tuple[str, ...],
                   stacked: Sequence[str]) -> bool:
  """True for a leaf of a scanned block stack (leading axis = layer)."""
  return any(n in stacked for n in names[:-1])


def matrix_mask(params, stacked: Sequence[str] = ('blocks',)):
  """True for leaves that are matrices per layer (ndim > 1 in the loop
  layout): LARS's rule for weight decay and trust scaling (MAE
  `util/lars.py`: 1-D params, i.e. biases and norms, get neither)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim - _stacked_depth(path_names(path), stacked) > 1,
      params)


def scale_by_trust_ratio_per_layer(trust_coefficient: float,
                                   stacked: Sequence[str] = ('blocks',)
                                   ) -> optax.GradientTransformation:
  """update * trust_coefficient * |p| / |update| (1 where either norm is
  0), the norms taken per layer for scanned block stacks, as the loop
  layout (and torch) would take them per tensor."""

  def update(updates, state, params):
    def one(path, u, p):
      axes = tuple(range(1 if _stacked_depth(path_names(path), stacked) else 0,
                         u.ndim))
      pn = jnp.sqrt(jnp.sum(jnp.square(p.astype(jnp.float32)), axes,
                            keepdims=True))
      un = jnp.sqrt(jnp.sum(jnp.square(u.astype(jnp.float32)), axes,
                            keepdims=True))
      q = jnp.where((pn > 0) & (un > 0), trust_coefficient * pn / un, 1.0)
      return (u * q).astype(u.dtype)
    return jax.tree_util.tree_map_with_path(one, updates, params), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


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
  """MAE/BEiT layer ids (`util/lr_decay.py` `get_layer_id_for_vit`):
  cls token, position embedding and patch embedding 0, block i -> i + 1,
  everything else (final norms, fc_norm, head) num_layers + 1. Only the
  encoder's blocks count (a probe's own attention block is a head)."""
  name = '/'.join(path)
  if re.search(r'(^|/)encoder/(cls_token|patch_embed|pos_embed)', name):
    return 0
  m = re.search(r'(^|/)encoder/blocks_(\d+)/', name)
  if m:
    return int(m.group(2)) + 1
  return num_layers + 1


def layer_decay_scales(params, layer_decay: float, num_layers: int):
  """decay ** (num_layers + 1 - layer_id) per leaf.

  A scanned encoder stack (`encoder/blocks`, leading axis = block) gets one
  scale per block, shaped to broadcast over the leaf. Masked-out (frozen)
  subtrees stay masked.
  """

  def scale(path, x):
    names = path_names(path)
    if 'blocks' in names[:-1] and 'encoder' in names:
      ids = jnp.arange(x.shape[0]) + 1   # scanned: block i -> i + 1
      s = layer_decay ** (num_layers + 1 - ids).astype(jnp.float32)
      return s.reshape((-1,) + (1,) * (x.ndim - 1))
    return layer_decay ** (num_layers + 1 - layer_id_for(names, num_layers))

  return jax.tree_util.tree_map_with_path(scale, params)


OPTIMIZERS = ('adamw', 'lars', 'sgd')


def freeze_labels(params, patterns: Sequence[str]):
  """'frozen' for leaves whose path ('encoder/blocks_0/attn/qkv/kernel')
  matches one of the regexes `patterns` (re.search), else 'train'."""
  rx = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'frozen' if any(r.search('/'.join(path_names(path)))
                                      for r in rx) else 'train', params)


def _masked(params, labels):
  """params with frozen leaves replaced by optax.MaskedNode (what
  multi_transform's inner transformation sees)."""
  return jax.tree.map(lambda p, l: p if l == 'train' else optax.MaskedNode(),
                      params, labels)


def make_tx(config, params=None) -> tuple[optax.GradientTransformation, Any]:
  """Builds (tx, schedule) from `config.optim` / `config.schedule`.

  optim.name:
    'adamw': AdamW (b1, b2, eps, decoupled weight_decay with the decay
      mask), optional layer decay (`layer_decay`, `num_layers`);
    'lars': MAE's LARS (`momentum`, `trust_coefficient`, weight_decay):
      1-D params (biases, norms) get neither weight decay nor trust
      scaling; momentum on the scaled update, then the lr (p -= lr * mu);
    'sgd': torch SGD with `momentum` (and weight_decay added to the
      gradient).
  optim.freeze: regexes of param paths that never change (probes): they
  get no update and no optimizer state.

  Args:
    config: the experiment ConfigDict.
    params: params tree (or shapes), needed for the masks and layer decay.

  Returns:
    The optax transformation and the lr schedule (for logging).
  """
  oc = config.optim
  schedule = make_schedule(config)
  name = oc.get('name', 'adamw')
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {name!r}; supported: {OPTIMIZERS}.')
  freeze = tuple(oc.get('freeze', None) or ())
  labels = freeze_labels(params, freeze) if freeze else None
  if labels is not None and 'train' not in jax.tree.leaves(labels):
    raise ValueError(f'optim.freeze={list(freeze)} freezes every param: '
                     'nothing would train.')
  trainable = _masked(params, labels) if labels is not None else params
  chain = []
  if oc.get('grad_clip_norm'):
    chain.append(clip_by_global_norm_torch(float(oc.grad_clip_norm)))
  wd = oc.get('weight_decay', 0.0)
  if name == 'adamw':
    mu_dtype = oc.get('mu_dtype')
    chain.append(optax.scale_by_adam(
        b1=oc.b1, b2=oc.b2, eps=oc.eps,
        mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None))
    if wd:
      mask = decay_mask(trainable, tuple(oc.get('wd_exclude', NO_DECAY)))
      chain.append(optax.add_decayed_weights(wd, mask))
  elif name == 'lars':
    matrices = matrix_mask(trainable)
    if wd:
      chain.append(optax.add_decayed_weights(wd, matrices))
    chain.append(optax.masked(scale_by_trust_ratio_per_layer(
        float(oc.get('trust_coefficient', 0.001))), matrices))
    chain.append(optax.trace(decay=float(oc.get('momentum', 0.9))))
  else:  # sgd
    if wd:
      chain.append(optax.add_decayed_weights(wd))
    chain.append(optax.trace(decay=float(oc.get('momentum', 0.9))))
  if oc.get('layer_decay'):
    scales = layer_decay_scales(trainable, oc.layer_decay, oc.num_layers)
    chain.append(optax.GradientTransformation(
        lambda _: optax.EmptyState(),
        lambda u, s, p=None: (jax.tree.map(lambda g, c: g * c, u, scales), s)))
  chain.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*chain)
  if labels is not None:
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               labels)
  return tx, schedule


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



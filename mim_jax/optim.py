"""The optax chain: schedule, any optimizer by name, decay grouping, clipping.

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
- any other optax optimizer by name (`optim.name='lion'`, 'adafactor', ...),
  its arguments from config.optim, inside the same clipping, weight-decay
  mask, layer decay and schedule (`make_tx`);
- frozen parameters (`optim.freeze`, probes): no update and no optimizer
  state.
"""

import dataclasses
import difflib
import inspect
import math
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from mim_jax import errors


def peak_lr(config) -> float:
  """`config.lr` if set, else `config.base_lr * batch_size / 256`."""
  if config.get('lr') is not None:
    return float(config.lr)
  return float(config.base_lr) * config.input.batch_size / 256


def steps_from(config, key: str) -> int:
  """Reads `{key}_steps` or `{key}_epochs` (x steps per epoch)."""
  steps, epochs = config.get(f'{key}_steps'), config.get(f'{key}_epochs')
  if (steps is None) == (epochs is None):
    raise errors.ConfigError(
        f'Set exactly one of config.{key}_steps and '
        f'config.{key}_epochs (got {steps} and {epochs}).')
  if steps is not None:
    return int(steps)
  n = config.input.get('num_train_examples')
  if not n:
    raise errors.ConfigError(
        f'config.{key}_epochs needs '
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
    raise errors.ConfigError(
        f'schedule.warmup={warmup!r}; use one of {WARMUPS}.')
  span = max(warmup_steps - (warmup == 'linspace'), 1)
  if total_steps <= warmup_steps:
    raise errors.ConfigError(
        f'total steps ({total_steps}) must exceed '
        f'warmup steps ({warmup_steps}).')

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
    errors.ConfigError: a momentum outside [0, 1), boundaries that do not
      increase, or lists of different lengths.
  """
  ema = config.get('ema') or {}
  values = [float(m) for m in ema.get('momentum') or ()]
  by_epoch = ema.get('boundary_epochs') is not None
  bounds = ema.get('boundary_epochs' if by_epoch else 'boundary_steps')
  bounds = [float(b) for b in (bounds if bounds is not None else [0])]
  if not values:
    raise errors.ConfigError(
        'config.ema.momentum is not set: give the EMA momentum, e.g. '
        '[0.999, 0.9999] with boundary_epochs [0, 100].')
  bad = [m for m in values if not 0.0 <= m < 1.0]
  if bad:
    raise errors.ConfigError(
        f'config.ema.momentum={values}: {bad} outside [0, 1); an EMA '
        'momentum m keeps m of the old weights per step.')
  if len(bounds) != len(values) or any(
      b >= a for b, a in zip(bounds, bounds[1:])):
    raise errors.ConfigError(
        f'config.ema boundaries {bounds} must increase and match '
        f'momentum {values} one to one.')
  spe = 1
  if by_epoch:
    n = config.input.get('num_train_examples')
    if not n:
      raise errors.ConfigError(
          'config.ema.boundary_epochs needs '
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


# The optimizers we implement ourselves. Any other `optim.name` is an optax
# optimizer function (optax.lion, optax.adafactor, ...). 'adamw' and 'sgd'
# are optax names too: ours keep the chains that runs and checkpoints were
# made with before any optax optimizer could be named (the same bits, the
# same optimizer-state tree), with the layer decay applied before the lr as
# torch's per-group lr does. 'lars' is MAE's `util/lars.py`, not optax.lars
# (which would also decay and trust-scale the 1-D params).
OWN_OPTIMIZERS = ('adamw', 'lars', 'sgd')

# The keyword arguments (config.optim fields) of our own optimizers;
# adamw's are those of optax.adamw, sgd's those of optax.sgd.
_OWN_ARGS = {
    'adamw': ('b1', 'b2', 'eps', 'eps_root', 'mu_dtype', 'nesterov'),
    'lars': ('momentum', 'trust_coefficient'),
    'sgd': ('momentum', 'nesterov', 'accumulator_dtype'),
}

# config.optim fields that make_tx reads itself, whatever the optimizer.
# Every other field that is not None is a keyword argument of the optimizer.
GENERIC_FIELDS = ('name', 'weight_decay', 'wd_exclude', 'grad_clip_norm',
                  'layer_decay', 'num_layers', 'freeze', 'mu_dtype')

# Arguments of optax optimizers that make_tx fills in itself: the lr
# schedule, the weight decay (optim.weight_decay) and its mask (from
# optim.wd_exclude), and the dtype of the first moment (optim.mu_dtype goes
# to the first of these names the optimizer takes).
_LR_ARG = 'learning_rate'
_WD_ARGS = ('weight_decay', 'weight_decay_rate')
_MASK_ARGS = ('mask', 'weight_decay_mask')
_MU_DTYPE_ARGS = ('mu_dtype', 'accumulator_dtype', 'dtype_momentum')

# optax optimizers that the train step cannot drive, and why.
_UNSUPPORTED = {
    'lbfgs': 'its line search needs the loss function in update()',
}


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """The optimizer that `config.optim` names, checked.

  Attributes:
    name: config.optim.name: one of OWN_OPTIMIZERS or an optax function.
    kwargs: its keyword arguments from config.optim (mu_dtype as a jnp
      dtype, under the name the optimizer gives it); never the lr, the
      weight decay or its mask.
    wd_arg: the argument of the optax function that takes
      optim.weight_decay; None when it has none (the decay is then added to
      the gradient) and for our own optimizers.
    mask_arg: the argument of the optax function that takes the
      weight-decay mask, or None.
  """
  name: str
  kwargs: dict
  wd_arg: Optional[str] = None
  mask_arg: Optional[str] = None


def _not_an_optimizer(name: str) -> Optional[str]:
  """Why `optax.<name>` is no optimizer make_tx can build; None if it is.

  The function's signature is optax's documented contract for its
  optimizers (hyperparameters are keyword arguments, the first is the
  learning rate): reading it is how config fields are matched to arguments,
  and a field it lacks is refused, never dropped.
  """
  fn = getattr(optax, name, None)
  if name.startswith('_') or not inspect.isfunction(fn):
    return 'optax has no function of that name'
  params = inspect.signature(fn).parameters
  if _LR_ARG not in params or name.startswith('scale_by'):
    return (f'optax.{name} is no optimizer (an optimizer function takes a '
            'learning_rate)')
  if name in _UNSUPPORTED:
    return f'optax.{name} cannot run in the train step: {_UNSUPPORTED[name]}'
  # rprop, sm3 and optimistic_adam take a number, not a schedule.
  if not any(t in str(params[_LR_ARG].annotation)
             for t in ('Callable', 'Schedule')):
    return (f'optax.{name} takes a constant learning_rate, and the lr here '
            'is a schedule')
  return None


def optax_optimizers() -> tuple[str, ...]:
  """The names of the optax optimizer functions optim.name can take."""
  return tuple(sorted(n for n in dir(optax) if not n.startswith('_')
                      and _not_an_optimizer(n) is None))


def _wd_exclude(optim_config) -> tuple[str, ...]:
  """optim.wd_exclude, NO_DECAY when unset."""
  exclude = optim_config.get('wd_exclude')
  return NO_DECAY if exclude is None else tuple(exclude)


def _arguments(name) -> tuple:
  """(where, accepted, required, wd_arg, mask_arg) of optimizer `name`:
  how messages name it, the config.optim fields it takes and needs, and
  the optax arguments of the weight decay and its mask (None: none)."""
  if name in OWN_OPTIMIZERS:
    return f'our {name!r}', _OWN_ARGS[name], (), None, None
  why = _not_an_optimizer(name) if isinstance(name, str) else 'not a string'
  if why:
    close = difflib.get_close_matches(
        str(name), OWN_OPTIMIZERS + optax_optimizers(), n=3)
    raise errors.ConfigError(
        f'config.optim.name={name!r}: {why}. Use one of ours, '
        f'{OWN_OPTIMIZERS}, or any optax optimizer function by name: '
        "'lion', 'adafactor', 'lamb', 'adam', 'rmsprop', ... (all of "
        f'optax {optax.__version__}: {", ".join(optax_optimizers())}).'
        + (f' Did you mean {" or ".join(map(repr, close))}?' if close
           else ''))
  params = inspect.signature(getattr(optax, name)).parameters
  wd_arg = next((a for a in _WD_ARGS if a in params), None)
  mask_arg = next((a for a in _MASK_ARGS if a in params), None)
  accepted = tuple(a for a, p in params.items()
                   if a not in (_LR_ARG, wd_arg, mask_arg)
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
  required = tuple(a for a in accepted
                   if params[a].default is inspect.Parameter.empty)
  return f'optax.{name}', accepted, required, wd_arg, mask_arg


def _mu_dtype_kwarg(mu_dtype, where: str, accepted) -> dict:
  """{the optimizer's moment-dtype argument: the jnp dtype} ({} unset)."""
  if not mu_dtype:
    return {}
  mu_arg = next((a for a in _MU_DTYPE_ARGS if a in accepted), None)
  if mu_arg is None:
    raise errors.ConfigError(
        f'config.optim.mu_dtype={mu_dtype!r}: {where} keeps no moment '
        f'whose dtype can be set (no argument {list(_MU_DTYPE_ARGS)}); '
        'unset optim.mu_dtype.')
  try:
    return {mu_arg: jnp.dtype(mu_dtype)}
  except TypeError as e:
    raise errors.ConfigError(
        f'config.optim.mu_dtype={mu_dtype!r} is not a dtype (e.g. '
        "'bfloat16', 'float32').") from e


def optimizer_spec(optim_config) -> OptimizerSpec:
  """Checks config.optim against the optimizer it names, before anything is
  built or compiled.

  Args:
    optim_config: config.optim.

  Returns:
    The optimizer and its keyword arguments.

  Raises:
    errors.ConfigError naming the field: an unknown optimizer name, a field
    the optimizer does not take (or that make_tx sets itself), a missing
    required argument, a mu_dtype the optimizer has no moment for.
  """
  oc = optim_config
  name = oc.get('name') or 'adamw'
  where, accepted, required, wd_arg, mask_arg = _arguments(name)
  fields = {k: v for k, v in oc.items()
            if k not in GENERIC_FIELDS and v is not None}
  reserved = sorted(set(fields) & set(
      (_LR_ARG,) + _WD_ARGS + _MASK_ARGS + _MU_DTYPE_ARGS))
  if reserved:
    raise errors.ConfigError(
        f'config.optim.{reserved[0]}={fields[reserved[0]]!r} is set by '
        'make_tx: the lr comes from the schedule (lr or base_lr, warmup, '
        'schedule.min_lr), the weight decay from optim.weight_decay and '
        'optim.wd_exclude, the moment dtype from optim.mu_dtype; remove '
        f'optim.{reserved[0]}.')
  unknown = sorted(set(fields) - set(accepted))
  if unknown:
    listed = ', '.join(f'config.optim.{k}={fields[k]!r}' for k in unknown)
    raise errors.ConfigError(
        f'config.optim.name={name!r}: {where} takes no {unknown} ({listed}). '
        f'Its arguments: {list(a for a in accepted if a not in _MU_DTYPE_ARGS)}'
        f'; make_tx itself reads {list(GENERIC_FIELDS)}. Remove the '
        f'field{"s" * (len(unknown) > 1)} in the config file (e.g. '
        f'c.optim.{unknown[0]} = None; the command line cannot unset a '
        'number).')
  missing = [a for a in required if a not in fields]
  if missing:
    raise errors.ConfigError(
        f'config.optim.name={name!r}: {where} needs config.optim.'
        f'{missing[0]} (required: {missing}).')
  kwargs = dict(fields, **_mu_dtype_kwarg(oc.get('mu_dtype'), where,
                                          accepted))
  if oc.get('weight_decay') and wd_arg and not mask_arg and _wd_exclude(oc):
    raise errors.ConfigError(
        f'config.optim.name={name!r}: {where} decays every param (it has '
        f'no mask argument), so optim.wd_exclude='
        f'{list(_wd_exclude(oc))} cannot apply: set '
        'optim.wd_exclude=() to decay biases and norms too, or '
        'optim.weight_decay=0.')
  layer_decay = oc.get('layer_decay')
  if layer_decay and not oc.get('num_layers'):
    raise errors.ConfigError(
        f'config.optim.layer_decay={layer_decay} needs '
        'config.optim.num_layers (the encoder depth).')
  return OptimizerSpec(name, kwargs, wd_arg, mask_arg)


def validate_config(config) -> None:
  """Raises errors.ConfigError, naming the field, for a config.optim that
  make_tx would refuse (`optimizer_spec`); no params needed, nothing
  compiled."""
  optimizer_spec(config.optim)


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


def _scale_by_layer_decay(params, layer_decay: float, num_layers: int
                          ) -> optax.GradientTransformation:
  """Multiplies each leaf's update by its `layer_decay_scales`."""
  scales = layer_decay_scales(params, layer_decay, num_layers)
  return optax.GradientTransformation(
      lambda _: optax.EmptyState(),
      lambda u, s, p=None: (jax.tree.map(lambda g, c: g * c, u, scales), s))


def _own_optimizer(spec: OptimizerSpec, weight_decay, decay_mask_fn,
                   trainable) -> list[optax.GradientTransformation]:
  """The chain of one of OWN_OPTIMIZERS, before layer decay and lr."""
  kw = spec.kwargs
  if spec.name == 'adamw':
    chain = [optax.scale_by_adam(**kw)]
    if weight_decay:
      chain.append(optax.add_decayed_weights(weight_decay, decay_mask_fn()))
    return chain
  if spec.name == 'lars':
    matrices = matrix_mask(trainable)
    chain = []
    if weight_decay:
      chain.append(optax.add_decayed_weights(weight_decay, matrices))
    chain.append(optax.masked(scale_by_trust_ratio_per_layer(
        float(kw.get('trust_coefficient', 0.001))), matrices))
    chain.append(optax.trace(decay=float(kw.get('momentum', 0.9))))
    return chain
  # sgd: torch's SGD, the decay added to the gradient.
  chain = []
  if weight_decay:
    chain.append(optax.add_decayed_weights(weight_decay, decay_mask_fn()))
  chain.append(optax.trace(decay=float(kw.get('momentum', 0.9)),
                           nesterov=bool(kw.get('nesterov', False)),
                           accumulator_dtype=kw.get('accumulator_dtype')))
  return chain


def _optax_optimizer(spec: OptimizerSpec, weight_decay, decay_mask_fn,
                     schedule) -> list[optax.GradientTransformation]:
  """`optax.<name>` with the lr schedule and the weight decay (its own
  argument, or added to the gradient before it; see `make_tx`)."""
  kwargs, chain = dict(spec.kwargs), []
  if spec.wd_arg is not None:
    # Always given: 0 must override optax's non-zero defaults.
    kwargs[spec.wd_arg] = float(weight_decay)
    if weight_decay and spec.mask_arg is not None:
      kwargs[spec.mask_arg] = decay_mask_fn()
  elif weight_decay:
    chain.append(optax.add_decayed_weights(float(weight_decay),
                                           decay_mask_fn()))
  chain.append(getattr(optax, spec.name)(learning_rate=schedule, **kwargs))
  return chain


def make_tx(config, params=None) -> tuple[optax.GradientTransformation, Any]:
  """Builds (tx, schedule) from `config.optim` / `config.schedule`.

  optim.name is one of ours or any optax optimizer function, by name:
    'adamw' (ours): AdamW (b1, b2, eps, eps_root, nesterov, mu_dtype;
      decoupled weight_decay with the decay mask), optax.adamw's numbers
      with the layer decay applied before the lr;
    'lars' (ours): MAE's LARS (`momentum`, `trust_coefficient`,
      weight_decay): 1-D params (biases, norms) get neither weight decay
      nor trust scaling, whatever wd_exclude says; momentum on the scaled
      update, then the lr (p -= lr * mu);
    'sgd' (ours): torch SGD with `momentum` (default 0.9), `nesterov`,
      weight_decay added to the gradient;
    any other name: `optax.<name>(learning_rate=schedule, **kwargs)` (e.g.
      'lion', 'adafactor'), kwargs the config.optim fields outside
      GENERIC_FIELDS (None: optax's default; an unknown field: an error).

  Around every optimizer, the same generic pieces, in this order:
    1. gradient clipping (`grad_clip_norm`, torch's formula);
    2. weight decay (`weight_decay`) on the params that `wd_exclude` does
       not name (`decay_mask`). The rule: an optax optimizer with a
       weight-decay argument (`weight_decay`: adamw, lion, lamb, nadamw,
       adan, ...; `weight_decay_rate`: adafactor) gets it, and the mask
       through its mask argument (`mask` / `weight_decay_mask`): the decay
       is then whatever that optimizer defines (decoupled; multiplied by
       the lr in lion and lamb, but not in adafactor). One without such
       an argument (adam, rmsprop, adagrad, sgd, ...) gets the decay added
       to the gradient before it (L2, like torch's `weight_decay` of SGD
       and Adam), masked the same way. weight_decay 0 turns optax's own
       defaults (adamw 1e-4, lion 1e-3) off;
    3. the optimizer, with `mu_dtype` as its first-moment dtype where it
       has one (`mu_dtype`, `accumulator_dtype` or `dtype_momentum`);
    4. layer-wise lr decay (`layer_decay`, `num_layers`): each leaf's
       update times its `layer_decay_scales` (before the lr for ours, after
       the optimizer, i.e. after the lr, for optax's: the same numbers up
       to rounding);
    5. the lr schedule (`make_schedule`): ours end with it, optax's take it
       as their learning_rate.
  optim.freeze: regexes of param paths that never change (probes).

  Args:
    config: the experiment ConfigDict.
    params: params tree (or shapes), needed for the masks and layer decay.

  Returns:
    The optax transformation and the lr schedule (for logging).

  Raises:
    errors.ConfigError: see `optimizer_spec`; or every param is frozen.
  """
  oc = config.optim
  spec = optimizer_spec(oc)
  schedule = make_schedule(config)
  freeze = tuple(oc.get('freeze', None) or ())
  labels = freeze_labels(params, freeze) if freeze else None
  if labels is not None and 'train' not in jax.tree.leaves(labels):
    raise errors.ConfigError(
        f'optim.freeze={list(freeze)} freezes every '
        'param: nothing would train.')
  trainable = _masked(params, labels) if labels is not None else params
  mask = lambda: decay_mask(trainable, _wd_exclude(oc))
  wd = oc.get('weight_decay') or 0.0
  chain = []
  if oc.get('grad_clip_norm'):
    chain.append(clip_by_global_norm_torch(float(oc.grad_clip_norm)))
  layer_decay = ([_scale_by_layer_decay(trainable, oc.layer_decay,
                                        oc.num_layers)]
                 if oc.get('layer_decay') else [])
  if spec.name in OWN_OPTIMIZERS:
    chain += _own_optimizer(spec, wd, mask, trainable)
    chain += layer_decay
    chain.append(optax.scale_by_learning_rate(schedule))
  else:
    chain += _optax_optimizer(spec, wd, mask, schedule)
    chain += layer_decay
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



"""Patch-mask generators that run inside the tf.data pipeline.

A mask function maps a stateless seed (int tensor of shape [2]) to a dict:
  noise: float32 (L,) per-patch noise in [0, 1).
  mask: float32 (L,), 1.0 = masked (removed from the encoder), 0.0 = visible.
where L = grid_height * grid_width patches in row-major order.

Generating masks in tf.data (rather than in the jitted train step) keeps them
reproducible from (seed, step, example index) alone, which makes resuming
exact, and moves the argsort off the accelerator's critical path.

Kinds: 'random' (MAE), 'block' (BEiT block-wise: the CAE exact-count, the
BEiT and the BootMAE variants) and 'grid' (MAE's grid ablation). New kinds
are added with `register_mask`:

  @masks.register_mask('grid')
  def _make_grid(mask_config, grid_height, grid_width):
    ...
    return mask_fn
"""

from typing import Any, Callable, Mapping, NamedTuple, Union

import numpy as np
import tensorflow as tf

from mim_jax import errors
from mim_jax.data import block_masks
from mim_jax.data import seeds
from mim_jax import masking

MaskFn = Callable[[tf.Tensor], dict[str, tf.Tensor]]


class BatchedMaskFn(NamedTuple):
  """A mask made once per batch on the host (numpy), for algorithms with
  data-dependent loops (block masks): one call per batch instead of one per
  example keeps the Python call overhead off each example.

  per_example(key) -> the private features (`features`, '_mask_*') of one
    example, from its stateless key only (so a mask never depends on its
    batch);
  per_batch(batch) -> the batch with those features replaced by
    'noise' and 'mask'.
  features: the names per_example makes and per_batch consumes. They are
    private: a caller makes them with per_example, before batching, and
    never by hand (their set changes with the kind's parameters and
    versions); per_batch names any missing or stray one.
  """
  per_example: Callable[[tf.Tensor], dict[str, tf.Tensor]]
  per_batch: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]
  features: tuple[str, ...]


# Prefix of the private per-example features of a `BatchedMaskFn`.
PRIVATE_PREFIX = '_mask_'


def _pop_features(batch: dict[str, tf.Tensor], features: tuple[str, ...],
                  what: str) -> list[tf.Tensor]:
  """Removes and returns `features` from `batch`, in order.

  Args:
    batch: the batched examples (a copy the caller may modify).
    features: the private features the per-batch stage consumes.
    what: the mask, for the message (e.g. "kind='block', variant='cae'").

  Raises:
    ValueError: the batch's private features are not exactly `features`
      (missing ones, or stray ones made by hand), naming both sets and how
      to make them.
  """
  private = sorted(k for k in batch if k.startswith(PRIVATE_PREFIX))
  if private != sorted(features):
    missing = [k for k in features if k not in batch]
    stray = [k for k in private if k not in features]
    problems = []
    if missing:
      problems.append(f'lacks {missing}')
    if stray:
      problems.append(f'has unexpected {stray}')
    raise ValueError(
        f'The per-batch stage of input.mask ({what}) needs exactly the '
        f'per-example features {list(features)}; the batch '
        f'{" and ".join(problems)} (batch keys: {sorted(batch)}). These '
        'features are private: make them with the mask\'s per-example '
        'stage before batching, never by hand: `per_example, per_batch = '
        'masks.stages(mask_fn)`, merge per_example(key) into each example, '
        'then .batch(b).map(per_batch), as '
        'input_pipeline.make_train_dataset does.')
  return [batch.pop(k) for k in features]


MaskBuilder = Callable[[Any, int, int], Union[MaskFn, BatchedMaskFn]]

_BUILDERS: dict[str, MaskBuilder] = {}


def register_mask(kind: str) -> Callable[[MaskBuilder], MaskBuilder]:
  """Decorator registering `builder(mask_config, grid_h, grid_w) -> MaskFn`."""

  def decorator(builder: MaskBuilder) -> MaskBuilder:
    if kind in _BUILDERS:
      raise ValueError(f'Mask kind {kind!r} is already registered.')
    _BUILDERS[kind] = builder
    return builder

  return decorator


def known_kinds() -> list[str]:
  """Returns the registered mask kinds."""
  return sorted(_BUILDERS)


def _get(config: Any, key: str, default: Any = None) -> Any:
  """Reads `key` from a dict or ConfigDict, returning `default` if absent."""
  if isinstance(config, Mapping) or hasattr(config, 'get'):
    return config.get(key, default)
  return getattr(config, key, default)


def get_ratio(mask_config: Any) -> float:
  """Returns the validated mask ratio of `mask_config`.

  Args:
    mask_config: dict/ConfigDict with a 'ratio' entry.

  Returns:
    The ratio as a float in (0, 1).

  Raises:
    errors.ConfigError: if the ratio is missing or not strictly between 0
      and 1.
  """
  ratio = _get(mask_config, 'ratio')
  try:
    value = float(ratio)
  except (TypeError, ValueError):
    value = float('nan')
  # `not (0 < value < 1)` also rejects NaN.
  if not 0.0 < value < 1.0:
    raise errors.ConfigError(
        f'input.mask.ratio={ratio!r} is invalid: the mask ratio is the '
        'fraction of patches removed and must be strictly between 0 and 1 '
        '(MAE uses 0.75). Set e.g. input.mask.ratio=0.75.')
  return value


def mask_from_noise(noise: tf.Tensor, len_keep: int) -> tf.Tensor:
  """Official MAE rule: keep the `len_keep` patches with the smallest noise.

  Args:
    noise: float (..., L) noise.
    len_keep: number of visible patches per row.

  Returns:
    float32 (..., L) mask, 1.0 = masked, 0.0 = kept.
  """
  ids_shuffle = tf.argsort(noise, axis=-1, stable=True)
  # ids_restore[i] is the rank of patch i in ascending noise order.
  ids_restore = tf.argsort(ids_shuffle, axis=-1, stable=True)
  return tf.cast(ids_restore >= len_keep, tf.float32)


@register_mask('random')
def _make_random(mask_config: Any, grid_height: int,
                 grid_width: int) -> MaskFn:
  """Uniform random masking (He et al., 2021): `ratio` of patches removed."""
  num_patches = grid_height * grid_width
  ratio = get_ratio(mask_config)
  len_keep = masking.num_visible(num_patches, ratio)
  if len_keep < 1:
    raise errors.ConfigError(
        f'input.mask.ratio={ratio} leaves no visible patch out of '
        f'{num_patches} ({grid_height}x{grid_width}); lower the ratio or use '
        'a smaller patch_size.')

  def mask_fn(seed: tf.Tensor) -> dict[str, tf.Tensor]:
    noise = tf.random.stateless_uniform([num_patches], seed=seed,
                                        dtype=tf.float32)
    return {'noise': noise, 'mask': mask_from_noise(noise, len_keep)}

  return mask_fn


def noise_for_mask(mask: tf.Tensor, uniform: tf.Tensor) -> tf.Tensor:
  """Noise whose ascending order lists the visible patches first, each group
  in random order: lets the noise-driven MAE model replay any mask."""
  return mask + 0.5 * uniform


def _check_count(mask_config: Any, num_masked: int, num_patches: int,
                 kind: str) -> None:
  """A `ratio` next to a fixed-count mask must agree with it: the model
  keeps int(L * (1 - ratio)) patches."""
  if _get(mask_config, 'ratio') is None:
    return
  expected = masking.num_masked(num_patches, get_ratio(mask_config))
  if expected != num_masked:
    raise errors.ConfigError(
        f'input.mask.kind={kind!r} masks {num_masked} of {num_patches} '
        f'patches but input.mask.ratio={_get(mask_config, "ratio")} (the '
        f'model\'s mask ratio) means {expected}; make them agree.')


@register_mask('block')
def _make_block(mask_config: Any, grid_height: int,
                grid_width: int) -> BatchedMaskFn:
  """BEiT block-wise masks (CAE, BootMAE), made per batch in numpy.

  Parameters: num_masking_patches (default: from `ratio`), min_num_patches
  (16), max_num_patches (None = num_masking_patches), min_aspect (0.3),
  max_aspect (None = 1 / min_aspect), variant ('cae' exact count, 'beit',
  'bootmae').

  BootMAE's effective mask: with `total_masked` (or `extra_random=True`,
  which takes it from `ratio`), random visible patches are added up to
  total_masked after a random roll in 0..`roll` (default 3), as upstream's
  `mask_to_index` (see `block_masks.add_random_patches`). Upstream draws
  one roll per batch; here each example draws its own, so a mask stays a
  function of (seed, step, example) alone.
  """
  num_patches = grid_height * grid_width
  count = _get(mask_config, 'num_masking_patches')
  if count is None:
    count = masking.num_masked(num_patches, get_ratio(mask_config))
  total = _get(mask_config, 'total_masked')
  if total is None and _get(mask_config, 'extra_random', False):
    total = masking.num_masked(num_patches, get_ratio(mask_config))
  max_roll = int(_get(mask_config, 'roll', 3))
  params = dict(
      num_masking_patches=int(count),
      min_num_patches=int(_get(mask_config, 'min_num_patches', 16)),
      max_num_patches=_get(mask_config, 'max_num_patches'),
      min_aspect=float(_get(mask_config, 'min_aspect', 0.3)),
      max_aspect=_get(mask_config, 'max_aspect'),
      variant=str(_get(mask_config, 'variant', 'cae')))
  block_masks.check_params(grid_height, grid_width, **params)
  if total is not None:
    total = int(total)
    block_masks.check_extra(num_patches, params['num_masking_patches'],
                            total, max_roll)
    _check_count(mask_config, total, num_patches, 'block')
  elif params['variant'] != 'beit':
    _check_count(mask_config, params['num_masking_patches'], num_patches,
                 'block')

  # The roll exists only with extra random patches (BootMAE's effective
  # mask); each feature has its own key stream, so leaving it out changes
  # no other feature.
  features = ('_mask_seed', '_mask_uniform')
  if total is not None:
    features += ('_mask_roll',)
  what = (f"kind='block', variant={params['variant']!r}, "
          f'total_masked={total}')

  def per_example(key: tf.Tensor) -> dict[str, tf.Tensor]:
    out = {'_mask_seed': seeds.to_int(key),
           '_mask_uniform': tf.random.stateless_uniform(
               [num_patches], seed=seeds.fold_in(key, 1), dtype=tf.float32)}
    if total is not None:
      out['_mask_roll'] = tf.random.stateless_uniform(
          [], seed=seeds.fold_in(key, 2), minval=0, maxval=max_roll + 1,
          dtype=tf.int32)
    return out

  def make(batch_seeds: np.ndarray, uniform: np.ndarray,
           roll: np.ndarray | None = None) -> np.ndarray:
    mask = block_masks.block_masks(batch_seeds, grid_height, grid_width,
                                   **params)
    if total is None:
      return mask
    return block_masks.add_random_patches(mask, uniform, roll, total)

  def per_batch(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    batch = dict(batch)
    inputs = _pop_features(batch, features, what)
    batch_seeds, uniform = inputs[:2]
    mask = tf.numpy_function(make, inputs, tf.float32, stateful=False)
    mask.set_shape(batch_seeds.shape.concatenate([num_patches]))
    batch['mask'] = mask
    batch['noise'] = noise_for_mask(mask, uniform)
    return batch

  return BatchedMaskFn(per_example, per_batch, features)


@register_mask('grid')
def _make_grid(mask_config: Any, grid_height: int,
               grid_width: int) -> MaskFn:
  """MAE's grid ablation: keeps one patch of every `stride` x `stride` cell
  (stride 2: 75% masked), the same patches in every image."""
  stride = int(_get(mask_config, 'stride', 2))
  side = min(grid_height, grid_width)
  if stride < 2 or stride > side:
    raise errors.ConfigError(
        f'input.mask.stride={stride} must be in 2..{side} for a '
        f'{grid_height}x{grid_width} grid.')
  rows, cols = np.meshgrid(np.arange(grid_height), np.arange(grid_width),
                           indexing='ij')
  keep = (rows % stride == 0) & (cols % stride == 0)
  fixed = tf.constant(1.0 - keep.reshape(-1), tf.float32)
  _check_count(mask_config, int((~keep).sum()), keep.size, 'grid')

  def mask_fn(seed: tf.Tensor) -> dict[str, tf.Tensor]:
    uniform = tf.random.stateless_uniform([keep.size], seed=seed,
                                          dtype=tf.float32)
    return {'noise': noise_for_mask(fixed, uniform), 'mask': fixed}

  return mask_fn


def make_mask_fn(mask_config: Any,
                 grid_size: Union[int, tuple[int, int]]) -> MaskFn:
  """Builds the mask function described by `mask_config`.

  Args:
    mask_config: dict/ConfigDict with 'kind' (default 'random') and the
      kind's parameters (e.g. 'ratio').
    grid_size: patches per side (int) or (grid_height, grid_width).

  Returns:
    fn(seed) -> dict(noise=float32 (L,), mask=float32 (L,)), with `seed` a
    stateless RNG seed (int32/int64 tensor of shape [2]); or, for kinds made
    per batch, a `BatchedMaskFn` (see `stages`).

  Raises:
    errors.ConfigError: on an unknown kind or invalid parameters.
  """
  if mask_config is None:
    mask_config = {}
  kind = _get(mask_config, 'kind', 'random')
  if kind not in _BUILDERS:
    raise errors.ConfigError(
        f'Unknown input.mask.kind={kind!r}. Known kinds: '
        f'{", ".join(known_kinds())}.')
  if isinstance(grid_size, int):
    grid_height = grid_width = grid_size
  else:
    grid_height, grid_width = (int(g) for g in grid_size)
  if grid_height < 1 or grid_width < 1:
    raise ValueError(f'Invalid patch grid {grid_height}x{grid_width}.')
  return _BUILDERS[kind](mask_config, grid_height, grid_width)


def stages(mask_fn: Union[MaskFn, BatchedMaskFn]):
  """(per-example fn, per-batch fn or None) of a mask function.

  The per-example fn maps an example's stateless key to features merged
  into the example: 'noise' and 'mask', or, for masks made per batch, the
  private features the per-batch fn turns into them after batching. Use
  both stages as a pair: the private features are not made by hand.
  """
  if isinstance(mask_fn, BatchedMaskFn):
    return mask_fn.per_example, mask_fn.per_batch
  return mask_fn, None

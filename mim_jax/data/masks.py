"""Patch-mask generators that run inside the tf.data pipeline.

A mask function maps a stateless seed (int tensor of shape [2]) to a dict:
  noise: float32 (L,) per-patch noise in [0, 1).
  mask: float32 (L,), 1.0 = masked (removed from the encoder), 0.0 = visible.
where L = grid_height * grid_width patches in row-major order.

Generating masks in tf.data (rather than in the jitted train step) keeps them
reproducible from (seed, step, example index) alone, which makes resuming
exact, and moves the argsort off the accelerator's critical path.

New kinds (e.g. 'block', 'grid') are added with `register_mask`:

  @masks.register_mask('grid')
  def _make_grid(mask_config, grid_height, grid_width):
    ...
    return mask_fn
"""

from typing import Any, Callable, Mapping, Union

import tensorflow as tf

MaskFn = Callable[[tf.Tensor], dict[str, tf.Tensor]]
MaskBuilder = Callable[[Any, int, int], MaskFn]

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
    ValueError: if the ratio is missing or not strictly between 0 and 1.
  """
  ratio = _get(mask_config, 'ratio')
  try:
    value = float(ratio)
  except (TypeError, ValueError):
    value = float('nan')
  # `not (0 < value < 1)` also rejects NaN.
  if not 0.0 < value < 1.0:
    raise ValueError(
        f'input.mask.ratio={ratio!r} is invalid: the mask ratio is the '
        'fraction of patches removed and must be strictly between 0 and 1 '
        '(MAE uses 0.75). Set e.g. input.mask.ratio=0.75.')
  return value


def num_visible(num_patches: int, ratio: float) -> int:
  """Number of kept patches, `int(L * (1 - ratio))` as in official MAE."""
  return int(num_patches * (1 - ratio))


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
  len_keep = num_visible(num_patches, ratio)
  if len_keep < 1:
    raise ValueError(
        f'input.mask.ratio={ratio} leaves no visible patch out of '
        f'{num_patches} ({grid_height}x{grid_width}); lower the ratio or use '
        'a smaller patch_size.')

  def mask_fn(seed: tf.Tensor) -> dict[str, tf.Tensor]:
    noise = tf.random.stateless_uniform([num_patches], seed=seed,
                                        dtype=tf.float32)
    return {'noise': noise, 'mask': mask_from_noise(noise, len_keep)}

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
    stateless RNG seed (int32/int64 tensor of shape [2]).

  Raises:
    ValueError: on an unknown kind or invalid parameters.
  """
  if mask_config is None:
    mask_config = {}
  kind = _get(mask_config, 'kind', 'random')
  if kind not in _BUILDERS:
    raise ValueError(
        f'Unknown input.mask.kind={kind!r}. Known kinds: '
        f'{", ".join(known_kinds())}.')
  if isinstance(grid_size, int):
    grid_height = grid_width = grid_size
  else:
    grid_height, grid_width = (int(g) for g in grid_size)
  if grid_height < 1 or grid_width < 1:
    raise ValueError(f'Invalid patch grid {grid_height}x{grid_width}.')
  return _BUILDERS[kind](mask_config, grid_height, grid_width)

"""BEiT block-wise masking (as used by CAE and BootMAE), fast, on the host.

The algorithm (methods.md section 5; BEiT `masking_generator.py`): rectangles
of log-uniform aspect ratio and uniform area in [min_num_patches, remaining]
are placed at random; a rectangle is accepted when it adds between 1 and
`max_mask_patches` new patches; one `_mask` call tries up to 10 rectangles.
Three variants differ only in when they stop:

  beit:    stop when a whole `_mask` call adds nothing (may end under target);
  cae:     keep calling `_mask` until exactly `num_masking_patches`;
  bootmae: `_mask` retries until it adds something, so it also ends exact.

`block_mask_reference` is a plain port of the upstream loop on a 2-D numpy
array. `block_mask` is the same algorithm on the whole grid stored as one Python
int (one AND and a popcount per rectangle instead of numpy slices), and
`block_masks` runs it over a batch of integer seeds: one call per batch
from tf.data keeps the per-call overhead off each example. A mask depends
only on its own seed.
"""

import math
import random
from typing import Optional

import numpy as np

from mim_jax import errors

VARIANTS = ('beit', 'cae', 'bootmae')
# A run that needs this many rectangles for one mask is stuck (the checks in
# `check_params` keep reachable targets far below it).
_MAX_ATTEMPTS = 100_000


def check_params(grid_h: int, grid_w: int, num_masking_patches: int,
                 min_num_patches: int, max_num_patches: Optional[int],
                 min_aspect: float, max_aspect: Optional[float],
                 variant: str) -> tuple[int, float, float]:
  """Validates the parameters; returns (max_num, log_lo, log_hi).

  Raises:
    errors.ConfigError naming the impossible value (its input.mask field)
    and the grid.
  """
  n = grid_h * grid_w
  if variant not in VARIANTS:
    raise errors.ConfigError(f'input.mask.variant={variant!r} is unknown; '
                             f'use one of {VARIANTS}.')
  if grid_h < 2 or grid_w < 2:
    raise errors.ConfigError(f'block masks need a grid of at least 2x2 '
                             f'patches, got {grid_h}x{grid_w}.')
  if not 1 <= num_masking_patches <= n:
    raise errors.ConfigError(
        f'input.mask.num_masking_patches={num_masking_patches} is '
        f'impossible for a {grid_h}x{grid_w} grid ({n} patches); use '
        f'1..{n} (CAE: 98 of 196).')
  # Rectangles must be smaller than the grid on both sides (upstream rule),
  # and the cells they can cover are the whole grid.
  max_num = num_masking_patches if max_num_patches is None else int(
      max_num_patches)
  if max_num < 1:
    raise errors.ConfigError(f'input.mask.max_num_patches={max_num_patches} '
                             'must be >= 1.')
  if min_num_patches < 1:
    raise errors.ConfigError(f'input.mask.min_num_patches={min_num_patches} '
                             'must be >= 1.')
  if min_num_patches > (grid_h - 1) * (grid_w - 1):
    raise errors.ConfigError(
        f'input.mask.min_num_patches={min_num_patches} is larger than the '
        f'biggest rectangle that fits a {grid_h}x{grid_w} grid '
        f'({(grid_h - 1) * (grid_w - 1)} patches).')
  max_aspect = max_aspect or 1.0 / min_aspect
  if not 0 < min_aspect <= max_aspect:
    raise errors.ConfigError(
        f'aspect range (input.mask.min_aspect, max_aspect) = ({min_aspect}, '
        f'{max_aspect}) must satisfy 0 < min <= max.')
  return max_num, math.log(min_aspect), math.log(max_aspect)


def block_mask_reference(rng: random.Random, grid_h: int, grid_w: int,
                         num_masking_patches: int, min_num_patches: int = 4,
                         max_num_patches: Optional[int] = None,
                         min_aspect: float = 0.3,
                         max_aspect: Optional[float] = None,
                         variant: str = 'beit') -> np.ndarray:
  """Plain port of the upstream loop: (grid_h, grid_w) int array, 1=masked."""
  max_num, log_lo, log_hi = check_params(
      grid_h, grid_w, num_masking_patches, min_num_patches, max_num_patches,
      min_aspect, max_aspect, variant)
  mask = np.zeros((grid_h, grid_w), np.int64)

  def one_call(max_mask_patches):
    delta, attempt = 0, 0
    while True:
      target_area = rng.uniform(min_num_patches, max_mask_patches)
      aspect = math.exp(rng.uniform(log_lo, log_hi))
      h = int(round(math.sqrt(target_area * aspect)))
      w = int(round(math.sqrt(target_area / aspect)))
      if w < grid_w and h < grid_h:
        top = rng.randint(0, grid_h - h)
        left = rng.randint(0, grid_w - w)
        num_masked = mask[top:top + h, left:left + w].sum()
        if 0 < h * w - num_masked <= max_mask_patches:
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1
      attempt += 1
      if delta > 0 or (variant != 'bootmae' and attempt >= 10):
        return delta

  count = 0
  while count < num_masking_patches:
    delta = one_call(min(num_masking_patches - count, max_num))
    if delta == 0 and variant == 'beit':
      break
    count += delta
  return mask


def rect_table(grid_h: int, grid_w: int) -> list[list[int]]:
  """table[h][w]: an h x w rectangle at the top-left corner of the grid, as
  an int whose bit r * grid_w + c is cell (r, c)."""
  table = [[0] * grid_w for _ in range(grid_h)]
  for h in range(1, grid_h):
    for w in range(1, grid_w):
      row = (1 << w) - 1
      table[h][w] = sum(row << (r * grid_w) for r in range(h))
  return table


def block_mask(seed: int, grid_h: int, grid_w: int, num_masking_patches: int,
               min_num_patches: int, max_num: int, log_lo: float,
               log_hi: float, variant: str, rects: list[list[int]],
               trace: Optional[list] = None) -> int:
  """The same algorithm on the whole grid held in one int (bit
  r * grid_w + c = cell (r, c)): counting the cells a rectangle would cover
  is one AND and a popcount. Takes the checked parameters of `check_params`
  and `rect_table(grid_h, grid_w)`; returns the mask as that int. `trace`
  collects (top, left, h, w, new, max_mask) of each accepted rectangle.
  """
  rand = random.Random(seed).random
  exp, sqrt = math.exp, math.sqrt
  span = log_hi - log_lo
  grid = count = attempts = 0
  while count < num_masking_patches:
    max_mask = min(num_masking_patches - count, max_num)
    spread = max_mask - min_num_patches
    delta = tries = 0
    while not delta:
      area = min_num_patches + spread * rand()
      aspect = exp(log_lo + span * rand())
      h = int(round(sqrt(area * aspect)))
      w = int(round(sqrt(area / aspect)))
      if w < grid_w and h < grid_h:
        top = int(rand() * (grid_h - h + 1))
        left = int(rand() * (grid_w - w + 1))
        rect = rects[h][w] << (top * grid_w + left)
        new = h * w - (grid & rect).bit_count()
        if 0 < new <= max_mask:
          grid |= rect
          delta = new
          if trace is not None:
            trace.append((top, left, h, w, new, max_mask))
      tries += 1
      if tries >= 10 and variant != 'bootmae':
        break
    if not delta and variant == 'beit':
      break
    count += delta
    attempts += tries
    if attempts > _MAX_ATTEMPTS:
      raise RuntimeError(
          f'block mask stuck at {count}/{num_masking_patches} patches after '
          f'{attempts} rectangles ({grid_h}x{grid_w}, min {min_num_patches},'
          f' max {max_num}).')
  return grid


def grid_ints_to_masks(grids: list[int], num_patches: int) -> np.ndarray:
  """Ints from `block_mask` -> float32 (B, num_patches), 1 = masked."""
  nbytes = (num_patches + 7) // 8
  raw = np.frombuffer(b''.join(g.to_bytes(nbytes, 'little') for g in grids),
                      np.uint8).reshape(len(grids), nbytes)
  bits = np.unpackbits(raw, axis=1, bitorder='little')[:, :num_patches]
  return bits.astype(np.float32)


def block_masks(seeds: np.ndarray, grid_h: int, grid_w: int,
                num_masking_patches: int, min_num_patches: int = 4,
                max_num_patches: Optional[int] = None,
                min_aspect: float = 0.3, max_aspect: Optional[float] = None,
                variant: str = 'beit') -> np.ndarray:
  """Masks for a batch of integer seeds: float32 (B, grid_h * grid_w)."""
  max_num, log_lo, log_hi = check_params(
      grid_h, grid_w, num_masking_patches, min_num_patches, max_num_patches,
      min_aspect, max_aspect, variant)
  rects = rect_table(grid_h, grid_w)
  grids = [block_mask(int(seed), grid_h, grid_w, num_masking_patches,
                      min_num_patches, max_num, log_lo, log_hi, variant, rects)
           for seed in np.asarray(seeds).reshape(-1).tolist()]
  return grid_ints_to_masks(grids, grid_h * grid_w)


def check_extra(num_patches: int, num_masking_patches: int,
                total_masked: int, max_roll: int) -> None:
  """Validates BootMAE's effective-mask parameters.

  Raises:
    errors.ConfigError naming the impossible count.
  """
  if not num_masking_patches <= total_masked <= num_patches:
    raise errors.ConfigError(
        f'input.mask.total_masked={total_masked} must lie between the block '
        f'count num_masking_patches={num_masking_patches} and the '
        f'{num_patches} patches (BootMAE: 120 block patches, 147 of 196 '
        'masked).')
  if max_roll < 0 or total_masked + max_roll > num_patches:
    raise errors.ConfigError(
        f'input.mask.roll={max_roll} must be in '
        f'0..{num_patches - total_masked}: the roll turns up to `roll` more '
        'visible patches into masked ones and there are '
        f'{num_patches - total_masked} left.')


def add_random_patches(block: np.ndarray, uniform: np.ndarray,
                       roll: np.ndarray, total_masked: int) -> np.ndarray:
  """BootMAE's effective mask (`utils.mask_to_index`, methods.md 4.2).

  Patches are ordered visible-first by key = block - uniform (each group in
  random order), the order is rolled right by `roll`, and the last
  `total_masked` positions are masked: the block patches minus the `roll`
  with the largest keys, plus total_masked - block count + roll random
  visible ones.

  Args:
    block: (B, L) block masks, 1 = masked.
    uniform: (B, L) U[0, 1) noise.
    roll: (B,) ints (upstream draws one per batch in {0, 1, 2, 3}).
    total_masked: masked patches per row (BootMAE: 147 of 196).

  Returns:
    float32 (B, L) effective masks, 1 = masked.
  """
  block = np.asarray(block, np.float32)
  key = 1.0 - ((1.0 - block) + np.asarray(uniform, np.float32))
  order = np.argsort(key, axis=1, kind='stable')
  n, length = order.shape
  cols = (np.arange(length)[None, :] - np.asarray(roll).reshape(n, 1)) % (
      length)
  rolled = np.take_along_axis(order, cols, axis=1)   # torch.roll(r, dim=1)
  mask = np.zeros((n, length), np.float32)
  np.put_along_axis(mask, rolled[:, length - total_masked:], 1.0, axis=1)
  return mask

"""The number of visible and masked patches: one definition for the input
pipeline, the models and the parity adapters.

The rule is the official MAE one, `len_keep = int(L * (1 - ratio))` in
Python floats (truncation). Fixed-count masks (CAE, BootMAE) are described
by the same ratio; a count M is turned into a ratio with `ratio_for`, whose
result gives back exactly M under this rule (M / L itself does not always:
int(49 * (1 - 36 / 49)) = 12, not 13).

Masks reach the models as both `noise` and `mask` (the pipeline makes the
noise so that its ascending order lists the visible patches first): MAE
reads the noise, because the official masking is argsort(noise) and the
order of the kept tokens is part of its outputs; CAE and BootMAE read the
mask and take visible and masked patches in increasing patch order, as
upstream's boolean indexing does. Each method's batch spec names what it
reads.
"""

import numpy as np

from mim_jax import errors


def num_visible(num_patches: int, ratio: float) -> int:
  """Kept patches per image: int(L * (1 - ratio)), as official MAE.

  Raises:
    errors.ConfigError: a ratio outside (0, 1).
  """
  ratio = float(ratio)
  if not 0.0 < ratio < 1.0:
    raise errors.ConfigError(f'mask ratio {ratio} must be in (0, 1) (the '
                             'fraction of patches removed; MAE uses 0.75).')
  return int(num_patches * (1 - ratio))


def num_masked(num_patches: int, ratio: float) -> int:
  """Masked patches per image: L - num_visible(L, ratio)."""
  return num_patches - num_visible(num_patches, ratio)


def num_inserted(num_patches: int, mask_ratio: float,
                 insert_ratio: float) -> int:
  """Robust-MAE encoder mask tokens per image: int(L * insert_ratio) of the
  L patches (the same truncation rule), taken from the masked ones.

  Raises:
    errors.ConfigError: a ratio outside (0, 1), or more tokens than masked
      patches.
  """
  insert_ratio = float(insert_ratio)
  if not 0.0 < insert_ratio < 1.0:
    raise errors.ConfigError(
        f'insert ratio {insert_ratio} must be in (0, 1) (the fraction of all '
        'patches given an encoder mask token; robust MAE uses 0.25).')
  count = int(num_patches * insert_ratio)
  masked = num_masked(num_patches, mask_ratio)
  if count > masked:
    raise errors.ConfigError(
        f'insert ratio {insert_ratio} asks for {count} encoder mask tokens '
        f'but only {masked} of the {num_patches} patches are masked (mask '
        f'ratio {mask_ratio}): the tokens go at masked positions, so use an '
        f'insert ratio of at most {masked / num_patches:g}.')
  return count


def ratio_for(count: int, num_patches: int) -> float:
  """The ratio closest to count / L for which `num_masked` gives `count`.

  Raises:
    ValueError: count outside 1..L-1.
  """
  if not 0 < count < num_patches:
    raise ValueError(f'{count} masked of {num_patches} patches: a mask must '
                     'hide at least one patch and keep at least one.')
  ratio = count / num_patches
  # Float rounding can put L * (1 - ratio) just under the integer L - count;
  # step the ratio down by ulps until the truncation lands on it.
  while num_masked(num_patches, ratio) > count:
    ratio = float(np.nextafter(ratio, 0.0))
  return ratio

"""timm's RandAugment in TensorFlow, for the fine-tuning input pipeline.

A port of `timm.data.auto_augment.rand_augment_transform` (timm 1.0) that
runs inside a `tf.data` map. All randomness is stateless: `apply(image, seed,
spec)` is a pure function of the image and the seed, so a fine-tuning batch
can be reproduced from (seed, step, example index) alone.

Each of `spec.num_layers` layers picks one op uniformly (with replacement)
from the op set and applies it with probability `spec.prob_per_op`, at a
magnitude drawn for that call: Normal(magnitude, magnitude_std) (uniform in
[0, magnitude] when the std is infinite) clipped to [0, magnitude_max]. The
op turns the magnitude (a level on a 0..10 scale) into its argument exactly
as timm's `LEVEL_TO_ARG` does, including the random sign of the signed ops.

The ops reproduce the PIL functions timm calls (ImageOps, ImageEnhance and
Image.transform with PIL's own bilinear and bicubic filters, in float64)
pixel for pixel, up to float rounding. As in timm, the affine ops pick
bilinear or bicubic at random per call unless an interpolation is given
(`apply(..., interpolation=)`). One deliberate difference: Posterize
with 0 bits (level 10 of PosterizeIncreasing, levels below 2.5 of Posterize)
gives a black image, as PIL did before Pillow made `ImageOps.posterize`
reject bits < 1 (with which timm raises).

Usage in a pipeline:

  spec = randaugment.parse('rand-m9-mstd0.5-inc1')
  image = randaugment.apply(image, seed, spec)  # uint8 (H, W, 3)
"""

import dataclasses
import functools
import math
import re
from typing import Callable, Optional, Sequence, Union

import tensorflow as tf

from mim_jax import errors

# timm's `img_mean` for ImageNet: round(255 * IMAGENET_DEFAULT_MEAN).
DEFAULT_FILL = (124, 116, 104)

# Magnitudes are levels on a 0.._LEVEL_DENOM scale (timm's _LEVEL_DENOM).
_LEVEL_DENOM = 10.0

# PIL resampling filters of the affine ops.
_INTERPOLATIONS = ('bilinear', 'bicubic')

# The valid form of a spec, for error messages.
_FORM = ("'rand' then '-'-separated pieces m<int> (magnitude), n<int> "
         "(layers), mstd<float> (magnitude std), mmax<int> (magnitude "
         "bound), inc<0|1> (increasing ops), p<float> (probability per op), "
         "e.g. input.randaugment='rand-m9-mstd0.5-inc1'")

# A float or bool that may be a Python value or a scalar tensor.
Scalar = Union[float, bool, tf.Tensor]
Op = Callable[..., tf.Tensor]


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """A parsed RandAugment spec; the defaults are timm's.

  Attributes:
    num_layers: ops applied per image (timm `n`).
    magnitude: mean magnitude level, 0..magnitude_max (timm `m`).
    magnitude_std: std of the per-call magnitude noise; 0 disables it and
      `math.inf` samples uniformly in [0, magnitude] (timm `mstd`).
    increasing: use the op set whose severity increases with the magnitude
      (timm `inc1`).
    prob_per_op: probability that a chosen op is applied (timm `p`).
    magnitude_max: upper clip of the sampled magnitude (timm `mmax`).
  """
  num_layers: int = 2
  magnitude: int = 10
  magnitude_std: float = 0.0
  increasing: bool = False
  prob_per_op: float = 0.5
  magnitude_max: int = 10

  @property
  def op_names(self) -> tuple[str, ...]:
    """The op set sampled from, in timm's order."""
    return INCREASING_OPS if self.increasing else DEFAULT_OPS


def _parse_int(piece: str, value: str, minimum: int) -> int:
  if not re.fullmatch(r'\d+', value) or int(value) < minimum:
    raise errors.ConfigError(f'RandAugment piece {piece!r}: expected an '
                             f'integer >= {minimum}; the valid form is '
                             f'{_FORM}.')
  return int(value)


def _parse_float(piece: str, value: str, maximum: float) -> float:
  try:
    number = float(value)
  except ValueError:
    number = math.nan
  if not 0 <= number <= maximum:
    raise errors.ConfigError(f'RandAugment piece {piece!r}: expected a '
                             f'number in [0, {maximum}]; the valid form is '
                             f'{_FORM}.')
  return number


def parse(spec: Optional[str]) -> Optional[RandAugmentSpec]:
  """Parses a timm RandAugment string such as 'rand-m9-mstd0.5-inc1'.

  Unlike timm, which skips pieces it cannot read and lets the last of a
  repeated piece win (the first for mstd/mmax), every piece must be valid
  and appear once. timm's transform-set piece ('t...') is not supported.

  Args:
    spec: the spec; None or '' means no RandAugment.

  Returns:
    The parsed spec, or None for an empty spec.

  Raises:
    errors.ConfigError: naming the bad piece and the valid form.
  """
  if not spec:
    return None
  pieces = spec.split('-')
  if pieces[0] != 'rand':
    raise errors.ConfigError(f'RandAugment spec {spec!r} must start with '
                             f"'rand'; the valid form is {_FORM}.")
  fields = {}
  for piece in pieces[1:]:
    # As in timm: the key is what precedes the first digit.
    match = re.fullmatch(r'([a-z]+)(\d.*)', piece)
    key, value = match.groups() if match else (piece, '')
    if key == 'm':
      name, number = 'magnitude', _parse_int(piece, value, 0)
    elif key == 'n':
      name, number = 'num_layers', _parse_int(piece, value, 0)
    elif key == 'mmax':
      name, number = 'magnitude_max', _parse_int(piece, value, 1)
    elif key == 'inc':
      if value not in ('0', '1'):
        raise errors.ConfigError(f'RandAugment piece {piece!r}: expected '
                                 f'inc0 or inc1; the valid form is {_FORM}.')
      name, number = 'increasing', value == '1'
    elif key == 'mstd':
      name, number = 'magnitude_std', _parse_float(piece, value, math.inf)
      # timm: a std above 100 means uniform sampling in [0, magnitude].
      if number > 100:
        number = math.inf
    elif key == 'p':
      name, number = 'prob_per_op', _parse_float(piece, value, 1.0)
    else:
      raise errors.ConfigError(f'Unknown RandAugment piece {piece!r} in '
                               f'{spec!r}; the valid form is {_FORM}.')
    if name in fields:
      raise errors.ConfigError(f'RandAugment piece {piece!r} repeats {key!r} '
                               f'in {spec!r}; the valid form is {_FORM}.')
    fields[name] = number
  return RandAugmentSpec(**fields)


# ----------------------------------------------------------------------------
# PIL operations on uint8 (H, W, 3) tensors, with timm's arguments.


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Clips to [0, 255] and truncates, as PIL stores float results."""
  return tf.cast(tf.floor(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor,
           factor: Scalar) -> tf.Tensor:
  """PIL `Image.blend(degenerate, image, factor)`, the ImageEnhance core.

  PIL computes in single precision and truncates; factors outside [0, 1]
  extrapolate and are clipped.
  """
  degenerate = tf.cast(degenerate, tf.float32)
  factor = tf.cast(factor, tf.float32)
  return _to_uint8(degenerate +
                   factor * (tf.cast(image, tf.float32) - degenerate))


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL's RGB -> L conversion, int32 (H, W, 1).

  PIL's fixed-point form of L = 0.299 R + 0.587 G + 0.114 B, rounded.
  """
  rgb = tf.cast(image, tf.int32)
  weighted = (rgb[..., 0:1] * 19595 + rgb[..., 1:2] * 38470 +
              rgb[..., 2:3] * 7471 + 0x8000)
  return tf.bitwise.right_shift(weighted, 16)


def invert(image: tf.Tensor) -> tf.Tensor:
  """PIL `ImageOps.invert`: 255 - x."""
  return 255 - image


def posterize(image: tf.Tensor, bits: Scalar) -> tf.Tensor:
  """PIL `ImageOps.posterize`: keeps the top `bits` bits of each value.

  Args:
    image: uint8 (H, W, 3).
    bits: bits kept; 8 or more is the identity, 0 or less gives black.

  Returns:
    uint8 (H, W, 3).
  """
  shift = 8 - tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  values = tf.cast(image, tf.int32)
  # In int32, a shift by 8 clears every bit (in uint8 it would not).
  kept = tf.bitwise.left_shift(tf.bitwise.right_shift(values, shift), shift)
  return tf.cast(kept, tf.uint8)


def solarize(image: tf.Tensor, threshold: Scalar) -> tf.Tensor:
  """PIL `ImageOps.solarize`: inverts the values >= `threshold` (0..256)."""
  values = tf.cast(image, tf.int32)
  return tf.where(values < tf.cast(threshold, tf.int32), image, 255 - image)


def solarize_add(image: tf.Tensor, addition: Scalar,
                 threshold: int = 128) -> tf.Tensor:
  """timm `solarize_add`: adds `addition` to the values < `threshold`."""
  values = tf.cast(image, tf.int32)
  added = tf.minimum(values + tf.cast(addition, tf.int32), 255)
  return tf.cast(tf.where(values < threshold, added, values), tf.uint8)


def color(image: tf.Tensor, factor: Scalar) -> tf.Tensor:
  """PIL `ImageEnhance.Color`: blends with the grayscale image."""
  return _blend(_grayscale(image), image, factor)


def contrast(image: tf.Tensor, factor: Scalar) -> tf.Tensor:
  """PIL `ImageEnhance.Contrast`: blends with the mean gray level."""
  gray = _grayscale(image)
  mean = tf.reduce_mean(tf.cast(gray, tf.float64))
  # PIL rounds the mean to an integer level (int(mean + 0.5)).
  return _blend(tf.floor(mean + 0.5), image, factor)


def brightness(image: tf.Tensor, factor: Scalar) -> tf.Tensor:
  """PIL `ImageEnhance.Brightness`: blends with black."""
  return _blend(tf.zeros([], tf.float32), image, factor)


def sharpness(image: tf.Tensor, factor: Scalar) -> tf.Tensor:
  """PIL `ImageEnhance.Sharpness`: blends with the smoothed image.

  The degenerate image is PIL's `ImageFilter.SMOOTH` ([[1, 1, 1], [1, 5, 1],
  [1, 1, 1]] / 13, rounded), which leaves the one-pixel border as it is.

  Args:
    image: uint8 (H, W, 3).
    factor: 0 smooths, 1 is the identity, 2 sharpens.

  Returns:
    uint8 (H, W, 3).
  """
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  padded = tf.pad(tf.cast(image, tf.int32), [[1, 1], [1, 1], [0, 0]])
  total = 4 * padded[1:height + 1, 1:width + 1]
  for dy in range(3):
    for dx in range(3):
      total += padded[dy:dy + height, dx:dx + width]
  # The exact sum / 13 is never halfway between integers, so this is PIL's
  # float rounding done in integers.
  smooth = (total + 6) // 13
  rows = tf.range(height)
  cols = tf.range(width)
  interior = (((rows > 0) & (rows < height - 1))[:, None, None] &
              ((cols > 0) & (cols < width - 1))[None, :, None])
  degenerate = tf.where(interior, smooth, tf.cast(image, tf.int32))
  return _blend(degenerate, image, factor)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """PIL `ImageOps.autocontrast` (no cutoff): stretches each channel.

  Each channel's [min, max] maps linearly onto [0, 255], truncated; a
  constant channel is left alone. Float64 reproduces PIL's Python LUT.

  Args:
    image: uint8 (H, W, 3).

  Returns:
    uint8 (H, W, 3).
  """
  values = tf.cast(image, tf.float64)
  low = tf.reduce_min(values, axis=[0, 1])
  high = tf.reduce_max(values, axis=[0, 1])
  scale = 255.0 / tf.maximum(high - low, 1.0)
  offset = -low * scale
  stretched = tf.clip_by_value(tf.floor(values * scale + offset), 0.0, 255.0)
  return tf.cast(tf.where(high > low, stretched, values), tf.uint8)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL `ImageOps.equalize`: per-channel histogram equalisation.

  PIL's rule, per channel: with `step = (n - n_max) // 255` (n pixels, n_max
  of them at the channel's largest value), value v maps to
  `(step // 2 + #pixels below v) // step`, clipped to 255; a channel with one
  distinct value or step 0 is left alone.

  Args:
    image: uint8 (H, W, 3).

  Returns:
    uint8 (H, W, 3).
  """
  values = tf.cast(image, tf.int32)
  # One bincount for the three channels: channel c counts in bins 256c + v.
  binned = values + tf.constant([0, 256, 512], tf.int32)
  hist = tf.reshape(
      tf.math.bincount(tf.reshape(binned, [-1]), minlength=768,
                       maxlength=768, dtype=tf.int64), [3, 256])
  total = tf.reduce_sum(hist, axis=1)
  top = tf.reduce_max(values, axis=[0, 1])
  top_count = tf.gather(hist, top, batch_dims=1)
  step = (total - top_count) // 255
  lut = (step[:, None] // 2 + tf.cumsum(hist, axis=1, exclusive=True)
        ) // tf.maximum(step, 1)[:, None]
  lut = tf.minimum(lut, 255)
  equalized = tf.gather(tf.reshape(lut, [-1]), binned)
  keep = (tf.math.count_nonzero(hist, axis=1) <= 1) | (step == 0)
  return tf.cast(tf.where(keep, values, tf.cast(equalized, tf.int32)),
                 tf.uint8)


def _cubic(v1, v2, v3, v4, t):
  """PIL's cubic through v2 (t = 0) and v3 (t = 1), its BICUBIC macro."""
  p2 = v3 - v1
  p3 = 2 * (v1 - v2) + v3 - v4
  p4 = v2 - v1 - v3 + v4
  return v2 + t * (p2 + t * (p3 + t * p4))


def _linear(v1, v2, t):
  """PIL's BILINEAR macro."""
  return v1 + (v2 - v1) * t


def _sample(image: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
            interpolation: str) -> tf.Tensor:
  """Interpolates `image` at PIL coordinates (pixel centres at n + 0.5).

  The neighbours of a point are clamped to the image, as in PIL's transform
  filters, and the arithmetic is PIL's, in float64.

  Args:
    image: uint8 (H, W, 3).
    x: float64 (h, w) column coordinates.
    y: float64 (h, w) row coordinates.
    interpolation: 'bilinear' or 'bicubic'.

  Returns:
    float64 (h, w, 3), not clipped.
  """
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  # Gathering uint8 and converting after is faster than gathering float64.
  pixels = tf.reshape(image, [-1, 3])
  x = x - 0.5
  y = y - 0.5
  x_floor = tf.floor(x)
  y_floor = tf.floor(y)
  dx = (x - x_floor)[..., None]
  dy = (y - y_floor)[..., None]
  x_floor = tf.cast(x_floor, tf.int32)
  y_floor = tf.cast(y_floor, tf.int32)
  if interpolation == 'bilinear':
    offsets, combine = (0, 1), _linear
  else:
    offsets, combine = (-1, 0, 1, 2), _cubic
  cols = [tf.clip_by_value(x_floor + k, 0, width - 1) for k in offsets]
  rows = []
  for k in offsets:
    row_start = tf.clip_by_value(y_floor + k, 0, height - 1) * width
    rows.append(combine(*[tf.cast(tf.gather(pixels, row_start + col),
                                  tf.float64) for col in cols], dx))
  return combine(*rows, dy)


def affine(image: tf.Tensor, coeffs: Sequence[Scalar],
           fill: Sequence[int] = DEFAULT_FILL,
           interpolation: str = 'bilinear') -> tf.Tensor:
  """PIL `Image.transform(size, AFFINE, coeffs, resample, fillcolor=fill)`.

  Output pixel (x, y) samples the input at (a x + b y + c, d x + e y + f) in
  PIL's coordinates, where pixel centres lie at half-integers. As in PIL, a
  sample point inside the image interpolates (with the neighbours clamped to
  the edge), one outside gives `fill`, and the result is clipped and
  truncated.

  Args:
    image: uint8 (H, W, 3).
    coeffs: (a, b, c, d, e, f), Python floats or float scalar tensors.
    fill: RGB colour of the uncovered pixels.
    interpolation: 'bilinear' or 'bicubic' (PIL's BILINEAR, BICUBIC).

  Returns:
    uint8 (H, W, 3).
  """
  if interpolation not in _INTERPOLATIONS:
    raise ValueError(f'interpolation must be one of {_INTERPOLATIONS}, got '
                     f'{interpolation!r}.')
  a, b, c, d, e, f = [tf.cast(v, tf.float64) for v in coeffs]
  shape = tf.shape(image)
  height = tf.cast(shape[0], tf.float64)
  width = tf.cast(shape[1], tf.float64)
  x = tf.range(width, dtype=tf.float64)[None, :] + 0.5
  y = tf.range(height, dtype=tf.float64)[:, None] + 0.5
  # In PIL's order of operations, so that the points match PIL's exactly.
  x_in = a * x + b * y + c
  y_in = d * x + e * y + f
  inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
  sampled = _sample(image, x_in, y_in, interpolation)
  fill = tf.constant(fill, tf.float64)
  out = _to_uint8(tf.where(inside[..., None], sampled, fill))
  out.set_shape(image.shape)
  return out


def _rotate_coeffs(image: tf.Tensor, degrees: Scalar) -> list[tf.Tensor]:
  """PIL's `Image.rotate` matrix, computed step by step as PIL does."""
  shape = tf.cast(tf.shape(image), tf.float64)
  center_x, center_y = shape[1] / 2, shape[0] / 2
  angle = -tf.math.floormod(tf.cast(degrees, tf.float64), 360.0) * (
      math.pi / 180)
  # Rounding to 15 decimals, as PIL does, makes multiples of 90 degrees
  # exact.
  cos = tf.round(tf.cos(angle) * 1e15) / 1e15
  sin = tf.round(tf.sin(angle) * 1e15) / 1e15
  c = cos * -center_x + sin * -center_y + center_x
  f = -sin * -center_x + cos * -center_y + center_y
  return [cos, sin, c, -sin, cos, f]


def _shear_x_coeffs(image: tf.Tensor, factor: Scalar) -> list[Scalar]:
  del image  # Unused.
  return [1.0, factor, 0.0, 0.0, 1.0, 0.0]


def _shear_y_coeffs(image: tf.Tensor, factor: Scalar) -> list[Scalar]:
  del image  # Unused.
  return [1.0, 0.0, 0.0, factor, 1.0, 0.0]


def _translate_x_coeffs(image: tf.Tensor, pixels: Scalar) -> list[Scalar]:
  del image  # Unused.
  return [1.0, 0.0, pixels, 0.0, 1.0, 0.0]


def _translate_y_coeffs(image: tf.Tensor, pixels: Scalar) -> list[Scalar]:
  del image  # Unused.
  return [1.0, 0.0, 0.0, 0.0, 1.0, pixels]


def rotate(image: tf.Tensor, degrees: Scalar,
           fill: Sequence[int] = DEFAULT_FILL,
           interpolation: str = 'bilinear') -> tf.Tensor:
  """PIL `Image.rotate(degrees)`: counter-clockwise about the centre."""
  return affine(image, _rotate_coeffs(image, degrees), fill, interpolation)


def shear_x(image: tf.Tensor, factor: Scalar,
            fill: Sequence[int] = DEFAULT_FILL,
            interpolation: str = 'bilinear') -> tf.Tensor:
  """timm `shear_x`: samples x + factor * y (about the top-left corner)."""
  return affine(image, _shear_x_coeffs(image, factor), fill, interpolation)


def shear_y(image: tf.Tensor, factor: Scalar,
            fill: Sequence[int] = DEFAULT_FILL,
            interpolation: str = 'bilinear') -> tf.Tensor:
  """timm `shear_y`: samples y + factor * x (about the top-left corner)."""
  return affine(image, _shear_y_coeffs(image, factor), fill, interpolation)


def translate_x(image: tf.Tensor, pixels: Scalar,
                fill: Sequence[int] = DEFAULT_FILL,
                interpolation: str = 'bilinear') -> tf.Tensor:
  """timm `translate_x_abs`: the content moves `pixels` to the left."""
  return affine(image, _translate_x_coeffs(image, pixels), fill,
                interpolation)


def translate_y(image: tf.Tensor, pixels: Scalar,
                fill: Sequence[int] = DEFAULT_FILL,
                interpolation: str = 'bilinear') -> tf.Tensor:
  """timm `translate_y_abs`: the content moves `pixels` up."""
  return affine(image, _translate_y_coeffs(image, pixels), fill,
                interpolation)


# ----------------------------------------------------------------------------
# timm's ops: the functions above with timm's level -> argument mappings.
#
# Every op has the signature (the uniform one tf.switch_case needs)
#   op(image, level, negate=False, fill=DEFAULT_FILL, interpolation='bilinear')
# where `level` is the magnitude, a float (or float scalar tensor) on the
# 0..10 scale, and `negate` is timm's random sign (a bool or bool scalar
# tensor), used by the signed ops only; `fill` and `interpolation` are used
# by the affine ops only. Level arithmetic is in float64 so that integer
# levels give timm's exact arguments.


def _fraction(level: Scalar) -> tf.Tensor:
  return tf.cast(level, tf.float64) / _LEVEL_DENOM


def _signed(value: tf.Tensor, negate: Scalar) -> tf.Tensor:
  return tf.where(tf.cast(negate, tf.bool), -value, value)


def _int(value: tf.Tensor) -> tf.Tensor:
  """Python's int() for the non-negative values of the level mappings."""
  return tf.cast(tf.floor(value), tf.int32)


def _pixel_op(fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]) -> Op:
  """Makes an op of `fn(image, fraction)`, fraction = level / 10."""

  def op(image, level, negate=False, fill=DEFAULT_FILL,
         interpolation='bilinear'):
    del negate, fill, interpolation  # Unused by the unsigned pixel ops.
    return fn(image, _fraction(level))

  return op


def _enhance_op(enhance: Callable[[tf.Tensor, Scalar], tf.Tensor],
                increasing: bool) -> Op:
  """Makes an op of an ImageEnhance function."""

  def op(image, level, negate=False, fill=DEFAULT_FILL,
         interpolation='bilinear'):
    del fill, interpolation  # Unused.
    if increasing:
      # 1 -/+ up to 0.9: the severity grows away from 1 (the identity).
      factor = tf.maximum(1.0 + _signed(_fraction(level) * 0.9, negate), 0.1)
    else:
      factor = _fraction(level) * 1.8 + 0.1
    return enhance(image, factor)

  return op


def _posterize_bits(fraction):
  return _int(fraction * 4.0)


def _solarize_threshold(fraction):
  return tf.minimum(_int(fraction * 256.0), 256)


def _level_coeffs(coeffs_fn: Callable[[tf.Tensor, Scalar], list[Scalar]],
                  scale: float, relative_axis: Optional[int] = None
                  ) -> Callable[[tf.Tensor, Scalar, Scalar], tf.Tensor]:
  """Maps (image, level, negate) to the affine coefficients of a timm op.

  Args:
    coeffs_fn: `coeffs_fn(image, argument)`, the 6 affine coefficients.
    scale: the argument at level 10, before the random sign.
    relative_axis: if set, the argument is also multiplied by this image
      dimension (timm's relative translations).

  Returns:
    `fn(image, level, negate)` -> float64 [6].
  """

  def fn(image, level, negate):
    argument = _signed(_fraction(level) * scale, negate)
    if relative_axis is not None:
      argument *= tf.cast(tf.shape(image)[relative_axis], tf.float64)
    return tf.stack([tf.cast(v, tf.float64)
                     for v in coeffs_fn(image, argument)])

  return fn


# The affine ops, as coefficient functions: one affine warp serves them all
# in `apply`, which keeps the tf.data graph small.
_AFFINE_COEFFS = {
    'Rotate': _level_coeffs(_rotate_coeffs, 30.0),
    'ShearX': _level_coeffs(_shear_x_coeffs, 0.3),
    'ShearY': _level_coeffs(_shear_y_coeffs, 0.3),
    'TranslateXRel': _level_coeffs(_translate_x_coeffs, 0.45,
                                   relative_axis=1),
    'TranslateYRel': _level_coeffs(_translate_y_coeffs, 0.45,
                                   relative_axis=0),
}

# The ops whose interpolation timm draws at random.
AFFINE_OPS = frozenset(_AFFINE_COEFFS)


def _affine_op(name: str) -> Op:
  """Makes the op of an affine transform."""

  def op(image, level, negate=False, fill=DEFAULT_FILL,
         interpolation='bilinear'):
    coeffs = _AFFINE_COEFFS[name](image, level, negate)
    return affine(image, tf.unstack(coeffs, 6), fill, interpolation)

  return op


OPS: dict[str, Op] = {
    'AutoContrast': _pixel_op(lambda image, _: auto_contrast(image)),
    'Equalize': _pixel_op(lambda image, _: equalize(image)),
    'Invert': _pixel_op(lambda image, _: invert(image)),
    'Rotate': _affine_op('Rotate'),
    'Posterize': _pixel_op(
        lambda image, t: posterize(image, _posterize_bits(t))),
    'PosterizeIncreasing': _pixel_op(
        lambda image, t: posterize(image, 4 - _posterize_bits(t))),
    'Solarize': _pixel_op(
        lambda image, t: solarize(image, _solarize_threshold(t))),
    'SolarizeIncreasing': _pixel_op(
        lambda image, t: solarize(image, 256 - _solarize_threshold(t))),
    'SolarizeAdd': _pixel_op(
        lambda image, t: solarize_add(image, tf.minimum(_int(t * 110), 128))),
    'Color': _enhance_op(color, increasing=False),
    'ColorIncreasing': _enhance_op(color, increasing=True),
    'Contrast': _enhance_op(contrast, increasing=False),
    'ContrastIncreasing': _enhance_op(contrast, increasing=True),
    'Brightness': _enhance_op(brightness, increasing=False),
    'BrightnessIncreasing': _enhance_op(brightness, increasing=True),
    'Sharpness': _enhance_op(sharpness, increasing=False),
    'SharpnessIncreasing': _enhance_op(sharpness, increasing=True),
    'ShearX': _affine_op('ShearX'),
    'ShearY': _affine_op('ShearY'),
    'TranslateXRel': _affine_op('TranslateXRel'),
    'TranslateYRel': _affine_op('TranslateYRel'),
}

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in its order
# (Cutout is left to random erasing, as in timm).
DEFAULT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize',
               'Solarize', 'SolarizeAdd', 'Color', 'Contrast', 'Brightness',
               'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
               'TranslateYRel')
INCREASING_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate',
                  'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd',
                  'ColorIncreasing', 'ContrastIncreasing',
                  'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX',
                  'ShearY', 'TranslateXRel', 'TranslateYRel')


# ----------------------------------------------------------------------------
# The random policy.


def sample_magnitude(seed: tf.Tensor, spec: RandAugmentSpec) -> tf.Tensor:
  """Draws one op call's magnitude level, as timm's `AugmentOp` does.

  Args:
    seed: stateless seed, int tensor of shape [2].
    spec: the RandAugment spec.

  Returns:
    float32 scalar in [0, spec.magnitude_max].
  """
  magnitude = tf.constant(spec.magnitude, tf.float32)
  if spec.magnitude_std == math.inf:
    magnitude *= tf.random.stateless_uniform([], seed=seed)
  elif spec.magnitude_std > 0:
    magnitude += spec.magnitude_std * tf.random.stateless_normal([],
                                                                 seed=seed)
  return tf.clip_by_value(magnitude, 0.0, float(spec.magnitude_max))


def _layer(image: tf.Tensor, seed: tf.Tensor, spec: RandAugmentSpec,
           fill: Sequence[int], interpolation: str) -> tf.Tensor:
  """Applies one RandAugment layer: a random op, maybe, at a random level."""
  names = spec.op_names
  keys = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
  choice = tf.random.stateless_uniform([], seed=keys[0], minval=0,
                                       maxval=len(names), dtype=tf.int32)
  # timm skips the op when random() > prob; `<` keeps p=0 exact.
  applied = tf.random.stateless_uniform([], seed=keys[1]) < spec.prob_per_op
  negate = tf.random.stateless_uniform([], seed=keys[2]) < 0.5
  level = sample_magnitude(keys[3], spec)
  bicubic = tf.random.stateless_uniform([], seed=keys[4]) < 0.5

  # Branches: one per pixel op, one shared by the affine ops (which differ
  # only in their coefficients), and the identity for a skipped op.
  pixel_names = [name for name in names if name not in AFFINE_OPS]
  affine_names = [name for name in names if name in AFFINE_OPS]
  branch_of = [pixel_names.index(name) if name in pixel_names
               else len(pixel_names) for name in names]
  branch_of.append(len(pixel_names) + 1)
  affine_of = [affine_names.index(name) if name in affine_names else 0
               for name in names]
  affine_of.append(0)
  op_index = tf.where(applied, choice, len(names))

  def run_affine():
    coeffs = tf.switch_case(
        tf.gather(affine_of, op_index),
        [functools.partial(_AFFINE_COEFFS[name], image, level, negate)
         for name in affine_names])
    coeffs = tf.unstack(coeffs, 6)
    if interpolation != 'random':
      return affine(image, coeffs, fill, interpolation)
    return tf.cond(bicubic, lambda: affine(image, coeffs, fill, 'bicubic'),
                   lambda: affine(image, coeffs, fill, 'bilinear'))

  branches = [functools.partial(OPS[name], image, level, negate)
              for name in pixel_names]
  branches += [run_affine, lambda: image]
  return tf.switch_case(tf.gather(branch_of, op_index), branches)


# No Python control flow depends on tensors here: skipping AutoGraph's
# conversion makes tracing inside tf.data maps faster.
@tf.autograph.experimental.do_not_convert
def apply(image: tf.Tensor, seed: tf.Tensor,
          spec: Optional[RandAugmentSpec],
          fill: Sequence[int] = DEFAULT_FILL,
          interpolation: str = 'random') -> tf.Tensor:
  """Applies RandAugment like timm's `rand_augment_transform(spec)`.

  Args:
    image: uint8 (H, W, 3); H and W may be dynamic.
    seed: stateless seed, int tensor of shape [2].
    spec: the parsed spec; None returns the image unchanged.
    fill: RGB colour for pixels uncovered by the affine ops: timm's
      `img_mean`, which `create_transform` sets to round(255 * mean) (the
      default is ImageNet's; `rand_augment_transform` alone uses 128 gray).
    interpolation: of the affine ops: 'bilinear', 'bicubic', or 'random'
      (either, per op call: timm's default, used unless the pipeline sets an
      interpolation; MAE/BEiT fine-tuning sets 'bicubic').

  Returns:
    uint8 tensor of the shape of `image`.

  Raises:
    ValueError: for a bad fill, interpolation or image dtype.
  """
  if interpolation not in _INTERPOLATIONS + ('random',):
    raise ValueError(f"interpolation must be 'bilinear', 'bicubic' or "
                     f"'random', got {interpolation!r}.")
  fill = tuple(int(v) for v in fill)
  if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
    raise ValueError(f'fill must be an RGB triple in 0..255, got {fill}.')
  if spec is None or spec.num_layers == 0:
    return image
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise ValueError(f'image must be uint8, got {image.dtype.name}.')
  static_shape = image.shape
  # stateless_split depends on the seed dtype: int32 and int64 seeds of the
  # same value must give the same output.
  seed = tf.cast(seed, tf.int64)
  keys = tf.random.experimental.stateless_split(seed, spec.num_layers)
  for i in range(spec.num_layers):
    image = _layer(image, keys[i], spec, fill, interpolation)
  image.set_shape(static_shape)
  return image

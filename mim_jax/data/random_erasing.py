"""timm's RandomErasing in TensorFlow, for the fine-tuning input pipeline.

A port of `timm.data.random_erasing.RandomErasing` for one normalised image
(H, W, C), the way timm's fine-tuning transform applies it (after
normalisation, before batching). All randomness is stateless: the output is
a pure function of the image and the seed. The pipeline keeps its images
uint8, so it only draws the rectangles (`sample_boxes`); the train step
fills them in normalised space (`mim_jax.images.erase`). `apply` does both
here, the reference.

With probability `prob` the image gets `count` rectangles, count uniform in
[1, max_count] (timm's min_count is 1). Each rectangle makes up to 10
attempts: area = U(min_area, max_area) * H * W / count, aspect ratio
log-uniform in [min_aspect, 1 / min_aspect], h = round(sqrt(area * aspect)),
w = round(sqrt(area / aspect)); the first attempt with h < H and w < W is
placed uniformly and filled, and if none fits the rectangle is skipped.
"""

import math

import tensorflow as tf

from mim_jax import errors

# Placement attempts per rectangle, as in timm.
_NUM_TRIES = 10

MODES = ('pixel', 'rand', 'const')
# Where a config sets the arguments, for the messages.
_FIELD = 'input.random_erasing'


def _check_args(prob, mode, max_count, min_area, max_area, min_aspect):
  """Raises errors.ConfigError naming the first bad argument (its field of
  input.random_erasing)."""
  if not 0 <= prob <= 1:
    raise errors.ConfigError(f'{_FIELD}.prob must be in [0, 1], got {prob}.')
  if mode not in MODES:
    raise errors.ConfigError(f'{_FIELD}.mode must be one of {MODES}, got '
                             f'{mode!r}.')
  if isinstance(max_count, bool) or not isinstance(max_count, int) or (
      max_count < 1):
    raise errors.ConfigError(f'{_FIELD}.max_count must be an integer >= 1, '
                             f'got {max_count!r}.')
  if not 0 < min_area <= max_area <= 1:
    raise errors.ConfigError(
        f'{_FIELD}.min_area and max_area must satisfy 0 < min_area <= '
        f'max_area <= 1, got {min_area} and {max_area}.')
  if not 0 < min_aspect <= 1:
    raise errors.ConfigError(f'{_FIELD}.min_aspect must be in (0, 1], got '
                             f'{min_aspect}.')


def _sample_rectangle(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                      count: tf.Tensor, min_area: float, max_area: float,
                      min_aspect: float) -> tuple[tf.Tensor, tf.Tensor]:
  """Draws one rectangle like timm's attempt loop.

  Args:
    seed: stateless seed, int tensor of shape [2].
    height: image height, float32 scalar.
    width: image width, float32 scalar.
    count: rectangles in this image, float32 scalar (scales the area).
    min_area: min fraction of the image area (before the count scaling).
    max_area: max fraction of the image area.
    min_aspect: min aspect ratio h / w; the max is its inverse.

  Returns:
    float32 [top, left, h, w] and a bool scalar: whether an attempt fit.
  """
  u = tf.random.stateless_uniform([_NUM_TRIES, 4], seed=seed)
  area = (min_area + (max_area - min_area) * u[:, 0]) * height * width / count
  log_aspect = math.log(min_aspect) * (1 - 2 * u[:, 1])
  aspect = tf.exp(log_aspect)
  # tf.round rounds half to even, like Python's round().
  h = tf.round(tf.sqrt(area * aspect))
  w = tf.round(tf.sqrt(area / aspect))
  fits = (h < height) & (w < width)
  # random.randint(0, n) is inclusive: floor(u * (n + 1)), clamped against
  # float rounding.
  top = tf.minimum(tf.floor(u[:, 2] * (height - h + 1)), height - h)
  left = tf.minimum(tf.floor(u[:, 3] * (width - w + 1)), width - w)
  first = tf.argmax(tf.cast(fits, tf.int32))
  window = tf.stack([top[first], left[first], h[first], w[first]])
  return window, tf.reduce_any(fits)


def _keys(seed: tf.Tensor, max_count: int) -> tf.Tensor:
  """The per-image keys: erase?, count, then (box, fill) per rectangle."""
  # stateless_split depends on the seed dtype: int32 and int64 seeds of the
  # same value must give the same output.
  return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64),
                                                2 + 2 * max_count)


# No Python control flow depends on tensors here: skipping AutoGraph's
# conversion makes tracing inside tf.data maps faster.
@tf.autograph.experimental.do_not_convert
def sample_boxes(seed: tf.Tensor, height, width, *,
                 prob: float = 0.25, mode: str = 'pixel', max_count: int = 1,
                 min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3) -> tf.Tensor:
  """The rectangles timm's RandomErasing erases in one image (see `apply`
  for the arguments), without filling them: the input pipeline ships them
  with the uint8 image and the train step fills them in normalised space
  (`mim_jax.images.erase`).

  Returns:
    int32 (max_count, 4) [top, left, h, w] in timm's order; a rectangle not
    drawn (no erasing, beyond the count, or no attempt fit) is all zeros.
  """
  _check_args(prob, mode, max_count, min_area, max_area, min_aspect)
  if prob == 0:
    return tf.zeros([max_count, 4], tf.int32)
  height = tf.cast(height, tf.float32)
  width = tf.cast(width, tf.float32)
  keys = _keys(seed, max_count)
  # timm erases unless random() > prob; `<` keeps prob 0 exact.
  erase = tf.random.stateless_uniform([], seed=keys[0]) < prob
  count = tf.random.stateless_uniform([], seed=keys[1], minval=1,
                                      maxval=max_count + 1, dtype=tf.int32)
  boxes = []
  for i in range(max_count):
    window, fits = _sample_rectangle(keys[2 + 2 * i], height, width,
                                     tf.cast(count, tf.float32), min_area,
                                     max_area, min_aspect)
    used = fits & erase & (i < count)
    boxes.append(tf.where(used, tf.cast(window, tf.int32),
                          tf.zeros([4], tf.int32)))
  return tf.stack(boxes)


@tf.autograph.experimental.do_not_convert
def apply(image: tf.Tensor, seed: tf.Tensor, *, prob: float = 0.25,
          mode: str = 'pixel', max_count: int = 1, min_area: float = 0.02,
          max_area: float = 1 / 3, min_aspect: float = 0.3) -> tf.Tensor:
  """Applies timm's RandomErasing to one normalised image, in TF (the
  reference of `sample_boxes` + `mim_jax.images.erase`, which split it
  between the pipeline and the train step).

  Args:
    image: float (H, W, C), normalised; H and W may be dynamic.
    seed: stateless seed, int tensor of shape [2].
    prob: probability of erasing anything (timm `re_prob`).
    mode: fill of the rectangles (timm `re_mode`): 'pixel', per-pixel
      standard normal values; 'rand', one standard normal value per channel
      and rectangle; 'const', zeros (the mean, after normalisation).
    max_count: rectangles per erased image are uniform in [1, max_count]
      (timm `re_count`), each with 1 / count of the area.
    min_area: min fraction of the image area per rectangle (before the count
      scaling).
    max_area: max fraction of the image area.
    min_aspect: min aspect ratio h / w; the max is 1 / min_aspect.

  Returns:
    Tensor of the shape and dtype of `image`.

  Raises:
    errors.ConfigError: naming a bad argument.
  """
  _check_args(prob, mode, max_count, min_area, max_area, min_aspect)
  image = tf.convert_to_tensor(image)
  if not image.dtype.is_floating:
    raise ValueError(f'image must be a float (normalised) tensor, got '
                     f'{image.dtype.name}.')
  static_shape = image.shape
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  boxes = sample_boxes(seed, height, width, prob=prob, mode=mode,
                       max_count=max_count, min_area=min_area,
                       max_area=max_area, min_aspect=min_aspect)
  if prob == 0:
    return image
  keys = _keys(seed, max_count)
  rows = tf.range(height)[:, None, None]
  cols = tf.range(width)[None, :, None]
  for i in range(max_count):
    top, left, h, w = tf.unstack(boxes[i])
    inside = ((rows >= top) & (rows < top + h) & (cols >= left) &
              (cols < left + w))
    noise_key = keys[3 + 2 * i]
    if mode == 'pixel':
      values = tf.random.stateless_normal(shape, seed=noise_key,
                                          dtype=image.dtype)
    elif mode == 'rand':
      values = tf.random.stateless_normal(shape[2:], seed=noise_key,
                                          dtype=image.dtype)
    else:
      values = tf.zeros([], image.dtype)
    # Later rectangles overwrite earlier ones, as in timm's loop.
    image = tf.where(inside, values, image)
  image.set_shape(static_shape)
  return image

"""Image decoding and augmentation for MAE pretraining (TensorFlow).

All randomness is stateless (`tf.random.stateless_*`): the output is a pure
function of the encoded image and the seed, so a batch can be reproduced
from (seed, step, example index) alone.
"""

import math
from typing import Sequence

import numpy as np
from PIL import Image
import tensorflow as tf

# RandomResizedCrop attempts before falling back to a center crop, as in
# torchvision / timm.
_NUM_CROP_TRIES = 10


def sample_crop_window(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
                       scale: Sequence[float],
                       ratio: Sequence[float]) -> tf.Tensor:
  """Samples a RandomResizedCrop window like torchvision's `get_params`.

  Ten candidate windows are drawn at once (area fraction uniform in `scale`,
  aspect ratio log-uniform in `ratio`); the first that fits is used, else a
  center crop clamped to the ratio range.

  Args:
    seed: stateless seed, int tensor of shape [2].
    height: image height (int scalar tensor).
    width: image width (int scalar tensor).
    scale: (min, max) fraction of the image area.
    ratio: (min, max) aspect ratio width / height.

  Returns:
    int32 tensor [top, left, crop_height, crop_width].
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  u = tf.random.stateless_uniform([_NUM_CROP_TRIES, 4], seed=seed)
  target_area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
  crop_w = tf.round(tf.sqrt(target_area * aspect))
  crop_h = tf.round(tf.sqrt(target_area / aspect))
  fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
  # torch.randint(0, n + 1): floor(u * (n + 1)), clamped against rounding.
  top = tf.minimum(tf.floor(u[:, 2] * (h - crop_h + 1)), h - crop_h)
  left = tf.minimum(tf.floor(u[:, 3] * (w - crop_w + 1)), w - crop_w)
  first = tf.argmax(tf.cast(fits, tf.int32))
  sampled = tf.stack([top[first], left[first], crop_h[first], crop_w[first]])

  # Fallback: whole image, cropped to the nearest allowed aspect ratio.
  in_ratio = w / h
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  fallback = tf.stack([tf.floor((h - fb_h) / 2), tf.floor((w - fb_w) / 2),
                       fb_h, fb_w])
  window = tf.where(tf.reduce_any(fits), sampled, fallback)
  return tf.cast(window, tf.int32)


# libjpeg's accurate integer IDCT, PIL's default: TF's default ('', the
# fast IDCT) is off by about 1 level per pixel, noise that raised the loss
# of the tiny reference recipe by about 1 sigma of the official seed spread
# (docs/curves.md). With it, a decoded JPEG equals PIL's pixel for
# pixel (a partial decode differs only at chroma samples on the window's
# border).
JPEG_DCT = 'INTEGER_ACCURATE'


def _decode(image_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 (H, W, 3), JPEGs as PIL."""
  image = tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.io.decode_jpeg(image_bytes, channels=3,
                                dct_method=JPEG_DCT),
      lambda: tf.io.decode_image(image_bytes, channels=3,
                                 expand_animations=False))
  image.set_shape([None, None, 3])
  return image


# JPEG draft: libjpeg's DCT scalings (decode at 1/r of the size) that
# decode_and_crop_jpeg offers.
_DRAFT_RATIOS = (1, 2, 4, 8)


def decode_and_random_crop(image_bytes: tf.Tensor, seed: tf.Tensor,
                           scale: Sequence[float],
                           ratio: Sequence[float],
                           draft_size: int | None = None) -> tf.Tensor:
  """Decodes an image and takes a RandomResizedCrop window (not resized).

  JPEGs are only partially decoded (`decode_and_crop_jpeg`), which is much
  cheaper for large ImageNet photos and small crops.

  Args:
    image_bytes: scalar string tensor, encoded image.
    seed: stateless seed, int tensor of shape [2].
    scale: (min, max) area fraction.
    ratio: (min, max) aspect ratio.
    draft_size: JPEG draft (`input.jpeg_draft`): a window whose shorter side
      is at least 2, 4 or 8 times `draft_size` is decoded at 1/2, 1/4 or
      1/8 of its size by libjpeg's scaled IDCT (as PIL's `Image.draft`),
      keeping its shorter side >= draft_size. Faster, but no longer PIL's
      pixels. None: full resolution.

  Returns:
    uint8 tensor (h, w, 3), the crop.
  """

  def jpeg_crop():
    shape = tf.io.extract_jpeg_shape(image_bytes)
    window = sample_crop_window(seed, shape[0], shape[1], scale, ratio)
    if draft_size is None:
      return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3,
                                        dct_method=JPEG_DCT)
    return _draft_crop(image_bytes, window, draft_size)

  def generic_crop():
    image = _decode(image_bytes)
    shape = tf.shape(image)
    top, left, crop_h, crop_w = tf.unstack(
        sample_crop_window(seed, shape[0], shape[1], scale, ratio))
    return image[top:top + crop_h, left:left + crop_w]

  crop = tf.cond(tf.io.is_jpeg(image_bytes), jpeg_crop, generic_crop)
  crop.set_shape([None, None, 3])
  return crop


def _draft_crop(image_bytes: tf.Tensor, window: tf.Tensor,
                draft_size: int) -> tf.Tensor:
  """The JPEG window [top, left, h, w] decoded at the largest DCT scaling
  1/r that keeps its shorter side >= draft_size (window in 1/r units)."""
  side = tf.minimum(window[2], window[3])
  index = tf.add_n([tf.cast(side >= r * draft_size, tf.int32)
                    for r in _DRAFT_RATIOS[1:]])

  def branch(r):
    return lambda: tf.io.decode_and_crop_jpeg(
        image_bytes, window // r, channels=3, ratio=r, dct_method=JPEG_DCT)

  return tf.switch_case(index, [branch(r) for r in _DRAFT_RATIOS])


def decode_and_center_crop(image_bytes: tf.Tensor,
                           crop_fraction: float = 1.0) -> tf.Tensor:
  """Decodes an image and takes a centered square.

  The square's side is `crop_fraction` x the shorter side. Resizing it to S
  equals "resize the shorter side to S / crop_fraction, then center crop
  S x S": the timm/ImageNet evaluation transform (crop_pct 0.875: resize
  256, center crop 224).

  Args:
    image_bytes: scalar string tensor, encoded image.
    crop_fraction: in (0, 1].

  Returns:
    uint8 tensor (s, s, 3).
  """
  image = _decode(image_bytes)
  shape = tf.shape(image)
  side = tf.minimum(shape[0], shape[1])
  if crop_fraction != 1.0:
    side = tf.cast(tf.round(tf.cast(side, tf.float32) * crop_fraction),
                   tf.int32)
  top = (shape[0] - side) // 2
  left = (shape[1] - side) // 2
  return image[top:top + side, left:left + side]


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """TF's antialiased bicubic resize to (size, size), rounded to uint8
  (evaluation and visualisation batches; training crops take PIL's own,
  `resize_bicubic_uint8`).

  Antialiasing matters here: crops of large photos are shrunk by 10x or more
  for small image sizes, and without it bicubic aliases badly (PIL, used by
  timm/torchvision, antialiases too). The rounding is PIL's too: its resize
  returns uint8, so the official pipelines' images carry that quantisation.

  Args:
    image: uint8 or float (h, w, 3).
    size: output side.

  Returns:
    uint8 (size, size, 3).
  """
  image = tf.image.resize(tf.cast(image, tf.float32), [size, size],
                          method='bicubic', antialias=True)
  # Bicubic overshoots around edges.
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


# PIL's resampling filters by name.
_PIL_FILTERS = {'lanczos': Image.LANCZOS, 'bicubic': Image.BICUBIC}


def resize_pil_uint8(image: tf.Tensor, size: int, method: str = 'lanczos',
                     flip: tf.Tensor | None = None) -> tf.Tensor:
  """`PIL.Image.resize((size, size), LANCZOS | BICUBIC)` of a uint8 image,
  computed by PIL itself (a `tf.numpy_function`; PIL's C resampling
  releases the GIL, so parallel map calls run in parallel), then flipped
  left-right where `flip` is true.

  The official pipelines' resize: torchvision's RandomResizedCrop on a PIL
  image is PIL's resize of the crop (bicubic for the model's view, Lanczos
  for BEiT/CAE's tokenizer view). Pixel for pixel, which TF's antialiased
  kernels are not: its bicubic is off by 0.15 grey levels per pixel on
  average (after rounding), its lanczos3 by 0.19, which changed 2.7% of a
  small DALL-E encoder's ids. PIL's 8-bit path (22-bit fixed-point
  coefficients, two passes each rounded to uint8, their order chosen by
  the Pillow version) is also the faster bicubic: a 280 px crop to 224 px
  costs 1.1 ms of CPU in PIL plus 0.2 ms of call overhead, against 2.0 ms
  for TF's antialiased bicubic, rounded (docs/speed.md). Written in TF ops
  (sparse int32 matmuls) it was exact too, but took 3.6-4 ms; for Lanczos a
  270 px crop to 112 px costs 1.8 ms this way, 6-7 ms in TF ops and 1.6 ms
  with TF's lanczos3. The flip, done on the PIL image, costs nearly
  nothing.

  Args:
    image: uint8 (h, w, c), c 1 or 3.
    size: output side.
    method: 'lanczos' or 'bicubic' (PIL's, a = -0.5).
    flip: optional bool scalar tensor: mirror the output left-right.

  Returns:
    uint8 (size, size, c).
  """
  resample = _PIL_FILTERS[method]

  def run(pixels, mirror):
    grey = pixels.shape[-1] == 1
    out = Image.fromarray(pixels[..., 0] if grey else pixels).resize(
        (size, size), resample)
    if mirror:
      out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = np.asarray(out)
    return out[..., None] if grey else out

  if flip is None:
    flip = tf.constant(False)
  out = tf.numpy_function(run, [image, flip], tf.uint8, stateful=False)
  return tf.ensure_shape(out, [size, size, image.shape[-1]])


def resize_bicubic_uint8(image: tf.Tensor, size: int,
                         flip: tf.Tensor | None = None) -> tf.Tensor:
  """RandomResizedCrop's resize (and flip) of the crop: PIL's BICUBIC, uint8,
  as torchvision's transform on a PIL image (see `resize_pil_uint8`)."""
  return resize_pil_uint8(image, size, 'bicubic', flip)


def resize_lanczos_uint8(image: tf.Tensor, size: int) -> tf.Tensor:
  """The tokenizer view: PIL's LANCZOS resize, uint8 (see
  `resize_pil_uint8`). Shipping uint8 keeps the host-to-device copy 4x
  smaller."""
  return resize_pil_uint8(image, size, 'lanczos')


def flip_decision(seed: tf.Tensor) -> tf.Tensor:
  """Whether an image flips left-right: true with probability 0.5 (a bool
  scalar tensor), one draw per seed."""
  return tf.random.stateless_uniform([], seed=seed) < 0.5


def normalize(image: tf.Tensor, mean: Sequence[float],
              std: Sequence[float]) -> tf.Tensor:
  """Maps [0, 255] pixels (uint8 or float) to float32 (x / 255 - mean) / std
  (mean/std in [0, 1])."""
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std

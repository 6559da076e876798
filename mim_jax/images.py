"""The images of a batch as the model takes them, made on the devices.

The input pipeline ships images as uint8 pixels (4x fewer host-to-device
bytes than float32); the jitted steps (train, eval, features, forward) turn
them into the model's input here, once per batch, with `model_batch`:

  image: uint8 (B, H, W, 3) -> float32 (x / 255 - mean) / std, the
    config's `input.mean` / `input.std` (the same float32 ops as the old
    host-side `augment.normalize`, so the same values).
  erase: int32 (B, K, 4) (labelled pipelines with `input.random_erasing`):
    timm's RandomErasing boxes [top, left, h, w] (h = w = 0: none), drawn
    by the pipeline (`data/random_erasing.sample_boxes`, keyed by
    (seed, step, index) as before); in training their fill, normal noise
    in normalised space as timm's, is drawn here from the step's key.

A float 'image' is taken as already normalised and passes unchanged
(official-parity fixtures, a method whose `batch_spec` declares float
images), so no image is ever normalised twice.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import errors

IMAGE_KEY = 'image'
ERASE_KEY = 'erase'
# timm's RandomErasing fills (`re_mode`): per-pixel normal noise, one normal
# value per channel and box, or zeros (the mean).
ERASE_MODES = ('pixel', 'rand', 'const')
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ImageInput:
  """How uint8 batch images become the model's input.

  Attributes:
    mean: per-channel mean, in [0, 1] pixel units.
    std: per-channel std, in [0, 1] pixel units.
    erase_mode: fill of the random-erasing boxes, one of ERASE_MODES.
  """
  mean: tuple = _IMAGENET_MEAN
  std: tuple = _IMAGENET_STD
  erase_mode: str = 'pixel'

  def __post_init__(self):
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise errors.ConfigError(
          f'input.mean={tuple(self.mean)} / input.std={tuple(self.std)}: '
          'give 3 values each (RGB, in [0, 1] units), std > 0.')
    if self.erase_mode not in ERASE_MODES:
      raise errors.ConfigError(
          f'input.random_erasing.mode={self.erase_mode!r}: use one of '
          f'{ERASE_MODES}.')

  @classmethod
  def from_config(cls, config: Any) -> 'ImageInput':
    """The normalisation of `config.input` (ImageNet's by default)."""
    inp = config.get('input') or {}
    erasing = inp.get('random_erasing') or {}
    return cls(mean=tuple(float(m) for m in inp.get('mean', _IMAGENET_MEAN)),
               std=tuple(float(s) for s in inp.get('std', _IMAGENET_STD)),
               erase_mode=erasing.get('mode', 'pixel'))


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 pixels -> float32 (x / 255 - mean) / std, as `augment.normalize`
  computed it on the host."""
  x = jnp.asarray(images).astype(jnp.float32) / jnp.float32(255.0)
  return ((x - jnp.asarray(mean, jnp.float32)) /
          jnp.asarray(std, jnp.float32))


def erase(images: jax.Array, boxes: jax.Array, rng: jax.Array,
          mode: str = 'pixel') -> jax.Array:
  """Fills each example's boxes as timm's RandomErasing does, in order
  (a later box overwrites an earlier one where they overlap).

  Args:
    images: float (B, H, W, C), normalised.
    boxes: int (B, K, 4) [top, left, h, w]; h = 0 or w = 0: no box.
    rng: key of the fill values.
    mode: 'pixel' (per-pixel standard normal), 'rand' (one standard normal
      value per channel and box) or 'const' (zeros).

  Returns:
    The images with the boxes filled.
  """
  b, h, w, c = images.shape
  rows = jnp.arange(h)[None, :, None, None]
  cols = jnp.arange(w)[None, None, :, None]
  for i in range(boxes.shape[1]):
    top, left, bh, bw = (boxes[:, i, j][:, None, None, None]
                         for j in range(4))
    inside = ((rows >= top) & (rows < top + bh) & (cols >= left) &
              (cols < left + bw))
    key = jax.random.fold_in(rng, i)
    if mode == 'pixel':
      values = jax.random.normal(key, images.shape, images.dtype)
    elif mode == 'rand':
      values = jax.random.normal(key, (b, 1, 1, c), images.dtype)
    else:
      values = jnp.zeros((), images.dtype)
    images = jnp.where(inside, values, images)
  return images


def model_batch(batch: dict, image_input: Optional[ImageInput],
                rng: Optional[jax.Array] = None) -> dict:
  """The batch as the model takes it (see the module docstring): a uint8
  'image' normalised, and with `rng` (training) its 'erase' boxes filled;
  'erase' is dropped either way. Other keys pass unchanged.

  Raises:
    errors.DataError: uint8 images without an `image_input`, or images of
      another integer dtype.
  """
  boxes = batch.get(ERASE_KEY)
  batch = {k: v for k, v in batch.items() if k != ERASE_KEY}
  image = batch.get(IMAGE_KEY)
  if image is None:
    return batch
  dtype = jnp.dtype(image.dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return batch  # already normalised
  if dtype != jnp.uint8:
    raise errors.DataError(
        f"batch['image'] is {dtype.name}; the steps take uint8 pixels "
        '(B, H, W, 3) in [0, 255] (normalised on the devices) or float '
        'images already normalised.')
  if image_input is None:
    raise errors.DataError(
        "batch['image'] is uint8 but this step was built without an "
        'ImageInput (mim_jax.images.ImageInput.from_config(config)) to '
        'normalise it.')
  image = normalize(image, image_input.mean, image_input.std)
  if boxes is not None and rng is not None:
    image = erase(image, boxes, rng, image_input.erase_mode)
  batch[IMAGE_KEY] = image
  return batch


def model_shapes(batch_shapes: dict) -> dict:
  """The ShapeDtypeStructs `model_batch` turns `batch_shapes` into (what
  initialising the model sees): uint8 images become float32."""
  out = {}
  for k, v in batch_shapes.items():
    if k == ERASE_KEY:
      continue
    dtype = v.dtype
    if k == IMAGE_KEY and np.dtype(dtype) == np.uint8:
      dtype = np.float32
    out[k] = jax.ShapeDtypeStruct(v.shape, dtype)
  return out

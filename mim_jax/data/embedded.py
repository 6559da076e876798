"""Small image data sets that ship inside installed Python packages.

They need no download, so pipelines, tests and smoke runs work on machines
without network access. Each image is returned as JPEG bytes so that it goes
through exactly the same decode path as TFDS and image-folder records.
"""

import functools
import io
from typing import Callable

from absl import logging
import numpy as np
from PIL import Image

from mim_jax import errors

# Longest side, in pixels, of an embedded image. Every training example
# decodes (part of) a JPEG, and some bundled photos are ~1.4k pixels wide; 512
# keeps decoding cheap while RandomResizedCrop to 32-224 px still sees plenty
# of detail.
MAX_SIDE = 512

# Photographs bundled with scikit-image (skimage/data/*). Only functions that
# read a file shipped inside the wheel are listed: the others fetch their
# file over the network through `pooch`, which is not available offline.
# Grayscale photos are kept (replicated to 3 channels) for variety.
SKIMAGE_IMAGES = (
    'astronaut',
    'brick',
    'camera',
    'chelsea',
    'clock',
    'coffee',
    'coins',
    'grass',
    'gravel',
    'hubble_deep_field',
    'immunohistochemistry',
    'moon',
    'retina',
    'rocket',
    'stereo_motorcycle',
    'text',
)


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """Converts an skimage array to uint8 HWC RGB.

  Args:
    image: (H, W), (H, W, 3) or (H, W, 4) array of bool, uint8 or float.

  Returns:
    uint8 array of shape (H, W, 3).
  """
  image = np.asarray(image)
  if image.dtype == bool:
    image = image.astype(np.uint8) * 255
  elif image.dtype != np.uint8:
    # skimage floats are in [0, 1].
    image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.shape[-1] == 4:
    image = image[..., :3]
  return image


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
  """Downscales (antialiased) so that the longest side is <= max_side."""
  height, width = image.shape[:2]
  if max(height, width) <= max_side:
    return image
  factor = max_side / max(height, width)
  size = (max(1, round(width * factor)), max(1, round(height * factor)))
  return np.asarray(
      Image.fromarray(image).resize(size, resample=Image.Resampling.BICUBIC))


def _encode_jpeg(image: np.ndarray) -> bytes:
  # JPEG (q 95, no chroma subsampling) rather than PNG: the pipeline then
  # decodes only the crop window (`decode_and_crop_jpeg`), which is several
  # times faster, and the photos are JPEG-compressed upstream anyway.
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=95,
                              subsampling=0)
  return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def _skimage_jpegs() -> tuple[tuple[str, bytes], ...]:
  """Loads the bundled scikit-image photos as (name, JPEG bytes) pairs."""
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top

  images = []
  for name in SKIMAGE_IMAGES:
    loader = getattr(skdata, name, None)
    if loader is None:
      logging.warning('skimage.data.%s does not exist in this version of '
                      'scikit-image; skipping it.', name)
      continue
    try:
      image = loader()
    # Broad on purpose: depending on the scikit-image version a missing file
    # surfaces as ImportError (no pooch), OSError (no network) or ValueError.
    # A missing photo only makes the set smaller, so skip it and go on.
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not load skimage.data.%s offline (%s); '
                      'skipping it.', name, e)
      continue
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disp).
      image = image[0]
    image = _shrink(_to_rgb_uint8(image), MAX_SIDE)
    images.append((name, _encode_jpeg(image)))
  if not images:
    raise errors.DataError(
        'None of the scikit-image bundled photos could be loaded '
        f'({", ".join(SKIMAGE_IMAGES)}). Reinstall scikit-image '
        '(pip install scikit-image) or use another input.data source.')
  logging.info('Embedded skimage data set: %d images (%s).', len(images),
               ', '.join(n for n, _ in images))
  return tuple(images)


# Digits: scikit-learn's 1,797 real handwritten digits (8x8, 16 grey
# levels), the embedded *labelled* set. The split is the one of
# scikit-learn's digits example ("Recognizing hand-written digits":
# train_test_split(test_size=0.5, shuffle=False)): the first half trains, the
# second half tests, so writers of the two halves overlap only as in upstream.
DIGITS_SIZE = 32
DIGITS_SPLITS = ('train', 'test')


def _encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def _digits(split: str) -> tuple[tuple[str, bytes, int], ...]:
  """(name, PNG bytes, label) of one split of scikit-learn's digits, each
  upsampled (bicubic) from 8 x 8 to DIGITS_SIZE px, grey as RGB."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  half = len(digits.images) - len(digits.images) // 2  # sklearn's ceil
  rows = range(half) if split == 'train' else range(half, len(digits.images))
  out = []
  for i in rows:
    grey = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
    big = Image.fromarray(grey).resize((DIGITS_SIZE, DIGITS_SIZE),
                                       resample=Image.Resampling.BICUBIC)
    rgb = np.repeat(np.asarray(big)[..., None], 3, axis=-1)
    out.append((f'digit_{i:04d}', _encode_png(rgb), int(digits.target[i])))
  return tuple(out)


# name -> (splits, loader(split) -> ((name, bytes[, label]), ...), classes).
_DATASETS: dict[str, tuple[tuple[str, ...], Callable[[str], tuple], int]] = {
    'skimage': (('train',), lambda split: _skimage_jpegs(), 0),
    'digits': (DIGITS_SPLITS, _digits, 10),
}


def available() -> list[str]:
  """Returns the names accepted after `embedded:`."""
  return sorted(_DATASETS)


def _check(name: str, split: str):
  if name not in _DATASETS:
    raise errors.DataError(
        f'Unknown embedded data set {name!r}. Available: '
        f'{", ".join("embedded:" + n for n in available())}.')
  splits = _DATASETS[name][0]
  if split not in splits:
    raise errors.DataError(f'embedded:{name} has no split {split!r}; its '
                           f'splits are {list(splits)} (input.split / eval '
                           'split).')


def num_classes(name: str) -> int:
  """Number of classes of a labelled embedded set (0: unlabelled)."""
  _check(name, 'train')
  return _DATASETS[name][2]


def load(name: str, split: str = 'train') -> list[tuple[str, bytes]]:
  """Returns the images of an embedded data set.

  Args:
    name: data set name, e.g. 'skimage' (the part after `embedded:`).
    split: 'train' (every set), or 'test' (labelled sets).

  Returns:
    List of (image name, encoded uint8 RGB bytes), in a fixed order.

  Raises:
    errors.DataError: if `name` or `split` is unknown, or none of its
      images can be loaded.
  """
  _check(name, split)
  return [(r[0], r[1]) for r in _DATASETS[name][1](split)]


def labels(name: str, split: str = 'train') -> list[int]:
  """The class labels of `load(name, split)`, in the same order.

  Raises:
    errors.DataError: the set has no labels.
  """
  _check(name, split)
  if not _DATASETS[name][2]:
    raise errors.DataError(
        f'embedded:{name} has no labels; use a labelled set '
        f'({[n for n in available() if _DATASETS[n][2]]}).')
  return [r[2] for r in _DATASETS[name][1](split)]

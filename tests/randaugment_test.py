"""RandAugment and RandomErasing (TensorFlow ports of timm's): each op
against PIL, identities and known values, the stateless random policy, spec
parsing, and both inside tf.data with dynamic image sizes."""

import math
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,g-bad-import-order
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import skimage.data
import skimage.transform
import tensorflow as tf

from mim_jax.data import randaugment as ra
from mim_jax.data import random_erasing
# pylint: enable=g-import-not-at-top,g-bad-import-order

FILL = ra.DEFAULT_FILL
SPEC = 'rand-m9-mstd0.5-inc1'


def _astronaut(height: int, width: int) -> np.ndarray:
  image = skimage.transform.resize(skimage.data.astronaut(), (height, width),
                                   anti_aliasing=True)
  return np.round(image * 255).astype(np.uint8)


SQUARE = _astronaut(64, 64)
# Non-square, and a crop, so that no channel spans the full range.
WIDE = _astronaut(80, 112)[10:50, 20:76]
IMAGES = {'square': SQUARE, 'wide': WIDE}


def _run(name, image, level, negate=False, interpolation='bilinear'):
  return ra.OPS[name](tf.constant(image), level, negate, FILL,
                      interpolation).numpy()


# ----------------------------------------------------------------------------
# The ops one by one.


@pytest.mark.parametrize('name', sorted(ra.OPS))
@pytest.mark.parametrize('image_name', sorted(IMAGES))
def test_every_op_maps_uint8_to_uint8_of_the_same_shape(name, image_name):
  image = IMAGES[image_name]
  out = ra.OPS[name](tf.constant(image), 7.3, True)
  assert out.dtype == tf.uint8 and out.shape == image.shape


def test_op_sets_are_timms():
  assert set(ra.DEFAULT_OPS) | set(ra.INCREASING_OPS) == set(ra.OPS)
  assert len(ra.DEFAULT_OPS) == len(ra.INCREASING_OPS) == 15
  assert ra.AFFINE_OPS <= set(ra.INCREASING_OPS) & set(ra.DEFAULT_OPS)


def _timm_args(name, level, negate):
  """timm's LEVEL_TO_ARG (auto_augment.py), restated, with a fixed sign."""
  sign = -1 if negate else 1
  t = level / 10
  if name == 'Rotate':
    return (sign * t * 30,)
  if name in ('ShearX', 'ShearY'):
    return (sign * t * 0.3,)
  if name in ('TranslateXRel', 'TranslateYRel'):
    return (sign * t * 0.45,)
  if name == 'Posterize':
    return (int(t * 4),)
  if name == 'PosterizeIncreasing':
    return (4 - int(t * 4),)
  if name == 'Solarize':
    return (min(256, int(t * 256)),)
  if name == 'SolarizeIncreasing':
    return (256 - min(256, int(t * 256)),)
  if name == 'SolarizeAdd':
    return (min(128, int(t * 110)),)
  if name.endswith('Increasing'):
    return (max(0.1, 1.0 + sign * t * 0.9),)
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return (t * 1.8 + 0.1,)
  return ()


def _pil_op(name, image, args, resample):
  """timm's op functions (thin PIL wrappers), restated."""
  base = name.replace('Increasing', '')
  enhance = {'Color': ImageEnhance.Color, 'Contrast': ImageEnhance.Contrast,
             'Brightness': ImageEnhance.Brightness,
             'Sharpness': ImageEnhance.Sharpness}
  affine = {
      'ShearX': lambda a: (1, a, 0, 0, 1, 0),
      'ShearY': lambda a: (1, 0, 0, a, 1, 0),
      'TranslateXRel': lambda a: (1, 0, a * image.size[0], 0, 1, 0),
      'TranslateYRel': lambda a: (1, 0, 0, 0, 1, a * image.size[1]),
  }
  if base == 'AutoContrast':
    return ImageOps.autocontrast(image)
  if base == 'Equalize':
    return ImageOps.equalize(image)
  if base == 'Invert':
    return ImageOps.invert(image)
  if base == 'Posterize':
    return ImageOps.posterize(image, *args)
  if base == 'Solarize':
    return ImageOps.solarize(image, *args)
  if base == 'SolarizeAdd':
    lut = [min(255, i + args[0]) if i < 128 else i for i in range(256)]
    return image.point(lut * 3)
  if base in enhance:
    return enhance[base](image).enhance(*args)
  if base == 'Rotate':
    return image.rotate(*args, resample=resample, fillcolor=FILL)
  return image.transform(image.size, Image.AFFINE, affine[base](*args),
                         resample=resample, fillcolor=FILL)


@pytest.mark.parametrize('name', sorted(ra.OPS))
def test_ops_match_timm_on_pil(name):
  interpolations = ['bilinear']
  if name in ra.AFFINE_OPS:
    interpolations.append('bicubic')
  pil = Image.fromarray(WIDE)
  for interpolation in interpolations:
    resample = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}
    for level in (0, 3, 6.66, 10):
      for negate in (False, True):
        args = _timm_args(name, level, negate)
        if 'Posterize' in name and args[0] == 0:
          continue  # Pillow rejects 0 bits; see test_posterize_known_values.
        want = np.asarray(_pil_op(name, pil, args, resample[interpolation]))
        got = _run(name, WIDE, level, negate, interpolation)
        diff = np.abs(got.astype(int) - want)
        where = f'{name} {interpolation} level={level} negate={negate}'
        if name in ra.AFFINE_OPS:
          # float64 like PIL, but the compiler may fuse differently: a pixel
          # can land on the other side of an integer.
          assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, where
        else:
          assert diff.max() == 0, where


IDENTITY_AT_0 = ['Rotate', 'ShearX', 'ShearY', 'TranslateXRel',
                 'TranslateYRel', 'BrightnessIncreasing', 'ColorIncreasing',
                 'ContrastIncreasing', 'SharpnessIncreasing',
                 'SolarizeIncreasing', 'SolarizeAdd']


@pytest.mark.parametrize('name', IDENTITY_AT_0)
def test_identity_at_level_0(name):
  for image in IMAGES.values():
    for negate in (False, True):
      for interpolation in ('bilinear', 'bicubic'):
        np.testing.assert_array_equal(
            _run(name, image, 0.0, negate, interpolation), image)


def test_posterize_known_values():
  image = SQUARE
  # timm's PosterizeIncreasing keeps 4 bits at level 0: not the identity.
  np.testing.assert_array_equal(_run('PosterizeIncreasing', image, 0.0),
                                image & 0xF0)
  np.testing.assert_array_equal(_run('PosterizeIncreasing', image, 5.0),
                                image & 0xC0)
  np.testing.assert_array_equal(_run('Posterize', image, 10.0), image & 0xF0)
  # 0 bits: black, as in Pillow before it rejected bits < 1.
  np.testing.assert_array_equal(_run('PosterizeIncreasing', image, 10.0), 0)
  np.testing.assert_array_equal(ra.posterize(image, 8).numpy(), image)
  np.testing.assert_array_equal(ra.posterize(image, 1).numpy(), image & 0x80)


def test_invert_and_solarize_known_values():
  image = SQUARE
  np.testing.assert_array_equal(_run('Invert', image, 5.0), 255 - image)
  np.testing.assert_array_equal(
      _run('Invert', _run('Invert', image, 5.0), 5.0), image)
  # Threshold 0 at level 10: every pixel is >= 0, so all are inverted.
  np.testing.assert_array_equal(_run('SolarizeIncreasing', image, 10.0),
                                255 - image)
  np.testing.assert_array_equal(
      ra.solarize(image, 128).numpy(),
      np.where(image < 128, image, 255 - image))
  # Level 10: +110 to the pixels < 128, saturating.
  added = np.minimum(image.astype(int) + 110, 255)
  np.testing.assert_array_equal(_run('SolarizeAdd', image, 10.0),
                                np.where(image < 128, added, image))


def test_auto_contrast_and_equalize_ranges():
  full = SQUARE.copy()
  full[0, 0] = 0
  full[0, 1] = 255
  np.testing.assert_array_equal(_run('AutoContrast', full, 5.0), full)
  for image in IMAGES.values():
    for name in ('AutoContrast', 'Equalize'):
      out = _run(name, image, 5.0)
      np.testing.assert_array_equal(out.min(axis=(0, 1)), 0, err_msg=name)
      np.testing.assert_array_equal(out.max(axis=(0, 1)), 255, err_msg=name)
  # A constant image is left alone by both.
  flat = np.full((8, 8, 3), 77, np.uint8)
  np.testing.assert_array_equal(_run('AutoContrast', flat, 5.0), flat)
  np.testing.assert_array_equal(_run('Equalize', flat, 5.0), flat)


def test_rotate_by_90_degrees_is_rot90():
  for interpolation in ('bilinear', 'bicubic'):
    out = ra.rotate(tf.constant(SQUARE), 90.0, FILL, interpolation).numpy()
    # PIL rotates counter-clockwise, like np.rot90. Pixel centres map onto
    # pixel centres, so every pixel is exact.
    np.testing.assert_array_equal(out, np.rot90(SQUARE))
    out = ra.rotate(tf.constant(SQUARE), -90.0, FILL, interpolation).numpy()
    np.testing.assert_array_equal(out, np.rot90(SQUARE, k=-1))


def test_translate_by_whole_pixels_shifts_and_fills():
  image = tf.constant(WIDE)
  out = ra.translate_x(image, 5.0).numpy()
  np.testing.assert_array_equal(out[:, :-5], WIDE[:, 5:])
  np.testing.assert_array_equal(out[:, -5:], np.broadcast_to(FILL, (40, 5, 3)))
  out = ra.translate_y(image, -3.0, fill=(1, 2, 3)).numpy()
  np.testing.assert_array_equal(out[3:], WIDE[:-3])
  np.testing.assert_array_equal(out[:3], np.broadcast_to((1, 2, 3),
                                                         (3, 56, 3)))
  # TranslateXRel at level 10 with the sign flipped: 0.45 * 40 = 18 pixels
  # to the right.
  out = _run('TranslateXRel', SQUARE[:, :40], 10.0, negate=True)
  np.testing.assert_array_equal(out[:, 18:], SQUARE[:, :22])
  np.testing.assert_array_equal(out[:, :18], np.broadcast_to(FILL,
                                                             (64, 18, 3)))


def test_enhance_factors():
  image = SQUARE
  # Brightness is a plain scaling, truncated and clipped.
  want = np.clip(np.floor(image * np.float32(1.9)), 0, 255)
  np.testing.assert_array_equal(
      _run('BrightnessIncreasing', image, 10.0), want)
  np.testing.assert_array_equal(
      _run('BrightnessIncreasing', image, 10.0, negate=True),
      np.floor(image * np.float32(0.1)))
  # Color at factor 0.1 is nearly gray: channels close to each other.
  gray = _run('Color', image, 0.0).astype(int)
  assert np.abs(gray - gray.mean(axis=2, keepdims=True)).max() <= 26
  # Sharpness keeps the one-pixel border.
  sharp = _run('SharpnessIncreasing', image, 10.0)
  np.testing.assert_array_equal(sharp[[0, -1]], image[[0, -1]])
  np.testing.assert_array_equal(sharp[:, [0, -1]], image[:, [0, -1]])


# ----------------------------------------------------------------------------
# The random policy.


def test_apply_is_deterministic_and_depends_on_the_seed():
  spec = ra.parse(SPEC)
  image = tf.constant(SQUARE)
  outs = [ra.apply(image, tf.constant([s, 3], tf.int64), spec).numpy()
          for s in range(8)]
  again = ra.apply(image, tf.constant([5, 3], tf.int64), spec).numpy()
  np.testing.assert_array_equal(outs[5], again)
  # int32 and int64 seeds of the same value agree.
  np.testing.assert_array_equal(
      outs[5], ra.apply(image, tf.constant([5, 3], tf.int32), spec).numpy())
  distinct = {out.tobytes() for out in outs}
  assert len(distinct) >= 5
  assert any(not np.array_equal(out, SQUARE) for out in outs)


def test_apply_in_tf_data_with_dynamic_sizes_matches_eager():
  spec = ra.parse(SPEC)
  sizes = [(64, 64), (40, 56), (48, 30)]

  def gen():
    for h, w in sizes:
      yield SQUARE[:h, :w]

  ds = tf.data.Dataset.from_generator(
      gen, output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
  ds = ds.enumerate().map(
      lambda i, image: ra.apply(image, tf.stack([i, 11]), spec))
  assert ds.element_spec.shape.as_list() == [None, None, 3]
  for i, ((h, w), out) in enumerate(zip(sizes, ds.as_numpy_iterator())):
    want = ra.apply(tf.constant(SQUARE[:h, :w]),
                    tf.constant([i, 11], tf.int64), spec).numpy()
    np.testing.assert_array_equal(out, want)


def test_apply_at_magnitude_0_only_runs_the_non_identity_ops():
  # With m0 and no noise, only AutoContrast, Equalize, Invert and
  # PosterizeIncreasing (4 bits) change an image; one layer, always applied.
  spec = ra.parse('rand-m0-n1-p1-inc1')
  image = tf.constant(WIDE)
  allowed = {
      'identity': WIDE,
      'AutoContrast': _run('AutoContrast', WIDE, 0.0),
      'Equalize': _run('Equalize', WIDE, 0.0),
      'Invert': 255 - WIDE,
      'PosterizeIncreasing': WIDE & 0xF0,
  }
  seen = set()
  for s in range(60):
    out = ra.apply(image, tf.constant([s, 0], tf.int64), spec).numpy()
    match = [k for k, v in allowed.items() if np.array_equal(out, v)]
    assert match, s
    seen.add(match[0])
  # Each op has probability 1/15; the identity 11/15.
  assert seen == set(allowed)
  # p0: never applied.
  spec = ra.parse('rand-m9-n3-p0-inc1')
  for s in range(5):
    np.testing.assert_array_equal(
        ra.apply(image, tf.constant([s, 0], tf.int64), spec), WIDE)
  assert ra.apply(image, tf.constant([0, 0]), None) is image


def test_sample_magnitude_follows_timm():
  def draws(spec_string):
    spec = ra.parse(spec_string)
    return np.array([
        ra.sample_magnitude(tf.constant([s, 1], tf.int64), spec).numpy()
        for s in range(300)])

  m = draws('rand-m9-mstd0.5')
  # Clipping at 10 lowers the mean of N(9, 0.5) by only 0.004.
  assert m.max() == 10 and m.min() > 7 and abs(m.mean() - 9.0) < 0.1
  assert 0.4 < m.std() < 0.6
  assert (m == 10).mean() < 0.1  # P(N(9, 0.5) > 10) is 2.3%.
  u = draws('rand-m6-mstd101')  # Uniform in [0, 6].
  assert u.min() >= 0 and u.max() <= 6 and abs(u.mean() - 3) < 0.4
  np.testing.assert_array_equal(draws('rand-m9'), 9)
  np.testing.assert_array_equal(draws('rand-m15'), 10)
  np.testing.assert_array_equal(draws('rand-m15-mmax20'), 15)


# ----------------------------------------------------------------------------
# Spec parsing.


def test_parse():
  assert ra.parse(SPEC) == ra.RandAugmentSpec(
      num_layers=2, magnitude=9, magnitude_std=0.5, increasing=True,
      prob_per_op=0.5, magnitude_max=10)
  assert ra.parse(SPEC).op_names == ra.INCREASING_OPS
  assert ra.parse('rand') == ra.RandAugmentSpec()
  assert ra.parse('rand').op_names == ra.DEFAULT_OPS
  assert ra.parse('rand-n3-m7-mmax12-p0.3-inc0') == ra.RandAugmentSpec(
      num_layers=3, magnitude=7, prob_per_op=0.3, magnitude_max=12)
  assert ra.parse('rand-mstd101').magnitude_std == math.inf
  assert ra.parse('') is None and ra.parse(None) is None


@pytest.mark.parametrize('spec, piece', [
    ('augmix-m9', 'augmix-m9'),
    ('rand-m9-x1', "'x1'"),
    ('rand-m9-bogus', "'bogus'"),
    ('rand-m9-tweights', "'tweights'"),
    ('rand-mfoo', "'mfoo'"),
    ('rand-m9.5', "'m9.5'"),
    ('rand-m9-m8', "'m8'"),
    ('rand-inc2', "'inc2'"),
    ('rand-p1.5', "'p1.5'"),
    ('rand-mmax0', "'mmax0'"),
    ('rand-m9-', "''"),
])
def test_parse_rejects_bad_specs(spec, piece):
  with pytest.raises(ValueError, match='valid form') as error:
    ra.parse(spec)
  assert piece in str(error.value)


def test_apply_rejects_bad_arguments():
  spec = ra.parse(SPEC)
  with pytest.raises(ValueError, match='interpolation'):
    ra.apply(tf.constant(SQUARE), tf.constant([0, 0]), spec,
             interpolation='nearest')
  with pytest.raises(ValueError, match='fill'):
    ra.apply(tf.constant(SQUARE), tf.constant([0, 0]), spec, fill=(1, 2))
  with pytest.raises(ValueError, match='uint8'):
    ra.apply(tf.constant(SQUARE, tf.float32), tf.constant([0, 0]), spec)


# ----------------------------------------------------------------------------
# RandomErasing.

NORMALISED = (SQUARE.astype(np.float32) / 255 - 0.45) / 0.25


def _erase(seed, image=NORMALISED, **kwargs):
  return random_erasing.apply(tf.constant(image), tf.constant([seed, 9]),
                              **kwargs).numpy()


def _changed_box(out, image):
  """The changed pixels, which must form one full rectangle: (h, w)."""
  changed = np.any(out != image, axis=2)
  rows = np.nonzero(changed.any(axis=1))[0]
  cols = np.nonzero(changed.any(axis=0))[0]
  h = rows[-1] - rows[0] + 1
  w = cols[-1] - cols[0] + 1
  assert changed.sum() == h * w, 'not one full rectangle'
  return h, w


def test_random_erasing_prob_0_is_the_identity():
  for seed in range(5):
    np.testing.assert_array_equal(_erase(seed, prob=0.0), NORMALISED)


def test_random_erasing_erases_one_rectangle_of_timms_size():
  height, width = NORMALISED.shape[:2]
  for seed in range(20):
    out = _erase(seed, prob=1.0)
    h, w = _changed_box(out, NORMALISED)
    assert h < height and w < width
    # Areas are drawn in [0.02, 1/3] of the image; rounding h and w moves
    # them by up to (h + w) / 2 + 1/4 pixels.
    slack = (h + w) / 2 + 0.25
    assert 0.02 * height * width - slack <= h * w
    assert h * w <= height * width / 3 + slack
    assert 0.3 * 0.5 <= h / w <= 1 / 0.3 * 2  # Aspect, rounding included.
    np.testing.assert_array_equal(out, _erase(seed, prob=1.0))
  assert not np.array_equal(_erase(0, prob=1.0), _erase(1, prob=1.0))


def test_random_erasing_fill_modes():
  out = _erase(3, prob=1.0, mode='const')
  h, w = _changed_box(out, NORMALISED)
  changed = np.any(out != NORMALISED, axis=2)
  np.testing.assert_array_equal(out[changed], 0.0)
  # 'rand': one normal value per channel over the whole rectangle.
  out = _erase(3, prob=1.0, mode='rand')
  assert _changed_box(out, NORMALISED) == (h, w)
  erased = out[np.any(out != NORMALISED, axis=2)]
  np.testing.assert_array_equal(erased, np.broadcast_to(erased[0],
                                                        erased.shape))
  # 'pixel': standard normal noise per pixel and channel.
  out = _erase(3, prob=1.0, mode='pixel')
  assert _changed_box(out, NORMALISED) == (h, w)
  noise = out[np.any(out != NORMALISED, axis=2)]
  assert abs(noise.mean()) < 0.3 and 0.8 < noise.std() < 1.2
  assert out.dtype == np.float32


def test_random_erasing_probability_and_count():
  erased = [not np.array_equal(_erase(s), NORMALISED) for s in range(200)]
  assert 0.15 < np.mean(erased) < 0.35  # prob=0.25 by default.
  # max_count=3: one to three rectangles, each with a third of the area
  # budget at most.
  for seed in range(5):
    out = _erase(seed, prob=1.0, max_count=3, mode='const')
    changed = np.any(out != NORMALISED, axis=2).mean()
    assert 0 < changed <= 1 / 3 + 0.05


def test_random_erasing_in_tf_data_with_dynamic_sizes():
  def gen():
    for h, w in [(64, 64), (33, 47)]:
      yield NORMALISED[:h, :w]

  ds = tf.data.Dataset.from_generator(
      gen, output_signature=tf.TensorSpec([None, None, 3], tf.float32))
  ds = ds.enumerate().map(lambda i, image: random_erasing.apply(
      image, tf.stack([i, 9]), prob=1.0))
  assert ds.element_spec.shape.as_list() == [None, None, 3]
  for i, out in enumerate(ds.as_numpy_iterator()):
    h, w = out.shape[:2]
    np.testing.assert_array_equal(
        out, _erase(i, NORMALISED[:h, :w], prob=1.0))


@pytest.mark.parametrize('kwargs, name', [
    (dict(prob=1.5), 'prob'),
    (dict(prob=-0.1), 'prob'),
    (dict(mode='gauss'), 'mode'),
    (dict(max_count=0), 'max_count'),
    (dict(min_area=0.5, max_area=0.4), 'min_area'),
    (dict(min_aspect=0.0), 'min_aspect'),
])
def test_random_erasing_rejects_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    _erase(0, **kwargs)

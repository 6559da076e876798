"""Tests for mim_jax.input_pipeline and mim_jax.data (CPU, offline, fast)."""

import io
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,g-bad-import-order
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mim_jax import errors
from mim_jax import input_pipeline
from mim_jax.data import augment
from mim_jax.data import masks
from mim_jax.data import sources
# pylint: enable=g-import-not-at-top,g-bad-import-order

IMAGE_SIZE = 32
PATCH = 4
NUM_PATCHES = (IMAGE_SIZE // PATCH)**2  # 64
LEN_KEEP = 16  # int(64 * (1 - 0.75))
KEYS = ('image', 'noise', 'mask', 'step', 'index')


def _config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
      dict(
          data='embedded:skimage',
          split='train',
          tfds_data_dir=None,
          tfds_manual_dir=None,
          batch_size=8,
          image_size=IMAGE_SIZE,
          crop_scale=(0.2, 1.0),
          crop_ratio=(3 / 4, 4 / 3),
          hflip=True,
          mean=(0.485, 0.456, 0.406),
          std=(0.229, 0.224, 0.225),
          shuffle_buffer=100,
          cache=False,
          prefetch=2,
          mask=dict(kind='random', ratio=0.75),
      ))
  config.update(overrides)
  return config


def _batches(config, num, **kwargs):
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  kwargs.setdefault('seed', 0)
  ds = input_pipeline.make_train_dataset(config, patch_size=PATCH, **kwargs)
  iterator = ds.as_numpy_iterator()
  return [next(iterator) for _ in range(num)]


def _assert_batch_equal(a, b):
  # Folder sources also count bad files per example (none here).
  assert set(a) == set(b) and set(a) - {input_pipeline.BAD_KEY} == set(KEYS)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _assert_valid_batch(batch, batch_size):
  assert batch['image'].shape == (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch['image'].dtype == np.uint8  # normalised on the devices
  for key in ('noise', 'mask'):
    assert batch[key].shape == (batch_size, NUM_PATCHES), key
    assert batch[key].dtype == np.float32, key
  for key in ('step', 'index'):
    assert batch[key].shape == (batch_size,), key
    assert batch[key].dtype == np.int32, key
  assert np.all((batch['noise'] >= 0) & (batch['noise'] < 1))
  # Exactly len_keep visible patches: the ones with the smallest noise.
  np.testing.assert_array_equal((batch['mask'] == 0).sum(axis=1), LEN_KEEP)
  ids_shuffle = np.argsort(batch['noise'], axis=1, kind='stable')
  expected = np.ones_like(batch['mask'])
  np.put_along_axis(expected, ids_shuffle[:, :LEN_KEEP], 0.0, axis=1)
  np.testing.assert_array_equal(batch['mask'], expected)


# ----------------------------------------------------------------- embedded


def test_embedded_batch():
  (batch,) = _batches(_config(), 1)
  _assert_valid_batch(batch, 8)
  np.testing.assert_array_equal(batch['step'], 0)
  np.testing.assert_array_equal(batch['index'], np.arange(8))
  images = (batch['image'] / 255 - np.array(_config().mean)) / np.array(
      _config().std)
  # Normalised with ImageNet statistics: within [-mean/std, (1-mean)/std].
  assert images.min() >= -2.2 and images.max() <= 2.7
  assert abs(images.mean()) < 1.5 and images.std() > 0.2
  # Every example is a different crop (and mask).
  flat = images.reshape(8, -1)
  assert len({row.tobytes() for row in flat}) == 8
  assert len({row.tobytes() for row in batch['mask']}) == 8


def test_embedded_images_load_offline():
  source = sources.open_source(_config(), seed=0, process_index=0,
                               process_count=1)
  assert source.num_records >= 10


def test_same_seed_same_batches_different_seed_differs():
  a = _batches(_config(), 2, seed=7)
  b = _batches(_config(), 2, seed=7)
  c = _batches(_config(), 1, seed=8)
  for x, y in zip(a, b):
    _assert_batch_equal(x, y)
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  assert not np.array_equal(a[0]['noise'], c[0]['noise'])
  # Consecutive steps differ too.
  assert not np.array_equal(a[0]['noise'], a[1]['noise'])
  np.testing.assert_array_equal(a[1]['step'], 1)


def test_resume_matches_uninterrupted_run():
  # 6 per batch over 16 embedded images: batch 2 spans the epoch boundary and
  # batch 3 starts mid-epoch 1 (skip of 2 records).
  config = _config(batch_size=6)
  full = _batches(config, 4, seed=3)
  (resumed,) = _batches(config, 1, seed=3, start_step=3)
  _assert_batch_equal(resumed, full[3])
  np.testing.assert_array_equal(resumed['step'], 3)


def test_per_host_sharding():
  config = _config(batch_size=8)
  (host0,) = _batches(config, 1, process_index=0, process_count=2)
  (host1,) = _batches(config, 1, process_index=1, process_count=2)
  _assert_valid_batch(host0, 4)
  _assert_valid_batch(host1, 4)
  np.testing.assert_array_equal(host0['index'], [0, 1, 2, 3])
  np.testing.assert_array_equal(host1['index'], [4, 5, 6, 7])
  assert not np.array_equal(host0['image'], host1['image'])
  assert not np.array_equal(host0['noise'], host1['noise'])


def test_process_info_defaults_to_jax():
  ds = input_pipeline.make_train_dataset(_config(batch_size=4),
                                         patch_size=PATCH, seed=0)
  batch = next(ds.as_numpy_iterator())
  # Single-process JAX on CPU: host 0 of 1 gets the whole global batch.
  np.testing.assert_array_equal(batch['index'], [0, 1, 2, 3])


def test_host_shards_are_disjoint():
  shards = [
      sources.open_source(_config(), seed=0, process_index=i,
                          process_count=3) for i in range(3)
  ]
  rows = [set(s.read(r).numpy() for r in s.ordered()) for s in shards]
  total = sources.open_source(_config(), seed=0, process_index=0,
                              process_count=1).num_records
  assert sum(len(r) for r in rows) == total
  assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])


def test_epochs_are_permutations():
  source = sources.open_source(_config(), seed=0, process_index=0,
                               process_count=1)
  n = source.num_records
  e0 = list(source.epoch(tf.constant(0, tf.int64)).as_numpy_iterator())
  e1 = list(source.epoch(tf.constant(1, tf.int64)).as_numpy_iterator())
  assert sorted(e0) == sorted(e1) == list(range(n))
  assert e0 != e1


# ------------------------------------------------------------------- folder


def _write_image(path, height, width, seed, fmt):
  rng = np.random.default_rng(seed)
  # Smooth gradients plus noise, so crops differ but compress fine.
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x * 255 // width, y * 255 // height,
                   (x + y) * 127 // (height + width)], axis=-1)
  noise = rng.integers(0, 40, (height, width, 3))
  array = np.clip(base + noise, 0, 255).astype(np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('images')
  _write_image(str(root / 'top.png'), 40, 56, 0, 'PNG')
  _write_image(str(root / 'cat' / 'a.jpg'), 48, 40, 1, 'JPEG')
  _write_image(str(root / 'cat' / 'B.JPEG'), 36, 60, 2, 'JPEG')
  _write_image(str(root / 'dog' / 'c.PNG'), 50, 50, 3, 'PNG')
  _write_image(str(root / 'dog' / 'deep' / 'd.jpeg'), 64, 33, 4, 'JPEG')
  (root / 'dog' / 'notes.txt').write_text('not an image')
  return root


def test_folder_source(image_folder):
  config = _config(data=f'folder:{image_folder}', batch_size=4)
  source = sources.open_source(config, seed=0, process_index=0,
                               process_count=1)
  assert source.num_records == 5
  batches = _batches(config, 4, seed=1)
  for batch in batches:
    _assert_valid_batch(batch, 4)
    np.testing.assert_array_equal(batch[input_pipeline.BAD_KEY], 0)
  (resumed,) = _batches(config, 1, seed=1, start_step=3)
  _assert_batch_equal(resumed, batches[3])


def test_empty_folder_error(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'readme.txt').write_text('x')
  with pytest.raises(ValueError, match=r'No images found.*\.jpg'):
    _batches(_config(data=f'folder:{tmp_path}'), 1)


def test_missing_folder_error(tmp_path):
  missing = tmp_path / 'does_not_exist'
  with pytest.raises(errors.MissingFileError,
                     match='input.data folder .*does not exist') as info:
    _batches(_config(data=f'folder:{missing}'), 1)
  assert str(missing) in str(info.value)


# ------------------------------------------------------------------- errors


def test_image_size_not_divisible_by_patch():
  with pytest.raises(ValueError, match=r'image_size=30.*patch_size=4'):
    _batches(_config(image_size=30), 1)


@pytest.mark.parametrize('ratio', [0.0, 1.0, 1.5, -0.1])
def test_bad_mask_ratio(ratio):
  with pytest.raises(ValueError, match=r'ratio=.*between 0 and 1'):
    _batches(_config(mask=dict(kind='random', ratio=ratio)), 1)


def test_unknown_mask_kind():
  with pytest.raises(ValueError, match=r"kind='checkers'.*random"):
    _batches(_config(mask=dict(kind='checkers', ratio=0.5)), 1)


def test_batch_not_divisible_by_process_count():
  with pytest.raises(ValueError, match=r'batch_size=6.*process_count=4'):
    _batches(_config(batch_size=6), 1, process_count=4)


def test_unknown_data_specs():
  with pytest.raises(errors.DataError,
                     match=r"input.data='embedded:nope'.*embedded:skimage"):
    _batches(_config(data='embedded:nope'), 1)
  with pytest.raises(errors.DataError,
                     match=r"Unknown input.data='s3:.*tfds:NAME"):
    _batches(_config(data='s3://bucket/images'), 1)


@pytest.mark.parametrize('field', ['eval.data', 'knn.data'])
def test_evaluation_data_errors_name_their_own_field(field, tmp_path):
  """The evaluation and kNN sets are opened with the input's fields but
  their own data spec: each message names the field the user set."""
  config = _config(tfds_data_dir=str(tmp_path))

  def open_eval(data):
    return input_pipeline.make_eval_dataset(
        config, data=data, split='train', batch_size=4, process_index=0,
        process_count=1, data_field=field)

  with pytest.raises(errors.DataError, match=f"Unknown {field}='nope:x'"):
    open_eval('nope:x')
  with pytest.raises(errors.MissingFileError, match=f'{field} folder'):
    open_eval(f'folder:{tmp_path}/none')
  with pytest.raises(errors.DataError,
                     match=f"{field}='embedded:skimage'.*has no labels"):
    open_eval('embedded:skimage')
  with pytest.raises(errors.DataError,
                     match=f"not prepared.*{field}='tfds:mnist'"):
    open_eval('tfds:mnist')
  with pytest.raises(errors.ConfigError,
                     match=field.split('.')[0] + r'\.batch_size=3'):
    input_pipeline.make_eval_dataset(
        config, data='embedded:digits', split='test', batch_size=3,
        process_index=0, process_count=2, data_field=field)
  # Without its own spec, the set is input.data's, named so.
  with pytest.raises(errors.DataError, match="input.data='embedded:skimage'"):
    input_pipeline.make_eval_dataset(
        config, data=None, split='train', batch_size=4, process_index=0,
        process_count=1, data_field=field)


# --------------------------------------------------------------------- tfds


class TinyMimImages(tfds.core.GeneratorBasedBuilder):
  """A 10-image data set built offline by the tests."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(num_classes=2),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples(10)}

  def _generate_examples(self, num):
    rng = np.random.default_rng(0)
    for i in range(num):
      image = rng.integers(0, 256, (36 + 2 * i, 48, 3), dtype=np.uint8)
      yield i, {'image': image, 'label': i % 2}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.disable_progress_bar()
  TinyMimImages(data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.mark.parametrize('cache', [False, True])
def test_tfds_source(tfds_dir, cache):
  config = _config(data='tfds:tiny_mim_images', tfds_data_dir=tfds_dir,
                   batch_size=4, cache=cache)
  batches = _batches(config, 4, seed=2)
  for batch in batches:
    _assert_valid_batch(batch, 4)
  (resumed,) = _batches(config, 1, seed=2, start_step=3)
  _assert_batch_equal(resumed, batches[3])
  host1 = _batches(config, 2, seed=2, process_index=1, process_count=2)
  np.testing.assert_array_equal(host1[0]['index'], [2, 3])
  source = sources.open_source(config, seed=0, process_index=1,
                               process_count=2)
  assert source.num_records == 5


def test_tfds_epochs_shuffle_deterministically(tfds_dir):
  config = _config(data='tfds:tiny_mim_images', tfds_data_dir=tfds_dir)

  def epoch(seed, index):
    source = sources.open_source(config, seed=seed, process_index=0,
                                 process_count=1)
    return list(source.epoch(tf.constant(index, tf.int64)))

  first = epoch(0, 0)
  assert [r.numpy() for r in first] == [r.numpy() for r in epoch(0, 0)]
  assert [r.numpy() for r in first] != [r.numpy() for r in epoch(0, 1)]
  assert len(first) == 10


def test_tfds_not_prepared(tmp_path):
  config = _config(data='tfds:mnist', tfds_data_dir=str(tmp_path))
  with pytest.raises(errors.DataError, match='tfds build mnist') as info:
    _batches(config, 1)
  assert str(tmp_path) in str(info.value)
  assert "input.data='tfds:mnist'" in str(info.value)


def test_tfds_imagenet_not_prepared(tmp_path):
  config = _config(data='tfds:imagenet2012', tfds_data_dir=str(tmp_path),
                   tfds_manual_dir=str(tmp_path / 'manual'))
  with pytest.raises(ValueError, match='tfds build imagenet2012') as info:
    _batches(config, 1)
  message = str(info.value)
  assert 'ILSVRC2012_img_train.tar' in message
  assert f'--manual_dir={tmp_path / "manual"}' in message
  assert 'input.tfds_data_dir' in message


def test_tfds_unknown_dataset(tmp_path):
  config = _config(data='tfds:no_such_dataset_xyz', tfds_data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='not a registered TFDS'):
    _batches(config, 1)


# ---------------------------------------------------------------- vis batch


def test_vis_batch_deterministic(image_folder):
  config = _config(data=f'folder:{image_folder}')
  a = input_pipeline.make_vis_batch(config, patch_size=PATCH, seed=0,
                                    num_images=7)
  b = input_pipeline.make_vis_batch(config, patch_size=PATCH, seed=0,
                                    num_images=7)
  _assert_batch_equal(a, b)
  _assert_valid_batch(a, 7)
  np.testing.assert_array_equal(a['index'], np.arange(7))
  # 5 images in the folder: the source is cycled (same image, new mask).
  np.testing.assert_array_equal(a['image'][5], a['image'][0])
  assert not np.array_equal(a['image'][1], a['image'][0])
  assert not np.array_equal(a['mask'][5], a['mask'][0])


def test_vis_batch_embedded_center_crop():
  batch = input_pipeline.make_vis_batch(_config(), patch_size=PATCH, seed=0,
                                        num_images=2)
  _assert_valid_batch(batch, 2)
  # astronaut.png is square: its center crop is the whole (resized) photo.
  pixels = batch['image'][0] / 255
  assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
  assert 0.0 <= pixels.min() and pixels.max() <= 1.0


def test_denormalize_inverts_normalize():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (2, 4, 4, 3)).astype(np.float32)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  normalized = augment.normalize(tf.constant(pixels), mean, std).numpy()
  np.testing.assert_allclose(
      input_pipeline.denormalize(normalized, mean, std), pixels / 255.0,
      atol=1e-6)
  assert input_pipeline.denormalize(np.full((1, 3), 9.0), mean, std).max() == 1


# -------------------------------------------------------------- components


def test_mask_fn_rectangular_grid():
  mask_fn = masks.make_mask_fn({'kind': 'random', 'ratio': 0.5}, (2, 5))
  out = mask_fn(tf.constant([1, 2], tf.int64))
  assert out['noise'].shape == (10,) and out['mask'].shape == (10,)
  assert int((out['mask'].numpy() == 0).sum()) == 5
  again = mask_fn(tf.constant([1, 2], tf.int64))
  np.testing.assert_array_equal(out['noise'], again['noise'])


def test_mask_ratio_leaving_nothing_visible():
  with pytest.raises(ValueError, match='no visible patch'):
    masks.make_mask_fn({'kind': 'random', 'ratio': 0.9}, 2)


def test_crop_window_in_bounds_and_fallback():
  for i in range(20):
    top, left, h, w = augment.sample_crop_window(
        tf.constant([i, 0], tf.int64), 50, 80, (0.2, 1.0),
        (3 / 4, 4 / 3)).numpy()
    assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 80
    assert 0.2 * 4000 * 0.9 <= h * w <= 4000
  # A 10x1000 strip: no window with ratio <= 4/3 covers >= 50% of it, so the
  # fallback center crop (height 10, width round(10 * 4/3)) is used.
  window = augment.sample_crop_window(tf.constant([0, 0], tf.int64), 10,
                                      1000, (0.5, 1.0), (3 / 4, 4 / 3))
  np.testing.assert_array_equal(window.numpy(), [0, 493, 10, 13])


def test_pil_resizes_are_pils():
  """The training crop's resize (BICUBIC) and the tokenizer view's (LANCZOS,
  BEiT/CAE's second_interpolation) are PIL's bit for bit, flipped or not,
  RGB and grey, shrinking and growing, inside a parallel tf.data map, with
  a static shape."""
  rng = np.random.default_rng(0)
  cases = [((57, 90, 3), 64), ((300, 211, 3), 64), ((40, 33, 1), 112),
           ((64, 64, 3), 64)]
  images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape, _ in cases]
  for i, ((shape, size), image) in enumerate(zip(cases, images)):
    flip = bool(i % 2)
    for method, pil in (('lanczos', Image.LANCZOS),
                        ('bicubic', Image.BICUBIC)):
      # pylint: disable=cell-var-from-loop
      ds = tf.data.Dataset.from_tensors(image).map(
          lambda x: augment.resize_pil_uint8(x, size, method,
                                             tf.constant(flip)),
          num_parallel_calls=2)
      # pylint: enable=cell-var-from-loop
      assert ds.element_spec.shape == (size, size, shape[2])
      got, = ds.as_numpy_iterator()
      src = Image.fromarray(image[..., 0] if shape[2] == 1 else image)
      want = np.asarray(src.resize((size, size), pil)).reshape(got.shape)
      np.testing.assert_array_equal(got, want[:, ::-1] if flip else want)


def test_train_image_is_pils_resized_crop():
  """The training image is PIL's bicubic resize of the RandomResizedCrop
  window (torchvision's pixels), flipped where the flip key says."""
  config = _config(image_size=48)
  # pylint: disable-next=protected-access
  augment_fn = input_pipeline._TrainAugment.from_config(
      config, 48, labeled=False, views={})
  rng = np.random.default_rng(1)
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(
      buffer, format='PNG')
  data = tf.constant(buffer.getvalue())
  flips = set()
  for k in range(4):
    crop_key, flip_key = tf.constant([k, 1]), tf.constant([k, 2])
    image = augment_fn(data, tf.constant([k, 0]), crop_key, flip_key)['image']
    crop = augment.decode_and_random_crop(data, crop_key, config.crop_scale,
                                          config.crop_ratio).numpy()
    want = np.asarray(Image.fromarray(crop).resize((48, 48), Image.BICUBIC))
    flip = bool(augment.flip_decision(flip_key))
    flips.add(flip)
    got = image.numpy()
    if got.dtype != np.uint8:  # normalised on the host
      got = (got * config.std + config.mean) * 255
    np.testing.assert_allclose(got, want[:, ::-1] if flip else want,
                               atol=1e-3)
  assert flips == {False, True}


def test_jpeg_draft_decodes_large_crops_at_reduced_scale():
  """input.jpeg_draft: a crop >= 4x the size decodes at 1/4 scale (shorter
  side still >= size), near the full decode shrunk; small crops are
  untouched; a non-bool is refused."""
  rng = np.random.default_rng(2)
  base = np.asarray(Image.fromarray(
      rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).resize(
          (500, 400), Image.BICUBIC))
  buffer = io.BytesIO()
  Image.fromarray(base).save(buffer, format='JPEG', quality=90)
  data = tf.constant(buffer.getvalue())
  seed = tf.constant([0, 0])
  for size, shrink in ((64, 4), (300, 1)):
    full = augment.decode_and_random_crop(data, seed, (1, 1), (1.25, 1.25))
    draft = augment.decode_and_random_crop(data, seed, (1, 1), (1.25, 1.25),
                                           draft_size=size).numpy()
    assert draft.shape == (400 // shrink, 500 // shrink, 3)
    want = np.asarray(Image.fromarray(full.numpy()).resize(
        (500 // shrink, 400 // shrink), Image.BOX))
    assert np.abs(draft.astype(float) - want).mean() < 2.0
  with pytest.raises(errors.ConfigError, match='jpeg_draft'):
    input_pipeline.validate_config(_config(jpeg_draft='yes'), patch_size=PATCH,
                                   process_count=1)


# ----------------------------------------------------------- labelled data


def test_folder_labels_from_class_folders(image_folder, tmp_path):
  """Class = top-level subfolder, in sorted order; loose images refused."""
  classes = tmp_path / 'classes'
  for i, name in enumerate(['cat', 'dog', 'cat', 'eel']):
    _write_image(str(classes / name / f'{i}.png'), 40, 40, i, 'PNG')
  config = _config(data=f'folder:{classes}', batch_size=4)
  source = sources.open_source(config, seed=0, process_index=0,
                               process_count=1, labeled=True)
  assert source.num_classes == 3
  labels = [int(source.label(tf.constant(i, tf.int64))) for i in range(4)]
  assert labels == [0, 0, 1, 2]  # files sorted: cat/0, cat/2, dog/1, eel/3
  ds = input_pipeline.make_train_dataset(
      config, patch_size=PATCH, seed=0, process_index=0, process_count=1,
      labeled=True, with_masks=False, num_classes=3)
  batch = next(ds.as_numpy_iterator())
  assert 'mask' not in batch and batch['label'].dtype == np.int32
  with pytest.raises(ValueError, match='num_classes=5.*3 classes'):
    input_pipeline.make_train_dataset(
        config, patch_size=PATCH, seed=0, process_index=0, process_count=1,
        labeled=True, with_masks=False, num_classes=5)
  with pytest.raises(ValueError, match='subfolder per class.*top.png'):
    sources.open_source(_config(data=f'folder:{image_folder}'), seed=0,
                        process_index=0, process_count=1, labeled=True)


def test_eval_dataset_covers_every_example_once_padded_per_host(tfds_dir):
  config = _config(data='tfds:tiny_mim_images', tfds_data_dir=tfds_dir)
  seen, valid = [], 0
  per_host = []
  for host in range(2):
    ds, batches, total = input_pipeline.make_eval_dataset(
        config, data=None, split='train', batch_size=8, crop_pct=0.875,
        process_index=host, process_count=2)
    assert total == 10
    rows = list(ds.as_numpy_iterator())
    per_host.append(len(rows))
    assert len(rows) == batches
    for b in rows:
      assert b['image'].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
      seen += list(b['label'][b['valid'] > 0])
      valid += int(b['valid'].sum())
  # 10 examples, 5 per host, host batch 4: 2 batches each, 3 padded rows.
  assert per_host == [2, 2] and valid == 10
  assert sorted(seen) == [0] * 5 + [1] * 5
  with pytest.raises(ValueError, match='validation'):
    input_pipeline.make_eval_dataset(config, data=None, split='validation',
                                     batch_size=8, process_index=0,
                                     process_count=1)


def test_embedded_digits_split_and_labels():
  train = sources.open_source(_config(data='embedded:digits'), seed=0,
                              process_index=0, process_count=1,
                              labeled=True)
  test = sources.open_source(_config(data='embedded:digits'), seed=0,
                             process_index=0, process_count=1,
                             split='test', labeled=True)
  assert (train.num_records, test.num_records) == (899, 898)
  assert train.num_classes == 10
  with pytest.raises(ValueError, match="no split 'validation'"):
    sources.open_source(_config(data='embedded:digits'), seed=0,
                        process_index=0, process_count=1,
                        split='validation')
  with pytest.raises(ValueError, match='has no labels'):
    sources.open_source(_config(data='embedded:skimage'), seed=0,
                        process_index=0, process_count=1, labeled=True)


def test_fine_tuning_augmentations_only_with_labels():
  config = _config(batch_size=4)
  config.randaugment = 'rand-m9-mstd0.5-inc1'
  with pytest.raises(ValueError, match='fine-tuning augmentations'):
    input_pipeline.make_train_dataset(config, patch_size=PATCH, seed=0,
                                      process_index=0, process_count=1)


def test_tfds_labelled_train_pipeline(tfds_dir):
  config = _config(data='tfds:tiny_mim_images', tfds_data_dir=tfds_dir,
                   batch_size=4)
  config.randaugment = 'rand-m9-mstd0.5-inc1'
  config.random_erasing = dict(prob=0.5)
  ds = input_pipeline.make_train_dataset(
      config, patch_size=PATCH, seed=0, process_index=0, process_count=1,
      labeled=True, with_masks=False, num_classes=2)
  batches = list(ds.take(3).as_numpy_iterator())
  labels = np.concatenate([b['label'] for b in batches])
  assert set(labels) <= {0, 1} and len(set(labels)) == 2
  erase = np.stack([b['erase'] for b in batches])  # (3, 4, 1, 4) boxes
  assert erase.dtype == np.int32 and erase.shape == (3, 4, 1, 4)
  drawn = erase[..., 2] > 0  # about half the images, boxes inside
  assert 0 < drawn.sum() < 12 and (erase[..., :2] >= 0).all()
  assert (erase[..., 0] + erase[..., 2] <= IMAGE_SIZE).all()
  again = next(input_pipeline.make_train_dataset(
      config, patch_size=PATCH, seed=0, process_index=0, process_count=1,
      labeled=True, with_masks=False, start_step=2).as_numpy_iterator())
  np.testing.assert_array_equal(again['image'], batches[2]['image'])
  np.testing.assert_array_equal(again['erase'], batches[2]['erase'])
  evals = input_pipeline.make_eval_dataset(config, data=None, split='train',
                                           batch_size=4)[0]
  _assert_normalised_on_device(batches + list(evals.as_numpy_iterator()),
                               config)


def _assert_normalised_on_device(batches, config):
  """The pipelines ship uint8 pixels; normalised in the jitted step
  (`images.model_batch`) they equal the float32 images the pipeline made
  before (`augment.normalize` of the same resized crop, integer-valued)
  within 1e-6; the erasing boxes are filled in the step, only inside the
  boxes."""
  import jax  # pylint: disable=g-import-not-at-top
  from mim_jax import images  # pylint: disable=g-import-not-at-top
  image_input = images.ImageInput(mean=config.mean, std=config.std)
  to_model = jax.jit(images.model_batch, static_argnums=1)
  for batch in batches:
    host = augment.normalize(tf.cast(batch['image'], tf.float32),
                             config.mean, config.std).numpy()
    plain = {'image': batch['image']}
    np.testing.assert_allclose(to_model(plain, image_input)['image'], host,
                               rtol=0, atol=1e-6)
    if 'erase' not in batch:
      continue
    erased = to_model(batch, image_input, jax.random.PRNGKey(0))
    assert 'erase' not in erased
    changed = np.any(np.abs(np.asarray(erased['image']) - host) > 1e-5, -1)
    inside = np.zeros_like(changed)
    for i, (top, left, h, w) in enumerate(batch['erase'][:, 0]):
      inside[i, top:top + h, left:left + w] = True
    np.testing.assert_array_equal(changed, inside)
  with pytest.raises(errors.DataError, match='int32.*uint8 pixels'):
    images.model_batch({'image': batch['label']}, image_input)

"""The parquet source (`input.data='parquet:...'`, Hugging Face image shards)
on shards written here with pyarrow from the embedded photos and digits."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,g-bad-import-order
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_parquet_shards
from mim_jax import errors
from mim_jax import input_pipeline
from mim_jax.data import embedded
from mim_jax.data import sources
# pylint: enable=g-import-not-at-top,g-bad-import-order

PATCH = 4


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  """The embedded photos (16) as a train split, 2 files of row groups of 3."""
  folder = str(tmp_path_factory.mktemp('photos'))
  return write_parquet_shards(folder, 'train',
                              [b for _, b in embedded.load('skimage')])


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  """64 training and 32 test digits (labelled, 10 classes in the
  metadata), and a validation split of 8 whose row 5 is no image."""
  folder = str(tmp_path_factory.mktemp('digits'))
  for split, num in (('train', 64), ('test', 32), ('validation', 8)):
    source_split = 'test' if split == 'validation' else split
    images = [b for _, b in embedded.load('digits', source_split)[:num]]
    labels = embedded.labels('digits', source_split)[:num]
    if split == 'validation':
      images[5] = b'<html>not found</html>'
    write_parquet_shards(folder, split, images, labels, row_group=8,
                         classes=10)
  return folder


def _config(data, **overrides):
  config = ml_collections.ConfigDict(dict(
      data=data, split='train', batch_size=8, image_size=32,
      shuffle_buffer=6, prefetch=2, mask=dict(kind='random', ratio=0.75)))
  config.update(overrides)
  return config


def _batches(config, num, **kwargs):
  kwargs = dict(dict(process_index=0, process_count=1, seed=0), **kwargs)
  ds = input_pipeline.make_train_dataset(config, patch_size=PATCH, **kwargs)
  iterator = ds.as_numpy_iterator()
  return [next(iterator) for _ in range(num)]


def _open(config, **kwargs):
  kwargs = dict(dict(process_index=0, process_count=1, seed=0), **kwargs)
  return sources.open_source(config, **kwargs)


def test_rows_epochs_hosts_determinism_and_resume(photos):
  config = _config(f'parquet:{photos}')
  source = _open(config)
  expected = [b for _, b in embedded.load('skimage')]
  assert [source.read(r).numpy() for r in source.ordered()] == expected
  # Every epoch is a permutation of the rows, a new one each epoch.
  epochs = [[int(r) for r in source.epoch(e)] for e in (0, 1)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(16))
  assert epochs[0] != epochs[1]
  # Two hosts: disjoint rows that cover the split.
  hosts = [_open(config, process_index=h, process_count=2) for h in (0, 1)]
  rows = [[s.read(r).numpy() for r in s.ordered()] for s in hosts]
  assert rows[0] + rows[1] == expected
  # A second pipeline with the same seed, started at step 1 (a resumed
  # run), gives exactly the batch of step 1 of the first.
  first = _batches(config, 2)
  (resumed,) = _batches(config, 1, start_step=1)
  assert set(resumed) == set(first[1])
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], first[1][key], err_msg=key)
  assert not np.array_equal(first[0]['image'], first[1]['image'])
  assert first[0][input_pipeline.BAD_KEY].sum() == 0


def test_bad_image_is_skipped_and_counted(tmp_path):
  images = [b for _, b in embedded.load('skimage')]
  images[5] = images[5][:len(images[5]) // 2]  # truncated
  folder = write_parquet_shards(str(tmp_path), 'train', images)
  config = _config(f'parquet:{folder}')
  batches = _batches(config, 2)  # one epoch
  assert sum(b[input_pipeline.BAD_KEY].sum() for b in batches) == 1


def test_labelled_eval_decodes_as_the_embedded_digits(digits):
  """The test split through the evaluation pipeline: the same images and
  labels as `embedded:digits`; 10 classes from the metadata."""
  config = _config(f'parquet:{digits}')
  source = _open(config, labeled=True, split='test')
  assert source.num_classes == 10 and source.total_records == 32
  ours, _, _ = input_pipeline.make_eval_dataset(
      config, data=None, split='test', batch_size=32, process_index=0,
      process_count=1)
  theirs, _, _ = input_pipeline.make_eval_dataset(
      _config('embedded:digits'), data=None, split='test', batch_size=32,
      process_index=0, process_count=1)
  a, b = next(ours.as_numpy_iterator()), next(theirs.as_numpy_iterator())
  np.testing.assert_array_equal(a['image'], b['image'][:32])
  np.testing.assert_array_equal(a['label'], b['label'][:32])


def test_bad_rows_of_an_evaluation_split_stop_it_or_are_dropped(digits):
  config = _config(f'parquet:{digits}')
  with pytest.raises(errors.DataError) as e:
    input_pipeline.make_eval_dataset(
        config, data=None, split='validation', batch_size=8,
        process_index=0, process_count=1)
  assert 'validation-00001-of-00002.parquet row 1 (not a JPEG' in str(e.value)
  ds, _, count = input_pipeline.make_eval_dataset(
      config, data=None, split='validation', batch_size=8, process_index=0,
      process_count=1, bad_images='drop')
  assert count == 7
  labels = embedded.labels('digits', 'test')[:8]
  np.testing.assert_array_equal(next(ds.as_numpy_iterator())['label'],
                                labels[:5] + labels[6:] + [0])


def _bad_shards(kind, folder):
  images = [b for _, b in embedded.load('skimage')][:4]
  if kind == 'no parquet':
    os.makedirs(folder)
    return folder
  if kind == 'no image column':
    table = pa.table({'img': images, 'label': [0, 1, 2, 3]})
  elif kind == 'image not bytes':
    table = pa.table({'image': [1, 2, 3, 4]})
  else:
    return write_parquet_shards(folder, 'train', images, shards=1)
  os.makedirs(folder)
  pq.write_table(table, os.path.join(folder, 'train-00000-of-00001.parquet'))
  return folder


@pytest.mark.parametrize('kind,split,labeled,words', [
    ('no parquet', 'train', False, ['No parquet files', 'train-00000']),
    ('no image column', 'train', False, ["no 'image' column",
                                         'columns: img, label']),
    ('image not bytes', 'train', False, ['int64', 'not a struct']),
    ('no split', 'validation', False, ["split 'validation'",
                                       'splits found: train']),
    ('no label', 'train', True, ["no 'label' column", 'columns: image']),
])
def test_bad_input_is_one_line(tmp_path, kind, split, labeled, words):
  folder = _bad_shards(kind, str(tmp_path / 'shards'))
  with pytest.raises(errors.DataError) as e:
    _open(_config(f'parquet:{folder}', split=split), labeled=labeled)
  message = str(e.value)
  assert '\n' not in message and 'input.data' in message
  for word in words:
    assert word in message, message

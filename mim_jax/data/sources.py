"""Raw (undecoded) record sources for the input pipeline.

A source holds one host's shard of a data set and yields *records*: cheap
handles (encoded bytes or an index into an in-memory table) that `read` turns
into encoded image bytes. Shuffling and skipping act on records, so resuming
never decodes an image it throws away.

Supported `input.data` values:
  tfds:NAME[/CONFIG][:VERSION]  a prepared TensorFlow Datasets data set.
  folder:/path                  *.jpg/*.jpeg/*.png found recursively; for
                                labels, one subfolder per class (ImageNet
                                layout), classes in sorted name order.
  embedded:NAME                 images bundled in a package (no download).
  parquet:/path                 parquet shards of the Hugging Face image
                                layout (`mim_jax.data.parquet`): splits
                                from the file names (train-*.parquet),
                                labels from the `label` column.

Labelled sources (`labeled=True`, for fine-tuning and probes) also give each
record's class: `label(record)`, an int32 in [0, num_classes).
"""

import abc
import os
from typing import Any, Callable, Collection, Iterator

from absl import logging
import numpy as np
import tensorflow as tf

from mim_jax import errors
from mim_jax.data import embedded
from mim_jax.data import parquet
from mim_jax.data import seeds

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
KNOWN_PREFIXES = ('tfds:', 'folder:', 'embedded:', 'parquet:')


class RecordSource(abc.ABC):
  """One host's shard of a data set, as a stream of raw records.

  Attributes:
    description: human-readable name, for logs.
    num_records: number of records in this host's shard (one epoch).
  """

  description: str
  num_records: int
  # Number of classes of a labelled source (0 when opened without labels).
  num_classes: int = 0
  # Records of the whole split over all hosts (each host's shard holds at
  # most ceil(total_records / process_count)).
  total_records: int = 0

  @abc.abstractmethod
  def epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
    """All records of the shard, shuffled deterministically for `epoch`.

    Args:
      epoch: int64 scalar tensor (this is used inside `flat_map`).

    Returns:
      Finite dataset of `num_records` records.
    """

  @abc.abstractmethod
  def ordered(self) -> tf.data.Dataset:
    """All records of the shard in their stored order (no shuffling)."""

  # Sources of image files (folders): `path(record)` names a record's file
  # and `paths` lists them in stored order.
  paths: list[str] | None = None

  @property
  def checked(self) -> bool:
    """Whether records may be bad images, to check before decoding
    (`mim_jax.data.image_check`: folders, parquet shards); `name` and
    `stored` then name and list them."""
    return self.paths is not None

  def read(self, record: tf.Tensor) -> tf.Tensor:
    """Turns a record into a scalar string tensor of encoded image bytes."""
    return record

  def path(self, record: tf.Tensor) -> tf.Tensor:
    """The file of a record (sources with `paths` only)."""
    raise ValueError(f'{self.description} has no files.')

  def name(self, record: tf.Tensor) -> tf.Tensor:
    """A record's name in the logs (checked sources): its file."""
    return self.path(record)

  def stored(self) -> Iterator[tuple[str, bytes]]:
    """(name, encoded bytes) of each record in stored order, read lazily
    (checked sources)."""
    for path in self.paths or ():
      with tf.io.gfile.GFile(path, 'rb') as f:
        yield path, f.read()

  def label(self, record: tf.Tensor) -> tf.Tensor:
    """The int32 class of a record (labelled sources only)."""
    raise ValueError(f'{self.description} was opened without labels.')


class ArraySource(RecordSource):
  """Source whose records are an in-memory table (image bytes or paths).

  Epochs are full random permutations computed with the stateless
  `tf.random.experimental.index_shuffle`, so they need no shuffle buffer.
  Records are row indices; `read` gathers the row (and reads the file for
  path tables), so skipped records cost only an integer.
  """

  def __init__(self, description: str, rows: list[Any], *, are_paths: bool,
               seed: int, process_index: int, process_count: int,
               labels: list[int] | None = None, num_classes: int = 0,
               field: str = 'input.data'):
    shard = rows[process_index::process_count]
    if not shard:
      raise errors.DataError(
          f'{description} ({field}) has {len(rows)} images, fewer than '
          f'process_count={process_count}: host {process_index} gets none.')
    self.description = description
    self.num_records = len(shard)
    self.total_records = len(rows)
    self._table = tf.constant(shard, tf.string)
    self._labels = None
    if labels is not None:
      self._labels = tf.constant(labels[process_index::process_count],
                                 tf.int32)
      self.num_classes = int(num_classes)
    self._are_paths = are_paths
    self.paths = list(shard) if are_paths else None
    self._shuffle_key = seeds.fold_in(
        seeds.base_key(seed, seeds.SHUFFLE), process_index)

  def epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
    key = seeds.fold_in(self._shuffle_key, epoch)
    order = tf.random.experimental.index_shuffle(
        tf.range(self.num_records, dtype=tf.int64), key,
        tf.constant(self.num_records - 1, tf.int64))
    return tf.data.Dataset.from_tensor_slices(order)

  def ordered(self) -> tf.data.Dataset:
    return tf.data.Dataset.range(self.num_records)

  def read(self, record: tf.Tensor) -> tf.Tensor:
    row = tf.gather(self._table, record)
    return tf.io.read_file(row) if self._are_paths else row

  def path(self, record: tf.Tensor) -> tf.Tensor:
    if not self._are_paths:
      return super().path(record)
    return tf.gather(self._table, record)

  def label(self, record: tf.Tensor) -> tf.Tensor:
    if self._labels is None:
      return super().label(record)
    return tf.gather(self._labels, record)


class ParquetSource(RecordSource):
  """One host's contiguous share of the rows of a split of parquet shards
  (see `mim_jax.data.parquet`). Records are int64 positions in the host's
  (sorted) global rows; `read` fetches a row's bytes from its (cached) row
  group."""

  def __init__(self, path: str, split: str, *, seed: int,
               process_index: int, process_count: int, shuffle_rows: int,
               labeled: bool = False, screen=None,
               field: str = 'input.data'):
    where = f'{field}={"parquet:" + path!r}'
    shards = parquet.open_split(path, split, field)
    rows = _screened_rows(shards, screen)
    first, end = parquet.host_rows(len(rows), process_index, process_count)
    if end <= first:
      raise errors.DataError(
          f'{where} split {split!r} has {len(rows)} rows, fewer than '
          f'process_count={process_count}: host {process_index} gets none.')
    self.description = (f'parquet:{path} split={split} rows '
                        f'[{first}, {end}) of {len(rows)}')
    self.num_records, self.total_records = end - first, len(rows)
    self._shards, self._rows = shards, rows[first:end]
    self._row_table = tf.constant(self._rows, tf.int64)
    self._files = tf.constant(shards.files, tf.string)
    self._file_start = tf.constant(shards.file_start, tf.int64)
    starts, sizes = shards.runs(self._rows)
    self._group_start = tf.constant(starts, tf.int64)
    self._group_size = tf.constant(sizes, tf.int64)
    self._num_groups = len(sizes)
    self._window = max(1, round(shuffle_rows * len(sizes) /
                                self.num_records))
    shards.cache_groups = self._window + parquet.CACHE_SLACK
    self._labels = None
    if labeled:
      labels, self.num_classes = _parquet_labels(shards, where)
      self._labels = tf.constant(labels[self._rows], tf.int32)
    self._shuffle_key = seeds.fold_in(
        seeds.base_key(seed, seeds.SHUFFLE), process_index)

  @property
  def checked(self) -> bool:
    return True

  def epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
    """Row groups in a random order; rows shuffled within windows of
    `self._window` consecutive groups of that order."""
    key = seeds.fold_in(self._shuffle_key, epoch)
    count = self._num_groups
    order = tf.random.experimental.index_shuffle(
        tf.range(count, dtype=tf.int64), key, tf.constant(count - 1,
                                                           tf.int64))

    def window(w):
      groups = order[w * self._window:(w + 1) * self._window]
      starts = tf.gather(self._group_start, groups)
      rows = tf.ragged.range(
          starts, starts + tf.gather(self._group_size, groups)).flat_values
      size = tf.size(rows, out_type=tf.int64)
      mix = tf.random.experimental.index_shuffle(
          tf.range(size), seeds.fold_in(key, w), size - 1)
      return tf.data.Dataset.from_tensor_slices(tf.gather(rows, mix))

    windows = -(-count // self._window)
    return tf.data.Dataset.range(windows).flat_map(window)

  def ordered(self) -> tf.data.Dataset:
    return tf.data.Dataset.range(self.num_records)

  def read(self, record: tf.Tensor) -> tf.Tensor:
    return _read_row(self._shards, tf.gather(self._row_table, record))

  def name(self, record: tf.Tensor) -> tf.Tensor:
    """'<file> row <n>', in TF ops (it is made for every record)."""
    row = tf.gather(self._row_table, record)
    file = tf.searchsorted(self._file_start, row[None], side='right')[0] - 1
    within = tf.strings.as_string(row - tf.gather(self._file_start, file))
    return tf.strings.join([tf.gather(self._files, file), ' row ', within])

  def stored(self) -> Iterator[tuple[str, bytes]]:
    for row in self._rows:
      yield self._shards.name(int(row)), self._shards.read(int(row))

  def label(self, record: tf.Tensor) -> tf.Tensor:
    if self._labels is None:
      return super().label(record)
    return tf.gather(self._labels, record)


def _read_row(shards: parquet.Shards, row: tf.Tensor) -> tf.Tensor:
  """The encoded image of a global row (int64 tensor), a string scalar."""
  data = tf.numpy_function(lambda r: shards.read(int(r)), [row], tf.string,
                           stateful=False)
  data.set_shape([])
  return data


def _screened_rows(shards: parquet.Shards, screen) -> np.ndarray:
  """The split's global rows, less those `screen(names, read)` leaves out
  (evaluation sets; see `open_source`)."""
  rows = np.arange(shards.num_rows, dtype=np.int64)
  if screen is None:
    return rows
  names = [shards.name(int(r)) for r in rows]
  out = set(screen(names, lambda index: _read_row(shards, index)))
  return rows[[name not in out for name in names]] if out else rows


def _parquet_labels(shards: parquet.Shards,
                    where: str) -> tuple[np.ndarray, int]:
  """(labels of every row of the split, number of classes).

  Raises:
    errors.DataError: no `label` column, or labels outside [0, classes).
  """
  if parquet.LABEL_COLUMN not in shards.schema.names:
    raise errors.DataError(
        f'{where}: the shards have no {parquet.LABEL_COLUMN!r} column '
        f'(columns: {", ".join(shards.schema.names)}), so they cannot train '
        'or evaluate a classifier; use labelled shards.')
  labels = shards.labels()
  classes = parquet.class_count(shards.schema) or int(labels.max()) + 1
  bad = labels[(labels < 0) | (labels >= classes)]
  if bad.size:
    raise errors.DataError(
        f'{where}: {bad.size} rows have labels outside [0, {classes}) '
        f'(e.g. {int(bad[0])}; -1 marks unlabelled rows, as in ImageNet\'s '
        'test split); use a labelled split.')
  return labels, classes


class TfdsSource(RecordSource):
  """A prepared TFDS data set, read with undecoded images.

  Epochs shuffle with a buffer of `shuffle_buffer` records seeded by
  (seed, epoch, host). The file order itself is fixed (TFDS already shuffles
  examples when it writes the files), which keeps every epoch addressable
  without iterator state. (`Dataset.shuffle` also mixes in TF's global seed:
  do not call `tf.random.set_seed` differently between runs to be resumed.)
  """

  def __init__(self, name: str, input_config: Any, *, seed: int,
               process_index: int, process_count: int,
               split: str | None = None, labeled: bool = False,
               field: str = 'input.data'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    data_dir = input_config.get('tfds_data_dir', None)
    manual_dir = input_config.get('tfds_manual_dir', None)
    builder = _tfds_builder(name, data_dir, manual_dir, field)
    split_name = 'input.split' if split is None else 'the split'
    split = split or input_config.get('split', 'train')
    image_key = input_config.get('tfds_image_key', 'image')
    label_key = input_config.get('tfds_label_key', 'label')
    where = f'{field}={"tfds:" + name!r}'
    if image_key not in builder.info.features:
      raise errors.DataError(
          f'TFDS data set {name!r} ({where}) has no feature {image_key!r} '
          f'(features: {", ".join(builder.info.features)}); set '
          'input.tfds_image_key.')
    self._labeled = labeled
    if labeled:
      features = builder.info.features
      feature = features[label_key] if label_key in features else None
      if feature is None or not hasattr(feature, 'num_classes'):
        raise errors.DataError(
            f'TFDS data set {name!r} ({where}) has no class-label feature '
            f'{label_key!r} (features: {", ".join(builder.info.features)}); '
            'set input.tfds_label_key.')
      self.num_classes = int(feature.num_classes)
    # Each host reads a disjoint, contiguous ~1/process_count of the split.
    host_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count)
    try:
      self.num_records = builder.info.splits[host_split].num_examples
    except (KeyError, ValueError) as e:
      raise errors.DataError(
          f'Bad {split_name} {split!r} for TFDS data set {name!r} ({where}; '
          f'available splits: {", ".join(builder.info.splits)}): {e}'
      ) from None
    if self.num_records < 1:
      raise errors.DataError(
          f'TFDS {name!r} ({where}) split {split!r} gives host '
          f'{process_index} of {process_count} no examples.')
    self.description = f'tfds:{name} split={split} shard={host_split}'
    self.total_records = builder.info.splits[split].num_examples

    read_config = tfds.ReadConfig(try_autocache=False, skip_prefetch=True)
    records = builder.as_dataset(
        split=host_split, shuffle_files=False, read_config=read_config,
        decoders={image_key: tfds.decode.SkipDecoding()})
    if labeled:
      # A dict, not a tuple: tf.data hands a dict element to map functions
      # as one argument, like the unlabelled bytes.
      records = records.map(
          lambda ex: {'image': ex[image_key],
                      'label': tf.cast(ex[label_key], tf.int32)},
          num_parallel_calls=tf.data.AUTOTUNE)
    else:
      records = records.map(lambda example: example[image_key],
                            num_parallel_calls=tf.data.AUTOTUNE)
    if input_config.get('cache', False):
      # Caches the encoded bytes, not decoded pixels: augmentation is
      # random per step, and encoded images are ~10x smaller.
      records = records.cache()
    self._records = records
    self._buffer = max(1, min(int(input_config.get('shuffle_buffer', 10_000)),
                              self.num_records))
    self._shuffle_key = seeds.fold_in(
        seeds.base_key(seed, seeds.SHUFFLE), process_index)

  def epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
    key = seeds.fold_in(self._shuffle_key, epoch)
    return self._records.shuffle(
        self._buffer, seed=seeds.to_int(key), reshuffle_each_iteration=False)

  def ordered(self) -> tf.data.Dataset:
    return self._records

  def read(self, record) -> tf.Tensor:
    return record['image'] if self._labeled else record

  def label(self, record) -> tf.Tensor:
    if not self._labeled:
      return super().label(record)
    return record['label']


def _default_tfds_data_dir() -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return os.environ.get('TFDS_DATA_DIR') or tfds.core.constants.DATA_DIR


def _tfds_builder(name: str, data_dir: str | None, manual_dir: str | None,
                  field: str = 'input.data'):
  """Returns the TFDS builder of `name`, checking that it is prepared.

  Args:
    name: 'NAME[/CONFIG][:VERSION]'.
    data_dir: input.tfds_data_dir (None: TFDS default).
    manual_dir: input.tfds_manual_dir, only used in the error message.
    field: the config field that names the data set, for the messages.

  Raises:
    errors.DataError: unknown name, or files not prepared in `data_dir`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    first_line = str(e).splitlines()[0] if str(e) else ''
    raise errors.DataError(
        f'{name!r} is not a registered TFDS data set ({first_line}). Check '
        f'{field}="tfds:NAME[/CONFIG]" against `tfds.list_builders()`.'
    ) from None
  if builder.is_prepared():
    return builder

  root = data_dir or _default_tfds_data_dir()
  base_name = name.split('/')[0].split(':')[0]
  if base_name == 'imagenet2012':
    manual = manual_dir or os.path.join(root, 'downloads', 'manual')
    how = (
        'ImageNet cannot be downloaded automatically: download '
        f'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar to {manual} '
        f'and run `tfds build imagenet2012 --manual_dir={manual} '
        f'--data_dir={root}`. Then point input.tfds_data_dir at {root} '
        '(input.tfds_manual_dir sets the manual download folder).')
  else:
    how = (f'Run `tfds build {name} --data_dir={root}` on a machine with '
           'internet access and copy the result there, or set '
           'input.tfds_data_dir to where it is prepared.')
  raise errors.DataError(
      f'TFDS data set {name!r} is not prepared in data_dir {root!r} '
      f'(expected files under {builder.data_dir}), so '
      f'{field}={"tfds:" + name!r} cannot be read. {how}')


def _list_image_files(path: str, field: str = 'input.data') -> list[str]:
  """Sorted image files under `path`, recursively (class folders optional).

  Raises:
    errors.MissingFileError: `path` does not exist.
    errors.DataError: `path` is a file, or holds no image.
  """
  if not tf.io.gfile.isdir(path):
    error = (errors.DataError if tf.io.gfile.exists(path)
             else errors.MissingFileError)
    raise error(
        f'{field} folder {path!r} does not exist or is not a directory. '
        'Expected a folder of images (extensions: '
        f'{", ".join(IMAGE_EXTENSIONS)}, any case), optionally in class '
        'subfolders.')
  files = []
  for root, _, names in tf.io.gfile.walk(path):
    for name in names:
      if name.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(root, name))
  if not files:
    raise errors.DataError(
        f'No images found under {path!r} ({field}): looked recursively for '
        f'files with extensions {", ".join(IMAGE_EXTENSIONS)} (any case).')
  # Sorted so that order, shuffling and host shards are reproducible.
  return sorted(files)


def _folder_labels(path: str, files: list[str],
                   field: str = 'input.data') -> tuple[list[int], int]:
  """Labels from class subfolders: the top-level folder of each file under
  `path`, classes numbered in sorted name order (torchvision ImageFolder).

  Raises:
    errors.DataError: some images are not inside a class folder.
  """
  tops = [os.path.relpath(f, path).split(os.sep) for f in files]
  loose = [os.path.join(path, *t) for t in tops if len(t) < 2]
  if loose:
    raise errors.DataError(
        f'{field} folder {path!r} needs one subfolder per class for '
        f'labels, but {len(loose)} images lie directly in it (e.g. '
        f'{loose[0]!r}); move them into class folders.')
  classes = sorted({t[0] for t in tops})
  index = {c: i for i, c in enumerate(classes)}
  return [index[t[0]] for t in tops], len(classes)


def check_data_spec(data: str, field: str = 'input.data') -> tuple[str, str]:
  """Splits 'kind:value' and validates the kind. Returns (kind, value).

  Raises:
    errors.DataError naming `field` (the config field of `data`).
  """
  if not isinstance(data, str) or not data.startswith(KNOWN_PREFIXES):
    raise errors.DataError(
        f'Unknown {field}={data!r}; expected one of '
        '"tfds:NAME[/CONFIG]", "folder:/path/to/images", '
        '"parquet:/path/to/shards", "embedded:NAME" '
        f'(embedded: {", ".join(embedded.available())}).')
  kind, value = data.split(':', 1)
  if not value:
    raise errors.DataError(f'{field}={data!r} is missing the part after '
                           '":".')
  return kind, value


def open_source(input_config: Any, *, seed: int, process_index: int,
                process_count: int, split: str | None = None,
                labeled: bool = False, data: str | None = None,
                screen: Callable[..., Collection[str]] | None = None,
                data_field: str = 'input.data') -> RecordSource:
  """Opens the source named by `input_config.data` for one host.

  Args:
    input_config: the `config.input` ConfigDict.
    seed: experiment seed (drives the per-epoch shuffling).
    process_index: this host's index.
    process_count: number of hosts; each gets a disjoint shard.
    split: the split to read (default `input_config.split`; TFDS,
      parquet and embedded sets; a folder source has no splits).
    labeled: also give each record's class (`label`, `num_classes`).
    data: the data spec (default `input_config.data`).
    screen: folder and parquet sources: called with every file of the
      folder (all hosts, sorted), or every row's name and a reader
      (int64 index -> encoded bytes) for parquet, before they are split
      between hosts; returns the names to leave out (class numbers still
      count their folders), or raises.
    data_field: the config field that holds the data spec, named in every
      message ('input.data', 'eval.data', 'knn.data').

  Returns:
    The host's RecordSource.

  Raises:
    errors.DataError: unknown/unprepared data set, empty folder, a split
      or labels the data set lacks.
    errors.MissingFileError: the folder does not exist.
  """
  spec = data or input_config.get('data', None)
  kind, value = check_data_spec(spec, data_field)
  shard = dict(seed=seed, process_index=process_index,
               process_count=process_count)
  if kind == 'tfds':
    source = TfdsSource(value, input_config, split=split, labeled=labeled,
                        field=data_field, **shard)
  elif kind == 'parquet':
    source = ParquetSource(
        value, split or input_config.get('split', 'train'), labeled=labeled,
        shuffle_rows=int(input_config.get('shuffle_buffer', 10_000)),
        screen=screen, field=data_field, **shard)
  elif kind == 'folder':
    files = _list_image_files(value, data_field)
    labels, classes = (_folder_labels(value, files, data_field) if labeled
                       else (None, 0))
    out = set(screen(files)) if screen is not None else set()
    if out:
      keep = [i for i, f in enumerate(files) if f not in out]
      files = [files[i] for i in keep]
      if labels is not None:
        labels = [labels[i] for i in keep]
    source = ArraySource(f'folder:{value} ({len(files)} images)', files,
                         are_paths=True, labels=labels, num_classes=classes,
                         field=data_field, **shard)
  else:
    split = split or input_config.get('split', 'train')
    try:
      images = embedded.load(value, split)
      labels = embedded.labels(value, split) if labeled else None
    except errors.DataError as e:
      raise errors.DataError(f'{data_field}={spec!r}: {e}') from None
    source = ArraySource(
        f'embedded:{value} split={split} ({len(images)} images)',
        [d for _, d in images], are_paths=False, labels=labels,
        num_classes=embedded.num_classes(value) if labeled else 0,
        field=data_field, **shard)
  logging.info('Input source %s: %d records for host %d/%d.',
               source.description, source.num_records, process_index,
               process_count)
  return source

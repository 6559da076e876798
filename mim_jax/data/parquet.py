"""Parquet shards of the Hugging Face image-dataset layout, as a source.

`input.data='parquet:/path'` reads files `<split>-*.parquet` (e.g.
`train-00000-of-00004.parquet`, `validation-00000-of-00001.parquet`) or
`<split>.parquet`, in the folder or its `data/` subfolder (the layout of a
dataset repository of the Hub). The split is the file name's prefix. Each row
has an `image` column, the struct {bytes, path} of 🤗 datasets' `Image`
feature (plain binary works too), and, for labelled sources, an integer
`label` column; the number of classes comes from the `ClassLabel` names in
the files' `huggingface` schema metadata, else max label + 1.

Only metadata (row counts of every row group) and, when labelled, the label
column are read up front; image bytes are read as records are, one row group
at a time, kept in a small cache. Rows are numbered over the split (files in
sorted order); host h of n holds the contiguous rows [h N / n, (h+1) N / n).
An epoch visits the host's row groups in a random order and shuffles the rows
within windows of consecutive groups (about `input.shuffle_buffer` rows, as
TFDS's shuffle buffer), so each group is read once per epoch; the order is a
pure function of (seed, epoch, host), like every other source's.
"""

import collections
import glob
import json
import os
import threading

import numpy as np

from mim_jax import errors

IMAGE_COLUMN = 'image'
LABEL_COLUMN = 'label'
# Row groups kept in memory beyond one shuffle window (reads of the parallel
# map that lag behind the window).
CACHE_SLACK = 4


def find_shards(path: str, field: str = 'input.data') -> dict[str, list[str]]:
  """{split: sorted shard files} of the folder `path` (or `path`/data).

  Raises:
    errors.MissingFileError: `path` does not exist.
    errors.DataError: `path` is a file, or holds no parquet file.
  """
  if not os.path.isdir(path):
    error = (errors.DataError if os.path.exists(path)
             else errors.MissingFileError)
    raise error(f'{field} folder {path!r} does not exist or is not a '
                'directory. Expected parquet shards such as '
                'train-00000-of-00004.parquet (Hugging Face layout).')
  files = []
  for folder in (path, os.path.join(path, 'data')):
    files += glob.glob(os.path.join(folder, '*.parquet'))
  if not files:
    raise errors.DataError(
        f'No parquet files in {path!r} or {os.path.join(path, "data")!r} '
        f'({field}): expected shards named <split>-*.parquet, e.g. '
        'train-00000-of-00004.parquet.')
  splits = collections.defaultdict(list)
  for file in sorted(files):
    name = os.path.basename(file)[:-len('.parquet')]
    splits[name.split('-', 1)[0]].append(file)
  return dict(splits)


def _image_bytes_type(schema, file: str, field: str) -> str:
  """'struct' (the `Image` feature) or 'binary'; else a DataError."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  if IMAGE_COLUMN not in schema.names:
    raise errors.DataError(
        f'Parquet shard {file!r} ({field}) has no {IMAGE_COLUMN!r} column '
        f'(columns: {", ".join(schema.names)}); expected the Hugging Face '
        'image layout: image = {bytes, path}, optional label.')
  kind = schema.field(IMAGE_COLUMN).type
  if pa.types.is_struct(kind):
    names = [kind.field(i).name for i in range(kind.num_fields)]
    if 'bytes' in names and _is_binary(kind.field('bytes').type):
      return 'struct'
  elif _is_binary(kind):
    return 'binary'
  raise errors.DataError(
      f'Parquet shard {file!r} ({field}): column {IMAGE_COLUMN!r} is '
      f'{kind}, not a struct with binary `bytes` (the Hugging Face Image '
      'feature) or binary image bytes.')


def _is_binary(kind) -> bool:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def class_count(schema) -> int:
  """Classes of the `label` ClassLabel in the `huggingface` metadata, or 0."""
  try:
    info = json.loads((schema.metadata or {})[b'huggingface'])
    feature = info['info']['features'][LABEL_COLUMN]
    return len(feature['names']) if 'names' in feature else 0
  except (KeyError, TypeError, ValueError):
    return 0


class Shards:
  """The row groups of one split's shards (metadata only) and their reader.

  Attributes:
    files: the split's shard files, sorted.
    group_file, group_index: file and row group of each global row group.
    group_start: first global row of each row group (plus the total last).
    image_kind: 'struct' or 'binary' (`_image_bytes_type`).
    schema: the first file's arrow schema.
  """

  def __init__(self, files: list[str], field: str, cache_groups: int = 8):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.files = files
    self.schema = pq.read_schema(files[0])
    self.image_kind = _image_bytes_type(self.schema, files[0], field)
    group_file, group_index, sizes = [], [], []
    self._metadata = [pq.read_metadata(file) for file in files]
    for i, (file, meta) in enumerate(zip(files, self._metadata)):
      if IMAGE_COLUMN not in meta.schema.to_arrow_schema().names:
        _image_bytes_type(meta.schema.to_arrow_schema(), file, field)
      for g in range(meta.num_row_groups):
        group_file.append(i)
        group_index.append(g)
        sizes.append(meta.row_group(g).num_rows)
    self.group_file = np.array(group_file, np.int64)
    self.group_index = np.array(group_index, np.int64)
    self.group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(
        np.int64)
    # First global row of each file.
    self.file_start = self.group_start[np.searchsorted(
        self.group_file, np.arange(len(files)))]
    self.cache_groups = cache_groups
    self._cache = collections.OrderedDict()
    self._lock = threading.Lock()

  @property
  def num_rows(self) -> int:
    return int(self.group_start[-1])

  def labels(self) -> np.ndarray:
    """The int64 `label` column of the split (all rows, in order)."""
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    return np.concatenate([
        pq.read_table(f, columns=[LABEL_COLUMN])[LABEL_COLUMN]
        .to_numpy(zero_copy_only=False).astype(np.int64)
        for f in self.files])

  def locate(self, row: int) -> tuple[int, int]:
    """(global row group, row within it) of a global row."""
    group = int(np.searchsorted(self.group_start, row, side='right')) - 1
    return group, row - int(self.group_start[group])

  def name(self, row: int) -> str:
    """'<file> row <n>': a global row, for the logs."""
    file = int(self.group_file[self.locate(row)[0]])
    return f'{self.files[file]} row {row - int(self.file_start[file])}'

  def read(self, row: int) -> bytes:
    """The encoded image of a global row (b'' where its bytes are null)."""
    group, offset = self.locate(row)
    value = self._group(group)[offset].as_py()
    return value or b''

  def _group(self, group: int):
    """The image bytes (arrow array) of a global row group, cached."""
    import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    with self._lock:
      if group in self._cache:
        self._cache.move_to_end(group)
        return self._cache[group]
    # A file handle per read, not per thread and shard (threads x shards
    # open files).
    file = int(self.group_file[group])
    handle = pq.ParquetFile(self.files[file], metadata=self._metadata[file])
    try:
      column = handle.read_row_group(
          int(self.group_index[group]), columns=[IMAGE_COLUMN]
      ).column(IMAGE_COLUMN).combine_chunks()
    finally:
      handle.close()
    if self.image_kind == 'struct':  # (struct_field respects offsets)
      column = pc.struct_field(column, 'bytes')
    with self._lock:
      self._cache[group] = column
      while len(self._cache) > self.cache_groups:
        self._cache.popitem(last=False)
    return column

  def runs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first position, length) in the sorted global `rows` of each run of
    rows from one row group."""
    groups = np.searchsorted(self.group_start, rows, side='right')
    starts = np.flatnonzero(np.diff(groups, prepend=-1))
    return starts, np.diff(starts, append=len(rows))


def open_split(path: str, split: str, field: str = 'input.data') -> Shards:
  """The shards of `split` in the folder `path` (`find_shards`).

  Raises:
    errors.DataError: no parquet file, or none of `split` (naming the
      splits found), or no usable `image` column.
  """
  splits = find_shards(path, field)
  if split not in splits:
    raise errors.DataError(
        f'{field}={"parquet:" + path!r} has no shards of split {split!r} '
        f'(splits found: {", ".join(sorted(splits))}); set the split '
        '(input.split, or the evaluation split) to one of them.')
  return Shards(splits[split], field)


def host_rows(total: int, process_index: int,
              process_count: int) -> tuple[int, int]:
  """[first, end) of the contiguous global rows of one host."""
  return (total * process_index // process_count,
          total * (process_index + 1) // process_count)

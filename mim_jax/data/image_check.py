"""Checks of encoded images before they are decoded (folder and parquet
sources).

TensorFlow's decoders stop a tf.data pipeline at the first bad file, with an
error that does not name it. Each file read from a folder is therefore
checked first, from its bytes and without decoding: empty, not a JPEG or
PNG (text, HTML, ...), a corrupt or missing header, truncated (no end
marker), or more pixels than `input.max_image_pixels` (a decompression
bomb, or an image too large to decode in memory). A PNG named `.jpg` is
fine: the decoder goes by content.

`ImageChecker` runs the check as a `tf.py_function` in the pipeline. With
`input.bad_images='skip'` a bad file is logged once, by path, and left out
(`fill_gaps` keeps every position of the stream filled, so the step ->
example mapping, and with it resume, stay exact); with 'error' it stops the
run naming the file.

Evaluation folders are checked whole before the run starts (`scan`, then
`screen_eval_files`): every file is read and decoded by TensorFlow's own
decoders (the byte check misses a JPEG whose data is damaged inside, which
`decode_jpeg` refuses), in a parallel tf.data pass. Evaluation counts every
image, so a bad file stops the run naming every bad file
(`eval.bad_images='error'`), or is left out of the evaluation, logged
('drop').
"""

import re
import struct
import threading
from typing import Callable, Iterable, Optional, Sequence

from absl import logging
import tensorflow as tf

from mim_jax import errors

# PIL's Image.MAX_IMAGE_PIXELS: a 20000 x 20000 image is over it.
DEFAULT_MAX_PIXELS = 89_478_485
BAD_IMAGE_MODES = ('skip', 'error')
# Bad files of an evaluation folder: stop the run, or evaluate without them.
EVAL_BAD_IMAGE_MODES = ('error', 'drop')
# Bad files named in full in an error message (all of them are logged).
_LISTED = 50
# The end of the error of input.bad_images='error'; `ERROR` finds the whole
# line in the message of the TensorFlow error that carries it.
_ERROR_FIX = ('. Fix or remove it, or set --config.input.bad_images=skip to '
              'leave such files out.')
ERROR = re.compile(r'bad image [^\n]*?' + re.escape(_ERROR_FIX))
_PNG = b'\x89PNG\r\n\x1a\n'
# Start-of-frame markers (the ones with the frame size), per ITU T.81.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
        0xCE, 0xCF}


def _jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
  """(height, width) from the first start-of-frame segment, or None."""
  i, n = 2, len(data)
  while i + 4 <= n:
    if data[i] != 0xFF:
      return None
    marker = data[i + 1]
    if marker == 0xFF:  # fill byte
      i += 1
      continue
    if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
      i += 2
      continue
    if marker in _SOF:
      if i + 9 > n:
        return None
      h, w = struct.unpack('>HH', data[i + 5:i + 9])
      return h, w
    if marker == 0xDA:  # scan data before any frame header
      return None
    i += 2 + struct.unpack('>H', data[i + 2:i + 4])[0]
  return None


def problem(data: bytes, max_pixels: int) -> Optional[str]:
  """Why `data` (an encoded image) would not decode, or None."""
  if not data:
    return 'empty file'
  if data[:3] == b'\xff\xd8\xff':
    size = _jpeg_size(data)
    if size is None:
      return 'corrupt JPEG (no frame header)'
    if not data.rstrip(b'\x00\r\n\t ').endswith(b'\xff\xd9'):
      return 'truncated JPEG (no end-of-image marker)'
  elif data[:8] == _PNG:
    if len(data) < 24 or data[12:16] != b'IHDR':
      return 'corrupt PNG (no IHDR header)'
    w, h = struct.unpack('>II', data[16:24])
    size = h, w
    if b'IEND' not in data[-16:]:
      return 'truncated PNG (no IEND chunk)'
  else:
    return f'not a JPEG or PNG (starts with {data[:8]!r})'
  h, w = size
  if not h or not w:
    return f'{w} x {h} pixels'
  if h * w > max_pixels:
    return (f'{w} x {h} = {w * h} pixels, over input.max_image_pixels='
            f'{max_pixels}')
  return None


class ImageChecker:
  """The pipeline's check of each file (see the module docstring).

  """

  # Paths already logged, by any checker of this process (the train
  # pipeline and the reconstruction batch meet the same files).
  _logged = set()

  def __init__(self, mode: str = 'skip',
               max_pixels: int = DEFAULT_MAX_PIXELS):
    if mode not in BAD_IMAGE_MODES:
      raise errors.ConfigError(f'input.bad_images={mode!r}: use one of '
                               f'{BAD_IMAGE_MODES}.')
    if not (isinstance(max_pixels, int) and max_pixels > 0):
      raise errors.ConfigError(f'input.max_image_pixels={max_pixels!r} must '
                               'be a positive integer.')
    self.mode, self.max_pixels = mode, max_pixels
    self._lock = threading.Lock()

  def _check(self, path, data) -> bool:
    path = path.numpy().decode('utf-8', 'replace')
    why = problem(data.numpy(), self.max_pixels)
    if why is None:
      return True
    if self.mode == 'error':
      raise errors.DataError(f'bad image {path}: {why}{_ERROR_FIX}')
    with self._lock:
      first = path not in ImageChecker._logged
      ImageChecker._logged.add(path)
    if first:
      logging.warning('Skipping bad image %s: %s.', path, why)
    return False

  def ok(self, path: tf.Tensor, data: tf.Tensor) -> tf.Tensor:
    """Scalar bool tensor: `data` (read from `path`) looks decodable."""
    flag = tf.py_function(self._check, [path, data], tf.bool)
    flag.set_shape([])
    return flag

  def first_good(self, images: Iterable[tuple[str, bytes]],
                 limit: int = 5) -> None:
    """Reads `images` ((name, encoded bytes), lazily) in order until one is
    good, before anything compiles.

    Raises:
      errors.DataError naming up to `limit` bad images, when none is good.
    """
    seen = []
    for name, data in images:
      why = problem(data, self.max_pixels)
      if why is None:
        return
      seen.append(f'{name} ({why})')
    more = f' and {len(seen) - limit} more' if len(seen) > limit else ''
    raise errors.DataError(
        f'none of the {len(seen)} images can be decoded: '
        + '; '.join(seen[:limit]) + more + '. Fix the files or point '
        'input.data at another folder.')


def fill_gaps(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Elements (position, *rest) with some positions left out -> every
  position, in order, plus a last field: 1 where the position's own record
  was left out and the next kept element stands in for it (with its own
  position, so its crop and flip differ), else 0.

  The stand-in is the *next* kept element, so what fills a position does
  not depend on where the stream started: a resumed run fills exactly as
  an uninterrupted one.
  """

  def step(expected, elem):
    position = elem[0]
    return position + 1, (expected, elem)

  def expand(expected, elem):
    position, rest = elem[0], elem[1:]
    count = position - expected + 1
    positions = tf.range(expected, position + 1)
    filled = tf.cast(positions < position, tf.int32)
    tiled = tuple(tf.repeat(tf.expand_dims(x, 0), count, axis=0)
                  for x in rest)
    return tf.data.Dataset.from_tensor_slices((positions, *tiled, filled))

  return ds.scan(tf.constant(0, tf.int64), step).flat_map(expand)


def _decode_error(data: bytes) -> Optional[str]:
  """TensorFlow's error decoding `data` (as the pipelines do), or None."""
  try:
    if tf.io.is_jpeg(data):
      tf.io.decode_jpeg(data, channels=3)
    else:
      tf.io.decode_image(data, channels=3, expand_animations=False)
  except tf.errors.OpError as e:
    # '{{function_node ...}} jpeg::Uncompress failed. ... [Op:DecodeJpeg]'
    message = re.sub(r'^\{\{[^}]*\}\}\s*|\s*\[Op:\w+\]$', '',
                     e.message.strip().splitlines()[0])
    return f'does not decode ({message})'
  return None


def scan(paths: Sequence[str], max_pixels: int,
         read: Optional[Callable[[tf.Tensor], tf.Tensor]] = None
         ) -> dict[int, str]:
  """Every file of `paths` that would not decode: {index: why}; with
  `read` (int64 index -> encoded bytes, TF ops), `paths` only name the
  images (e.g. rows of parquet shards) and `read` reads them.

  Each file is read, checked from its bytes (`problem`), then decoded by
  TensorFlow's decoders, JPEGs at 1/8 scale (`ratio=8`: the whole entropy-
  coded data is read, as in a full decode, which fails on the same files,
  at a fraction of the IDCT cost), in a parallel tf.data pass. The few
  files that fail are decoded again alone to tell why.
  """
  if not paths:
    return {}
  table = tf.constant(list(paths), tf.string)
  read = read or (lambda index: tf.io.read_file(tf.gather(table, index)))

  def bytes_problem(data):
    return problem(data.numpy(), max_pixels) or ''

  def check(index):
    data = read(index)
    why = tf.py_function(bytes_problem, [data], tf.string)
    why.set_shape([])

    def decode():
      image = tf.cond(
          tf.io.is_jpeg(data),
          lambda: tf.io.decode_jpeg(data, channels=3, ratio=8),
          lambda: tf.io.decode_image(data, channels=3,
                                     expand_animations=False))
      return tf.shape(image)[0]  # an output, so the decode runs

    # Returned, or tf.data would prune the decode away.
    height = tf.cond(tf.equal(why, ''), decode, lambda: tf.constant(0))
    return index, why, height

  ds = tf.data.Dataset.range(len(paths)).map(
      check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  bad, seen = {}, set()
  for index, why, _ in ds.ignore_errors().as_numpy_iterator():
    seen.add(int(index))
    if why:
      bad[int(index)] = why.decode('utf-8', 'replace')
  for index in sorted(set(range(len(paths))) - seen):
    try:
      data = read(tf.constant(index, tf.int64)).numpy()
    except (OSError, tf.errors.OpError) as e:
      bad[index] = f'cannot be read ({type(e).__name__}: {e})'
      continue
    bad[index] = (problem(data, max_pixels) or _decode_error(data)
                  or 'does not decode')
  return bad


def screen_eval_files(paths: Sequence[str], bad: dict[int, str], *,
                      mode: str, field: str, where: str) -> set[str]:
  """What to do with the bad files of an evaluation folder.

  Args:
    paths: every file of the folder (all hosts), as `scan` saw them.
    bad: `scan`'s {index: why}.
    mode: 'error' or 'drop' (EVAL_BAD_IMAGE_MODES).
    field: the config field of `mode`, named in the messages (e.g.
      'eval.bad_images').
    where: the folder, for the messages.

  Returns:
    The paths to leave out ('drop'; logged in one line).

  Raises:
    errors.ConfigError: an unknown mode.
    errors.DataError, one line naming every bad file (up to 50; all are
    logged) and the fix: mode 'error' with a bad file, or no good file at
    all.
  """
  if mode not in EVAL_BAD_IMAGE_MODES:
    raise errors.ConfigError(f'{field}={mode!r}: use one of '
                             f'{EVAL_BAD_IMAGE_MODES}.')
  if not bad:
    return set()
  named = [f'{paths[i]} ({why})' for i, why in sorted(bad.items())]
  head = (f'Evaluation folder {where}: {len(bad)} of {len(paths)} images '
          'cannot be decoded')
  if mode == 'drop' and len(bad) < len(paths):
    logging.warning('%s; leaving them out of the evaluation (%s=drop), '
                    'which runs on the other %d: %s.', head, field,
                    len(paths) - len(bad), '; '.join(named))
    return {paths[i] for i in bad}
  listed = '; '.join(named[:_LISTED])
  if len(named) > _LISTED:
    logging.error('%s: %s.', head, '; '.join(named))
    listed += f'; and {len(named) - _LISTED} more (all in the log above)'
  if len(bad) == len(paths):
    raise errors.DataError(
        f'{head} (none can): {listed}. Fix the files or point '
        f'{field.rsplit(".", 1)[0]}.data at another folder.')
  raise errors.DataError(
      f'{head}: {listed}. Evaluation counts every image, so the run stops '
      f'before it starts: fix or remove the files, or set '
      f'--config.{field}=drop to evaluate without them.')

"""tf.data input pipelines: MIM pretraining, fine-tuning/probes, evaluation.

`make_train_dataset` yields per-host batches of augmented images together with
their patch masks (or, for fine-tuning and probes, their labels), generated
inside tf.data:

  image: uint8 (B, H, W, 3), the pixels; the jitted steps normalise them on
         the devices, (x / 255 - mean) / std with input.mean / input.std
         (`mim_jax.images`): a quarter of float32's host-to-device bytes.
  noise: float32 (B, L), L = (H / p) * (W / p); ascending order lists the
         visible patches first.
  mask:  float32 (B, L), 1.0 = masked. For 'random' masks the
         len_keep = int(L * (1 - ratio)) patches with the smallest noise are
         visible (official MAE rule); 'block' (BEiT/CAE/BootMAE) and 'grid'
         masks come with a noise that replays them (see data/masks.py).
  step:  int32 (B,) global step of the batch.
  index: int32 (B,) position of the example in the global batch.
  <view>: uint8 (B, S, S, 3) for each entry of `views={name: S}`: the
         same crop and flip, Lanczos-resized (e.g. a dVAE tokenizer's
         input, see mim_jax/targets/tokenizer.py).
  label: int32 (B,) class index (labelled pipelines, `labeled=True`), with
         `image` augmented by the fine-tuning recipe when the config asks:
         RandAugment (`input.randaugment`, e.g. 'rand-m9-mstd0.5-inc1', on
         the uint8 crop) and random erasing (`input.random_erasing`), as
         timm's `create_transform`.
  erase: int32 (B, K, 4) (labelled, input.random_erasing.prob > 0): the
         random-erasing rectangles [top, left, h, w] of each image (zeros:
         none), K = max_count. timm fills them with noise in normalised
         space, after normalisation: the train step does that on the
         devices (`mim_jax.images.erase`), so the image stays uint8.

`make_eval_dataset` yields the fixed evaluation batches (resize + center
crop, `valid` marks the padding of the last batch).

Determinism and resume: every random decision (crop, flip, mask) comes from
stateless TF ops keyed by (seed, step, global index), and the record order of
each epoch is a pure function of (seed, epoch, host). A pipeline started at
`start_step=s` therefore starts directly in epoch
`(s * host_batch) // records_per_host`, skips the remaining records of that
epoch *before* reading or decoding them, and then produces exactly the batch
that a pipeline started at step 0 produces as its s-th batch. The resume cost
is skipping at most one epoch of undecoded records: integers for folder and
embedded sources, encoded records (I/O, no decoding) for TFDS.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,g-bad-import-order
import dataclasses
from typing import Any, Sequence

from absl import logging
import numpy as np
import tensorflow as tf


def _hide_accelerators_from_tf():
  """Keeps TF on the CPU: JAX owns the GPUs/TPUs and their memory."""
  for device_type in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], device_type)
    # RuntimeError: TF already initialised its devices; ValueError: device
    # type unknown to this TF build. Either way there is nothing to hide.
    except (RuntimeError, ValueError) as e:
      logging.debug('Could not hide %s devices from TF: %s', device_type, e)


_hide_accelerators_from_tf()

from mim_jax import errors
from mim_jax.data import augment
from mim_jax.data import image_check
from mim_jax.data import masks
from mim_jax.data import randaugment
from mim_jax.data import random_erasing
from mim_jax.data import seeds
from mim_jax.data import sources
# pylint: enable=g-import-not-at-top,g-bad-import-order

_DEFAULT_MASK = {'kind': 'random', 'ratio': 0.75}
# The arrays every batch has (besides its views); `step` and `index` are
# bookkeeping that stays on the host.
BATCH_KEYS = ('image', 'noise', 'mask', 'step', 'index')
# Folder sources: per example, 1 where a bad file was left out and the next
# good one fills its place (`mim_jax.data.image_check`); summed per batch
# into train/bad_images.
BAD_KEY = 'bad_images'
# What labelled pipelines add (fine-tuning, probes): the class, and with
# random erasing the rectangles to erase (`mim_jax.images.ERASE_KEY`).
LABEL_KEY = 'label'
ERASE_KEY = 'erase'
# Per-example key streams besides crop / flip / mask (folded into the
# example key, so adding them leaves the pretraining streams unchanged).
_RANDAUGMENT_KEY = 1001
_ERASING_KEY = 1002
# Key used for the vis batch's masks: fixed, so the same patches are masked
# in every visualisation of a run.
_VIS_STEP = 0


def _image_size(input_config: Any, patch_size: int) -> int:
  """Validates image_size / patch_size and returns image_size."""
  image_size = int(input_config.image_size)
  if patch_size < 1 or image_size < 1:
    raise errors.ConfigError(
        f'input.image_size={image_size} and patch_size={patch_size} must be '
        'positive.')
  if image_size % patch_size:
    suggestion = max(patch_size, image_size // patch_size * patch_size)
    raise errors.ConfigError(
        f'input.image_size={image_size} is not divisible by '
        f'patch_size={patch_size}; choose an image_size that is a multiple '
        f'of {patch_size} (e.g. {suggestion}).')
  return image_size


def _process_info(process_index: int | None,
                  process_count: int | None) -> tuple[int, int]:
  """Fills in the JAX process index/count when not given explicitly."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in '
                     f'[0, process_count={process_count}).')
  return process_index, process_count


def _host_batch_size(global_batch: int, process_count: int,
                     field: str = 'input.batch_size') -> int:
  if global_batch < 1 or global_batch % process_count:
    raise errors.ConfigError(
        f'{field}={global_batch} (the global batch) must be a '
        f'positive multiple of process_count={process_count}.')
  return global_batch // process_count


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
  lo, hi = (float(v) for v in value)
  if not 0 < lo <= hi:
    raise errors.ConfigError(f'input.{name}={tuple(value)} must satisfy '
                             '0 < min <= max.')
  return lo, hi


def _mean_std(input_config: Any) -> tuple[tuple[float, ...], ...]:
  """The per-channel normalisation (in [0, 1] units), ImageNet's default."""
  return (tuple(input_config.get('mean', (0.485, 0.456, 0.406))),
          tuple(input_config.get('std', (0.229, 0.224, 0.225))))


def _mask_config(input_config: Any) -> Any:
  return input_config.get('mask', None) or _DEFAULT_MASK


def validate_config(input_config: Any, *, patch_size: int,
                    process_count: int | None = None):
  """Checks image/patch sizes, the mask config and the host batch.

  Cheap and data-free, so the trainer calls it before building anything.

  Returns:
    (image_size, mask_fn, host_batch).

  Raises:
    ValueError naming the bad value and the fix.
  """
  image_size = _image_size(input_config, patch_size)
  mask_fn = masks.make_mask_fn(_mask_config(input_config),
                               image_size // patch_size)
  _, process_count = _process_info(0, process_count)
  host_batch = _host_batch_size(int(input_config.batch_size), process_count)
  image_checker(input_config)  # bad_images, max_image_pixels
  _draft_size(input_config, image_size, {})
  return image_size, mask_fn, host_batch


@dataclasses.dataclass(frozen=True)
class _TrainAugment:
  """The training transform of one example: RandomResizedCrop, flip, (for
  labelled pipelines) RandAugment and the random-erasing rectangles, and
  the extra views of the same crop and flip."""
  image_size: int
  scale: tuple
  ratio: tuple
  hflip: bool
  ra_spec: Any
  ra_fill: tuple
  erasing: dict
  views: dict
  draft_size: int | None

  @classmethod
  def from_config(cls, input_config: Any, image_size: int, labeled: bool,
                  views: dict[str, int]) -> '_TrainAugment':
    mean, _ = _mean_std(input_config)
    ra_spec, erasing = _augment_config(input_config, labeled)
    return cls(
        image_size=image_size,
        scale=_pair(input_config.get('crop_scale', (0.2, 1.0)),
                    'crop_scale'),
        ratio=_pair(input_config.get('crop_ratio', (3 / 4, 4 / 3)),
                    'crop_ratio'),
        hflip=bool(input_config.get('hflip', True)), ra_spec=ra_spec,
        ra_fill=_ra_fill(mean), erasing=erasing, views=views,
        draft_size=_draft_size(input_config, image_size, views))

  def __call__(self, data, key, crop_key, flip_key) -> dict:
    """{'image': uint8, view name: uint8, (erasing) 'erase': int32 boxes}
    of encoded `data`."""
    crop = augment.decode_and_random_crop(data, crop_key, self.scale,
                                          self.ratio, self.draft_size)
    # PIL's resize (torchvision's on PIL images), the flip fused into it.
    flip = augment.flip_decision(flip_key) if self.hflip else None
    image = augment.resize_bicubic_uint8(crop, self.image_size, flip)
    if self.ra_spec is not None:
      # timm applies RandAugment to the uint8 (PIL) crop after the flip.
      image = randaugment.apply(image, seeds.fold_in(key, _RANDAUGMENT_KEY),
                                self.ra_spec, fill=self.ra_fill)
    example = {'image': image}
    if self.erasing:
      example[ERASE_KEY] = random_erasing.sample_boxes(
          seeds.fold_in(key, _ERASING_KEY), self.image_size,
          self.image_size, **self.erasing)
    for name, size in self.views.items():
      # The same flip: both views flip together.
      example[name] = augment.resize_pil_uint8(crop, size, 'lanczos', flip)
    return example


def _draft_size(input_config: Any, image_size: int,
                views: dict[str, int]) -> int | None:
  """input.jpeg_draft: the side JPEG crops are decoded down to at most (the
  largest output), or None (off, the default: PIL's pixels)."""
  draft = input_config.get('jpeg_draft', False)
  if not isinstance(draft, bool):
    raise errors.ConfigError(f'input.jpeg_draft={draft!r} must be True or '
                             'False.')
  return max([image_size, *views.values()]) if draft else None


def make_train_dataset(input_config: Any,
                       *,
                       patch_size: int,
                       seed: int,
                       start_step: int = 0,
                       process_index: int | None = None,
                       process_count: int | None = None,
                       views: dict[str, int] | None = None,
                       labeled: bool = False,
                       with_masks: bool = True,
                       num_classes: int | None = None) -> tf.data.Dataset:
  """Builds the infinite, deterministic training pipeline of one host.

  For host h with host batch b, example j of the k-th local batch has
  step = start_step + k and global index h * b + j; its crop, flip and mask
  are keyed by (seed, step, global index) only.

  Args:
    input_config: the `config.input` ConfigDict (see module docstring of
      `mim_jax.data.sources` for `data`).
    patch_size: ViT patch size; image_size must be a multiple of it.
    seed: experiment seed.
    start_step: global step of the first batch (resume).
    process_index: this host's index (default: `jax.process_index()`).
    process_count: number of hosts (default: `jax.process_count()`).
    views: {name: S}: also emit each `name`, the same crop and flip
      Lanczos-resized to S x S (uint8).
    labeled: also emit 'label' (the source must have labels), and apply
      the config's RandAugment / random erasing.
    with_masks: emit 'noise' and 'mask' (pretraining); False for
      classification.
    num_classes: labelled pipelines: the model's number of classes, checked
      against the data set's.

  Returns:
    tf.data.Dataset of dicts with BATCH_KEYS (less noise/mask without
    masks, plus label) and the views (leading dimension: host batch =
    input.batch_size // process_count).

  Raises:
    errors.ConfigError on invalid configuration; errors.DataError or
    errors.MissingFileError on an unusable data source.
  """
  # Validate everything cheap before touching any data.
  image_size, mask_fn, host_batch = validate_config(
      input_config, patch_size=patch_size, process_count=process_count)
  process_index, process_count = _process_info(process_index, process_count)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  augment_fn = _TrainAugment.from_config(input_config, image_size, labeled,
                                         _check_views(views))

  source = sources.open_source(input_config, seed=seed,
                               process_index=process_index,
                               process_count=process_count, labeled=labeled)
  if labeled and num_classes is not None and (
      int(num_classes) != source.num_classes):
    raise errors.ConfigError(
        f'model.num_classes={num_classes} but {source.description} has '
        f'{source.num_classes} classes; set --config.model.num_classes='
        f'{source.num_classes}.')
  logging.info('Train pipeline: host %d/%d, host batch %d.', process_index,
               process_count, host_batch)
  ds = read_checked(_records_from(source, start_step * host_batch),
                    source, input_config)

  mask_example, mask_batch = masks.stages(mask_fn)
  process = _train_example_fn(
      augment_fn, source, mask_example if with_masks else None, labeled,
      seed=seed, start_step=start_step, host_batch=host_batch,
      process_index=process_index)
  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(host_batch, drop_remainder=True)
  if mask_batch is not None and with_masks:
    ds = ds.map(mask_batch, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
  return _finish(ds, input_config)


def _train_example_fn(augment_fn: '_TrainAugment',
                      source: sources.RecordSource, mask_example, labeled,
                      *, seed: int, start_step: int, host_batch: int,
                      process_index: int):
  """(position, record, data, filled) -> the example: its crop, flip and
  mask keyed by (seed, step, global index) only; `mask_example` None for
  pipelines without masks."""
  train_key = seeds.base_key(seed, seeds.TRAIN)

  def process(position, record, data, filled):
    step = start_step + position // host_batch
    index = process_index * host_batch + position % host_batch
    key = seeds.fold_in(train_key, step, index)
    crop_key, flip_key, mask_key = tf.unstack(
        tf.random.experimental.stateless_split(key, 3))
    example = augment_fn(data, key, crop_key, flip_key)
    if mask_example is not None:
      example.update(mask_example(mask_key))
    if labeled:
      example['label'] = source.label(record)
    example['step'] = tf.cast(step, tf.int32)
    example['index'] = tf.cast(index, tf.int32)
    if source.checked:
      example[BAD_KEY] = filled
    return example

  return process


def _records_from(source: sources.RecordSource,
                  first_record: int) -> tf.data.Dataset:
  """(local position, record) of the source's epochs in order, from the
  local record position `first_record` on (resume: whole epochs are
  skipped by number, the rest undecoded)."""
  start_epoch, skip = divmod(first_record, source.num_records)
  logging.info('Records from position %d: epoch %d, skipping %d undecoded '
               'records.', first_record, start_epoch, skip)
  ds = tf.data.Dataset.counter(start_epoch).flat_map(source.epoch)
  if skip:
    ds = ds.skip(skip)
  return ds.enumerate()


def image_checker(input_config: Any,
                  mode: str | None = None) -> image_check.ImageChecker:
  """The config's check of image files (input.bad_images, or `mode`;
  input.max_image_pixels)."""
  return image_check.ImageChecker(
      mode or input_config.get('bad_images', 'skip'),
      input_config.get('max_image_pixels', image_check.DEFAULT_MAX_PIXELS))


def read_checked(ds: tf.data.Dataset, source: sources.RecordSource,
                 input_config: Any) -> tf.data.Dataset:
  """(position, record) -> (position, record, encoded bytes, filled).

  For checked sources (files, parquet rows), each image is checked before
  decoding
  (`mim_jax.data.image_check`): a bad one is logged once by path and left
  out, and the next good record fills its position (`filled` = 1), or the
  run stops naming it (input.bad_images='error'). A source with no good
  file at all is refused here, before anything compiles. Other sources
  pass through (`filled` = 0).
  """
  if not source.checked:
    def read_all(position, record):
      return position, record, source.read(record), tf.constant(0)

    return ds.map(read_all, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
  checker = image_checker(input_config)
  checker.first_good(source.stored())

  def read(position, record):
    data = source.read(record)
    return position, record, data, checker.ok(source.name(record), data)

  def good(unused_position, unused_record, unused_data, ok):
    return ok

  def without_flag(position, record, data, unused_ok):
    return position, record, data

  ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return image_check.fill_gaps(ds.filter(good).map(without_flag))


def _finish(ds: tf.data.Dataset, input_config: Any) -> tf.data.Dataset:
  prefetch = input_config.get('prefetch', 2)
  ds = ds.prefetch(tf.data.AUTOTUNE if prefetch is None else int(prefetch))
  options = tf.data.Options()
  # Order must not depend on thread timing, or resume would not be exact.
  options.deterministic = True
  # One thread per op (parallelism comes from the parallel map), as
  # big_vision does: TF ops then do not fight the train step for cores.
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def _augment_config(input_config: Any, labeled: bool):
  """(RandAugment spec or None, random-erasing kwargs or {}) of a labelled
  pipeline; pretraining pipelines take neither.

  Raises:
    errors.ConfigError: a bad RandAugment string or erasing setting, or
      either set for a pipeline without labels.
  """
  spec = input_config.get('randaugment', None)
  erasing = dict(input_config.get('random_erasing', None) or {})
  if not labeled:
    if spec or erasing.get('prob'):
      raise errors.ConfigError('input.randaugment / input.random_erasing '
                               'are fine-tuning augmentations; pretraining '
                               'pipelines do not apply them. Unset them.')
    return None, {}
  ra = randaugment.parse(spec) if spec else None
  if erasing and not erasing.get('prob'):
    erasing = {}
  return ra, erasing


def _ra_fill(mean: Sequence[float]) -> tuple[int, ...]:
  """timm's RandAugment fill: the dataset mean as uint8 (ImageNet:
  (124, 116, 104))."""
  return tuple(int(round(255 * m)) for m in mean)


def eval_batches(total_records: int, host_batch: int,
                 process_count: int) -> int:
  """Batches per host of an evaluation pass: every host runs the same
  number (the largest shard, padded), so the sharded forward never waits
  on a host that has finished."""
  per_host = -(-total_records // process_count)
  return max(1, -(-per_host // host_batch))


def make_eval_dataset(input_config: Any,
                      *,
                      data: str | None,
                      split: str | None,
                      batch_size: int,
                      crop_pct: float = 0.875,
                      process_index: int | None = None,
                      process_count: int | None = None,
                      bad_images: str = 'error',
                      bad_images_field: str = 'eval.bad_images',
                      data_field: str = 'eval.data'
                      ) -> tuple[tf.data.Dataset, int, int]:
  """The finite, ordered evaluation pipeline of one host.

  Each image is resized so its shorter side is image_size / crop_pct, then
  center-cropped to image_size (timm's eval transform, bicubic), uint8 (the
  steps normalise it on the devices). The last batches are padded with
  `valid` = 0 so every host yields the same number of full batches.

  A folder (or parquet split) is checked whole first (every image read and
  decoded, split between the JAX processes: `image_check.scan`), so a bad
  image fails here, before anything compiles, in one line naming every bad
  one; or, with bad_images='drop', is left out (counts exclude it, on
  every host).

  Args:
    input_config: `config.input` (image_size, mean, std, tfds fields).
    data: the data spec ('tfds:..', 'folder:..', 'embedded:..'), default
      input_config.data (then named input.data in the messages).
    split: the split (TFDS / embedded).
    batch_size: global evaluation batch.
    crop_pct: center-crop fraction of the shorter side.
    process_index: this host (default jax.process_index()).
    process_count: hosts (default jax.process_count()).
    bad_images: bad files of a folder: 'error' (stop) or 'drop'.
    bad_images_field: the config field of `bad_images`, for the messages
      (the kNN monitor's: 'knn.bad_images').
    data_field: the config field of `data` ('eval.data', the kNN monitor's
      'knn.data'), named in the messages (its section's batch_size and
      crop_pct too).

  Returns:
    (dataset of {'image', 'label', 'valid'}, batches per host, number of
    real examples over all hosts).

  Raises:
    errors.DataError: unknown split or data set, unlabelled data, bad
      image files (bad_images='error').
    errors.MissingFileError: a folder that does not exist.
    errors.ConfigError: bad sizes or modes.
  """
  image_size = int(input_config.image_size)
  section = data_field.rsplit('.', 1)[0]
  if not 0 < crop_pct <= 1:
    raise errors.ConfigError(f'{section}.crop_pct={crop_pct} must be in '
                             '(0, 1].')
  process_index, process_count = _process_info(process_index, process_count)
  host_batch = _host_batch_size(int(batch_size), process_count,
                                f'{section}.batch_size')
  source = _eval_source(input_config, data, split, process_index,
                        process_count, bad_images, bad_images_field,
                        data_field)
  num_batches = eval_batches(source.total_records, host_batch,
                             process_count)

  def process(record):
    crop = augment.decode_and_center_crop(source.read(record), crop_pct)
    image = augment.resize(crop, image_size)
    return {'image': image, 'label': source.label(record),
            'valid': tf.constant(1.0, tf.float32)}

  ds = source.ordered().map(process, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)
  pad = num_batches * host_batch - source.num_records
  blank = {'image': tf.zeros([image_size, image_size, 3], tf.uint8),
           'label': tf.constant(0, tf.int32),
           'valid': tf.constant(0.0, tf.float32)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(pad))
  ds = ds.batch(host_batch, drop_remainder=True)
  return _finish(ds, input_config), num_batches, source.total_records


def _eval_source(input_config: Any, data, split, process_index: int,
                 process_count: int, bad_images: str, bad_images_field: str,
                 data_field: str) -> sources.RecordSource:
  """The labelled source of an evaluation set, a folder's files or parquet
  rows checked first (see `make_eval_dataset`)."""
  if bad_images not in image_check.EVAL_BAD_IMAGE_MODES:
    raise errors.ConfigError(f'{bad_images_field}={bad_images!r}: use one '
                             f'of {image_check.EVAL_BAD_IMAGE_MODES}.')
  max_pixels = image_checker(input_config, mode='error').max_pixels

  def screen(files, read=None):
    where = (data or input_config.get('data')).split(':', 1)[1]
    return image_check.screen_eval_files(
        files, _scan_on_all_processes(files, max_pixels, read),
        mode=bad_images, field=bad_images_field, where=where)

  return sources.open_source(input_config, seed=0, data=data, split=split,
                             process_index=process_index,
                             process_count=process_count, labeled=True,
                             screen=screen,
                             data_field=data_field if data else 'input.data')


def _scan_on_all_processes(paths: list[str], max_pixels: int,
                           read=None) -> dict[int, str]:
  """`image_check.scan` of `paths` (with `read`, the images they name),
  each JAX process scanning every process_count-th one; every process
  gets the whole {index: why}."""
  import jax  # pylint: disable=g-import-not-at-top
  count, index = jax.process_count(), jax.process_index()
  local_read = read and (lambda i: read(index + count * i))
  local = {index + count * i: why for i, why in image_check.scan(
      paths[index::count], max_pixels, local_read).items()}
  if count == 1:
    return local
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental import multihost_utils
  width = 200  # bytes of each reason
  most = int(multihost_utils.process_allgather(
      np.array([len(local)], np.int32)).max())
  if not most:
    return {}
  indices = np.full([most], -1, np.int32)
  whys = np.zeros([most, width], np.uint8)
  for row, (i, why) in enumerate(sorted(local.items())):
    indices[row] = i
    text = why.encode('utf-8')[:width]
    whys[row, :len(text)] = np.frombuffer(text, np.uint8)
  indices = multihost_utils.process_allgather(indices).reshape(-1)
  whys = multihost_utils.process_allgather(whys).reshape(-1, width)
  return {int(i): bytes(w).rstrip(b'\0').decode('utf-8', 'replace')
          for i, w in zip(indices, whys) if i >= 0}


def _check_views(views: dict[str, int] | None) -> dict[str, int]:
  views = dict(views or {})
  clash = sorted(set(views) & set(BATCH_KEYS))
  if clash:
    raise ValueError(f'views {clash} would replace batch keys; name them '
                     'differently.')
  bad = {k: v for k, v in views.items() if int(v) < 1}
  if bad:
    raise ValueError(f'view sizes {bad} must be positive.')
  return {k: int(v) for k, v in views.items()}


def make_vis_batch(input_config: Any,
                   *,
                   patch_size: int,
                   seed: int,
                   num_images: int = 8,
                   views: dict[str, int] | None = None
                   ) -> dict[str, np.ndarray]:
  """A fixed batch of the first source images, for reconstruction plots.

  Images (uint8) are resized (shorter side) and center-cropped, with no
  random augmentation; masks come from the configured mask function with a fixed
  key, so every call returns the same batch.

  Args:
    input_config: the `config.input` ConfigDict.
    patch_size: ViT patch size.
    seed: experiment seed.
    num_images: batch size; the source is cycled if it has fewer images.
    views: {name: S}, extra Lanczos views (as in `make_train_dataset`).

  Returns:
    Dict of numpy arrays with the keys of `make_train_dataset`.
  """
  image_size = _image_size(input_config, patch_size)
  if num_images < 1:
    raise errors.ConfigError(f'num_images={num_images} must be >= 1.')
  mask_fn = masks.make_mask_fn(_mask_config(input_config),
                               image_size // patch_size)
  views = _check_views(views)
  source = sources.open_source(input_config, seed=seed, process_index=0,
                               process_count=1)
  vis_key = seeds.base_key(seed, seeds.VIS)
  mask_example, mask_batch = masks.stages(mask_fn)

  def process(index, record):
    crop = augment.decode_and_center_crop(source.read(record))
    example = {'image': augment.resize(crop, image_size)}
    for name, size in views.items():
      example[name] = augment.resize_lanczos_uint8(crop, size)
    example.update(mask_example(seeds.fold_in(vis_key, _VIS_STEP, index)))
    example['step'] = tf.constant(_VIS_STEP, tf.int32)
    example['index'] = tf.cast(index, tf.int32)
    return example

  records = source.ordered()
  if source.checked:  # bad images are left out (the train pipeline
    # applies input.bad_images)
    checker = image_checker(input_config, mode='skip')
    checker.first_good(source.stored())

    def good(record):
      return checker.ok(source.name(record), source.read(record))

    records = records.filter(good)
  ds = records.repeat().take(num_images).enumerate()
  ds = ds.map(process).batch(num_images)
  if mask_batch is not None:
    ds = ds.map(mask_batch)
  batch = ds.get_single_element()
  return {k: v.numpy() for k, v in batch.items()}


def denormalize(images: np.ndarray, mean: Sequence[float],
                std: Sequence[float]) -> np.ndarray:
  """Inverts `normalize`: returns float32 images in [0, 1] (clipped).

  Args:
    images: (..., 3) normalised images.
    mean: per-channel mean in [0, 1] pixel units.
    std: per-channel std in [0, 1] pixel units.

  Returns:
    float32 array of the same shape, clipped to [0, 1].
  """
  images = np.asarray(images, np.float32)
  out = images * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(out, 0.0, 1.0)

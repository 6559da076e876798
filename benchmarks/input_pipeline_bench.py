r"""Input-pipeline throughput, printed as JSON (the last line).

Default: the config's training pipeline (images/s per host).

  python benchmarks/input_pipeline_bench.py [--config=configs/mae_tiny.py]
      [--batches=30] [--config.input.image_size=224 ...]

Compare `images_per_sec` with the train step's images/s in metrics.jsonl:
the pipeline must be faster for it not to be the bottleneck. The method's
extra views (e.g. the tokenizer's Lanczos view of CAE's token targets) are
made too, as in training.

--jpeg: the real training pipeline (`input_pipeline.make_train_dataset`,
the ViT-B/16 MAE recipe's input: 224 px, random 75% masks) on a folder of
real JPEGs (`input.data='folder:<dir>'`): read, partial decode of the crop
window, RandomResizedCrop (PIL's bicubic, the flip fused in), uint8 out
(the steps normalise on the device), mask.
The JPEGs (224-500 px a side, random sizes and aspect ratios, quality 90,
4:2:0 chroma as most photos) are cut from the scikit-image photos that
`embedded:skimage` ships, and written to --jpeg_dir (default: a temporary
folder, removed afterwards).

  python benchmarks/input_pipeline_bench.py --jpeg [--dct=accurate,fast]
      [--threads=1,2,4] [--batch=64] [--batches=20] [--jpeg_images=256]
      [--jpeg_dir=/tmp/jpegs] [--nobreakdown] [--compare_repeats=3]
      [--notorchvision] [--image_size=224] [--parquet]

Rates per core: tf.data runs on a private threadpool of N threads (every op
single-threaded), N from --threads; `images_per_sec` is the wall-clock
rate, `images_per_cpu_sec` the images per second of process CPU time (all
threads, the Python consumer included), a per-core figure that holds on a
busy machine too. --dct picks libjpeg's IDCT ('accurate': the pipeline's
INTEGER_ACCURATE, which matches PIL; 'fast': TF's default ''), by
overriding `augment.JPEG_DCT` while the pipeline is built. The breakdown
(one thread) times the per-example work cumulatively, stage by stage, with
the pipeline's own functions, and alternatives to it (ALTERNATIVES: the
full decode, TF's resize, float32 images normalised on the host as before
M13, input.jpeg_draft).

Side by side (keys 'mim_jax', 'torchvision', 'ratio'): the pipeline on one
thread and the official MAE transform (TORCHVISION: torchvision on PIL
images, torch.set_num_threads(1)) on the same files, alternating,
--compare_repeats times, the best of each; both also with uint8 images
out (ours: the pipeline as it is, normalised: the host normalisation of
before M13 added; torchvision: PILToTensor instead of ToTensor +
Normalize). 'ratio': ours / theirs in images per CPU-second,
'uint8_vs_official' ours uint8 against the official normalised transform.

--parquet (key 'parquet_vs_folder'): the same JPEGs also as parquet shards
of the Hugging Face layout (2 files, row groups of HF_ROW_GROUP rows), the
pipeline on 1 thread reading them (`input.data='parquet:<dir>'`) and
reading the folder, alternating, --compare_repeats times, the best of each;
'ratio': parquet / folder in images per CPU-second.

--smoke (the tests): 2 timed batches after 1 warm-up; with --jpeg, 16
images, batch 8, threads 1 and 2, both IDCTs (the breakdown of the first),
one comparison round.
"""

import copy
import glob
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', 'configs/mae_tiny.py', 'Config.')
flags.DEFINE_integer('batches', 30, 'Timed batches (after 3 warm-up ones); '
                     '--jpeg: 20 unless given.')
flags.DEFINE_bool('smoke', False, 'Tests: tiny sizes (module docstring).')
flags.DEFINE_bool('jpeg', False, 'The MAE ViT-B/16 pipeline on real JPEGs.')
flags.DEFINE_string('jpeg_dir', None, '--jpeg: a folder of its own (every '
                    'image in it is read) to write the JPEGs to, kept; '
                    'default: a temporary folder.')
flags.DEFINE_integer('jpeg_images', 256, '--jpeg: JPEGs to write.')
flags.DEFINE_integer('image_size', 224, '--jpeg: model input size.')
flags.DEFINE_integer('batch', 64, '--jpeg: host batch.')
flags.DEFINE_list('dct', ['accurate'], '--jpeg: IDCTs to measure, of '
                  'accurate (INTEGER_ACCURATE, the pipeline\'s) and fast '
                  '(TF\'s default).')
flags.DEFINE_list('threads', ['1', '2'], '--jpeg: tf.data threadpool sizes.')
flags.DEFINE_bool('breakdown', True, '--jpeg: per-stage costs on 1 thread.')
flags.DEFINE_bool('torchvision', True, '--jpeg: also the official MAE '
                  'transform (torchvision) on the same files, and ratios.')
flags.DEFINE_integer('compare_repeats', 3, '--jpeg: measurements of each side '
                     'against torchvision (alternating; the best counts).')
flags.DEFINE_bool('parquet', False, '--jpeg: also the same JPEGs as parquet '
                  'shards (input.data=parquet:..., Hugging Face layout) '
                  'against the folder, 1 thread, --compare_repeats each.')

# --dct names -> augment.JPEG_DCT values.
DCT = {'accurate': 'INTEGER_ACCURATE', 'fast': ''}
JPEG_QUALITY = 90
JPEG_SIDES = (224, 500)
# The P3 goal: images/s on one core at 224 px.
GOAL_PER_CORE = 150
# Rows per row group of the parquet shards: 🤗 datasets' default for image
# data sets.
HF_ROW_GROUP = 100
# The breakdown's cumulative stages (each adds its work to the previous
# one's), then the alternatives. 'flip' is PIL's resize with the flip fused
# into it, as the pipeline does.
STAGES = ('read', 'decode_crop', 'resize', 'flip', 'mask')
# Alternatives to the whole per-example work ('mask'), one change each:
#   full_decode  the whole JPEG decoded, then cropped (up to the crop only);
#   tf_resize    TF's antialiased bicubic (rounded) and a tf.cond flip, the
#                resize before M13 (0.15 grey levels per pixel off PIL's);
#   float_out    float32 images normalised on the host (the pipeline's
#                output before M13; now the steps normalise uint8 pixels);
#   jpeg_draft   input.jpeg_draft (crops >= 2x the image size decoded at
#                1/2, 1/4, 1/8 scale; not PIL's pixels).
ALTERNATIVES = {
    'full_decode': dict(stage='decode_crop', full_decode=True),
    'tf_resize': dict(tf_resize=True),
    'float_out': dict(float_out=True),
    'jpeg_draft': dict(jpeg_draft=True),
}
# The official MAE transform (main_pretrain.py), torchvision on PIL images.
TORCHVISION = ('PIL open + convert(RGB), RandomResizedCrop(224, scale=(0.2, '
               '1.0), BICUBIC), RandomHorizontalFlip, ToTensor, Normalize '
               '(ImageNet), default_collate; 1 thread')
WARMUP = 3


def _rate(ds, batches: int, warmup: int) -> dict:
  """Times `batches` batches of `ds` after `warmup` ones: wall-clock and
  process-CPU rates."""
  it = ds.as_numpy_iterator()
  for _ in range(warmup):
    b = next(it)
  n = 0
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    b = next(it)
    n += len(next(iter(b.values())))
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return dict(images_per_sec=round(n / wall, 1),
              images_per_cpu_sec=round(n / cpu, 1),
              cpu_cores_busy=round(cpu / wall, 2))


def config_mode(config, batches: int, warmup: int):
  """The default mode: the config's pipeline, views included."""
  from mim_jax import input_pipeline
  from mim_jax import methods
  from mim_jax.models import vit
  method = methods.get(config.model_name)
  p = vit.patch_size_of(config.model)
  # Extra views the method asks for (e.g. the tokenizer's), as in training.
  views = {k: v.size for k, v in method.views(config).items()}
  ds = input_pipeline.make_train_dataset(config.input, patch_size=p, seed=0,
                                         views=views)
  it = ds.as_numpy_iterator()
  for _ in range(warmup):
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  dt = time.perf_counter() - t
  bs = b['image'].shape[0]
  print(json.dumps(dict(
      benchmark='input_pipeline', data=config.input.data,
      image_size=config.input.image_size, views=views,
      host_batch=bs, batches=batches,
      images_per_sec=round(batches * bs / dt, 1),
      sec_per_batch=round(dt / batches, 4), cpu_cores=os.cpu_count())))


def write_jpegs(folder: str, num: int, seed: int = 0) -> dict:
  """Writes `num` JPEGs (img_*.jpg) cut from the embedded scikit-image
  photos, replacing those of an earlier call.

  Each is a random window of a random photo with a random aspect ratio,
  resized (bicubic) to a width and a height drawn uniformly in JPEG_SIDES,
  saved at JPEG_QUALITY with PIL's default 4:2:0 chroma subsampling.

  Returns:
    Statistics of the files (count, side range, mean size and bytes).
  """
  import io
  import numpy as np
  from PIL import Image
  from mim_jax.data import embedded
  photos = [np.asarray(Image.open(io.BytesIO(b)).convert('RGB'))
            for _, b in embedded.load('skimage')]
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  # A --jpeg_dir written before with more images: the pipeline reads every
  # image of the folder, so the stale ones go.
  for stale in glob.glob(os.path.join(folder, 'img_*.jpg')):
    os.remove(stale)
  widths, heights, sizes = [], [], []
  for i in range(num):
    photo = photos[rng.integers(len(photos))]
    w, h = (int(x) for x in rng.integers(JPEG_SIDES[0], JPEG_SIDES[1] + 1,
                                         size=2))
    ph, pw = photo.shape[:2]
    # The largest window of the photo with the target's aspect ratio.
    scale = min(pw / w, ph / h)
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    top, left = rng.integers(ph - ch + 1), rng.integers(pw - cw + 1)
    window = Image.fromarray(photo[top:top + ch, left:left + cw])
    image = window.resize((w, h), resample=Image.Resampling.BICUBIC)
    path = os.path.join(folder, f'img_{i:05d}.jpg')
    image.save(path, format='JPEG', quality=JPEG_QUALITY)
    widths.append(w)
    heights.append(h)
    sizes.append(os.path.getsize(path))
  return dict(images=num, sides=list(JPEG_SIDES), quality=JPEG_QUALITY,
              mean_width=round(float(np.mean(widths)), 1),
              mean_height=round(float(np.mean(heights)), 1),
              mean_kbytes=round(float(np.mean(sizes)) / 1024, 1))


def jpeg_input_config(folder: str, image_size: int, batch: int):
  """The MAE ViT-B/16 recipe's input on `folder`: (input config, patch)."""
  from mim_jax.methods.mae import config as mae_recipe
  from mim_jax.models import vit
  c = mae_recipe.get_config('B/16')
  c.input.data = f'folder:{folder}'
  c.input.image_size = image_size
  c.input.batch_size = batch
  return c.input, vit.patch_size_of(c.model)


def thread_options(threads: int):
  """tf.data on a private pool of `threads` threads, ops single-threaded."""
  import tensorflow as tf
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  options.autotune.cpu_budget = threads
  return options


def pipeline(input_config, patch_size: int, threads: int):
  """The training pipeline itself, on `threads` threads."""
  from mim_jax import input_pipeline
  ds = input_pipeline.make_train_dataset(
      input_config, patch_size=patch_size, seed=0, process_index=0,
      process_count=1)
  return ds.with_options(thread_options(threads))


def stage_pipeline(input_config, patch_size: int, stage: str = 'mask', *,
                   full_decode: bool = False, tf_resize: bool = False,
                   float_out: bool = False, jpeg_draft: bool = False):
  """The training pipeline's per-example work up to `stage` (of STAGES),
  batched as the pipeline does, on 1 thread; the other arguments are the
  ALTERNATIVES.

  Mirrors `input_pipeline.make_train_dataset`'s `process` (same functions,
  same keys); the stages that leave no image to batch emit its shape.
  """
  import tensorflow as tf
  from mim_jax import input_pipeline
  from mim_jax.data import augment
  from mim_jax.data import masks
  from mim_jax.data import seeds
  from mim_jax.data import sources
  image_size, mask_fn, batch = input_pipeline.validate_config(
      input_config, patch_size=patch_size, process_count=1)
  mask_example, _ = masks.stages(mask_fn)  # 'random': no per-batch stage
  scale = tuple(input_config.crop_scale)
  ratio = tuple(input_config.crop_ratio)
  mean, std = tuple(input_config.mean), tuple(input_config.std)
  source = sources.open_source(input_config, seed=0, process_index=0,
                               process_count=1)
  train_key = seeds.base_key(0, seeds.TRAIN)
  upto = STAGES.index(stage)

  def resize(crop, key):
    flip = (augment.flip_decision(key) if upto >= STAGES.index('flip')
            else None)
    if not tf_resize:
      return augment.resize_bicubic_uint8(crop, image_size, flip)
    image = augment.resize(crop, image_size)
    if flip is not None:
      image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]),
                      lambda: image)
    return image

  def process(position, record):
    key = seeds.fold_in(train_key, position // batch, position % batch)
    crop_key, flip_key, mask_key = tf.unstack(
        tf.random.experimental.stateless_split(key, 3))
    data = source.read(record)
    if stage == 'read':
      return {'bytes': tf.strings.length(data)}
    if full_decode:
      image = augment._decode(data)  # pylint: disable=protected-access
      shape = tf.shape(image)
      top, left, h, w = tf.unstack(augment.sample_crop_window(
          crop_key, shape[0], shape[1], scale, ratio))
      crop = image[top:top + h, left:left + w]
    else:
      crop = augment.decode_and_random_crop(
          data, crop_key, scale, ratio, image_size if jpeg_draft else None)
    if stage == 'decode_crop':
      return {'shape': tf.shape(crop)}
    image = resize(crop, flip_key)
    if float_out:
      image = augment.normalize(image, mean, std)
    example = {'image': image}
    if upto >= STAGES.index('mask'):
      example.update(mask_example(mask_key))
    return example

  ds = tf.data.Dataset.counter().flat_map(source.epoch).enumerate()
  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(batch, drop_remainder=True).prefetch(2)
  return ds.with_options(thread_options(1))


def host_normalized(ds, mean, std):
  """`ds` with its uint8 images normalised to float32 on the host, as the
  pipeline did before M13 (now the steps normalise on the device)."""
  from mim_jax.data import augment
  return ds.map(lambda b: dict(b, image=augment.normalize(b['image'], mean,
                                                          std)))


def torchvision_transforms(image_size: int, mean, std) -> dict:
  """The official MAE transform ('normalized') and the same with uint8
  tensors out instead of ToTensor + Normalize ('uint8')."""
  import warnings
  with warnings.catch_warnings():  # torchvision.io's image.so, unused
    warnings.simplefilter('ignore')
    from torchvision import transforms as T
  crop = [T.RandomResizedCrop(image_size, scale=(0.2, 1.0),
                              interpolation=T.InterpolationMode.BICUBIC),
          T.RandomHorizontalFlip()]
  return {
      'normalized': T.Compose(crop + [T.ToTensor(),
                                      T.Normalize(list(mean), list(std))]),
      'uint8': T.Compose(crop + [T.PILToTensor()]),
  }


def torchvision_rate(transform, files: list, batch: int, batches: int,
                     warmup: int) -> dict:
  """`_rate` of `transform` on `files` (cycled), as torchvision's
  ImageFolder + DataLoader do it on one worker with one thread: PIL
  open + convert('RGB'), the transform, default_collate."""
  import torch
  from PIL import Image
  from torch.utils.data import default_collate
  torch.set_num_threads(1)
  torch.manual_seed(0)
  position = 0

  def next_batch():
    nonlocal position
    images = []
    for _ in range(batch):
      with open(files[position % len(files)], 'rb') as fp:
        images.append(transform(Image.open(fp).convert('RGB')))
      position += 1
    return default_collate(images)

  for _ in range(warmup):
    next_batch()
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next_batch()
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  n = batches * batch
  return dict(images_per_sec=round(n / wall, 1),
              images_per_cpu_sec=round(n / cpu, 1),
              cpu_cores_busy=round(cpu / wall, 2))


def _best(runs: list) -> dict:
  """The run with the most images per CPU-second, with every run's rate."""
  best = dict(max(runs, key=lambda r: r['images_per_cpu_sec']))
  best['runs_images_per_cpu_sec'] = [r['images_per_cpu_sec'] for r in runs]
  return best


def versus_torchvision(folder: str, input_config, patch: int, batches: int,
                       warmup: int, repeats: int) -> dict:
  """Ours (the training pipeline, 1 thread, normalised and uint8) against
  the official transform (TORCHVISION, normalised and uint8) on the same
  JPEGs, each measured `repeats` times, alternating; the best of each."""
  files = sorted(glob.glob(os.path.join(folder, 'img_*.jpg')))
  transforms = torchvision_transforms(input_config.image_size,
                                      input_config.mean, input_config.std)
  runs = {('mim_jax', k): [] for k in transforms}
  runs.update({('torchvision', k): [] for k in transforms})
  batch = input_config.batch_size
  for _ in range(repeats):
    ours = pipeline(input_config, patch, 1)
    runs['mim_jax', 'normalized'].append(_rate(
        host_normalized(ours, tuple(input_config.mean),
                        tuple(input_config.std)), batches, warmup))
    ours = pipeline(input_config, patch, 1)
    runs['mim_jax', 'uint8'].append(_rate(ours, batches, warmup))
    for name, transform in transforms.items():
      runs['torchvision', name].append(torchvision_rate(
          transform, files, batch, batches, warmup))
  out = {side: {k: _best(runs[side, k]) for k in transforms}
         for side in ('mim_jax', 'torchvision')}

  def ratio(ours, theirs):
    return round(out['mim_jax'][ours]['images_per_cpu_sec'] /
                 out['torchvision'][theirs]['images_per_cpu_sec'], 2)

  out['ratio'] = dict(normalized=ratio('normalized', 'normalized'),
                      uint8=ratio('uint8', 'uint8'),
                      uint8_vs_official=ratio('uint8', 'normalized'))
  return out


def write_parquet(folder: str, shards: int = 2,
                  row_group: int = HF_ROW_GROUP) -> str:
  """The JPEGs of `folder` (img_*.jpg, in order) as parquet shards of the
  Hugging Face layout in folder/parquet/data; returns folder/parquet."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  files = sorted(glob.glob(os.path.join(folder, 'img_*.jpg')))
  root = os.path.join(folder, 'parquet')
  os.makedirs(os.path.join(root, 'data'), exist_ok=True)
  for i in range(shards):
    part = files[i * len(files) // shards:(i + 1) * len(files) // shards]
    images = []
    for path in part:
      with open(path, 'rb') as fh:
        images.append({'bytes': fh.read(), 'path': os.path.basename(path)})
    pq.write_table(pa.table({'image': images}),
                   os.path.join(root, 'data', f'train-{i:05d}-of-'
                                f'{shards:05d}.parquet'),
                   row_group_size=row_group)
  return root


def versus_parquet(folder: str, input_config, patch: int, batches: int,
                   warmup: int, repeats: int) -> dict:
  """The training pipeline on 1 thread reading the JPEGs from the folder
  and from parquet shards of the same bytes (`write_parquet`), alternating,
  `repeats` times each; the best of each and parquet / folder."""
  shards = 'parquet:' + write_parquet(folder)
  runs = {'folder': [], 'parquet': []}
  for _ in range(repeats):
    for name in runs:
      config = copy.deepcopy(input_config)
      if name == 'parquet':
        config.data = shards
      runs[name].append(_rate(pipeline(config, patch, 1), batches, warmup))
  out = {name: _best(r) for name, r in runs.items()}
  out['ratio'] = round(out['parquet']['images_per_cpu_sec'] /
                       out['folder']['images_per_cpu_sec'], 2)
  out['row_group_rows'] = HF_ROW_GROUP
  return out


def jpeg_mode(f, batches: int, warmup: int) -> dict:
  """--jpeg: writes the JPEGs, measures; returns the JSON result."""
  from mim_jax.data import augment
  bad = [d for d in f.dct if d not in DCT]
  if bad:
    raise ValueError(f'--dct={",".join(f.dct)}: unknown {bad}; use '
                     f'{" and/or ".join(DCT)}.')
  threads = [int(t) for t in f.threads]
  if any(t < 1 for t in threads):
    raise ValueError(f'--threads={",".join(f.threads)} must be >= 1.')
  folder = f.jpeg_dir or tempfile.mkdtemp(prefix='mim_jax_jpegs_')
  try:
    files = write_jpegs(folder, f.jpeg_images)
    input_config, patch = jpeg_input_config(folder, f.image_size, f.batch)
    results = {}
    default_dct = augment.JPEG_DCT
    for dct in f.dct:
      augment.JPEG_DCT = DCT[dct]  # read when the pipeline is traced
      try:
        res = {'threads': {}}
        for t in threads:
          r = _rate(pipeline(input_config, patch, t), batches, warmup)
          r['images_per_sec_per_thread'] = round(r['images_per_sec'] / t, 1)
          res['threads'][str(t)] = r
        # --smoke: the breakdown of the first IDCT only (the same code).
        if f.breakdown and not (f.smoke and dct != f.dct[0]):
          variants = {s: dict(stage=s) for s in STAGES}
          variants.update(ALTERNATIVES)
          res['breakdown_1_thread'] = {
              name: _rate(stage_pipeline(input_config, patch, **kw),
                          batches, warmup)
              for name, kw in variants.items()}
        results[dct] = res
      finally:
        augment.JPEG_DCT = default_dct
    versus = versus_torchvision(folder, input_config, patch, batches, warmup,
                                f.compare_repeats) if f.torchvision else {}
    if f.parquet:
      versus['parquet_vs_folder'] = versus_parquet(
          folder, input_config, patch, batches, warmup, f.compare_repeats)
  finally:
    if not f.jpeg_dir:
      shutil.rmtree(folder, ignore_errors=True)
  return dict(
      benchmark='input_pipeline_jpeg',
      pipeline='input_pipeline.make_train_dataset (MAE B/16 input: '
      'decode_and_crop_jpeg, RandomResizedCrop bicubic, flip, normalise, '
      'random 0.75 masks)',
      jpegs=files, jpeg_dir=f.jpeg_dir, image_size=f.image_size,
      patch_size=patch, host_batch=f.batch, batches=batches,
      goal_images_per_sec_per_core=GOAL_PER_CORE, cpu_cores=os.cpu_count(),
      results=results, torchvision_transform=TORCHVISION, **versus)


def print_table(out: dict):
  """The --jpeg results as markdown tables (before the JSON line)."""
  print(f'\n{out["jpegs"]["images"]} JPEGs, {out["image_size"]} px, host '
        f'batch {out["host_batch"]}, {out["batches"]} timed batches '
        f'(goal: {GOAL_PER_CORE} images/s per core)\n')
  print('| IDCT | threads | images/s | images/s per thread | '
        'images per CPU-second | cores busy |')
  print('|---|---|---|---|---|---|')
  for dct, res in out['results'].items():
    for t, r in res['threads'].items():
      print(f'| {dct} | {t} | {r["images_per_sec"]} | '
            f'{r["images_per_sec_per_thread"]} | {r["images_per_cpu_sec"]} '
            f'| {r["cpu_cores_busy"]} |')
  if 'ratio' in out:
    print_versus(out)
  if not any('breakdown_1_thread' in r for r in out['results'].values()):
    return
  print('\n| IDCT | per-example work (1 thread) | CPU ms per image | '
        'stage adds | images per CPU-second |')
  print('|---|---|---|---|---|')
  for dct, res in out['results'].items():
    previous = None
    for name, r in res.get('breakdown_1_thread', {}).items():
      ms = 1000 / r['images_per_cpu_sec']
      added = ''
      if name in STAGES:
        if previous is not None:
          added = f'{ms - previous:+.2f}'
        previous = ms
      else:
        name = f'alternative: {name}'
      print(f'| {dct} | {name} | {ms:.2f} | {added} | '
            f'{r["images_per_cpu_sec"]} |')
  print()


def print_versus(out: dict):
  """The comparison with torchvision as a markdown table."""
  print('\n| 1 thread, images per CPU-second (best; all runs) | normalised '
        'float32 | uint8 |')
  print('|---|---|---|')
  for side in ('mim_jax', 'torchvision'):
    cells = [f'{r["images_per_cpu_sec"]} ({r["runs_images_per_cpu_sec"]})'
             for r in (out[side]['normalized'], out[side]['uint8'])]
    print(f'| {side} | {cells[0]} | {cells[1]} |')
  r = out['ratio']
  print(f'| ratio | {r["normalized"]} | {r["uint8"]} (uint8 vs official '
        f'normalised: {r["uint8_vs_official"]}) |')


def main(_):
  f = flags.FLAGS
  batches = f.batches
  warmup = WARMUP
  if f.jpeg and not f['batches'].present:
    batches = 20
  if f.smoke:
    batches, warmup = 2, 1
    f.jpeg_images, f.batch, f.threads = 16, 8, ['1', '2']
    f.dct = list(DCT)
    f.compare_repeats = 1
  if not f.jpeg:
    config_mode(f.config, batches, warmup)
    return
  out = jpeg_mode(f, batches, warmup)
  print_table(out)
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)

r"""Block-mask generation speed on one core (JSON).

Compares the plain port of the upstream loop (`block_mask_reference`, numpy
2-D array) with our generator (`block_masks`: the grid in one int), for the
CAE, BEiT and BootMAE settings on a 14x14 grid. It also measures them inside
tf.data on one thread: the per-batch stage alone, and a minimal pipeline
(keys per example, batch, masks) next to the same pipeline with MAE's random
masks, whose cost is tf.data's per-example overhead.

  python benchmarks/mask_bench.py [--num=20000] [--batch=256] [--smoke]
"""

import json
import os
import platform
import random
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np

flags.DEFINE_integer('num', 20000, 'Masks per measurement (generator).')
flags.DEFINE_integer('batch', 256, 'Batch size for the tf.data measurement.')
flags.DEFINE_bool('smoke', False, 'Tiny run for the tests: --num=256 '
                  '--batch=32 (the rates mean little).')

SETTINGS = {
    'cae': dict(num_masking_patches=98, min_num_patches=16,
                max_num_patches=None, variant='cae'),
    'beit': dict(num_masking_patches=75, min_num_patches=16,
                 max_num_patches=None, variant='beit'),
    'bootmae': dict(num_masking_patches=120, min_num_patches=16,
                    max_num_patches=60, variant='bootmae'),
}


def _rate(fn, n: int) -> float:
  t = time.perf_counter()
  fn()
  return n / (time.perf_counter() - t)


def _tf_data_rates(params: dict, n: int, batch: int) -> dict:
  """Masks/s inside tf.data on one thread: the per-batch stage alone (the
  numpy generator behind tf.numpy_function), and a minimal pipeline
  (per-example keys, batch, masks) for block and for MAE's random masks."""
  import tensorflow as tf
  from mim_jax.data import masks
  from mim_jax.data import seeds
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1

  def rate(ds):
    ds = ds.with_options(options)
    next(iter(ds))  # build and warm up

    def run():
      for _ in ds.as_numpy_iterator():
        pass

    return round(_rate(run, n))

  key = seeds.base_key(0, seeds.TRAIN)
  keys = tf.data.Dataset.range(n).map(lambda i: seeds.fold_in(key, 0, i))
  per_example, per_batch = masks.stages(
      masks.make_mask_fn(dict(kind='block', **params), 14))
  random_fn = masks.make_mask_fn(dict(kind='random', ratio=0.75), 14)
  # The per-batch stage's input, made once by the per-example stage (its
  # private features are the library's business, not ours) and held in
  # memory, so that only the per-batch stage is timed.
  features = keys.map(per_example).batch(n).get_single_element()
  batched_features = tf.data.Dataset.from_tensor_slices(features).batch(
      batch)
  return {
      'tf_data_per_batch_stage': rate(batched_features.map(per_batch)),
      'tf_data_pipeline_block': rate(
          keys.map(per_example).batch(batch).map(per_batch)),
      'tf_data_pipeline_random_for_comparison': rate(
          keys.map(random_fn).batch(batch)),
  }


def main(_):
  from mim_jax.data import block_masks as bm
  f = flags.FLAGS
  if f.smoke:
    f.num, f.batch = 256, 32
  out = {'benchmark': 'block_masks', 'grid': '14x14',
         'machine': f'{platform.machine()}, {os.cpu_count()} cpus',
         'unit': 'masks per second, one thread', 'results': {}}
  for name, params in SETTINGS.items():
    n_ref = max(f.num // 10, 50 if f.smoke else 500)
    ref = _rate(lambda p=params, k=n_ref: [
        bm.block_mask_reference(random.Random(i), 14, 14, **p)
        for i in range(k)], n_ref)
    fast = _rate(lambda p=params: bm.block_masks(np.arange(f.num), 14, 14,
                                                  **p), f.num)
    out['results'][name] = {
        'plain_python_port': round(ref),
        'block_masks': round(fast),
        'speedup': round(fast / ref, 2),
    }
    out['results'][name].update(_tf_data_rates(params, f.num, f.batch))
  # One line: the last line of the output is the whole result.
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)

r"""Input-pipeline throughput (images/s per host), printed as JSON.

  python benchmarks/input_pipeline_bench.py [--config=configs/mae_tiny.py]
      [--batches=30] [--config.input.image_size=224 ...]

Compare `images_per_sec` with the train step's images/s in metrics.jsonl:
the pipeline must be faster for it not to be the bottleneck. The method's
extra views (e.g. the tokenizer's Lanczos view of CAE's token targets) are
made too, as in training.
"""

import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', 'configs/mae_tiny.py', 'Config.')
flags.DEFINE_integer('batches', 30, 'Timed batches (after 3 warm-up ones).')


def main(_):
  from mim_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from mim_jax import methods  # pylint: disable=g-import-not-at-top
  from mim_jax.models import vit  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  method = methods.get(config.model_name)
  p = vit.patch_size_of(config.model)
  # Extra views the method asks for (e.g. the tokenizer's), as in training.
  views = {k: v.size for k, v in method.views(config).items()}
  ds = input_pipeline.make_train_dataset(config.input, patch_size=p, seed=0,
                                         views=views)
  it = ds.as_numpy_iterator()
  for _ in range(3):
    next(it)
  n = flags.FLAGS.batches
  t = time.perf_counter()
  for _ in range(n):
    b = next(it)
  dt = time.perf_counter() - t
  bs = b['image'].shape[0]
  print(json.dumps(dict(
      benchmark='input_pipeline', data=config.input.data,
      image_size=config.input.image_size, views=views,
      host_batch=bs, batches=n,
      images_per_sec=round(n * bs / dt, 1), sec_per_batch=round(dt / n, 4),
      cpu_cores=os.cpu_count())))


if __name__ == '__main__':
  app.run(main)

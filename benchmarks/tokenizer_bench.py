r"""Cost of CAE's token targets: the DALL-E dVAE encoder on the tokenizer
view (uint8, as the pipeline makes it), jitted on the devices as in the
train step (params replicated, views sharded over the batch), printed as
JSON (XLA FLOPs per image, and CPU/accelerator time).

  python benchmarks/tokenizer_bench.py [--config=configs/cae_vitb.py]
      [--batch=8] [--iters=3]
  python benchmarks/tokenizer_bench.py --smoke   # tests: a tiny dVAE

Random weights of the official architecture (the real file is not needed to
time it). Compare `gflops_per_image` with the planner's
`model_flops_per_image` for the train step.
"""

import functools
import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', 'configs/cae_vitb.py', 'Config.')
flags.DEFINE_integer('batch', 8, 'Images per call.')
flags.DEFINE_integer('iters', 3, 'Timed calls (after one warm-up call).')
flags.DEFINE_bool('smoke', False, 'Tests: a dVAE of width 16 and 64 tokens '
                  'on a 32 px view (image 64 px), one image per device, 1 '
                  'timed call.')


def main(_):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mim_jax import sharding  # pylint: disable=g-import-not-at-top
  from mim_jax.models import vit  # pylint: disable=g-import-not-at-top
  from mim_jax.targets import tokenizer  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  if flags.FLAGS.smoke:
    config.tokenizer.hidden, config.tokenizer.vocab_size = 16, 64
    config.input.image_size = 4 * vit.patch_size_of(config.model)
    flags.FLAGS.batch, flags.FLAGS.iters = jax.device_count(), 1
  size = tokenizer.view(config, vit.patch_size_of(config.model)).size
  module = tokenizer.encoder_of(config)
  # As in the train step: params replicated, the views sharded over the
  # batch (the batch must be a multiple of the device count).
  mesh = sharding.make_mesh([('data', -1)])
  repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  x = jax.device_put(
      jnp.full((flags.FLAGS.batch, size, size, 3), 128, jnp.uint8), data)
  params = jax.jit(module.init, out_shardings=repl)(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))['params']
  fn = jax.jit(functools.partial(tokenizer.tokenize, module),
               in_shardings=(repl, data), out_shardings=data)
  t = time.perf_counter()
  lowered = fn.lower(params, x)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  # FLOPs of the whole batch (before partitioning over the devices).
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  compiled(params, x).block_until_ready()
  t = time.perf_counter()
  for _ in range(flags.FLAGS.iters):
    compiled(params, x).block_until_ready()
  dt = (time.perf_counter() - t) / flags.FLAGS.iters
  n = sum(v.size for v in jax.tree.leaves(params))
  print(json.dumps(dict(
      benchmark='tokenizer', view_size=size, batch=flags.FLAGS.batch,
      params_millions=round(n / 1e6, 2),
      gflops_per_image=round(cost['flops'] / flags.FLAGS.batch / 1e9, 2),
      sec_per_image=round(dt / flags.FLAGS.batch, 4),
      compile_s=round(compile_s, 2), device=str(jax.devices()[0].platform),
      devices=jax.device_count(),
      cpu_cores=os.cpu_count())))


if __name__ == '__main__':
  app.run(main)

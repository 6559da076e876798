r"""Cost of CAE's token targets: the DALL-E dVAE encoder on the tokenizer
view, printed as JSON (XLA FLOPs per image, and CPU/accelerator time).

  python benchmarks/tokenizer_bench.py [--config=configs/cae_vitb.py]
      [--batch=8] [--iters=3]

Random weights of the official architecture (the real file is not needed to
time it). Compare `gflops_per_image` with the planner's
`model_flops_per_image` for the train step.
"""

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


def main(_):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mim_jax import tokenizer  # pylint: disable=g-import-not-at-top
  from mim_jax import weights  # pylint: disable=g-import-not-at-top
  from mim_jax.models import dvae  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  size = tokenizer.view_size(config, weights.patch_size_of(config))
  module = tokenizer.encoder_of(config)
  x = jnp.full((flags.FLAGS.batch, size, size, 3), 0.5, jnp.float32)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), x[:1])['params']
  fn = jax.jit(lambda p, x: dvae.token_ids(module, p, x))
  t = time.perf_counter()
  compiled = fn.lower(params, x).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
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
      cpu_cores=os.cpu_count())))


if __name__ == '__main__':
  app.run(main)

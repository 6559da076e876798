r"""Compile time of the sharded train step per model size (JSON).

With `scan=True` the blocks compile once, so ViT-L (24 blocks) should
compile in about the time of ViT-B (12 blocks); unrolled, it grows with
depth.

  python benchmarks/compile_bench.py [--variants=B/16,L/16] [--devices=8] \
      [--scan=true] [--batch_per_device=8]
  python benchmarks/compile_bench.py --smoke   # tests: the tiny model once
"""

import os
import sys

if 'jax' not in sys.modules:
  _n = next((a.split('=', 1)[1] for a in sys.argv
             if a.startswith('--devices=')), '8')
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={_n}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import platform
import time

from absl import app
from absl import flags

flags.DEFINE_list('variants', ['B/16', 'L/16'], 'ViT variants to compile.')
flags.DEFINE_integer('devices', 8, 'Fake CPU devices (FSDP mesh).')
flags.DEFINE_bool('scan', True, 'nn.scan over blocks.')
flags.DEFINE_integer('batch_per_device', 8, 'Examples per device.')
flags.DEFINE_integer('repeats', 2, 'Compiles per variant (best is kept).')
flags.DEFINE_bool('smoke', False, 'Tests: --variants=tiny --repeats=1 '
                  '--batch_per_device=1.')


def compile_seconds(variant: str, devices: int, scan: bool,
                    batch_per_device: int) -> dict:
  """Lowers and compiles the MAE train step for one variant."""
  import jax
  from mim_jax import sharding
  from mim_jax import train
  from mim_jax.methods.mae import config as mae_config
  config = mae_config.get_config(variant)
  config.model.scan = scan
  config.input.batch_size = batch_per_device * devices
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  t = time.perf_counter()
  lowered, _, _ = train.lower_train_step(config, mesh)
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  lowered.compile()
  return {'lower_s': lower_s, 'compile_s': time.perf_counter() - t}


def main(_):
  f = flags.FLAGS
  if f.smoke:
    f.variants, f.repeats, f.batch_per_device = ['tiny'], 1, 1
  results = {}
  for v in f.variants:
    runs = [compile_seconds(v, f.devices, f.scan, f.batch_per_device)
            for _ in range(f.repeats)]
    results[v] = {k: round(min(r[k] for r in runs), 2) for k in runs[0]}
  first = f.variants[0]
  out = {
      'benchmark': 'train_step_compile', 'devices': f.devices,
      'scan': f.scan, 'batch_per_device': f.batch_per_device,
      'machine': f'{platform.machine()}, {os.cpu_count()} cpus',
      'results': results,
      'compile_ratio_vs_' + first.replace('/', '_'): {
          v: round(results[v]['compile_s'] / results[first]['compile_s'], 3)
          for v in f.variants},
  }
  # One line: the last line of the output is the whole result.
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)

r"""Compile time of the sharded train step per model size (JSON).

With `scan=True` the blocks compile once, so ViT-L (24 blocks) should
compile in about the time of ViT-B (12 blocks); unrolled, it grows with
depth.

  python benchmarks/compile_bench.py [--variants=B/16,L/16] [--devices=8] \
      [--scan=true] [--batch_per_device=8]
  python benchmarks/compile_bench.py \
      --configs=configs/cae_vitl.py,configs/bootmae_vitl.py
  python benchmarks/compile_bench.py --smoke   # tests: the tiny model once

`--variants` are MAE recipes; `--configs` are any experiment config files
(their own scan and remat unless --scan is given), each compared with its
ViT-B config (`_vitl` / `_vith` -> `_vitb`, compiled too when not listed).
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
flags.DEFINE_list('configs', [], 'Config files to compile instead of the '
                  'MAE --variants (each with its ViT-B config).')
flags.DEFINE_bool('scan', None, 'nn.scan over blocks (default: True for '
                  '--variants, the config\'s own for --configs).')
flags.DEFINE_integer('batch_per_device', 8, 'Examples per device.')
flags.DEFINE_integer('repeats', 2, 'Compiles per variant (best is kept).')
flags.DEFINE_bool('smoke', False, 'Tests: --variants=tiny --repeats=1 '
                  '--batch_per_device=1.')


def compile_seconds(config, devices: int, scan, batch_per_device: int
                    ) -> dict:
  """Lowers and compiles the train step of `config` on `devices`."""
  import jax
  from mim_jax import sharding
  from mim_jax import train
  if scan is not None:
    config.model.scan = scan
  config.input.batch_size = batch_per_device * devices
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  t = time.perf_counter()
  lowered, _, _ = train.lower_train_step(config, mesh)
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  lowered.compile()
  return {'lower_s': lower_s, 'compile_s': time.perf_counter() - t}


def base_config_path(path: str) -> str:
  """The ViT-B config matching `path` (configs/cae_vitl.py ->
  configs/cae_vitb.py); `path` itself when it names no ViT-L/H."""
  head, tail = os.path.split(path)
  for size in ('_vitl', '_vith'):
    if size in tail:
      return os.path.join(head, tail.replace(size, '_vitb'))
  return path


def _loaders(f) -> dict:
  """name -> a function building a fresh config: the MAE variants, or the
  config files (each with its ViT-B config, first)."""
  if not f.configs:
    from mim_jax.methods.mae import config as mae_config
    return {v: (lambda v=v: mae_config.get_config(v)) for v in f.variants}
  from mim_jax import config_lib
  names = []
  for path in f.configs:
    for p in (base_config_path(path), path):
      if p not in names:
        names.append(p)
  return {p: (lambda p=p: config_lib.load_config_file(p)) for p in names}


def main(_):
  f = flags.FLAGS
  if f.smoke:
    f.variants, f.repeats, f.batch_per_device = ['tiny'], 1, 1
  scan = f.scan if (f.scan is not None or f.configs) else True
  results = {}
  for name, load in _loaders(f).items():
    runs = [compile_seconds(load(), f.devices, scan, f.batch_per_device)
            for _ in range(f.repeats)]
    results[name] = {k: round(min(r[k] for r in runs), 2) for k in runs[0]}
  out = {
      'benchmark': 'train_step_compile', 'devices': f.devices,
      'scan': 'config' if scan is None else scan,
      'batch_per_device': f.batch_per_device, 'repeats': f.repeats,
      'machine': f'{platform.machine()}, {os.cpu_count()} cpus',
      'results': results,
  }
  ratio = lambda a, b: round(results[a]['compile_s'] /
                             results[b]['compile_s'], 3)
  if f.configs:
    out['compile_ratio_vs_vitb'] = {
        p: ratio(p, base_config_path(p)) for p in f.configs}
  else:
    first = f.variants[0]
    out['compile_ratio_vs_' + first.replace('/', '_')] = {
        v: ratio(v, first) for v in f.variants}
  # One line: the last line of the output is the whole result.
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)

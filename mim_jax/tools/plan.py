r"""Topology planner: will a run fit, and how fast can it be, before a pod?

  python -m mim_jax.tools.plan --config=configs/mae_vitl.py --devices=64 \
      [--config.mesh="(('data', 1), ('fsdp', -1))"] [--peak_tflops=275]

It compiles the real train step ahead of time (jit -> lower -> compile) for
N fake CPU devices with the config's mesh and sharding rules, runs nothing,
and prints JSON:

  - bytes per device of params, optimizer state, EMA and the other target
    providers' state and frozen weights (from the shardings), and XLA's
    memory analysis of the compiled step (arguments, outputs, temporaries =
    activations and workspace);
  - FLOPs per step and per image, from XLA's cost analysis of the step
    lowered with the layers unrolled (a compiled `scan` counts its body
    once, so the count is taken before compilation); target networks run
    inside the step, so their FLOPs are in it;
  - the gradient-accumulation factor that would fit the chip's memory
    (temporaries scale with the microbatch), an estimate;
  - the step time and images/s at a few MFUs for a chip peak, by
    step_time = flops_per_step / (devices * peak_flops * mfu).

The memory figures come from the CPU compiler: TPU fusion and layouts
differ, so treat temporaries as an estimate (params and optimizer state are
exact). A config that cannot run on N devices (its mesh, batch size, any
check of the trainer) prints one line, `error: ...`, with exit status 2.
"""

import os
import sys


def _devices_from_argv(argv) -> int | None:
  for i, a in enumerate(argv):
    if a.startswith('--devices='):
      return int(a.split('=', 1)[1])
    if a == '--devices' and i + 1 < len(argv):
      return int(argv[i + 1])
  return None


if __name__ == '__main__' and 'jax' not in sys.modules:
  # Fake CPU devices must be requested before jax is imported.
  _n = _devices_from_argv(sys.argv)
  if _n:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={_n}')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from mim_jax import errors
from mim_jax import experiment
from mim_jax import images
from mim_jax import optim
from mim_jax import sharding
from mim_jax import state as state_lib
from mim_jax import train

GIB = 2 ** 30


def _state_bytes(tree, shardings=None) -> int:
  """Per-device bytes of a state field (whole arrays without shardings)."""
  return 0 if tree is None else sharding.per_device_bytes(tree, shardings)


def accum_to_fit(xla: dict, microbatch: int, hbm_bytes: float):
  """Smallest extra accumulation factor K (dividing the per-device
  microbatch) whose temporaries, assumed to shrink as 1/K, fit next to the
  state; None when even one example per device does not fit."""
  state = xla['arguments'] + xla['outputs'] - xla['aliased']
  free = hbm_bytes - state
  for k in range(1, microbatch + 1):
    if microbatch % k == 0 and xla['temporaries'] / k <= free:
      return k
  return None


def forward_flops_per_image(config) -> float:
  """XLA's FLOP count of one inference forward (`train=False`) of one
  image: the model-card FLOPs of a classifier (a pretraining model's
  forward includes its masking and decoder)."""
  model = experiment.build_model(config)
  batch = images.model_shapes(experiment.batch_spec(config, 1))
  variables = jax.eval_shape(
      lambda: nn.meta.unbox(state_lib.init_variables(model, batch, 0)))
  fwd = jax.jit(lambda v, b: model.apply(v, b, train=False))
  return float(fwd.lower(variables, batch).cost_analysis()['flops'])


def _state_sizes(config, mesh, state, state_sh) -> tuple[dict, dict]:
  """(bytes per device, bytes on one device) of each part of the state
  (params, optimizer state, EMA, target state, frozen target weights),
  with the sums 'params_opt_ema' and 'total'."""
  frozen = experiment.frozen_targets(config, mesh, abstract=True)
  frozen_sh = jax.tree.map(lambda a: a.sharding, frozen)
  fields = {'params': (state.params, state_sh.params),
            'opt_state': (state.opt_state, state_sh.opt_state),
            'ema': (state.ema_params, state_sh.ema_params),
            'target_state': (state.target_state, state_sh.target_state),
            'frozen_targets': (frozen or None, frozen_sh or None)}
  out = []
  for sized in (lambda tree, sh: _state_bytes(tree, sh),
                lambda tree, _: _state_bytes(tree)):
    sizes = {k: sized(tree, sh) for k, (tree, sh) in fields.items()}
    sizes['params_opt_ema'] = sum(sizes[k] for k in
                                  ('params', 'opt_state', 'ema'))
    sizes['total'] = sum(sizes[k] for k in fields)
    out.append(sizes)
  return tuple(out)


def _config_summary(config) -> dict:
  """The config fields that decide a plan's memory and speed."""
  return {'model': config.model_name,
          'variant': config.model.get('variant'),
          'scan': bool(config.model.get('scan')),
          'remat_policy': config.model.get('remat_policy'),
          'dtype': config.model.get('dtype'),
          'mu_dtype': config.optim.get('mu_dtype'),
          'grad_accum_steps': config.get('grad_accum_steps', 1),
          'image_size': config.input.image_size}


def plan(config, num_devices: int, *, peak_tflops: float = 275.0,
         hbm_gib: float = 32.0, mfus=(0.3, 0.4, 0.5)) -> dict:
  """Compiles the train step for `num_devices` and returns the plan dict."""
  devices = jax.devices()
  if len(devices) < num_devices:
    raise errors.ConfigError(
        f'{num_devices} devices requested but jax has {len(devices)}; run '
        'as `python -m mim_jax.tools.plan --devices=N` (it creates N fake '
        'CPU devices) or set XLA_FLAGS=--xla_force_host_platform_device_'
        f'count={num_devices} before jax is imported.')
  mesh = sharding.make_mesh(config.get('mesh', [('data', -1)]),
                            devices[:num_devices])
  dp = sharding.data_parallel_size(mesh)
  train.validate_config(config, num_devices, dp)
  bs = int(config.input.batch_size)

  t = time.perf_counter()
  lowered, state, state_sh = train.lower_train_step(config, mesh)
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()

  per_dev, single = _state_sizes(config, mesh, state, state_sh)
  xla = {
      'arguments': int(mem.argument_size_in_bytes),
      'outputs': int(mem.output_size_in_bytes),
      'aliased': int(mem.alias_size_in_bytes),
      'temporaries': int(mem.temp_size_in_bytes),
  }
  # Donated state is aliased: inputs + temporaries (+ non-aliased outputs).
  peak = (xla['arguments'] + xla['temporaries'] + xla['outputs'] -
          xla['aliased'])

  accum = int(config.get('grad_accum_steps', 1))
  suggestion = accum_to_fit(xla, bs // (dp * accum), hbm_gib * GIB)

  t = time.perf_counter()
  flops = train.step_flops(config, mesh)
  fwd_flops = forward_flops_per_image(train.unrolled_config(config))
  flops_s = time.perf_counter() - t
  peak_flops = peak_tflops * 1e12
  ideal = flops / (num_devices * peak_flops)
  return {
      'config': _config_summary(config),
      'devices': num_devices,
      'mesh': {k: int(v) for k, v in mesh.shape.items()},
      'batch_size': bs,
      'batch_per_device': bs // num_devices,
      'bytes_per_device': per_dev,
      'bytes_one_device': single,
      'state_fraction_of_one_device': (per_dev['params_opt_ema'] /
                                       single['params_opt_ema']),
      'xla_memory_per_device': dict(xla, peak_estimate=peak),
      'gib_per_device': round(peak / GIB, 3),
      'fits_hbm': peak <= hbm_gib * GIB,
      'hbm_gib': hbm_gib,
      'grad_accum_steps_to_fit': (suggestion * accum if suggestion
                                  else suggestion),
      'target_providers': {
          p.name: p.kind
          for p in experiment.providers_of(config)},
      'num_params': int(sum(np.prod(x.shape) for x in
                            jax.tree.leaves(state.params))),
      'flops_per_step': flops,
      'model_flops_per_image': flops / bs,
      'forward_flops_per_image': fwd_flops,
      'peak_tflops_per_chip': peak_tflops,
      'step_time_s_at_mfu': {f'{m:g}': ideal / m for m in mfus},
      'images_per_s_at_mfu': {f'{m:g}': bs * m / ideal for m in mfus},
      'step_time_formula': ('flops_per_step / (devices * peak_tflops * 1e12 '
                            '* mfu)'),
      'optimizer_steps': optim.steps_from(config, 'total'),
      'seconds': {'lower': round(lower_s, 2), 'compile': round(compile_s, 2),
                  'flop_count': round(flops_s, 2)},
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f.config or not f.devices:
    raise app.UsageError('--config and --devices are required.')
  try:
    result = plan(f.config, f.devices, peak_tflops=f.peak_tflops,
                  hbm_gib=f.hbm_gib, mfus=[float(m) for m in f.mfu])
  except errors.UserError as e:  # a config that cannot run: one line
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result, indent=1))


def _define_flags():
  # Only when run as a program: importing the module (tests, notebooks)
  # must not clash with other entry points' --config flag.
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                  lock_config=True)
  flags.DEFINE_integer('devices', None, 'Number of devices to plan for.')
  flags.DEFINE_float('peak_tflops', 275.0,
                     'Peak dense bf16 TFLOP/s of one chip (TPU v4: 275; '
                     'v5p: 459; v5e: 197; v6e: 918).')
  flags.DEFINE_float('hbm_gib', 32.0, 'Memory of one chip in GiB (v4: 32).')
  flags.DEFINE_list('mfu', ['0.3', '0.4', '0.5'], 'MFUs to tabulate.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)

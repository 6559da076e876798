r"""Train-step speed (compile time, steps/s, images/s), printed as JSON.

  python benchmarks/train_step_bench.py [--config=configs/mae_tiny.py]
      [--steps=20] [--config.input.batch_size=...] [--config.model.scan=True]
  python benchmarks/train_step_bench.py --smoke   # tests: 1 step, batch 8

Synthetic inputs of the method's batch spec (random masks of the config's
ratio), so it measures the jitted step alone (compare with
benchmarks/input_pipeline_bench.py).
"""

import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags



def compile_step(config):
  """The config's train step compiled for one synthetic batch (random masks
  of the config's ratio, uint8 images and extra views as random pixels,
  no random-erasing boxes).

  Returns:
    (compiled step, state, batch, frozen targets, compile seconds).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mim_jax import experiment  # pylint: disable=g-import-not-at-top
  from mim_jax import masking  # pylint: disable=g-import-not-at-top
  from mim_jax import sharding  # pylint: disable=g-import-not-at-top
  from mim_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from mim_jax import steps  # pylint: disable=g-import-not-at-top
  from mim_jax.models import vit  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  model = experiment.build_model(config)
  bs, size = config.input.batch_size, config.input.image_size
  shapes = experiment.batch_spec(config)
  rng = np.random.default_rng(0)
  # Random masks of the config's ratio, as the pipeline makes them: the
  # noise's ascending order lists the visible patches first.
  n = (size // vit.patch_size_of(config.model)) ** 2
  noise = rng.random((bs, n), np.float32)
  keep = masking.num_visible(n, config_lib.mask_ratio(config))
  rank = np.argsort(np.argsort(noise, axis=1), axis=1)
  made = {'image': rng.integers(0, 256, (bs, size, size, 3), np.uint8),
          'noise': noise, 'mask': (rank >= keep).astype(np.float32)}
  host = {}
  for k, s in shapes.items():
    if k in made:
      host[k] = made[k]
    elif s.dtype == np.uint8:  # an extra view (e.g. the tokenizer's)
      host[k] = rng.integers(0, 256, s.shape, np.uint8)
    else:  # labels, random-erasing boxes (none)
      host[k] = np.zeros(s.shape, s.dtype)
  state, shardings, _, schedule = state_lib.create_train_state(
      config, model, mesh, shapes)
  data_sh = sharding.data_sharding(mesh)
  step = steps.jit_train_step(config, model, experiment.build_loss(config),
                              schedule, mesh, shardings)
  # Frozen target weights (e.g. the tokenizer), read from their files.
  frozen = experiment.frozen_targets(config, mesh)
  batch = sharding.to_global(host, data_sh)
  t = time.perf_counter()
  compiled = step.lower(state, batch, frozen).compile()
  compile_s = time.perf_counter() - t
  return compiled, state, batch, frozen, compile_s


def run_steps(compiled, state, batch, frozen, num_steps: int):
  """One untimed step, then `num_steps` timed ones.

  Returns:
    (the state after them, seconds per timed step).
  """
  import jax  # pylint: disable=g-import-not-at-top
  state, m = compiled(state, batch, frozen)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(num_steps):
    state, m = compiled(state, batch, frozen)
  jax.block_until_ready(m)
  return state, (time.perf_counter() - t) / num_steps


def time_train_step(config, num_steps: int = 20) -> dict:
  """Compiles the config's train step and times `num_steps` steps on one
  synthetic batch (after one untimed step): the dict the script prints."""
  import jax  # pylint: disable=g-import-not-at-top
  compiled, state, batch, frozen, compile_s = compile_step(config)
  bs, size = config.input.batch_size, config.input.image_size
  _, dt = run_steps(compiled, state, batch, frozen, num_steps)
  return dict(
      benchmark='train_step', model=config.model.get('variant') or
      dict(config.model.encoder), batch=bs, image_size=size,
      scan=config.model.get('scan'), dtype=config.model.get('dtype'),
      devices=jax.device_count(), platform=jax.devices()[0].platform,
      compile_sec=round(compile_s, 2), step_sec=round(dt, 4),
      steps_per_sec=round(1 / dt, 2), images_per_sec=round(bs / dt, 1))


def main(_):
  config, num_steps = flags.FLAGS.config, flags.FLAGS.steps
  if flags.FLAGS.smoke:
    config.input.batch_size, num_steps = 8, 1
  print(json.dumps(time_train_step(config, num_steps)))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', 'configs/mae_tiny.py', 'Config.')
  flags.DEFINE_integer('steps', 20, 'Timed steps (after one compile step).')
  flags.DEFINE_bool('smoke', False, 'Tests: 1 timed step at batch 8.')
  app.run(main)

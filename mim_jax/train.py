"""train_and_evaluate: mesh, sharded state, jitted step, loop, ckpt, metrics.

The loop is the same for every method: the model, its batch spec, loss,
target providers and figures come from the method's record
(`mim_jax.method.Method`, found by `config.model_name`), the batches (with
their masks) from the tf.data pipeline.
"""

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions
from flax import traverse_util
import tensorflow as tf

from mim_jax import checkpoint
from mim_jax import input_pipeline
from mim_jax import metrics as metrics_lib
from mim_jax import optim
from mim_jax import sharding
from mim_jax import steps
from mim_jax import visualize
from mim_jax import weights
from mim_jax.models import vit


def validate_config(config, num_devices: int, data_parallel: int):
  """Checks the config before anything is built or compiled.

  Raises:
    ValueError naming the bad value and the fix.
  """
  input_pipeline.validate_config(config.input,
                                 patch_size=vit.patch_size_of(config.model))
  sharding.rules_from_config(config)
  method = steps.method_of(config)
  method.validate_config(config)
  spec = method.batch_spec(config, 1)
  made = set(input_pipeline.BATCH_KEYS) | set(method.views(config))
  missing = sorted(set(spec) - made)
  if missing:
    raise ValueError(
        f'method {method.name!r} asks for batch keys {missing} that the '
        f'pipeline does not make (it makes {sorted(made)}); declare them '
        'as views of the method or drop them from its batch_spec.')
  bs = config.input.batch_size
  accum = config.get('grad_accum_steps', 1)
  if bs % (data_parallel * accum):
    raise ValueError(
        f'global batch size {bs} is not divisible by {data_parallel} '
        f'data-parallel devices x {accum} accumulation steps (of '
        f'{num_devices} devices); use a multiple of {data_parallel * accum}.')


def lower_train_step(config, mesh):
  """The sharded train step lowered for abstract inputs (nothing is
  allocated): for ahead-of-time compilation, planning and benchmarks.

  Returns:
    (lowered, abstract_state, state_shardings); the frozen target weights
    are arguments of `lowered` (replicated).
  """
  model = steps.build_model(config)
  shapes = steps.batch_spec(config)
  state, state_sh, _, schedule = steps.create_train_state(
      config, model, mesh, shapes, materialize=False)
  step = steps.jit_train_step(config, model, steps.build_loss(config),
                              schedule, mesh, state_sh)
  data_sh = sharding.data_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sh)
           for k, v in shapes.items()}
  frozen = steps.frozen_targets(config, mesh, abstract=True)
  return step.lower(state, batch, frozen), state, state_sh


def _vis(config, vis_fn, params, vis_batch, workdir, step, writer):
  """Writes recon_<step>.png (original | masked | recon | recon+visible)."""
  grid = visualize.render(steps.method_of(config), config, vis_fn, params,
                          vis_batch)
  if grid is None:
    return None
  path = os.path.join(workdir, f'recon_{step:07d}.png')
  if jax.process_index() == 0:
    visualize.save_png(grid, path)
    writer.write_images(step, {'reconstruction': grid[None]})
  return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains (resuming from `workdir` if it has checkpoints).

  Returns:
    The final TrainState.
  """
  mesh = sharding.make_mesh(config.get('mesh', [('data', -1)]))
  dp = sharding.data_parallel_size(mesh)
  validate_config(config, jax.device_count(), dp)
  total_steps = optim.steps_from(config, 'total')
  is_main = jax.process_index() == 0
  if is_main and '://' not in workdir:
    os.makedirs(workdir, exist_ok=True)
  method = steps.method_of(config)
  model = method.build_model(config)
  loss_fn = steps.build_loss(config)
  host_bs = config.input.batch_size // jax.process_count()
  p = vit.patch_size_of(config.model)
  batch_shapes = steps.batch_spec(config)
  mgr = checkpoint.make_manager(
      workdir, keep=config.get('keep_ckpts', 3),
      async_save=config.get('async_ckpt', True))
  start_step = int(mgr.latest_step() or 0)
  writer, tb_writer = metrics_lib.make_writer(
      workdir, is_main, resume_step=start_step)
  if is_main:
    flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
    writer.write_hparams({k: v if isinstance(v, (int, float, str, bool))
                          else str(v) for k, v in flat.items()})
    with tf.io.gfile.GFile(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))

  # The data sources are opened before anything compiles, so a missing
  # dataset or an empty folder fails in seconds, not after compilation.
  views = {k: v.size for k, v in method.views(config).items()}
  ds = input_pipeline.make_train_dataset(
      config.input, patch_size=p, seed=config.seed, start_step=start_step,
      views=views)
  vis_batch = input_pipeline.make_vis_batch(
      config.input, patch_size=p, seed=config.seed,
      num_images=config.get('vis_images', 8), views=views)
  vis_batch = {k: vis_batch[k] for k in batch_shapes}

  # Frozen target weights (e.g. a tokenizer): read before compiling, after
  # the data check.
  frozen = steps.frozen_targets(config, mesh)
  draws = method.to_pixels is not None

  init = init_ema = None
  if config.get('init_from') and not start_step:
    init = weights.from_torch(config, model, config.init_from,
                              strict=config.get('init_strict', True))
    init_ema = weights.ema_from_torch(config, model, config.init_from, init)
  state, state_shardings, _, schedule = steps.create_train_state(
      config, model, mesh, batch_shapes, params=init,
      materialize=not start_step, ema=init_ema)
  if start_step:
    state, _ = checkpoint.restore_latest(mgr, state, start_step)
    logging.info('Resumed from step %d.', start_step)

  data_sh = sharding.data_sharding(mesh)
  train_step = steps.jit_train_step(config, model, loss_fn, schedule, mesh,
                                    state_shardings)
  it = iter(ds.as_numpy_iterator())
  vis_fn = steps.make_forward(model, mesh)

  progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=tb_writer if is_main else None,
      every_steps=config.log_every_steps)
  pending, t_log, n_log = [], time.time(), 0
  logging.info('Training steps %d..%d, host batch %d, mesh %s.', start_step,
               total_steps, host_bs, dict(mesh.shape))
  step = start_step
  while step < total_steps:
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      local = next(it)
      batch = sharding.to_global({k: local[k] for k in batch_shapes},
                                 data_sh)
      state, m = train_step(state, batch, frozen)
    step += 1
    pending.append(m)
    n_log += 1
    progress(step)
    if step % config.log_every_steps == 0 or step == total_steps:
      stacked = jax.device_get(pending)
      row = {f'train/{k}': float(np.mean([x[k] for x in stacked]))
             for k in stacked[0]}
      if not np.isfinite(row['train/loss']):
        raise FloatingPointError(
            f'loss became {row["train/loss"]} at step {step}; lower the lr, '
            'enable optim.grad_clip_norm, or use float32 compute.')
      dt = time.time() - t_log
      row['train/images_per_sec'] = n_log * config.input.batch_size / dt
      row['train/steps_per_sec'] = n_log / dt
      writer.write_scalars(step, row)
      logging.info('step %d: %s', step,
                   ', '.join(f'{k}={v:.4g}' for k, v in row.items()))
      pending, t_log, n_log = [], time.time(), 0
    if draws and (step % config.vis_every_steps == 0 or step == total_steps):
      if _vis(config, vis_fn, state.params, vis_batch, workdir, step,
              writer) is None:
        logging.info('No reconstruction images: this %s config predicts no '
                     'pixels.', method.name)
        draws = False
    checkpoint.save(mgr, step, state, config.ckpt_every_steps,
                    force=step == total_steps)
    if mgr.reached_preemption(step):
      if mgr.latest_step() != step:  # not saved by the line above
        checkpoint.save(mgr, step, state, 1, force=True)
      mgr.wait_until_finished()
      logging.warning('Preempted at step %d; checkpoint saved.', step)
      break
  mgr.wait_until_finished()
  writer.flush()
  return state

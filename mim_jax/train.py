"""train_and_evaluate: mesh, sharded state, jitted step, loop, ckpt, metrics.

The loop is the same for every method: the model, its batch spec, loss,
target providers and figures come from the method's record
(`mim_jax.method.Method`, found by `config.model_name`), the batches (with
their masks) from the tf.data pipeline.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions
from flax import traverse_util
import tensorflow as tf

from mim_jax import checkpoint
from mim_jax import config_lib
from mim_jax import guards
from mim_jax import input_pipeline
from mim_jax import knn
from mim_jax import metrics as metrics_lib
from mim_jax import optim
from mim_jax import sharding
from mim_jax import steps
from mim_jax import visualize
from mim_jax import weights
from mim_jax.convert import core
from mim_jax.data import image_check
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
  made = (set(input_pipeline.BATCH_KEYS) | {input_pipeline.LABEL_KEY}
          | set(method.views(config)))
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
  peak = config.get('peak_tflops')
  if peak is not None and not peak > 0:
    raise ValueError(f'peak_tflops={peak} must be > 0: the chip\'s peak '
                     'TFLOP/s for train/mfu (e.g. 275 for TPU v4, bf16), or '
                     'unset it.')
  action = config.get('nonfinite', 'skip')
  if action not in guards.NONFINITE_ACTIONS:
    raise ValueError(f'nonfinite={action!r}: use one of '
                     f'{guards.NONFINITE_ACTIONS} (skip the update of a '
                     'step with non-finite values, or stop at once).')
  k = config.get('max_consecutive_skips', 10)
  if not (isinstance(k, int) and k >= 1):
    raise ValueError(f'max_consecutive_skips={k!r} must be an integer >= 1 '
                     '(the run stops after that many skipped steps in a '
                     'row).')
  init_from = config.get('init_from')
  if init_from and os.path.isfile(init_from):
    core.check_weights_file(init_from)  # before anything is created
  if not config.get('eval_only'):
    total, warm = (optim.steps_from(config, k) for k in ('total', 'warmup'))
    if not 0 <= warm < total:
      raise ValueError(
          f'the warmup ({warm} steps) must be shorter than the run '
          f'(total_steps {total}): raise --config.total_steps (or '
          '--config.total_epochs), or lower --config.warmup_steps (or '
          '--config.warmup_epochs).')
  stop = config.get('stop_after_steps')
  if stop is not None and stop < 1:
    raise ValueError(f'stop_after_steps={stop} must be >= 1 (or unset to '
                     'train to the end of the schedule).')


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


def unrolled_config(config):
  """The config with layers unrolled and no remat or accumulation: the
  model-FLOPs convention (no recompute), and no loops (XLA's cost analysis
  counts a loop body once)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for key, value in (('scan', False), ('remat_policy', 'none')):
      if key in c.model:  # (models without the switch are unrolled)
        c.model[key] = value
    c.grad_accum_steps = 1
  return c


def step_flops(config, mesh) -> float:
  """FLOPs of one optimizer step over the global batch: XLA's cost analysis
  of the train step lowered (not compiled) with `unrolled_config`. Target
  networks run inside the step, so their FLOPs are in it. The one count of
  the planner (`tools/plan.py`) and of the logged MFU."""
  lowered, _, _ = lower_train_step(unrolled_config(config), mesh)
  return float(lowered.cost_analysis()['flops'])


# Peak dense bf16 TFLOP/s per chip by `jax.devices()[0].device_kind`, for
# the MFU when config.peak_tflops is unset (Cloud TPU system architecture
# pages: v4 275, v5e 197, v5p 459, v6e (Trillium) 918).
PEAK_TFLOPS = {'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0,
               'TPU v5': 459.0, 'TPU v5p': 459.0, 'TPU v6 lite': 918.0,
               'TPU v6e': 918.0}


def peak_tflops_of(config) -> float | None:
  """config.peak_tflops, else the known peak of this chip, else None (no
  MFU, e.g. on CPUs)."""
  if config.get('peak_tflops') is not None:
    return float(config.peak_tflops)
  return PEAK_TFLOPS.get(jax.devices()[0].device_kind)


def pipeline_kind(method) -> dict:
  """The input pipeline's switches for the method's declared
  `Method.pipeline`: masks (pretraining) or labels (fine-tuning, probes)."""
  return dict(labeled=method.pipeline == 'labelled',
              with_masks=method.pipeline == 'masked')


class Evaluator:
  """Evaluation passes over a labelled split, and the best checkpoint.

  Opens the split when built (a missing split or data set fails before
  anything compiles), runs the method's `eval_metrics` over every example
  once (padding excluded), and keeps the state of the best
  `config.eval.best_metric` in workdir/best/ (its value in best.json, so a
  resumed run goes on comparing with it).
  """

  def __init__(self, config, method, model, mesh, state_shardings,
               workdir: str):
    ec = config.eval
    self.config, self.workdir = config, workdir
    self.ds, self.num_batches, self.num_examples = (
        input_pipeline.make_eval_dataset(
            config.input, data=ec.get('data'),
            split=ec.get('split'), batch_size=ec.batch_size,
            crop_pct=ec.get('crop_pct', 0.875)))
    self.step_fn = steps.make_eval_step(model, method.eval_metrics, mesh,
                                        state_shardings)
    self.data_sh = sharding.data_sharding(mesh)
    self.best_metric = ec.get('best_metric', 'top1')
    self.use_ema = ec.get('use_ema', False)
    self.best_path = os.path.join(workdir, 'best.json')
    self.best = None
    if tf.io.gfile.exists(self.best_path):
      with tf.io.gfile.GFile(self.best_path) as f:
        self.best = json.load(f)
    self.best_mgr = None

  def _pass(self, params, model_state) -> dict:
    totals = None
    for local in self.ds.as_numpy_iterator():
      batch = sharding.to_global(local, self.data_sh)
      sums = self.step_fn(params, model_state, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals,
                                                        sums)
    totals = jax.device_get(totals)
    count = max(float(totals.pop('count')), 1.0)
    return {k: float(v) / count for k, v in totals.items()}

  def __call__(self, state, step: int, writer) -> dict:
    """Evaluates `state` (and its weights EMA when configured), logs
    eval/*, and saves the best state."""
    t0 = time.time()
    row = {f'eval/{k}': v for k, v in self._pass(
        state.params, state.model_state).items()}
    if self.use_ema and state.ema_params is not None:
      row.update({f'eval/ema_{k}': v for k, v in self._pass(
          state.ema_params, state.model_state).items()})
    row['eval/seconds'] = time.time() - t0
    key = f'eval/{self.best_metric}'
    if key not in row:
      raise ValueError(f'eval.best_metric={self.best_metric!r} is not an '
                       f'evaluation metric ({sorted(row)}).')
    writer.write_scalars(step, row)
    logging.info('eval at step %d on %d examples: %s', step,
                 self.num_examples,
                 ', '.join(f'{k}={v:.4g}' for k, v in row.items()))
    if self.best is None or row[key] > self.best['value']:
      self.best = {'step': step, 'metric': key, 'value': row[key]}
      if not self.config.get('eval_only'):
        if self.best_mgr is None:
          self.best_mgr = checkpoint.make_manager(
              self.workdir, keep=1, async_save=False, subdir='best')
        checkpoint.save(self.best_mgr, step, state, 1, force=True)
      if jax.process_index() == 0:
        with tf.io.gfile.GFile(self.best_path, 'w') as f:
          json.dump(self.best, f)
    row[f'eval/best_{self.best_metric}'] = self.best['value']
    return row


class KnnMonitor:
  """A kNN classifier on the encoder's features (cosine, k nearest, votes
  weighted by exp(sim / T), as DINO's `eval_knn.py`), logged as knn/top1
  during pretraining: the representation, not just the loss.

  `config.knn`: data (a labelled data spec, e.g. 'embedded:digits'),
  train_split / test_split, every_steps, k, temperature, feature ('cls' or
  'avg'), batch_size, crop_pct. Each evaluation runs the encoder once over
  both splits (inference mode, center crops) and the kNN on the devices;
  knn/seconds logs what it costs.
  """

  def __init__(self, config, mesh):
    kc = config.knn
    self.kc = kc
    self.fn = steps.make_features(config, mesh, kc.get('feature', 'cls'))
    self.data_sh = sharding.data_sharding(mesh)
    self.sets = [input_pipeline.make_eval_dataset(
        config.input, data=kc.data, split=split,
        batch_size=kc.get('batch_size', 256),
        crop_pct=kc.get('crop_pct', 1.0))[0]
                 for split in (kc.get('train_split', 'train'),
                               kc.get('test_split', 'test'))]

  def _features(self, params, ds):
    feats, labels = [], []
    for local in ds.as_numpy_iterator():
      f, y, v = jax.device_get(self.fn(
          params, sharding.to_global(local, self.data_sh)))
      keep = v > 0
      feats.append(f[keep])
      labels.append(y[keep])
    return np.concatenate(feats), np.concatenate(labels)

  def __call__(self, params, step: int, writer) -> float:
    t0 = time.time()
    (xtr, ytr), (xte, yte) = [self._features(params, ds) for ds in self.sets]
    acc = knn.knn_accuracy(
        xtr, ytr, xte, yte, num_classes=int(max(ytr.max(), yte.max())) + 1,
        k=self.kc.get('k', 20), temperature=self.kc.get('temperature', 0.07))
    row = {'knn/top1': acc, 'knn/seconds': time.time() - t0}
    writer.write_scalars(step, row)
    logging.info('kNN at step %d: top-1 %.4f (%d train, %d test, %.1f s).',
                 step, acc, len(ytr), len(yte), row['knn/seconds'])
    return acc


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


def check_resume(config, workdir: str, mgr, abstract_state) -> list[str]:
  """Compares a resumed run's config with the workdir's config.json and
  its newest checkpoint's arrays, before anything is written.

  Returns:
    The allowed changes ('field: old -> new'), also logged.

  Raises:
    ValueError listing every refused field (config_lib.LAYOUT_FIELDS) and
    every array that does not fit.
  """
  path = os.path.join(workdir, 'config.json')
  refused, allowed = [], []
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      refused, allowed = config_lib.resume_changes(json.load(f), config)
  arrays = checkpoint.mismatches(mgr, mgr.latest_step(), abstract_state)
  if refused or arrays:
    raise ValueError(
        f'{workdir} holds a run of another model or optimizer state: '
        + ' | '.join(([f'{len(refused)} refused config changes: '
                       + '; '.join(refused)] if refused else []) + arrays)
        + '. Use a fresh --workdir, or the config this run started with '
        f'({path}).')
  for line in allowed:
    logging.info('Config changed on resume: %s', line)
  return allowed


def _next_batch(it):
  """The next host batch; a bad image file met with
  input.bad_images='error' becomes one line naming it."""
  try:
    return next(it)
  except tf.errors.OpError as e:
    found = image_check.ERROR.search(e.message)
    if not found:
      raise
    raise guards.mark_user_error(ValueError(found.group(0))) from None


def _train_row(stacked: list[dict]) -> dict:
  """The logged means of a log interval's step metrics; steps whose update
  the non-finite guard skipped are counted (`train/skipped_steps`), not
  averaged."""
  skipped = [float(x.pop('skipped', 0.0)) for x in stacked]
  for x in stacked:
    x.pop('nonfinite_at', None)
  good = [x for x, s in zip(stacked, skipped) if not s]
  row = {f'train/{k}': float(np.mean([x[k] for x in good]))
         for k in (stacked[0] if good else ())}
  row['train/skipped_steps'] = float(sum(skipped))
  return row


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains (resuming from `workdir` if it has checkpoints).

  Fine-tuning and probes (methods with `eval_metrics`) also evaluate on
  `config.eval` every `eval.every_steps` and at the end, keeping the best
  state in workdir/best/; `config.eval_only` evaluates `init_from` and
  stops.

  Returns:
    The final TrainState ((state, eval metrics) with eval_only).
  """
  # Errors of the setup (config, data, checkpoints, weights files) are
  # the user's: the CLI prints them as one line (guards.user_errors).
  with guards.user_errors():
    if config.get('eval_only') and not config.get('init_from'):
      raise ValueError('eval_only evaluates the model of config.init_from: '
                       'set --config.init_from to a workdir or .pth file.')
    mesh = sharding.make_mesh(config.get('mesh', [('data', -1)]))
    dp = sharding.data_parallel_size(mesh)
    validate_config(config, jax.device_count(), dp)
    # The schedule spans total_steps; stop_after_steps ends this run earlier
    # (rerun without it to continue the same schedule).
    total_steps = optim.steps_from(config, 'total')
    end_step = min(total_steps, config.get('stop_after_steps') or total_steps)
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
    # Resume first (it reads, compiles nothing): the step it restores, which
    # may be older than the newest if that one is damaged, decides the
    # metrics rows kept and where the data starts.
    state, start_step, changed = None, 0, []
    if mgr.latest_step() is not None:
      abstract, state_shardings, _, schedule = steps.create_train_state(
          config, model, mesh, batch_shapes, materialize=False)
      changed = check_resume(config, workdir, mgr, abstract)
      state, start_step = checkpoint.restore_with_fallback(mgr, abstract)
      logging.info('Resumed from step %d.', start_step)
    writer, tb_writer = metrics_lib.make_writer(
        workdir, is_main, resume_step=start_step)
    if is_main:
      flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
      writer.write_hparams({k: v if isinstance(v, (int, float, str, bool))
                            else str(v) for k, v in flat.items()})
      path = os.path.join(workdir, 'config.json')
      if changed and tf.io.gfile.exists(path):  # the history of changes
        tf.io.gfile.copy(path, os.path.join(
            workdir, f'config.{start_step}.json'), overwrite=True)
      with tf.io.gfile.GFile(path, 'w') as f:
        f.write(config.to_json_best_effort(indent=1))

    # The data sources are opened before anything compiles, so a missing
    # dataset or an empty folder fails in seconds, not after compilation.
    views = {k: v.size for k, v in method.views(config).items()}
    kind = pipeline_kind(method)
    ds = input_pipeline.make_train_dataset(
        config.input, patch_size=p, seed=config.seed, start_step=start_step,
        views=views, num_classes=config.model.get('num_classes'), **kind)
    draws = method.to_pixels is not None
    if draws:
      vis_batch = input_pipeline.make_vis_batch(
          config.input, patch_size=p, seed=config.seed,
          num_images=config.get('vis_images', 8), views=views)
      vis_batch = {k: vis_batch[k] for k in batch_shapes}

    # Frozen target weights (e.g. a tokenizer): read before compiling, after
    # the data check.
    frozen = steps.frozen_targets(config, mesh)

    if state is None:
      init = init_ema = init_model_state = None
      if config.get('init_from'):
        init, init_model_state = weights.initial_params(config, model)
        if not weights.is_workdir(config.init_from):
          init_ema = weights.ema_from_torch(config, model, config.init_from,
                                            init)
      state, state_shardings, _, schedule = steps.create_train_state(
          config, model, mesh, batch_shapes, params=init, ema=init_ema,
          model_state=init_model_state)

    evaluate = None
    if method.eval_metrics is not None and config.get('eval'):
      evaluate = Evaluator(config, method, model, mesh, state_shardings,
                           workdir)
    if config.get('eval_only'):
      row = evaluate(state, start_step, writer)
      writer.flush()
      mgr.close()
      return state, row
    eval_every = (config.eval.get('every_steps') if evaluate else None) or 0
    knn_every = 0
    if (config.get('knn') or {}).get('data'):
      if method.encoder is None:
        logging.warning('config.knn is set but %s declares no encoder '
                        '(Method.encoder): no kNN monitor.', method.name)
      else:
        monitor = KnnMonitor(config, mesh)
        knn_every = config.knn.get('every_steps') or config.log_every_steps

    # Throughput in the logs: the planner's FLOP count, taken once.
    flops = step_flops(config, mesh)
    peak = peak_tflops_of(config)
    logging.info('%.4g GFLOPs per step (%.4g per image); chip peak %s '
                 'TFLOP/s.', flops / 1e9, flops / config.input.batch_size / 1e9,
                 peak)

    data_sh = sharding.data_sharding(mesh)
    train_step = steps.jit_train_step(config, model, loss_fn, schedule, mesh,
                                      state_shardings)
    it = iter(ds.as_numpy_iterator())
    vis_fn = steps.make_forward(model, mesh)

  progress = periodic_actions.ReportProgress(
      num_train_steps=end_step, writer=tb_writer if is_main else None,
      every_steps=config.log_every_steps)
  pending, t_log, n_log, bad_images = [], time.time(), 0, 0
  logging.info('Training steps %d..%d, host batch %d, mesh %s.', start_step,
               end_step, host_bs, dict(mesh.shape))
  nonfinite = guards.NonFiniteMonitor(
      config.get('nonfinite', 'skip'), config.get('max_consecutive_skips', 10),
      steps.nonfinite_names(state), mgr.latest_step)
  step = start_step
  with guards.StopSignals(enabled=jax.process_count() == 1) as signals:
    while step < end_step:
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        local = _next_batch(it)
        batch = sharding.to_global({k: local[k] for k in batch_shapes},
                                   data_sh)
        state, m = train_step(state, batch, frozen)
      bad_images += int(np.sum(local.get(input_pipeline.BAD_KEY, 0)))
      step += 1
      nonfinite.observe(step, m)
      checkpoint.check_saves(mgr)
      pending.append(m)
      n_log += 1
      progress(step)
      if step % config.log_every_steps == 0 or step == end_step:
        row = _train_row(jax.device_get(pending))
        if input_pipeline.BAD_KEY in local:  # sources of files
          row['train/bad_images'] = float(bad_images)
        dt = time.time() - t_log
        row['train/images_per_sec'] = n_log * config.input.batch_size / dt
        row['train/steps_per_sec'] = n_log / dt
        tflops = flops * n_log / dt / jax.device_count() / 1e12
        row['train/tflops_per_device'] = tflops
        if peak:
          row['train/mfu'] = tflops / peak
        writer.write_scalars(step, row)
        logging.info('step %d: %s', step,
                     ', '.join(f'{k}={v:.4g}' for k, v in row.items()))
        pending, t_log, n_log, bad_images = [], time.time(), 0, 0
      if draws and (step % config.vis_every_steps == 0 or step == end_step):
        if _vis(config, vis_fn, state.params, vis_batch, workdir, step,
                writer) is None:
          logging.info('No reconstruction images: this %s config predicts '
                       'no pixels.', method.name)
          draws = False
      if evaluate and ((eval_every and step % eval_every == 0)
                       or step == end_step):
        evaluate(state, step, writer)
      if knn_every and (step % knn_every == 0 or step == end_step):
        monitor(state.params, step, writer)
      stopping = signals.received is not None
      if stopping or step == end_step or (
          step % config.ckpt_every_steps == 0):
        nonfinite.settle()  # never save past a step it would stop at
        if nonfinite.consecutive and not (stopping or step == end_step):
          # The state is finite (skipped updates change nothing) but a
          # periodic save now would rotate out older ones for no progress.
          logging.warning('Step %d: no checkpoint right after a skipped '
                          'step; the newest stays step %s.', step,
                          mgr.latest_step())
        else:
          checkpoint.save(mgr, step, state, config.ckpt_every_steps,
                          force=stopping or step == end_step)
      if stopping:
        mgr.wait_until_finished()
        checkpoint.check_saves(mgr)
        writer.flush()
        message = (f'{signals.name} at step {step}: checkpoint saved in '
                   f'{mgr.directory}; rerun with the same --workdir to '
                   f'resume (exit status {guards.EXIT_STOPPED}).')
        logging.warning(message)
        raise guards.Stopped(message)
      if mgr.reached_preemption(step):
        if mgr.latest_step() != step:  # not saved by the line above
          checkpoint.save(mgr, step, state, 1, force=True)
        mgr.wait_until_finished()
        logging.warning('Preempted at step %d; checkpoint saved.', step)
        break
  nonfinite.settle()
  mgr.wait_until_finished()
  checkpoint.check_saves(mgr)
  writer.flush()
  return state

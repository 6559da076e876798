"""The trainer: `setup` builds a run, `loop` trains it, hooks do the
periodic work.

  run = setup(config, workdir)   # checks, resume, data, state, writers
  state = loop(run, default_hooks(run, stop_signals))

`train_and_evaluate` does both (the CLI's training entry point);
`evaluate` is the evaluation-only entry point (`config.eval_only`). The
loop is the same for every method: the model, its batch spec, loss, target
providers and figures come from the method's record (`mim_jax.experiment`),
the batches (with their masks) from the tf.data pipeline, and every
periodic job is a hook (`mim_jax.hooks`).

Setup reads and checks everything (config, data sources, checkpoints,
weights files) before it writes anything into the workdir, so a run whose
setup fails leaves no half-made workdir behind.
"""

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util
import tensorflow as tf

from mim_jax import checkpoint
from mim_jax import config_lib
from mim_jax import errors
from mim_jax import experiment
from mim_jax import hooks as hooks_lib
from mim_jax import images
from mim_jax import input_pipeline
from mim_jax import method as method_lib
from mim_jax import metrics as metrics_lib
from mim_jax import nonfinite
from mim_jax import optim
from mim_jax import runlock
from mim_jax import sharding
from mim_jax import signals
from mim_jax import state as state_lib
from mim_jax import steps
from mim_jax import weights
from mim_jax.convert import core
from mim_jax.convert import hf_vit
from mim_jax.data import image_check
from mim_jax.models import vit


def validate_config(config, num_devices: int, data_parallel: int):
  """Checks the config before anything is built or compiled.

  Raises:
    errors.ConfigError naming the bad value and the fix.
  """
  config_lib.check_removed(config)  # e.g. an old config's mask_ratio
  input_pipeline.validate_config(config.input,
                                 patch_size=vit.patch_size_of(config.model))
  sharding.rules_from_config(config)
  vit.validate_drop_path(config.model)
  optim.validate_config(config)
  method_lib.compute_dtype(config.model.get('dtype', 'float32'))
  method = experiment.method_of(config)
  method.validate_config(config)
  spec = method.batch_spec(config, 1)
  made = (set(input_pipeline.BATCH_KEYS) | {input_pipeline.LABEL_KEY,
                                            input_pipeline.ERASE_KEY}
          | set(method.views(config)))
  missing = sorted(set(spec) - made)
  if missing:
    raise errors.ConfigError(
        f'method {method.name!r} asks for batch keys {missing} that the '
        f'pipeline does not make (it makes {sorted(made)}); declare them '
        'as views of the method or drop them from its batch_spec.')
  bs = config.input.batch_size
  accum = config.get('grad_accum_steps', 1)
  if bs % (data_parallel * accum):
    raise errors.ConfigError(
        f'global batch size {bs} is not divisible by {data_parallel} '
        f'data-parallel devices x {accum} accumulation steps (of '
        f'{num_devices} devices); use a multiple of {data_parallel * accum}.')
  peak = config.get('peak_tflops')
  if peak is not None and not peak > 0:
    raise errors.ConfigError(
        f'peak_tflops={peak} must be > 0: the chip\'s peak '
        'TFLOP/s for train/mfu (e.g. 275 for TPU v4, bf16), or '
        'unset it.')
  action = config.get('nonfinite', 'skip')
  if action not in nonfinite.ACTIONS:
    raise errors.ConfigError(
        f'nonfinite={action!r}: use one of '
        f'{nonfinite.ACTIONS} (skip the update of a '
        'step with non-finite values, or stop at once).')
  k = config.get('max_consecutive_skips', 10)
  if not (isinstance(k, int) and k >= 1):
    raise errors.ConfigError(
        f'max_consecutive_skips={k!r} must be an integer >= 1 '
        '(the run stops after that many skipped steps in a '
        'row).')
  init_from = config.get('init_from')
  if init_from and os.path.isfile(init_from):
    core.check_weights_file(init_from)  # before anything is created
  elif hf_vit.is_folder(init_from):
    hf_vit.check_folder(init_from)
  if not config.get('eval_only'):
    total, warm = (optim.steps_from(config, k) for k in ('total', 'warmup'))
    if not 0 <= warm < total:
      raise errors.ConfigError(
          f'the warmup ({warm} steps) must be shorter than the run '
          f'(total_steps {total}): raise --config.total_steps (or '
          '--config.total_epochs), or lower --config.warmup_steps (or '
          '--config.warmup_epochs).')
  stop = config.get('stop_after_steps')
  if stop is not None and stop < 1:
    raise errors.ConfigError(
        f'stop_after_steps={stop} must be >= 1 (or unset to '
        'train to the end of the schedule).')


def lower_train_step(config, mesh):
  """The sharded train step lowered for abstract inputs (nothing is
  allocated): for ahead-of-time compilation, planning and benchmarks.

  Returns:
    (lowered, abstract_state, state_shardings); the frozen target weights
    are arguments of `lowered` (replicated).
  """
  model = experiment.build_model(config)
  shapes = experiment.batch_spec(config)
  state, state_sh, _, schedule = state_lib.create_train_state(
      config, model, mesh, shapes, materialize=False)
  step = steps.jit_train_step(config, model, experiment.build_loss(config),
                              schedule, mesh, state_sh)
  data_sh = sharding.data_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sh)
           for k, v in shapes.items()}
  frozen = experiment.frozen_targets(config, mesh, abstract=True)
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


def check_resume(config, workdir: str, mgr, abstract_state) -> list[str]:
  """Compares a resumed run's config with the workdir's config.json and
  its newest checkpoint's arrays, before anything is written.

  Returns:
    The allowed changes ('field: old -> new'), also logged.

  Raises:
    errors.WorkdirError listing every refused field
    (config_lib.LAYOUT_FIELDS) and every array that does not fit.
  """
  path = os.path.join(workdir, 'config.json')
  refused, allowed = [], []
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      refused, allowed = config_lib.resume_changes(json.load(f), config)
  arrays = checkpoint.mismatches(mgr, mgr.latest_step(), abstract_state)
  if refused or arrays:
    raise errors.WorkdirError(
        f'{workdir} holds a run of another model or optimizer state: '
        + ' | '.join(([f'{len(refused)} refused config changes: '
                       + '; '.join(refused)] if refused else []) + arrays)
        + '. Use a fresh --workdir, or the config this run started with '
        f'({path}).')
  for line in allowed:
    logging.info('Config changed on resume: %s', line)
  return allowed


def pipeline_kind(method) -> dict:
  """The input pipeline's switches for the method's declared
  `Method.pipeline`: masks (pretraining) or labels (fine-tuning, probes)."""
  return dict(labeled=method.pipeline == 'labelled',
              with_masks=method.pipeline == 'masked')


@dataclasses.dataclass
class Run:
  """A run set up by `setup`: what the loop and the hooks need.

  `batches` yields host batches from `start_step` on; `train_step(state,
  batch, frozen) -> (state, metrics)` is jitted with the state's shardings;
  `evaluator` / `knn_monitor` / `vis` (forward function and batch) are None
  where the config has none. `batch_shapes`: the global batch the step
  takes (`experiment.batch_spec`).
  """
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  method: Any
  model: Any
  state: Any
  state_shardings: Any
  frozen: dict
  train_step: Any
  batches: Any
  batch_shapes: dict
  start_step: int
  end_step: int
  mgr: Any
  writer: Any
  progress_writer: Any
  flops: float
  peak: Optional[float]
  lock: runlock.RunLock
  evaluator: Optional[hooks_lib.Evaluator] = None
  knn_monitor: Optional[hooks_lib.KnnMonitor] = None
  vis: Optional[tuple] = None

  def close(self, wait: bool = True) -> None:
    """Flushes the writers, with `wait` waits for pending saves (not after
    a failed save, whose threads may never finish), releases the lock."""
    if wait:
      self.mgr.wait_until_finished()
    self.writer.flush()
    self.lock.release()


def _checked_mesh(config):
  """The mesh, after every config check that needs no data."""
  mesh = sharding.make_mesh(config.get('mesh', [('data', -1)]))
  validate_config(config, jax.device_count(),
                  sharding.data_parallel_size(mesh))
  return mesh


@dataclasses.dataclass
class _Resumed:
  """What a workdir's checkpoints give a run: the restored state (None to
  start fresh), its step, the allowed config changes, the open manager
  (None without checkpoints/) and the state's shardings and schedule (from
  the same state creation: a TrainState's static fields must match)."""
  state: Any = None
  step: int = 0
  changed: list = dataclasses.field(default_factory=list)
  mgr: Any = None
  made: Optional[tuple] = None


def _resume(config, workdir: str, model, mesh, batch_shapes) -> _Resumed:
  """The workdir's newest checkpoint that restores. Reads only: a workdir
  without checkpoints is not created here."""
  if not tf.io.gfile.exists(os.path.join(workdir, 'checkpoints')):
    return _Resumed()
  mgr = _manager(config, workdir)
  if mgr.latest_step() is None:
    return _Resumed(mgr=mgr)
  abstract, shardings, _, schedule = state_lib.create_train_state(
      config, model, mesh, batch_shapes, materialize=False)
  changed = check_resume(config, workdir, mgr, abstract)
  state, step = checkpoint.restore_with_fallback(mgr, abstract)
  logging.info('Resumed from step %d.', step)
  return _Resumed(state, step, changed, mgr, (shardings, schedule))


def _manager(config, workdir: str):
  return checkpoint.make_manager(
      workdir, keep=config.get('keep_ckpts', 3),
      async_save=config.get('async_ckpt', True))


def _initial_state(config, model, mesh, batch_shapes):
  """(state, shardings, schedule): a fresh state (from `config.init_from`
  when set)."""
  init = init_ema = init_model_state = None
  if config.get('init_from'):
    init, init_model_state = weights.initial_params(config, model)
    if not weights.is_workdir(config.init_from):
      init_ema = weights.ema_from_torch(config, model, config.init_from,
                                        init)
  state, shardings, _, schedule = state_lib.create_train_state(
      config, model, mesh, batch_shapes, params=init, ema=init_ema,
      model_state=init_model_state)
  return state, shardings, schedule


def _train_data(config, method, batch_shapes, start_step: int):
  """(host batch iterator, vis batch or None): the data sources are
  opened before anything compiles, so a missing dataset or an empty folder
  fails in seconds."""
  p = vit.patch_size_of(config.model)
  views = {k: v.size for k, v in method.views(config).items()}
  ds = input_pipeline.make_train_dataset(
      config.input, patch_size=p, seed=config.seed, start_step=start_step,
      views=views, num_classes=config.model.get('num_classes'),
      **pipeline_kind(method))
  vis_batch = None
  if method.to_pixels is not None:
    vis_batch = input_pipeline.make_vis_batch(
        config.input, patch_size=p, seed=config.seed,
        num_images=config.get('vis_images', 8), views=views)
    vis_batch = {k: vis_batch[k] for k in batch_shapes}
  return iter(ds.as_numpy_iterator()), vis_batch


def _knn_monitor(config, method, mesh):
  """The kNN monitor when `config.knn.data` is set (and the method has an
  encoder), else None."""
  if not (config.get('knn') or {}).get('data'):
    return None
  if method.encoder is None:
    logging.warning('config.knn is set but %s declares no encoder '
                    '(Method.encoder): no kNN monitor.', method.name)
    return None
  return hooks_lib.KnnMonitor(config, mesh)


def _open_workdir(config, workdir: str, start_step: int, changed: list):
  """Creates the workdir's files: (writer, progress writer). The config
  goes into config.json (the one before a resume with changes is kept as
  config.<step>.json) and the hparams of the events file."""
  is_main = jax.process_index() == 0
  if is_main and '://' not in workdir:
    os.makedirs(workdir, exist_ok=True)
  writer, progress_writer = metrics_lib.make_writer(
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
  return writer, progress_writer


def _compiled_step(config, model, mesh, shardings, schedule, state,
                   batch_shapes, frozen):
  """(the train step compiled ahead of time, FLOPs per step). A config
  that is already unrolled (`unrolled_config`: no scan, remat or
  accumulation) takes its FLOP count from the very lowering it compiles;
  others lower the unrolled step once more, for the count only."""
  step = steps.jit_train_step(config, model, experiment.build_loss(config),
                              schedule, mesh, shardings)
  data_sh = sharding.data_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sh)
           for k, v in batch_shapes.items()}
  lowered = step.lower(state, batch, frozen)
  if config_lib.flat_json(unrolled_config(config)) == config_lib.flat_json(
      config):
    flops = float(lowered.cost_analysis()['flops'])
  else:
    flops = step_flops(config, mesh)
  return lowered.compile(), flops


def _take_lock(workdir: str) -> runlock.RunLock:
  """The workdir's run lock, taken by process 0; every process raises
  `runlock.WorkdirBusyError` when it is refused."""
  lock = runlock.RunLock(workdir, enabled=jax.process_index() == 0)
  refused = None
  try:
    lock.acquire()
  except runlock.WorkdirBusyError as e:
    refused = e
  if jax.process_count() > 1:
    ok = multihost_utils.broadcast_one_to_all(np.int32(refused is None))
    if not ok and refused is None:
      refused = runlock.WorkdirBusyError(
          f'{workdir} is in use by another run (process 0 could not take '
          'its run lock; its log names the owner).')
  if refused is not None:
    raise refused
  return lock


def _remove_if_empty(workdir: str) -> None:
  """Removes `workdir` if it holds nothing (a setup that failed after the
  lock made it)."""
  if jax.process_index() == 0 and tf.io.gfile.isdir(workdir) and (
      not tf.io.gfile.listdir(workdir)):
    tf.io.gfile.rmtree(workdir)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Checks and builds everything a training run needs, holding the
  workdir's run lock (`mim_jax.runlock`: a second run on the workdir stops
  at once, naming the owner).

  In order: the config; the lock; the workdir's newest checkpoint
  (resume); the data sources (evaluation and kNN sets included), frozen
  target weights and `init_from` weights; the state; only then the
  workdir's files (checkpoints/, config.json, events, metrics); then the
  FLOP count and the jitted step. A setup that fails releases the lock and
  leaves the workdir as it found it.

  Raises:
    errors.UserError subclasses for bad input (config, data, files, a busy
    workdir), before anything is written.
  """
  if config.get('eval_only'):
    raise errors.ConfigError('config.eval_only is set: use train.evaluate '
                             '(the CLI does).')
  mesh = _checked_mesh(config)
  existed = tf.io.gfile.exists(workdir)
  lock = _take_lock(workdir)
  try:
    return _build(config, workdir, mesh, lock)
  except BaseException:
    lock.release()
    if not existed:
      _remove_if_empty(workdir)
    raise


def _evaluator(config, method, model, mesh, workdir, save_best=True):
  """The evaluation passes when the method has eval metrics and the config
  an eval set (its data opened and checked now), else None."""
  if method.labelled is None or not config.get('eval'):
    return None
  return hooks_lib.Evaluator(config, method, model, mesh, workdir,
                             save_best=save_best)


def _build(config, workdir: str, mesh, lock) -> Run:
  """`setup` after the config check, under the lock."""
  # The schedule spans total_steps; stop_after_steps ends this run earlier
  # (rerun without it to continue the same schedule).
  total_steps = optim.steps_from(config, 'total')
  end_step = min(total_steps, config.get('stop_after_steps') or total_steps)
  method = experiment.method_of(config)
  model = method.build_model(config)
  batch_shapes = experiment.batch_spec(config)
  resumed = _resume(config, workdir, model, mesh, batch_shapes)
  batches, vis_batch = _train_data(config, method, batch_shapes,
                                   resumed.step)
  evaluator = _evaluator(config, method, model, mesh, workdir)
  knn_monitor = _knn_monitor(config, method, mesh)
  frozen = experiment.frozen_targets(config, mesh)
  if resumed.state is None:
    state, shardings, schedule = _initial_state(config, model, mesh,
                                                batch_shapes)
  else:
    state, (shardings, schedule) = resumed.state, resumed.made
  # Everything is checked: from here on the workdir is written.
  writer, progress_writer = _open_workdir(config, workdir, resumed.step,
                                          resumed.changed)
  train_step, flops = _compiled_step(config, model, mesh, shardings,
                                     schedule, state, batch_shapes, frozen)
  peak = peak_tflops_of(config)
  logging.info('%.4g GFLOPs per step (%.4g per image); chip peak %s '
               'TFLOP/s.', flops / 1e9, flops / config.input.batch_size / 1e9,
               peak)
  vis = (None if vis_batch is None
         else (steps.make_forward(
             model, mesh, image_input=images.ImageInput.from_config(config)),
               vis_batch))
  return Run(config=config, workdir=workdir, mesh=mesh, method=method,
             model=model, state=state, state_shardings=shardings,
             frozen=frozen, train_step=train_step, batches=batches,
             batch_shapes=batch_shapes, start_step=resumed.step,
             end_step=end_step, mgr=resumed.mgr or _manager(config, workdir),
             writer=writer, progress_writer=progress_writer, flops=flops,
             peak=peak, lock=lock, evaluator=evaluator,
             knn_monitor=knn_monitor, vis=vis)


def default_hooks(run: Run, stop: signals.StopSignals) -> list:
  """The hooks of a training run, in their order (see `mim_jax.hooks`):
  the checkpoint of a step is written before anything else reads it."""
  config, end = run.config, run.end_step
  out = [hooks_lib.Heartbeat(run.lock), hooks_lib.MetricsLogger(
      config, run.writer,
      run.progress_writer if jax.process_index() == 0 else None,
      end_step=end, flops=run.flops, peak=run.peak),
         hooks_lib.Checkpointer(config, run.mgr, nonfinite.names(run.state),
                                end_step=end, stop=stop, writer=run.writer)]
  if run.vis is not None:
    out.append(hooks_lib.Figures(config, run.method, *run.vis, run.workdir,
                                 run.writer, end_step=end))
  if run.evaluator is not None:
    every = config.eval.get('every_steps') or 0
    out.append(hooks_lib.Periodic(
        lambda step, state: run.evaluator(state, step, run.writer), every,
        end_step=end))
  if run.knn_monitor is not None:
    every = config.knn.get('every_steps') or config.log_every_steps
    out.append(hooks_lib.Periodic(
        lambda step, state: run.knn_monitor(state.params, step, run.writer),
        every, end_step=end))
  return out


def _next_batch(it):
  """The next host batch; a bad image file met with
  input.bad_images='error' becomes one line naming it."""
  try:
    return next(it)
  except tf.errors.OpError as e:
    found = image_check.ERROR.search(e.message)
    if not found:
      raise
    raise errors.DataError(found.group(0)) from None


def _step_batch(local: dict, batch_shapes: dict) -> dict:
  """The arrays of host batch `local` that the step takes, checked
  against the global `batch_shapes` (host rows: a process's share).

  Raises:
    errors.DataError: naming the array, what it is and what is expected.
  """
  out = {}
  count = jax.process_count()
  for k, spec in batch_shapes.items():
    if k not in local:
      raise errors.DataError(
          f'the input pipeline gave no {k!r} (it gave {sorted(local)}); '
          f'the step expects {k!r} {np.dtype(spec.dtype).name} '
          f'{spec.shape} (batch_spec).')
    v = np.asarray(local[k])
    want = (spec.shape[0] // count, *spec.shape[1:])
    if v.shape != want or v.dtype != spec.dtype:
      raise errors.DataError(
          f'batch[{k!r}] is {v.dtype.name} {v.shape}; the step expects '
          f'{np.dtype(spec.dtype).name} {want} per host (batch_spec; images '
          'are uint8 pixels, normalised on the devices).')
    out[k] = v
  return out


# Errors that end a run on purpose: no rescue save (a stop has saved; a
# non-finite state or a failing save must not be saved; a run whose lock
# was taken over no longer owns the checkpoints).
_NO_RESCUE = (signals.Stopped, nonfinite.NonFiniteError,
              checkpoint.CheckpointSaveError, runlock.WorkdirBusyError)


def _run_hooks(hooks: Sequence[hooks_lib.Hook], step: int, state,
               info: hooks_lib.StepInfo) -> bool:
  """Calls each hook; True when one ends the loop. When a hook fails, the
  checkpointer saves the step first (no hook failure loses training)."""
  stop = False
  for hook in hooks:
    try:
      stop |= bool(hook(step, state, info))
    except _NO_RESCUE:
      raise
    except Exception:
      for h in hooks:
        if isinstance(h, hooks_lib.Checkpointer) and h is not hook:
          h.rescue(step, state)
      raise
  return stop


def loop(run: Run, hooks: Sequence[hooks_lib.Hook]):
  """Trains `run` from its start step to its end step (or a preemption),
  calling the hooks after every step.

  Returns:
    The final TrainState.
  """
  state, step = run.state, run.start_step
  data_sh = sharding.data_sharding(run.mesh)
  logging.info('Training steps %d..%d, host batch %d, mesh %s.', step,
               run.end_step, run.config.input.batch_size // jax.process_count(),
               dict(run.mesh.shape))
  while step < run.end_step:
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      local = _next_batch(run.batches)
      batch = sharding.to_global(_step_batch(local, run.batch_shapes),
                                 data_sh)
      state, metrics = run.train_step(state, batch, run.frozen)
    step += 1
    bad = local.get(input_pipeline.BAD_KEY)
    info = hooks_lib.StepInfo(
        metrics, None if bad is None else int(np.sum(bad)))
    if _run_hooks(hooks, step, state, info):
      break
  for hook in hooks:
    hook.end(step, state)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains (resuming from `workdir` if it has checkpoints): `setup`, then
  `loop` with `default_hooks`. Fine-tuning and probes also evaluate on
  `config.eval` every `eval.every_steps` and at the end, keeping the best
  state in workdir/best/.

  Returns:
    The final TrainState.
  """
  # A stop signal during setup (compiling can take minutes) is kept: the
  # first step then saves and stops.
  with signals.StopSignals(enabled=jax.process_count() == 1) as stop:
    run = setup(config, workdir)
    try:
      state = loop(run, default_hooks(run, stop))
    except checkpoint.CheckpointSaveError:
      run.close(wait=False)
      raise
    except BaseException:
      run.close()
      raise
  run.close()
  return state


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The evaluation-only entry point (`config.eval_only`): evaluates the
  model of `config.init_from` on `config.eval` once, logs eval/* into
  `workdir` (metrics.jsonl, best.json) and returns the row."""
  if not config.get('init_from'):
    raise errors.ConfigError(
        'eval_only evaluates the model of config.init_from: set '
        '--config.init_from to a workdir or a .pth/.safetensors file.')
  method = experiment.method_of(config)
  if method.labelled is None or not config.get('eval'):
    raise errors.ConfigError(
        f'eval_only: method {method.name!r} with this config has no '
        'evaluation (config.eval); use a fine-tuning or probe config.')
  mesh = _checked_mesh(config)
  model = method.build_model(config)
  evaluator = _evaluator(config, method, model, mesh, workdir,
                         save_best=False)
  state, _, _ = _initial_state(config, model, mesh,
                               experiment.batch_spec(config))
  lock = _take_lock(workdir)
  try:
    writer, _ = _open_workdir(config, workdir, 0, [])
    row = evaluator(state, 0, writer)
    writer.flush()
  finally:
    lock.release()
  return row

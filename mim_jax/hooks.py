"""The periodic work of a training run, one hook per job.

`train.loop` runs the train step and then, after every step, each hook in
the order `train.default_hooks` gives:

0. `Heartbeat`: keeps the workdir's run lock fresh.
1. `MetricsLogger`: the train/* means of each log interval, throughput and
   MFU, progress.
2. `Checkpointer`: the non-finite guard's host half, periodic and final
   saves, stop signals and preemption. Every rule about when a state may
   be saved is here. It runs before the hooks below, so the checkpoint of
   a step is written before anything else reads that step's state, and
   `train.loop` saves at once if any later hook fails: no hook failure can
   lose training.
3. `Figures`: reconstruction figures (methods that predict pixels).
4. `Evaluation`: evaluation passes and the best checkpoint (fine-tuning,
   probes).
5. `Knn`: the kNN representation monitor (pretraining).

A hook is called as `hook(step, state, info)` after the step `step` (the
state after it, `info` the step's device metrics and host counts) and may
return True to end the loop after this step (preemption); `end(step,
state)` runs once after the last step.
"""

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import logging
from clu import periodic_actions

from mim_jax import checkpoint
from mim_jax import errors
from mim_jax import images
from mim_jax import input_pipeline
from mim_jax import knn
from mim_jax import nonfinite
from mim_jax import runlock
from mim_jax import sharding
from mim_jax import signals
from mim_jax import steps
from mim_jax import visualize


@dataclasses.dataclass
class StepInfo:
  """What the loop knows about a step besides the state: the step's
  metrics (device arrays) and the bad image files its batch skipped (None
  for sources without files)."""
  metrics: dict
  bad_images: Optional[int] = None


class Hook:
  """Base: a hook does nothing unless it overrides these."""

  def __call__(self, step: int, state, info: StepInfo) -> Optional[bool]:
    """After step `step`; True ends the loop after it."""
    del step, state, info
    return None

  def end(self, step: int, state) -> None:
    """Once, after the last step."""
    del step, state


def _due(step: int, every: int, end_step: int) -> bool:
  """Periodic work runs every `every` steps (never with 0) and at the end."""
  return bool(every and step % every == 0) or step == end_step


def train_row(stacked: list[dict]) -> dict:
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


class MetricsLogger(Hook):
  """Writes the means of every `config.log_every_steps` steps (and of the
  last ones), images and steps per second, TFLOP/s per device and the MFU
  (with a known chip peak), and reports progress."""

  def __init__(self, config, writer, progress_writer, *, end_step: int,
               flops: float, peak: Optional[float]):
    self.every, self.end_step = config.log_every_steps, end_step
    self.batch_size = config.input.batch_size
    self.writer, self.flops, self.peak = writer, flops, peak
    self.progress = periodic_actions.ReportProgress(
        num_train_steps=end_step, writer=progress_writer,
        every_steps=self.every)
    self._reset()

  def _reset(self):
    self.pending, self.t0, self.bad_images = [], time.time(), None

  def __call__(self, step, state, info):
    self.pending.append(info.metrics)
    if info.bad_images is not None:
      self.bad_images = (self.bad_images or 0) + info.bad_images
    self.progress(step)
    if not _due(step, self.every, self.end_step):
      return
    n = len(self.pending)
    row = train_row(jax.device_get(self.pending))
    if self.bad_images is not None:
      row['train/bad_images'] = float(self.bad_images)
    dt = time.time() - self.t0
    row['train/images_per_sec'] = n * self.batch_size / dt
    row['train/steps_per_sec'] = n / dt
    tflops = self.flops * n / dt / jax.device_count() / 1e12
    row['train/tflops_per_device'] = tflops
    if self.peak:
      row['train/mfu'] = tflops / self.peak
    self.writer.write_scalars(step, row)
    logging.info('step %d: %s', step,
                 ', '.join(f'{k}={v:.4g}' for k, v in row.items()))
    self._reset()

  def end(self, step, state):
    self.writer.flush()


class Checkpointer(Hook):
  """When a state is saved, in one place:

  - every `config.ckpt_every_steps` steps, and at the last step;
  - never a state past a step the non-finite guard would stop at (its
    queued flags are settled first), and no periodic save right after a
    skipped step (the state is finite, but a save would rotate out older
    checkpoints for no progress);
  - on a stop signal (SIGTERM / SIGINT): save, wait for the save, raise
    `signals.Stopped`;
  - on a preemption notice (multi-host): save, wait, end the loop;
  - when a later hook fails (`rescue`): save the step it failed on.

  A failed asynchronous save surfaces after the next step
  (`checkpoint.check_saves`).
  """

  def __init__(self, config, mgr, state_names, *, end_step: int,
               stop: signals.StopSignals, writer):
    self.mgr, self.every, self.end_step = (mgr, config.ckpt_every_steps,
                                           end_step)
    self.stop, self.writer = stop, writer
    self.nonfinite = nonfinite.Monitor(
        config.get('nonfinite', 'skip'),
        config.get('max_consecutive_skips', 10), state_names,
        mgr.latest_step)

  def _save(self, step: int, state, force: bool) -> None:
    self.nonfinite.settle()  # never save past a step it would stop at
    if self.nonfinite.consecutive and not force:
      logging.warning('Step %d: no checkpoint right after a skipped step; '
                      'the newest stays step %s.', step,
                      self.mgr.latest_step())
      return
    checkpoint.save(self.mgr, step, state, self.every, force=force)

  def __call__(self, step, state, info):
    self.nonfinite.observe(step, info.metrics)
    checkpoint.check_saves(self.mgr)
    stopping = self.stop.received is not None
    last = step == self.end_step
    if stopping or last or step % self.every == 0:
      self._save(step, state, force=stopping or last)
    if stopping:
      self._wait()
      self.writer.flush()
      message = (f'{self.stop.name} at step {step}: checkpoint saved in '
                 f'{self.mgr.directory}; rerun with the same --workdir to '
                 f'resume (exit status {signals.EXIT_STOPPED}).')
      logging.warning(message)
      raise signals.Stopped(message)
    if self.mgr.reached_preemption(step):
      if self.mgr.latest_step() != step:  # not saved above
        checkpoint.save(self.mgr, step, state, 1, force=True)
      self.mgr.wait_until_finished()
      logging.warning('Preempted at step %d; checkpoint saved.', step)
      return True
    return None

  def _wait(self):
    self.mgr.wait_until_finished()
    checkpoint.check_saves(self.mgr)

  def rescue(self, step: int, state) -> None:
    """Saves `step` (unless saved already) and waits: a later hook failed
    on it. The non-finite rule still holds: its flags are settled first."""
    if self.mgr.latest_step() != step:
      self.nonfinite.settle()
      logging.warning('A hook failed after step %d; saving that step first.',
                      step)
      checkpoint.save(self.mgr, step, state, 1, force=True)
    self._wait()

  def end(self, step, state):
    self.nonfinite.settle()
    self._wait()


class Figures(Hook):
  """Writes recon_<step>.png (original | masked | recon | recon+visible)
  every `config.vis_every_steps` steps and at the end; stops for configs
  that predict no pixels (token targets)."""

  def __init__(self, config, method, forward, batch, workdir, writer, *,
               end_step: int):
    self.config, self.method, self.forward = config, method, forward
    self.batch, self.workdir, self.writer = batch, workdir, writer
    self.every, self.end_step = config.vis_every_steps, end_step
    self.active = True

  def __call__(self, step, state, info):
    if not (self.active and _due(step, self.every, self.end_step)):
      return
    grid = visualize.render(self.method, self.config, self.forward,
                            state.params, self.batch)
    if grid is None:
      logging.info('No reconstruction images: this %s config predicts no '
                   'pixels.', self.method.name)
      self.active = False
      return
    if jax.process_index() == 0:
      visualize.save_png(grid, os.path.join(self.workdir,
                                            f'recon_{step:07d}.png'))
      self.writer.write_images(step, {'reconstruction': grid[None]})


class Heartbeat(Hook):
  """Refreshes the workdir's run lock (`runlock.RunLock.heartbeat`, which
  writes at most every few seconds). If another run has taken the lock
  over, it raises `runlock.WorkdirBusyError` and the run stops without
  saving: the checkpoints now belong to the other run."""

  def __init__(self, lock: runlock.RunLock):
    self.lock = lock

  def __call__(self, step, state, info):
    self.lock.heartbeat(step)


class Periodic(Hook):
  """`action(step, state)` every `every` steps (0: only at the end) and at
  the last step."""

  def __init__(self, action: Callable[[int, Any], Any], every: int, *,
               end_step: int):
    self.action, self.every, self.end_step = action, every, end_step

  def __call__(self, step, state, info):
    if _due(step, self.every, self.end_step):
      self.action(step, state)


class Evaluator:
  """Evaluation passes over a labelled split, and the best checkpoint.

  Opens the split when built (a missing split or data set fails before
  anything compiles), runs the task's `LabelledTask.eval_metrics` over
  every example
  once (padding excluded), and keeps the state of the best
  `config.eval.best_metric` in workdir/best/ (its value in best.json, so a
  resumed run goes on comparing with it; `save_best=False` for
  evaluation-only runs).
  """

  def __init__(self, config, method, model, mesh, workdir: str,
               save_best: bool = True):
    ec = config.eval
    self.workdir, self.save_best = workdir, save_best
    self.ds, self.num_batches, self.num_examples = (
        input_pipeline.make_eval_dataset(
            config.input, data=ec.get('data'),
            split=ec.get('split'), batch_size=ec.batch_size,
            crop_pct=ec.get('crop_pct', 0.875),
            bad_images=ec.get('bad_images', 'error'),
            bad_images_field='eval.bad_images', data_field='eval.data'))
    self.model, self.mesh = model, mesh
    self.image_input = images.ImageInput.from_config(config)
    self.metrics_fn = method.labelled.eval_metrics
    self.step_fn = None  # jitted at the first pass, for the state's shardings
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
    if self.step_fn is None:
      shardings = jax.tree.map(lambda x: x.sharding,
                               {'params': params, 'model_state': model_state})
      self.step_fn = steps.make_eval_step(
          self.model, self.metrics_fn, self.mesh, shardings['params'],
          shardings['model_state'], image_input=self.image_input)
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
      raise errors.ConfigError(
          f'eval.best_metric={self.best_metric!r} is not an evaluation '
          f'metric ({sorted(row)}).')
    writer.write_scalars(step, row)
    logging.info('eval at step %d on %d examples: %s', step,
                 self.num_examples,
                 ', '.join(f'{k}={v:.4g}' for k, v in row.items()))
    if self.best is None or row[key] > self.best['value']:
      self._keep_best(state, step, key, row[key])
    row[f'eval/best_{self.best_metric}'] = self.best['value']
    return row

  def _keep_best(self, state, step: int, key: str, value: float) -> None:
    self.best = {'step': step, 'metric': key, 'value': value}
    if self.save_best:
      if self.best_mgr is None:
        self.best_mgr = checkpoint.make_manager(
            self.workdir, keep=1, async_save=False, subdir='best')
      checkpoint.save(self.best_mgr, step, state, 1, force=True)
    if jax.process_index() == 0:
      with tf.io.gfile.GFile(self.best_path, 'w') as f:
        json.dump(self.best, f)


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
        crop_pct=kc.get('crop_pct', 1.0),
        bad_images=kc.get('bad_images', 'error'),
        bad_images_field='knn.bad_images', data_field='knn.data')[0]
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

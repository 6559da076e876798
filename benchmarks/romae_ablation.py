r"""Robust MAE ablation on real labelled data: each switch alone, all three,
and plain MAE, 3 seeds each, read out by a linear probe and fine-tuning.

  python benchmarks/romae_ablation.py [--seeds=0,1,2]
      [--workdir=/tmp/mim_jax_romae] [--runs=mae,attn_drop,...]
  python benchmarks/romae_ablation.py --smoke   # the tests: seconds

`--smoke`: digits_eval's smoke settings (seed 0, 2 steps per run, no kNN,
a fresh temporary --workdir unless given), the run 'all' alone (every
switch) pretrained and read out by `test_recon_mse` on 8 test digits, no
probe / fine-tune (digits_eval --smoke runs those), one timing round of 1
step.

Data and protocol: the digits setup of benchmarks/digits_eval.py (the
scikit-learn handwritten digits, 899 train / 898 test, 32 px; pretraining
on the train split without labels, then configs/linprobe_mae_tiny.py and
configs/finetune_mae_tiny.py from the pretrained encoder, top-1 on the
test split). Every run has the same model (the mae_tiny one: 4 blocks,
width 64, patch 4, 64 patches), steps, batch and seeds; only the switch
differs. The switches take the values of configs/romae_tiny.py
(`mae.config.robust`):

  mae         plain MAE (norm-pix targets)
  attn_drop   decoder attention-probability dropout 0.3
  pop_stats   running per-channel population statistics before norm-pix
  insert      encoder mask tokens for 25% of the patches before block 2
  all         the three together (= configs/romae_tiny.py)
  enc_drop    (not in the default list) attention dropout 0.3 in the
              encoder as well as the decoder

Reported per run, mean +- std over the seeds:
- `train_loss`: the last logged pretraining loss (each run's own target:
  population statistics change the target, so compare within a column);
- `test_recon_mse`: one common reconstruction metric, the per-value MSE in
  the input's normalised pixel space over the masked patches of 256 test
  digits (fixed masks), after mapping each run's predictions back to pixels
  (its `to_pixels`, with its checkpointed running statistics);
- `linear_probe` and `finetune`: final test top-1;
- cost: train-step time (the pretraining step on one synthetic batch,
  timed in this process, alternating the runs) and XLA's FLOPs per step.

Prints a markdown table, then (last line) one JSON object. Finished
workdirs are reused, so an interrupted run continues where it stopped.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,g-bad-import-order
import numpy as np
from absl import logging

import digits_eval  # the digits protocol and its flags
import train_step_bench
from mim_jax import images
from mim_jax import input_pipeline
from mim_jax import methods
from mim_jax import train
from mim_jax import weights
from mim_jax.methods.mae import config as mae_recipe
from mim_jax.models import layers
from mim_jax.models import vit
from mim_jax.targets import pixels
from mim_jax.tools import plan
# pylint: enable=g-import-not-at-top,g-bad-import-order

RUNS = ('mae', 'attn_drop', 'pop_stats', 'insert', 'all')
EXTRA_RUNS = ('enc_drop',)
# The romae_tiny insertion point (configs/romae_tiny.py).
INSERT_BLOCK = 2

flags.DEFINE_string('runs', ','.join(RUNS),
                    f'Comma-separated runs, of {RUNS + EXTRA_RUNS}.')
flags.DEFINE_integer('recon_images', 256, 'Test digits for test_recon_mse.')
flags.DEFINE_integer('time_steps', 30, 'Timed train steps per round.')
flags.DEFINE_integer('time_rounds', 3, 'Alternating timing rounds.')
FLAGS = flags.FLAGS
FLAGS.set_default('workdir', '/tmp/mim_jax_romae')
# Shorter than digits_eval's 2000 / 600 / 600, so 5 runs x 3 seeds fit in
# about an hour on 2 CPU cores; the same for every run.
FLAGS.set_default('pretrain_steps', 1000)
FLAGS.set_default('probe_steps', 300)
FLAGS.set_default('finetune_steps', 300)


def run_config(run: str, seed: int):
  """digits_eval's pretraining config with the run's switch."""
  c = digits_eval.pretrain_config(seed)
  robust = mae_recipe.robust(c.copy_and_resolve_references(),
                             insert_block=INSERT_BLOCK)
  if run in ('attn_drop', 'all', 'enc_drop'):
    c.model.decoder_attn_drop = robust.model.decoder_attn_drop
  if run == 'enc_drop':
    c.model.encoder_attn_drop = robust.model.decoder_attn_drop
  if run in ('pop_stats', 'all'):
    for k in ('pop_norm', 'pop_axis', 'pop_momentum'):
      c.loss[k] = robust.loss[k]
  if run in ('insert', 'all'):
    c.model.insert_block = robust.model.insert_block
    c.model.insert_ratio = robust.model.insert_ratio
    c.loss.inserted_in_loss = robust.loss.inserted_in_loss
  elif run not in RUNS + EXTRA_RUNS:
    raise ValueError(f'unknown run {run!r}: use {RUNS + EXTRA_RUNS}.')
  return c


def last_loss(workdir: str) -> float:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if 'train/loss' in r][-1]['train/loss']


def test_recon_mse(config, workdir: str) -> float:
  """MSE in the normalised pixel space over the masked patches of the
  first `recon_images` test digits (masks fixed by the seed)."""
  method = methods.get('mae')
  model = method.build_model(config)
  state, _ = weights.state_from_workdir(config, model, workdir)
  inp = config.input.copy_and_resolve_references()
  inp.split = 'test'
  p = vit.patch_size_of(config.model)
  batch = input_pipeline.make_vis_batch(inp, patch_size=p, seed=0,
                                        num_images=FLAGS.recon_images)
  batch = images.model_batch({k: batch[k] for k in ('image', 'noise')},
                             images.ImageInput.from_config(config))
  batch = {k: np.asarray(v) for k, v in batch.items()}
  pred, out = model.apply({'params': state.params}, batch, train=False)
  if state.target_state:
    # The running statistics as of the last step (no batch folded in).
    mean, var = pixels.running_stats(state.target_state['population'],
                                     config.loss.pop_momentum)
    out = dict(out, pop_mean=np.asarray(mean),
               pop_std=np.sqrt(np.asarray(var) + config.loss.pop_eps))
  recon = method.to_pixels(config, pred, out, batch)
  target = layers.patchify(np.asarray(batch['image'], np.float64), p)
  mask = np.asarray(out['mask'])
  per_patch = ((recon - target) ** 2).mean(-1)
  return float((per_patch * mask).sum() / mask.sum())


def step_costs(runs) -> dict:
  """Per run: median train-step seconds over alternating rounds, and XLA's
  FLOPs of the step (the planner's count)."""
  times = {r: [] for r in runs}
  for _ in range(FLAGS.time_rounds):
    for r in runs:
      res = train_step_bench.time_train_step(run_config(r, 0),
                                             FLAGS.time_steps)
      times[r].append(res['step_sec'])
  out = {}
  for r in runs:
    flops = plan.plan(run_config(r, 0), 1)['flops_per_step']
    out[r] = {'step_sec': float(np.median(times[r])), 'flops': flops}
  base = out.get('mae')
  for r in runs:
    if base:
      out[r]['time_vs_mae'] = out[r]['step_sec'] / base['step_sec']
      out[r]['flops_vs_mae'] = out[r]['flops'] / base['flops']
  return out


def mean_std(values) -> dict:
  return {'mean': float(np.mean(values)), 'std': float(np.std(values)),
          'values': [float(v) for v in values]}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  digits_eval.apply_smoke(runs='all', recon_images=8, time_steps=1,
                          time_rounds=1)
  seeds = [int(s) for s in FLAGS.seeds.split(',')]
  runs = FLAGS.runs.split(',')
  for r in runs:
    run_config(r, 0)  # unknown names fail before anything trains
  # --smoke leaves out the digits protocol's probes (digits_eval's smoke
  # run has them).
  tasks = () if FLAGS.smoke else (('linprobe', 'linear_probe'),
                                  ('finetune', 'finetune'))
  keys = ('train_loss', 'test_recon_mse') + tuple(k for _, k in tasks)
  results = {r: {k: [] for k in keys} for r in runs}
  t0 = time.time()
  for seed in seeds:
    for r in runs:
      base = os.path.join(digits_eval.workdir_root(), r, f'seed{seed}')
      pre_wd = os.path.join(base, 'pretrain')
      config = run_config(r, seed)
      train.train_and_evaluate(config, pre_wd)
      res = results[r]
      res['train_loss'].append(last_loss(pre_wd))
      res['test_recon_mse'].append(test_recon_mse(config, pre_wd))
      for task, key in tasks:
        wd = os.path.join(base, task)
        train.train_and_evaluate(digits_eval.task_config(task, seed, pre_wd),
                                 wd)
        res[key].append(digits_eval.final_eval(wd))
      print(f'seed {seed} {r}: ' + ', '.join(
          f'{k} {res[k][-1]:.4f}' for k in keys), flush=True)
  train_s = time.time() - t0
  costs = step_costs(runs)
  summary = {r: {k: mean_std(v) for k, v in results[r].items()}
             for r in runs}
  for r in runs:
    summary[r]['cost'] = costs[r]

  def pm(s, scale=100.0, digits=1):
    if s is None:  # not run (--smoke)
      return '-'
    return f'{scale * s["mean"]:.{digits}f} ± {scale * s["std"]:.{digits}f}'

  print('\n| run | pretrain loss (own target) | test recon MSE (pixels) | '
        'linear probe top-1 % | fine-tune top-1 % | step time vs MAE | '
        'FLOPs vs MAE |')
  print('|---|---|---|---|---|---|---|')
  for r in runs:
    s = summary[r]
    c = s['cost']
    print(f'| {r} | {pm(s["train_loss"], 1, 3)} | '
          f'{pm(s["test_recon_mse"], 1, 3)} | {pm(s.get("linear_probe"))} | '
          f'{pm(s.get("finetune"))} | {c.get("time_vs_mae", 1.0):.2f}× '
          f'({1000 * c["step_sec"]:.1f} ms) | '
          f'{c.get("flops_vs_mae", 1.0):.3f}× |')
  print(json.dumps(dict(
      runs=summary, seeds=seeds, seconds=dict(train=train_s,
                                              total=time.time() - t0),
      settings=dict(pretrain_steps=FLAGS.pretrain_steps,
                    probe_steps=FLAGS.probe_steps,
                    finetune_steps=FLAGS.finetune_steps,
                    insert_block=INSERT_BLOCK, recon_images=FLAGS.recon_images,
                    data='embedded:digits (899 train / 898 test, 32 px)'))))


if __name__ == '__main__':
  app.run(main)

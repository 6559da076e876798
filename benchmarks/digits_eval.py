r"""Does our pretraining learn? A tiny MAE, CAE or BootMAE on real
handwritten digits, then a linear probe and fine-tuning, against the same
encoder at random init.

  python benchmarks/digits_eval.py [--method=mae|cae|bootmae]
      [--seeds=0,1,2] [--workdir=/tmp/digits]
  python benchmarks/digits_eval.py --smoke   # the tests: seconds

`--smoke`: seed 0 only, 2 steps per run, no kNN monitor, no random-init
baselines (3 runs; they are the pretrained runs' code path without
init_from), accuracies meaningless. Finished workdirs are reused (each run
resumes from its last checkpoint), so a smoke run left in the default
--workdir would later pass for a finished real run: with --smoke the
default is a fresh temporary folder.

Data: scikit-learn's digits (1,797 real handwritten digits shipped inside
the package, 8x8 upsampled to 32 px), its usual fixed split (first half
train, second half test: `embedded:digits`, splits 'train' / 'test').
Pretraining sees the train images only, without labels. For each seed:

1. pretrain the method's tiny recipe (configs/<method>_tiny.py's model and
   losses: MAE norm-pix; CAE with pixel targets, no tokenizer; BootMAE with
   its momentum encoder) on the train split;
2. linear probe and fine-tune (the classifier's tiny recipes for that
   method's encoder, e.g. configs/linprobe_mae_tiny.py and
   configs/finetune_mae_tiny.py) from it, and from a randomly initialised
   encoder of the same shape;
3. read the final test top-1.

Prints a markdown table, then (last line) one JSON object:
{"linear_probe": {"pretrained": {"mean", "std"}, "random": {...}},
 "finetune": {...}, "seeds": [...], "runs": {...}, "settings": {...}}
with accuracies in [0, 1].
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,g-bad-import-order
import numpy as np
from absl import logging

import importlib

from mim_jax import train
from mim_jax.methods.classifier import config as task_recipe
# pylint: enable=g-import-not-at-top,g-bad-import-order

flags.DEFINE_enum('method', 'mae', ['mae', 'cae', 'bootmae'],
                  'The pretraining method (its tiny recipe).')
flags.DEFINE_string('seeds', '0,1,2', 'Comma-separated seeds.')
flags.DEFINE_string('workdir', None, 'Where runs go (default '
                    '/tmp/mim_jax_digits, /tmp/mim_jax_digits_<method> '
                    'for CAE and BootMAE).')
flags.DEFINE_integer('pretrain_steps', 2000, 'Pretraining steps.')
flags.DEFINE_integer('probe_steps', 600, 'Linear-probe steps.')
flags.DEFINE_integer('finetune_steps', 600, 'Fine-tuning steps.')
flags.DEFINE_bool('smoke', False, 'Tests: seed 0, 2 steps per run, no kNN, '
                  'no random-init runs (see the module docstring).')
FLAGS = flags.FLAGS
# What --smoke sets: one seed, every run two steps long.
SMOKE = dict(seeds='0', pretrain_steps=2, probe_steps=2, finetune_steps=2)


def apply_smoke(**more):
  """With --smoke, sets SMOKE and `more` on FLAGS (after parsing), and a
  fresh temporary --workdir unless one was given."""
  if not FLAGS.smoke:
    return
  for name, value in dict(SMOKE, **more).items():
    setattr(FLAGS, name, value)
  if not FLAGS['workdir'].present:
    FLAGS.workdir = tempfile.mkdtemp(prefix='mim_jax_smoke_')


def workdir_root() -> str:
  if FLAGS.workdir:
    return FLAGS.workdir
  suffix = '' if FLAGS.method == 'mae' else f'_{FLAGS.method}'
  return f'/tmp/mim_jax_digits{suffix}'


def pretrain_config(seed: int):
  """The method's tiny recipe on the digits' train split (no labels)."""
  recipe = importlib.import_module(f'mim_jax.methods.{FLAGS.method}.config')
  c = recipe.get_config('tiny')
  c.seed = seed
  c.input.data = 'embedded:digits'
  c.input.split = 'train'
  c.input.hflip = False           # digits are not mirror-symmetric
  c.input.crop_scale = (0.35, 1.0)
  c.input.batch_size = 64
  c.total_steps = FLAGS.pretrain_steps
  c.warmup_steps = FLAGS.pretrain_steps // 20
  c.log_every_steps = 100
  c.ckpt_every_steps = FLAGS.pretrain_steps
  c.vis_every_steps = FLAGS.pretrain_steps
  c.knn.every_steps = FLAGS.pretrain_steps // 4
  if FLAGS.smoke:
    c.knn.data = ''  # the monitor alone costs more than the smoke run
  return c


def task_config(task: str, seed: int, init_from):
  c = task_recipe.get_config(task, FLAGS.method, 'tiny')
  c.seed = seed
  c.init_from = init_from
  steps = FLAGS.probe_steps if task == 'linprobe' else FLAGS.finetune_steps
  c.total_steps = steps          # the configs' own length: 600
  c.warmup_steps = steps // 10
  c.eval.every_steps = steps
  c.ckpt_every_steps = steps
  return c


def final_eval(workdir: str) -> float:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if 'eval/top1' in r][-1]['eval/top1']


def knn_curve(workdir: str) -> list:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [(r['step'], r['knn/top1']) for r in rows if 'knn/top1' in r]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  apply_smoke()
  seeds = [int(s) for s in FLAGS.seeds.split(',')]
  inits = ('pretrained',) if FLAGS.smoke else ('pretrained', 'random')
  runs = {k: {init: [] for init in inits}
          for k in ('linear_probe', 'finetune')}
  knn = {}
  t0 = time.time()
  for seed in seeds:
    base = os.path.join(workdir_root(), f'seed{seed}')
    pre_wd = os.path.join(base, FLAGS.method)
    train.train_and_evaluate(pretrain_config(seed), pre_wd)
    knn[seed] = knn_curve(pre_wd)
    for task, key in (('linprobe', 'linear_probe'), ('finetune', 'finetune')):
      for init in inits:
        src = pre_wd if init == 'pretrained' else None
        wd = os.path.join(base, f'{task}_{init}')
        train.train_and_evaluate(task_config(task, seed, src), wd)
        acc = final_eval(wd)
        runs[key][init].append(acc)
        print(f'seed {seed} {task} {init}: top-1 {acc:.4f}', flush=True)

  summary = {k: {init: {'mean': float(np.mean(v)), 'std': float(np.std(v))}
                 for init, v in r.items()} for k, r in runs.items()}
  print(f'\n| protocol | pretrained ({FLAGS.method}) | random init |')
  print('|---|---|---|')

  def cell(s):
    if s is None:  # not run (--smoke)
      return '-'
    return f'{100 * s["mean"]:.1f} ± {100 * s["std"]:.1f}'

  for key, name in (('linear_probe', 'linear probe'),
                    ('finetune', 'fine-tune')):
    s = summary[key]
    print(f'| {name} | {cell(s["pretrained"])} | {cell(s.get("random"))} |')
  summary.update(
      method=FLAGS.method, seeds=seeds, runs=runs, knn_during_pretraining=knn,
      seconds=time.time() - t0,
      settings=dict(pretrain_steps=FLAGS.pretrain_steps,
                    probe_steps=FLAGS.probe_steps,
                    finetune_steps=FLAGS.finetune_steps,
                    data='embedded:digits (899 train / 898 test, 32 px)'))
  print(json.dumps(summary))


if __name__ == '__main__':
  app.run(main)

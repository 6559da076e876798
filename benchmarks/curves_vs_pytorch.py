r"""mim_jax against the official PyTorch MAE on the same recipe: whole loss
curves over seeds, and the loss at initialisation over seeds.

  python benchmarks/curves_vs_pytorch.py [--seeds=0,1,2]
      [--workdir=/tmp/mim_jax_curves] [--init_seeds=16]
      [--figure=benchmarks/results/curves_vs_pytorch.png]
      [--json=benchmarks/results/curves_vs_pytorch.json]

1. Curves: trains `configs/mae_curves_tiny.py` (the recipe of
   tests/fixtures/curves_mae_tiny/, 15 epochs, 480 steps) once per seed and
   compares the epoch means with the official code's 8 seeds
   (`mim_jax.tools.compare_curves`; sigma = the official seed std floored at
   its median over epochs >= 1). Goals: the mean mim_jax curve within 2
   sigma at every epoch >= 1, the final epoch within 0.5% of the official
   mean, and a mean signed deviation over epochs >= 1 within +-0.3 sigma.
   Finished workdirs are reused.
2. Initialisation: the loss of `--init_seeds` inits each, ours and the
   official one (`mim_jax.methods.mae.torch_init`, bit-exact against the
   fixture's state dict), on the same 4 batches through the same forward:
   mean, std, range and a two-sample KS test.

Prints a markdown summary, then (last line) one JSON object.
`--smoke`: one seed stopped after 1 epoch, 4 inits, no figure (the test
suite runs it so the script cannot rot).
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,g-bad-import-order
import numpy as np
from scipy import stats

from mim_jax import config_lib
from mim_jax import input_pipeline
from mim_jax import steps
from mim_jax import weights
from mim_jax.methods.mae import torch_init
from mim_jax.tools import compare_curves
# pylint: enable=g-import-not-at-top,g-bad-import-order

CONFIG = os.path.join(ROOT, 'configs', 'mae_curves_tiny.py')
REFERENCE = os.path.join(ROOT, 'tests', 'fixtures', 'curves_mae_tiny',
                         'curves.json')
GOALS = dict(max_abs_z=2.0, final_rel=0.005, mean_z=0.3)


def recipe():
  return config_lib.load_config_file(CONFIG)


def initial_losses(config, seeds, batches, official: bool) -> np.ndarray:
  """The mean loss over `batches` at initialisation, one per seed: our
  init (`steps.init_params`) or the official one (`torch_init`, loaded
  through its official key names), through the same forward and loss."""
  import jax  # pylint: disable=g-import-not-at-top
  model = steps.build_model(config)
  spec = steps.batch_spec(config)
  compute = jax.jit(steps.make_loss_fn(model, steps.build_loss(config)),
                    static_argnames='train')
  out = []
  for seed in seeds:
    if official:
      params = weights.from_torch(
          config, model, f'official init {seed}',
          state_dict=torch_init.official_init(config, seed))
    else:
      params = steps.init_params(model, spec, seed)
    out.append(float(np.mean([
        compute(params, b, jax.random.PRNGKey(0), train=False)[0]
        for b in batches])))
  return np.asarray(out)


def first_batches(config, n: int) -> list[dict]:
  """The first `n` training batches of seed 0 (crops, flips, masks)."""
  spec = steps.batch_spec(config)
  ds = input_pipeline.make_train_dataset(
      config.input, patch_size=4, seed=0, process_index=0, process_count=1)
  it = ds.as_numpy_iterator()
  return [{k: b[k] for k in spec} for b in (next(it) for _ in range(n))]


def init_distribution(num_seeds: int, num_batches: int = 4) -> dict:
  c = recipe()
  batches = first_batches(c, num_batches)
  ours = initial_losses(c, range(num_seeds), batches, official=False)
  theirs = initial_losses(c, range(1000, 1000 + num_seeds), batches,
                          official=True)

  def summary(x):
    return dict(mean=float(x.mean()), std=float(x.std(ddof=1)),
                min=float(x.min()), max=float(x.max()),
                values=[float(v) for v in x])

  return dict(seeds=num_seeds, batches=num_batches, ours=summary(ours),
              official=summary(theirs),
              ks_pvalue=float(stats.ks_2samp(ours, theirs).pvalue),
              welch_pvalue=float(stats.ttest_ind(ours, theirs,
                                                 equal_var=False).pvalue))


def train_seed(seed: int, workdir: str, stop_after: int | None = None):
  """Trains one seed unless its workdir already finished."""
  from mim_jax import train  # pylint: disable=g-import-not-at-top
  c = recipe()
  c.seed = seed
  c.stop_after_steps = stop_after
  end = stop_after or 480
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics):
    with open(metrics) as f:
      if any(json.loads(line)['step'] == end for line in f if line.strip()):
        return
  train.train_and_evaluate(c, workdir)


def curves(seeds, root: str, figure: str | None,
           stop_after: int | None = None) -> dict:
  workdirs = []
  for s in seeds:
    workdirs.append(os.path.join(root, f'seed{s}'))
    train_seed(s, workdirs[-1], stop_after)
  report = compare_curves.run(workdirs, [REFERENCE], out=figure)
  late = [p for p in report['points'] if p['epoch'] >= 1]
  report['goals'] = dict(
      GOALS,
      within_2sigma=all(abs(p['z']) <= GOALS['max_abs_z'] for p in late),
      final_within=abs(report['final']['rel']) <= GOALS['final_rel'],
      no_bias=abs(report['mean_z'] or 0.0) <= GOALS['mean_z'])
  report['goals']['met'] = all(
      report['goals'][k] for k in ('within_2sigma', 'final_within',
                                   'no_bias'))
  # Per seed: each run's own mean signed deviation (how much one seed says).
  ref = {p['epoch']: (p['reference'], p['sigma']) for p in late}
  report['per_seed_mean_z'] = [
      float(np.mean([(p['ours_runs'][i] - ref[p['epoch']][0])
                     / ref[p['epoch']][1] for p in late]))
      for i in range(len(workdirs))]
  return report


def markdown(report: dict, init: dict) -> str:
  lines = ['| epoch | official mean | σ | mim_jax mean | deviation |',
           '|---|---|---|---|---|']
  for p in report['points']:
    lines.append(f'| {p["epoch"]} | {p["reference"]:.4f} | {p["sigma"]:.4f} '
                 f'| {p["ours"]:.4f} | {p["z"]:+.2f}σ |')
  lines.append('')
  lines.append(
      f'max |dev| (epochs ≥ 1) {report["max_abs_z"]:.2f}σ; mean signed dev '
      f'{report["mean_z"]:+.2f}σ; final {100 * report["final"]["rel"]:+.2f}%'
      f'; goals met: {report["goals"]["met"]}')
  lines.append(
      f'loss at init over {init["seeds"]} seeds: mim_jax '
      f'{init["ours"]["mean"]:.3f} ± {init["ours"]["std"]:.3f} '
      f'[{init["ours"]["min"]:.3f}, {init["ours"]["max"]:.3f}], official '
      f'{init["official"]["mean"]:.3f} ± {init["official"]["std"]:.3f} '
      f'[{init["official"]["min"]:.3f}, {init["official"]["max"]:.3f}], KS '
      f'p = {init["ks_pvalue"]:.2f}')
  return '\n'.join(lines)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  seeds = [int(s) for s in f.seeds.split(',')]
  stop_after = None
  if f.smoke:
    seeds, stop_after = seeds[:1], 32
  report = curves(seeds, f.workdir, None if f.smoke else f.figure,
                  stop_after)
  init = init_distribution(4 if f.smoke else f.init_seeds,
                           1 if f.smoke else 4)
  print(markdown(report, init))
  result = dict(curves={k: report[k] for k in (
      'ours', 'reference_seeds', 'sigma_floor', 'max_abs_z', 'mean_z',
      'max_abs_rel', 'mean_rel', 'final', 'lr_max_abs_rel', 'goals',
      'per_seed_mean_z')}, points=report['points'], init=init)
  if f.json and not f.smoke:
    os.makedirs(os.path.dirname(os.path.abspath(f.json)), exist_ok=True)
    with open(f.json, 'w') as fh:
      json.dump(result, fh, indent=1)
  print(json.dumps(result))


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('seeds', '0,1,2', 'mim_jax seeds.')
  flags.DEFINE_string('workdir', '/tmp/mim_jax_curves', 'Workdir root.')
  flags.DEFINE_integer('init_seeds', 16, 'Seeds of each init.')
  flags.DEFINE_string('figure', os.path.join(
      ROOT, 'benchmarks', 'results', 'curves_vs_pytorch.png'), 'PNG.')
  flags.DEFINE_string('json', os.path.join(
      ROOT, 'benchmarks', 'results', 'curves_vs_pytorch.json'), 'JSON.')
  flags.DEFINE_bool('smoke', False, 'Tiny run (tests).')
  app.run(main)

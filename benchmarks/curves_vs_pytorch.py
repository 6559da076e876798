r"""mim_jax against the official PyTorch code on the same recipe: whole loss
curves over seeds, loss term by loss term, the schedules step by step, and
the loss at initialisation over seeds. For MAE, CAE and BootMAE.

  python benchmarks/curves_vs_pytorch.py --method=mae|cae|bootmae
      [--seeds=0,1,2] [--workdir=/tmp/mim_jax_curves_<method>]
      [--init_seeds=16] [--figure=...png] [--json=...json]
      [--dtype=bfloat16]

1. Curves: trains `configs/<method>_curves_tiny.py` (the recipe of
   tests/fixtures/curves_<method>_tiny/, 15 epochs, 480 steps) once per seed
   and compares the epoch means of the total loss and of every term upstream
   logs (MAE: loss; CAE: loss_main, loss_align, mlm_acc; BootMAE:
   loss_pixel, loss_feature) with the official code's 8 seeds
   (`mim_jax.tools.compare_curves`; sigma = the official seed std floored at
   its median over epochs >= 1). Goals, per curve: the mean mim_jax curve
   within 2 sigma at every epoch >= 1, the final epoch within 0.5% of the
   official mean, and a mean signed deviation over epochs >= 1 within +-0.3
   sigma. Finished workdirs are reused.
2. Schedules: our logged lr (and BootMAE's EMA momentum and feature weight)
   at every step against upstream's (the reference's config.json).
3. Initialisation: the loss of `--init_seeds` inits each, ours and the
   official one (`mim_jax.methods.<method>.torch_init`, bit-exact against
   the parity fixture's state dict), on the same 4 batches through the same
   forward: mean, std, range and a two-sample KS test.

Prints a markdown summary, then (last line) one JSON object.
`--dtype`: the model's compute dtype (`config.model.dtype`; the recipe's
float32 by default), for the run, the init losses and the default names
(workdir /tmp/mim_jax_curves_<method>_<dtype>, results ..._<dtype>.json).
`--smoke`: one seed stopped after 1 epoch, 4 inits, no figure (the test
suite runs it so the script cannot rot).
"""

import importlib
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
from mim_jax import experiment
from mim_jax import images
from mim_jax import input_pipeline
from mim_jax import providers as providers_lib
from mim_jax import state as state_lib
from mim_jax import steps
from mim_jax import weights
from mim_jax.models import vit
from mim_jax.tools import compare_curves
# pylint: enable=g-import-not-at-top,g-bad-import-order

GOALS = dict(max_abs_z=2.0, final_rel=0.005, mean_z=0.3)
# method -> the curves each reference holds (the total loss first).
TERMS = {'mae': ('loss',),
         'cae': ('loss', 'loss_main', 'loss_align', 'mlm_acc'),
         'bootmae': ('loss', 'loss_pixel', 'loss_feature')}
# Our logged metric -> the reference config.json's per-step schedule.
SCHEDULES = {'train/lr': 'lr_per_step',
             'train/ema_momentum': 'momentum_per_step',
             'train/feature_weight': 'feature_weight_per_step'}
TOTAL_STEPS = 480


def config_path(method: str) -> str:
  return os.path.join(ROOT, 'configs', f'{method}_curves_tiny.py')


def reference_path(method: str) -> str:
  return os.path.join(ROOT, 'tests', 'fixtures', f'curves_{method}_tiny',
                      'curves.json')


def recipe(method: str = 'mae', dtype: str | None = None):
  """The method's curves recipe, in `dtype` when given."""
  c = config_lib.load_config_file(config_path(method))
  if dtype:
    c.model.dtype = dtype
  return c


def official_init(config, seed: int) -> dict:
  module = importlib.import_module(
      f'mim_jax.methods.{config.model_name}.torch_init')
  return module.official_init(config, seed)


def _targets(config, params) -> dict:
  """{provider: state} at initialisation (the EMA = the params' copy, a
  frozen tokenizer read from its file)."""
  return providers_lib.initial_states(experiment.providers_of(config),
                                      config, params)


def initial_losses(config, seeds, batches, official: bool) -> np.ndarray:
  """The mean loss over `batches` at initialisation, one per seed: our
  init (`state_lib.init_params` with the method's init rules) or the official
  one (`torch_init`, loaded through its official key names), through the
  same forward and loss in training mode (upstream's first step), with the
  target providers (momentum encoder, tokenizer) at their initial state."""
  import jax  # pylint: disable=g-import-not-at-top
  model = experiment.build_model(config)
  spec = experiment.batch_spec(config)
  providers = experiment.providers_of(config)
  loss_fn = steps.make_loss_fn(model, experiment.build_loss(config),
                               providers)
  image_input = images.ImageInput.from_config(config)
  compute = jax.jit(
      lambda params, b, *a, **kw: loss_fn(
          params, images.model_batch(b, image_input), *a, **kw),
      static_argnames='train')
  out = []
  for seed in seeds:
    if official:
      params = weights.from_torch(
          config, model, f'official init {seed}',
          state_dict=official_init(config, seed))
    else:
      params = state_lib.init_params(model, spec, seed,
                                 experiment.init_rules_of(config))
    targets = _targets(config, params)
    out.append(float(np.mean([
        compute(params, b, jax.random.PRNGKey(seed), train=True,
                targets=targets)[0] for b in batches])))
  return np.asarray(out)


def first_batches(config, n: int) -> list[dict]:
  """The first `n` training batches of seed 0 (crops, flips, masks, the
  method's extra views)."""
  from mim_jax import train  # pylint: disable=g-import-not-at-top
  spec = experiment.batch_spec(config)
  method = experiment.method_of(config)
  views = {k: v.size for k, v in method.views(config).items()}
  ds = input_pipeline.make_train_dataset(
      config.input, patch_size=vit.patch_size_of(config.model), seed=0,
      process_index=0, process_count=1, views=views,
      **train.pipeline_kind(method))
  it = ds.as_numpy_iterator()
  return [{k: b[k] for k in spec} for b in (next(it) for _ in range(n))]


def init_distribution(method: str, num_seeds: int,
                      num_batches: int = 4, dtype: str | None = None) -> dict:
  c = recipe(method, dtype)
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


def train_seed(method: str, seed: int, workdir: str,
               stop_after: int | None = None, dtype: str | None = None):
  """Trains one seed unless its workdir already finished."""
  from mim_jax import train  # pylint: disable=g-import-not-at-top
  c = recipe(method, dtype)
  c.seed = seed
  c.stop_after_steps = stop_after
  end = stop_after or TOTAL_STEPS
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics):
    with open(metrics) as f:
      if any(json.loads(line)['step'] == end for line in f if line.strip()):
        return
  train.train_and_evaluate(c, workdir)


def judge(report: dict) -> dict:
  """The goals of one curve's compare_curves report, added to it."""
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
      for i in range(len(report['ours']))]
  return report


def figure_for(figure: str | None, term: str) -> str | None:
  """The total loss's figure is `figure`; each term's sits next to it."""
  if not figure or term == 'loss':
    return figure
  stem, ext = os.path.splitext(figure)
  return f'{stem}_{term}{ext}'


def curves(method: str, seeds, root: str, figure: str | None,
           stop_after: int | None = None, dtype: str | None = None) -> dict:
  """{term: judged compare_curves report} over the trained seeds."""
  workdirs = []
  for s in seeds:
    workdirs.append(os.path.join(root, f'seed{s}'))
    train_seed(method, s, workdirs[-1], stop_after, dtype)
  return {t: judge(compare_curves.run(
      workdirs, [reference_path(method)], out=figure_for(figure, t), term=t))
          for t in TERMS[method]}


def schedules(method: str, workdirs) -> dict:
  """Max |ours - upstream| / max |upstream| per schedule over every logged
  step (we log every step: row `step` = t + 1 holds step t's values)."""
  with open(os.path.join(os.path.dirname(reference_path(method)),
                         'config.json')) as f:
    sched = json.load(f)['schedule']
  out = {}
  for ours, theirs in SCHEDULES.items():
    if theirs not in sched:
      continue
    want = np.asarray(sched[theirs], np.float64)
    worst = 0.0
    for w in workdirs:
      with open(os.path.join(w, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f if line.strip()]
      got = {int(r['step']) - 1: r[ours] for r in rows if ours in r}
      idx = np.asarray(sorted(got))
      diff = np.abs(np.asarray([got[i] for i in idx]) - want[idx])
      worst = max(worst, float(diff.max() / np.abs(want).max()))
    out[theirs] = worst
  return out


def markdown(reports: dict, init: dict) -> str:
  lines = []
  for term, report in reports.items():
    lines += [f'{term}:', '',
              '| epoch | official mean | σ | mim_jax mean | deviation |',
              '|---|---|---|---|---|']
    for p in report['points']:
      lines.append(f'| {p["epoch"]} | {p["reference"]:.4f} | '
                   f'{p["sigma"]:.4f} | {p["ours"]:.4f} | {p["z"]:+.2f}σ |')
    lines.append('')
    lines.append(
        f'max |dev| (epochs ≥ 1) {report["max_abs_z"]:.2f}σ; mean signed '
        f'dev {report["mean_z"]:+.2f}σ; final '
        f'{100 * report["final"]["rel"]:+.2f}%; goals met: '
        f'{report["goals"]["met"]}')
    lines.append('')
  lines.append(
      f'loss at init over {init["seeds"]} seeds: mim_jax '
      f'{init["ours"]["mean"]:.3f} ± {init["ours"]["std"]:.3f} '
      f'[{init["ours"]["min"]:.3f}, {init["ours"]["max"]:.3f}], official '
      f'{init["official"]["mean"]:.3f} ± {init["official"]["std"]:.3f} '
      f'[{init["official"]["min"]:.3f}, {init["official"]["max"]:.3f}], KS '
      f'p = {init["ks_pvalue"]:.2f}')
  return '\n'.join(lines)


_SUMMARY = ('ours', 'reference_seeds', 'sigma_floor', 'max_abs_z', 'mean_z',
            'max_abs_rel', 'mean_rel', 'final', 'lr_max_abs_rel', 'goals',
            'per_seed_mean_z')


def result_of(method: str, reports: dict, scheds: dict, init: dict,
              dtype: str | None = None) -> dict:
  """The JSON: the total loss's report at the top level (`curves`,
  `points`), every curve's under `terms`, the schedules, the init."""
  summary = lambda r: {k: r[k] for k in _SUMMARY}
  return dict(
      method=method, dtype=dtype or 'float32',
      curves=summary(reports['loss']),
      points=reports['loss']['points'],
      terms={t: dict(curves=summary(r), points=r['points'])
             for t, r in reports.items()},
      schedules=scheds,
      goals_met=all(r['goals']['met'] for r in reports.values()),
      init=init)


# --dtype -> the suffix of the default names.
_DTYPE_SUFFIX = {None: '', 'float32': '', 'bfloat16': '_bf16',
                 'float16': '_fp16'}


def _default(name: str, method: str, ext: str,
             dtype: str | None = None) -> str:
  """benchmarks/results/curves_vs_pytorch[_<method>][_bf16].<ext> (MAE
  keeps the first name)."""
  if name:
    return name
  suffix = ('' if method == 'mae' else f'_{method}') + _DTYPE_SUFFIX[dtype]
  return os.path.join(ROOT, 'benchmarks', 'results',
                      f'curves_vs_pytorch{suffix}.{ext}')


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  seeds = [int(s) for s in f.seeds.split(',')]
  stop_after = None
  if f.smoke:
    seeds, stop_after = seeds[:1], 32
  workdir = f.workdir or '/tmp/mim_jax_curves_' + f.method + (
      f'_{f.dtype}' if f.dtype else '')
  figure = None if f.smoke else _default(f.figure, f.method, 'png', f.dtype)
  reports = curves(f.method, seeds, workdir, figure, stop_after, f.dtype)
  scheds = schedules(f.method, [os.path.join(workdir, f'seed{s}')
                                for s in seeds])
  init = init_distribution(f.method, 4 if f.smoke else f.init_seeds,
                           1 if f.smoke else 4, f.dtype)
  print(markdown(reports, init))
  result = result_of(f.method, reports, scheds, init, f.dtype)
  if not f.smoke:
    path = _default(f.json, f.method, 'json', f.dtype)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as fh:
      json.dump(result, fh, indent=1)
  print(json.dumps(result))


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum('method', 'mae', sorted(TERMS), 'The method.')
  flags.DEFINE_string('seeds', '0,1,2', 'mim_jax seeds.')
  flags.DEFINE_string('workdir', None,
                      'Workdir root (default /tmp/mim_jax_curves_<method>).')
  flags.DEFINE_integer('init_seeds', 16, 'Seeds of each init.')
  flags.DEFINE_string('figure', None, 'PNG of the total loss (default '
                      'benchmarks/results/curves_vs_pytorch[_<method>].png; '
                      'terms: <stem>_<term>.png).')
  flags.DEFINE_string('json', None, 'JSON (default next to the figure).')
  flags.DEFINE_bool('smoke', False, 'Tiny run (tests).')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16'],
                    'config.model.dtype (default: the recipe\'s float32).')
  app.run(main)

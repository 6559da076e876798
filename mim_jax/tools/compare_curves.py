r"""Compare training-loss curves: mim_jax runs against PyTorch reference runs.

  python -m mim_jax.tools.compare_curves --ours=/tmp/run_a --ours=/tmp/run_b \
      --reference=tests/fixtures/curves_mae_tiny/curves.json \
      --out=curves.png [--align=epoch|step] [--tolerance_sigma=3] \
      [--term=loss]

`--term` picks the curve: the total `loss` (default) or one logged loss term
(e.g. CAE's `loss_main`, `loss_align`, `mlm_acc`; BootMAE's `loss_pixel`,
`loss_feature`): ours `train/<term>`, a curves.json's `terms[<term>]`, a
log.txt's `train_<term>`, an mm log's `<term>`. A reference or workdir
without it is refused with the list of the terms it has.

Inputs (the format of each --reference is detected from its content):

* `--ours WORKDIR`: a mim_jax workdir, its `metrics.jsonl` (`train/loss`,
  `train/lr`; each row is the mean over the steps since the previous row)
  and `config.json` (steps per epoch = input.num_train_examples //
  input.batch_size, or `--steps_per_epoch`).
* the official MAE `log.txt` (one JSON object per epoch: `epoch`,
  `train_loss`, `train_lr`; the epoch means of upstream's
  `MetricLogger.global_avg`). Several logs are several seeds of one
  reference.
* mmpretrain / mmselfsup JSON logs: mmengine's `vis_data/scalars.json`
  (`loss`, `lr`, `epoch`, `iter`, `step`) or mmcv's `*.log.json` (`mode`,
  `epoch`, `iter` within the epoch, `loss`, `lr`). Epochs there are 1-based
  and are shifted to 0-based. Each row is the mean over its logging
  interval, so epoch means are means of the rows (equal intervals).
* mim_jax's reference format (`curves.json`, as in
  `tests/fixtures/curves_mae_tiny/`): per-epoch and per-step mean, std, min,
  max and every seed's value, over the official code's seeds.

Alignment: `epoch` compares epoch means (epoch e = 0-based steps
e*S .. (e+1)*S - 1, S steps per epoch: what upstream logs); `step` compares
the mean over each of our logging intervals with the reference's mean over
the same steps (needs per-step reference data: curves.json or mmpretrain).

The reference at each point is the mean over its seeds, and sigma their
sample standard deviation, floored (`--sigma_floor=median`, the default) at
the median sigma over the points from epoch 1 on: a std from a few seeds is
itself noisy. A point is outside tolerance when
|ours - reference| > tolerance_sigma * sigma, or, for a reference without
a spread (one seed), when the relative deviation exceeds `--tolerance_rel`.
"ours" is the mean over the --ours runs.

Output: a PNG (loss with the reference's mean line and +-sigma band, our
runs and their mean; the lr on a second axis, since a mismatched schedule is
the usual cause of a mismatched curve), and one JSON object on the last line
of stdout: every point's deviation (relative and in sigma), their max and
mean over the points from epoch 1 on, the final point, the lr mismatch and
the first point outside tolerance. Exit status 1 when any point from epoch 1
on is outside tolerance, 0 otherwise; 2 for bad input (a missing or unknown
log, a flag that does not fit it), printed as one line.
"""

import dataclasses
import json
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np

from mim_jax import errors

FORMATS = ('mim_jax metrics.jsonl (a workdir)', 'official MAE log.txt',
           'mmpretrain/mmengine scalars.json', 'mmselfsup/mmcv *.log.json',
           'mim_jax curves.json')


@dataclasses.dataclass
class Run:
  """One run's loss and lr, per epoch and per step interval.

  `steps` are 0-based exclusive ends of logging intervals: the value at
  `steps[i]` is the mean over steps steps[i-1] .. steps[i] - 1 (steps[-1]
  = 0 before the first). Epoch-only sources leave `steps` empty.
  """
  name: str
  epoch_loss: dict[int, float]
  epoch_lr: dict[int, float]
  steps: list[int] = dataclasses.field(default_factory=list)
  step_loss: list[float] = dataclasses.field(default_factory=list)
  step_lr: list[float] = dataclasses.field(default_factory=list)
  steps_per_epoch: Optional[int] = None


@dataclasses.dataclass
class Reference:
  """Seeds of a reference: per-seed epoch curves and per-step losses."""
  name: str
  seeds: list[Run]


def _read_jsonl(path: str) -> list[dict]:
  rows = []
  with open(path) as f:
    for i, line in enumerate(f):
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise errors.DataError(
            f'{path}: line {i + 1} is not JSON ({e}). Known formats: '
            f'{", ".join(FORMATS)}.') from None
  return rows


def _epoch_means(steps: Sequence[int], values: Sequence[float],
                 spe: int, name: str) -> dict[int, float]:
  """Epoch means from interval means (interval i = steps[i-1]..steps[i]-1),
  weighted by interval length; intervals must not straddle epochs."""
  sums, counts, prev = {}, {}, 0
  for end, v in zip(steps, values):
    span = end - prev
    if span <= 0:
      raise errors.DataError(f'{name}: logged steps do not increase '
                             f'({prev} then {end}).')
    epoch = prev // spe
    if (end - 1) // spe != epoch:
      raise errors.DataError(
          f'{name}: the logging interval of steps {prev}..{end - 1} spans '
          f'epochs {epoch} and {(end - 1) // spe} ({spe} steps per epoch), '
          'so its epoch means cannot be recovered. Log every k steps with k '
          'dividing the steps per epoch (--config.log_every_steps), or '
          'compare with --align=step.')
    sums[epoch] = sums.get(epoch, 0.0) + span * v
    counts[epoch] = counts.get(epoch, 0) + span
    prev = end
  # Only whole epochs: a partly logged last epoch is left out.
  return {e: sums[e] / counts[e] for e in sums if counts[e] == spe}


def steps_per_epoch_of(config: dict) -> Optional[int]:
  """input.num_train_examples // input.batch_size of a resolved config."""
  inp = config.get('input') or {}
  n, b = inp.get('num_train_examples'), inp.get('batch_size')
  if not n or not b:
    return None
  return int(n) // int(b)


def _no_term(path: str, term: str, found) -> errors.DataError:
  found = sorted(found)
  return errors.DataError(
      f'{path} has no term {term!r}; it has: '
      f'{", ".join(found) if found else "(none)"}. Pass one of these as '
      '--term.')


def read_ours(workdir: str, steps_per_epoch: Optional[int] = None,
              term: str = 'loss') -> Run:
  """A mim_jax workdir's training curve (metrics.jsonl + config.json) of
  `term` (`train/<term>`: the total 'loss' or a logged loss term).

  Raises:
    errors.MissingFileError: no such workdir.
    errors.DataError: no metrics.jsonl, or no train/<term> rows (the
      message lists the terms the workdir logs).
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(workdir):
    raise errors.MissingFileError(f'--ours {workdir!r} does not exist.')
  if not os.path.exists(path):
    raise errors.DataError(
        f'--ours {workdir!r} has no metrics.jsonl: give a mim_jax training '
        'workdir (python -m mim_jax.main --workdir=...); for a PyTorch log '
        'use --reference.')
  spe = steps_per_epoch
  cfg_path = os.path.join(workdir, 'config.json')
  if spe is None and os.path.exists(cfg_path):
    with open(cfg_path) as f:
      spe = steps_per_epoch_of(json.load(f))
  all_rows = _read_jsonl(path)
  key = f'train/{term}'
  rows = [r for r in all_rows if key in r]
  if not rows:
    raise _no_term(path, term, {k[len('train/'):] for r in all_rows
                                for k in r if k.startswith('train/')
                                and k != 'train/lr'})
  steps = [int(r['step']) for r in rows]
  loss = [float(r[key]) for r in rows]
  lr = [float(r.get('train/lr', math.nan)) for r in rows]
  run = Run(os.path.basename(os.path.normpath(workdir)), {}, {}, steps, loss,
            lr, spe)
  if spe:
    run.epoch_loss = _epoch_means(steps, loss, spe, path)
    run.epoch_lr = _epoch_means(steps, lr, spe, path)
  return run


def _official(path: str, rows: list[dict], term: str) -> Reference:
  key = f'train_{term}'
  if not any(key in r for r in rows):
    raise _no_term(path, term, {k[len('train_'):] for r in rows for k in r
                                if k.startswith('train_')
                                and k != 'train_lr'})
  loss = {int(r['epoch']): float(r[key]) for r in rows if key in r}
  lr = {int(r['epoch']): float(r.get('train_lr', math.nan)) for r in rows
        if key in r}
  return Reference(path, [Run(path, loss, lr)])


def _mm(path: str, rows: list[dict], steps_per_epoch: Optional[int],
        term: str) -> Reference:
  """mmengine scalars.json or mmcv log.json training rows."""
  train = [r for r in rows if term in r and r.get('mode', 'train') ==
           'train' and 'epoch' in r]
  if not train:
    if term != 'loss' and any('loss' in r for r in rows):
      raise _no_term(path, term, {k for r in rows for k in r
                                  if k.startswith('loss')})
    raise errors.DataError(f'{path}: no training rows with "loss" and '
                           '"epoch".')
  spe = steps_per_epoch
  if spe is None:
    # mmengine rows carry the global step and the iter within the epoch.
    later = [r for r in train if 'step' in r and int(r['epoch']) > 1]
    spe = ((int(later[0]['step']) - int(later[0]['iter']))
           // (int(later[0]['epoch']) - 1) if later
           else max(int(r['iter']) for r in train))
  ends = []
  for r in train:
    if 'step' in r:
      ends.append(int(r['step']))
    else:
      ends.append((int(r['epoch']) - 1) * spe + int(r['iter']))
  by_epoch_loss, by_epoch_lr = {}, {}
  for r in train:
    e = int(r['epoch']) - 1
    by_epoch_loss.setdefault(e, []).append(float(r[term]))
    by_epoch_lr.setdefault(e, []).append(float(r.get('lr', math.nan)))
  run = Run(path, {e: float(np.mean(v)) for e, v in by_epoch_loss.items()},
            {e: float(np.mean(v)) for e, v in by_epoch_lr.items()}, ends,
            [float(r[term]) for r in train],
            [float(r.get('lr', math.nan)) for r in train], spe)
  return Reference(path, [run])


def _curves_json(path: str, data: dict, term: str) -> Reference:
  """curves.json: the total loss at the top level, each logged term under
  'terms' in the same layout (the lr stays the top level's)."""
  spe = int(data['steps_per_epoch'])
  seeds = [str(s) for s in data['seeds']]
  lr_by_epoch = {int(e['epoch']): float(e.get('train_lr', math.nan))
                 for e in data['epochs']}
  if term != 'loss':
    terms = data.get('terms') or {}
    if term not in terms:
      raise _no_term(path, term, ['loss', *terms])
    data = terms[term]
  per_step = data.get('per_step') or {}
  # The per-step lr is in the recipe next to it (config.json), if present.
  lr_steps = None
  recipe = os.path.join(os.path.dirname(path), 'config.json')
  if os.path.exists(recipe):
    with open(recipe) as f:
      lr_steps = (json.load(f).get('schedule') or {}).get('lr_per_step')
  runs = []
  for s in seeds:
    loss = {int(e['epoch']): float(e['per_seed'][s]) for e in data['epochs']}
    lr = {e: lr_by_epoch.get(e, math.nan) for e in loss}
    run = Run(f'{path}[seed {s}]', loss, lr, steps_per_epoch=spe)
    values = (per_step.get('per_seed') or {}).get(s)
    if values:
      run.steps = list(range(1, len(values) + 1))
      run.step_loss = [float(v) for v in values]
      run.step_lr = ([float(v) for v in lr_steps] if lr_steps
                     else [math.nan] * len(values))
    runs.append(run)
  return Reference(path, runs)


def read_reference(path: str, steps_per_epoch: Optional[int] = None,
                   term: str = 'loss') -> Reference:
  """A reference log in any known format (detected from its content), its
  curve of `term` (the total 'loss' or a loss term).

  Raises:
    errors.MissingFileError: no such file.
    errors.DataError: unknown format (the message lists the known ones), or
      no such term (the message lists the reference's terms).
  """
  if not os.path.exists(path):
    raise errors.MissingFileError(f'--reference {path!r} does not exist.')
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, 'metrics.jsonl')):
      return Reference(path, [read_ours(path, steps_per_epoch, term)])
    raise errors.DataError(f'--reference {path!r} is a folder without '
                           'metrics.jsonl; give a log file. Known formats: '
                           f'{", ".join(FORMATS)}.')
  with open(path) as f:
    text = f.read()
  try:
    data = json.loads(text)
  except json.JSONDecodeError:
    data = None
  if isinstance(data, dict) and 'epochs' in data and 'seeds' in data:
    return _curves_json(path, data, term)
  rows = _read_jsonl(path)
  if rows and all(isinstance(r, dict) for r in rows):
    keys = set().union(*rows)
    if 'train_loss' in keys and 'epoch' in keys:
      return _official(path, rows, term)
    if 'loss' in keys and 'epoch' in keys and ('iter' in keys
                                               or 'step' in keys):
      return _mm(path, rows, steps_per_epoch, term)
    if 'train/loss' in keys and 'step' in keys:
      raise errors.ConfigError(f'{path} is a mim_jax metrics.jsonl: pass '
                               'its workdir (the folder), which also holds '
                               'config.json.')
  raise errors.DataError(
      f'--reference {path!r}: unknown log format. Known formats: '
      f'{", ".join(FORMATS)}. The official MAE log.txt has one JSON object '
      'per line with "epoch", "train_loss" and "train_lr".')


def _stats(values: list[float]) -> tuple[float, Optional[float]]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def _points_epoch(ours: list[Run], ref: list[Run]):
  epochs = sorted(set.intersection(*(set(r.epoch_loss) for r in ours + ref)))
  pts = []
  for e in epochs:
    pts.append(dict(
        x=e, epoch=e,
        ours_runs=[r.epoch_loss[e] for r in ours],
        ref_seeds=[r.epoch_loss[e] for r in ref],
        lr_ours=float(np.mean([r.epoch_lr.get(e, math.nan) for r in ours])),
        lr_reference=float(np.mean([r.epoch_lr.get(e, math.nan)
                                    for r in ref]))))
  return pts


def _window_mean(run: Run, start: int, end: int, lr: bool = False):
  """The mean of `run`'s values over steps start..end-1, or None unless its
  logging intervals tile that window exactly."""
  vals = run.step_lr if lr else run.step_loss
  total, covered = 0.0, 0
  for prev, stop, v in zip([0] + run.steps[:-1], run.steps, vals):
    if prev >= start and stop <= end:
      total += (stop - prev) * v
      covered += stop - prev
    elif prev < end and stop > start:
      return None  # an interval straddles the window
  return total / covered if covered == end - start else None


def _points_step(ours: list[Run], ref: list[Run], spe: Optional[int]):
  if any(not r.steps for r in ref):
    raise errors.ConfigError('--align=step needs per-step reference values; '
                             'this reference has epoch means only (the '
                             'official log.txt). Use --align=epoch.')
  # Windows between the logging boundaries every run shares: each run's
  # intervals tile them (e.g. ours every step, mmpretrain's every 50).
  ends = sorted(set.intersection(*(set(r.steps) for r in ours + ref)))
  pts, prev = [], 0
  for end in ends:
    windows = [_window_mean(r, prev, end) for r in ours + ref]
    if all(w is not None for w in windows):
      pts.append(dict(
          x=end, epoch=(prev // spe) if spe else None,
          ours_runs=windows[:len(ours)], ref_seeds=windows[len(ours):],
          lr_ours=float(np.mean([_window_mean(r, prev, end, True)
                                 for r in ours])),
          lr_reference=float(np.mean([_window_mean(r, prev, end, True)
                                      for r in ref]))))
    prev = end
  return pts


def _judged(p: dict) -> bool:
  """The points that count: from epoch 1 on (epoch 0 is warmup from
  init)."""
  return p['epoch'] is None or p['epoch'] >= 1


def _judge(pts: list[dict], sigma_floor: str, tolerance_sigma: float,
           tolerance_rel: float):
  """Fills each point's means, sigma, rel, z, lr_rel and ok; returns (the
  sigma floor, the first judged point outside tolerance or None)."""
  for p in pts:
    p['ours'], _ = _stats(p['ours_runs'])
    p['reference'], p['ref_std'] = _stats(p['ref_seeds'])
  stds = [p['ref_std'] for p in pts
          if _judged(p) and p['ref_std'] is not None]
  floor = float(np.median(stds)) if stds and sigma_floor == 'median' else 0.0
  first_bad = None
  for p in pts:
    p['sigma'] = (max(p['ref_std'], floor) if p['ref_std'] is not None
                  else None)
    dev = p['ours'] - p['reference']
    p['rel'] = dev / abs(p['reference'])
    p['z'] = dev / p['sigma'] if p['sigma'] else None
    p['lr_rel'] = ((p['lr_ours'] - p['lr_reference']) / p['lr_reference']
                   if p['lr_reference'] else None)
    p['ok'] = bool(abs(p['z']) <= tolerance_sigma if p['z'] is not None
                   else abs(p['rel']) <= tolerance_rel)
    if first_bad is None and not p['ok'] and _judged(p):
      first_bad = {k: p[k] for k in ('x', 'epoch', 'ours', 'reference',
                                     'sigma', 'rel', 'z')}
  return floor, first_bad


def compare(ours: list[Run], refs: list[Reference], *, align: str = 'epoch',
            tolerance_sigma: float = 3.0, tolerance_rel: float = 0.02,
            sigma_floor: str = 'median') -> dict:
  """Deviations of the mean of `ours` from the reference's seed mean.

  Returns:
    The JSON report (see the module docstring); 'pass' is False when any
    point from epoch 1 on is outside tolerance.

  Raises:
    errors.ConfigError: bad alignment, no steps per epoch where one is
      needed.
    errors.DataError: no common points.
  """
  if align not in ('epoch', 'step'):
    raise errors.ConfigError(f'--align={align!r}: use epoch or step.')
  if sigma_floor not in ('median', 'none'):
    raise errors.ConfigError(f'--sigma_floor={sigma_floor!r}: use median or '
                             'none.')
  seeds = [s for ref in refs for s in ref.seeds]
  spe = next((r.steps_per_epoch for r in ours if r.steps_per_epoch), None)
  if align == 'epoch':
    missing = [r.name for r in ours if not r.epoch_loss]
    if missing:
      raise errors.ConfigError(
          f'--align=epoch needs the steps per epoch of {missing}: their '
          'config.json has no input.num_train_examples. Pass '
          '--steps_per_epoch=N (images // global batch) or use --align=step.')
    pts = _points_epoch(ours, seeds)
  else:
    pts = _points_step(ours, seeds, spe)
  if not pts:
    raise errors.DataError('no common points between --ours and --reference '
                           f'(align={align}); are they the same recipe?')
  floor, first_bad = _judge(pts, sigma_floor, tolerance_sigma,
                            tolerance_rel)
  late = [p for p in pts if _judged(p)]
  zs = [p['z'] for p in late if p['z'] is not None]
  rels = [p['rel'] for p in late]
  lr_rels = [abs(p['lr_rel']) for p in pts if p['lr_rel'] is not None
             and not math.isnan(p['lr_rel'])]
  last = pts[-1]
  return {
      'align': align,
      'steps_per_epoch': spe,
      'tolerance_sigma': tolerance_sigma,
      'tolerance_rel': tolerance_rel,
      'sigma_floor': floor,
      'ours': [r.name for r in ours],
      'reference': [ref.name for ref in refs],
      'reference_seeds': len(seeds),
      'points': [{k: p[k] for k in (
          'x', 'epoch', 'ours', 'ours_runs', 'reference', 'ref_std', 'sigma',
          'rel', 'z', 'lr_ours', 'lr_reference', 'ok')} for p in pts],
      'max_abs_z': max((abs(z) for z in zs), default=None),
      'mean_z': float(np.mean(zs)) if zs else None,
      'max_abs_rel': max((abs(r) for r in rels), default=None),
      'mean_rel': float(np.mean(rels)) if rels else None,
      'final': {'x': last['x'], 'epoch': last['epoch'], 'ours': last['ours'],
                'reference': last['reference'], 'rel': last['rel'],
                'z': last['z']},
      'lr_max_abs_rel': max(lr_rels, default=None),
      'first_outside': first_bad,
      'pass': first_bad is None,
  }


def plot(report: dict, out: str, title: str = ''):
  """Two panels against epoch or step: the loss (the reference's mean and
  +-sigma band, our runs and their mean; the lr on a second axis), and
  each point's deviation in reference sigma with the tolerance."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  pts = report['points']
  x = np.asarray([p['x'] for p in pts], np.float64)
  ref = np.asarray([p['reference'] for p in pts])
  sig = np.asarray([p['sigma'] or 0.0 for p in pts])
  runs = np.asarray([p['ours_runs'] for p in pts])
  n_ref, n_ours = report['reference_seeds'], runs.shape[1]
  fig, (ax, dev_ax) = plt.subplots(
      2, 1, figsize=(7, 5.6), dpi=90, sharex=True,
      gridspec_kw=dict(height_ratios=(2, 1)))
  ax.fill_between(x, ref - sig, ref + sig, color='tab:blue', alpha=0.25,
                  lw=0, label='PyTorch ±σ')
  ax.plot(x, ref, color='tab:blue', lw=2,
          label=f'PyTorch mean ({n_ref} seed{"s" * (n_ref > 1)})')
  for i in range(n_ours):
    ax.plot(x, runs[:, i], color='tab:orange', lw=0.8, alpha=0.6,
            label='mim_jax runs' if i == 0 else None)
  ax.plot(x, [p['ours'] for p in pts], color='tab:red', lw=1.5, ls='--',
          label=f'mim_jax mean ({n_ours} run{"s" * (n_ours > 1)})')
  ax.set_ylabel(report.get('term', 'loss'))
  ax.set_yscale('log')
  ax.grid(alpha=0.3, which='both')
  lr_ax = ax.twinx()
  lr_ax.plot(x, [p['lr_reference'] for p in pts], color='gray', lw=1,
             label='lr PyTorch')
  lr_ax.plot(x, [p['lr_ours'] for p in pts], color='black', lw=1, ls=':',
             label='lr mim_jax')
  lr_ax.set_ylabel('learning rate')
  handles = ax.get_legend_handles_labels()
  lr_handles = lr_ax.get_legend_handles_labels()
  ax.legend(handles[0] + lr_handles[0], handles[1] + lr_handles[1],
            fontsize=8, loc='upper right')
  tol = report['tolerance_sigma']
  if any(p['z'] is not None for p in pts):
    dev = lambda v, p: (v - p['reference']) / p['sigma']
    ylabel = 'deviation (σ)'
  else:  # no seed spread: relative deviation
    dev = lambda v, p: (v - p['reference']) / abs(p['reference'])
    ylabel, tol = 'deviation (relative)', report['tolerance_rel']
  dev_ax.axhspan(-tol, tol, color='tab:green', alpha=0.1, lw=0,
                 label=f'tolerance ±{tol:g}')
  dev_ax.axhline(0, color='tab:blue', lw=1)
  for i in range(n_ours):
    dev_ax.plot(x, [dev(p['ours_runs'][i], p) for p in pts],
                color='tab:orange', lw=0.8, alpha=0.6)
  dev_ax.plot(x, [dev(p['ours'], p) for p in pts], color='tab:red', lw=1.5,
              ls='--', marker='o', ms=3)
  dev_ax.set_ylabel(ylabel)
  dev_ax.set_xlabel(report['align'])
  dev_ax.grid(alpha=0.3)
  dev_ax.legend(fontsize=8, loc='lower right')
  verdict = 'within' if report['pass'] else 'OUTSIDE'
  mean_z = report['mean_z']
  ax.set_title(title or (
      f'mim_jax vs PyTorch: {verdict} tolerance from epoch 1; mean dev '
      + (f'{mean_z:+.2f}σ' if mean_z is not None
         else f'{100 * report["mean_rel"]:+.2f}%')
      + f', final {100 * report["final"]["rel"]:+.2f}%'), fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out)
  plt.close(fig)


def run(ours: Sequence[str], references: Sequence[str], *,
        out: Optional[str] = None, align: str = 'epoch',
        tolerance_sigma: float = 3.0, tolerance_rel: float = 0.02,
        sigma_floor: str = 'median',
        steps_per_epoch: Optional[int] = None, term: str = 'loss') -> dict:
  """Reads, compares and (with `out`) plots `term`; returns the report."""
  if not ours or not references:
    raise errors.ConfigError('give at least one --ours workdir and one '
                             '--reference log.')
  refs = [read_reference(p, steps_per_epoch, term) for p in references]
  runs = [read_ours(w, steps_per_epoch, term) for w in ours]
  report = compare(runs, refs, align=align, tolerance_sigma=tolerance_sigma,
                   tolerance_rel=tolerance_rel, sigma_floor=sigma_floor)
  report['term'] = term
  if out:
    plot(report, out)
    report['figure'] = out
  return report


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    report = run(f.ours, f.reference, out=f.out, align=f.align,
                 tolerance_sigma=f.tolerance_sigma,
                 tolerance_rel=f.tolerance_rel, sigma_floor=f.sigma_floor,
                 steps_per_epoch=f.steps_per_epoch, term=f.term)
  except errors.UserError as e:  # bad input: one line, exit status 2
    print(f'compare_curves: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(report))
  return 0 if report['pass'] else 1


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_multi_string('ours', [], 'mim_jax workdir (repeatable).')
  flags.DEFINE_multi_string('reference', [],
                            'Reference log (repeatable: seeds).')
  flags.DEFINE_string('out', None, 'Figure (PNG).')
  flags.DEFINE_enum('align', 'epoch', ['epoch', 'step'], 'Alignment.')
  flags.DEFINE_float('tolerance_sigma', 3.0,
                     'Allowed |deviation| in reference sigma.')
  flags.DEFINE_float('tolerance_rel', 0.02,
                     'Allowed relative deviation without a seed spread.')
  flags.DEFINE_enum('sigma_floor', 'median', ['median', 'none'],
                    'Floor of the per-point sigma.')
  flags.DEFINE_integer('steps_per_epoch', None,
                       'Steps per epoch (default: from config.json).')
  flags.DEFINE_string('term', 'loss',
                      'The curve to compare: the total loss or a logged '
                      'term (ours: train/<term>; curves.json: terms[<term>]; '
                      'log.txt: train_<term>).')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)

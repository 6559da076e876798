"""Generic parity check against a fixture folder of official PyTorch numbers.

The folder format is described in the fixtures' README (config.json,
state_dict.npz, inputs.npz, outputs.npz, grads.npz, train_curve.{npz,json},
final_state_dict.npz). The method's adapter (`Method.parity`, a
`mim_jax.method.ParityAdapter`) says how to build the model from
config.json, how to turn fixture arrays into a batch and which of our
tensors correspond to the fixture's outputs; its converter maps the keys.
Everything else (conversion, gradients, the 30-step replay through our own
optax chain and train step) is shared here.
"""

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax import errors
from mim_jax import experiment
from mim_jax import method as method_lib
from mim_jax import methods
from mim_jax import optim
from mim_jax import providers as providers_lib
from mim_jax import sharding
from mim_jax import state as state_lib
from mim_jax import steps

# Tolerances of the fixtures README (tighter than the per-folder ones).
TOL = dict(loss_rel=1e-5, tensor_rel_to_max=1e-5, grad_rel_to_max=2e-5,
           curve_loss_rel=1e-5, final_rel_to_max=2e-5, zero_grad_abs=1e-7,
           lr_rel=1e-5)  # lr: ours is float32, the fixture's float64


def rel_to_max(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  denom = np.abs(b).max()
  diff = np.abs(a - b).max() if a.size else 0.0
  return float(diff / denom) if denom > 0 else float(diff)


def rel(a, b) -> float:
  a, b = float(np.asarray(a)), float(np.asarray(b))
  return abs(a - b) / max(abs(b), 1e-12)


def load_fixture(path: str) -> dict[str, Any]:
  fx = {'dir': path}
  with open(os.path.join(path, 'config.json')) as f:
    fx['config'] = json.load(f)
  for name in ('state_dict', 'inputs', 'outputs', 'grads', 'train_curve',
               'final_state_dict'):
    p = os.path.join(path, f'{name}.npz')
    if os.path.exists(p):
      with np.load(p) as z:
        fx[name] = {k: z[k] for k in z.files}
  p = os.path.join(path, 'train_curve.json')
  if os.path.exists(p):
    with open(p) as f:
      fx['curve'] = json.load(f)
  return fx


def _split_zero(key: str, err_arr: np.ndarray, zero_slices: dict):
  """Returns (mask of entries with a true zero gradient) for `key`."""
  m = np.zeros(err_arr.shape, bool)
  for sl in zero_slices.get(key, ()):
    m[sl] = True
  return m


def compare_tensor_dict(ours: dict, ref: dict, tol: float, zero_slices=None,
                        zero_tol=None, exact=()) -> dict:
  """Per-key rel-to-max errors; entries listed in zero_slices are compared
  with an absolute tolerance instead (their true value is zero)."""
  zero_slices = zero_slices or {}
  worst, worst_key, worst_zero, fails, missing = 0.0, None, 0.0, [], []
  for key, b in ref.items():
    if key not in ours:
      missing.append(key)
      continue
    a = np.asarray(ours[key], np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
      fails.append(f'{key}: shape {a.shape} vs {b.shape}')
      continue
    if key in exact:
      if not np.array_equal(a, b):
        fails.append(f'{key}: not exactly equal')
      continue
    zm = _split_zero(key, a, zero_slices)
    if zm.any():
      z = float(np.abs(a[zm] - b[zm]).max())
      worst_zero = max(worst_zero, z)
      if z > zero_tol:
        fails.append(f'{key} (zero-gradient part): abs {z:.3g}')
    denom = np.abs(b[~zm]).max() if (~zm).any() else 0.0
    e = float(np.abs(a[~zm] - b[~zm]).max() / denom) if denom > 0 else 0.0
    if e > worst:
      worst, worst_key = e, key
    if e > tol:
      fails.append(f'{key}: rel-to-max {e:.3g}')
  return dict(worst_rel_to_max=worst, worst_key=worst_key,
              worst_zero_part_abs=worst_zero, failures=fails,
              missing=missing, compared=len(ref) - len(missing))


def load_converted(path: str, scan: bool = False):
  """A fixture folder through its method's adapter: (fixture, method,
  experiment config, model, batch (numpy), converted initial params).
  `scan=True` builds the model with its blocks in `nn.scan` (stacked params,
  converted to and from the same official keys)."""
  fx = load_fixture(path)
  method = methods.get(fx['config']['method'])
  if method.parity is None:
    raise errors.ConfigError(
        f'{path}/config.json names method {method.name!r}, which has no '
        'parity adapter (Method.parity).')
  adapter = method.parity
  config = adapter.experiment_config(fx['config'])
  if scan:
    config.model.scan = True
  model = method.build_model(config)
  batch = adapter.batch_from_inputs(fx['inputs'], fx['config'])
  shapes = jax.eval_shape(lambda: state_lib.init_params(
      model, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
              for k, v in batch.items()}, 0))
  params = method.converter.to_flax(fx['state_dict'], model, shapes,
                                    config.input.image_size)
  return fx, method, config, model, batch, params


def _zero_and_ema(fx, method, model, params):
  """(the gradient slices that must be zero, the fixture's initial EMA
  weights or None) of a fixture, as every replay starts from them."""
  adapter = method.parity
  zero = adapter.zero_gradient_slices(fx['state_dict'], fx['config'])
  ema = (None if adapter.initial_ema is None
         else adapter.initial_ema(fx, model, params))
  return zero, ema


def run(path: str, scan: bool = False, curve: bool = True
        ) -> dict[str, Any]:
  """Runs every check on one fixture folder (with the model's blocks in
  `nn.scan` when `scan`; without the training-curve replay when not
  `curve`); returns the JSON report."""
  fx, method, config, model, batch, params = load_converted(path, scan)
  adapter = method.parity
  jax.config.update('jax_default_matmul_precision', 'highest')
  loss_fn = experiment.build_loss(config)
  conv = method.converter
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  report: dict[str, Any] = {'fixture': os.path.abspath(path),
                            'method': method.name, 'scan': scan,
                            'tolerances': TOL}
  # 1. Forward outputs (methods with a momentum target get the fixture's
  # initial EMA weights).
  zero, ema = _zero_and_ema(fx, method, model, params)
  providers = experiment.providers_of(config)
  targets = providers_lib.states_for(providers, ema_params=ema)
  compute = functools.partial(
      steps.make_loss_fn(model, loss_fn, providers), targets=targets)
  loss, (pred, out, aux, _) = jax.jit(compute, static_argnums=3)(
      params, batch, jax.random.PRNGKey(0), False)
  ours = adapter.forward_outputs(loss, pred, out, aux)
  fwd = {}
  loss_keys = [k for k in fx['outputs'] if k.startswith('loss')]
  for k in loss_keys:
    if k in ours:
      fwd[k] = rel(ours[k], fx['outputs'][k])
  tensors = {k: v for k, v in fx['outputs'].items() if k not in loss_keys}
  cmp = compare_tensor_dict(ours, tensors, TOL['tensor_rel_to_max'],
                            exact=adapter.exact_outputs)
  fwd_fail = [f'{k}: rel {v:.3g}' for k, v in fwd.items()
              if v > TOL['loss_rel']] + cmp['failures']
  fwd_fail += [f'{k}: not produced' for k in loss_keys if k not in ours]
  report['forward'] = dict(loss_rel=fwd, tensors=cmp, failures=fwd_fail)

  # 2. Gradients of every parameter, keyed by torch names.
  grad_fn = jax.jit(jax.grad(lambda p: compute(p, batch,
                                               jax.random.PRNGKey(0),
                                               False)[0]))
  grads = conv.to_torch_keys(grad_fn(params))
  gcmp = compare_tensor_dict(grads, fx['grads'], TOL['grad_rel_to_max'],
                             zero_slices=zero, zero_tol=TOL['zero_grad_abs'])
  gcmp['failures'] += [f'{k}: no gradient in the fixture'
                       for k in grads if k not in fx['grads']
                       and k not in adapter.frozen_keys(fx['config'])]
  gcmp['failures'] += [f'{k}: missing' for k in gcmp['missing']]
  report['grads'] = gcmp

  # 3. The training curve, replayed through our optax chain + train step.
  if curve and 'curve' in fx:
    report['curve'] = replay_curve(fx, config, model, loss_fn, method,
                                   params, zero, ema)
  failures = (report['forward']['failures'] + report['grads']['failures'] +
              report.get('curve', {}).get('failures', []))
  report['failures'] = failures
  report['pass'] = not failures
  return report


def replay_curve(fx, config, model, loss_fn, method, params, zero,
                 ema=None):
  """Replays the fixture's optimiser steps with our own chain and step (and
  EMA update, for methods with a momentum target)."""
  adapter, conv = method.parity, method.converter
  curve, arrays = fx['curve'], fx['train_curve']
  batches = adapter.curve_batches(arrays, fx['config'])
  batch_size = len(next(iter(batches[0].values())))
  tc = adapter.tx_config(fx['config'], curve, batch_size)
  ref_losses, ref_lrs = adapter.curve_reference(fx)
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.update(tc)
  failures = []
  # The official decay grouping, compared name by name.
  wd = optim.decay_mask(params, tuple(cfg.optim.get(
      'wd_exclude', optim.NO_DECAY)))
  # One flag per element, so a scanned stack's mask splits per layer.
  wd = jax.tree.map(lambda m, p: np.full(np.shape(p), bool(m)), wd, params)
  ours_decay = {k for k, v in conv.to_torch_keys(wd).items() if v.all()}
  ref_decay = set(adapter.reference_decay(fx))
  if ours_decay != ref_decay:
    failures.append(
        'weight-decay groups differ: only ours '
        f'{sorted(ours_decay - ref_decay)}, only official '
        f'{sorted(ref_decay - ours_decay)}')
  mesh = sharding.make_mesh([('data', 1)], jax.devices()[:1])
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in batches[0].items()}
  state, _, _, schedule = state_lib.create_train_state(cfg, model, mesh, shapes,
                                                   params=params, ema=ema)
  train_step = jax.jit(steps.make_train_step(
      model, loss_fn, schedule, experiment.providers_of(cfg), seed=cfg.seed,
      ema_momentum=experiment.ema_schedule(cfg)))
  terms = adapter.curve_terms
  losses, lrs, term_values = [], [], {k: [] for k in terms}
  for b in batches:
    state, m = train_step(state, {k: jnp.asarray(v) for k, v in b.items()},
                          {})
    losses.append(float(m['loss']))
    lrs.append(float(m['lr']))
    for k in terms:
      term_values[k].append(float(m[k]))
  ref_loss = np.asarray(ref_losses, np.float64)
  loss_err = [rel(a, b) for a, b in zip(losses, ref_loss)]
  lr_err = max(abs(a - b) / max(abs(b), 1e-12) if b else abs(a)
               for a, b in zip(lrs, ref_lrs))
  if max(loss_err) > TOL['curve_loss_rel']:
    failures.append(f'curve loss: max rel {max(loss_err):.3g} at step '
                    f'{int(np.argmax(loss_err))}')
  term_err = {}
  for k, values in term_values.items():
    errs = [rel(a, b) for a, b in zip(values, fx['curve'][k])]
    term_err[k] = max(errs)
    if term_err[k] > TOL['curve_loss_rel']:
      failures.append(f'curve {k}: max rel {term_err[k]:.3g} at step '
                      f'{int(np.argmax(errs))}')
  if lr_err > TOL['lr_rel']:
    failures.append(f'lr schedule: max rel {lr_err:.3g}')
  final = conv.to_torch_keys(state.params)
  if state.ema_params is not None:
    final.update(conv.ema_to_torch(state.ema_params, None, None))
  ref_final = {k: v for k, v in fx['final_state_dict'].items()
               if k not in adapter.frozen_keys(fx['config'])}
  fcmp = compare_tensor_dict(final, ref_final, TOL['final_rel_to_max'],
                             zero_slices=zero,
                             zero_tol=float(np.sum(ref_lrs)))
  failures += fcmp['failures'] + [f'{k}: missing' for k in fcmp['missing']]
  return dict(steps=len(batches), loss_max_rel=max(loss_err),
              losses=losses, lr_max_rel=lr_err, terms_max_rel=term_err,
              decay_groups_match=ours_decay == ref_decay,
              final_params=fcmp, failures=failures)


def _deviation(ours, ref) -> dict:
  """Per-step relative deviation |ours - ref| / |ref|: max, mean, each."""
  errs = [rel(a, b) for a, b in zip(ours, ref)]
  return dict(max_rel=max(errs), mean_rel=float(np.mean(errs)),
              max_at_step=int(np.argmax(errs)), per_step=errs)


def dtype_curve(path: str, dtype: str, float32_losses=None) -> dict:
  """The fixture's training curve replayed with the model computing in
  `dtype` (params, optimizer state, softmax, LayerNorm statistics and the
  loss stay float32), against the fixture's curve and our float32 replay.

  Reported, not judged: a low-precision run is not parity, this measures
  how far it drifts (docs/parity.md).

  Args:
    path: a fixture folder with a training curve.
    dtype: a compute dtype, e.g. 'bfloat16' (`method.COMPUTE_DTYPES`).
    float32_losses: our float32 replay's losses when already known (the
      `curve.losses` of `run`); replayed here otherwise.

  Raises:
    errors.ConfigError: a fixture without a training curve, or a bad dtype.
  """
  name = method_lib.compute_dtype(dtype).name
  fx, method, config, model, _, params = load_converted(path)
  if 'curve' not in fx:
    raise errors.ConfigError(f'{path} holds no training curve '
                             '(train_curve.json): nothing to replay.')
  jax.config.update('jax_default_matmul_precision', 'highest')
  zero, ema = _zero_and_ema(fx, method, model, params)
  loss_fn = experiment.build_loss(config)
  if float32_losses is None:
    float32_losses = replay_curve(fx, config, model, loss_fn, method, params,
                                  zero, ema)['losses']
  low_config = ml_collections.ConfigDict(config.to_dict())
  low_config.model.dtype = name
  low = replay_curve(fx, low_config, method.build_model(low_config), loss_fn,
                     method, params, zero, ema)['losses']
  ref, _ = method.parity.curve_reference(fx)
  return dict(fixture=os.path.abspath(path), method=method.name,
              dtype=name, steps=len(low),
              vs_fixture=_deviation(low, ref),
              vs_float32=_deviation(low, float32_losses),
              float32_vs_fixture=_deviation(float32_losses, ref),
              losses={name: low, 'float32': list(float32_losses),
                      'fixture': [float(x) for x in ref]})

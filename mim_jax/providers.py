"""What each kind of target provider does: the one module that dispatches on
`TargetProvider.kind` (the record itself is declared in `mim_jax.method`).

- 'ema': a momentum copy of (part of) the params. State:
  `TrainState.ema_params`, made by `init(params)` inside the sharded state
  creation, sharded like the params, checkpointed; moved after each
  optimizer update with the momentum schedule of `config.ema`.
- 'running': a statistic. State: `TrainState.target_state[name]`, made by
  `init(params)`, sharded by its logical axes, checkpointed; updated in the
  step by `update(state, batch, step)`.
- 'frozen': weights read from a file by `init(config)` at every start,
  replicated, passed to the step as an argument, never checkpointed (the
  file is the source).

Every provider's `compute(state, batch)` runs in the step before the model,
its outputs added to the batch under stop_gradient (`steps.make_loss_fn`).
"""

from typing import Any, Callable, Optional, Sequence

import jax

from mim_jax import errors
from mim_jax import method as method_lib
from mim_jax import optim

Providers = Sequence[method_lib.TargetProvider]


def check(method_name: str, providers: Providers) -> tuple:
  """`providers` as a tuple, checked: unique names, at most one 'ema'."""
  providers = tuple(providers)
  names = [p.name for p in providers]
  if len(set(names)) != len(names):
    raise TypeError(f'Method {method_name!r}: target provider names repeat: '
                    f'{names}.')
  if sum(p.kind == 'ema' for p in providers) > 1:
    raise TypeError(f'Method {method_name!r}: at most one ema provider (its '
                    'state is TrainState.ema_params).')
  return providers


def ema_of(providers: Providers) -> Optional[method_lib.TargetProvider]:
  """The 'ema' provider, or None."""
  return next((p for p in providers if p.kind == 'ema'), None)


def _running(providers: Providers) -> list:
  return [p for p in providers if p.kind == 'running']


def initial_state(providers: Providers, params, ema=None) -> dict:
  """The TrainState fields of the providers' state for `params` (traced
  inside the sharded state creation): `ema_params` (given `ema`, or the
  provider's init; None without one) and `target_state` (None without
  'running' providers)."""
  ema_provider = ema_of(providers)
  if ema_provider is not None and ema is None:
    ema = ema_provider.init(params)
  target_state = {p.name: p.init(params) for p in _running(providers)}
  return dict(ema_params=ema, target_state=target_state or None)


def initial_states(providers: Providers, config, params) -> dict:
  """{name: state} of every provider at initialisation, outside a
  TrainState: the EMA a copy of `params`, running statistics at their
  start, frozen weights read from their files."""
  return {p.name: p.init(config) if p.kind == 'frozen' else p.init(params)
          for p in providers}


def abstract_ema(providers: Providers, params) -> Any:
  """The shape of the EMA state for `params` (boxed params give boxed
  leaves, so an EMA read from a file can be placed in the same boxes)."""
  return jax.eval_shape(ema_of(providers).init, params)


def states_for(providers: Providers, *, ema_params=None, target_state=None,
               frozen=None) -> dict:
  """{provider name: its state} for `compute`, from the places each kind
  keeps it; kinds whose place is not given are left out."""
  out = {}
  for p in providers:
    if p.kind == 'ema' and ema_params is not None:
      out[p.name] = ema_params
    elif p.kind == 'running' and target_state is not None:
      out[p.name] = target_state[p.name]
    elif p.kind == 'frozen' and frozen is not None:
      out[p.name] = frozen[p.name]
  return out


def step_states(providers: Providers, state, frozen: dict) -> dict:
  """{provider name: its state} of a TrainState and the frozen weights."""
  return states_for(providers, ema_params=state.ema_params,
                    target_state=state.target_state, frozen=frozen)


def compute(providers: Providers, states: dict, batch: dict) -> dict:
  """The providers' outputs for `batch`, from their `states` ({name:
  state}), under stop_gradient: what the step adds to the batch."""
  out = {}
  for p in providers:
    out.update(p.compute(states[p.name], batch))
  return jax.lax.stop_gradient(out)


def check_schedule(providers: Providers, ema_momentum) -> None:
  """An 'ema' provider needs a momentum schedule."""
  if ema_of(providers) is not None and ema_momentum is None:
    raise errors.ConfigError('the method has an EMA target but no EMA '
                             'momentum schedule was given (config.ema).')


def update(providers: Providers, state, new_state, batch,
           ema_momentum: Optional[Callable]):
  """The providers' state after the optimizer update of `state` into
  `new_state`: the EMA moves with `ema_momentum(step)` -> (m, 1 - m) (ema =
  m * ema + (1 - m) * params), 'running' statistics update on the batch.

  Returns:
    (new_state, metrics): metrics holds `ema_momentum` with an EMA.
  """
  metrics = {}
  if ema_of(providers) is not None:
    m, rate = ema_momentum(state.step)
    new_state = new_state.replace(ema_params=optim.ema_update(
        state.ema_params, new_state.params, m, rate))
    metrics['ema_momentum'] = m
  running = _running(providers)
  if running:
    new_state = new_state.replace(target_state=dict(
        state.target_state, **{
            p.name: p.update(state.target_state[p.name], batch, state.step)
            for p in running}))
  return new_state, metrics


def frozen_weights(providers: Providers, config, replicated,
                   abstract: bool = False) -> dict:
  """{name: weights} of the 'frozen' providers, read from their files and
  placed with the `replicated` sharding (abstract: ShapeDtypeStructs, no
  file read)."""
  out = {}
  for p in providers:
    if p.kind != 'frozen':
      continue
    if abstract:
      out[p.name] = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                         sharding=replicated),
          p.abstract(config))
    else:
      out[p.name] = jax.device_put(p.init(config), replicated)
  return out

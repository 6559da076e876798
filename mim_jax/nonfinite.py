"""The non-finite guard, both halves.

Device half (inside the jitted train step, `steps.make_train_step`): a step
whose loss, gradients, new params or new optimizer state hold a non-finite
value changes nothing but the step counts (`keep_if_finite`), and reports
`skipped` and `nonfinite_at` (the index of the first non-finite array in
`names` order; -1 when finite).

Host half (`Monitor`, fed by the checkpoint hook): reads those metrics one
step late, so the host never waits for the step it has just dispatched,
and stops the run after `max_consecutive` skips in a row, or at the first
with `action='stop'`. No checkpoint ever holds a non-finite value: the
state of a skipped step is the state before it.
"""

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mim_jax import optim

ACTIONS = ('skip', 'stop')
# The TrainState fields a skipped step leaves as they were.
KEPT_FIELDS = ('params', 'opt_state', 'ema_params', 'target_state',
               'model_state')


class NonFiniteError(FloatingPointError):
  """Training met non-finite values it may not skip (any more)."""


def checked_trees(loss, grads, state) -> list:
  """What the guard checks, in order: the loss, the gradients and the
  updated params and optimizer state (so the updates too)."""
  return [('loss', loss), ('grads', grads), ('params', state.params),
          ('opt_state', state.opt_state)]


def names(state) -> list[str]:
  """The name of each flag of the step's `nonfinite_at` metric (index ->
  'loss', 'grads/...', 'params/...' or 'opt_state/...'), from a state or
  its abstract version."""
  return ['/'.join([prefix, *optim.path_names(path)])
          for prefix, tree in checked_trees(0.0, state.params, state)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]] + [
              'overflow (a sum of squares beyond float32: |values| > 1e19)']


def all_finite(loss, grads, state, grad_norm, param_norm):
  """(every checked value finite, index of the first non-finite one in
  `names` order or -1), on the devices.

  The test itself uses the loss and one norm per tree (the gradients' and
  the new params' are the logged ones, already computed): a non-finite
  value makes it non-finite. Only when it fails are the arrays checked one
  by one, to name the first; if none is (finite values whose squares
  overflow float32), the index is that of the last name, 'overflow'.
  """
  trees = checked_trees(loss, grads, state)
  ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        & jnp.isfinite(param_norm)
        & jnp.isfinite(optim.global_norm(state.opt_state)))

  def first_bad():
    flags = jnp.stack([jnp.all(jnp.isfinite(x)) for _, tree in trees
                       for x in jax.tree.leaves(tree)] + [jnp.array(False)])
    return jnp.argmin(flags).astype(jnp.int32)

  return ok, jax.lax.cond(ok, lambda: jnp.int32(-1), first_bad)


def _keep_if_not(ok, new, old):
  """`new` if `ok`, else `old`, for float arrays; integer arrays (the
  optimizer's step counts) always advance, so the lr schedule stays on the
  step."""
  if jnp.issubdtype(jnp.result_type(new), jnp.inexact):
    return jnp.where(ok, new, old)
  return new


def guard_step(loss, grads, state, new_state, metrics: dict):
  """The device half: (the new state, or the old one's values where the
  step is not finite; metrics with `skipped` and `nonfinite_at` added)."""
  ok, metrics['nonfinite_at'] = all_finite(
      loss, grads, new_state, metrics['l2_grads'], metrics['l2_params'])
  metrics['skipped'] = 1.0 - ok.astype(jnp.float32)
  kept = {k: jax.tree.map(functools.partial(_keep_if_not, ok),
                          getattr(new_state, k), getattr(state, k))
          for k in KEPT_FIELDS}
  return new_state.replace(**kept), metrics


class Monitor:
  """The host half (see the module docstring).

  Args:
    action: 'skip' (stop after `max_consecutive` skipped steps in a row) or
      'stop' (stop at the first).
    max_consecutive: K.
    names: `names(state)`: the name of each checked array.
    latest_checkpoint: returns the newest saved step (None: none yet).
  """

  def __init__(self, action: str, max_consecutive: int,
               names: Sequence[str],  # pylint: disable=redefined-outer-name
               latest_checkpoint: Callable[[], Optional[int]]):
    self.action, self.max_consecutive = action, max_consecutive
    self.names = list(names)
    self.latest_checkpoint = latest_checkpoint
    self.consecutive = self.total = 0
    self._pending = []

  def observe(self, step: int, metrics: dict) -> None:
    """Queues the metrics of `step` (device arrays) and checks the steps
    before it."""
    self._pending.append((step, metrics['skipped'], metrics['nonfinite_at']))
    while len(self._pending) > 1:
      self._check(*self._pending.pop(0))

  def settle(self) -> None:
    """Checks every queued step (waits for the last one): before a save
    and at the end."""
    while self._pending:
      self._check(*self._pending.pop(0))

  def _check(self, step: int, skipped, where) -> None:
    if not float(np.asarray(skipped)):
      self.consecutive = 0
      return
    self.consecutive += 1
    self.total += 1
    name = self.names[int(np.asarray(where))]
    logging.warning('Step %d: non-finite %s; the update was skipped (%d in '
                    'a row, %d in this run).', step, name, self.consecutive,
                    self.total)
    if self.action == 'skip' and self.consecutive < self.max_consecutive:
      return
    latest = self.latest_checkpoint()
    why = ('nonfinite=stop' if self.action == 'stop' else
           f'{self.consecutive} steps in a row were skipped '
           f'(max_consecutive_skips={self.max_consecutive})')
    resume = (f'the newest checkpoint, step {latest}, holds only finite '
              f'values; rerun with the same --workdir to resume from it'
              if latest is not None else 'no checkpoint was written yet')
    raise NonFiniteError(
        f'non-finite {name} at step {step}: {why}. The state was never '
        f'updated with non-finite values; {resume}. Fixes: lower the lr, '
        'set --config.optim.grad_clip_norm, use float32 compute, or check '
        'the data.')

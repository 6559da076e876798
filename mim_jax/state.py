"""The train state: step, params, optimizer state and the method's target
state (an EMA copy, running statistics)."""

from typing import Any, Optional

from flax import struct
from flax.training import train_state


@struct.dataclass
class TrainState(train_state.TrainState):
  """flax TrainState plus the state of the method's target providers
  (`mim_jax.method.TargetProvider`).

  `ema_params` is the 'ema' provider's momentum copy (BootMAE's momentum
  encoder), None for methods without one. It is set at init and updated
  inside the jitted step after the optimizer update; it is sharded and
  checkpointed with `params`.

  `target_state` holds the 'running' providers' statistics by provider
  name (None without any), updated in the step and checkpointed.

  `model_state` holds the model's variable collections other than
  'params' (e.g. BatchNorm's 'batch_stats' of a probe head), None for models
  without; updated by the training forward, read by evaluation,
  checkpointed.
  """
  ema_params: Optional[Any] = None
  target_state: Optional[Any] = None
  model_state: Optional[Any] = None

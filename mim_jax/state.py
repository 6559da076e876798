"""The train state: step, params, optimizer state and an optional EMA copy."""

from typing import Any, Optional

from flax import struct
from flax.training import train_state


@struct.dataclass
class TrainState(train_state.TrainState):
  """flax TrainState plus `ema_params`.

  `ema_params` is None for methods without a momentum target. Methods that
  have one (BootMAE) set it at init and update it inside the jitted step
  after the optimizer update; it is sharded and checkpointed with `params`.
  """
  ema_params: Optional[Any] = None

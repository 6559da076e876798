"""Official initialisations as rules applied after `model.init`.

The official codes build their modules (PyTorch's default inits) and then
re-initialise them: BootMAE's constructor walks its modules and redraws
every Linear (xavier, split per q/k/v), the patch embedding, the tokens;
CAE's applies xavier to every Linear and truncated normals to the patch
embedding and tokens. Our layers carry one init each (MAE's: xavier, the
patch embedding's default bias, normal(0.02) tokens). A method whose
official init differs lists `Rule`s (`Method.init_rules`): the first rule
whose pattern fully matches a param's '/'-joined path redraws it; params
matching no rule keep the init their module gives them.

The initialisers follow PyTorch's semantics in Flax's layouts (a Dense
kernel is (in, out), a torch Linear weight (out, in)), and act on the last
dimensions, so a scanned stack of blocks (a leading layer axis) gets the
same per-layer distribution. They match PyTorch's in distribution, not draw
for draw.
"""

import dataclasses
import re
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

Init = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Rule:
  """Redraw every param whose path fully matches `pattern` with `init`."""
  pattern: str
  init: Init


def xavier_uniform(parts: int = 1) -> Init:
  """torch.nn.init.xavier_uniform_ on a Dense kernel (..., in, out); with
  `parts` > 1 each of `parts` equal slices of the output is drawn as its own
  weight (BEiT/BootMAE's per-q/k/v init of a fused qkv projection)."""

  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = shape[-2], shape[-1] // parts
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def uniform(bound: float) -> Init:
  """U(-bound, bound): e.g. PyTorch's default init of a conv (weight and
  bias), 1/sqrt(fan_in)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def trunc_normal(std: float, a: float, b: float) -> Init:
  """torch.nn.init.trunc_normal_(std=std, a=a, b=b) with mean 0: `a`, `b`
  are absolute bounds (BEiT-family codes pass a=-std, b=std)."""

  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, a / std, b / std, shape,
                                             dtype)

  return init


def normal(std: float) -> Init:

  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)

  return init


def constant(value: float) -> Init:

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, value, dtype)

  return init


zeros = constant(0.0)


def _rule_for(path: str, rules) -> Rule | None:
  for rule in rules:
    if re.fullmatch(rule.pattern, path):
      return rule
  return None


def path_key(key: jax.Array, path: str) -> jax.Array:
  """A key per param path, independent of which other params exist."""
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7fffffff)


def apply(params, rules, key: jax.Array):
  """`params` (a nested dict of arrays, or of boxed arrays with
  `replace_boxed`/`unbox`) with every param matched by a rule redrawn.

  Raises:
    ValueError: a rule that matches no param (a typo would otherwise leave
      the module's init in place silently).
  """
  if not rules:
    return params
  flat = traverse_util.flatten_dict(params, sep='/')
  used = set()
  out = {}
  for path, leaf in flat.items():
    rule = _rule_for(path, rules)
    if rule is None:
      out[path] = leaf
      continue
    used.add(rule.pattern)
    boxed = isinstance(leaf, nn.meta.AxisMetadata)
    value = leaf.unbox() if boxed else leaf
    new = rule.init(path_key(key, path), value.shape, value.dtype)
    out[path] = leaf.replace_boxed(new) if boxed else new
  unused = [r.pattern for r in rules if r.pattern not in used]
  if unused:
    raise ValueError(f'init rules match no param: {unused}; params are '
                     f'e.g. {sorted(flat)[:6]}.')
  return traverse_util.unflatten_dict(out, sep='/')

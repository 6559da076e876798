"""Device mesh, logical axis rules and shardings (jax.sharding; no pmap).

Modules name the axes of every parameter and of the activations at block
boundaries with *logical* names from a closed vocabulary; the config maps
them to the mesh axes `data`, `fsdp` and `tensor` (lm1b / t5x style):

  params:      embed, mlp, heads, kv, layers
  activations: act_batch, act_len, act_emb, act_mlp

With the default rules, `embed` goes to `fsdp` (FSDP: each large parameter
and its optimizer and EMA copies are split over the `fsdp` devices and
gathered per layer by XLA), `mlp` / `heads` go to `tensor`, and the batch is
split over (`data`, `fsdp`).
"""

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mim_jax import errors

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
PARAM_AXES = ('embed', 'mlp', 'heads', 'kv', 'layers')
ACT_AXES = ('act_batch', 'act_len', 'act_emb', 'act_mlp')

# Logical name -> mesh axis (or axes, or None = replicated).
DEFAULT_RULES = (
    ('act_batch', ('data', 'fsdp')),
    ('act_len', None),
    ('act_emb', None),
    ('act_mlp', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('layers', None),
)
# Parameters with fewer elements stay replicated: gathering biases and norm
# scales costs a collective each and saves almost no memory.
DEFAULT_MIN_SHARD_SIZE = 2 ** 14


def make_mesh(mesh_config: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """Builds a Mesh from [(axis, size), ...]; one size may be -1 (inferred).

  Raises:
    errors.ConfigError (config.mesh): unknown axis names, several -1, or
      sizes whose product is not the device count.
  """
  devices = jax.devices() if devices is None else devices
  names = [a for a, _ in mesh_config]
  sizes = [int(s) for _, s in mesh_config]
  bad = [a for a in names if a not in MESH_AXES]
  if bad:
    raise errors.ConfigError(f'Unknown mesh axes {bad} in config.mesh; use '
                             f'names from {MESH_AXES}.')
  if len(set(names)) != len(names):
    raise errors.ConfigError(f'Mesh axes repeat in config.mesh='
                             f'{mesh_config}.')
  if sizes.count(-1) > 1:
    raise errors.ConfigError(f'At most one mesh axis may be -1, got '
                             f'config.mesh={mesh_config}.')
  if any(s == 0 or s < -1 for s in sizes):
    raise errors.ConfigError(f'Mesh sizes must be positive or -1, got '
                             f'config.mesh={mesh_config}.')
  known = int(np.prod([s for s in sizes if s != -1]))
  n = len(devices)
  if -1 in sizes:
    if n % known:
      raise errors.ConfigError(
          f'config.mesh={mesh_config}: {n} devices are not divisible by the '
          f'fixed axis sizes (product {known}).')
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise errors.ConfigError(
        f'config.mesh {dict(zip(names, sizes))} has {int(np.prod(sizes))} '
        f'slots but there are {n} devices; make the sizes multiply to {n} '
        'or set one to -1.')
  if len(devices) == jax.device_count() and n > 1:
    # Topology-aware order (ICI rings on TPU); on CPU it is the plain order.
    dev = mesh_utils.create_device_mesh(
        sizes, devices=devices, allow_split_physical_axes=True)
  else:
    dev = np.asarray(devices).reshape(sizes)
  return Mesh(dev, tuple(names))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over the data axes."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global(local_batch: dict, sharding: NamedSharding) -> dict:
  """Per-process numpy batch -> global jax.Arrays with `sharding`.

  Every process passes its own rows (its tf.data shard); the global batch is
  their concatenation in process order.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


# ---------------------------------------------------------------------------
# Logical axis rules.


def rules_from_config(config) -> tuple:
  """`config.sharding_rules` (or the defaults) as a tuple of pairs, checked:
  every activation axis has a rule and every rule targets mesh axes."""
  raw = config.get('sharding_rules') or DEFAULT_RULES
  rules = tuple((str(k), _mesh_target(v)) for k, v in raw)
  for name, target in rules:
    for axis in (target if isinstance(target, tuple) else (target,)):
      if axis is not None and axis not in MESH_AXES:
        raise errors.ConfigError(
            f'config.sharding_rules: rule ({name!r}, {target!r}) names mesh '
            f'axis {axis!r}; mesh axes are {MESH_AXES} (or None for '
            'replicated).')
  # Param axes are checked against the model's params (`param_shardings`);
  # the activation axes are used by every model.
  check_rules(rules, ACT_AXES)
  return rules


def _mesh_target(v):
  if isinstance(v, (list, tuple)):
    return tuple(v) if len(v) != 1 else v[0]
  return v


def check_rules(rules: Sequence, names) -> None:
  """Raises errors.ConfigError if a logical axis in `names` has no rule
  (config.sharding_rules)."""
  have = {k for k, _ in rules}
  missing = sorted({n for n in names if n is not None and n not in have})
  if missing:
    raise errors.ConfigError(
        f'Logical axes {missing} have no sharding rule; add e.g. '
        f"('{missing[0]}', None) (replicated) or ('{missing[0]}', 'fsdp') to "
        f'config.sharding_rules. Rules now: {[k for k, _ in rules]}.')


def logical_names(specs) -> set:
  """All logical names used in a tree of logical PartitionSpecs."""
  out = set()
  for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)):
    for entry in spec:
      for name in (entry if isinstance(entry, tuple) else (entry,)):
        if name is not None:
          out.add(name)
  return out


def _axis_size(mesh: Mesh, target) -> int:
  if target is None:
    return 1
  axes = target if isinstance(target, tuple) else (target,)
  return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def _drop_absent(mesh: Mesh, target):
  """Removes mesh axes the mesh does not have (a rule for `tensor` on a mesh
  without that axis means replicated)."""
  if target is None:
    return None
  axes = tuple(a for a in (target if isinstance(target, tuple) else (target,))
               if a in mesh.shape and mesh.shape[a] > 1)
  if not axes:
    return None
  return axes if len(axes) > 1 else axes[0]


def mesh_spec(logical: P, shape: Sequence[int], mesh: Mesh, rules: Sequence,
              min_shard_size: int = 0, path: str = '') -> P:
  """Logical PartitionSpec of one array -> mesh PartitionSpec.

  Dimensions that do not divide evenly over their mesh axes stay replicated
  (logged once per array), and arrays under `min_shard_size` elements are
  replicated whole.
  """
  if math.prod(shape) < max(min_shard_size, 1) or not len(shape):
    return P()
  axes = nn.logical_to_mesh_axes(tuple(logical), rules)
  out = []
  for dim, target in zip(shape, tuple(axes) + (None,) * len(shape)):
    target = _drop_absent(mesh, target)
    if target is not None and dim % _axis_size(mesh, target):
      logging.warning('%s: dim %d of %s does not divide over mesh axes %s '
                      '(size %d); kept replicated.', path, dim, tuple(shape),
                      target, _axis_size(mesh, target))
      target = None
    out.append(target)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _fsdp_fallback(spec: P, shape, mesh: Mesh) -> P:
  """FSDP for a large param whose named axes did not reach `fsdp` (the
  stacked (layers, mlp) bias of a scanned MLP when `tensor` is 1): its
  largest free dimension that divides evenly goes to `fsdp`."""
  size = mesh.shape.get('fsdp', 1)
  used = {a for e in spec for a in (e if isinstance(e, tuple) else (e,))}
  if size == 1 or 'fsdp' in used:
    return spec
  entries = list(spec) + [None] * (len(shape) - len(spec))
  free = [d for d in range(len(shape))
          if entries[d] is None and shape[d] % size == 0]
  if not free:
    return spec
  entries[max(free, key=lambda d: (shape[d], d))] = 'fsdp'
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def param_shardings(logical_specs, abstract_params, mesh: Mesh,
                    rules: Sequence, min_shard_size: int = 0):
  """Tree of NamedShardings for the params from their logical specs.

  Every param of `min_shard_size` elements or more ends up split over
  `fsdp` when the mesh has that axis: by its rules, or else along its
  largest evenly dividing free dimension.
  """
  check_param_specs(logical_specs, abstract_params, rules)
  return jax.tree_util.tree_map_with_path(
      functools.partial(_leaf_sharding, mesh, rules, min_shard_size),
      logical_specs, abstract_params, is_leaf=lambda x: isinstance(x, P))


def check_param_specs(logical_specs, abstract_params, rules: Sequence):
  """Raises if a param has no logical names or names an axis without a
  rule."""
  check_rules(rules, logical_names(logical_specs))
  bare = [jax.tree_util.keystr(p) for (p, spec), leaf in zip(
      jax.tree_util.tree_flatten_with_path(
          logical_specs, is_leaf=lambda x: isinstance(x, P))[0],
      jax.tree.leaves(abstract_params)) if len(leaf.shape) and not len(spec)]
  if bare:
    raise ValueError(
        f'Params without logical axis names: {bare[:8]}; create them with '
        'nn.with_logical_partitioning(init, names) (see models/layers.py), '
        'None for a dimension that is never sharded.')


def _leaf_sharding(mesh: Mesh, rules: Sequence, min_shard_size: int, path,
                   spec: P, leaf) -> NamedSharding:
  name = jax.tree_util.keystr(path)
  spec = mesh_spec(spec, leaf.shape, mesh, rules, min_shard_size, name)
  if math.prod(leaf.shape) >= max(min_shard_size, 1):
    spec = _fsdp_fallback(spec, leaf.shape, mesh)
  return NamedSharding(mesh, spec)


def state_shardings(logical_specs, abstract_state, mesh: Mesh,
                    rules: Sequence, min_shard_size: int = 0):
  """NamedShardings of a whole train state from its leaves' logical specs
  (`nn.get_partition_spec` of the state traced with boxed params: the
  optimizer moments and EMA copies carry their params' axes).

  The params must all be named (see `param_shardings`); every leaf gets
  the same treatment as a param: small arrays replicated, indivisible
  dimensions replicated (logged), large arrays split over `fsdp`. Leaves
  without names (step counters) are replicated unless large.
  """
  check_param_specs(logical_specs.params, abstract_state.params, rules)
  return jax.tree_util.tree_map_with_path(
      functools.partial(_leaf_sharding, mesh, rules, min_shard_size),
      logical_specs, abstract_state, is_leaf=lambda x: isinstance(x, P))


def per_device_bytes(abstract_tree, shardings=None) -> int:
  """Bytes one device holds of a tree with these shardings (None: the
  whole arrays, as on a single device)."""
  leaves = jax.tree.leaves(abstract_tree)
  shards = [None] * len(leaves) if shardings is None else jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  total = 0
  for leaf, sh in zip(leaves, shards):
    shape = tuple(leaf.shape) if sh is None else sh.shard_shape(
        tuple(leaf.shape))
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return int(total)


# ---------------------------------------------------------------------------
# Activation constraints.


def activation_rules(rules: Sequence, mesh: Mesh) -> tuple:
  """The logical rules for `nn.logical_axis_rules` while tracing a step on
  `mesh`: mesh axes the mesh lacks (or has with size 1) are dropped, so a
  rule for `tensor` on a data-parallel mesh means replicated. The layers
  call `nn.with_logical_constraint`, which is the identity outside the
  context (parity replays, single-device tools)."""
  return tuple((name, _drop_absent(mesh, target)) for name, target in rules)

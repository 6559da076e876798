"""Device mesh and data sharding (jax.sharding; no pmap).

M1 scope: a mesh built from `config.mesh`, the batch split over the data
axes, parameters replicated. Logical-axis rules and FSDP build on this.
"""

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def make_mesh(mesh_config: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """Builds a Mesh from [(axis, size), ...]; one size may be -1 (inferred).

  Raises:
    ValueError: unknown axis names, several -1, or sizes whose product is
      not the device count.
  """
  devices = jax.devices() if devices is None else devices
  names = [a for a, _ in mesh_config]
  sizes = [int(s) for _, s in mesh_config]
  bad = [a for a in names if a not in MESH_AXES]
  if bad:
    raise ValueError(f'Unknown mesh axes {bad}; use names from {MESH_AXES}.')
  if sizes.count(-1) > 1:
    raise ValueError(f'At most one mesh axis may be -1, got {mesh_config}.')
  known = int(np.prod([s for s in sizes if s != -1]))
  n = len(devices)
  if -1 in sizes:
    if n % known:
      raise ValueError(f'Mesh {mesh_config}: {n} devices are not divisible '
                       f'by the fixed axis sizes (product {known}).')
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(
        f'Mesh {dict(zip(names, sizes))} has {int(np.prod(sizes))} slots but '
        f'there are {n} devices; make the sizes multiply to {n} or set one '
        'to -1.')
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
  """Per-process numpy batch -> global jax.Arrays with `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}

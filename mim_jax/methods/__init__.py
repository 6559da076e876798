"""The registry of MIM methods: name -> package exporting `METHOD`.

The one place that lists the methods. Generic code calls `get(name)`; it
never imports a method package (import-linter checks this in CI, see
pyproject.toml). Adding a method = a package under mim_jax/methods/ and one
line here.
"""

import importlib

from mim_jax import errors
from mim_jax import method as method_lib

REGISTRY = {
    'mae': 'mim_jax.methods.mae',
    'cae': 'mim_jax.methods.cae',
    'bootmae': 'mim_jax.methods.bootmae',
    # The evaluation task (fine-tuning, probes) on any method's encoder.
    'classifier': 'mim_jax.methods.classifier',
}


def get(name: str) -> method_lib.Method:
  """The `Method` record registered under `name` (`config.model_name`).

  Raises:
    ValueError: unknown name (with the known ones), or a package whose
      METHOD is not a `mim_jax.method.Method` named `name`.
  """
  if name not in REGISTRY:
    raise errors.ConfigError(
        f'Unknown method {name!r} (config.model_name); known: '
        f'{sorted(REGISTRY)}. A new method is registered in '
        'mim_jax/methods/__init__.py.')
  return load(REGISTRY[name], name)


def load(module_path: str, name: str) -> method_lib.Method:
  """METHOD of the package `module_path`, checked to be `name`'s record."""
  module = importlib.import_module(module_path)
  record = module.METHOD
  if not isinstance(record, method_lib.Method) or record.name != name:
    raise TypeError(f'{module_path}.METHOD must be a mim_jax.method.Method '
                    f'named {name!r}, got {record!r:.80}.')
  return record


def register(name: str, module_path: str) -> None:
  """Adds a method defined outside this package (e.g. in a research repo or
  a test) to the registry."""
  if name in REGISTRY and REGISTRY[name] != module_path:
    raise ValueError(f'method {name!r} is already registered as '
                     f'{REGISTRY[name]}.')
  REGISTRY[name] = module_path

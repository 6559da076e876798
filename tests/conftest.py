"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Tiny models: XLA's optimisation passes cost more compile time than they
# save at run time (the suite runs about 15% faster). Subprocesses inherit it.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')


class PipelineCrash(Exception):
  """Raised by a training pipeline made by `crash_train_pipeline`."""


def crash_train_pipeline(monkeypatch, after_batches: int):
  """Makes `input_pipeline.make_train_dataset` give pipelines that raise
  PipelineCrash when batch `after_batches` (0-based) is asked for: a run
  killed mid-training, after its earlier checkpoints.

  Returns:
    A function that restores the real pipeline.
  """
  from mim_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  real = input_pipeline.make_train_dataset

  def crashing(*args, **kw):
    ds = real(*args, **kw)

    class Wrapped:

      def as_numpy_iterator(self):
        for i, batch in enumerate(ds.as_numpy_iterator()):
          if i == after_batches:
            raise PipelineCrash()
          yield batch

    return Wrapped()

  monkeypatch.setattr(input_pipeline, 'make_train_dataset', crashing)
  return lambda: monkeypatch.setattr(input_pipeline, 'make_train_dataset',
                                     real)

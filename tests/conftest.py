"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os
import sys

import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Tiny models: XLA's optimisation passes cost more compile time than they
# save at run time (the suite runs about 15% faster). Subprocesses inherit it.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# JAX's persistent compilation cache, shared by the xdist workers and the
# CLI subprocesses (they inherit the environment): many tests build the same
# tiny programs (every resume test compiles its run twice). The cache is
# keyed by the program, the compile options, XLA_FLAGS and the jax version.
# No size limit: a limit turns on jax's LRU eviction, which lists and reads
# the whole folder at every write (quadratic: a fresh clone's suite writes
# about 3,000 entries and ran no faster with it). Without it there is no
# file lock either; an entry read while another worker writes it fails to
# decompress, and jax then warns and compiles instead. Programs that compile
# in under 0.1 s are not worth a file.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(ROOT, '.pytest_cache', 'jax_compilation'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')

# The modules with the longest tests (CLI runs, Colabs, curves runs), run
# first: the two xdist workers then end on short tests instead of one
# waiting for the other's last long one. Each module's tests stay together
# (module-scoped fixtures are set up once) and in their own order.
HEAVY_FIRST = ('colab_test', 'curves_methods_test', 'operations_test',
               'faults_test', 'train_test', 'multihost_test',
               'benchmarks_test', 'finetune_test')


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.splitext(os.path.basename(str(item.fspath)))[0]
    return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(
        HEAVY_FIRST)

  items.sort(key=rank)  # stable: the rest keep the collection order


class PipelineCrash(Exception):
  """Raised by a training pipeline made by `crash_train_pipeline`."""


def wrap_train_pipeline(monkeypatch, change):
  """Makes `input_pipeline.make_train_dataset` give pipelines whose batch i
  (0-based) is `change(i, batch)` (which may also raise).

  Returns:
    A function that restores the real pipeline.
  """
  from mim_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  real = input_pipeline.make_train_dataset

  def wrapped(*args, **kw):
    ds = real(*args, **kw)

    class Wrapped:

      def as_numpy_iterator(self):
        for i, batch in enumerate(ds.as_numpy_iterator()):
          yield change(i, batch)

    return Wrapped()

  monkeypatch.setattr(input_pipeline, 'make_train_dataset', wrapped)
  return lambda: monkeypatch.setattr(input_pipeline, 'make_train_dataset',
                                     real)


def crash_train_pipeline(monkeypatch, after_batches: int):
  """Pipelines that raise PipelineCrash when batch `after_batches` (0-based)
  is asked for: a run killed mid-training, after its earlier checkpoints.

  Returns:
    A function that restores the real pipeline.
  """

  def crash(i, batch):
    if i == after_batches:
      raise PipelineCrash()
    return batch

  return wrap_train_pipeline(monkeypatch, crash)


def tiny_mae_config(**kw):
  """The tiny MAE recipe, shortened for tests: batch 8, 6 steps (warmup 2),
  a log row every step, a synchronous checkpoint every 2 steps, no kNN
  monitor (it costs a run seconds; train_test's CLI run keeps it); `kw`
  overrides top-level fields."""
  from mim_jax.methods.mae import config  # pylint: disable=g-import-not-at-top
  c = config.get_config('tiny')
  c.input.batch_size = 8
  c.total_steps = 6
  c.warmup_steps = 2
  c.log_every_steps = 1
  c.ckpt_every_steps = 2
  c.vis_every_steps = 100
  c.async_ckpt = False
  c.knn.data = None
  c.update(kw)
  return c


CURVES = os.path.join(FIXTURES, 'curves_mae_tiny')
# The short run of the reference recipe: its first 2 epochs (of 15).
CURVES_SHORT_EPOCHS = 2


def _train_curves_short(workdir: str, method: str = 'mae'):
  from mim_jax import config_lib  # pylint: disable=g-import-not-at-top
  from mim_jax import train  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file(
      os.path.join(ROOT, 'configs', f'{method}_curves_tiny.py'))
  c.stop_after_steps = 32 * CURVES_SHORT_EPOCHS
  c.peak_tflops = 0.5  # so that train/mfu is logged (tests/curves_test.py)
  c.async_ckpt = False
  train.train_and_evaluate(c, workdir)


def shared_curves_short(tmp_path_factory, worker_id, method: str) -> str:
  """A workdir of `configs/<method>_curves_tiny.py` stopped after 2 epochs
  (the schedule still spans 15), trained once for the whole session,
  whatever the number of xdist workers (a file lock guards the shared
  folder)."""
  import filelock  # pylint: disable=g-import-not-at-top
  shared = tmp_path_factory.getbasetemp()
  if worker_id != 'master':
    shared = shared.parent
  name = 'curves_short' if method == 'mae' else f'curves_short_{method}'
  workdir = str(shared / name)
  with filelock.FileLock(workdir + '.lock'):
    if not os.path.exists(os.path.join(workdir, 'done')):
      _train_curves_short(workdir, method)
      open(os.path.join(workdir, 'done'), 'w').close()
  return workdir


@pytest.fixture(scope='session')
def curves_short_workdir(tmp_path_factory, worker_id):
  """The MAE reference recipe's first 2 epochs (shared_curves_short)."""
  return shared_curves_short(tmp_path_factory, worker_id, 'mae')


def write_parquet_shards(folder, split, images, labels=None, *, shards=2,
                         row_group=3, classes=0):
  """Writes `images` ([bytes]) as `<split>-0000i-of-0000n.parquet` files of
  the Hugging Face layout (image = {bytes, path}, label; `classes`: the
  ClassLabel names in the `huggingface` metadata) in folder/data, row
  groups of `row_group` rows. Returns `folder`."""
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(folder, 'data'), exist_ok=True)
  columns = {'image': [{'bytes': b, 'path': None} for b in images]}
  if labels is not None:
    columns['label'] = pa.array(labels, pa.int64())
  table = pa.table(columns)
  if classes:
    features = {'image': {'_type': 'Image'},
                'label': {'_type': 'ClassLabel',
                          'names': [str(i) for i in range(classes)]}}
    table = table.replace_schema_metadata({'huggingface': json.dumps(
        {'info': {'features': features}})})
  bounds = np.linspace(0, len(images), shards + 1).astype(int)
  for i in range(shards):
    pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]),
                   os.path.join(folder, 'data', f'{split}-{i:05d}-of-'
                                f'{shards:05d}.parquet'),
                   row_group_size=row_group)
  return folder

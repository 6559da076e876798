r"""Our block-wise masks against the official generators, as distributions.

For the two tiny recipes of the reference curves (configs/cae_curves_tiny.py,
configs/bootmae_curves_tiny.py; 8x8 patch grid), draws `--num` masks from
the official generators, imported at run time from checkouts given on the
command line (nothing of theirs is copied here), and `--num` of ours,
drawn the way training draws them (below), and compares their statistics.

  python benchmarks/mask_distribution.py --upstream_cae=/tmp/ref_cae_m \
      --upstream_bootmae=/tmp/ref_bootmae_m --num=10000 \
      [--json=benchmarks/results/mask_distribution.json] [--write_reference]
  python benchmarks/mask_distribution.py --smoke   # ours vs the stored
                                                   # reference; no upstream

Upstream (checkouts):
  CAE: Atten4Vis/CAE @ a7fd162, furnace/masking_generator.py,
    MaskingGenerator((8, 8), num_masking_patches=32, min_num_patches=5,
    max_num_patches=None).
  BootMAE: LightDXY/BootMAE @ d604b18, masking_generator.py,
    MaskingGenerator((8, 8), 39, min_num_patches=5, max_num_patches=20)
    (the block stage), then utils.mask_to_index (random padding + a roll of
    0..3) with mask_len 48: the last 48 entries of idx_shuffle are masked
    (run_pretraining.py / the model's forward: idx_shuffle[:, 1 + 16:]).
    Upstream calls mask_to_index once per batch (one roll per batch); here
    it is called once per mask, so every draw is independent (the chi-square
    tests need that) and has the per-mask distribution of training.
  Python `random` and torch are seeded with --seed; the block masks are all
  drawn first, then the padding.
  In-process shims, for this CPU torch 2 / numpy 2: `np.int = int`
  (masking_generator), a `torch._six` module with `inf`, a `tensorboardX`
  stub (both imported by utils.py at import time) and Tensor.cuda = identity
  when CUDA is absent (mask_to_index calls `.cuda()`).

Ours: `input_pipeline.validate_config(config.input, patch_size=...)` builds
the mask function exactly as training does; each mask i is keyed as
`make_train_dataset` keys example i (step i // batch, index i % batch, the
third key of the split) and goes through the mask's per-example stage,
tf.data batching (input.batch_size) and its per-batch stage. The first
batch is checked to be identical to the 'mask' of the real
`make_train_dataset` batch (`pipeline_identical`, full runs only). The
BootMAE block stage is the same mask config without the random padding
(`extra_random` off, no ratio), drawn from the same keys: its block masks
are those the padding starts from.

Statistics, identical for both, from boolean (N, 8, 8) masks: histograms of
the number of masked patches, of the number of 4-connected components
(scipy.ndimage.label), of component sizes (over all components), of the
aspect ratio h / w of component bounding boxes (fixed bins
ASPECT_EDGES), and the per-position masking frequency. Tests: two-sample
chi-square per histogram (bins merged left to right until every expected
count is >= 5; p = 1 when both samples sit in one single bin); per position
z = (f_ours - f_upstream) / binomial std (pooled), reported as max |z| with
its Bonferroni p-value over the 64 positions. Component sizes and aspects
pool several components per mask, which are not independent draws: their
chi-square gets a second-order Rao-Scott correction (`design_effect`, from
the per-mask counts of our sample; the same under the null hypothesis).
Checked on ours against ours (300 pairs of 4,000 masks per recipe): the
p-values of every test are uniform (without the correction, 13-17% of
the component-size p-values fell under 0.05).

--write_reference stores upstream's statistics (counts + N, per-position
counts and frequencies) in tests/fixtures/curves_{cae,bootmae}_tiny/
mask_stats.json; --smoke draws a few of ours (--num, default 500) and
compares them with those files (tests/mask_distribution_test.py uses both).
Prints one JSON object (its last line); `ok` is False when a p-value is
below --min_p.
"""

import argparse
import ast
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

GRID = 8
NUM_PATCHES = GRID * GRID
# Fixed aspect-ratio (h / w) bins: none of these edges equals a ratio p / q
# of two integers in 1..8, so no bounding box sits on an edge.
_HALF = (1.1, 1.45, 1.9, 2.6, 3.6, 5.5)
ASPECT_EDGES = tuple(1.0 / e for e in reversed(_HALF)) + _HALF
HISTOGRAMS = ('num_masked', 'num_components', 'component_size', 'aspect')

RECIPES = {
    'cae': dict(
        config='cae_curves_tiny',
        fixture=os.path.join('tests', 'fixtures', 'curves_cae_tiny',
                             'mask_stats.json'),
        upstream=('Atten4Vis/CAE @ a7fd162, furnace/masking_generator.py '
                  'MaskingGenerator((8, 8), num_masking_patches=32, '
                  'min_num_patches=5, max_num_patches=None)'),
        stages=('block',)),
    'bootmae': dict(
        config='bootmae_curves_tiny',
        fixture=os.path.join('tests', 'fixtures', 'curves_bootmae_tiny',
                             'mask_stats.json'),
        upstream=('LightDXY/BootMAE @ d604b18, masking_generator.py '
                  'MaskingGenerator((8, 8), num_masking_patches=39, '
                  'min_num_patches=5, max_num_patches=20), then '
                  'utils.mask_to_index (one call per mask) with mask_len 48: '
                  'the last 48 entries of idx_shuffle are masked'),
        stages=('block', 'effective')),
}
CAE_PARAMS = dict(num_masking_patches=32, min_num_patches=5,
                  max_num_patches=None)
BOOTMAE_PARAMS = dict(num_masking_patches=39, min_num_patches=5,
                      max_num_patches=20)
BOOTMAE_MASK_LEN = 48


# ----------------------------------------------------------------- statistics


def components(masks: np.ndarray) -> dict:
  """The 4-connected components of boolean masks (N, 8, 8): per component,
  its mask ('owner'), size and bounding-box aspect bin; per mask, the
  number of components and of masked patches."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  masks = np.asarray(masks).astype(bool).reshape(-1, GRID, GRID)
  n = masks.shape[0]
  # 4-connectivity inside each mask, none across masks.
  structure = np.zeros((3, 3, 3), bool)
  structure[1] = ndimage.generate_binary_structure(2, 1)
  labels, num = ndimage.label(masks, structure=structure)
  objects = ndimage.find_objects(labels)
  heights = np.array([s[1].stop - s[1].start for s in objects], np.float64)
  widths = np.array([s[2].stop - s[2].start for s in objects], np.float64)
  owner = np.array([s[0].start for s in objects], np.int64)
  return {
      'n': n,
      'masks': masks.reshape(n, -1),
      'owner': owner,
      'component_size': np.bincount(labels.ravel(), minlength=num + 1)[1:],
      # bin b: ASPECT_EDGES[b - 1] <= h / w < ASPECT_EDGES[b].
      'aspect': np.searchsorted(ASPECT_EDGES, heights / widths,
                                side='right'),
      'num_components': np.bincount(owner, minlength=n),
      'num_masked': masks.sum((1, 2)),
  }


def mask_stats(masks) -> dict:
  """Statistics of boolean masks (N, 8, 8) (or of their `components`):
  histograms as counts + N, per-position counts and frequencies."""
  comp = masks if isinstance(masks, dict) else components(masks)
  n, flat = comp['n'], comp['masks']
  return {
      'n': int(n),
      'num_masked': np.bincount(comp['num_masked'],
                                minlength=NUM_PATCHES + 1).tolist(),
      'num_components': np.bincount(comp['num_components'],
                                    minlength=NUM_PATCHES + 1).tolist(),
      'component_size': np.bincount(comp['component_size'],
                                    minlength=NUM_PATCHES + 1).tolist(),
      'aspect': np.bincount(comp['aspect'],
                            minlength=len(ASPECT_EDGES) + 1).tolist(),
      'position_counts': flat.sum(0).astype(int).tolist(),
      'position_freq': [round(float(f), 6) for f in flat.mean(0)],
  }


def summary(stats: dict) -> dict:
  """Means of a few statistics, for reading."""
  def mean(hist):
    hist = np.asarray(hist, np.float64)
    return round(float((np.arange(len(hist)) * hist).sum() / hist.sum()), 4)
  return {'mean_masked': mean(stats['num_masked']),
          'mean_components': mean(stats['num_components']),
          'mean_component_size': mean(stats['component_size']),
          'components_total': int(sum(stats['component_size']))}


def merge_bins(a: np.ndarray, b: np.ndarray,
               min_expected: float) -> np.ndarray:
  """Groups adjacent bins (left to right, skipping bins empty in both)
  until every expected count of the 2 x K table is >= min_expected; a short
  last group joins the one before it. Returns the group of each bin (-1:
  empty in both)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  factor = min(a.sum(), b.sum()) / (a.sum() + b.sum())
  group = np.full(len(a), -1, np.int64)
  g, pending = 0, 0.0
  for k in range(len(a)):
    if a[k] + b[k] == 0:
      continue
    group[k], pending = g, pending + a[k] + b[k]
    if pending * factor >= min_expected:
      g, pending = g + 1, 0.0
  if pending and g > 0:  # a short last group joins the one before it
    group[group == g] = g - 1
  return group


def design_effect(per_mask: np.ndarray) -> tuple[float, float]:
  """Second-order Rao-Scott correction of a histogram pooled over masks.

  per_mask: (n, K) counts of each mask's components in each (merged) bin.
  The components of one mask are not independent draws: the chi-square is
  a sum of lambda_i chi2_1 terms, lambda the eigenvalues of the cluster
  (per-mask) covariance of the bin shares over their multinomial
  covariance (first K - 1 bins). Returns (mean lambda, a2), a2 the squared
  coefficient of variation of lambda: chi2 / (mean lambda * (1 + a2)) is
  about chi-square with (K - 1) / (1 + a2) degrees of freedom
  (Satterthwaite).
  """
  per_mask = np.asarray(per_mask, np.float64)
  per_mask = per_mask[:, per_mask.sum(0) > 0]  # bins this sample has
  n = per_mask.shape[0]
  if per_mask.shape[1] < 2:
    return 1.0, 0.0
  m = per_mask.sum(1)
  total = m.sum()
  p = per_mask.sum(0) / total
  resid = (per_mask - p[None, :] * m[:, None])[:, :-1]
  cluster_cov = n / (n - 1) * resid.T @ resid / total ** 2
  srs_cov = (np.diag(p[:-1]) - np.outer(p[:-1], p[:-1])) / total
  lam = np.linalg.eigvals(np.linalg.solve(srs_cov, cluster_cov)).real
  mean = float(lam.mean())
  return mean, float(lam.var() / mean ** 2)


def chi2_two_sample(a, b, min_expected: float = 5.0,
                    clusters=None) -> dict:
  """Two-sample chi-square test of histograms `a` and `b` (counts).

  clusters: for histograms pooled over masks (components), (owner, bin, n):
  the mask and the bin of each component of sample `a` and its number of
  masks, for the Rao-Scott correction (`design_effect`; the same under the
  null hypothesis for both samples); None for one value per mask.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  group = merge_bins(a, b, min_expected)
  num_groups = int(group.max()) + 1
  if num_groups < 2:
    # Both samples in one single bin (e.g. an exact count): identical.
    return {'p': 1.0, 'chi2': 0.0, 'dof': 0, 'bins': num_groups}
  keep = group >= 0
  table = np.zeros((2, num_groups))
  np.add.at(table[0], group[keep], a[keep])
  np.add.at(table[1], group[keep], b[keep])
  chi2, _, dof, _ = stats.chi2_contingency(table, correction=False)
  out = {'bins': num_groups, 'dof': int(dof), 'chi2': round(float(chi2), 3)}
  if clusters is not None:
    owner, value, n = clusters
    per_mask = np.zeros((n, num_groups))
    np.add.at(per_mask, (owner, group[value]), 1.0)
    deff, a2 = design_effect(per_mask)
    out['design_effect'] = round(deff, 3)
    chi2, dof = chi2 / (deff * (1 + a2)), dof / (1 + a2)
    out['dof_corrected'] = round(dof, 2)
  out['p'] = float(stats.chi2.sf(chi2, dof))
  return out


def position_test(counts_a, n_a: int, counts_b, n_b: int) -> dict:
  """Per-position frequency difference against its binomial std."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  ca = np.asarray(counts_a, np.float64)
  cb = np.asarray(counts_b, np.float64)
  fa, fb = ca / n_a, cb / n_b
  pooled = (ca + cb) / (n_a + n_b)
  std = np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
  diff = fa - fb
  z = np.where(std > 0, diff / np.where(std > 0, std, 1), 0.0)
  worst = int(np.argmax(np.abs(z)))
  max_z = float(abs(z[worst]))
  return {
      'max_abs_diff': round(float(np.abs(diff).max()), 5),
      'max_abs_z': round(max_z, 3),
      'worst_position': [worst // GRID, worst % GRID],
      'p': float(min(1.0, NUM_PATCHES * 2 * stats.norm.sf(max_z))),
      'binomial_std_mean': round(float(std.mean()), 5),
  }


def compare(ours, reference: dict, min_expected: float = 5.0) -> dict:
  """All tests of `ours` against `reference` (`mask_stats`); `ours` may be
  `components(...)` (then pooled histograms get a design effect)."""
  comp = ours if 'owner' in ours else None
  if comp is not None:
    ours = mask_stats(comp)
  out = {}
  for name in HISTOGRAMS:
    clusters = None
    if comp is not None and name in ('component_size', 'aspect'):
      clusters = (comp['owner'], comp[name], comp['n'])
    out[name] = chi2_two_sample(ours[name], reference[name], min_expected,
                                clusters)
  out['position_freq'] = position_test(
      ours['position_counts'], ours['n'], reference['position_counts'],
      reference['n'])
  return out


def min_p(comparison: dict) -> float:
  return min(v['p'] for v in comparison.values())


# ----------------------------------------------------------------------- ours


def load_config(recipe: str):
  """The recipe's training config (configs/<name>.py)."""
  path = os.path.join(ROOT, 'configs', RECIPES[recipe]['config'] + '.py')
  spec = importlib.util.spec_from_file_location(
      'mask_distribution_' + RECIPES[recipe]['config'], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _block_stage(mask_config) -> dict:
  """The BootMAE mask config without its random padding (the block stage):
  the same per-example mask seeds, so the same block masks."""
  config = dict(mask_config.to_dict() if hasattr(mask_config, 'to_dict')
                else mask_config)
  config.update(extra_random=False, total_masked=None, ratio=None)
  return config


def draw_ours(recipe: str, num: int, seed: int = 0,
              stage: str = 'effective') -> np.ndarray:
  """`num` of our masks for `recipe`, bool (num, 8, 8), keyed as training
  keys examples 0..num-1 (see the module docstring). stage 'block' is
  BootMAE's block stage; CAE has one stage."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mim_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from mim_jax.data import masks  # pylint: disable=g-import-not-at-top
  from mim_jax.data import seeds  # pylint: disable=g-import-not-at-top
  from mim_jax.models import vit  # pylint: disable=g-import-not-at-top
  config = load_config(recipe)
  patch_size = vit.patch_size_of(config.model)
  image_size, mask_fn, batch = input_pipeline.validate_config(
      config.input, patch_size=patch_size, process_count=1)
  grid = image_size // patch_size
  if grid != GRID:
    raise ValueError(f'{recipe}: a {grid}x{grid} grid, expected {GRID}.')
  if stage == 'block' and recipe == 'bootmae':
    mask_fn = masks.make_mask_fn(_block_stage(config.input.mask), grid)
  per_example, per_batch = masks.stages(mask_fn)
  train_key = seeds.base_key(seed, seeds.TRAIN)

  def keyed(i):  # as input_pipeline.make_train_dataset, process 0 of 1
    key = seeds.fold_in(train_key, i // batch, i % batch)
    _, _, mask_key = tf.unstack(
        tf.random.experimental.stateless_split(key, 3))
    return per_example(mask_key)

  ds = tf.data.Dataset.range(num).map(keyed).batch(batch)
  if per_batch is not None:
    ds = ds.map(per_batch)
  out = np.concatenate([b['mask'] for b in ds.as_numpy_iterator()])
  return out.reshape(-1, GRID, GRID) > 0.5


def pipeline_identical(recipe: str, seed: int = 0) -> bool:
  """Whether the first training batch's 'mask' (the real
  `make_train_dataset`) equals our first `batch` draws."""
  from mim_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from mim_jax.models import vit  # pylint: disable=g-import-not-at-top
  config = load_config(recipe)
  ds = input_pipeline.make_train_dataset(
      config.input, patch_size=vit.patch_size_of(config.model), seed=seed,
      process_index=0, process_count=1)
  real = next(ds.as_numpy_iterator())['mask'].reshape(-1, GRID, GRID) > 0.5
  return bool(np.array_equal(real, draw_ours(recipe, len(real), seed)))


# ------------------------------------------------------------------- upstream


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def _load_file(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _install_shims() -> list[str]:
  """What upstream needs on CPU torch 2 / numpy 2, in this process."""
  import torch  # pylint: disable=g-import-not-at-top
  shims = []
  if not hasattr(np, 'int'):
    np.int = int  # masking_generator: np.zeros(..., dtype=np.int)
    shims.append('np.int = int')
  if 'torch._six' not in sys.modules:
    try:
      importlib.import_module('torch._six')
    except ImportError:
      six = types.ModuleType('torch._six')
      six.inf = math.inf
      sys.modules['torch._six'] = six
      shims.append('torch._six stub (inf)')
  try:
    importlib.import_module('tensorboardX')
  except ImportError:
    tbx = types.ModuleType('tensorboardX')

    class SummaryWriter:  # pylint: disable=too-few-public-methods
      def __init__(self, *a, **k):
        raise RuntimeError('tensorboardX stub')
    tbx.SummaryWriter = SummaryWriter
    sys.modules['tensorboardX'] = tbx
    shims.append('tensorboardX stub')
  if not torch.cuda.is_available():
    torch.Tensor.cuda = lambda self, *a, **k: self
    shims.append('Tensor.cuda = identity (no CUDA)')
  return shims


def upstream_cae(path: str, num: int, seed: int) -> tuple[dict, dict]:
  """CAE's block masks: (stages {'block': bool (num, 8, 8)}, provenance)."""
  import random  # pylint: disable=g-import-not-at-top
  if os.path.basename(os.path.normpath(path)) != 'furnace':
    path = os.path.join(path, 'furnace')
  source = os.path.join(path, 'masking_generator.py')
  module = _load_file('upstream_cae_masking_generator', source)
  gen = module.MaskingGenerator((GRID, GRID), **CAE_PARAMS)
  random.seed(seed)
  block = np.stack([gen() for _ in range(num)]).astype(bool)
  return {'block': block}, {'masking_generator.py': _sha256(source),
                            'generator': repr(gen)}


def _mask_to_index(utils_path: str):
  """utils.mask_to_index from the checkout: the module imported (with the
  shims), or, if that fails, that one function's source from the file
  executed with utils.py's own imports (torch, random)."""
  try:
    return _load_file('upstream_bootmae_utils', utils_path).mask_to_index, (
        'import utils.py')
  except Exception as e:  # pylint: disable=broad-except
    import random  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    with open(utils_path) as f:
      tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
              and n.name == 'mask_to_index')
    namespace = {'torch': torch, 'random': random}
    exec(compile(ast.Module([fn], []), utils_path, 'exec'), namespace)  # pylint: disable=exec-used
    return namespace['mask_to_index'], (
        f'import utils.py failed ({type(e).__name__}: {e}); mask_to_index '
        'alone from its source')


def upstream_bootmae(path: str, num: int, seed: int) -> tuple[dict, dict]:
  """BootMAE's block and effective masks (see the module docstring)."""
  import random  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  shims = _install_shims()
  source = os.path.join(path, 'masking_generator.py')
  utils_path = os.path.join(path, 'utils.py')
  module = _load_file('upstream_bootmae_masking_generator', source)
  mask_to_index, how = _mask_to_index(utils_path)
  gen = module.MaskingGenerator((GRID, GRID), **BOOTMAE_PARAMS)
  random.seed(seed)
  torch.manual_seed(seed)
  block = np.stack([gen() for _ in range(num)]).astype(bool)
  effective = np.zeros((num, NUM_PATCHES), bool)
  for i in range(num):
    idx_shuffle = mask_to_index(
        torch.from_numpy(block[i].reshape(1, NUM_PATCHES).astype(np.int64)))
    effective[i, idx_shuffle[0, NUM_PATCHES - BOOTMAE_MASK_LEN:].numpy()] = True
  return ({'block': block, 'effective': effective.reshape(-1, GRID, GRID)},
          {'masking_generator.py': _sha256(source), 'utils.py':
           _sha256(utils_path), 'mask_to_index': how, 'shims': shims,
           'generator': repr(gen)})


# ----------------------------------------------------------------------- main


def _dumps(doc: dict) -> str:
  """JSON, indented, with each list of numbers on one line."""
  text = json.dumps(doc, indent=1)
  return re.sub(r'\[\s+([-+\d.,\seE]+?)\s+\]',
                lambda m: '[' + ' '.join(m.group(1).split()) + ']', text) + '\n'


def _fixture_path(recipe: str) -> str:
  return os.path.join(ROOT, RECIPES[recipe]['fixture'])


def write_reference(recipe: str, stats: dict, provenance: dict, num: int,
                    seed: int) -> str:
  path = _fixture_path(recipe)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  doc = {
      'description': (
          'Statistics of the official block-mask generator of this recipe '
          '(histograms as counts over `n` masks, per-position counts and '
          'frequencies, row-major 8x8), made by benchmarks/'
          'mask_distribution.py --write_reference; read by tests/'
          'mask_distribution_test.py. Bins: num_masked, num_components and '
          'component_size are indexed by the value (0..64); aspect (h / w of '
          'the bounding boxes of the 4-connected components) has the bins '
          'between aspect_edges (plus 0 and infinity).'),
      'upstream': RECIPES[recipe]['upstream'],
      'provenance': provenance,
      'seed': seed, 'num': num,
      'aspect_edges': [round(e, 6) for e in ASPECT_EDGES],
      'stages': stats,
  }
  with open(path, 'w') as f:
    f.write(_dumps(doc))
  return os.path.relpath(path, ROOT)


def read_reference(recipe: str) -> dict:
  with open(_fixture_path(recipe)) as f:
    doc = json.load(f)
  if not np.allclose(doc['aspect_edges'], ASPECT_EDGES, atol=1e-6):
    raise ValueError(f'{recipe}: the stored aspect bins differ from '
                     'ASPECT_EDGES; rerun --write_reference.')
  return doc


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--upstream_cae', help='checkout of Atten4Vis/CAE @ a7fd162')
  p.add_argument('--upstream_bootmae',
                 help='checkout of LightDXY/BootMAE @ d604b18')
  p.add_argument('--num', type=int, default=None,
                 help='draws per generator (default 10000; smoke 500)')
  p.add_argument('--seed', type=int, default=0,
                 help='seeds Python random / torch (upstream) and the '
                 'experiment seed (ours)')
  p.add_argument('--json', default=None, help='also write the JSON here')
  p.add_argument('--write_reference', action='store_true',
                 help="store upstream's statistics in tests/fixtures/"
                 'curves_{cae,bootmae}_tiny/mask_stats.json')
  p.add_argument('--smoke', action='store_true',
                 help='ours only, against the stored reference')
  p.add_argument('--recipes', default='cae,bootmae')
  p.add_argument('--min_p', type=float, default=1e-3,
                 help='`ok` is False when a p-value is below this')
  args = p.parse_args(argv)
  if args.num is None:
    args.num = 500 if args.smoke else 10000
  if not args.smoke and not (args.upstream_cae and args.upstream_bootmae):
    p.error('--upstream_cae and --upstream_bootmae are needed (or --smoke).')
  if args.smoke and args.write_reference:
    p.error('--write_reference needs upstream draws, not --smoke.')
  return args


def main(argv=None):
  args = parse_args(argv)
  recipes = [r for r in args.recipes.split(',') if r]
  out = {'benchmark': 'mask_distribution', 'mode':
         'smoke' if args.smoke else 'full', 'num': args.num,
         'seed': args.seed, 'aspect_edges': [round(e, 4) for e in
                                             ASPECT_EDGES],
         'recipes': {}}
  for recipe in recipes:
    stages = RECIPES[recipe]['stages']
    ours = {s: components(draw_ours(recipe, args.num, args.seed, s))
            for s in stages}
    res = {'upstream': RECIPES[recipe]['upstream']}
    if args.smoke:
      doc = read_reference(recipe)
      reference = doc['stages']
      res['reference'] = RECIPES[recipe]['fixture']
    else:
      draw = upstream_cae if recipe == 'cae' else upstream_bootmae
      path = args.upstream_cae if recipe == 'cae' else args.upstream_bootmae
      masks_up, provenance = draw(path, args.num, args.seed)
      reference = {s: mask_stats(masks_up[s]) for s in stages}
      res['provenance'] = provenance
      res['pipeline_identical'] = pipeline_identical(recipe, args.seed)
      if args.write_reference:
        res['wrote'] = write_reference(recipe, reference, provenance,
                                       args.num, args.seed)
    res['stages'] = {}
    for s in stages:
      res['stages'][s] = {
          'ours': summary(mask_stats(ours[s])),
          'upstream': summary(reference[s]),
          'n_ours': int(ours[s]['n']), 'n_upstream': reference[s]['n'],
          'tests': compare(ours[s], reference[s])}
    out['recipes'][recipe] = res
  out['min_p'] = min(min_p(st['tests']) for r in out['recipes'].values()
                     for st in r['stages'].values())
  out['ok'] = bool(out['min_p'] >= args.min_p and all(
      r.get('pipeline_identical', True) for r in out['recipes'].values()))
  text = json.dumps(out)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      f.write(_dumps(out))
  # One line: the last line of the output is the whole result.
  print(text)
  return out


if __name__ == '__main__':
  main()

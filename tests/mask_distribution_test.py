"""Our block masks against the official generators' distributions.

The masks of the two tiny reference-curve recipes (configs/
cae_curves_tiny.py, configs/bootmae_curves_tiny.py), drawn as training
draws them (the config's mask function, training's per-example keys,
tf.data batching and the per-batch stage: benchmarks/mask_distribution.py
`draw_ours`), are compared with the statistics of 10,000 draws of the
official generators stored in tests/fixtures/curves_{cae,bootmae}_tiny/
mask_stats.json (made by `benchmarks/mask_distribution.py
--write_reference`, which imports the official code from checkouts):
histograms of the masked count, of the 4-connected components per mask,
of component sizes and of their bounding-box aspect ratios (two-sample
chi-square, sparse bins merged, a design effect for the histograms pooled
over components), and the per-position masking frequencies (max |z|,
Bonferroni over the 64 positions). The draws are seeded, so the outcome is
deterministic; a p-value under MIN_P fails.
"""

import os
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import mask_distribution as md  # pylint: disable=g-import-not-at-top,g-bad-import-order

NUM = 3000
SEED = 1
MIN_P = 1e-3
STAGES = [('cae', 'block'), ('bootmae', 'block'), ('bootmae', 'effective')]
TESTS = md.HISTOGRAMS + ('position_freq',)
# Masked patches per mask: the CAE count; BootMAE's block stage and its
# effective mask (block + random patches, 48 of 64).
COUNTS = {('cae', 'block'): 32, ('bootmae', 'block'): 39,
          ('bootmae', 'effective'): 48}


@pytest.fixture(scope='module')
def drawn():
  """{(recipe, stage): bool (NUM, 8, 8) masks} of ours."""
  return {(r, s): md.draw_ours(r, NUM, SEED, s) for r, s in STAGES}


@pytest.fixture(scope='module')
def comparisons(drawn):
  out = {}
  for (recipe, stage), masks in drawn.items():
    reference = md.read_reference(recipe)['stages'][stage]
    out[recipe, stage] = md.compare(md.components(masks), reference)
  return out


@pytest.mark.parametrize('recipe,stage', STAGES)
@pytest.mark.parametrize('test', TESTS)
def test_matches_upstream(comparisons, recipe, stage, test):
  result = comparisons[recipe, stage][test]
  assert result['p'] > MIN_P, (
      f'{recipe} {stage} masks: {test} differs from the official '
      f'generator (p = {result["p"]:.2g}, {result}); see '
      'benchmarks/mask_distribution.py')


@pytest.mark.parametrize('recipe,stage', STAGES)
def test_exact_counts(drawn, recipe, stage):
  counts = drawn[recipe, stage].sum((1, 2))
  np.testing.assert_array_equal(counts, COUNTS[recipe, stage])


def test_effective_mask_extends_the_block_mask(drawn):
  """BootMAE: the roll (0..3) turns at most 3 block patches visible."""
  block, effective = drawn['bootmae', 'block'], drawn['bootmae', 'effective']
  lost = (block & ~effective).sum((1, 2))
  assert lost.min() >= 0 and lost.max() <= 3
  # Every roll happens (P(not seen) ~ 0.75 ** 3000).
  assert set(np.unique(lost)) == {0, 1, 2, 3}


def test_statistics_of_a_known_mask():
  """Two components: a 2x3 block (aspect 2/3) and a 3x1 bar (aspect 3)."""
  mask = np.zeros((1, 8, 8), bool)
  mask[0, 0:2, 0:3] = True
  mask[0, 4:7, 7] = True
  stats = md.mask_stats(mask)
  assert stats['n'] == 1
  assert stats['num_masked'][9] == 1 and sum(stats['num_masked']) == 1
  assert stats['num_components'][2] == 1
  assert stats['component_size'][6] == 1 and stats['component_size'][3] == 1
  # Bin b holds ASPECT_EDGES[b - 1] <= h / w < ASPECT_EDGES[b].
  assert md.ASPECT_EDGES[3] <= 2 / 3 < md.ASPECT_EDGES[4]
  assert md.ASPECT_EDGES[9] <= 3 < md.ASPECT_EDGES[10]
  expected = np.zeros(len(md.ASPECT_EDGES) + 1, int)
  expected[[4, 10]] = 1
  np.testing.assert_array_equal(stats['aspect'], expected)
  assert stats['position_counts'][0] == 1 and sum(
      stats['position_counts']) == 9


def test_chi_square_tells_different_histograms_apart():
  same = md.chi2_two_sample([0, 500, 300, 200], [0, 510, 290, 200])
  other = md.chi2_two_sample([0, 500, 300, 200], [0, 300, 300, 400])
  assert same['p'] > 0.5 and other['p'] < 1e-10
  assert md.chi2_two_sample([0, 40, 0], [0, 70, 0])['p'] == 1.0


def test_benchmark_smoke():
  """The benchmark's --smoke: 300 of ours per stage against the stored
  reference. Its p-values are checked against 1e-4, not MIN_P: 15 tests on
  300 draws are a check of the script (a broken generator gives p-values
  far below that); the tests above, on 3,000 draws, are the statistical
  check."""
  from benchmarks_test import run_smoke  # pylint: disable=g-import-not-at-top
  out = run_smoke('mask_distribution.py', '--num=300', '--min_p=1e-4')
  assert out['benchmark'] == 'mask_distribution' and out['mode'] == 'smoke'
  assert set(out['recipes']) == {'cae', 'bootmae'}
  assert set(out['recipes']['bootmae']['stages']) == {'block', 'effective'}
  for recipe in out['recipes'].values():
    for stage in recipe['stages'].values():
      assert set(stage['tests']) == set(TESTS)
      assert stage['n_ours'] == 300 and stage['n_upstream'] == 10000
      assert all(0 <= t['p'] <= 1 for t in stage['tests'].values())
  assert out['ok'], out

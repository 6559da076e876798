"""Block-wise masks: exact counts, block geometry, determinism, agreement
with a plain port of the upstream loop, and their place in tf.data."""

import random

import numpy as np
import pytest

from mim_jax import input_pipeline
from mim_jax.data import block_masks as bm
from mim_jax.data import masks

CAE = dict(num_masking_patches=98, min_num_patches=16, max_num_patches=None,
           variant='cae')
BOOT = dict(num_masking_patches=120, min_num_patches=16, max_num_patches=60,
            variant='bootmae')
BEIT = dict(num_masking_patches=75, min_num_patches=16, max_num_patches=None,
            variant='beit')


@pytest.mark.parametrize('params', [CAE, BOOT])
def test_exact_variants_mask_exactly_the_target(params):
  out = bm.block_masks(np.arange(500), 14, 14, **params)
  assert out.shape == (500, 196) and out.dtype == np.float32
  np.testing.assert_array_equal(out.sum(1), params['num_masking_patches'])


def test_beit_variant_never_exceeds_and_stays_close_to_the_target():
  counts = bm.block_masks(np.arange(500), 14, 14, **BEIT).sum(1)
  # With min_num_patches=16 the last blocks often cannot fit: upstream ends
  # under 75 in about a third of the masks, by a few patches.
  assert counts.max() == 75 and counts.min() > 55 and counts.mean() > 73


@pytest.mark.parametrize('params', [CAE, BOOT, BEIT])
def test_blocks_respect_sizes_and_aspect_ratios(params):
  max_num, lo, hi = bm.check_params(14, 14, min_aspect=0.3, max_aspect=None,
                                    **params)
  rects = bm.rect_table(14, 14)
  for seed in range(200):
    trace = []
    grid = bm.block_mask(seed, 14, 14, params['num_masking_patches'],
                         params['min_num_patches'], max_num, lo, hi,
                         params['variant'], rects, trace)
    mask = bm.grid_ints_to_masks([grid], 196)[0].reshape(14, 14)
    covered = np.zeros((14, 14))
    for top, left, h, w, new, max_mask in trace:
      assert 0 < new <= max_mask <= max_num
      assert h < 14 and w < 14 and top + h <= 14 and left + w <= 14
      # h, w are rounded sqrt(area * aspect), sqrt(area / aspect): the
      # aspect and the area hold up to that rounding.
      assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3
      assert (h + 0.5) * (w + 0.5) >= min(params['min_num_patches'],
                                          max_mask)
      covered[top:top + h, left:left + w] = 1
    np.testing.assert_array_equal(covered, mask)
    assert sum(t[4] for t in trace) == mask.sum()


def test_deterministic_per_seed_and_different_across_seeds():
  a = bm.block_masks([7, 8, 9], 14, 14, **CAE)
  b = bm.block_masks([9, 7], 14, 14, **CAE)
  np.testing.assert_array_equal(a[0], b[1])   # independent of the batch
  np.testing.assert_array_equal(a[2], b[0])
  many = bm.block_masks(np.arange(200), 14, 14, **CAE)
  assert len({m.tobytes() for m in many}) == 200


def test_fast_generator_matches_the_upstream_port_in_distribution():
  n = 1500
  ref = np.stack([bm.block_mask_reference(random.Random(i), 14, 14, **CAE)
                  .reshape(-1) for i in range(n)]).astype(np.float64)
  fast = bm.block_masks(np.arange(n), 14, 14, **CAE).astype(np.float64)
  # Per-patch masking frequencies (centre patches are masked more often
  # than corners) agree within sampling noise (std about 0.018 here).
  assert np.abs(ref.mean(0) - fast.mean(0)).max() < 0.08
  corner, centre = [0, 13, 182, 195], [90, 91, 104, 105]
  for m in (ref, fast):
    assert m[:, centre].mean() > m[:, corner].mean() + 0.1
  # BEiT: how often and by how much the target is missed agrees too
  # (upstream: 68% exact, mean 74.5 of 75).
  beit_ref = np.array([bm.block_mask_reference(random.Random(i), 14, 14,
                                               **BEIT).sum()
                       for i in range(n)])
  beit_fast = bm.block_masks(np.arange(n), 14, 14, **BEIT).sum(1)
  assert abs(beit_ref.mean() - beit_fast.mean()) < 0.3
  assert abs(np.mean(beit_ref == 75) - np.mean(beit_fast == 75)) < 0.06


@pytest.mark.parametrize('bad,match', [
    (dict(num_masking_patches=197), r'impossible for a 14x14 grid'),
    (dict(num_masking_patches=0), r'impossible'),
    (dict(min_num_patches=170), r'larger than the biggest rectangle'),
    (dict(variant='maybe'), r'variant'),
])
def test_impossible_targets_are_named(bad, match):
  with pytest.raises(ValueError, match=match):
    bm.block_masks([0], 14, 14, **dict(CAE, **bad))
  with pytest.raises(ValueError, match=match):
    masks.make_mask_fn(dict(kind='block', **dict(CAE, **bad)), 14)


def test_block_count_must_agree_with_the_model_ratio():
  with pytest.raises(ValueError, match=r'masks 98 of 196 .* means 147'):
    masks.make_mask_fn(dict(kind='block', ratio=0.75, **CAE), 14)
  fn = masks.make_mask_fn(dict(kind='block', ratio=0.5, **CAE), 14)
  assert isinstance(fn, masks.BatchedMaskFn)
  # Without a count, the ratio sets it.
  fn = masks.make_mask_fn(dict(kind='block', ratio=0.75), 14)
  assert isinstance(fn, masks.BatchedMaskFn)


def test_grid_mask_keeps_one_patch_per_2x2_cell():
  fn = masks.make_mask_fn(dict(kind='grid', ratio=0.75), 14)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = fn(tf.constant([1, 2], tf.int64))
  mask = out['mask'].numpy().reshape(14, 14)
  assert mask.sum() == 147
  assert mask[::2, ::2].sum() == 0 and mask[1::2, :].min() == 1
  visible_first = np.argsort(out['noise'].numpy())[:49]
  assert mask.reshape(-1)[visible_first].sum() == 0
  with pytest.raises(ValueError, match='means 98'):
    masks.make_mask_fn(dict(kind='grid', ratio=0.5), 14)


def _config(**mask):
  return dict(data='embedded:skimage', batch_size=8, image_size=56,
              shuffle_buffer=16, crop_scale=(0.2, 1.0),
              crop_ratio=(3 / 4, 4 / 3), mask=mask)


class _Cfg(dict):
  def __getattr__(self, k):
    return self[k]


@pytest.mark.slow
def test_block_masks_in_the_pipeline_are_exact_and_resume_exactly():
  cfg = _Cfg(_config(kind='block', num_masking_patches=98,
                     min_num_patches=16, variant='cae', ratio=0.5))
  ds = input_pipeline.make_train_dataset(cfg, patch_size=4, seed=3,
                                         process_index=0, process_count=1)
  batches = [b for _, b in zip(range(3), ds.as_numpy_iterator())]
  for b in batches:
    assert set(b) == {'image', 'noise', 'mask', 'step', 'index'}
    np.testing.assert_array_equal(b['mask'].sum(1), 98)
    # The noise lists the visible patches first: MAE replays the mask.
    order = np.argsort(b['noise'], axis=1)[:, :98]
    assert np.take_along_axis(b['mask'], order, 1).sum() == 0
  assert not np.array_equal(batches[0]['mask'], batches[1]['mask'])
  resumed = input_pipeline.make_train_dataset(
      cfg, patch_size=4, seed=3, start_step=2, process_index=0,
      process_count=1)
  again = next(resumed.as_numpy_iterator())
  np.testing.assert_array_equal(again['mask'], batches[2]['mask'])
  np.testing.assert_array_equal(again['noise'], batches[2]['noise'])
  vis = input_pipeline.make_vis_batch(cfg, patch_size=4, seed=3,
                                      num_images=4)
  np.testing.assert_array_equal(vis['mask'].sum(1), 98)


def test_bootmae_effective_mask_replays_the_fixture():
  """Stored block masks, noise and roll -> the official effective masks, for
  the forward batch and all 30 curve steps."""
  import os  # pylint: disable=g-import-not-at-top
  from conftest import FIXTURES  # pylint: disable=g-import-not-at-top
  d = os.path.join(FIXTURES, 'bootmae')
  with np.load(os.path.join(d, 'inputs.npz')) as z:
    i = {k: z[k] for k in z.files}
  with np.load(os.path.join(d, 'train_curve.npz')) as z:
    c = {k: z[k] for k in z.files}
  n = i['mask'].shape[0]
  got = bm.add_random_patches(i['block_masks'].reshape(n, -1),
                              i['mask_noise'], np.full(n, i['rand_roll']),
                              int(i['mask_len']))
  np.testing.assert_array_equal(got, i['mask'])
  for t in range(len(c['rand_roll'])):
    got = bm.add_random_patches(c['block_masks'][t].reshape(n, -1),
                                c['mask_noise'][t],
                                np.full(n, c['rand_roll'][t]),
                                int(i['mask_len']))
    np.testing.assert_array_equal(got, c['mask'][t], err_msg=f'step {t}')


def test_bootmae_masks_in_the_pipeline():
  """120 block patches + random extra patches up to 147 of 196 (75%), with
  the roll turning up to 3 block patches into random ones."""
  cfg = _Cfg(_config(kind='block', ratio=0.75, extra_random=True, **BOOT))
  cfg['image_size'] = 56
  fn = masks.make_mask_fn(cfg['mask'], 14)
  per_example, per_batch = masks.stages(fn)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  keys = [tf.constant([7, i], tf.int64) for i in range(64)]
  ex = [per_example(k) for k in keys]
  batch = {k: tf.stack([e[k] for e in ex]) for k in ex[0]}
  out = per_batch(batch)
  mask = out['mask'].numpy()
  np.testing.assert_array_equal(mask.sum(1), 147)
  block = bm.block_masks(batch['_mask_seed'].numpy(), 14, 14, **BOOT)
  kept_block = (mask * block).sum(1)
  rolls = batch['_mask_roll'].numpy()
  assert set(rolls) == {0, 1, 2, 3}
  np.testing.assert_array_equal(kept_block, 120 - rolls)
  again = per_batch(batch)['mask'].numpy()
  np.testing.assert_array_equal(again, mask)


@pytest.mark.parametrize('bad, match', [
    (dict(total_masked=197), 'total_masked=197'),
    (dict(total_masked=100), 'total_masked=100'),
    (dict(total_masked=195, roll=3), 'roll=3 must be in 0..1'),
])
def test_bootmae_impossible_counts_are_named(bad, match):
  with pytest.raises(ValueError, match=match):
    masks.make_mask_fn(dict(kind='block', **dict(BOOT, **bad)), 14)

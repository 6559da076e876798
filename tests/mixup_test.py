"""Mixup / CutMix against timm's batch-mode semantics."""

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import mixup

K = 10


def _batch(b, h=16, w=12, c=3):
  """Image i is constant i + 1, so every pixel tells which image it is from."""
  values = jnp.arange(1, b + 1, dtype=jnp.float32)
  images = jnp.broadcast_to(values[:, None, None, None], (b, h, w, c))
  labels = jnp.arange(b, dtype=jnp.int32) % K
  return images, labels


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_smooth_one_hot(smoothing):
  t = np.asarray(mixup.smooth_one_hot(jnp.array([3, 0]), K, smoothing))
  assert t.dtype == np.float32
  off = smoothing / K
  np.testing.assert_allclose(t[0, 3], 1 - smoothing + off, rtol=1e-6)
  np.testing.assert_allclose(t[0, 0], off, rtol=1e-6)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('b', [6, 7])
def test_targets_sum_to_one_and_follow_lam(smoothing, b):
  images, labels = _batch(b)
  for seed in range(4):
    _, t, lam = mixup.mix(jax.random.key(seed), images, labels,
                          num_classes=K, smoothing=smoothing)
    t = np.asarray(t)
    assert t.shape == (b, K) and t.dtype == np.float32
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    y = np.asarray(mixup.smooth_one_hot(labels, K, smoothing))
    want = float(lam) * y + (1 - float(lam)) * y[::-1]
    np.testing.assert_allclose(t, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('b', [4, 5])
def test_cutmix_pixel_fraction_is_one_minus_lam(b):
  images, labels = _batch(b)
  seen_partial = False
  for seed in range(8):
    out, _, lam = mixup.mix(jax.random.key(seed), images, labels,
                            num_classes=K, mixup_alpha=0.0)
    out, lam = np.asarray(out), float(lam)
    own = np.asarray(images)
    partner = own[::-1]
    # Every pixel is copied from one of the two images, never blended.
    assert np.all((out == own) | (out == partner))
    for i in range(b):
      if i == b - 1 - i:  # Odd batch: the middle image pairs with itself.
        np.testing.assert_array_equal(out[i], own[i])
        continue
      from_partner = np.mean(out[i] == partner[i])
      assert from_partner == pytest.approx(1 - lam, abs=1e-6)
    # The pasted box is one rectangle, the same for all images.
    pasted = out[0, :, :, 0] != own[0, :, :, 0]
    rows, cols = np.nonzero(pasted)
    if rows.size:
      box = pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
      assert box.all()
      seen_partial |= 0 < lam < 1
  assert seen_partial


def test_rand_bbox_matches_timm_rule():
  h, w = 16, 12
  for seed in range(20):
    lam = 0.3 + 0.03 * seed
    key = jax.random.key(seed)
    top, left, bottom, right = (int(v) for v in
                                mixup.rand_bbox(key, h, w, lam))
    # timm: cut = int(H * sqrt(1 - lam)), box centre -/+ cut // 2, clipped.
    cut_h = int(h * math.sqrt(1 - lam))
    cut_w = int(w * math.sqrt(1 - lam))
    assert 0 <= top <= bottom <= h and 0 <= left <= right <= w
    assert bottom - top <= 2 * (cut_h // 2)
    assert right - left <= 2 * (cut_w // 2)
    if 0 < top and bottom < h:  # Unclipped rows.
      assert bottom - top == 2 * (cut_h // 2)
    if 0 < left and right < w:
      assert right - left == 2 * (cut_w // 2)
    lam_box = float(mixup.bbox_lam((top, left, bottom, right), h, w))
    want = 1 - (bottom - top) * (right - left) / (h * w)
    assert lam_box == pytest.approx(want, abs=1e-7)
  box = mixup.rand_bbox(jax.random.key(0), h, w, 1.0)
  assert float(mixup.bbox_lam(box, h, w)) == 1.0


class _FixedRandom:
  """Stands in for timm's `np.random`, answering randint with set values."""

  def __init__(self, values):
    self._values = list(values)

  def randint(self, low, high, size=None):
    del size
    value = self._values.pop(0)
    assert low <= value < high
    return value


@pytest.mark.parametrize('exact_cut', [False, True])
def test_box_matches_timm(monkeypatch, exact_cut):
  timm_mixup = pytest.importorskip('timm.data.mixup')
  box_around = mixup._box_around  # pylint: disable=protected-access
  h, w = 14, 11
  rng = np.random.default_rng(0)
  for lam in np.float32(rng.uniform(size=30)):
    for cy, cx in ((0, 0), (h - 1, w - 1), (6, 5), (2, 9)):
      fake_np = types.SimpleNamespace(random=_FixedRandom([cy, cx]),
                                      sqrt=np.sqrt, clip=np.clip)
      monkeypatch.setattr(timm_mixup, 'np', fake_np)
      yl, yh, xl, xh = timm_mixup.rand_bbox((1, 3, h, w), float(lam))
      monkeypatch.undo()
      got = box_around(cy, cx, h, w, lam, exact_cut)
      if not exact_cut:
        # timm 0.3.2, which MAE and BEiT pin: both halves are cut // 2.
        cut_h = int(h * math.sqrt(1 - lam))
        cut_w = int(w * math.sqrt(1 - lam))
        yh = np.clip(cy + cut_h // 2, 0, h)
        xh = np.clip(cx + cut_w // 2, 0, w)
      assert tuple(int(v) for v in got) == (yl, xl, yh, xh)


@pytest.mark.parametrize('exact_cut', [False, True])
def test_mix_matches_timm_given_the_draw(monkeypatch, exact_cut):
  # timm draws with numpy, so feed it this module's draw (mode, lam, box)
  # and compare the images and targets it makes.
  torch = pytest.importorskip('torch')
  timm_mixup = pytest.importorskip('timm.data.mixup')
  b, h, w = 6, 16, 12
  images = jax.random.normal(jax.random.key(5), (b, h, w, 3))
  labels = jnp.array([1, 4, 4, 9, 0, 7])
  modes = set()
  for seed in range(12):
    key = jax.random.key(seed)
    params = mixup.sample_params(key, h, w, prob=0.8, exact_cut=exact_cut)
    out, t, lam = mixup.mix(key, images, labels, num_classes=K, prob=0.8,
                            exact_cut=exact_cut)
    mode, lam = int(params.mode), float(lam)
    modes.add(mode)
    top, left, bottom, right = (int(v) for v in params.box)
    ref = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8,
                           switch_prob=0.5, mode='batch',
                           label_smoothing=0.1, num_classes=K)
    # Any raw lam below 1 makes timm cut; the box and its lam are ours.
    raw = {mixup.NO_MIX: 1.0, mixup.MIXUP: lam, mixup.CUTMIX: 0.5}[mode]
    monkeypatch.setattr(ref, '_params_per_batch',
                        lambda raw=raw, mode=mode: (raw,
                                                    mode == mixup.CUTMIX))
    monkeypatch.setattr(
        timm_mixup, 'cutmix_bbox_and_lam',
        lambda *a, box=(top, bottom, left, right), lam=lam, **k: (box, lam))
    x = torch.tensor(np.asarray(images).transpose(0, 3, 1, 2))
    x, target = ref(x, torch.tensor(np.asarray(labels)))
    monkeypatch.undo()
    np.testing.assert_allclose(np.asarray(out),
                               x.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(t), target.numpy(), rtol=1e-6,
                               atol=1e-7)
  assert modes == {mixup.NO_MIX, mixup.MIXUP, mixup.CUTMIX}


@pytest.mark.parametrize('b', [4, 5])
def test_mixup_blends_with_flipped_batch(b):
  images, labels = _batch(b)
  images = images + jax.random.normal(jax.random.key(9), images.shape)
  out, _, lam = mixup.mix(jax.random.key(1), images, labels, num_classes=K,
                          cutmix_alpha=0.0)
  lam = float(lam)
  assert 0 < lam < 1
  x = np.asarray(images)
  np.testing.assert_allclose(np.asarray(out), lam * x + (1 - lam) * x[::-1],
                             rtol=1e-5, atol=1e-6)


def test_switch_and_apply_probabilities():
  n = 4000
  keys = jax.random.split(jax.random.key(0), n)

  def modes(**kw):
    draw = jax.vmap(functools.partial(mixup.sample_params, height=8, width=8,
                                      **kw))
    params = draw(keys)
    return np.asarray(params.mode), np.asarray(params.lam)

  m, lam = modes(switch_prob=0.3)
  assert set(np.unique(m)) == {mixup.MIXUP, mixup.CUTMIX}
  # 4000 Bernoulli(0.3) draws: sd 0.007, so 0.03 is over 4 sd.
  assert np.mean(m == mixup.CUTMIX) == pytest.approx(0.3, abs=0.03)
  # Mixup's lam ~ Beta(0.8, 0.8) has mean 0.5.
  assert np.mean(lam[m == mixup.MIXUP]) == pytest.approx(0.5, abs=0.03)

  m, lam = modes(prob=0.6)
  assert np.mean(m != mixup.NO_MIX) == pytest.approx(0.6, abs=0.03)
  assert np.all(lam[m == mixup.NO_MIX] == 1.0)
  # A single enabled mode is always the one used.
  assert np.all(modes(mixup_alpha=0.0)[0] == mixup.CUTMIX)
  assert np.all(modes(cutmix_alpha=0.0)[0] == mixup.MIXUP)
  assert np.all(modes(switch_prob=1.0)[0] == mixup.CUTMIX)
  assert np.all(modes(switch_prob=0.0)[0] == mixup.MIXUP)


def test_mix_output_identifies_mode():
  # The same keys through `mix`: CutMix pixels are copies, Mixup's blends.
  images, labels = _batch(4)
  for seed in range(6):
    key = jax.random.key(seed)
    params = mixup.sample_params(key, 16, 12)
    out, _, lam = mixup.mix(key, images, labels, num_classes=K)
    assert float(lam) == float(params.lam)
    copied = np.all((out == images) | (out == images[::-1]))
    assert copied == (int(params.mode) == mixup.CUTMIX)


def test_prob_zero_is_identity():
  images, labels = _batch(6)
  images = images * -1.5
  for seed in range(3):
    out, t, lam = mixup.mix(jax.random.key(seed), images, labels,
                            num_classes=K, prob=0.0)
    assert float(lam) == 1.0
    np.testing.assert_array_equal(np.asarray(out), np.asarray(images))
    np.testing.assert_array_equal(
        np.asarray(t), np.asarray(mixup.smooth_one_hot(labels, K, 0.1)))


def test_jit_and_dtype():
  images, labels = _batch(6)
  images = images.astype(jnp.bfloat16)
  fn = jax.jit(functools.partial(mixup.mix, num_classes=K))
  key = jax.random.key(3)
  out, t, lam = fn(key, images, labels)
  assert out.dtype == jnp.bfloat16 and out.shape == images.shape
  ref = mixup.mix(key, images, labels, num_classes=K)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(ref[0], np.float32))
  np.testing.assert_allclose(np.asarray(t), np.asarray(ref[1]), rtol=1e-6)
  assert float(lam) == float(ref[2])


def test_sharded_batch_flips_globally():
  # Batch sharded over the (fake) devices: partners are still B - 1 - i of
  # the global batch, so the result equals the unsharded one.
  n = len(jax.devices())
  images, labels = _batch(2 * n)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  images, labels = jax.device_put((images, labels), spec)
  fn = jax.jit(functools.partial(mixup.mix, num_classes=K, mixup_alpha=0.0))
  key = jax.random.key(2)
  out, t, _ = fn(key, images, labels)
  ref = mixup.mix(key, np.asarray(images), np.asarray(labels), num_classes=K,
                  mixup_alpha=0.0)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref[0]))
  np.testing.assert_allclose(np.asarray(t), np.asarray(ref[1]), rtol=1e-6)


def test_soft_cross_entropy():
  logits = jax.random.normal(jax.random.key(0), (5, K)).astype(jnp.bfloat16)
  labels = jnp.array([0, 3, 9, 2, 2])
  loss = mixup.soft_cross_entropy(logits, jax.nn.one_hot(labels, K))
  assert loss.dtype == jnp.float32 and loss.shape == (5,)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  want = -logp[jnp.arange(5), labels]
  np.testing.assert_allclose(np.asarray(loss), np.asarray(want), rtol=1e-6)
  # Soft targets: the weighted sum of the one-hot losses.
  t = 0.25 * jax.nn.one_hot(labels, K) + 0.75 * jax.nn.one_hot(labels[::-1],
                                                               K)
  want = 0.25 * want + 0.75 * -logp[jnp.arange(5), labels[::-1]]
  np.testing.assert_allclose(np.asarray(mixup.soft_cross_entropy(logits, t)),
                             np.asarray(want), rtol=1e-5)


@pytest.mark.parametrize('kw, name', [
    (dict(mixup_alpha=-0.1), 'mixup_alpha'),
    (dict(cutmix_alpha=-1.0), 'cutmix_alpha'),
    (dict(mixup_alpha=0.0, cutmix_alpha=0.0), 'both 0'),
    (dict(switch_prob=1.5), 'switch_prob'),
    (dict(prob=-0.1), 'prob'),
    (dict(smoothing=1.0), 'smoothing'),
])
def test_bad_arguments(kw, name):
  images, labels = _batch(4)
  with pytest.raises(ValueError, match=name):
    mixup.mix(jax.random.key(0), images, labels, num_classes=K, **kw)


def test_bad_shapes():
  images, labels = _batch(4)
  with pytest.raises(ValueError, match='B, H, W, C'):
    mixup.mix(jax.random.key(0), images[0], labels, num_classes=K)
  with pytest.raises(ValueError, match='labels'):
    mixup.mix(jax.random.key(0), images, labels[:3], num_classes=K)
  with pytest.raises(ValueError, match='floating'):
    mixup.mix(jax.random.key(0), images.astype(jnp.uint8), labels,
              num_classes=K)

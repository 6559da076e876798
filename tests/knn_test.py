"""The weighted kNN classifier against DINO's eval_knn rule."""

import numpy as np
import pytest

from mim_jax import knn


def _clusters(n_per_class, num_classes=4, dim=16, noise=0.05, seed=0):
  """Points around orthogonal class directions, so cosine separates them."""
  rng = np.random.default_rng(seed)
  centres = np.eye(dim, dtype=np.float32)[:num_classes] * 3.0
  labels = np.repeat(np.arange(num_classes), n_per_class)
  feats = centres[labels] + noise * rng.normal(size=(labels.size, dim))
  perm = rng.permutation(labels.size)
  return feats[perm].astype(np.float32), labels[perm]


def _dino_reference(train, train_labels, test, num_classes, k, t):
  """DINO's knn_classifier in float64 numpy."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  sim = test @ train.T
  idx = np.argsort(-sim, axis=1, kind='stable')[:, :k]
  top = np.take_along_axis(sim, idx, axis=1)
  votes = np.zeros((test.shape[0], num_classes))
  for i in range(test.shape[0]):
    np.add.at(votes[i], train_labels[idx[i]], np.exp(top[i] / t))
  return votes.argmax(1)


def test_separable_clusters():
  train, train_labels = _clusters(30)
  test, test_labels = _clusters(10, seed=1)
  acc = knn.knn_accuracy(train, train_labels, test, test_labels,
                         num_classes=4)
  assert acc == 1.0
  # A wrong labelling of the test set scores 0.
  assert knn.knn_accuracy(train, train_labels, test, (test_labels + 1) % 4,
                          num_classes=4) == 0.0


def test_matches_dino_reference():
  rng = np.random.default_rng(2)
  train = rng.normal(size=(120, 8)).astype(np.float32)
  train_labels = rng.integers(0, 5, size=120)
  test = rng.normal(size=(40, 8)).astype(np.float32)
  for k, t in ((20, 0.07), (5, 0.5)):
    got = knn.knn_predict(train, train_labels, test, num_classes=5, k=k,
                          temperature=t, chunk=16)
    want = _dino_reference(train.astype(np.float64), train_labels,
                           test.astype(np.float64), 5, k, t)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_votes_are_weighted_by_temperature():
  # One very close neighbour of class 0 against two farther ones of class 1:
  # a sharp temperature trusts the nearest, a flat one counts heads.
  train = np.array([[1.0, 0.05], [1.0, 0.6], [1.0, -0.6]], np.float32)
  labels = np.array([0, 1, 1])
  test = np.array([[1.0, 0.0]], np.float32)
  sharp = knn.knn_predict(train, labels, test, num_classes=2, k=3,
                          temperature=0.01)
  flat = knn.knn_predict(train, labels, test, num_classes=2, k=3,
                         temperature=10.0)
  assert int(sharp[0]) == 0 and int(flat[0]) == 1


def test_feature_scale_does_not_matter():
  rng = np.random.default_rng(3)
  train = rng.normal(size=(60, 8)).astype(np.float32)
  labels = rng.integers(0, 3, size=60)
  test = rng.normal(size=(25, 8)).astype(np.float32)
  base = knn.knn_predict(train, labels, test, num_classes=3)
  scaled = knn.knn_predict(
      train * rng.uniform(0.01, 100.0, size=(60, 1)).astype(np.float32),
      labels, test * 1e3, num_classes=3)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(scaled))


def test_k1_is_nearest_neighbour_label():
  rng = np.random.default_rng(4)
  train = rng.normal(size=(50, 6)).astype(np.float32)
  labels = rng.integers(0, 7, size=50)
  test = rng.normal(size=(30, 6)).astype(np.float32)
  got = knn.knn_predict(train, labels, test, num_classes=7, k=1)
  cos = (test / np.linalg.norm(test, axis=1, keepdims=True)) @ (
      train / np.linalg.norm(train, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(np.asarray(got), labels[cos.argmax(1)])
  assert got.dtype == np.int32 and got.shape == (30,)


def test_chunking_does_not_change_predictions():
  rng = np.random.default_rng(5)
  train = rng.normal(size=(80, 8)).astype(np.float32)
  labels = rng.integers(0, 4, size=80)
  test = rng.normal(size=(53, 8)).astype(np.float32)
  whole = knn.knn_predict(train, labels, test, num_classes=4, chunk=1000)
  for chunk in (1, 7, 53):
    got = knn.knn_predict(train, labels, test, num_classes=4, chunk=chunk)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(whole))


def test_k_larger_than_train_set():
  train, labels = _clusters(3, num_classes=2)
  test, test_labels = _clusters(4, num_classes=2, seed=1)
  got = knn.knn_predict(train, labels, test, num_classes=2, k=100)
  same = knn.knn_predict(train, labels, test, num_classes=2, k=6)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(same))
  np.testing.assert_array_equal(np.asarray(got), test_labels)


def test_empty_test_set_and_bad_arguments():
  train, labels = _clusters(3)
  empty = np.zeros((0, train.shape[1]), np.float32)
  assert knn.knn_predict(train, labels, empty, num_classes=4).shape == (0,)
  assert knn.knn_accuracy(train, labels, empty, [], num_classes=4) == 0.0
  for kw, name in ((dict(k=0), 'k='), (dict(temperature=0.0), 'temperature'),
                   (dict(chunk=0), 'chunk'), (dict(num_classes=0),
                                              'num_classes')):
    kw = dict(dict(num_classes=4), **kw)
    with pytest.raises(ValueError, match=name):
      knn.knn_predict(train, labels, train, **kw)
  with pytest.raises(ValueError, match='dim'):
    knn.knn_predict(train, labels, train[:, :3], num_classes=4)
  with pytest.raises(ValueError, match='train_labels'):
    knn.knn_predict(train, labels[:2], train, num_classes=4)
  with pytest.raises(ValueError, match='empty'):
    knn.knn_predict(train[:0], labels[:0], train, num_classes=4)
  with pytest.raises(ValueError, match='test_labels'):
    knn.knn_accuracy(train, labels, train, labels[:2], num_classes=4)

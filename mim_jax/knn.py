"""Weighted k-nearest-neighbour classification of frozen features.

The representation monitor's classifier, as DINO's `eval_knn.py`
(`knn_classifier`): features are L2-normalised, the k training examples of
highest cosine similarity vote for their label with weight
exp(similarity / T), and the class with the largest summed vote wins
(k = 20, T = 0.07 by default, DINO's values).

Test features are processed `chunk` at a time, so memory is
O(chunk * N_train) for the similarities rather than O(N_test * N_train).
Ties between classes go to the lowest class id (argmax), where DINO's
descending sort leaves the order to torch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import errors


def _normalize(x: jax.Array) -> jax.Array:
  """x / max(||x||, 1e-12) in float32, as torch's F.normalize."""
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, 1e-12)


@functools.partial(jax.jit, static_argnames=('num_classes', 'k'))
def _predict_chunks(train_feats, train_labels, test_chunks, temperature, *,
                    num_classes: int, k: int):
  """Predictions for test features shaped (num_chunks, chunk, D)."""
  train = _normalize(train_feats)

  def one_chunk(test):
    # HIGHEST keeps the similarities float32 on accelerators, whose default
    # matmul precision would round the inputs to bfloat16 and reorder
    # near neighbours.
    sim = jnp.matmul(_normalize(test), train.T,
                     precision=jax.lax.Precision.HIGHEST)
    top_sim, top_idx = jax.lax.top_k(sim, k)
    # Votes relative to the nearest neighbour's: the same argmax as DINO's
    # exp(sim / T), without overflow when T is small (exp(1 / 0.01) is
    # beyond float32).
    weights = jnp.exp((top_sim - top_sim[:, :1]) / temperature)
    # Scatter-add the votes by class instead of building a one-hot
    # (chunk, k, num_classes) tensor.
    rows = jnp.broadcast_to(jnp.arange(test.shape[0])[:, None], top_idx.shape)
    votes = jnp.zeros((test.shape[0], num_classes), jnp.float32)
    votes = votes.at[rows, train_labels[top_idx]].add(weights)
    return jnp.argmax(votes, axis=-1).astype(jnp.int32)

  # lax.map runs the chunks one after another, which is what bounds memory.
  return jax.lax.map(one_chunk, test_chunks)


def knn_predict(train_feats, train_labels, test_feats, *, num_classes: int,
                k: int = 20, temperature: float = 0.07,
                chunk: int = 256) -> jax.Array:
  """DINO's weighted kNN prediction for each test feature.

  Args:
    train_feats: (N_train, D) features of the labelled set, any float dtype.
    train_labels: (N_train,) int labels in [0, num_classes).
    test_feats: (N_test, D) features to classify.
    num_classes: number of classes.
    k: neighbours that vote; clipped to N_train.
    temperature: T in the vote weight exp(cosine similarity / T).
    chunk: test features per step; bounds memory to about
      chunk * N_train similarities.

  Returns:
    int32 predictions of shape (N_test,).

  Raises:
    errors.ConfigError: non-positive k or temperature (config.knn).
    ValueError: arrays of the wrong rank or mismatched sizes, an empty
      training set, or non-positive chunk or num_classes.
  """
  train_feats = jnp.asarray(train_feats)
  train_labels = jnp.asarray(train_labels, jnp.int32)
  test_feats = jnp.asarray(test_feats)
  if train_feats.ndim != 2 or test_feats.ndim != 2:
    raise ValueError(f'features must be (N, D); got train {train_feats.shape} '
                     f'and test {test_feats.shape}.')
  if train_feats.shape[1] != test_feats.shape[1]:
    raise ValueError(f'train features have dim {train_feats.shape[1]}, test '
                     f'features {test_feats.shape[1]}.')
  if train_labels.shape != train_feats.shape[:1]:
    raise ValueError(f'train_labels have shape {train_labels.shape}; want '
                     f'({train_feats.shape[0]},), one per train feature.')
  if not train_feats.shape[0]:
    raise ValueError('the training set is empty: kNN needs neighbours.')
  for name, value in (('k', k), ('temperature', temperature)):
    if not value > 0:  # set by config.knn
      raise errors.ConfigError(f'knn.{name}={value} must be positive.')
  for name, value in (('chunk', chunk), ('num_classes', num_classes)):
    if not value > 0:
      raise ValueError(f'{name}={value} must be positive.')
  n_test = test_feats.shape[0]
  if not n_test:
    return jnp.zeros((0,), jnp.int32)
  k = min(int(k), train_feats.shape[0])
  # No padding wasted on a test set smaller than one chunk.
  chunk = min(int(chunk), n_test)
  num_chunks = -(-n_test // chunk)
  # Pad to whole chunks so every chunk has one static shape; padded rows are
  # zero features, classified and then dropped.
  padded = jnp.pad(test_feats, ((0, num_chunks * chunk - n_test), (0, 0)))
  preds = _predict_chunks(train_feats, train_labels,
                          padded.reshape(num_chunks, chunk, -1),
                          jnp.float32(temperature),
                          num_classes=int(num_classes), k=k)
  return preds.reshape(-1)[:n_test]


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, *,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 256) -> float:
  """Top-1 accuracy in [0, 1] of `knn_predict` against `test_labels`.

  Args:
    train_feats: (N_train, D) features of the labelled set.
    train_labels: (N_train,) int labels in [0, num_classes).
    test_feats: (N_test, D) features to classify.
    test_labels: (N_test,) int labels of the test features.
    num_classes: number of classes.
    k: neighbours that vote; clipped to N_train.
    temperature: T in the vote weight exp(cosine similarity / T).
    chunk: test features per step.

  Returns:
    The fraction of test features whose prediction is their label (0.0 for
    an empty test set).

  Raises:
    ValueError: as `knn_predict`, or test_labels not one per test feature.
  """
  test_labels = np.asarray(test_labels)
  if test_labels.shape != np.shape(test_feats)[:1]:
    raise ValueError(f'test_labels have shape {test_labels.shape}; want '
                     f'({np.shape(test_feats)[0]},), one per test feature.')
  preds = knn_predict(train_feats, train_labels, test_feats,
                      num_classes=num_classes, k=k, temperature=temperature,
                      chunk=chunk)
  if not test_labels.size:
    return 0.0
  return float(np.mean(np.asarray(preds) == test_labels))

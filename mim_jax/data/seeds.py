"""Stateless RNG key derivation for the input pipeline.

Every random decision is keyed by a path such as (seed, TRAIN, step, index),
never by iterator state, so any batch can be recomputed on its own: that is
what makes resuming from a step exact and independent of how many batches
were produced before.
"""

import tensorflow as tf

# Domains keep the key streams of different uses apart.
TRAIN = 0
VIS = 1
SHUFFLE = 2


def base_key(seed: int, domain: int) -> tf.Tensor:
  """Returns the int64 [2] root key of `domain` for the experiment `seed`."""
  # Wrap into int64 so any Python int (negative, > 2**63) is accepted.
  return tf.constant([int(seed) % (1 << 63), domain], tf.int64)


def fold_in(key: tf.Tensor, *data) -> tf.Tensor:
  """Folds integers (Python or tensors) into a stateless key, in order."""
  for value in data:
    key = tf.random.experimental.stateless_fold_in(
        key, tf.cast(value, tf.int64))
  return key


def to_int(key: tf.Tensor) -> tf.Tensor:
  """Hashes a [2] key into one int64 scalar (for ops taking a single seed).

  Note `stateless_fold_in(key, x)` returns [hash(key), x]: its first element
  does not depend on x, so never use `key[0]` alone as a seed.
  """
  return tf.random.stateless_uniform([], seed=key, minval=None, maxval=None,
                                     dtype=tf.int64)

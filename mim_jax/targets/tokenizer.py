"""Discrete-token targets: the frozen DALL-E dVAE tokenizer (CAE, BEiT), a
'frozen' target provider (`mim_jax.method.TargetProvider`).

A method that trains on token ids (CAE with `model.target='tokens'`) lists
`provider(config)` among its targets and `view(config, patch_size)` among
its views:

  * the pipeline emits `tokenizer_image`, uint8 (B, S, S, 3): the same crop
    and flip as `image`, resized with Lanczos (as upstream's PIL
    `second_interpolation='lanczos'`), S = grid * 8, i.e. 112 px for a
    224 px / 16 px-patch ViT: one token per patch;
  * inside the jitted train step, the dVAE encoder turns that view into
    `token_ids` int32 (B, L) under stop_gradient, before the model runs.

The tokenizer params are frozen and not part of the TrainState: they are
read from `config.tokenizer.weights` at every start (also on resume) and
replicated on the mesh (the DALL-E encoder has 54M params, 0.2 GB in f32);
checkpoints stay the size of the model, and the file stays the one source.
"""

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mim_jax import errors
from mim_jax import method
from mim_jax.convert import dvae as convert_dvae
from mim_jax.models import dvae

_ARCH_KEYS = ('hidden', 'groups', 'blocks_per_group', 'vocab_size')
# The batch key of the pipeline's view and of the targets.
VIEW = 'tokenizer_image'
TOKENS = 'token_ids'


def _path(config) -> str:
  """`config.tokenizer.weights`, expanded, checked to exist.

  Raises:
    errors.MissingFileError: the file does not exist (with where to get
      it).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(config.tokenizer.weights)
  if not tf.io.gfile.exists(path):
    raise errors.MissingFileError(
        f'Tokenizer weights {path} not found (config.tokenizer.weights). '
        f'Download the DALL-E encoder: `mkdir -p {os.path.dirname(path)} && '
        f'wget {convert_dvae.ENCODER_URL} -O {path}` (copy it to every '
        'host, or use a gs:// path), or train on normalised pixels with '
        '--config.model.target=pixels.')
  return path


@functools.lru_cache(maxsize=1)
def _read(path: str) -> dict:
  sd = convert_dvae.load_encoder_pkl(path)
  logging.info('Tokenizer: %d tensors from %s.', len(sd), path)
  return sd


def sizes(config) -> dict[str, int]:
  """The tokenizer's architecture: `config.tokenizer`'s hidden, groups,
  blocks_per_group and vocab_size where set; the ones left None are read
  from the weights file (any encoder the DALL-E package builds), and set
  ones must agree with it.

  Raises:
    errors.MissingFileError: the file is needed and missing.
    errors.WeightsFileError: the file is unreadable, holds no DALL-E
      encoder, or disagrees with a set field (named, with the file's
      value).
  """
  given = _given(config)
  if len(given) == len(_ARCH_KEYS):
    return given
  path = _path(config)
  found = convert_dvae.sizes_of(_read(path))
  _check_sizes(given, found, path)
  return found


def _given(config) -> dict[str, int]:
  tok = config.get('tokenizer') or {}
  return {k: int(tok[k]) for k in _ARCH_KEYS if tok.get(k) is not None}


def _check_sizes(given: dict, found: dict, path: str) -> None:
  bad = {k: (v, found[k]) for k, v in given.items() if found[k] != v}
  if bad:
    raise errors.WeightsFileError(
        f'{path} is a DALL-E encoder with '
        + ', '.join(f'{k}={f}' for k, (_, f) in bad.items())
        + ' but the config says '
        + ', '.join(f'config.tokenizer.{k}={g}' for k, (g, _) in bad.items())
        + ': set them to the file\'s values, or to None to read them from '
        'the file.')


def encoder_of(config) -> dvae.Encoder:
  """The dVAE encoder of `config.tokenizer` (see `sizes`)."""
  return dvae.Encoder(**sizes(config))


def view(config, patch_size: int) -> method.View:
  """The tokenizer's view of each crop: one token per ViT patch."""
  grid = int(config.input.image_size) // patch_size
  return method.View(grid * 2 ** (encoder_of(config).groups - 1))


def validate_config(config) -> None:
  """Checks a token-target config (reads the weights file only for sizes
  the config leaves None).

  Raises:
    errors.ConfigError: no weights path, or a vocabulary that differs from
      the model's output size.
    errors.MissingFileError / errors.WeightsFileError: as `sizes`.
  """
  tok = config.get('tokenizer') or {}
  if not tok.get('weights'):
    raise errors.ConfigError(
        f'{config.model_name} with token targets needs the DALL-E tokenizer:'
        f' download {convert_dvae.ENCODER_URL} and set '
        '--config.tokenizer.weights=/path/to/encoder.pkl, or train on '
        'normalised pixels with --config.model.target=pixels.')
  vocab = encoder_of(config).vocab_size
  model_vocab = config.model.get('vocab_size')
  if model_vocab is not None and int(model_vocab) != vocab:
    raise errors.ConfigError(
        f'config.model.vocab_size={model_vocab} but the tokenizer has '
        f'{vocab} tokens (config.tokenizer.vocab_size); make them equal.')


def _abstract_params(module: dvae.Encoder) -> Any:
  """The encoder's param shapes (they do not depend on the image size)."""
  return jax.eval_shape(module.init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 8, 8, 3)))['params']


def load_params(config) -> Any:
  """The tokenizer params (host numpy) from `config.tokenizer.weights`.

  Raises:
    errors.MissingFileError: the file does not exist (with where to get
      it).
    errors.WeightsFileError (ConversionError): the file is unreadable or
      holds another architecture (names the keys).
  """
  path = _path(config)
  sd = _read(path)
  found = convert_dvae.sizes_of(sd)
  _check_sizes(_given(config), found, path)
  return convert_dvae.to_flax(sd, _abstract_params(dvae.Encoder(**found)))


def tokenize(module: dvae.Encoder, params, images_u8) -> jax.Array:
  """uint8 (B, S, S, 3) views -> int32 (B, L) token ids."""
  images01 = images_u8.astype(jnp.float32) / 255.0
  return dvae.token_ids(module, params, images01)


def provider(config) -> method.TargetProvider:
  """The frozen tokenizer of `config.tokenizer` as a target provider:
  `token_ids` from the batch's `tokenizer_image`."""
  module = encoder_of(config)

  def init(cfg):
    params = load_params(cfg)
    n = sum(np.size(x) for x in jax.tree.leaves(params))
    logging.info('Tokenizer: %.1fM frozen params, replicated.', n / 1e6)
    return params

  return method.TargetProvider(
      name='tokenizer', kind='frozen',
      compute=lambda params, batch: {
          TOKENS: tokenize(module, params, batch[VIEW])},
      outputs=(TOKENS,), init=init,
      abstract=lambda cfg: _abstract_params(encoder_of(cfg)))

"""Discrete-token targets: the frozen DALL-E dVAE tokenizer (CAE, BEiT).

A method whose model module says `uses_tokenizer(config) -> True` (CAE with
`model.target='tokens'`) trains on token ids of a second, smaller view of
each crop:

  * the pipeline emits `tokenizer_image`, uint8 (B, S, S, 3): the same crop
    and flip as `image`, resized with Lanczos (as upstream's PIL
    `second_interpolation='lanczos'`), S = grid * 8, i.e. 112 px for a
    224 px / 16 px-patch ViT: one token per patch;
  * `Tokenizer.add_token_ids` runs the dVAE encoder on the devices (a jitted
    function sharded over the batch) and replaces that view by `token_ids`
    int32 (B, L), before the train step.

The tokenizer params are frozen and not part of the TrainState: they are
read from `config.tokenizer.weights` at every start (also on resume) and
replicated on the mesh (the DALL-E encoder has 54M params, 0.2 GB in f32).
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from mim_jax import sharding
from mim_jax import steps
from mim_jax.convert import dvae as convert_dvae
from mim_jax.models import dvae

_ARCH_KEYS = ('hidden', 'groups', 'blocks_per_group', 'vocab_size')


def uses_tokenizer(config) -> bool:
  """Whether the config's method trains on tokenizer ids."""
  hook = getattr(steps.model_module(config), 'uses_tokenizer', None)
  return bool(hook is not None and hook(config))


def encoder_of(config) -> dvae.Encoder:
  """The dVAE encoder described by `config.tokenizer` (official defaults)."""
  tok = config.get('tokenizer') or {}
  return dvae.Encoder(**{k: int(tok[k]) for k in _ARCH_KEYS
                         if tok.get(k) is not None})


def view_size(config, patch_size: int) -> int:
  """Side of the tokenizer view: one token per ViT patch."""
  grid = int(config.input.image_size) // patch_size
  return grid * 2 ** (encoder_of(config).groups - 1)


def validate_config(config) -> None:
  """Checks a token-target config without reading any file.

  Raises:
    ValueError: no weights path, or a vocabulary that differs from the
      model's output size.
  """
  tok = config.get('tokenizer') or {}
  if not tok.get('weights'):
    raise ValueError(
        f'{config.model_name} with token targets needs the DALL-E tokenizer:'
        f' download {convert_dvae.ENCODER_URL} and set '
        '--config.tokenizer.weights=/path/to/encoder.pkl, or train on '
        'normalised pixels with --config.model.target=pixels.')
  vocab = encoder_of(config).vocab_size
  model_vocab = config.model.get('vocab_size')
  if model_vocab is not None and int(model_vocab) != vocab:
    raise ValueError(
        f'config.model.vocab_size={model_vocab} but the tokenizer has '
        f'{vocab} tokens (config.tokenizer.vocab_size); make them equal.')


def _abstract_params(module: dvae.Encoder) -> Any:
  """The encoder's param shapes (they do not depend on the image size)."""
  return jax.eval_shape(module.init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 8, 8, 3)))['params']


def load_params(config) -> Any:
  """The tokenizer params (host numpy) from `config.tokenizer.weights`.

  Raises:
    ValueError: the file does not exist (with where to get it).
    ConversionError: the file holds another architecture (names the keys).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(config.tokenizer.weights)
  if not tf.io.gfile.exists(path):
    raise ValueError(
        f'Tokenizer weights {path} not found (config.tokenizer.weights). '
        f'Download the DALL-E encoder: `mkdir -p {os.path.dirname(path)} && '
        f'wget {convert_dvae.ENCODER_URL} -O {path}` (copy it to every '
        'host, or use a gs:// path), or train on normalised pixels with '
        '--config.model.target=pixels.')
  sd = convert_dvae.load_encoder_pkl(path)
  logging.info('Tokenizer: %d tensors from %s.', len(sd), path)
  return convert_dvae.to_flax(sd, _abstract_params(encoder_of(config)))


def make_tokenize_fn(module: dvae.Encoder, mesh: Mesh):
  """Jitted `(params, images_u8) -> token_ids`: params replicated, the
  batch sharded over the data axes."""
  data = sharding.data_sharding(mesh)

  def tokenize(params, images_u8):
    images01 = images_u8.astype(jnp.float32) / 255.0
    return dvae.token_ids(module, params, images01)

  return jax.jit(tokenize, in_shardings=(sharding.replicated(mesh), data),
                 out_shardings=data)


def cost(config, mesh: Mesh, batch_size: int, patch_size: int) -> dict:
  """XLA FLOPs of tokenizing one global batch, and the replicated params'
  bytes per device (for the planner; nothing is allocated)."""
  module = encoder_of(config)
  size = view_size(config, patch_size)
  params = _abstract_params(module)
  images = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8)
  flops = make_tokenize_fn(module, mesh).lower(
      params, images).cost_analysis()['flops']
  # Replicated: every device holds the whole tree.
  return {'view_size': size, 'flops_per_step': float(flops),
          'params_bytes_per_device': sharding.per_device_bytes(params)}


@dataclasses.dataclass
class Tokenizer:
  """A frozen tokenizer placed on a mesh."""
  module: dvae.Encoder
  params: Any
  mesh: Mesh

  def __post_init__(self):
    self.params = jax.device_put(self.params, sharding.replicated(self.mesh))
    self._tokenize = make_tokenize_fn(self.module, self.mesh)

  def add_token_ids(self, batch: dict) -> dict:
    """Replaces batch['tokenizer_image'] by batch['token_ids']."""
    batch = dict(batch)
    batch['token_ids'] = self._tokenize(self.params,
                                        batch.pop('tokenizer_image'))
    return batch


def from_config(config, mesh: Mesh) -> Tokenizer | None:
  """The config's tokenizer on `mesh`, or None when it trains on pixels."""
  if not uses_tokenizer(config):
    return None
  params = load_params(config)
  n = sum(np.size(x) for x in jax.tree.leaves(params))
  logging.info('Tokenizer: %.1fM frozen params, replicated.', n / 1e6)
  return Tokenizer(encoder_of(config), params, mesh)

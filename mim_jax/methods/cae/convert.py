"""Official CAE (Atten4Vis/CAE `modeling_cae.py`, v1) <-> mim_jax CAE."""

import numpy as np

from mim_jax.convert import core
from mim_jax.models import layers

RULES = [
    ('encoder.blocks.{i}.', 'encoder/blocks_{i}/'),
    ('encoder.patch_embed.proj.', 'encoder/patch_embed/'),
    ('encoder.norm.', 'encoder/norm/'),
    ('encoder.cls_token', 'encoder/cls_token'),
    ('encoder_to_regresser.', 'encoder_to_regressor/'),
    ('encoder_to_regresser_norm.', 'encoder_to_regressor_norm/'),
    ('mask_token', 'mask_token'),
    ('regresser.regressor_blocks.{i}.', 'regressor_blocks_{i}/'),
    ('regresser.norm.', 'regressor_norm/'),
    ('decoder.decoder_blocks.{i}.', 'decoder_blocks_{i}/'),
    ('decoder.norm.', 'decoder_norm/'),
    ('decoder.head.', 'decoder_head/'),
]
# The teacher is a copy of the encoder (momentum 0): not separate params.
TEACHER = 'alignment_encoder.'
# Groups of blocks that `scan=True` stacks: the encoder's, the regressor's
# and the decoder's.
STACKED = ('blocks', 'regressor_blocks', 'decoder_blocks')


def frozen_buffers(model, image_size: int) -> dict[str, np.ndarray]:
  """The fixed sin-cos tables of the official state dict (row first)."""
  g = image_size // model.encoder['patch_size']
  width = model.encoder['width']
  return {
      'encoder.pos_embed': layers.posemb_sincos_2d(g, g, width,
                                                   row_first=True),
      'rd_pos_embed': layers.posemb_sincos_2d(
          g, g, model.decoder_width or width, row_first=True),
  }


def to_flax(state_dict, model, params, image_size: int, strict: bool = True):
  """Official CAE state dict -> params tree shaped like `params`.

  `alignment_encoder.*` (the teacher copy) is skipped; strict=False keeps
  the values of `params` for what the file lacks (e.g. encoder-only files).
  """
  return core.torch_to_flax(state_dict, params, RULES,
                            frozen=frozen_buffers(model, image_size),
                            ignore=[r'alignment_encoder\.'], strict=strict,
                            stacked=STACKED)


def to_torch(params, model, image_size: int) -> dict[str, np.ndarray]:
  """params tree -> state dict with the official keys, teacher included."""
  sd = core.flax_to_torch(params, RULES,
                          frozen=frozen_buffers(model, image_size),
                          stacked=STACKED)
  sd.update({TEACHER + k[len('encoder.'):]: v for k, v in sd.items()
             if k.startswith('encoder.')})
  return sd


def to_torch_keys(tree) -> dict[str, np.ndarray]:
  """Any params-shaped tree (e.g. gradients) -> official keys (no teacher
  copy: it has no params of its own)."""
  return core.flax_to_torch(tree, RULES, stacked=STACKED)

"""Official MAE (facebookresearch/mae `models_mae.py`) <-> mim_jax MAE.

Robust MAE's encoder mask token (model.insert_block set) has no official
key: it is the extra key `encoder_mask_token` (1, 1, encoder width). An
official MAE file loads into such a model with strict=False (the token
keeps its init); a robust-MAE state dict loads into the official
`MaskedAutoencoderViT` with strict=False (the key is ignored; the official
forward then has no encoder mask tokens).
"""

import numpy as np

from mim_jax.convert import core
from mim_jax.models import layers

RULES = [
    ('cls_token', 'encoder/cls_token'),
    ('patch_embed.proj.', 'encoder/patch_embed/'),
    ('blocks.{i}.', 'encoder/blocks_{i}/'),
    ('norm.', 'encoder/norm/'),
    ('mask_token', 'decoder/mask_token'),
    ('encoder_mask_token', 'encoder_mask_token'),
    ('decoder_embed.', 'decoder/decoder_embed/'),
    ('decoder_blocks.{i}.', 'decoder/blocks_{i}/'),
    ('decoder_norm.', 'decoder/norm/'),
    ('decoder_pred.', 'decoder/pred/'),
]


def frozen_buffers(model, image_size: int) -> dict[str, np.ndarray]:
  """The fixed sin-cos tables the official state dict carries."""
  g = image_size // model.encoder['patch_size']
  return {
      'pos_embed': layers.posemb_sincos_2d(g, g, model.encoder['width']),
      'decoder_pos_embed': layers.posemb_sincos_2d(g, g, model.decoder_width),
  }


def to_flax(state_dict, model, params, image_size: int, strict: bool = True):
  """Official MAE state dict -> params tree shaped like `params`.

  The released `mae_pretrain_vit_*.pth` files hold the encoder only: load
  them with strict=False to keep the decoder of `params`.
  """
  return core.torch_to_flax(state_dict, params, RULES,
                            frozen=frozen_buffers(model, image_size),
                            strict=strict)


def to_torch(params, model, image_size: int) -> dict[str, np.ndarray]:
  """params tree -> state dict with the official key names."""
  return core.flax_to_torch(params, RULES,
                            frozen=frozen_buffers(model, image_size))


def to_torch_keys(tree) -> dict[str, np.ndarray]:
  """Any params-shaped tree (e.g. gradients) -> official keys."""
  return core.flax_to_torch(tree, RULES)

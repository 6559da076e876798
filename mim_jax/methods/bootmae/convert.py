"""Official BootMAE (LightDXY/BootMAE `modeling_pretrain_bootmae.py`) <->
mim_jax BootMAE, the momentum encoder (`model_ema.*`) included."""

from typing import Optional

import numpy as np

from mim_jax.convert import core
from mim_jax.models import layers

RULES = [
    ('cls_token', 'encoder/cls_token'),
    ('patch_embed.proj.', 'encoder/patch_embed/'),
    ('blocks.{i}.', 'encoder/blocks_{i}/'),
    ('norm.', 'encoder/norm/'),
    ('mask_token_1', 'feature_mask_token'),
    ('mask_token', 'pixel_mask_token'),
    ('down_1.', 'feature_down/'),
    ('down.', 'pixel_down/'),
    ('decode_blocks_1.{i}.', 'feature_blocks_{i}/'),
    ('decode_blocks.{i}.', 'pixel_blocks_{i}/'),
    ('decode_norm_1.', 'feature_norm/'),
    ('decode_norm.', 'pixel_norm/'),
    ('lm_head_1.', 'feature_head/'),
    ('lm_head.proj.', 'pixel_head/'),
]
EMA = 'model_ema.'
# Groups of blocks that `scan=True` stacks: the encoder's and both
# decoders'.
STACKED = ('blocks', 'pixel_blocks', 'feature_blocks')
# The momentum-encoder keys upstream reads (and the fixtures store).
EMA_PREFIXES = ('patch_embed.', 'cls_token', 'pos_embed', 'blocks.')
_HEAD = 'lm_head.proj.weight'


def frozen_buffers(model, image_size: int) -> dict[str, np.ndarray]:
  """The fixed sin-cos tables (row first, zero cls row)."""
  g = image_size // model.encoder['patch_size']
  return {
      'pos_embed': layers.posemb_sincos_2d(g, g, model.encoder['width'],
                                           row_first=True),
      'de_pos_embed': layers.posemb_sincos_2d(g, g, model.decoder_width,
                                              row_first=True),
  }


def _head_in(sd: dict) -> dict:
  """ConvTranspose2d weight (Dd, C, p, p) -> the array that the generic
  conv rule (O, I, kh, kw) -> (kh, kw, I, O) turns into our (Dd, p, p, C)."""
  sd = dict(sd)
  if _HEAD in sd:
    sd[_HEAD] = np.asarray(sd[_HEAD]).transpose(1, 3, 0, 2)
  return sd


def _head_out(sd: dict) -> dict:
  if _HEAD in sd and np.ndim(sd[_HEAD]) == 4:  # (not a mask's scalar leaf)
    sd[_HEAD] = np.asarray(sd[_HEAD]).transpose(2, 0, 3, 1)
  return sd


def to_flax(state_dict, model, params, image_size: int, strict: bool = True):
  """Official state dict -> online params shaped like `params` (the
  `model_ema.*` keys are read by `ema_to_flax`)."""
  online = {k: v for k, v in state_dict.items() if not k.startswith(EMA)}
  return core.torch_to_flax(_head_in(online), params, RULES,
                            frozen=frozen_buffers(model, image_size),
                            strict=strict, stacked=STACKED)


def ema_to_flax(state_dict, model, params, image_size: int) -> Optional[dict]:
  """The momentum encoder `{'encoder': ...}` from the `model_ema.*` keys, or
  None when the file has none. Keys upstream never reads (the final norm)
  are taken from the online `params`."""
  ema = {k[len(EMA):]: v for k, v in state_dict.items()
         if k.startswith(EMA) and k[len(EMA):].startswith(EMA_PREFIXES)}
  if not ema:
    return None
  frozen = {'pos_embed': frozen_buffers(model, image_size)['pos_embed']}
  return core.torch_to_flax(ema, {'encoder': params['encoder']}, RULES,
                            frozen=frozen, strict=False, stacked=STACKED)


def to_torch(params, model, image_size: int) -> dict[str, np.ndarray]:
  """Online params -> state dict, official keys (the momentum encoder:
  `ema_to_torch_keys`)."""
  sd = to_torch_keys(params)
  sd.update(frozen_buffers(model, image_size))
  return sd


def to_torch_keys(tree) -> dict[str, np.ndarray]:
  """Any params-shaped tree (e.g. gradients) -> official keys."""
  return _head_out(core.flax_to_torch(tree, RULES, stacked=STACKED))


def ema_to_torch_keys(ema, model=None, image_size: Optional[int] = None):
  """{'encoder': ...} -> `model_ema.*` keys that upstream reads."""
  frozen = {} if model is None else {
      'pos_embed': frozen_buffers(model, image_size)['pos_embed']}
  sd = core.flax_to_torch(ema, RULES, frozen=frozen, stacked=STACKED)
  return {EMA + k: v for k, v in sd.items() if k.startswith(EMA_PREFIXES)}

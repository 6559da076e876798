"""Official MAE (facebookresearch/mae `models_mae.py`) <-> mim_jax MAE.

Robust MAE's encoder mask token (model.insert_block set) has no official
key: it is the extra key `encoder_mask_token` (1, 1, encoder width). An
official MAE file loads into such a model with strict=False (the token
keeps its init); a robust-MAE state dict loads into the official
`MaskedAutoencoderViT` with strict=False (the key is ignored; the official
forward then has no encoder mask tokens).
"""

import numpy as np
from absl import logging

from mim_jax import errors
from mim_jax.convert import core
from mim_jax.convert import hf_vit
from mim_jax.models import layers
from mim_jax.models import vit

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


def _encoder(model):
  """The vit.Encoder of `model` (its fields with their defaults)."""
  return vit.Encoder(**model.encoder)


def hf_problems(config, model) -> list[str]:
  """What ViTMAEForPreTraining cannot represent in this MAE (robust-MAE
  switches, BEiT-style encoder options), each with the reason."""
  enc = _encoder(model)
  size = int(config.input.image_size)
  problems = hf_vit.encoder_problems(enc, size)
  if enc.qkv_bias is not True or enc.layer_scale is not None:
    problems.append('a BEiT-style encoder (qkv_bias / layer_scale): '
                    'ViTMAE\'s layers have plain q, k, v biases and no layer '
                    'scale')
  if enc.posemb != 'sincos':
    problems.append(f"posemb={enc.posemb!r}: ViTMAE's position embedding is "
                    'the fixed sin-cos table')
  if model.insert_block is not None:
    problems.append('encoder mask tokens (model.insert_block): ViTMAE has '
                    'no encoder mask token')
  if config.loss.get('pop_norm', 'none') != 'none':
    problems.append(f'population-statistics targets (loss.pop_norm='
                    f'{config.loss.pop_norm!r}): ViTMAE\'s loss has none')
  if model.encoder_attn_drop != model.decoder_attn_drop:
    problems.append(
        f'attention dropout {model.encoder_attn_drop} (encoder) vs '
        f'{model.decoder_attn_drop} (decoder): ViTMAE has one '
        'attention_probs_dropout_prob for both')
  if config.loss.get('norm_pix_loss') and float(
      config.loss.get('norm_pix_eps', 1e-6)) != 1e-6:
    problems.append(f'norm_pix_eps={config.loss.norm_pix_eps}: ViTMAE\'s '
                    'norm-pix loss uses 1e-6')
  return problems


def to_hf(config, model, params) -> tuple[dict, dict[str, np.ndarray]]:
  """params -> (config.json, state dict) of transformers'
  ViTMAEForPreTraining (legacy key names; see mim_jax/convert/hf_vit.py).

  Raises:
    errors.ConfigError: what ViTMAE cannot represent (every reason).
  """
  problems = hf_problems(config, model)
  if problems:
    raise errors.ConfigError(
        f'transformers\' {hf_vit.MAE_ARCH} cannot represent this MAE:\n  ' +
        '\n  '.join(problems) + '\n(export the encoder with --format=timm, '
        'or the whole model with --format=official)')
  size = int(config.input.image_size)
  cfg = hf_vit.mae_config(
      _encoder(model), dict(width=model.decoder_width, depth=model.decoder_depth,
                   num_heads=model.decoder_num_heads,
                   mlp_dim=model.decoder_mlp_dim),
      size, model.mask_ratio, bool(config.loss.get('norm_pix_loss', False)))
  cfg['attention_probs_dropout_prob'] = float(model.decoder_attn_drop)
  return cfg, hf_vit.mae_to_hf(to_torch(params, model, size))


def _hf_fields(config, model) -> dict[str, tuple]:
  """config.json entry -> (our config field, our value)."""
  enc, m = _encoder(model), 'config.model.'
  return {
      **hf_vit.encoder_sizes(enc, m + 'encoder.'),
      'qkv_bias': (m + 'encoder.qkv_bias', enc.qkv_bias),
      'num_channels': ('in_chans', model.in_chans),
      'image_size': ('config.input.image_size',
                     int(config.input.image_size)),
      'decoder_hidden_size': (m + 'decoder_width', model.decoder_width),
      'decoder_num_hidden_layers': (m + 'decoder_depth', model.decoder_depth),
      'decoder_num_attention_heads': (m + 'decoder_num_heads',
                                      model.decoder_num_heads),
      'decoder_intermediate_size': (m + 'decoder_mlp_dim',
                                    model.decoder_mlp_dim or
                                    4 * model.decoder_width),
  }


def from_hf(config, model, hf_config, state_dict, where: str
            ) -> dict[str, np.ndarray]:
  """A ViTMAEForPreTraining folder's (config.json, state dict) -> the
  official state dict, after checking its sizes against the config.

  Raises:
    errors.ConfigError: sizes that differ (each named), or a config.json
      that is no ViTMAE.
    core.ConversionError: keys that are no ViTMAE keys.
  """
  if hf_config.get('model_type') != hf_vit.MAE_TYPE:
    raise errors.ConfigError(
        f'{where}: model_type {hf_config.get("model_type")!r} is not '
        f'{hf_vit.MAE_TYPE!r}; MAE pretraining starts from a '
        f'{hf_vit.MAE_ARCH} folder (fine-tuning and probes also read '
        f'{hf_vit.VIT_ARCH} ones).')
  hf_config = hf_vit.with_defaults(hf_config)
  hf_vit.check_sizes(hf_config, _hf_fields(config, model), where)
  notes = [hf_vit.eps_note(hf_config, _encoder(model).layernorm_eps)]
  for key, ours in (('mask_ratio', model.mask_ratio),
                    ('norm_pix_loss', config.loss.get('norm_pix_loss'))):
    if hf_config[key] != ours:
      notes.append(f'config.json has {key}={hf_config[key]!r}, this run '
                   f'uses {ours!r}.')
  for note in filter(None, notes):
    logging.info('%s: %s', where, note)
  sd = hf_vit.mae_from_hf(state_dict, where)
  zero = [k for k in ('pos_embed', 'decoder_pos_embed')
          if k in sd and not np.any(sd[k])]
  if zero:
    raise core.ConversionError(
        f'{where}: the position tables {zero} are all zeros, as in a '
        f'transformers 5 {hf_vit.MAE_ARCH} built from a config rather than '
        'loaded from MAE weights; mim_jax\'s MAE adds the fixed sin-cos '
        'table (what the hub checkpoints hold): copy it in before saving.')
  return sd

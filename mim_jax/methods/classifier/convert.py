"""Official fine-tuned / probe checkpoints <-> mim_jax Classifier.

One rule set covers every layout, as their key sets do not overlap:

* timm `VisionTransformer` and MAE fine-tuning (`models_vit.py`,
  `mae_finetuned_vit_*.pth`): cls_token, pos_embed, patch_embed.proj.*,
  blocks.{i}.*, then norm.* (cls token) or fc_norm.* (global pool), head.*;
  timm's layer scale `blocks.{i}.ls{1,2}.gamma` and, into an encoder with
  q/v biases, its `attn.qkv.bias` are renamed first (`from_timm_names`);
* BEiT-style fine-tuning of CAE / BootMAE (timm `Beit` with absolute
  position embedding): the same plus blocks.{i}.attn.q_bias / v_bias
  (qkv_bias='qv') and, for CAE, blocks.{i}.gamma_1 / gamma_2
  (layer_scale) and the relative position bias below;
* linear probes (MAE / BootMAE `main_linprobe`, CAE `run_linear.py`):
  head.0 = BatchNorm1d (buffers only), head.1 = Linear -> our 'head' =
  {'linear'} params plus {'bn'} batch statistics;
* CAE's attentive probe: query_token, attentive_blocks.0.*, fc_norm =
  LP_BatchNorm (buffers only) and head.*.

`pos_embed` is a param for encoder posemb='learned'; for the fixed sin-cos
table it is checked on import and written on export, like the pretraining
converters.

BEiT's per-block relative position bias (encoder rel_pos_bias=True; CAE's
fine-tuning and attentive-probe default): the param
blocks.{i}.attn.relative_position_bias_table is mapped by the
'blocks.{i}.' rule; the buffer blocks.{i}.attn.relative_position_index,
fixed by the patch grid, is checked on import and written on export like
the sin-cos table (the official BEiT / CAE code saves it, timm's `Beit`
does not). BEiT's shared variant (one
`rel_pos_bias.relative_position_bias_table` for all blocks) raises.

BatchNorm running statistics are not params: `to_flax` skips them and
`batch_stats_to_flax` reads them into the model's 'batch_stats' collection
(running_mean -> mean, running_var -> var). torch's `num_batches_tracked`
counter is dropped: it only matters for momentum=None, which no official
recipe uses; `to_torch` leaves it out and torch's `load_state_dict(strict=
True)` fills it in (a BatchNorm's loader does, for dicts without
version metadata).
"""

import re
from typing import Any, Optional

import numpy as np

from mim_jax.convert import core
from mim_jax.models import layers
from mim_jax.models import vit

RULES = [
    ('cls_token', 'encoder/cls_token'),
    ('pos_embed', 'encoder/pos_embed'),
    ('patch_embed.proj.', 'encoder/patch_embed/'),
    ('blocks.{i}.', 'encoder/blocks_{i}/'),
    ('norm.', 'encoder/norm/'),
    ('fc_norm.', 'fc_norm/'),
    ('query_token', 'query_token'),
    ('attentive_blocks.0.', 'attentive_block/'),
    # Before 'head.': the linear-probe head is a Sequential(BN, Linear).
    ('head.1.', 'head/linear/'),
    ('head.', 'head/'),
]

# BatchNorm buffers (exact keys) -> 'batch_stats' paths.
_BN_MODULES = [('head.0', 'head/bn'), ('fc_norm', 'fc_norm')]
STATS_RULES = [(f'{t}.running_{s}', f'{f}/{s}')
               for t, f in _BN_MODULES for s in ('mean', 'var')]
# Every BatchNorm buffer, the counter included: not params.
_BN_BUFFERS = [re.escape(t) + r'\.(running_mean|running_var|'
               r'num_batches_tracked)$' for t, _ in _BN_MODULES]


# timm VisionTransformer block names that ours (BEiT's) spell otherwise.
_TIMM_LAYER_SCALE = re.compile(r'^(blocks\.\d+\.)ls([12])\.gamma$')
_TIMM_QKV_BIAS = re.compile(r'^(blocks\.\d+\.attn\.)qkv\.bias$')


def from_timm_names(state_dict, model) -> dict:
  """timm `VisionTransformer` block names -> the encoder's BEiT-style ones:
  `ls1.gamma` / `ls2.gamma` -> `gamma_1` / `gamma_2` and, for an encoder
  with q/v biases (qkv_bias='qv'), `attn.qkv.bias` -> `attn.q_bias` and
  `attn.v_bias`. timm's key bias is dropped, which is exact: it adds
  q . b_k to all of a query's logits alike, and softmax cancels it. Other
  keys pass unchanged (a BEiT-named file comes back as it was)."""
  qv = model.encoder.get('qkv_bias', vit.Encoder.qkv_bias) == 'qv'
  out = {}
  for key, value in state_dict.items():
    scale = _TIMM_LAYER_SCALE.match(key)
    bias = _TIMM_QKV_BIAS.match(key) if qv else None
    if scale:
      out[f'{scale[1]}gamma_{scale[2]}'] = value
    elif bias:
      q, _, v = np.split(np.asarray(value), 3)
      out[f'{bias[1]}q_bias'], out[f'{bias[1]}v_bias'] = q, v
    else:
      out[key] = value
  return _unit_layer_scale(out, model)


def _unit_layer_scale(state_dict, model) -> dict:
  """A file without layer scale (a plain timm ViT, or a transformers
  ViTModel whose layer scale was folded into its projections) into an
  encoder with layer scale: gamma_1 = gamma_2 = 1, which is that file's
  function exactly (a fresh gamma would scale every block's branches)."""
  if (model.encoder.get('layer_scale') is None or
      any('.gamma_' in k for k in state_dict)):
    return state_dict
  out = dict(state_dict)
  for key, value in state_dict.items():
    block = re.match(r'^(blocks\.\d+\.)norm1\.weight$', key)
    if block:
      for i in (1, 2):
        out[f'{block[1]}gamma_{i}'] = np.ones_like(np.asarray(value))
  return out


def _posemb_learned(model) -> bool:
  return model.encoder.get('posemb', vit.Encoder.posemb) == 'learned'


def frozen_buffers(model, image_size: int) -> dict[str, np.ndarray]:
  """The fixed buffers of the official state dict: the sin-cos `pos_embed`
  (none when the model learns it: then it is a param) and, with
  rel_pos_bias, each block's `relative_position_index`."""
  enc = model.encoder
  g = image_size // enc.get('patch_size', vit.Encoder.patch_size)
  out = {}
  if not _posemb_learned(model):
    out['pos_embed'] = layers.posemb_sincos_2d(
        g, g, enc.get('width', vit.Encoder.width),
        row_first=enc.get('posemb_row_first', vit.Encoder.posemb_row_first))
  if enc.get('rel_pos_bias', vit.Encoder.rel_pos_bias):
    index = layers.relative_position_index(g, g)
    for i in range(enc.get('depth', vit.Encoder.depth)):
      out[f'blocks.{i}.attn.relative_position_index'] = index
  return out


def _reject_shared_rel_pos_bias(state_dict):
  """BEiT's shared bias would otherwise be reported as an unknown key."""
  shared = sorted(k for k in state_dict if k.startswith('rel_pos_bias.'))
  if shared:
    raise core.ConversionError(
        f'{shared}: a relative position bias shared by all blocks (BEiT '
        '`use_shared_rel_pos_bias`) is not supported; the encoder has '
        'per-block tables (rel_pos_bias=True). Copy the table to every '
        'blocks.{i}.attn.relative_position_bias_table first, as the BEiT / '
        'CAE fine-tuning scripts do when loading such a file.')


def to_flax(state_dict, model, params, image_size: int, strict: bool = True):
  """Official fine-tuned or probe state dict, or a timm
  `VisionTransformer` one (`from_timm_names`), -> params tree shaped like
  `params` (loop or scan layout).

  BatchNorm buffers are skipped (see `batch_stats_to_flax`). A pretraining
  checkpoint into a fresh classifier needs strict=False (it has no head)
  and a converter of its own method for its key names.

  Raises:
    core.ConversionError: unknown, missing (strict) or mis-shaped keys,
      fixed buffers that differ from ours, or BEiT's shared relative
      position bias.
  """
  _reject_shared_rel_pos_bias(state_dict)
  state_dict = from_timm_names(state_dict, model)
  return core.torch_to_flax(state_dict, params, RULES,
                            frozen=frozen_buffers(model, image_size),
                            ignore=_BN_BUFFERS, strict=strict)


def batch_stats_to_flax(state_dict, model, batch_stats,
                        strict: bool = True) -> dict:
  """The BatchNorm running statistics of the state dict -> a 'batch_stats'
  tree shaped like `batch_stats` (the model's, from init or eval_shape).

  Keys other than BatchNorm buffers are left to `to_flax`;
  `num_batches_tracked` is dropped.

  Raises:
    core.ConversionError: a statistic the model has is missing (strict),
      one it has not is present, or a shape differs.
  """
  del model  # The layout is fixed by `batch_stats`.
  stats_keys = {t for t, _ in STATS_RULES}
  sd = {k: v for k, v in state_dict.items() if k in stats_keys}
  return core.torch_to_flax(sd, batch_stats or {}, STATS_RULES,
                            strict=strict)


def to_torch(params, model, image_size: int,
             batch_stats: Optional[Any] = None) -> dict[str, np.ndarray]:
  """params tree (and the 'batch_stats' collection, for the probe heads) ->
  state dict with the official keys, fixed buffers included."""
  sd = core.flax_to_torch(params, RULES,
                          frozen=frozen_buffers(model, image_size))
  if batch_stats:
    sd.update(core.flax_to_torch(batch_stats, STATS_RULES))
  return sd


def to_torch_keys(tree) -> dict[str, np.ndarray]:
  """Any params-shaped tree (e.g. gradients) -> official keys."""
  return core.flax_to_torch(tree, RULES)


def batch_stats_to_torch_keys(batch_stats) -> dict[str, np.ndarray]:
  """A 'batch_stats' tree -> the official BatchNorm buffer keys."""
  return core.flax_to_torch(batch_stats, STATS_RULES)

"""🤗 transformers ViT / ViTMAE folders <-> mim_jax's official state dicts.

A transformers checkpoint is a folder: `config.json` (its `model_type`:
'vit_mae' for `ViTMAEForPreTraining`, 'vit' for `ViTModel`) and the
weights, `model.safetensors` (or shards listed in
`model.safetensors.index.json`, or `pytorch_model.bin`, read with
torch.load(weights_only=True)).

Key names. The hub checkpoints (facebook/vit-mae-base, google/vit-*) and
transformers 4.x use the legacy names; transformers 5 renames them in
memory and converts on load. Both are read; this module writes the legacy
layout: the hub's, which 4.x loads as is (4.x is not installed here), and
which 5.25 converts with no missing or unexpected keys (tested):

  legacy (written)                         5.x in memory
  vit.embeddings.cls_token                 (same)
  vit.embeddings.position_embeddings       (same)
  vit.embeddings.patch_embeddings.projection.*
  vit.encoder.layer.{i}.layernorm_before   vit.layers.{i}.layernorm_before
    .attention.attention.{query,key,value} .attention.{q,k,v}_proj
    .attention.output.dense                .attention.o_proj
    .layernorm_after                       .layernorm_after
    .intermediate.dense / .output.dense    .mlp.fc1 / .mlp.fc2
  vit.layernorm
  decoder.decoder_layers.{i}.*             (5.25's save_pretrained writes
                                            decoder.decoder_encoder.layer.)
  decoder.{mask_token, decoder_pos_embed, decoder_embed, decoder_norm,
           decoder_pred}

`ViTModel` has the same encoder keys without the `vit.` prefix (and a
`pooler.dense.*` unless built with add_pooling_layer=False).

mim_jax's side is the official MAE state dict: the encoder in timm names
(cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}.*, norm.*) and the decoder in the
official names (mask_token, decoder_pos_embed, decoder_embed.*,
decoder_blocks.{i}.*, decoder_norm.*, decoder_pred.*). timm's fused
`attn.qkv` is [query; key; value] stacked along the output axis.
"""

import json
import os
import re
import shutil
from typing import Any, Mapping, Optional

import numpy as np

from mim_jax import errors
from mim_jax.convert import core
from mim_jax.convert import timm_vit
from mim_jax.models import layers
from mim_jax.models import vit

MAE_TYPE, VIT_TYPE = 'vit_mae', 'vit'
MAE_ARCH, VIT_ARCH = 'ViTMAEForPreTraining', 'ViTModel'
WEIGHTS = 'model.safetensors'
_INDEX = 'model.safetensors.index.json'
_BIN = 'pytorch_model.bin'

# Inside a layer: legacy and 5.x module names -> timm block module names
# ('q' / 'k' / 'v' are fused into attn.qkv afterwards).
_INNER = {
    'layernorm_before': 'norm1', 'layernorm_after': 'norm2',
    'attention.attention.query': 'q', 'attention.q_proj': 'q',
    'attention.attention.key': 'k', 'attention.k_proj': 'k',
    'attention.attention.value': 'v', 'attention.v_proj': 'v',
    'attention.output.dense': 'attn.proj', 'attention.o_proj': 'attn.proj',
    'intermediate.dense': 'mlp.fc1', 'mlp.fc1': 'mlp.fc1',
    'output.dense': 'mlp.fc2', 'mlp.fc2': 'mlp.fc2',
}
# timm block module -> the legacy name written.
_LEGACY = {
    'norm1': 'layernorm_before', 'norm2': 'layernorm_after',
    'attn.proj': 'attention.output.dense', 'mlp.fc1': 'intermediate.dense',
    'mlp.fc2': 'output.dense',
}
_QKV = (('q', 'query'), ('k', 'key'), ('v', 'value'))
# Outside the layers: HF name (after the model prefix) -> timm / official.
_ENCODER_TOP = {
    'embeddings.cls_token': 'cls_token',
    'embeddings.position_embeddings': 'pos_embed',
    'embeddings.patch_embeddings.projection.weight': 'patch_embed.proj.weight',
    'embeddings.patch_embeddings.projection.bias': 'patch_embed.proj.bias',
    'layernorm.weight': 'norm.weight', 'layernorm.bias': 'norm.bias',
}
_DECODER_TOP = {
    f'decoder.{k}': k for k in (
        'mask_token', 'decoder_pos_embed', 'decoder_embed.weight',
        'decoder_embed.bias', 'decoder_norm.weight', 'decoder_norm.bias',
        'decoder_pred.weight', 'decoder_pred.bias')}
_ENCODER_LAYER = re.compile(r'^(?:encoder\.layer|layers)\.(\d+)\.(.+)$')
_DECODER_LAYER = re.compile(
    r'^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)$')


# ---------------------------------------------------------------------------
# Reading and writing folders.


def is_folder(path) -> bool:
  """A folder with a transformers config.json (it has `model_type`; a
  mim_jax workdir's config.json has `model_name` instead)."""
  if not path or not os.path.isdir(path):
    return False
  name = os.path.join(path, 'config.json')
  if not os.path.isfile(name):
    return False
  try:
    with open(name) as f:
      cfg = json.load(f)
  except ValueError:
    return False
  return isinstance(cfg, dict) and 'model_type' in cfg and (
      'model_name' not in cfg)


def read_config(path: str, types=(MAE_TYPE, VIT_TYPE)) -> dict:
  """The folder's config.json, checked to be of one of `types`.

  Raises:
    errors.MissingFileError: no config.json.
    errors.ConfigError: another model_type.
  """
  name = os.path.join(path, 'config.json')
  if not os.path.isfile(name):
    raise errors.MissingFileError(
        f'{path!r} has no config.json: give a transformers checkpoint '
        'folder (config.json + model.safetensors).')
  try:
    with open(name) as f:
      cfg = json.load(f)
  except ValueError as e:
    raise errors.WeightsFileError(
        f'{name} is not JSON ({e}): fetch the folder again.') from e
  kind = cfg.get('model_type') if isinstance(cfg, dict) else None
  if kind not in types:
    raise errors.ConfigError(
        f'{name}: model_type {kind!r} is not {" or ".join(map(repr, types))}'
        f'; mim_jax reads {MAE_ARCH} (vit_mae) and, for encoders, '
        f'{VIT_ARCH} (vit) folders.')
  return cfg


def weights_files(path: str) -> list[str]:
  """The folder's weights files: model.safetensors, the shards of
  model.safetensors.index.json, or pytorch_model.bin, in that preference.

  Raises:
    errors.MissingFileError: none of them.
  """
  single = os.path.join(path, WEIGHTS)
  if os.path.exists(single):
    return [single]
  index = os.path.join(path, _INDEX)
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f).get('weight_map', {}).values()))
    return [os.path.join(path, s) for s in shards]
  pickled = os.path.join(path, _BIN)
  if os.path.exists(pickled):
    return [pickled]
  raise errors.MissingFileError(
      f'{path!r} holds no {WEIGHTS}, {_INDEX} or {_BIN}: '
      f'its files are {sorted(os.listdir(path))[:10]}.')


def check_folder(path: str, types=(MAE_TYPE, VIT_TYPE)) -> dict:
  """The cheap checks of a folder before anything is built: its
  config.json (model_type) and whole weights files; returns config.json."""
  cfg = read_config(path, types)
  for name in weights_files(path):
    core.check_weights_file(name)
  return cfg


def read_folder(path: str, types=(MAE_TYPE, VIT_TYPE)
                ) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json, state dict) of a transformers folder (shards merged).

  Raises:
    errors.MissingFileError / errors.ConfigError: as `read_config` and
      `weights_files`.
    errors.WeightsFileError: a truncated or damaged weights file.
  """
  cfg = read_config(path, types)
  sd = {}
  for name in weights_files(path):
    sd.update(core.load_state_dict(name))
  return cfg, sd


def write_folder(out: str, config: Mapping[str, Any],
                 state_dict: Mapping[str, np.ndarray]):
  """Writes config.json + model.safetensors (with the 'pt' format metadata
  transformers 4.x asks for) into `out`, through a temporary folder renamed
  into place; an `out` holding only those two files is replaced.

  Raises:
    errors.ConfigError: `out` exists and holds other files.
  """
  out = os.path.abspath(out)
  if os.path.exists(out):
    extra = (set(os.listdir(out)) - {'config.json', WEIGHTS}
             if os.path.isdir(out) else {out})
    if extra:
      raise errors.ConfigError(
          f'--out={out!r} exists and holds {sorted(extra)[:5]}: give a new '
          'folder (or one written by this export).')
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
  tmp = f'{out}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with open(os.path.join(tmp, 'config.json'), 'w') as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
  st.save_file({k: np.ascontiguousarray(v, np.float32)
                for k, v in state_dict.items()},
               os.path.join(tmp, WEIGHTS), metadata={'format': 'pt'})
  if os.path.exists(out):
    shutil.rmtree(out)
  os.replace(tmp, out)


# ---------------------------------------------------------------------------
# Key layouts.


def _fuse_qkv(parts: dict, where: str) -> dict:
  """{'blocks.{i}.q.weight': ...} -> {'blocks.{i}.attn.qkv.weight': ...}."""
  out = {}
  stems = {k.rsplit('.', 2)[0] + '.' + k.rsplit('.', 1)[1] for k in parts}
  for stem_leaf in sorted(stems):
    stem, leaf = stem_leaf.rsplit('.', 1)
    got = [parts.get(f'{stem}.{q}.{leaf}') for q, _ in _QKV]
    if any(g is None for g in got):
      have = [q for (q, _), g in zip(_QKV, got) if g is not None]
      raise core.ConversionError(
          f'{where}: {stem} has the attention {leaf}s of {have} only; a '
          'layer needs query, key and value.')
    out[f'{stem}.attn.qkv.{leaf}'] = np.concatenate(got, axis=0)
  return out


def _layers_from_hf(sd: Mapping[str, np.ndarray], pattern: re.Pattern,
                    prefix: str, where: str) -> tuple[dict, list]:
  """The keys of `sd` that `pattern` matches as layers -> `prefix{i}.`
  timm block keys (q/k/v fused); returns (converted, unknown keys)."""
  out, qkv, unknown = {}, {}, []
  for key, value in sd.items():
    m = pattern.match(key)
    if not m:
      continue
    mod, _, leaf = m.group(2).rpartition('.')
    name = _INNER.get(mod)
    if name is None:
      unknown.append(key)
    elif name in ('q', 'k', 'v'):
      qkv[f'{prefix}{m.group(1)}.{name}.{leaf}'] = value
    else:
      out[f'{prefix}{m.group(1)}.{name}.{leaf}'] = value
  out.update(_fuse_qkv(qkv, where))
  return out, unknown


def model_prefix(sd: Mapping[str, Any]) -> str:
  """'vit.' for a ViTMAEForPreTraining state dict, '' for a ViTMAEModel's
  or ViTModel's (their encoder keys start at `embeddings.`)."""
  return 'vit.' if any(k.startswith('vit.') for k in sd) else ''


def encoder_from_hf(sd: Mapping[str, np.ndarray], prefix: str = '',
                    where: str = 'state dict') -> tuple[dict, list]:
  """The ViT encoder under `prefix` ('vit.' in ViTMAE, '' in ViTModel) in
  timm names; returns (encoder state dict, keys under `prefix` that are no
  encoder key)."""
  inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  out, unknown = _layers_from_hf(inner, _ENCODER_LAYER, 'blocks.', where)
  for key, value in inner.items():
    if key in _ENCODER_TOP:
      out[_ENCODER_TOP[key]] = value
    elif not _ENCODER_LAYER.match(key):
      unknown.append(key)
  return out, [prefix + k for k in unknown]


def mae_from_hf(sd: Mapping[str, np.ndarray],
                where: str = 'state dict') -> dict[str, np.ndarray]:
  """A ViTMAEForPreTraining state dict (legacy or 5.x names) -> the
  official MAE state dict.

  Raises:
    core.ConversionError: keys that are neither (listed).
  """
  prefix = model_prefix(sd)
  out, unknown = encoder_from_hf(
      {k: v for k, v in sd.items() if not k.startswith('decoder.')}, prefix,
      where)
  dec = {k: v for k, v in sd.items() if k.startswith('decoder.')}
  blocks, bad = _layers_from_hf(dec, _DECODER_LAYER, 'decoder_blocks.',
                                where)
  out.update(blocks)
  unknown += bad
  for key, value in dec.items():
    if key in _DECODER_TOP:
      out[_DECODER_TOP[key]] = value
    elif not _DECODER_LAYER.match(key):
      unknown.append(key)
  unknown += [k for k in sd if not k.startswith((prefix, 'decoder.'))]
  if unknown:
    raise core.ConversionError(
        f'{where}: {len(unknown)} keys are not {MAE_ARCH} keys: '
        f'{sorted(unknown)[:12]}.')
  return out


def _layers_to_hf(sd: Mapping[str, np.ndarray], src: str, dst: str) -> dict:
  """timm block keys `src{i}.*` -> legacy layer keys `dst{i}.*` (the fused
  qkv split into query, key and value)."""
  out = {}
  pattern = re.compile(rf'^{re.escape(src)}(\d+)\.(.+)\.(weight|bias)$')
  for key, value in sd.items():
    m = pattern.match(key)
    if not m:
      continue
    i, mod, leaf = m.groups()
    if mod == 'attn.qkv':
      for (_, name), part in zip(_QKV, np.split(np.asarray(value), 3)):
        out[f'{dst}{i}.attention.attention.{name}.{leaf}'] = part
    else:
      out[f'{dst}{i}.{_LEGACY[mod]}.{leaf}'] = value
  return out


def encoder_to_hf(sd: Mapping[str, np.ndarray], prefix: str = ''
                  ) -> dict[str, np.ndarray]:
  """A timm-named ViT encoder (fused qkv with bias) -> legacy HF keys under
  `prefix` ('' for ViTModel, 'vit.' for ViTMAE)."""
  out = {f'{prefix}{k}': sd[v] for k, v in _ENCODER_TOP.items() if v in sd}
  out.update({prefix + k: v for k, v in _layers_to_hf(
      sd, 'blocks.', 'encoder.layer.').items()})
  return out


def mae_to_hf(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The official MAE state dict -> ViTMAEForPreTraining's (legacy names)."""
  out = encoder_to_hf(sd, 'vit.')
  out.update(_layers_to_hf(sd, 'decoder_blocks.', 'decoder.decoder_layers.'))
  out.update({k: sd[v] for k, v in _DECODER_TOP.items()})
  return out


# ---------------------------------------------------------------------------
# Configs.


def encoder_config(enc, image_size: int) -> dict:
  """The ViTConfig / ViTMAEConfig entries of a vit.Encoder (an instance,
  for its defaults; already checked to be representable)."""
  return dict(
      hidden_size=enc.width, num_hidden_layers=enc.depth,
      num_attention_heads=enc.num_heads,
      intermediate_size=enc.mlp_dim or 4 * enc.width,
      hidden_act='gelu', hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0,
      layer_norm_eps=float(enc.layernorm_eps),
      image_size=int(image_size), patch_size=enc.patch_size,
      num_channels=3, qkv_bias=enc.qkv_bias is not False)


def encoder_sizes(enc, field: str = 'config.model.encoder.'
                  ) -> dict[str, tuple]:
  """config.json entry -> (our config field, value) of a vit.Encoder's
  sizes, for `check_sizes`; `field`: where the config holds the encoder."""
  return {
      'hidden_size': (field + 'width', enc.width),
      'num_hidden_layers': (field + 'depth', enc.depth),
      'num_attention_heads': (field + 'num_heads', enc.num_heads),
      'intermediate_size': (field + 'mlp_dim', enc.mlp_dim or 4 * enc.width),
      'patch_size': (field + 'patch_size', enc.patch_size)}


def check_sizes(hf_config: Mapping[str, Any], ours: Mapping[str, tuple],
                where: str):
  """Compares config.json entries with ours: `ours` maps an HF entry to
  (our config field, value); HF defaults fill entries the file omits.

  Raises:
    errors.ConfigError: every entry that differs, naming both fields.
  """
  bad = [f'{field}={value!r} but {key}={hf_config.get(key)!r}'
         for key, (field, value) in ours.items()
         if hf_config.get(key) != value]
  if hf_config.get('hidden_act', 'gelu') != 'gelu':
    bad.append(f"hidden_act={hf_config['hidden_act']!r}: mim_jax's MLP uses "
               "the exact GELU ('gelu')")
  if bad:
    raise errors.ConfigError(
        f'the config does not fit {where}: ' + '; '.join(bad) +
        '. Set those config fields to the checkpoint\'s sizes.')


def eps_note(hf_config: Mapping[str, Any], eps: float) -> Optional[str]:
  """A log line when the folder's LayerNorm epsilon is not ours (the hub's
  MAE configs say 1e-12, transformers' default, while the official MAE
  weights were trained with 1e-6), else None."""
  theirs = hf_config.get('layer_norm_eps', 1e-12)
  if float(theirs) == float(eps):
    return None
  return (f'config.json has layer_norm_eps={theirs}, the model here uses '
          f'{eps} (config.model.encoder.layernorm_eps): the weights load '
          'unchanged; outputs differ only where a token\'s variance is near '
          'either epsilon.')


# ViTMAEConfig's defaults, for entries a config.json leaves out.
MAE_DEFAULTS = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act='gelu', layer_norm_eps=1e-12,
    image_size=224, patch_size=16, num_channels=3, qkv_bias=True,
    decoder_num_attention_heads=16, decoder_hidden_size=512,
    decoder_num_hidden_layers=8, decoder_intermediate_size=2048,
    mask_ratio=0.75, norm_pix_loss=False)


def with_defaults(hf_config: Mapping[str, Any]) -> dict:
  """config.json with ViTMAEConfig's defaults filled in and square sizes
  given as [s, s] made plain ints."""
  out = dict(MAE_DEFAULTS, **hf_config)
  for key in ('image_size', 'patch_size'):
    value = out[key]
    if isinstance(value, (list, tuple)) and len(set(value)) == 1:
      out[key] = int(value[0])
  return out


def encoder_problems(enc, image_size: int) -> list[str]:
  """What transformers' ViT layers cannot represent in a vit.Encoder
  (an instance, for its defaults), each with its fix."""
  problems = []
  if enc.rel_pos_bias:
    problems.append('relative position bias (rel_pos_bias=True): '
                    'transformers\' ViT has none')
  if not enc.final_norm:
    problems.append('no final norm (final_norm=False): transformers\' ViT '
                    'always ends with `layernorm`')
  return problems + timm_vit.grid_problems(enc, image_size)


def _plain_blocks(sd: dict) -> dict:
  """BEiT-style block leaves -> plain ViT ones, exactly: q_bias / v_bias ->
  one qkv bias [q, 0, v]; layer scale gamma folded into the layer it
  scales (gamma * (W x + b) = (gamma W) x + gamma b): gamma_1 into
  attn.proj, gamma_2 into mlp.fc2."""
  out = dict(sd)
  for key in [k for k in sd if k.endswith('.q_bias')]:
    stem = key[:-len('.q_bias')]
    q, v = out.pop(key), out.pop(f'{stem}.v_bias')
    out[f'{stem}.qkv.bias'] = np.concatenate([q, np.zeros_like(q), v])
  for gamma, layer in (('gamma_1', 'attn.proj'), ('gamma_2', 'mlp.fc2')):
    for key in [k for k in sd if k.endswith(f'.{gamma}')]:
      stem = key[:-len(gamma)]
      g = np.asarray(out.pop(key), np.float32)
      out[f'{stem}{layer}.weight'] = g[:, None] * out[f'{stem}{layer}.weight']
      out[f'{stem}{layer}.bias'] = g * out[f'{stem}{layer}.bias']
  return out


def vit_config(enc, image_size: int) -> dict:
  """config.json of the `ViTModel` that `encoder_to_vit` writes."""
  cfg = encoder_config(enc, image_size)
  cfg.update(model_type=VIT_TYPE, architectures=[VIT_ARCH],
             encoder_stride=enc.patch_size,
             pooler_output_size=cfg['hidden_size'], pooler_act='tanh')
  return cfg


def mae_config(enc, decoder: Mapping[str, Any], image_size: int,
               mask_ratio: float, norm_pix_loss: bool) -> dict:
  """config.json of the `ViTMAEForPreTraining` that an MAE exports to;
  `decoder`: width, depth, num_heads and mlp_dim (None: 4 * width)."""
  cfg = encoder_config(enc, image_size)
  cfg.update(
      model_type=MAE_TYPE, architectures=[MAE_ARCH],
      decoder_hidden_size=int(decoder['width']),
      decoder_num_hidden_layers=int(decoder['depth']),
      decoder_num_attention_heads=int(decoder['num_heads']),
      decoder_intermediate_size=int(decoder.get('mlp_dim') or
                                    4 * decoder['width']),
      mask_ratio=float(mask_ratio), norm_pix_loss=bool(norm_pix_loss))
  return cfg


def encoder_to_vit(params, fields: Mapping[str, Any], image_size: int
                   ) -> tuple[dict, dict[str, np.ndarray]]:
  """A vit.Encoder's params (loop or scan layout) -> (config.json, state
  dict) of transformers' `ViTModel(config, add_pooling_layer=False)`, whose
  `last_hidden_state` is our encoder's output on whole images.

  Raises:
    errors.ConfigError: what ViTModel cannot represent (every reason).
  """
  enc = vit.Encoder(**fields)
  problems = encoder_problems(enc, image_size)
  if problems:
    raise errors.ConfigError(
        f'transformers\' {VIT_ARCH} cannot represent this encoder:\n  ' +
        '\n  '.join(problems))
  sd = core.flax_to_torch(params, timm_vit.RULES)
  if 'pos_embed' not in sd:  # the fixed table is no param
    g = image_size // enc.patch_size
    sd['pos_embed'] = layers.posemb_sincos_2d(
        g, g, enc.width, row_first=enc.posemb_row_first)
  return vit_config(enc, image_size), encoder_to_hf(_plain_blocks(sd))


def vit_constructor(kind: str, out: str) -> str:
  """The Python line that loads a folder written here."""
  if kind == VIT_TYPE:
    return (f'ViTModel.from_pretrained({out!r}, add_pooling_layer=False)')
  return f'ViTMAEForPreTraining.from_pretrained({out!r})'

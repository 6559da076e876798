"""A mim_jax ViT encoder as a timm `VisionTransformer` state dict.

Every method pretrains `vit.Encoder`, so one mapping serves them all: it
reads the encoder's params (`params['encoder']`, loop or scan layout) and
its fields (`Method.encoder(config)`), and writes the state dict of

  timm.models.vision_transformer.VisionTransformer(
      img_size=S, patch_size=p, in_chans=3, embed_dim=D, depth=n,
      num_heads=h, mlp_ratio=mlp_dim / D, qkv_bias=..., init_values=...,
      class_token=True, no_embed_class=False, pos_embed='learn',
      global_pool='token' | 'avg', fc_norm=False | True, num_classes=0)

which loads with `strict=True` (the exact arguments: `timm_kwargs`). The
encoder's pieces map as follows:

* `cls_token`, `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,
  norm2,mlp.fc1,mlp.fc2}.*` and `norm.*`: timm's own names (our params
  follow them; kernels are transposed);
* `pos_embed` (1, 1 + N, D), the cls row first: timm's learned table, here
  the encoder's fixed sin-cos table (MAE's column-first or the BEiT
  family's row-first layout, cls row zero) or its learned param;
* BEiT-style `q_bias` / `v_bias` (qkv_bias='qv': CAE, BootMAE): timm's one
  `attn.qkv.bias` = [q_bias, 0, v_bias]. Exact: our attention adds that
  same vector to x @ W_qkv (as BEiT's F.linear does), so timm computes the
  same sums;
* layer scale `gamma_1` / `gamma_2` (CAE): `ls1.gamma` / `ls2.gamma`, with
  init_values set so that timm builds them (their values come from here).

Two pooling variants (`pool`):
* 'token' (default): global_pool='token', fc_norm=False; `norm.*` is the
  encoder's final norm, so forward_features is the encoder's output and
  the file holds every encoder param;
* 'avg': global_pool='avg', fc_norm=True, the MAE / BEiT fine-tuning
  layout; forward_features is the last block's output (no final norm) and
  `fc_norm` normalises the pooled patch tokens. As those recipes do, the
  pretraining final norm is dropped and fc_norm starts fresh (weight 1,
  bias 0).

No head (num_classes=0: timm's head is an Identity). What timm's
VisionTransformer cannot represent raises: BEiT's relative position bias,
a LayerNorm epsilon other than timm's 1e-6, an MLP width that is not
int(D * mlp_ratio), no final norm with pool='token'.
"""

from typing import Any, Mapping

import numpy as np

from mim_jax import errors
from mim_jax.convert import core
from mim_jax.models import layers
from mim_jax.models import vit

POOLS = ('token', 'avg')
# timm's VisionTransformer LayerNorm epsilon (timm.layers.LayerNorm).
TIMM_EPS = 1e-6

RULES = [
    ('cls_token', 'cls_token'),
    ('pos_embed', 'pos_embed'),
    ('patch_embed.proj.', 'patch_embed/'),
    ('blocks.{i}.', 'blocks_{i}/'),
    ('norm.', 'norm/'),
]
# Our BEiT-style names inside a block -> timm's layer-scale names.
_LAYER_SCALE = {'gamma_1': 'ls1.gamma', 'gamma_2': 'ls2.gamma'}


def timm_kwargs(fields: Mapping[str, Any], image_size: int, pool: str,
                in_chans: int = 3) -> dict[str, Any]:
  """The `VisionTransformer(**kwargs)` arguments that the export matches.

  Args:
    fields: vit.Encoder fields (a method's `Method.encoder(config)`).
    image_size: the square input size (config.input.image_size).
    pool: one of POOLS.
    in_chans: image channels.

  Returns:
    kwargs for timm.models.vision_transformer.VisionTransformer, JSON-able.

  Raises:
    errors.ConfigError: an unknown pool, or an encoder that timm's
      VisionTransformer cannot represent (every reason listed, each with its
      fix).
  """
  if pool not in POOLS:
    raise errors.ConfigError(
        f'timm pool {pool!r}: use one of {POOLS} (token: cls token after '
        'the final norm; avg: mean of the patch tokens after fc_norm).')
  enc = vit.Encoder(**fields)
  mlp_dim = enc.mlp_dim or 4 * enc.width
  mlp_ratio = mlp_dim / enc.width
  problems = []
  if enc.rel_pos_bias:
    problems.append(
        'relative position bias (rel_pos_bias=True): timm\'s '
        'VisionTransformer has no relative position bias; export an '
        'encoder without it (or convert to timm\'s Beit yourself)')
  if enc.layernorm_eps != TIMM_EPS:
    problems.append(
        f'LayerNorm epsilon {enc.layernorm_eps}: timm\'s VisionTransformer '
        f'uses {TIMM_EPS} unless built with norm_layer=functools.partial('
        f'timm.layers.LayerNorm, eps={enc.layernorm_eps}), which these '
        'kwargs do not carry; export --format=official and build that model '
        'by hand, or train with layernorm_eps=1e-6')
  if int(enc.width * mlp_ratio) != mlp_dim:
    problems.append(
        f'MLP width {mlp_dim}: timm builds int({enc.width} * mlp_ratio) '
        f'hidden units, and mlp_ratio={mlp_ratio!r} rounds that to '
        f'{int(enc.width * mlp_ratio)}; use an mlp_dim that a float ratio '
        'gives back exactly (e.g. 4 * width)')
  problems += grid_problems(enc, image_size)
  if pool == 'token' and not enc.final_norm:
    problems.append('no final norm (final_norm=False), which '
                    "global_pool='token' needs: use pool 'avg'")
  if problems:
    raise errors.ConfigError('timm\'s VisionTransformer cannot represent '
                             'this encoder:\n  ' + '\n  '.join(problems))
  # timm builds the layer-scale gammas only for a truthy init_values; the
  # value is their init, which the file overwrites.
  init_values = None
  if enc.layer_scale is not None:
    init_values = float(enc.layer_scale) or 1e-5
  return dict(
      img_size=int(image_size), patch_size=enc.patch_size,
      in_chans=int(in_chans), embed_dim=enc.width, depth=enc.depth,
      num_heads=enc.num_heads, mlp_ratio=mlp_ratio,
      qkv_bias=enc.qkv_bias is not False, init_values=init_values,
      class_token=True, no_embed_class=False, pos_embed='learn',
      global_pool=pool, fc_norm=pool == 'avg', num_classes=0)


def grid_problems(enc, image_size: int) -> list[str]:
  """Heads and patches that do not tile the encoder (a timm or transformers
  ViT needs whole heads and a whole patch grid)."""
  problems = []
  if enc.width % enc.num_heads:
    problems.append(f'width {enc.width} is not divisible by num_heads '
                    f'{enc.num_heads} (whole heads are needed)')
  if image_size % enc.patch_size:
    problems.append(f'image size {image_size} is not a multiple of the '
                    f'patch size {enc.patch_size}')
  return problems


def constructor(kwargs: Mapping[str, Any]) -> str:
  """The Python call that builds the timm model of `kwargs`."""
  args = ', '.join(f'{k}={v!r}' for k, v in kwargs.items())
  return f'VisionTransformer({args})'


def expected_shapes(kwargs: Mapping[str, Any]) -> dict[str, tuple]:
  """timm key -> shape of `VisionTransformer(**kwargs).state_dict()`, for
  the kwargs `timm_kwargs` makes (computed here: timm is not needed)."""
  d, p, c = kwargs['embed_dim'], kwargs['patch_size'], kwargs['in_chans']
  hidden = int(d * kwargs['mlp_ratio'])
  num_patches = (kwargs['img_size'] // p) ** 2
  out = {'cls_token': (1, 1, d), 'pos_embed': (1, 1 + num_patches, d),
         'patch_embed.proj.weight': (d, c, p, p),
         'patch_embed.proj.bias': (d,)}
  block = {'norm1.weight': (d,), 'norm1.bias': (d,),
           'attn.qkv.weight': (3 * d, d), 'attn.proj.weight': (d, d),
           'attn.proj.bias': (d,), 'norm2.weight': (d,), 'norm2.bias': (d,),
           'mlp.fc1.weight': (hidden, d), 'mlp.fc1.bias': (hidden,),
           'mlp.fc2.weight': (d, hidden), 'mlp.fc2.bias': (d,)}
  if kwargs['qkv_bias']:
    block['attn.qkv.bias'] = (3 * d,)
  if kwargs['init_values']:
    block.update({'ls1.gamma': (d,), 'ls2.gamma': (d,)})
  for i in range(kwargs['depth']):
    out.update({f'blocks.{i}.{k}': s for k, s in block.items()})
  norm = 'fc_norm' if kwargs['fc_norm'] else 'norm'
  out.update({f'{norm}.weight': (d,), f'{norm}.bias': (d,)})
  return out


def _timm_blocks(sd: dict) -> dict:
  """Our BEiT-style block leaves -> timm's: q/v biases -> one qkv bias
  (zero key part), gamma_1/2 -> ls1/2.gamma."""
  out = {}
  for key, value in sd.items():
    stem, _, leaf = key.rpartition('.')
    if leaf in _LAYER_SCALE:
      out[f'{stem}.{_LAYER_SCALE[leaf]}'] = value
    elif leaf == 'q_bias':
      v_bias = sd[f'{stem}.v_bias']
      out[f'{stem}.qkv.bias'] = np.concatenate(
          [value, np.zeros_like(value), v_bias])
    elif leaf != 'v_bias':
      out[key] = value
  return out


def encoder_to_timm(
    params, fields: Mapping[str, Any], image_size: int, pool: str = 'token'
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Encoder params -> (timm state dict, VisionTransformer kwargs).

  Args:
    params: the encoder's params (`params['encoder']`), loop or scan layout.
    fields: its vit.Encoder fields (`Method.encoder(config)`).
    image_size: the square input size; fixes pos_embed's length.
    pool: 'token' or 'avg' (see the module docstring).

  Returns:
    (state dict of float32 numpy arrays in timm's key names, the kwargs of
    `timm_kwargs`).

  Raises:
    errors.ConfigError: an unknown pool or an encoder timm cannot
      represent.
    core.ConversionError: the params do not fit the fields (e.g. another
      depth or width), listing the keys whose shapes differ.
  """
  kernel = np.shape(params['patch_embed']['kernel'])
  kwargs = timm_kwargs(fields, image_size, pool, in_chans=kernel[2])
  enc = vit.Encoder(**fields)
  sd = core.flax_to_torch(params, RULES)
  if 'pos_embed' not in sd:  # the fixed table is no param
    g = image_size // enc.patch_size
    sd['pos_embed'] = layers.posemb_sincos_2d(
        g, g, enc.width, row_first=enc.posemb_row_first)
  sd = _timm_blocks(sd)
  if pool == 'avg':
    sd = {k: v for k, v in sd.items() if not k.startswith('norm.')}
    sd['fc_norm.weight'] = np.ones((enc.width,), np.float32)
    sd['fc_norm.bias'] = np.zeros((enc.width,), np.float32)
  sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
  want = expected_shapes(kwargs)
  have = {k: v.shape for k, v in sd.items()}
  bad = [f'{k}: {have.get(k)} here, {want.get(k)} in timm'
         for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
  if bad:
    raise core.ConversionError(
        f'the encoder params do not fit its fields ({len(bad)} keys differ): '
        f'{bad[:12]}. Use the config the run was trained with.')
  return sd, kwargs

"""ViT encoder on the visible tokens only, plus presets and scan tools.

The encoder is shared by every MIM method (and by fine-tuning and probing):
patch embedding, 2-D sin-cos position embedding (fixed, or a learned table
that starts from it for fine-tuning), a per-sample gather of the kept
tokens, a cls token (whose position row is zero), pre-norm blocks and a
final LayerNorm (optional: global-pool classifiers use their own).
"""

import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mim_jax import errors
from mim_jax import masking
from mim_jax.models import layers

# name -> (width, depth, num_heads, mlp_dim). Published ViT sizes.
VARIANTS = {
    'mu': (32, 2, 2, 128),     # for tests
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
    'H': (1280, 32, 16, 5120),
}


def decode_variant(variant: Optional[str]) -> dict[str, Any]:
  """'B/16' -> dict(width=768, depth=12, num_heads=12, mlp_dim=3072,
  patch_size=16). None -> {}."""
  if variant is None:
    return {}
  m = re.fullmatch(r'(\w+)/(\d+)', variant)
  if not m or m.group(1) not in VARIANTS:
    raise errors.ConfigError(
        f'Unknown ViT variant {variant!r}: use "<size>/<patch>" with size in '
        f'{list(VARIANTS)}, e.g. "B/16".')
  width, depth, heads, mlp = VARIANTS[m.group(1)]
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp,
              patch_size=int(m.group(2)))


def encoder_fields(variant: Optional[str],
                   encoder: Optional[dict] = None) -> dict[str, Any]:
  """The encoder fields of a model config: the variant's sizes, updated by
  the explicit `encoder` fields."""
  fields = decode_variant(variant)
  fields.update(encoder or {})
  rate = fields.get('drop_path_rate')
  if rate is not None and np.ndim(rate):  # a per-block list: hashable
    fields['drop_path_rate'] = tuple(float(r) for r in rate)
  return fields


def drop_path_rates(rate, depth: int) -> tuple[float, ...]:
  """The per-block stochastic-depth rates of an encoder field
  `drop_path_rate`: upstream's `linspace(0, rate, depth)` for a number, or
  the sequence as given (one rate per block).

  Raises:
    errors.ConfigError: a sequence whose length is not `depth`.
  """
  if np.ndim(rate) == 0:
    return tuple(float(r) for r in np.linspace(0, float(rate), depth))
  rates = tuple(float(r) for r in rate)
  if len(rates) != depth:
    raise errors.ConfigError(
        f'drop_path_rate lists {len(rates)} rates for an encoder of {depth} '
        f'blocks: give {depth} rates (one per block), or one number for '
        'the linear rise linspace(0, rate, depth).')
  return rates


def validate_drop_path(model_config) -> None:
  """Checks `config.model.encoder.drop_path_rate` against the encoder's
  depth (see `drop_path_rates`), before anything is built."""
  fields = encoder_fields(model_config.get('variant'),
                          model_config.get('encoder'))
  if 'depth' in fields and fields.get('drop_path_rate') is not None:
    drop_path_rates(fields['drop_path_rate'], int(fields['depth']))


def patch_size_of(model_config) -> int:
  """The patch size of a `config.model` (explicit, or from its variant).

  Raises:
    ValueError: neither is set.
  """
  encoder = model_config.get('encoder') or {}
  if encoder.get('patch_size'):
    return int(encoder['patch_size'])
  if model_config.get('variant'):
    return decode_variant(model_config['variant'])['patch_size']
  raise errors.ConfigError(
      'Set config.model.variant ("B/16") or '
      'config.model.encoder.patch_size.')


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x: (N, L, D), ids: (N, K) -> (N, K, D), a per-sample gather."""
  return jnp.take_along_axis(x, ids[..., None].astype(jnp.int32), axis=1)


def split_by_mask(mask: jax.Array, grid_hw: tuple[int, int],
                  mask_ratio: float):
  """(ids_visible (N, L - M), ids_masked (N, M)), each in increasing patch
  order (as upstream's boolean indexing), for fixed-count masks (CAE,
  BootMAE): M = masking.num_masked(L, mask_ratio) in every row.

  Raises:
    ValueError: the mask does not fit the image's patch grid.
  """
  num_patches = grid_hw[0] * grid_hw[1]
  if mask.shape[1] != num_patches:
    raise ValueError(f'mask has {mask.shape[1]} patches per row but the '
                     f'images have {num_patches} ({grid_hw}).')
  num_visible = masking.num_visible(num_patches, mask_ratio)
  ids = jnp.argsort(mask, axis=1, stable=True)
  return ids[:, :num_visible], ids[:, num_visible:]


class Encoder(nn.Module):
  """ViT encoder over a subset of patch tokens.

  Attributes mirror big_vision's ViT. `dtype` is the compute dtype; params
  are always float32.

  `posemb`: 'sincos' adds the fixed table of `pos_embed`; 'learned' makes it
  a param `pos_embed` (1, 1 + L, width), cls row first as timm's, that starts
  equal to the fixed table: what timm / MAE / BEiT fine-tuning trains. Its
  shape fixes the image size. `final_norm=False` drops the final LayerNorm
  (global-pool classifiers normalise the pooled feature instead).
  `norm_taps` sends the tapped block outputs through the final norm too (its
  params are shared), as a model truncated after that block would compute.
  `rel_pos_bias` gives every block BEiT's relative position bias (a param
  `attn/relative_position_bias_table` per block, zeros at init; the index
  follows the image's patch grid): the BEiT / CAE fine-tuning ViT. It needs
  all patches (ids_keep=None).
  `attn_drop` is dropout on every block's attention probabilities (the
  robust-MAE "drop edge", here for the encoder's ablation; off in every
  recipe).
  """
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: Optional[int] = None   # default 4 * width
  patch_size: int = 16
  qkv_bias: Any = True            # True, False or 'qv' (BEiT/CAE)
  layer_scale: Optional[float] = None
  posemb_row_first: bool = False  # BEiT-family sin-cos layout
  layernorm_eps: float = 1e-6
  drop_path_rate: Any = 0.0       # a number, or one rate per block
  taps: tuple[int, ...] = ()      # blocks whose outputs go to out['taps']
  posemb: str = 'sincos'          # or 'learned'
  final_norm: bool = True
  norm_taps: bool = False         # taps through the final norm as well
  rel_pos_bias: bool = False      # BEiT per-block relative position bias
  attn_drop: float = 0.0          # dropout on the attention probabilities
  scan: bool = False
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  def grid(self, images) -> tuple[int, int]:
    _, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'image size {h}x{w} is not divisible by the patch '
                       f'size {p}; pick image_size a multiple of {p}.')
    return h // p, w // p

  def pos_embed(self, images) -> np.ndarray:
    """(1, 1 + L, width) fixed table, cls row first (zeros)."""
    return layers.posemb_sincos_2d(*self.grid(images), self.width,
                                   row_first=self.posemb_row_first)

  @nn.compact
  def __call__(self, images, ids_keep=None, *, insert=None,
               train: bool = False):
    """Encodes the patches `ids_keep` (all patches when None).

    Args:
      images: (N, H, W, C) normalised images.
      ids_keep: optional (N, K) int patch indices to keep, in the order the
        tokens should appear (MAE: ascending noise order).
      insert: optional (block, ids_insert, token): before block `block`
        (0-based; 0 = before the first block), the tokens `token` (1, 1,
        width) + the position embedding of the patches `ids_insert` (N, M)
        are appended after the sequence, in that order; the later blocks
        see 1 + K + M tokens (robust MAE's encoder mask tokens).
      train: enables dropout and drop path.

    Returns:
      (latent, out): latent (N, 1 + K, width) after the final norm, cls
      first; out holds 'tokens' (the embedded, position-added patches of all
      L positions, before the gather) and, with `taps`, 'taps': the outputs
      of those blocks (before the final norm unless `norm_taps`), in the
      order of `taps`. Without `final_norm` the latent is the last block's
      output. With `insert`, the latent is (N, 1 + K + M, width).

    Raises:
      ValueError: an unknown `posemb`, taps outside the blocks,
        `norm_taps` without `final_norm`, or `rel_pos_bias` with
        `ids_keep`.
    """
    self._check(ids_keep)
    x, tokens, pos = self._embed(images, ids_keep)
    tapped_blocks = tuple(sorted(set(self.taps)))  # block_stack's order
    x = self._blocks(x, self.grid(images), tapped_blocks, insert, pos, train)
    out = {'tokens': tokens}
    if self.taps:
      x, tapped = x
      by_index = dict(zip(tapped_blocks, tapped))
      out['taps'] = [by_index[i] for i in self.taps]
    if self.final_norm:
      norm = layers.layer_norm(self.layernorm_eps, self.dtype, 'norm')
      x = norm(x)
      if self.norm_taps and self.taps:
        out['taps'] = [norm(t) for t in out['taps']]
    return x, out

  def _check(self, ids_keep) -> None:
    """The field combinations `__call__` refuses (see its Raises)."""
    if self.posemb not in ('sincos', 'learned'):
      raise ValueError(f"encoder posemb={self.posemb!r}: use 'sincos' "
                       "(fixed table) or 'learned'.")
    if self.norm_taps and not self.final_norm:
      raise ValueError('encoder norm_taps=True needs final_norm=True: the '
                       'taps go through the final norm.')
    if self.rel_pos_bias and ids_keep is not None:
      # The bias indexes the full grid; a per-sample subset would need a
      # per-sample gather of the index, which no recipe uses.
      raise ValueError('encoder rel_pos_bias=True needs every patch '
                       '(ids_keep=None); it is a fine-tuning option.')
    bad = [i for i in self.taps if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f'encoder taps {sorted(set(bad))} are outside the '
                       f'{self.depth} blocks: use indices 0..'
                       f'{self.depth - 1}.')

  def _embed(self, images, ids_keep):
    """(cls + kept tokens (N, 1 + K, width), all L position-added patch
    tokens, the (1, 1 + L, width) position table): the patch embedding,
    cls token and position embedding (params created in this order)."""
    gh, gw = self.grid(images)
    p = self.patch_size
    # xavier_uniform on the (D, C*p*p) view of the torch conv weight.
    conv_init = nn.initializers.variance_scaling(
        1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=-1)
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID',
                kernel_init=layers.logical(conv_init,
                                           (None, None, None, 'embed')),
                bias_init=layers.logical(
                    layers.torch_default_bias(images.shape[-1] * p * p),
                    ('embed',)),
                dtype=self.dtype,
                name='patch_embed')(images.astype(self.dtype))
    n = x.shape[0]
    x = x.reshape(n, gh * gw, self.width)
    # Created before pos_embed: params of one module draw their init keys in
    # creation order, so this keeps cls_token's init whatever `posemb`.
    cls = self.param('cls_token', layers.token_param, (1, 1, self.width))
    table = self.pos_embed(images)
    if self.posemb == 'learned':
      # Starts from the fixed table, as the official fine-tuning code loads
      # the pretraining (sin-cos) pos_embed into its learned one.
      init = lambda key, shape, dtype=jnp.float32: jnp.asarray(table, dtype)
      table = self.param('pos_embed',
                         layers.logical(init, (None, None, 'embed')),
                         table.shape)
    pos = jnp.asarray(table, self.dtype)
    tokens = x + pos[:, 1:]
    x = tokens if ids_keep is None else gather_tokens(tokens, ids_keep)
    cls = (cls + pos[:, :1]).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)), x], 1)
    return x, tokens, pos

  def _blocks(self, x, grid, tapped_blocks, insert, pos, train: bool):
    """The transformer blocks (drop path rising linearly to
    drop_path_rate, or its per-block rates), with the taps and the
    insertion split."""
    dpr = drop_path_rates(self.drop_path_rate, self.depth)
    block_kwargs = dict(num_heads=self.num_heads,
                        mlp_dim=self.mlp_dim or 4 * self.width,
                        qkv_bias=self.qkv_bias,
                        layer_scale=self.layer_scale, attn_drop=self.attn_drop,
                        layernorm_eps=self.layernorm_eps, dtype=self.dtype)
    if self.rel_pos_bias:
      # The blocks see only tokens: the grid comes from the image size.
      block_kwargs.update(rel_pos_bias=True, rel_pos_grid=tuple(grid))
    return layers.block_stack(
        x, depth=self.depth, block_kwargs=block_kwargs,
        scan=self.scan, remat_policy=self.remat_policy,
        deterministic=not train, drop_path_rates=dpr, name='blocks',
        taps=tapped_blocks, split=self._insertion(insert, pos))

  def _insertion(self, insert, pos):
    """`block_stack`'s split that appends the inserted tokens, or None."""
    if insert is None:
      return None
    block, ids_insert, token = insert
    if not 0 <= block < self.depth:
      raise ValueError(f'insertion block {block} is outside the encoder\'s '
                       f'{self.depth} blocks: use 0..{self.depth - 1}.')
    tokens = (jnp.take(pos[0, 1:], ids_insert.astype(jnp.int32), axis=0) +
              token.astype(self.dtype))
    return block, lambda x: jnp.concatenate([x, tokens.astype(x.dtype)], 1)


# ---------------------------------------------------------------------------
# Parameter layout converters: python loop  <->  nn.scan.


# The `layers.block_stack` group that `scan=True` stacks in the ViT; a
# method with more stacked groups passes their names (its converter).
STACKED = ('blocks',)


def loop_to_scan(tree: dict, names: tuple[str, ...] = STACKED) -> dict:
  """Stacks `{name}_0 .. {name}_{n-1}` subtrees into one `{name}` subtree,
  for each name, recursively in every sub-dict (encoder and decoder)."""
  if not isinstance(tree, dict):
    return tree
  pats = {name: re.compile(rf'{re.escape(name)}_(\d+)$') for name in names}
  stacked = lambda k: any(p.match(k) for p in pats.values())
  out = {k: loop_to_scan(v, names) for k, v in tree.items() if not stacked(k)}
  for name, pat in pats.items():
    idx = sorted(int(m.group(1)) for k in tree if (m := pat.match(k)))
    if not idx:
      continue
    if idx != list(range(len(idx))):
      raise ValueError(f'non-contiguous block indices {idx} under {name!r}.')
    blocks = [tree[f'{name}_{i}'] for i in idx]
    out[name] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  return out


def _layer(a, i: int):
  """Layer i of a stacked leaf; a ShapeDtypeStruct (from eval_shape) gives
  the per-layer ShapeDtypeStruct."""
  if isinstance(a, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
  return a[i]


def scan_to_loop(tree: dict, names: tuple[str, ...] = STACKED) -> dict:
  """Inverse of `loop_to_scan` (leaves may also be ShapeDtypeStructs)."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    if k in names and isinstance(v, dict):
      depth = jax.tree.leaves(v)[0].shape[0]
      for i in range(depth):
        out[f'{k}_{i}'] = jax.tree.map(lambda a, i=i: _layer(a, i), v)
    else:
      out[k] = scan_to_loop(v, names)
  return out


def _is_stacked(tree: dict, names: tuple[str, ...] = STACKED) -> bool:
  return any(isinstance(tree.get(name), dict) for name in names)


def _flat(tree: dict) -> dict:
  return {'/'.join(k): v for k, v in
          traverse_util.flatten_dict(tree).items()}


def _encoder_problems(missing, extra, mismatched, src_posemb, src_row_first,
                      tgt_posemb, tgt_row_first) -> list[str]:
  """The reasons `load_encoder` refuses a source encoder (none: [])."""
  problems = []
  if missing:
    problems.append(f'the pretrained encoder lacks {len(missing)} params: '
                    f'{missing[:12]}')
  if extra:
    problems.append(f'it holds {len(extra)} params this model does not '
                    f'have: {extra[:12]}')
  if mismatched:
    problems.append(f'shape mismatches ({len(mismatched)}): '
                    f'{mismatched[:12]}')
  if (src_posemb == 'sincos' and tgt_posemb == 'sincos' and
      src_row_first != tgt_row_first):
    problems.append('the fixed sin-cos position tables differ: '
                    f'posemb_row_first={src_row_first} pretrained, '
                    f'{tgt_row_first} here')
  return problems


def load_encoder(source: dict, source_fields: dict, target: dict,
                 target_fields: dict, fresh: Optional[re.Pattern] = None
                 ) -> dict:
  """Copies the params of one `Encoder` (e.g. a pretraining run's
  `params['encoder']`) into those of another (a fine-tuning model's), as
  they are; either may use the scan layout.

  Params of `target` that `source` lacks keep their values in `target`
  when their path matches `fresh` (e.g. layer scale or a relative position
  bias added for fine-tuning); a learned `pos_embed` that the source lacks
  (its table is fixed) starts from the source's sin-cos table, as the
  official fine-tuning code loads it. The source's final norm is dropped
  when the target has none (`final_norm=False`).

  Args:
    source: the params tree of the source encoder (host arrays).
    source_fields: its Encoder fields (unset ones take the defaults).
    target: the params tree of the target encoder (initialised arrays).
    target_fields: its Encoder fields.
    fresh: paths ('/'-joined, loop layout: `blocks_0/...`) that may start
      fresh.

  Returns:
    The target's params tree with the source's values.

  Raises:
    ValueError: naming the params that the source lacks, has beyond the
      target, or holds in another shape, and fixed position tables that
      differ.
  """
  defaults = {f.name: f.default for f in dataclasses.fields(Encoder)}
  field = lambda fields, name: fields.get(name, defaults[name])
  scanned = _is_stacked(target)
  src = _flat(scan_to_loop(source) if _is_stacked(source) else source)
  tgt = _flat(scan_to_loop(target) if scanned else target)
  if not field(target_fields, 'final_norm'):
    src = {k: v for k, v in src.items() if not k.startswith('norm/')}
  learned_from_table = ('pos_embed' in tgt and 'pos_embed' not in src and
                        field(source_fields, 'posemb') == 'sincos')
  extra = sorted(set(src) - set(tgt))
  missing = sorted(k for k in set(tgt) - set(src)
                   if not (fresh and fresh.search(k)) and
                   not (k == 'pos_embed' and learned_from_table))
  mismatched = [f'{k}: {tuple(np.shape(src[k]))} pretrained, '
                f'{tuple(np.shape(tgt[k]))} in this model'
                for k in sorted(set(src) & set(tgt))
                if tuple(np.shape(src[k])) != tuple(np.shape(tgt[k]))]
  problems = _encoder_problems(missing, extra, mismatched,
                               *(field(f, k) for f in (source_fields,
                                                       target_fields)
                                 for k in ('posemb', 'posemb_row_first')))
  if problems:
    raise errors.WeightsFileError(
        'Cannot load the pretrained encoder into this model: ' +
        '; '.join(problems) + '. Its depth, width or block type differs '
        'from config.model: match the variant / encoder fields to the '
        'pretraining run.')
  out = {k: src.get(k, tgt[k]) for k in tgt}
  if learned_from_table:
    _, length, width = np.shape(tgt['pos_embed'])
    grid = int(round((length - 1) ** 0.5))
    if grid * grid != length - 1:
      raise ValueError(f'pos_embed of {length - 1} patches: only square '
                       'patch grids start from the sin-cos table.')
    table = layers.posemb_sincos_2d(
        grid, grid, width, row_first=field(source_fields,
                                           'posemb_row_first'))
    out['pos_embed'] = np.asarray(table, np.asarray(tgt['pos_embed']).dtype)
  tree = traverse_util.unflatten_dict(
      {tuple(k.split('/')): v for k, v in out.items()})
  return loop_to_scan(tree) if scanned else tree

"""Building blocks shared by every MIM model: ViT blocks, patchify, pos-embs.

All modules are pure Flax linen. Parameter names mirror the official PyTorch
(timm) names (`norm1`, `attn/qkv`, `mlp/fc1`, ...) so that conversion between
the two is a mechanical rename plus transposes (see `mim_jax/convert`).
"""

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name


Dtype = Any

# torch.nn.init.xavier_uniform_ on Linear weights; biases start at zero.
xavier_uniform = nn.initializers.xavier_uniform()


def torch_default_bias(fan_in: int):
  """PyTorch's default Linear / Conv bias init, U(-1/sqrt(fan_in),
  1/sqrt(fan_in)). The official MAE's `initialize_weights` re-initialises
  the patch-embedding conv's weight (xavier) but keeps this default bias
  (facebookresearch/mae models_mae.py), so the encoder starts with it."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# timm / MAE use trunc_normal(.02) or normal(.02) for cls / mask tokens.
token_init = nn.initializers.normal(stddev=0.02)
# A (1, 1, width) learned token (cls, mask), sharded along its width.
token_param = nn.with_logical_partitioning(token_init, (None, None, 'embed'))

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The block's input, the qkv and fc1 outputs, the attention output and
    # the residual between attention and MLP are kept; LayerNorms, softmax
    # probabilities and GELU are recomputed in the backward pass (one extra
    # q k^T dot per block, no other matmul), so the scan stacks about half
    # the activations (docs/speed.md).
    'linears': jax.checkpoint_policies.save_only_these_names(
        'qkv', 'attn_out', 'resid_mid', 'mlp_hidden'),
}


def get_remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(
        f'Unknown remat_policy {name!r}; choose one of '
        f'{sorted(REMAT_POLICIES)}.')
  return REMAT_POLICIES[name]


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(N, H, W, C) -> (N, L, p*p*C), patches in raster order (numpy or jax).

  Within a patch vector the order is (row-in-patch, col-in-patch, channel)
  with the channel fastest, exactly as the official MAE `patchify`.
  """
  n, h, w, c = images.shape
  p = patch_size
  x = images.reshape(n, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid_hw: tuple[int, int],
               channels: int = 3) -> jax.Array:
  """Inverse of `patchify`: (N, L, p*p*C) -> (N, H, W, C)."""
  n = patches.shape[0]
  gh, gw = grid_hw
  p = patch_size
  x = patches.reshape(n, gh, gw, p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, gh * p, gw * p, channels)


def posemb_sincos_2d(grid_h: int, grid_w: int, dim: int,
                     cls_token: bool = True,
                     row_first: bool = False) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding of the official MAE code.

  Row 1 + l (patch l = i * grid_w + j) is
  [sin(j w), cos(j w), sin(i w), cos(i w)] with w_k = 1 / 10000**(k / q),
  q = dim / 4: the first half encodes the column, the second the row. A zero
  row for the cls token is prepended when `cls_token`. Computed in float64 and
  cast to float32, like upstream. `row_first` swaps the halves (row, then
  column), the layout of the BEiT-family code (CAE, BootMAE).

  Returns:
    float32 array of shape (1, [1 +] grid_h * grid_w, dim).
  """
  if dim % 4:
    raise ValueError(f'sin-cos position embedding needs dim % 4 == 0, '
                     f'got dim={dim}.')
  q = dim // 4
  omega = 1.0 / 10000 ** (np.arange(q, dtype=np.float64) / q)
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                           np.arange(grid_w, dtype=np.float64), indexing='ij')
  out_c = cols.reshape(-1)[:, None] * omega[None]
  out_r = rows.reshape(-1)[:, None] * omega[None]
  first, second = (out_r, out_c) if row_first else (out_c, out_r)
  emb = np.concatenate(
      [np.sin(first), np.cos(first), np.sin(second), np.cos(second)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
  return emb[None].astype(np.float32)


def logical(init, names: tuple):
  """An initializer whose param carries logical axis names (sharding.py)."""
  return nn.with_logical_partitioning(init, names)


def dense(features: int, names: tuple, dtype: Dtype, name: str,
          use_bias: bool = True) -> nn.Dense:
  """nn.Dense with xavier-uniform kernel and zero bias, both annotated:
  `names` are the (input, output) logical axes of the kernel."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  kernel_init=logical(xavier_uniform, names),
                  bias_init=logical(nn.initializers.zeros_init(), names[1:]),
                  name=name)


def layer_norm(eps: float, dtype: Dtype, name: Optional[str] = None):
  # use_fast_variance=False computes E[(x - mean)^2] like torch, which keeps
  # float32 parity with the official code at the 1e-7 level.
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, use_fast_variance=False,
      scale_init=logical(nn.initializers.ones_init(), ('embed',)),
      bias_init=logical(nn.initializers.zeros_init(), ('embed',)), name=name)


def constrain_tokens(x: jax.Array) -> jax.Array:
  """Pins (batch, tokens, width) activations to their logical sharding."""
  return nn.with_logical_constraint(x, ('act_batch', 'act_len', 'act_emb'))


class DropPath(nn.Module):
  """Stochastic depth per sample (timm `drop_path`).

  `rate` may be overridden per call by a traced scalar (a scanned stack's
  per-layer rate); a rate of 0 keeps every sample, x / 1 = x exactly.
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool, rate=None):
    rate = self.rate if rate is None else rate
    static = isinstance(rate, (int, float))
    if deterministic or (static and rate == 0.0):
      return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    rng = self.make_rng('dropout')
    mask = jax.random.bernoulli(rng, keep, shape)
    scale = keep if static else jnp.asarray(keep, x.dtype)
    return jnp.where(mask, x / scale, jnp.zeros_like(x))


def qv_biases(module: nn.Module, width: int):
  """BEiT-style `q_bias` and `v_bias` params of `module` (no key bias)."""
  zeros = nn.initializers.zeros_init()
  return (module.param('q_bias', logical(zeros, ('heads',)), (width,)),
          module.param('v_bias', logical(zeros, ('heads',)), (width,)))


def layer_scale(module: nn.Module, name: str, y: jax.Array,
                init_value: Optional[float]) -> jax.Array:
  """y times a learned per-channel gamma of `module` (BEiT layer scale);
  the identity when `init_value` is None."""
  if init_value is None:
    return y
  gamma = module.param(name, logical(nn.initializers.constant(init_value),
                                     ('embed',)), (y.shape[-1],))
  return y * gamma.astype(y.dtype)


def attend(q, k, v, num_heads: int, dtype: Dtype,
           probs_fn: Optional[Callable] = None,
           bias: Optional[jax.Array] = None) -> jax.Array:
  """Multi-head attention core: (N, Tq, D) queries over (N, Tk, D) keys and
  values, softmax(q k^T / sqrt(head_dim) [+ bias]) v -> (N, Tq, D).

  The softmax runs in float32 even under bf16 compute, so long runs stay
  finite; `probs_fn` (e.g. attention dropout) acts on the probabilities.
  `bias` (heads, Tq, Tk), e.g. a relative position bias, is added to the
  logits in float32.
  """
  n, tq, d = q.shape
  hd = d // num_heads

  def heads(x):  # (N, T, D) -> (N, H, T, hd): one batch dim for the dots
    return x.reshape(n, -1, num_heads, hd).transpose(0, 2, 1, 3)

  # Head-major operands make both dots plain batched matmuls over (N, H),
  # with contiguous rows: on XLA:CPU the token-major einsums ran the
  # probabilities @ values dot at a tenth of the matmul rate
  # (docs/speed.md).
  q, k, v = heads(q * (hd ** -0.5)), heads(k), heads(v)
  logits = jnp.einsum('nhqd,nhkd->nhqk', q, k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)[None]
  probs = jax.nn.softmax(logits, axis=-1)
  if probs_fn is not None:
    probs = probs_fn(probs)
  out = jnp.einsum('nhqk,nhkd->nhqd', probs.astype(dtype), v)
  return out.transpose(0, 2, 1, 3).reshape(n, tq, d)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout).

  The qkv kernel is (D, 3D); its columns are ordered (q|k|v, head, head_dim),
  the transpose of timm's `qkv.weight`. `attn_drop` is dropout on the
  attention probabilities (the robust-MAE "drop edge" on the decoder).
  `qkv_bias`: True (one fused bias), False, or 'qv': separate `q_bias` and
  `v_bias` params and no key bias (BEiT / CAE / BootMAE).
  `floor_head_dim`: head_dim = width // num_heads even when that does not
  divide (BEiT's `all_head_dim`: BootMAE's 512-wide decoder with 12 heads
  attends in 12 x 42 = 504 dims); otherwise the width must divide.
  `rel_pos_bias`: BEiT's per-block relative position bias, a learned
  `relative_position_bias_table` indexed by `relative_position_index` and
  added to the logits; the tokens must be a cls token then the full
  `rel_pos_grid` (rows, cols) of patches in raster order (None: a square
  grid, inferred from the token count).
  """
  num_heads: int
  qkv_bias: Any = True
  attn_drop: float = 0.0
  floor_head_dim: bool = False
  dtype: Dtype = jnp.float32
  rel_pos_bias: bool = False
  rel_pos_grid: Optional[tuple[int, int]] = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    n, t, d = x.shape
    inner = inner_dim(d, self.num_heads, self.floor_head_dim)
    qkv = dense(3 * inner, ('embed', 'heads'), self.dtype, 'qkv',
                use_bias=self.qkv_bias is True)(x)
    if self.qkv_bias == 'qv':
      q_bias, v_bias = qv_biases(self, inner)
      qkv = qkv + jnp.concatenate(
          [q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    qkv = checkpoint_name(qkv, 'qkv').reshape(n, t, 3, inner)
    bias = None
    if self.rel_pos_bias:
      bias = relative_position_bias(self, t, self.num_heads,
                                    self.rel_pos_grid)
    drop = nn.Dropout(self.attn_drop)
    out = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.num_heads,
                 self.dtype,
                 lambda p: drop(p, deterministic=deterministic), bias)
    out = checkpoint_name(out, 'attn_out')
    return dense(d, ('heads', 'embed'), self.dtype, 'proj')(out)


def token_grid(num_tokens: int,
               grid: Optional[tuple[int, int]] = None) -> tuple[int, int]:
  """The patch grid of `num_tokens` tokens (a cls token plus the grid):
  `grid` checked, or a square grid when None.

  Raises:
    ValueError: the tokens are not a cls token plus that (or a square) grid.
  """
  if grid is None:
    side = math.isqrt(max(num_tokens - 1, 0))
    if side < 1 or side * side + 1 != num_tokens:
      raise ValueError(
          f'relative position bias: {num_tokens} tokens are not a cls token '
          'plus a square grid of patches; pass the (rows, cols) grid.')
    return side, side
  gh, gw = grid
  if gh * gw + 1 != num_tokens:
    raise ValueError(
        f'relative position bias: {num_tokens} tokens are not a cls token '
        f'plus the {gh}x{gw} patch grid ({gh * gw + 1} tokens); it needs '
        'every patch (no masking) and one cls token.')
  return gh, gw


def num_relative_distance(grid_h: int, grid_w: int) -> int:
  """Rows of BEiT's bias table: every 2-D offset within the grid, plus 3
  for cls -> patch, patch -> cls and cls -> cls."""
  return (2 * grid_h - 1) * (2 * grid_w - 1) + 3


def relative_position_index(grid_h: int, grid_w: int) -> np.ndarray:
  """BEiT's `relative_position_index` (1 + L, 1 + L) int64, L = grid_h *
  grid_w, cls first: the bias-table row of each (query, key) token pair.

  Patch pairs use their offset (dh + grid_h - 1) * (2 grid_w - 1) +
  (dw + grid_w - 1), dh and dw the query's row and column minus the key's;
  the last three rows are for cls -> patch, patch -> cls and cls -> cls.
  """
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w),
                           indexing='ij')
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  dh = rows[:, None] - rows[None, :] + grid_h - 1
  dw = cols[:, None] - cols[None, :] + grid_w - 1
  n = num_relative_distance(grid_h, grid_w)
  area = grid_h * grid_w
  index = np.zeros((area + 1, area + 1), np.int64)
  index[1:, 1:] = dh * (2 * grid_w - 1) + dw
  index[0, :] = n - 3
  index[:, 0] = n - 2
  index[0, 0] = n - 1
  return index


def relative_position_bias(module: nn.Module, num_tokens: int,
                           num_heads: int,
                           grid: Optional[tuple[int, int]] = None):
  """(heads, T, T) bias from the `relative_position_bias_table` param of
  `module` ((2 gh - 1)(2 gw - 1) + 3, heads), zeros at init as BEiT's.

  The index is a numpy constant of the grid, not a variable: the image size
  fixes it, so it is no param (converters check and write the official
  buffer instead).
  """
  gh, gw = token_grid(num_tokens, grid)
  # Small; replicated unless the rules shard heads and the table is big.
  table = module.param(
      'relative_position_bias_table',
      logical(nn.initializers.zeros_init(), (None, 'heads')),
      (num_relative_distance(gh, gw), num_heads))
  index = relative_position_index(gh, gw)
  bias = jnp.take(table, index.reshape(-1), axis=0)
  return bias.reshape(num_tokens, num_tokens, num_heads).transpose(2, 0, 1)


def inner_dim(width: int, num_heads: int, floor_head_dim: bool) -> int:
  """The attention's inner width: num_heads x head_dim."""
  if width % num_heads and not floor_head_dim:
    raise ValueError(f'width {width} is not divisible by num_heads '
                     f'{num_heads}.')
  if width < num_heads:
    raise ValueError(f'width {width} is smaller than num_heads {num_heads}.')
  return width // num_heads * num_heads


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2."""
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = dense(self.mlp_dim, ('embed', 'mlp'), self.dtype, 'fc1')(x)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_len', 'act_mlp'))
    x = checkpoint_name(x, 'mlp_hidden')
    x = nn.gelu(x, approximate=False)
    return dense(d, ('mlp', 'embed'), self.dtype, 'fc2')(x)


class Block(nn.Module):
  """Pre-norm ViT block: x + Attn(LN(x)); x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  qkv_bias: Any = True
  attn_drop: float = 0.0
  drop_path: float = 0.0
  layernorm_eps: float = 1e-6
  layer_scale: Optional[float] = None   # gamma_1/gamma_2 init (BEiT, CAE)
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  rel_pos_bias: bool = False            # BEiT per-block (see Attention)
  rel_pos_grid: Optional[tuple[int, int]] = None

  @nn.compact
  def __call__(self, x, rate=None):
    """(x, None): the block's output; `rate` overrides `drop_path` (a
    scanned stack's per-layer rate, see `block_stack`)."""
    x = constrain_tokens(x)
    y = layer_norm(self.layernorm_eps, self.dtype, 'norm1')(x)
    # By keyword: positionally, dtype would land on `floor_head_dim`.
    y = Attention(self.num_heads, self.qkv_bias, self.attn_drop,
                  dtype=self.dtype, rel_pos_bias=self.rel_pos_bias,
                  rel_pos_grid=self.rel_pos_grid,
                  name='attn')(y, self.deterministic)
    x = x + DropPath(self.drop_path)(
        layer_scale(self, 'gamma_1', y, self.layer_scale), self.deterministic,
        rate)
    x = checkpoint_name(x, 'resid_mid')
    y = layer_norm(self.layernorm_eps, self.dtype, 'norm2')(x)
    y = Mlp(self.mlp_dim, self.dtype, name='mlp')(y)
    x = x + DropPath(self.drop_path)(
        layer_scale(self, 'gamma_2', y, self.layer_scale), self.deterministic,
        rate)
    x = constrain_tokens(x)
    # The second output is the per-block activation, collected by scan.
    return x, None


def block_stack(x, *, depth: int, block_kwargs: dict, scan: bool = False,
                remat_policy: str = 'none', deterministic: bool = True,
                drop_path_rates: Optional[Sequence[float]] = None,
                name: str = 'blocks', taps: tuple[int, ...] = (),
                split: Optional[tuple[int, Callable]] = None,
                block: Callable = Block, broadcast: tuple = ()):
  """Applies `depth` blocks, as a python loop or as one `nn.scan`.

  Call it inside the `nn.compact` method of the owning module, so the blocks
  are that module's children: `{name}_{i}` for the loop, or a single `{name}`
  whose params carry a leading layer axis for `scan=True`. Scan compiles one
  block instead of `depth`, so compile time does not grow with depth.
  `remat_policy` wraps each block in `nn.remat` with a jax checkpoint policy.
  `mim_jax.models.vit` converts params between the two layouts.

  `block` is the block module (default `Block`; it takes the fields
  `block_kwargs`, `drop_path` and `deterministic`, and is called as
  `block(x, rate, *broadcast)` -> (x, None)); `broadcast` are arrays that
  every block sees unchanged (e.g. a cross-attention's features).
  `drop_path_rates` gives one stochastic-depth rate per block (default 0).
  With `scan=True` and rates that differ, they are the scan's per-layer
  input (`scan_rates`), so every layer drops with its own rate.

  With `taps` (block indices) it returns (x, [outputs of those blocks, in
  increasing block order]) instead of x.

  `split=(k, fn)` runs blocks 0..k-1, then `x = fn(x)` (which may change
  the sequence length, e.g. append tokens), then blocks k..depth-1.

  With `scan=True`, taps and a split cut the stack into segments (a tap at
  block i ends a segment at i + 1; the split starts one at k); the params
  stay one stacked `{name}` tree (same layout, converters and layer decay)
  and each segment runs as a scan over its layer slice, compiling one block
  each. Each segment draws its dropout / drop-path keys from its own split
  of the stack's 'dropout' key, so under dropout a segmented stack draws
  other masks than an unsegmented one (equal in distribution).

  Raises:
    ValueError: taps or a split outside the blocks, or as many rates as
      blocks not given.
  """
  rates = _check_stack(depth, taps, split, drop_path_rates)
  policy = get_remat_policy(remat_policy)
  block_cls = block
  if remat_policy != 'none':
    block_cls = nn.remat(block, policy=policy, prevent_cse=not scan)
  taps = tuple(sorted(set(taps)))
  if not scan:
    return _loop_stack(x, block_cls, block_kwargs, rates, deterministic,
                       name, taps, split, broadcast)
  static_rate, xs = scan_rates(rates)

  def scanned(length: int, **kw):
    return nn.scan(
        block_cls,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(0,) + (nn.broadcast,) * len(broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: 'layers'},
    )(**block_kwargs, drop_path=static_rate, deterministic=deterministic,
      **kw)

  stack = scanned(depth, name=name)
  cuts = sorted({0, depth} | {t + 1 for t in taps} |
                ({split[0]} if split is not None else set()))
  if split is None and len(cuts) == 2:
    x, _ = stack(x, xs, *broadcast)
    return (x, [x]) if taps else x   # taps == (depth - 1,) here
  return _segmented_scan(stack, scanned, x, xs, broadcast, cuts, taps, split,
                         deterministic)


def _check_stack(depth: int, taps, split, drop_path_rates) -> tuple:
  """The per-block rates of `block_stack` (zeros when None), checked."""
  bad = [t for t in taps if not 0 <= t < depth]
  if bad:
    raise ValueError(f'taps {bad} are outside the {depth} blocks: use '
                     f'0..{depth - 1}.')
  if split is not None and not 0 <= split[0] < depth:
    raise ValueError(f'split at block {split[0]} is outside the {depth} '
                     f'blocks: use 0..{depth - 1}.')
  if drop_path_rates is None:
    return (0.0,) * depth
  rates = tuple(float(r) for r in drop_path_rates)
  if len(rates) != depth:
    raise ValueError(f'{len(rates)} drop-path rates for {depth} blocks: '
                     'give one rate per block.')
  return rates


def scan_rates(rates: Sequence[float]):
  """(static_rate, xs) of a scanned stack: one python rate for all layers
  when they agree (xs None: nothing is drawn at rate 0), else rate 0 and
  the (depth,) float32 array of per-layer rates that the scan feeds to
  layer i as its input."""
  rates = tuple(float(r) for r in rates)
  if len(set(rates)) <= 1:
    return (rates[0] if rates else 0.0), None
  return 0.0, jnp.asarray(rates, jnp.float32)


def _loop_stack(x, block_cls, block_kwargs: dict, rates: tuple,
                deterministic: bool, name: str, taps: tuple, split,
                broadcast: tuple):
  """The python-loop `block_stack`: blocks `{name}_{i}`."""
  tapped = []
  for i, rate in enumerate(rates):
    if split is not None and i == split[0]:
      x = split[1](x)
    x, _ = block_cls(**block_kwargs, drop_path=rate,
                     deterministic=deterministic, name=f'{name}_{i}')(
                         x, None, *broadcast)
    if i in taps:
      tapped.append(x)
  return (x, tapped) if taps else x


def _segmented_scan(stack: nn.Module, scanned: Callable, x, xs,
                    broadcast: tuple, cuts: list, taps: tuple, split,
                    deterministic: bool):
  """Runs the bound stacked module `stack` as one scan per layer slice
  [cuts[j], cuts[j + 1]), with `split[1]` before the slice that starts at
  `split[0]` and the taps collected after the slices they end (see
  `block_stack`)."""
  if stack.is_initializing():
    stack(x, xs, *broadcast)   # creates the stacked params, whole
  params = nn.meta.unbox(stack.variables.get('params', {}))
  segments = list(zip(cuts, cuts[1:]))
  keys = [None] * len(segments)
  if not deterministic:
    keys = list(jax.random.split(stack.make_rng('dropout'), len(segments)))
  tapped = []
  for (lo, hi), key in zip(segments, keys):
    if split is not None and lo == split[0]:
      x = split[1](x)
    part = jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], params)
    rngs = {} if key is None else {'dropout': key}
    x, _ = scanned(hi - lo).apply(
        {'params': part}, x, None if xs is None else xs[lo:hi], *broadcast,
        rngs=rngs)
    if hi - 1 in taps:
      tapped.append(x)
  return (x, tapped) if taps else x

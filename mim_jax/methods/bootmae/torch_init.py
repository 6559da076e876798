"""The official BootMAE initialisation, drawn with PyTorch (a test and
benchmark aid; needs the `torch` test extra).

`official_init(config, seed)` returns the state dict (official key names)
that LightDXY/BootMAE's `VisionTransformerForMaskedImageModeling` holds
right after `torch.manual_seed(seed)` and construction, plus the `model_ema.*`
copies the fixtures store for the momentum encoder (timm's ModelEma
deep-copies the model: no draws). The order of the draws:

1. Construction, in registration order; only the layers with parameters
   that PyTorch initialises draw (Linear, Conv2d, ConvTranspose2d: kaiming
   weight, then bias when there is one): patch_embed.proj (Conv2d); each
   encoder Block (attn.qkv without bias, attn.proj, mlp.fc1, mlp.fc2); each
   pixel Decode_Block (as the Block, then c_attn.q and c_attn.kv without
   bias, c_attn.proj); down; lm_head.proj (ConvTranspose2d(Dd, C, p, p));
   each feature Decode_Block (always decoder_depth of them); down_1;
   lm_head_1. The sin-cos tables (float32, rows first), the q/v biases and
   the tokens are built without draws.
2. trunc_normal(0.02) on mask_token, then mask_token_1, truncated at
   +-0.02 (upstream's trunc_normal_ passes a=-std, b=std; timm's
   inverse-CDF sampler, `mim_jax.models.torch_draws.trunc_normal_`).
3. `self.apply(_init_weights)`: post-order, so the leaves in registration
   order: every Linear trunc_normal(0.02, +-0.02) with zero bias, LayerNorm
   1/0, the patch-embedding Conv2d trunc_normal with zero bias. The
   ConvTranspose2d head is no Conv2d: it keeps PyTorch's default.
4. `named_modules()` (pre-order; the same leaf order): every Linear redrawn
   uniform, +-sqrt(6 / (out / 3 + in)) when 'qkv' is in its name (q, k, v
   as separate weights), xavier-uniform otherwise (the fused c_attn.kv as
   one weight), zero bias where there is one.
5. cls_token normal(1e-6); the patch embedding uniform +-sqrt(6 / (3 p p +
   D)) (3 hard-coded upstream) with zero bias.

Upstream hard-codes the feature predictor's depth to decoder_depth; a
config with `feature_depth` < decoder_depth is the fixture generator's
model: the full ModuleList built and initialised, then truncated to its
first blocks after construction (the dropped blocks' draws still happen).
tests/official_init_test.py checks this against the fixture's state dict bit
for bit, then compares our JAX init's per-parameter statistics with it.
"""

import math

import numpy as np

from mim_jax.models import torch_draws as common
from mim_jax.models import vit

# The encoder keys the fixtures store under `model_ema.`.
EMA_PREFIXES = ('patch_embed.', 'cls_token', 'pos_embed', 'blocks.')


def _model(torch, *, chans, p, grid, d, depth, mlp_ratio, dd, decoder_depth,
           eps):
  """Minimal modules with upstream's attribute names and registration
  order (no forward passes)."""
  nn = torch.nn
  norm = lambda n: nn.LayerNorm(n, eps=eps)

  Attention, Mlp = common.beit_layers(torch)

  class CrossAttention(nn.Module):

    def __init__(self, dim, c_dim):
      super().__init__()
      self.q = nn.Linear(dim, dim, bias=False)
      self.kv = nn.Linear(c_dim, 2 * dim, bias=False)
      self.q_bias = nn.Parameter(torch.zeros(dim))
      self.v_bias = nn.Parameter(torch.zeros(dim))
      self.proj = nn.Linear(dim, dim)

  class Block(nn.Module):

    def __init__(self, dim):
      super().__init__()
      self.norm1 = norm(dim)
      self.attn = Attention(dim)
      self.norm2 = norm(dim)
      self.mlp = Mlp(dim, int(dim * mlp_ratio))

  class DecodeBlock(Block):

    def __init__(self, dim, c_dim):
      super().__init__(dim)
      self.norm3 = norm(dim)
      self.norm4 = norm(c_dim)
      self.c_attn = CrossAttention(dim, c_dim)

  class Proj(nn.Module):  # PatchEmbed / PatchDeEmbed: one `proj`

    def __init__(self, proj):
      super().__init__()
      self.proj = proj

  class BootMAE(nn.Module):

    def __init__(self):
      super().__init__()
      self.patch_embed = Proj(nn.Conv2d(chans, d, p, p))
      self.pos_embed = nn.Parameter(
          common.sincos_2d(torch, grid, grid, d), requires_grad=False)
      self.de_pos_embed = nn.Parameter(
          common.sincos_2d(torch, grid, grid, dd), requires_grad=False)
      self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
      self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
      self.norm = norm(d)
      self.decode_blocks = nn.ModuleList(
          [DecodeBlock(dd, d) for _ in range(decoder_depth)])
      self.decode_norm = norm(dd)
      self.down = nn.Linear(d, dd)
      self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
      self.lm_head = Proj(nn.ConvTranspose2d(dd, chans, p, p))
      self.decode_blocks_1 = nn.ModuleList(
          [DecodeBlock(d, d) for _ in range(decoder_depth)])
      self.down_1 = nn.Linear(d, d)
      self.mask_token_1 = nn.Parameter(torch.zeros(1, 1, d))
      self.decode_norm_1 = norm(d)
      self.lm_head_1 = nn.Linear(d, d)

  return BootMAE()


def official_init(config, seed: int) -> dict[str, np.ndarray]:
  """The official BootMAE init of the model in `config` (a BootMAE config),
  as a float32 numpy state dict with official key names (`model_ema.*`
  included)."""
  import torch  # pylint: disable=g-import-not-at-top
  nn = torch.nn
  enc = vit.encoder_fields(config.model.get('variant'),
                           config.model.get('encoder'))
  d, depth, p = enc['width'], enc['depth'], enc['patch_size']
  mlp_ratio = (enc.get('mlp_dim') or 4 * d) / d
  dd = config.model.get('decoder_width', 512)
  decoder_depth = config.model.get('decoder_depth', 2)
  feature_depth = config.model.get('feature_depth') or decoder_depth
  if feature_depth > decoder_depth:
    raise ValueError(
        f'feature_depth={feature_depth} > decoder_depth={decoder_depth}: '
        'upstream builds the feature predictor at decoder_depth.')
  chans = config.model.get('in_chans', 3)
  grid = config.input.image_size // p
  std = 0.02

  def trunc_normal(t):
    common.trunc_normal_(torch, t, std)

  torch.manual_seed(seed)
  model = _model(torch, chans=chans, p=p, grid=grid, d=d, depth=depth,
                 mlp_ratio=mlp_ratio, dd=dd, decoder_depth=decoder_depth,
                 eps=enc.get('layernorm_eps', 1e-6))
  with torch.no_grad():
    trunc_normal(model.mask_token)
    trunc_normal(model.mask_token_1)

    model.apply(common.beit_init_weights(torch))
    for name, m in model.named_modules():
      if not isinstance(m, nn.Linear):
        continue
      if 'qkv' in name:
        out, fan_in = m.weight.shape
        val = math.sqrt(6. / float(out // 3 + fan_in))
        nn.init.uniform_(m.weight, -val, val)
      else:
        nn.init.xavier_uniform_(m.weight)
      if m.bias is not None:
        nn.init.zeros_(m.bias)
    nn.init.normal_(model.cls_token, std=1e-6)
    val = math.sqrt(6. / float(3 * p * p + d))
    nn.init.uniform_(model.patch_embed.proj.weight, -val, val)
    nn.init.zeros_(model.patch_embed.proj.bias)
  model.decode_blocks_1 = model.decode_blocks_1[:feature_depth]

  sd = {k: v.detach().numpy().astype(np.float32)
        for k, v in model.state_dict().items()}
  sd.update({f'model_ema.{k}': v.copy() for k, v in sd.items()
             if k.startswith(EMA_PREFIXES)})
  return sd

"""PyTorch draws shared by the methods' `torch_init.official_init` (test and
benchmark aids that redraw an official init bit for bit; need the `torch`
test extra). Each function takes the `torch` module, imported by the
caller, so importing this file needs no torch.
"""

import math


def trunc_normal_(torch, tensor, std: float):
  """timm's `trunc_normal_(tensor, std=std, a=-std, b=std)` as the BEiT-family
  codes call it (bounds at +-1 std), mean 0: one uniform draw per element,
  U(2 l - 1, 2 u - 1) with l, u the normal CDF at the bounds, mapped through
  erfinv (the inverse-CDF method), scaled by std * sqrt(2), clamped to the
  bounds. PyTorch's own nn.init.trunc_normal_ samples differently since
  2.13 (rejection sampling), so it would not reproduce timm's draws."""
  a, b = -std, std
  cdf = lambda x: (1. + math.erf(x / math.sqrt(2.))) / 2.
  lo, hi = cdf(a / std), cdf(b / std)
  with torch.no_grad():
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.))
    tensor.add_(0.)
    tensor.clamp_(min=a, max=b)
  return tensor


def sincos_2d(torch, h: int, w: int, dim: int, temperature: float = 1e4):
  """The BEiT-family (MoCo v3) fixed 2-D sin-cos table in float32 torch ops
  as upstream computes it: (1, 1 + h*w, dim), a zero cls row, then [sin, cos]
  of the row index, [sin, cos] of the column index (for square grids; the
  official codes meshgrid (arange(w), arange(h)) with 'ij' indexing),
  omega_k = 1 / temperature**(k / (dim/4))."""
  grid_w = torch.arange(w, dtype=torch.float32)
  grid_h = torch.arange(h, dtype=torch.float32)
  grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing='ij')
  q = dim // 4
  omega = torch.arange(q, dtype=torch.float32) / q
  omega = 1. / (temperature**omega)
  out_w = torch.einsum('m,d->md', grid_w.flatten(), omega)
  out_h = torch.einsum('m,d->md', grid_h.flatten(), omega)
  emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h),
                   torch.cos(out_h)], dim=1)[None]
  return torch.cat([torch.zeros(1, 1, dim), emb], dim=1)


def beit_layers(torch):
  """(Attention, Mlp): minimal torch modules with the BEiT family's
  attribute names and registration order, for construction only (their
  default inits draw from the RNG in that order). Attention(dim): `qkv`
  without bias, zero `q_bias` and `v_bias`, `proj`; Mlp(dim, hidden): `fc1`,
  `fc2`."""
  nn = torch.nn

  class Attention(nn.Module):

    def __init__(self, dim):
      super().__init__()
      self.qkv = nn.Linear(dim, 3 * dim, bias=False)
      self.q_bias = nn.Parameter(torch.zeros(dim))
      self.v_bias = nn.Parameter(torch.zeros(dim))
      self.proj = nn.Linear(dim, dim)

  class Mlp(nn.Module):

    def __init__(self, dim, hidden):
      super().__init__()
      self.fc1 = nn.Linear(dim, hidden)
      self.fc2 = nn.Linear(hidden, dim)

  return Attention, Mlp


def beit_init_weights(torch, std: float = 0.02):
  """The BEiT family's `_init_weights`, for `Module.apply`: Linear and
  Conv2d weights trunc_normal(std) at +-std with zero bias, LayerNorm 1/0."""
  nn = torch.nn

  def init(m):
    if isinstance(m, (nn.Linear, nn.Conv2d)):
      trunc_normal_(torch, m.weight, std)
      if m.bias is not None:
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
      nn.init.constant_(m.bias, 0)
      nn.init.constant_(m.weight, 1.0)

  return init

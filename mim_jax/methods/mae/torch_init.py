"""The official MAE initialisation, drawn with PyTorch (a test and benchmark
aid; needs the `torch` test extra).

`official_init(config, seed)` returns the state dict (official key names)
that facebookresearch/mae's `MaskedAutoencoderViT` holds right after
`torch.manual_seed(seed)` and construction: the modules are created in the
constructor's order (so PyTorch's default inits consume the generator as
there), then `initialize_weights` runs: sin-cos tables, xavier-uniform on
the (D, C*p*p) view of the patch-embedding weight (its default bias
U(+-1/sqrt(C*p*p)) stays), normal(0.02) cls and mask tokens, then
xavier-uniform weights and zero biases for every Linear and LayerNorm 1/0,
in module order. tests/curves_test.py checks it against the fixture's
state dict bit for bit, which is what makes it the official init rather than
our reading of it: the distribution of the initial loss over seeds
(benchmarks/curves_vs_pytorch.py) and the per-parameter init statistics are
then compared with ours.
"""

import numpy as np

from mim_jax.models import layers
from mim_jax.models import vit


def _linears(torch, d: int, mlp: int):
  """One timm Block's Linear layers in construction order."""
  nn = torch.nn
  return {'attn.qkv': nn.Linear(d, 3 * d), 'attn.proj': nn.Linear(d, d),
          'mlp.fc1': nn.Linear(d, mlp), 'mlp.fc2': nn.Linear(mlp, d)}


def official_init(config, seed: int) -> dict[str, np.ndarray]:
  """The official MAE init of the model in `config` (an MAE config), as a
  float32 numpy state dict with official key names."""
  import torch  # pylint: disable=g-import-not-at-top
  nn = torch.nn
  enc = vit.encoder_fields(config.model.get('variant'),
                           config.model.get('encoder'))
  d, depth, p = enc['width'], enc['depth'], enc['patch_size']
  mlp = enc.get('mlp_dim') or 4 * d
  dd = config.model.decoder_width
  d_mlp = config.model.get('decoder_mlp_dim') or 4 * dd
  chans = config.model.get('in_chans', 3)
  grid = config.input.image_size // p

  torch.manual_seed(seed)
  sd = {}
  conv = nn.Conv2d(chans, d, p, p)
  blocks = [_linears(torch, d, mlp) for _ in range(depth)]
  decoder_embed = nn.Linear(d, dd)
  decoder_blocks = [_linears(torch, dd, d_mlp)
                    for _ in range(config.model.decoder_depth)]
  decoder_pred = nn.Linear(dd, p * p * chans)
  cls_token = torch.zeros(1, 1, d)
  mask_token = torch.zeros(1, 1, dd)

  with torch.no_grad():
    w = conv.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(cls_token, std=0.02)
    nn.init.normal_(mask_token, std=0.02)
    # self.apply: children in order, each module's own Linears.
    order = [(f'blocks.{i}.{k}', m) for i, b in enumerate(blocks)
             for k, m in b.items()]
    order.append(('decoder_embed', decoder_embed))
    order += [(f'decoder_blocks.{i}.{k}', m)
              for i, b in enumerate(decoder_blocks) for k, m in b.items()]
    order.append(('decoder_pred', decoder_pred))
    for _, m in order:
      nn.init.xavier_uniform_(m.weight)
      nn.init.constant_(m.bias, 0)

  sd['cls_token'] = cls_token
  sd['pos_embed'] = torch.from_numpy(
      layers.posemb_sincos_2d(grid, grid, d).astype(np.float32))
  sd['mask_token'] = mask_token
  sd['decoder_pos_embed'] = torch.from_numpy(
      layers.posemb_sincos_2d(grid, grid, dd).astype(np.float32))
  sd['patch_embed.proj.weight'] = conv.weight
  sd['patch_embed.proj.bias'] = conv.bias
  for prefix, width, mods in (
      [(f'blocks.{i}', d, b) for i, b in enumerate(blocks)] +
      [(f'decoder_blocks.{i}', dd, b) for i, b in enumerate(decoder_blocks)]):
    for norm in ('norm1', 'norm2'):
      sd[f'{prefix}.{norm}.weight'] = torch.ones(width)
      sd[f'{prefix}.{norm}.bias'] = torch.zeros(width)
    for k, m in mods.items():
      sd[f'{prefix}.{k}.weight'] = m.weight
      sd[f'{prefix}.{k}.bias'] = m.bias
  for norm, width in (('norm', d), ('decoder_norm', dd)):
    sd[f'{norm}.weight'] = torch.ones(width)
    sd[f'{norm}.bias'] = torch.zeros(width)
  for name, m in (('decoder_embed', decoder_embed),
                  ('decoder_pred', decoder_pred)):
    sd[f'{name}.weight'] = m.weight
    sd[f'{name}.bias'] = m.bias
  return {k: v.detach().numpy().astype(np.float32) for k, v in sd.items()}


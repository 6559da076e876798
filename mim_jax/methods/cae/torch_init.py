"""The official CAE initialisation, drawn with PyTorch (a test and benchmark
aid; needs the `torch` test extra).

`official_init(config, seed)` returns the state dict (official key names)
that Atten4Vis/CAE's `ContextAutoencoderViT` (model_type 'cae', v1) holds
right after `torch.manual_seed(seed)` and construction, alignment (teacher)
encoder included. The order of the draws; the layers with parameters that
PyTorch initialises (Linear, Conv2d: kaiming weight, then bias when there is
one) draw as they are constructed, the sin-cos tables (float32, rows first),
q/v biases, layer-scale gammas and tokens are built without draws:

1. `encoder`: patch_embed.proj (Conv2d); each Block's attn.qkv (no bias),
   attn.proj, mlp.fc1, mlp.fc2. Then its own init: cls_token
   trunc_normal(0.02) truncated at +-0.02 (upstream's trunc_normal_ passes
   a=-std, b=std: timm's inverse-CDF sampler), `apply` (post-order: the
   leaves in registration order) with trunc_normal on every Linear and the
   Conv2d, zero biases, LayerNorm 1/0; then BEiT's rescale of each block's
   attn.proj and mlp.fc2 weights by 1/sqrt(2 (i + 1)) (no draws).
2. `alignment_encoder`: a second encoder, every draw of step 1 again.
3. `encoder_to_regresser` Linear (+ LayerNorm), only when the decoder width
   differs from the encoder's.
4. `regresser`: each RegressorBlock's cross_attn.q, .k, .v (no bias),
   cross_attn.proj, mlp_cross.fc1, mlp_cross.fc2; then trunc_normal on every
   Linear, zero biases, and the rescale of cross_attn.proj / mlp_cross.fc2.
5. `mask_token` trunc_normal(0.02).
6. `decoder`: each Block's Linears as in step 1, then the head Linear; then
   trunc_normal on head.weight, `apply` (blocks' Linears, then the head
   again), the rescale of the blocks.
7. Unless fix_init_weight: the model's `apply` redraws every Linear
   xavier-uniform with zero bias (encoder, alignment encoder, projection,
   regressor, decoder, in that order), LayerNorm 1/0; the patch embedding
   (a Conv2d) and the tokens keep their trunc_normal draws.
8. The alignment encoder's parameters are overwritten by a copy of the
   encoder's (its draws only advanced the generator).

`fix_init_weight` (an argument; our configs have no such field) defaults to
False, what every official script gets. tests/official_init_test.py checks this
against the fixture's state dict bit for bit, then compares our JAX init's
per-parameter statistics with it.
"""

import math

import numpy as np

from mim_jax import method
from mim_jax.methods.cae import model as cae_model
from mim_jax.models import torch_draws as common
from mim_jax.targets import tokenizer


def _rescale(torch, pairs):
  """Upstream's `fix_init_weight`: block i's output projections divided
  by sqrt(2 (i + 1))."""
  with torch.no_grad():
    for i, weights in enumerate(pairs):
      for w in weights:
        w.div_(math.sqrt(2.0 * (i + 1)))


def _blocks(torch, eps: float):
  """(Block, RegressorBlock, PatchEmbed): upstream's layers, attribute
  names and registration order, without forward passes."""
  nn = torch.nn
  norm = lambda n: nn.LayerNorm(n, eps=eps)
  Attention, Mlp = common.beit_layers(torch)

  class CrossAttention(nn.Module):

    def __init__(self, dim):
      super().__init__()
      self.q = nn.Linear(dim, dim, bias=False)
      self.k = nn.Linear(dim, dim, bias=False)
      self.v = nn.Linear(dim, dim, bias=False)
      self.q_bias = nn.Parameter(torch.zeros(dim))
      self.v_bias = nn.Parameter(torch.zeros(dim))
      self.proj = nn.Linear(dim, dim)

  class Block(nn.Module):

    def __init__(self, dim, hidden, init_values):
      super().__init__()
      self.norm1 = norm(dim)
      self.attn = Attention(dim)
      self.norm2 = norm(dim)
      self.mlp = Mlp(dim, hidden)
      if init_values > 0:
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

  class RegressorBlock(nn.Module):

    def __init__(self, dim, hidden, init_values):
      super().__init__()
      self.norm1_q = norm(dim)
      self.norm1_k = norm(dim)
      self.norm1_v = norm(dim)
      self.norm2_cross = norm(dim)
      self.cross_attn = CrossAttention(dim)
      self.mlp_cross = Mlp(dim, hidden)
      scale = init_values if init_values > 0 else 1.0
      self.gamma_1_cross = nn.Parameter(scale * torch.ones(dim))
      self.gamma_2_cross = nn.Parameter(scale * torch.ones(dim))

  class PatchEmbed(nn.Module):

    def __init__(self, chans, dim, p):
      super().__init__()
      self.proj = nn.Conv2d(chans, dim, p, p)

  return Block, RegressorBlock, PatchEmbed


def _modules(torch, eps: float, std: float):
  """Minimal modules with upstream's attribute names, registration order and
  own init passes (no forward passes)."""
  nn = torch.nn
  norm = lambda n: nn.LayerNorm(n, eps=eps)
  Block, RegressorBlock, PatchEmbed = _blocks(torch, eps)

  def trunc_normal(t):
    common.trunc_normal_(torch, t, std)

  init_weights = common.beit_init_weights(torch, std)  # the submodules'
  rescale = lambda pairs: _rescale(torch, pairs)

  class Encoder(nn.Module):

    def __init__(self, chans, p, grid, dim, depth, hidden, init_values):
      super().__init__()
      self.patch_embed = PatchEmbed(chans, dim, p)
      self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
      self.pos_embed = nn.Parameter(common.sincos_2d(torch, grid, grid, dim),
                                    requires_grad=False)
      self.blocks = nn.ModuleList(
          [Block(dim, hidden, init_values) for _ in range(depth)])
      self.norm = norm(dim)
      with torch.no_grad():
        trunc_normal(self.cls_token)
        self.apply(init_weights)
      rescale([(b.attn.proj.weight, b.mlp.fc2.weight) for b in self.blocks])

  class Regresser(nn.Module):

    def __init__(self, dim, depth, hidden, init_values):
      super().__init__()
      self.regressor_blocks = nn.ModuleList(
          [RegressorBlock(dim, hidden, init_values) for _ in range(depth)])
      self.norm = norm(dim)
      with torch.no_grad():
        self.apply(init_weights)
      rescale([(b.cross_attn.proj.weight, b.mlp_cross.fc2.weight)
               for b in self.regressor_blocks])

  class Decoder(nn.Module):

    def __init__(self, num_classes, dim, depth, hidden, init_values):
      super().__init__()
      if depth > 0:
        self.decoder_blocks = nn.ModuleList(
            [Block(dim, hidden, init_values) for _ in range(depth)])
      self.norm = norm(dim)
      self.head = nn.Linear(dim, num_classes)
      with torch.no_grad():
        trunc_normal(self.head.weight)
        self.apply(init_weights)
      rescale([(b.attn.proj.weight, b.mlp.fc2.weight)
               for b in getattr(self, 'decoder_blocks', ())])

  return Encoder, Regresser, Decoder


def official_init(config, seed: int,
                  fix_init_weight: bool = False) -> dict[str, np.ndarray]:
  """The official CAE init of the model in `config` (a CAE config), as a
  float32 numpy state dict with official key names; `fix_init_weight` is
  the constructor's flag (True: no final xavier pass)."""
  import torch  # pylint: disable=g-import-not-at-top
  nn = torch.nn
  m = config.model
  enc = method.model_from_config(cae_model.Model, config).encoder_fields()
  d, depth, p = enc['width'], enc['depth'], enc['patch_size']
  mlp_ratio = (enc.get('mlp_dim') or 4 * d) / d
  init_values = enc.get('layer_scale') or 0.0
  dd = m.get('decoder_width') or d
  d_hidden = m.get('decoder_mlp_dim') or int(dd * mlp_ratio)
  chans = m.get('in_chans', 3)
  grid = config.input.image_size // p
  if m.get('target', 'tokens') == 'tokens':
    # model.vocab_size None: the tokenizer file's vocabulary.
    num_classes = (m.get('vocab_size')
                   or tokenizer.sizes(config)['vocab_size'])
  else:  # no official pixel head; ours: p*p*C outputs per masked patch
    num_classes = p * p * chans
  dec_scale = m.get('decoder_layer_scale', 0.1)
  eps = enc.get('layernorm_eps', 1e-6)
  encoder_cls, regresser_cls, decoder_cls = _modules(torch, eps, 0.02)

  torch.manual_seed(seed)
  model = nn.Module()
  enc_args = (chans, p, grid, d, depth, int(d * mlp_ratio), init_values)
  model.encoder = encoder_cls(*enc_args)
  model.alignment_encoder = encoder_cls(*enc_args)  # draws, then a copy
  if dd != d:
    model.encoder_to_regresser = nn.Linear(d, dd)
    model.encoder_to_regresser_norm = nn.LayerNorm(dd, eps=eps)
  model.rd_pos_embed = nn.Parameter(common.sincos_2d(torch, grid, grid, dd),
                                    requires_grad=False)
  model.regresser = regresser_cls(dd, m.get('regressor_depth', 4),
                                  d_hidden, dec_scale)
  model.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
  common.trunc_normal_(torch, model.mask_token, 0.02)
  model.decoder = decoder_cls(num_classes, dd, m.get('decoder_depth', 4),
                              d_hidden, dec_scale)

  def xavier(mod):  # the top-level _init_weights
    if isinstance(mod, nn.Linear):
      nn.init.xavier_uniform_(mod.weight)
      if mod.bias is not None:
        nn.init.constant_(mod.bias, 0)
    elif isinstance(mod, nn.LayerNorm):
      nn.init.constant_(mod.bias, 0)
      nn.init.constant_(mod.weight, 1.0)

  with torch.no_grad():
    if not fix_init_weight:
      model.apply(xavier)
    for src, dst in zip(model.encoder.parameters(),
                        model.alignment_encoder.parameters()):
      dst.copy_(src)
  return {k: v.detach().numpy().astype(np.float32)
          for k, v in model.state_dict().items()}

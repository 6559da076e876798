r"""Train-step speed side by side: the official PyTorch MAE and mim_jax.

  python benchmarks/vs_pytorch.py [--models=S/16,B/16] [--rounds=3]
      [--steps=3] [--batch_size=16] [--noproof] [--smoke]
      [--dtype=float32|bfloat16] [--device=cpu|cuda]

Both sides train the same model (MAE pretraining, 224 px, norm-pix loss,
75% masks, decoder 8 x 512 with 16 heads, AdamW) on a synthetic batch, on
the CPU of this machine (`--device=cpu`, the default) or on its GPU
(`--device=cuda`: PyTorch on `cuda`, JAX on its default backend, which must
be a GPU), one framework per process. `--dtype`: float32 (default) or
bfloat16 compute: PyTorch under `torch.autocast(dtype=torch.bfloat16)`
(AMP: float32 weights and optimizer; no loss scaling, which bf16 does not
need), mim_jax with `model.dtype='bfloat16'` (float32 params).

- PyTorch: a small MAE written here on timm's `Block` (timm's default
  attention, i.e. fused `scaled_dot_product_attention`), with the official
  state-dict names. Step = zero_grad, forward, backward, AdamW step (lr
  1.5e-4, betas (0.9, 0.95), weight decay 0.05 except biases and 1-D
  params); `warmup` untimed steps first; `torch.set_num_threads(cores)`;
  on cuda, `torch.cuda.synchronize()` around the timed steps.
- mim_jax: `benchmarks/train_step_bench.py:time_train_step` on the MAE
  recipe (`methods/mae/config.py`, variant S/16, B/16 or L/16), one
  device; timed to `block_until_ready`.

Each round runs one PyTorch and one JAX subprocess (this script with
`--side=torch|jax`), alternating which goes first (torch, jax, jax, torch,
...), so neither side always gets the cooler or warmer machine; a child
imports only its own framework. img/s per side is the median over rounds.

FLOPs per image: one count for both sides, XLA's cost analysis of our train
step (`train.step_flops`, the planner's count) / batch size. Each child also
times an n^3 matmul in `--dtype` with its own framework (n = 2048 on CPU,
8192 on GPU; best of 5), and `matmul_fraction` = the side's FLOP/s / that
matmul's FLOP/s.

Proof (on by default, `--noproof` skips it; float32, on the CPU): before
anything is timed, the PyTorch MAE loads the official fixture (tests/fixtures/mae: state dict,
images, noise) and must reproduce its loss to 1e-6 (relative) and its
gradients to 2e-5 (relative to each tensor's max; the key third of the qkv
biases, whose true gradient is zero, to 1e-7 absolute). So every number is
of the official computation.

Prints a table, then (last line) one JSON object: per model
{"pytorch": {...}, "mim_jax": {...}, "ratio": mim_jax / pytorch img/s},
"machine" (with the GPU's name on cuda), "rounds", "dtype", "device".
`--smoke`: the fixture-sized model (32 px, patch 4,
width 64, depth 4), 1 round, 1 step (the test suite runs it).
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, 'benchmarks')
for _p in (ROOT, HERE):
  if _p not in sys.path:
    sys.path.insert(0, _p)

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from absl import app
from absl import flags
# pylint: enable=g-import-not-at-top,wrong-import-position

FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'mae')
SMOKE = 'smoke'      # the model of --smoke: the fixture's sizes
MATMUL_N = {'cpu': 2048, 'cuda': 8192}  # the matmul's size per --device
DEVICES = ('cpu', 'cuda')
DTYPES = ('float32', 'bfloat16')
# The official pretraining optimizer (main_pretrain.py) at batch 256.
LR, BETAS, WEIGHT_DECAY = 1.5e-4, (0.9, 0.95), 0.05
TOL = dict(loss_rel=1e-6, grad_rel_to_max=2e-5, key_bias_abs=1e-7)


def num_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # (not Linux)
    return os.cpu_count() or 1


# --------------------------------------------------------------------------
# The model, in mim_jax's terms (parent and jax child).


def jax_config(model: str, batch_size: int, scan: bool = True,
               dtype: str = 'float32'):
  """The MAE recipe for `model` ('S/16', 'B/16', ... or SMOKE) on one
  device, `dtype` compute, norm-pix targets, `batch_size` images of its
  size."""
  from mim_jax.methods.mae import config as mae_config
  c = mae_config.get_config('B/16')
  if model == SMOKE:
    from mim_jax.methods.mae import parity
    with open(os.path.join(FIXTURE, 'config.json')) as f:
      e = parity.experiment_config(json.load(f))
    c.model.variant = None
    c.model.encoder = e.model.encoder.to_dict()
    for k in ('decoder_width', 'decoder_depth', 'decoder_num_heads'):
      c.model[k] = e.model[k]
    c.input.image_size = e.input.image_size
  else:
    c.model.variant = model
  c.model.dtype = dtype
  # Scanned blocks, the recipes' layout: on an idle 2-core CPU the ViT-B
  # step takes 7.9 s scanned and 11.0 s unrolled (docs/speed.md).
  c.model.scan = scan
  if not scan:  # 'linears' pays only with scan: unrolled it costs 1.5x
    c.model.remat_policy = 'none'
  c.loss.norm_pix_loss = True
  c.input.batch_size = batch_size
  c.mesh = (('data', 1), ('fsdp', 1), ('tensor', 1))
  return c


def official_args(config) -> dict:
  """The official `MaskedAutoencoderViT` constructor arguments of a
  mim_jax MAE config (plus `layernorm_eps` and `mask_ratio`)."""
  from mim_jax.models import vit
  m = config.model
  enc = vit.encoder_fields(m.get('variant'), m.get('encoder'))
  width, dec = enc['width'], m.decoder_width
  mlp_ratio = (enc.get('mlp_dim') or 4 * width) / width
  dec_ratio = (m.get('decoder_mlp_dim') or 4 * dec) / dec
  if dec_ratio != mlp_ratio:  # the official decoder shares mlp_ratio
    raise ValueError(f'Decoder MLP ratio {dec_ratio} != encoder {mlp_ratio}: '
                     'not an official MAE.')
  return dict(img_size=int(config.input.image_size),
              patch_size=int(enc['patch_size']),
              in_chans=int(m.get('in_chans', 3)),
              embed_dim=width, depth=enc['depth'],
              num_heads=enc['num_heads'], decoder_embed_dim=dec,
              decoder_depth=m.decoder_depth,
              decoder_num_heads=m.decoder_num_heads, mlp_ratio=mlp_ratio,
              norm_pix_loss=bool(config.loss.norm_pix_loss),
              layernorm_eps=enc.get('layernorm_eps', 1e-6),
              mask_ratio=float(config.input.mask.ratio))


def write_spec(config, path: str) -> dict:
  """The torch child's model: `official_args` and the fixed sin-cos
  tables (`layers.posemb_sincos_2d`), so that child imports no jax."""
  from mim_jax.models import layers
  args = official_args(config)
  grid = args['img_size'] // args['patch_size']
  np.savez(path, args=np.asarray(json.dumps(args)),
           pos_embed=layers.posemb_sincos_2d(grid, grid, args['embed_dim']),
           decoder_pos_embed=layers.posemb_sincos_2d(
               grid, grid, args['decoder_embed_dim']))
  return args


# --------------------------------------------------------------------------
# PyTorch side (torch, timm and numpy only).


def build_torch_mae(args: dict, pos_embed=None, decoder_pos_embed=None,
                    fused_attn=None):
  """The official MAE (`MaskedAutoencoderViT` of facebookresearch/mae) as a
  torch module with the official state-dict names, built on timm's Block.

  Args:
    args: official constructor arguments (`official_args`; `mask_ratio`,
      if present, becomes the forward's default).
    pos_embed, decoder_pos_embed: the fixed (1, 1 + L, dim) tables (zeros
      when None, e.g. before `load_state_dict`).
    fused_attn: None keeps timm's default attention (fused SDPA); False /
      True forces the explicit / fused path.

  Returns:
    The module; `module(imgs, noise=None)` -> (loss, pred, mask), with
    `noise` drawn by torch.rand when None, as upstream.
  """
  import functools
  import torch
  from torch import nn
  with warnings.catch_warnings():  # torchvision's image extension
    warnings.simplefilter('ignore')
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import Block

  p, chans = args['patch_size'], args.get('in_chans', 3)
  width, dec = args['embed_dim'], args['decoder_embed_dim']
  norm = functools.partial(nn.LayerNorm, eps=args.get('layernorm_eps', 1e-6))

  def blocks(dim, depth, heads):
    out = nn.ModuleList([Block(dim, heads, args['mlp_ratio'], qkv_bias=True,
                               norm_layer=norm) for _ in range(depth)])
    if fused_attn is not None:
      for b in out:
        b.attn.fused_attn = fused_attn
    return out

  def table(value, n, dim):
    t = torch.zeros(1, n + 1, dim) if value is None else torch.as_tensor(
        np.asarray(value, np.float32))
    return nn.Parameter(t, requires_grad=False)  # fixed, as upstream

  class MAE(nn.Module):
    """Patch embed, masking, encoder, decoder, loss: `forward`."""

    def __init__(self):
      super().__init__()
      self.patch_embed = PatchEmbed(args['img_size'], p, chans, width)
      n = self.patch_embed.num_patches
      self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
      self.pos_embed = table(pos_embed, n, width)
      self.blocks = blocks(width, args['depth'], args['num_heads'])
      self.norm = norm(width)
      self.decoder_embed = nn.Linear(width, dec)
      self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
      self.decoder_pos_embed = table(decoder_pos_embed, n, dec)
      self.decoder_blocks = blocks(dec, args['decoder_depth'],
                                   args['decoder_num_heads'])
      self.decoder_norm = norm(dec)
      self.decoder_pred = nn.Linear(dec, p * p * chans)
      self._init_like_upstream()

    def _init_like_upstream(self):
      # Same distributions as upstream's initialize_weights (values only
      # matter for speed through their scale: no zeros, no denormals).
      w = self.patch_embed.proj.weight
      nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
      nn.init.normal_(self.cls_token, std=0.02)
      nn.init.normal_(self.mask_token, std=0.02)
      for m in self.modules():
        if isinstance(m, nn.Linear):
          nn.init.xavier_uniform_(m.weight)
          nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
          nn.init.ones_(m.weight)
          nn.init.zeros_(m.bias)

    def patchify(self, imgs):
      """(N, C, H, W) -> (N, L, p*p*C), patches in raster order, channel
      fastest within a patch."""
      n, c, h, w = imgs.shape
      x = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
      return x.reshape(n, (h // p) * (w // p), p * p * c)

    def forward(self, imgs, mask_ratio=args.get('mask_ratio', 0.75),
                noise=None):
      # Encoder: embed, add positions, keep the len_keep lowest-noise
      # patches (in noise order), prepend cls.
      x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
      n, num, d = x.shape
      keep = int(num * (1 - mask_ratio))
      if noise is None:
        noise = torch.rand(n, num, device=x.device)
      ids_shuffle = torch.argsort(noise, dim=1)
      ids_restore = torch.argsort(ids_shuffle, dim=1)
      x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
      mask = torch.ones(n, num, device=x.device)
      mask[:, :keep] = 0
      mask = torch.gather(mask, 1, ids_restore)  # 1 = removed
      cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
      x = torch.cat([cls, x], dim=1)
      for b in self.blocks:
        x = b(x)
      x = self.decoder_embed(self.norm(x))
      # Decoder: mask tokens after the visible ones, back to raster order.
      rest = self.mask_token.expand(n, num - keep, -1)
      y = torch.cat([x[:, 1:], rest], dim=1)
      y = torch.gather(y, 1, ids_restore[..., None].expand(-1, -1, dec))
      x = torch.cat([x[:, :1], y], dim=1) + self.decoder_pos_embed
      for b in self.decoder_blocks:
        x = b(x)
      pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
      # Loss: per-patch MSE (to normalised patches with norm-pix, unbiased
      # variance), mean over the removed patches.
      target = self.patchify(imgs)
      if args['norm_pix_loss']:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
      per_patch = ((pred - target) ** 2).mean(dim=-1)
      return (per_patch * mask).sum() / mask.sum(), pred, mask

  return MAE()


def decay_groups(model) -> list[dict]:
  """The official weight-decay grouping (timm's add_weight_decay): no decay
  for biases and 1-D params, frozen params left out."""
  decay, no_decay = [], []
  for name, param in model.named_parameters():
    if param.requires_grad:
      flat = param.ndim <= 1 or name.endswith('.bias')
      (no_decay if flat else decay).append(param)
  return [{'params': no_decay, 'weight_decay': 0.0},
          {'params': decay, 'weight_decay': WEIGHT_DECAY}]


def fixture_args(fc: dict, **overrides) -> dict:
  """The fixture's constructor arguments (config.json), for build_torch_mae."""
  a = {k: v for k, v in fc['constructor_args'].items() if k != 'norm_layer'}
  a.update(layernorm_eps=fc.get('layernorm_eps', 1e-6),
           mask_ratio=fc['mask_ratio'])
  a.update(overrides)
  return a


def fixture_model(fused_attn=None, **overrides):
  """The PyTorch MAE loaded (strictly) with the fixture's state dict.

  Returns:
    (model, imgs, noise, fixture config) with torch tensors.
  """
  import torch
  with open(os.path.join(FIXTURE, 'config.json')) as f:
    fc = json.load(f)
  model = build_torch_mae(fixture_args(fc, **overrides),
                          fused_attn=fused_attn)
  with np.load(os.path.join(FIXTURE, 'state_dict.npz')) as z:
    model.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files},
                          strict=True)
  with np.load(os.path.join(FIXTURE, 'inputs.npz')) as z:
    imgs, noise = torch.from_numpy(z['imgs']), torch.from_numpy(z['noise'])
  return model.train(True), imgs, noise, fc


def proof(fused_attn=None) -> dict:
  """The PyTorch MAE against the official fixture: loss, mask, gradients.

  Returns:
    dict with the errors and 'ok' (all within TOL).
  """
  model, imgs, noise, _ = fixture_model(fused_attn)
  loss, _, mask = model(imgs, noise=noise)
  loss.backward()
  with np.load(os.path.join(FIXTURE, 'outputs.npz')) as z:
    ref_loss, ref_mask = float(z['loss']), z['mask']
  with np.load(os.path.join(FIXTURE, 'grads.npz')) as z:
    ref_grads = {k: z[k].astype(np.float64) for k in z.files}
  grads = {k: v.grad.numpy().astype(np.float64)
           for k, v in model.named_parameters() if v.requires_grad}
  worst, worst_key, key_bias = 0.0, None, 0.0
  for k, ref in ref_grads.items():
    g = grads[k]
    keep = np.ones(ref.shape, bool)
    if k.endswith('attn.qkv.bias'):  # key third: true gradient zero
      d = ref.shape[0] // 3
      keep[d:2 * d] = False
      key_bias = max(key_bias, float(np.abs(g - ref)[~keep].max()))
    e = float(np.abs(g - ref)[keep].max() / np.abs(ref[keep]).max())
    if e > worst:
      worst, worst_key = e, k
  out = dict(
      loss=loss.item(), fixture_loss=ref_loss,
      loss_rel_err=abs(loss.item() - ref_loss) / abs(ref_loss),
      mask_equal=bool(np.array_equal(mask.numpy(), ref_mask)),
      grads_compared=len(ref_grads),
      grads_same_keys=sorted(grads) == sorted(ref_grads),
      grad_max_rel_to_max=worst, grad_worst_key=worst_key,
      key_bias_max_abs=key_bias,
      attention=('fused' if model.blocks[0].attn.fused_attn
                 else 'explicit'),
      tolerances=TOL)
  out['ok'] = (out['loss_rel_err'] <= TOL['loss_rel'] and out['mask_equal']
               and out['grads_same_keys'] and
               worst <= TOL['grad_rel_to_max'] and
               key_bias <= TOL['key_bias_abs'])
  return out


def _torch_sync(device: str):
  import torch
  if device == 'cuda':
    torch.cuda.synchronize()


def torch_matmul_flops(repeats: int, device: str = 'cpu',
                       dtype: str = 'float32') -> float:
  """FLOP/s of an n^3 torch.mm (n = MATMUL_N[device]) in `dtype` on
  `device`, best of `repeats`."""
  import torch
  n = MATMUL_N[device]
  g = torch.Generator().manual_seed(0)
  a, b = (torch.randn(n, n, generator=g).to(device, getattr(torch, dtype))
          for _ in range(2))
  torch.mm(a, b)
  best = float('inf')
  for _ in range(repeats):
    _torch_sync(device)
    t = time.perf_counter()
    torch.mm(a, b)
    _torch_sync(device)
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def _torch_device(device: str) -> dict:
  """Checks that `device` is usable; its name (GPU) for the JSON."""
  import torch
  if device == 'cpu':
    return {}
  if not torch.cuda.is_available():
    raise RuntimeError(
        f'--device=cuda, but PyTorch {torch.__version__} sees no CUDA GPU '
        '(torch.cuda.is_available() is False): install a CUDA build of '
        'torch, or run with --device=cpu.')
  return dict(gpu=torch.cuda.get_device_name(0),
              cuda=torch.version.cuda)


def run_torch(spec_path: str, batch_size: int, steps: int, warmup: int,
              matmul_repeats: int, device: str = 'cpu',
              dtype: str = 'float32') -> dict:
  """The torch child: matmul rate, then `steps` timed train steps on
  `device`, under bf16 autocast when `dtype` is bfloat16."""
  import contextlib
  import torch
  torch.set_num_threads(num_cores())
  info = _torch_device(device)
  with np.load(spec_path) as z:
    args = json.loads(str(z['args']))
    model = build_torch_mae(args, z['pos_embed'], z['decoder_pos_embed'])
  model.to(device).train(True)
  opt = torch.optim.AdamW(decay_groups(model), lr=LR, betas=BETAS)
  size = args['img_size']
  imgs = torch.randn(batch_size, 3, size, size,
                     generator=torch.Generator().manual_seed(0)).to(device)
  matmul = torch_matmul_flops(matmul_repeats, device, dtype)
  amp = (torch.autocast(device, dtype=torch.bfloat16)
         if dtype == 'bfloat16' else contextlib.nullcontext())

  def step():
    opt.zero_grad()
    with amp:
      loss = model(imgs)[0]
    loss.backward()
    opt.step()
    return loss

  for _ in range(warmup):
    step()
  _torch_sync(device)
  t = time.perf_counter()
  for _ in range(steps):
    loss = step()
  _torch_sync(device)
  dt = (time.perf_counter() - t) / steps
  if not np.isfinite(loss.item()):
    raise FloatingPointError(f"PyTorch loss {loss.item()}")
  return dict(side='torch', img_per_s=batch_size / dt, step_s=dt,
              matmul_flop_per_s=matmul, threads=torch.get_num_threads(),
              attention='fused' if model.blocks[0].attn.fused_attn
              else 'explicit', jax_imported='jax' in sys.modules,
              version=torch.__version__, **info)


# --------------------------------------------------------------------------
# mim_jax side.


def jax_matmul_flops(repeats: int, device: str = 'cpu',
                     dtype: str = 'float32') -> float:
  """FLOP/s of a jitted n^3 jnp.dot (n = MATMUL_N[device]) in `dtype`,
  best of `repeats`."""
  import jax
  import jax.numpy as jnp
  n = MATMUL_N[device]
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def _jax_device(device: str) -> dict:
  """Checks that JAX's default backend fits `device`; its kind (GPU)."""
  import jax
  d = jax.devices()[0]
  if device == 'cpu':
    return {}
  if d.platform != 'gpu':
    raise RuntimeError(
        f'--device=cuda, but JAX {jax.__version__} runs on {d.platform!r} '
        '(no CUDA backend): pip install -U "jax[cuda12]", and leave '
        'JAX_PLATFORMS unset.')
  return dict(gpu=d.device_kind)


def run_jax(model: str, batch_size: int, steps: int, count_flops: bool,
            matmul_repeats: int, scan: bool = True, device: str = 'cpu',
            dtype: str = 'float32') -> dict:
  """The jax child: matmul rate, `time_train_step`, then (optionally, after
  timing) the FLOPs per image of the train step."""
  import jax
  import train_step_bench
  info = _jax_device(device)
  config = jax_config(model, batch_size, scan, dtype)
  matmul = jax_matmul_flops(matmul_repeats, device, dtype)
  r = train_step_bench.time_train_step(config, steps)
  # (step_sec is rounded to 0.1 ms; images_per_sec to 0.1 img/s.)
  img_per_s = (batch_size / r['step_sec'] if r['step_sec']
               else r['images_per_sec'])
  out = dict(side='jax', img_per_s=img_per_s,
             step_s=r['step_sec'], compile_s=r['compile_sec'],
             matmul_flop_per_s=matmul, scan=bool(config.model.scan),
             devices=jax.device_count(), torch_imported='torch' in sys.modules,
             version=jax.__version__, platform=r['platform'], **info)
  if count_flops:
    from mim_jax import sharding
    from mim_jax import train
    flops = train.step_flops(config, sharding.make_mesh(config.mesh))
    out['flop_per_img'] = flops / batch_size
  return out


# --------------------------------------------------------------------------
# Parent.


def _child(side: str, env: dict, **kw) -> dict:
  """Runs this script as a child and returns its JSON line."""
  cmd = [sys.executable, os.path.abspath(__file__), f'--side={side}']
  cmd += [f'--{k}={v}' for k, v in kw.items()]
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env=env, check=False)
  lines = [x for x in res.stdout.splitlines() if x.startswith('{')]
  if res.returncode or not lines:
    raise RuntimeError(f'{" ".join(cmd)} failed (exit {res.returncode}):\n'
                       f'{res.stdout[-2000:]}\n{res.stderr[-4000:]}')
  return json.loads(lines[-1])


def child_envs(smoke: bool, device: str = 'cpu') -> dict:
  """Environments of the children: JAX on this CPU as one device (on
  --device=cuda: its default backend), and (but for --smoke) with XLA's
  optimisations (the test suite turns them off)."""
  base = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')
  xla_flags = [f for f in base.get('XLA_FLAGS', '').split()
               if not f.startswith('--xla_force_host_platform_device_count')]
  jax_env = dict(base, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(xla_flags))
  if device != 'cpu':
    jax_env.pop('JAX_PLATFORMS')
  if not smoke:
    jax_env.pop('JAX_DISABLE_MOST_OPTIMIZATIONS', None)
  return {'torch': base, 'jax': jax_env}


def _side_summary(runs: list[dict], flop_per_img: float) -> dict:
  img = statistics.median(r['img_per_s'] for r in runs)
  fractions = [r['img_per_s'] * flop_per_img / r['matmul_flop_per_s']
               for r in runs]
  return dict(img_per_s=img, matmul_fraction=statistics.median(fractions),
              gflop_per_img=flop_per_img / 1e9,
              matmul_gflop_per_s=statistics.median(
                  r['matmul_flop_per_s'] for r in runs) / 1e9,
              img_per_s_rounds=[r['img_per_s'] for r in runs])


def benchmark(models, rounds: int, steps: int, warmup: int, batch_size: int,
              smoke: bool, matmul_repeats: int, scan: bool = True,
              device: str = 'cpu', dtype: str = 'float32'):
  """Alternating rounds per model.

  Returns:
    (result dict of the JSON line, {'torch': version, 'jax': version, and
    on cuda each side's GPU name}).
  """
  envs = child_envs(smoke, device)
  common = dict(batch_size=batch_size, steps=steps, device=device,
                dtype=dtype, matmul_repeats=matmul_repeats)
  result = {}
  with tempfile.TemporaryDirectory() as tmp:
    for model in models:
      spec = os.path.join(tmp, model.replace('/', '_') + '.npz')
      args = write_spec(jax_config(model, batch_size), spec)
      runs = {'torch': [], 'jax': []}
      flop_per_img = None
      for r in range(rounds):
        order = ('torch', 'jax') if r % 2 == 0 else ('jax', 'torch')
        for side in order:
          if side == 'torch':
            out = _child('torch', envs['torch'], model=model, spec=spec,
                         warmup=warmup, **common)
          else:
            out = _child('jax', envs['jax'], model=model,
                         flops=flop_per_img is None, scan=scan, **common)
            flop_per_img = out.get('flop_per_img', flop_per_img)
          if out.get('jax_imported') or out.get('torch_imported'):
            raise RuntimeError(f'The {side} child imported the other '
                               f'framework: {out}')
          runs[side].append(out)
          print(f'{model} round {r + 1}/{rounds} {side:5s}: '
              f'{out["img_per_s"]:9.2f} img/s, matmul '
              f'{out["matmul_flop_per_s"] / 1e9:7.1f} GFLOP/s', flush=True)
      torch_s = _side_summary(runs['torch'], flop_per_img)
      jax_s = _side_summary(runs['jax'], flop_per_img)
      torch_s.update(attention=runs['torch'][0]['attention'],
                     threads=runs['torch'][0]['threads'])
      jax_s.update(scan=runs['jax'][0]['scan'],
                   compile_s=runs['jax'][0]['compile_s'])
      result[model] = dict(pytorch=torch_s, mim_jax=jax_s,
                           ratio=jax_s['img_per_s'] / torch_s['img_per_s'],
                           official_args=args)
    versions = {'torch': runs['torch'][0]['version'],
                'jax': runs['jax'][0]['version']}
    for side in ('torch', 'jax'):
      if 'gpu' in runs[side][0]:
        versions[f'{side}_gpu'] = runs[side][0]['gpu']
  return result, versions


def table(result: dict, models) -> str:
  rows = [f'{"model":7s} {"side":8s} {"img/s":>9s} {"GFLOP/img":>10s} '
          f'{"matmul GFLOP/s":>15s} {"of matmul":>10s}']
  for m in models:
    for side in ('pytorch', 'mim_jax'):
      s = result[m][side]
      rows.append(f'{m:7s} {side:8s} {s["img_per_s"]:9.2f} '
                  f'{s["gflop_per_img"]:10.2f} '
                  f'{s["matmul_gflop_per_s"]:15.1f} '
                  f'{s["matmul_fraction"]:10.1%}')
    rows.append(f'{m:7s} {"ratio":8s} {result[m]["ratio"]:9.3f}  '
                '(mim_jax / pytorch img/s)')
  return '\n'.join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.side == 'proof':
    import torch
    torch.set_num_threads(num_cores())
    print(json.dumps(proof()))
    return
  if f.side == 'torch':
    print(json.dumps(run_torch(f.spec, f.batch_size, f.steps, f.warmup,
                               f.matmul_repeats, f.device, f.dtype)))
    return
  if f.side == 'jax':
    print(json.dumps(run_jax(f.model, f.batch_size, f.steps, f.flops,
                             f.matmul_repeats, f.scan, f.device, f.dtype)))
    return
  if f.device != 'cpu':  # the parent holds no GPU memory: the children do
    import jax
    jax.config.update('jax_platforms', 'cpu')
  models = [SMOKE] if f.smoke else f.models
  rounds, steps = (1, 1) if f.smoke else (f.rounds, f.steps)
  repeats = 2 if f.smoke else f.matmul_repeats
  checked = None
  if f.proof:
    checked = _child('proof', child_envs(f.smoke)['torch'])
    print(f'proof ({checked["attention"]} attention): loss rel err '
          f'{checked["loss_rel_err"]:.2e}, grads max rel-to-max '
          f'{checked["grad_max_rel_to_max"]:.2e}, key-bias grads max abs '
          f'{checked["key_bias_max_abs"]:.2e}', flush=True)
    if not checked['ok']:
      print(json.dumps(dict(proof=checked)))
      sys.exit('The PyTorch MAE does not reproduce the official fixture.')
  result, versions = benchmark(models, rounds, steps, f.warmup,
                               f.batch_size, f.smoke, repeats, f.scan,
                               f.device, f.dtype)
  print(table(result, models))
  result.update(
      machine=dict(cores=num_cores(), cpu=platform.processor() or
                   platform.machine(), python=platform.python_version(),
                   **versions),
      rounds=rounds, steps=steps, batch_size=f.batch_size,
      dtype=f.dtype, device=f.device, proof=checked)
  print(json.dumps(result))


def _define_flags():
  # Only when run as a program: importing the module (tests) must not
  # register flags that clash with other entry points'.
  flags.DEFINE_list('models', ['S/16', 'B/16'],
                    'ViT variants ("<size>/<patch>" of models/vit.py).')
  flags.DEFINE_integer('rounds', 3, 'Rounds (one process per side each).')
  flags.DEFINE_bool('scan', True, 'mim_jax with scanned blocks (the '
                    'recipes\' layout); --noscan: unrolled.')
  flags.DEFINE_integer('steps', 3, 'Timed train steps per process.')
  flags.DEFINE_integer('warmup', 2, 'Untimed PyTorch steps before timing '
                       '(mim_jax: the compile step of time_train_step).')
  flags.DEFINE_integer('batch_size', 16, 'Images per step.')
  flags.DEFINE_bool('proof', True, 'Check the PyTorch MAE against the '
                    'official fixture first (exit 1 if it fails).')
  flags.DEFINE_bool('smoke', False, 'Fixture-sized model, 1 round, 1 step.')
  flags.DEFINE_enum('dtype', 'float32', list(DTYPES), 'Compute dtype: '
                    'bfloat16 = torch.autocast (AMP) / model.dtype.')
  flags.DEFINE_enum('device', 'cpu', list(DEVICES), 'cpu: both on this '
                    'CPU; cuda: PyTorch on cuda, JAX on its default backend '
                    '(a GPU).')
  # A child's flags (set by the parent).
  flags.DEFINE_enum('side', None, ['torch', 'jax', 'proof'],
                    'Run one side in this process and print one JSON line.')
  flags.DEFINE_string('model', None, 'The child\'s model.')
  flags.DEFINE_string('spec', None, 'The torch child\'s model spec (.npz).')
  flags.DEFINE_bool('flops', False, 'The jax child also counts FLOPs/image.')
  flags.DEFINE_integer('matmul_repeats', 5, 'Timed matmuls (best is kept).')


if __name__ == '__main__':
  _define_flags()
  app.run(main)

"""Recipes of the evaluation tasks: fine-tuning, linear probe, attentive
probe and evaluation-only, for the encoders of MAE, CAE and BootMAE.

The numbers are the official scripts' (methods.md: MAE 2.3-2.4, CAE
3.3-3.4, BootMAE 4.4-4.5); where a script contradicts its paper the script
wins, and a comment says so. `get_config(task, method, variant)` builds one;
`configs/{task}_{method}_vit{b,l,h}.py` pick them.
"""

from ml_collections.config_dict import placeholder

from mim_jax import config_lib
from mim_jax import optim
from mim_jax.models import vit

TASKS = ('finetune', 'linprobe', 'attnprobe', 'eval')

# The fine-tuning encoder of each pretraining method (vit.Encoder fields).
# MAE: timm ViT (qkv bias, no layer scale), learned position embedding
# initialised from the pretraining sin-cos table (`models_vit.py` +
# `interpolate_pos_embed`). CAE and BootMAE: BEiT's fine-tuning ViT with
# q/v biases and the row-first sin-cos table, kept fixed (a parameter with
# requires_grad=False in both models).
# CAE (tools/run_class_finetuning.py: --rel_pos_bias, --sin_pos_emb and
# --layer_scale_init_value 0.1 are the defaults, which
# scripts/cae_{base,large}_finetune.sh keep, ViT-L included;
# models/modeling_finetune.py): layer scale 0.1 and a per-block relative
# position bias, which the pretraining file lacks and which starts at zeros.
# BootMAE (models/modeling_finetune_bootmae.py): its VisionTransformer
# builds every block with init_values=None and window_size=None and always
# adds the fixed 14x14 sin-cos table, so the `--abs_pos_emb`,
# `--disable_rel_pos_bias` and `--layer_scale_init_value` flags of
# scripts/finetune/*.sh change nothing: no layer scale, no relative bias.
ENCODERS = {
    'mae': dict(posemb='learned'),
    'cae': dict(qkv_bias='qv', layer_scale=0.1, posemb_row_first=True,
                posemb='sincos', rel_pos_bias=True),
    'bootmae': dict(qkv_bias='qv', posemb_row_first=True, posemb='sincos',
                    rel_pos_bias=False),
}

# (task, method, size) -> recipe. lr: absolute; blr: x batch / 256.
RECIPES = {
    # MAE FINETUNE.md: blr 5e-4 / 1e-3, layer decay 0.65 / 0.75, drop path
    # 0.1 / 0.2 / 0.3, 100 / 50 / 50 epochs, batch 1024, warmup 5.
    ('finetune', 'mae', 'B'): dict(epochs=100, batch=1024, blr=5e-4,
                                   layer_decay=0.65, drop_path=0.1),
    ('finetune', 'mae', 'L'): dict(epochs=50, batch=1024, blr=1e-3,
                                   layer_decay=0.75, drop_path=0.2),
    ('finetune', 'mae', 'H'): dict(epochs=50, batch=1024, blr=1e-3,
                                   layer_decay=0.75, drop_path=0.3),
    # CAE scripts/cae_{base,large}_finetune.sh: absolute lr, batch 4096.
    ('finetune', 'cae', 'B'): dict(epochs=100, batch=4096, lr=8e-3,
                                   layer_decay=0.65, drop_path=0.1),
    ('finetune', 'cae', 'L'): dict(epochs=50, batch=4096, lr=2e-3,
                                   layer_decay=0.75, drop_path=0.2),
    # BootMAE scripts/finetune: warmup 20 (B) / 5 (L), layer decay 0.6 (B)
    # (the paper's table says 0.65; the script sets 0.6), model EMA 0.9998.
    ('finetune', 'bootmae', 'B'): dict(epochs=100, batch=2048, lr=5e-3,
                                       layer_decay=0.6, drop_path=0.1,
                                       warmup=20),
    ('finetune', 'bootmae', 'L'): dict(epochs=50, batch=1024, lr=1.5e-3,
                                       layer_decay=0.75, drop_path=0.1),
    # Linear probes: LARS, blr 0.1, batch 16384, warmup 10, wd 0.
    ('linprobe', 'mae', 'B'): dict(epochs=90, batch=16384, blr=0.1),
    ('linprobe', 'mae', 'L'): dict(epochs=50, batch=16384, blr=0.1),
    ('linprobe', 'mae', 'H'): dict(epochs=50, batch=16384, blr=0.1),
    ('linprobe', 'cae', 'B'): dict(epochs=90, batch=16384, blr=0.1),
    ('linprobe', 'cae', 'L'): dict(epochs=90, batch=16384, blr=0.1),
    # BootMAE scripts/linear: average pool of block 10 (B; the README's
    # example says 9, the script 10) / 18 (L) in 1-based counting of the
    # official `--depth`, i.e. the output of 0-based block 9 / 17.
    ('linprobe', 'bootmae', 'B'): dict(epochs=90, batch=16384, blr=0.1,
                                       feature_block=9),
    ('linprobe', 'bootmae', 'L'): dict(epochs=50, batch=16384, blr=0.07,
                                       feature_block=17),
    # CAE attentive probe: SGD momentum 0.9, lr 0.4, batch 8192, 90 epochs.
    ('attnprobe', 'cae', 'B'): dict(epochs=90, batch=8192, lr=0.4),
    ('attnprobe', 'cae', 'L'): dict(epochs=90, batch=8192, lr=0.4),
}
SIZES = {'B': 'B/16', 'L': 'L/16', 'H': 'H/14'}
# Input normalisation of each method's pipeline (BootMAE: 0.5 / 0.5).
NORMALISATION = {
    'mae': (config_lib.IMAGENET_MEAN, config_lib.IMAGENET_STD),
    'cae': (config_lib.IMAGENET_MEAN, config_lib.IMAGENET_STD),
    'bootmae': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _model(method: str, variant, encoder: dict) -> dict:
  enc = dict(ENCODERS[method])
  enc.update(encoder)
  return dict(variant=variant, encoder=enc, num_classes=1000, pool='avg',
              head='linear', feature_block=None, freeze_encoder=False,
              head_init_std=2e-5, scan=False, remat_policy='none',
              dtype='float32')


def get_config(task: str, method: str, size: str = 'B'):
  """The recipe of `task` for `method`'s encoder at `size` ('B', 'L', 'H',
  or 'tiny': the digits run on the embedded data).

  Raises:
    ValueError: an unknown combination (lists the known ones).
  """
  if task not in TASKS or method not in ENCODERS:
    raise ValueError(f'Unknown task/method {task!r}/{method!r}: tasks '
                     f'{TASKS}, methods {sorted(ENCODERS)}.')
  key = ('finetune' if task == 'eval' else task, method, size)
  if size != 'tiny' and key not in RECIPES:
    raise ValueError(f'No official {task} recipe for {method} ViT-{size}; '
                     f'known: {sorted(RECIPES)}.')
  r = dict(RECIPES.get(key, {}))
  c = config_lib.base_config()
  c.model_name = 'classifier'
  c.task = task
  # The pretraining method of `init_from` files (its encoder's key layout).
  c.init_method = method
  c.model = _model(method, SIZES.get(size), {})
  c.model.encoder.drop_path_rate = r.get('drop_path', 0.0)
  mean, std = NORMALISATION[method]
  c.input.mean, c.input.std = mean, std
  c.input.update(crop_scale=(0.08, 1.0), randaugment=placeholder(str),
                 random_erasing=dict(prob=0.0, mode='pixel', max_count=1))
  c.mixup = dict(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5,
                 prob=1.0)
  c.loss = dict(label_smoothing=0.0)
  # bad_images: an undecodable file of an eval folder stops the run before
  # it starts ('error') or is left out of the counts ('drop').
  c.eval = dict(data=placeholder(str), split='validation', batch_size=1024,
                every_steps=placeholder(int), crop_pct=0.875,
                best_metric='top1', use_ema=False, bad_images='error')
  c.eval_only = task == 'eval'
  c.input.batch_size = r.get('batch', 1024)
  c.total_epochs = float(r.get('epochs', 100))
  c.warmup_epochs = float(r.get('warmup', 10 if 'probe' in task else 5))
  if 'lr' in r:
    c.lr = r['lr']
  c.base_lr = r.get('blr', 1e-3)
  c.schedule = dict(min_lr=0.0, warmup='linear')
  c.vis_every_steps = 10**9
  c.ckpt_every_steps = 1000
  if task in ('finetune', 'eval'):
    _finetune(c, method, r)
  else:
    _probe(c, task, r)
  if size == 'tiny':
    _tiny(c, task)
  if c.optim.get('layer_decay'):
    c.optim.num_layers = _depth(c)
  return c


def _depth(c) -> int:
  return vit.encoder_fields(c.model.variant, c.model.encoder)['depth']


def _finetune(c, method: str, r: dict):
  """AdamW (0.9, 0.999), wd 0.05 except 1-D params, pos_embed and
  cls_token (timm `no_weight_decay`), layer decay, min_lr 1e-6; RandAugment
  rand-m9-mstd0.5-inc1 (not CAE: its scripts leave `--aa` empty),
  smoothing 0.1, mixup 0.8 / cutmix 1.0 (switch 0.5), random erasing 0.25
  (pixel mode, one box), global average pool + fc_norm."""
  c.optim.update(b2=0.999, weight_decay=0.05,
                 wd_exclude=optim.NO_DECAY + ('pos_embed', 'cls_token'))
  c.optim.layer_decay = r.get('layer_decay', 0.75)
  c.schedule.min_lr = 1e-6
  if method != 'cae':
    c.input.randaugment = 'rand-m9-mstd0.5-inc1'
  c.input.random_erasing.prob = 0.25
  c.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0)
  c.loss.label_smoothing = 0.1
  if method == 'bootmae':
    # BootMAE fine-tunes with a model EMA (timm ModelEma, 0.9998), and
    # evaluates it.
    c.ema = dict(momentum=(0.9998,), boundary_steps=(0,))
    c.eval.use_ema = True


def _probe(c, task: str, r: dict):
  """Frozen encoder; BatchNorm (no affine) + linear head; RandomResizedCrop
  + flip only. Linear probe: LARS (momentum 0.9, trust 0.001), wd 0, the
  cls token (MAE ViT-B, CAE) or an intermediate block's average (BootMAE).
  Attentive probe: a cross-attention block with a learned query, SGD."""
  c.model.freeze_encoder = True
  c.model.encoder.drop_path_rate = 0.0
  c.optim = dict(name='lars' if task == 'linprobe' else 'sgd',
                 momentum=0.9, weight_decay=0.0,
                 # fc_norm too: MAE / BootMAE probes train the head only
                 # (a global-pool probe's fc_norm stays at its init).
                 freeze=('^encoder/', '^fc_norm/'),
                 grad_clip_norm=placeholder(float))
  if task == 'linprobe':
    c.optim.trust_coefficient = 0.001   # LARS's; SGD takes no such field
  c.model.head_init_std = 0.01
  if task == 'linprobe':
    if c.model.encoder.get('rel_pos_bias'):
      # CAE's linear probe runs without it (scripts/cae_base_800e.sh passes
      # --disable_rel_pos_bias to tools/run_linear.py); its attentive probe
      # keeps run_attentive.py's default (zeros, frozen).
      c.model.encoder.rel_pos_bias = False
    c.model.head = 'bn_linear'
    block = r.get('feature_block')
    c.model.pool = 'avg' if block is not None else 'cls'
    c.model.feature_block = block
  else:
    c.model.head = 'attentive'
    c.model.pool = 'cls'


def _tiny(c, task: str):
  """The digits run: scikit-learn's handwritten digits (embedded, 32 px),
  a tiny encoder (config_lib.TINY_ENCODER), short schedules on the CPU."""
  c.model.variant = None
  c.model.encoder.update(config_lib.TINY_ENCODER)
  c.model.num_classes = 10
  c.input.update(data='embedded:digits', split='train', image_size=32,
                 num_train_examples=899, shuffle_buffer=1000)
  c.input.batch_size = 64 if task == 'finetune' else 128
  c.input.crop_scale = (0.35, 1.0)
  c.input.hflip = False         # digits are not mirror-symmetric
  c.input.randaugment = None
  c.eval.update(data='embedded:digits', split='test', batch_size=128,
                crop_pct=1.0, every_steps=200)
  # LARS scales each matrix's step by 0.001 |w| / |g|: the probe needs
  # MAE's absolute lr (6.4) even at this batch.
  c.lr = 6.4 if 'probe' in task else 1e-3
  c.total_epochs = None
  c.warmup_epochs = None
  c.total_steps = 600
  c.warmup_steps = 60
  c.log_every_steps = 50
  c.ckpt_every_steps = 600
  c.mixup.update(mixup_alpha=0.0, cutmix_alpha=0.0)
  c.input.random_erasing.prob = 0.0
  if task == 'eval':
    c.total_steps = 1
    c.warmup_steps = 0

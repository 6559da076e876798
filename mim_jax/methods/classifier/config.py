"""Recipes of the evaluation tasks: fine-tuning, linear probe, attentive
probe and evaluation-only, on the encoder of any pretraining method that
declares a classifier card (`Method.classifier`, a
`mim_jax.method.EncoderCard`, in mim_jax/methods/<m>/finetune.py).

The card gives the method's fine-tuning encoder fields, its input
normalisation and its official recipes (the official scripts' numbers,
methods.md: MAE 2.3-2.4, CAE 3.3-3.4, BootMAE 4.4-4.5); this file gives
what every method shares. `get_config(task, method, size)` builds one;
`configs/{task}_{method}_vit{b,l,h}.py` pick them. Nothing here names a
pretraining method: a new one is fine-tuned once it declares its card.
"""

from ml_collections.config_dict import placeholder

from mim_jax import config_lib
from mim_jax import errors
from mim_jax import method as method_lib
from mim_jax import methods
from mim_jax import optim
from mim_jax.models import vit

TASKS = method_lib.RECIPE_TASKS + ('eval',)
SIZES = {'B': 'B/16', 'L': 'L/16', 'H': 'H/14'}


def card_of(method: str) -> method_lib.EncoderCard:
  """The classifier card of the registered method `method`.

  Raises:
    ValueError: an unknown method, or one that declares no card.
  """
  card = methods.get(method).classifier
  if card is None:
    raise errors.ConfigError(
        f'method {method!r} declares no classifier card (Method.classifier, '
        'a mim_jax.method.EncoderCard), so it has no fine-tuning or probe '
        'recipe; declare one in its package (see mim_jax/methods/mae/'
        'finetune.py).')
  return card


def _model(card: method_lib.EncoderCard, variant) -> dict:
  return dict(variant=variant, encoder=dict(card.encoder), num_classes=1000,
              pool='avg', head='linear', feature_block=None,
              freeze_encoder=False, head_init_std=2e-5, scan=True,
              remat_policy='linears', dtype='bfloat16')


def get_config(task: str, method: str, size: str = 'B'):
  """The recipe of `task` for `method`'s encoder at `size` ('B', 'L', 'H',
  or 'tiny': the digits run on the embedded data).

  Raises:
    ValueError: an unknown task, a method without a classifier card, or no
      official recipe for the combination (lists the known ones).
  """
  if task not in TASKS:
    raise errors.ConfigError(f'Unknown task {task!r}: use one of {TASKS}.')
  card = card_of(method)
  key = ('finetune' if task == 'eval' else task, size)
  if size != 'tiny' and key not in card.recipes:
    raise errors.ConfigError(
        f'No official {task} recipe for {method} ViT-{size}; '
        f'known (task, size): {sorted(card.recipes)}.')
  r = card.recipes.get(key, method_lib.Recipe())
  c = config_lib.base_config()
  c.model_name = 'classifier'
  c.task = task
  # The pretraining method of `init_from` files (its encoder's key layout).
  c.init_method = method
  c.model = _model(card, SIZES.get(size))
  c.model.encoder.drop_path_rate = r.drop_path
  c.input.mean, c.input.std = card.mean, card.std
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
  c.input.batch_size = r.batch
  c.total_epochs = float(r.epochs)
  warmup = r.warmup if r.warmup is not None else (
      10 if 'probe' in task else 5)
  c.warmup_epochs = float(warmup)
  if r.lr is not None:
    c.lr = r.lr
  c.base_lr = r.blr
  c.schedule = dict(min_lr=0.0, warmup='linear')
  c.vis_every_steps = 10**9
  c.ckpt_every_steps = 1000
  if task in ('finetune', 'eval'):
    _finetune(c, card, r)
  else:
    _probe(c, task, r)
  if size == 'tiny':
    _tiny(c, task)
  if c.optim.get('layer_decay'):
    c.optim.num_layers = _depth(c)
  return c


def _depth(c) -> int:
  return vit.encoder_fields(c.model.variant, c.model.encoder)['depth']


def _finetune(c, card: method_lib.EncoderCard, r: method_lib.Recipe):
  """AdamW (0.9, 0.999), wd 0.05 except 1-D params, pos_embed and
  cls_token (timm `no_weight_decay`), layer decay, min_lr 1e-6; the card's
  RandAugment policy, smoothing 0.1, mixup 0.8 / cutmix 1.0 (switch 0.5),
  random erasing 0.25 (pixel mode, one box), global average pool +
  fc_norm; with the card's `finetune_ema`, a weights EMA that is also
  evaluated."""
  c.optim.update(b2=0.999, weight_decay=0.05,
                 wd_exclude=optim.NO_DECAY + ('pos_embed', 'cls_token'))
  c.optim.layer_decay = r.layer_decay
  c.schedule.min_lr = 1e-6
  if card.randaugment is not None:
    c.input.randaugment = card.randaugment
  c.input.random_erasing.prob = 0.25
  c.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0)
  c.loss.label_smoothing = 0.1
  if card.finetune_ema is not None:
    c.ema = dict(momentum=(card.finetune_ema,), boundary_steps=(0,))
    c.eval.use_ema = True


def _probe(c, task: str, r: method_lib.Recipe):
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
    block = r.feature_block
    c.model.pool = 'avg' if block is not None else 'cls'
    c.model.feature_block = block
  else:
    c.model.head = 'attentive'
    c.model.pool = 'cls'


def _tiny(c, task: str):
  """The digits run: scikit-learn's handwritten digits (embedded, 32 px),
  a tiny encoder (config_lib.TINY_ENCODER), short schedules on the CPU."""
  c.model.variant = None
  c.model.update(scan=False, remat_policy='none')
  c.model.encoder.update(config_lib.TINY_ENCODER)
  c.model.num_classes = 10
  c.model.dtype = 'float32'     # CPU runs and tests (recipes: bfloat16)
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

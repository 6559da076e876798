"""The evaluation task as one `Method` record with a labelled pipeline: a
ViT classifier for fine-tuning, linear and attentive probes and
evaluation-only runs, on the encoder of any pretraining method.

Files: model.py (encoder + pooling + head), loss.py (soft-target
cross-entropy, top-1/top-5), convert.py (timm / MAE / BEiT fine-tuned and
probe layouts), config.py (the recipes, from each method's
`Method.classifier` card).

It starts from a pretrained encoder (`LabelledTask`): a pretraining
workdir gives its `params['encoder']`, copied as is
(`from_encoder_params`); an official file gives its encoder in timm key
names (`EncoderCard.key_prefix` stripped), converted (`from_encoder`). The
pretraining method itself is never named.
"""

import functools
import re

from mim_jax import errors
from mim_jax import method
from mim_jax import mixup
from mim_jax.convert import core
from mim_jax.methods.classifier import convert
from mim_jax.methods.classifier import loss
from mim_jax.methods.classifier import model
from mim_jax.models import vit

POOLS = ('avg', 'cls')
HEADS = ('linear', 'bn_linear', 'attentive')
# What the best checkpoint may follow (eval/<name>; ema_*: the weights EMA).
BEST_METRICS = ('top1', 'top5', 'ema_top1', 'ema_top5')


def batch_spec(config, batch_size: int) -> dict:
  """Images and their class labels, and the random-erasing boxes when
  input.random_erasing.prob is set."""
  erasing = config.input.get('random_erasing') or {}
  keys = ('image', 'label') + (('erase',) if erasing.get('prob') else ())
  return method.image_batch(config, batch_size,
                            vit.patch_size_of(config.model), keys)


def batch_transform(config):
  """Mixup / cutmix with label smoothing on the devices (timm `Mixup`,
  'batch' mode), when `config.mixup` enables either; None otherwise."""
  mc = config.get('mixup') or {}
  if not (mc.get('mixup_alpha') or mc.get('cutmix_alpha')):
    return None
  kw = dict(mixup_alpha=float(mc.get('mixup_alpha', 0.0)),
            cutmix_alpha=float(mc.get('cutmix_alpha', 0.0)),
            switch_prob=float(mc.get('switch_prob', 0.5)),
            prob=float(mc.get('prob', 1.0)),
            smoothing=float(config.loss.get('label_smoothing', 0.0)),
            num_classes=int(config.model.num_classes))

  def transform(batch, rng):
    images, targets, _ = mixup.mix(rng, batch['image'], batch['label'], **kw)
    return dict(batch, image=images, targets=targets)

  return transform


def _keep_average(state, batch):
  del state, batch
  return {}


def targets(config):
  """The weights EMA (timm ModelEma, e.g. BootMAE's 0.9998) when
  `config.ema` is set: a copy of every param, evaluated beside them."""
  if not config.get('ema'):
    return ()
  return (method.TargetProvider(
      name='weights_ema', kind='ema', compute=_keep_average, outputs=(),
      init=lambda params: params),)


# Encoder params a pretraining file may lack, kept freshly initialised: the
# learned position embedding (from the sin-cos table), layer-scale gammas
# (BEiT-style fine-tuning of an encoder pretrained without layer scale:
# BEiT's `layer_scale_init_value`) and the per-block relative position bias
# tables (zeros, as BEiT / CAE fine-tuning starts them: CAE pretrains
# without one).
_FRESH = re.compile(
    r'^pos_embed$|\.gamma_[12]$|\.attn\.relative_position_bias_table$')
# The same as paths in a workdir's params['encoder']; a learned pos_embed
# needs no entry: `vit.load_encoder` starts it from the pretraining table.
_FRESH_PARAMS = re.compile(
    r'/gamma_[12]$|/attn/relative_position_bias_table$')


def from_encoder(encoder_sd, flax_model, params, image_size: int):
  """Loads a pretrained encoder (timm key names; timm's own layer-scale
  and qkv-bias names too: `convert.from_timm_names`) into the classifier's
  `params`; the head, fc_norm and the encoder params in `_FRESH` that the
  file lacks keep their fresh values.

  Raises:
    core.ConversionError: encoder keys of another architecture (unknown or
      mis-shaped), or encoder params the file lacks.
  """
  sd = convert.from_timm_names(encoder_sd, flax_model)
  if not flax_model.encoder_fields()['final_norm']:
    # Global-pool classifiers drop the pretraining final norm (MAE
    # `main_finetune.py`: fc_norm replaces it, freshly initialised).
    sd = {k: v for k, v in sd.items() if not k.startswith('norm.')}
  loaded = convert.to_flax(sd, flax_model, params, image_size, strict=False)
  wanted = set(convert.to_torch_keys({'encoder': params['encoder']}))
  missing = sorted(k for k in wanted - set(sd) if not _FRESH.search(k))
  if missing:
    raise core.ConversionError(
        f'the pretrained encoder lacks {len(missing)} params of this '
        f'classifier: {missing[:12]}. Its depth, width or block type '
        'differs from config.model; match the variant / encoder fields to '
        'the pretraining run.')
  return loaded


def from_encoder_params(encoder, fields, flax_model, params):
  """Loads a pretraining run's `params['encoder']` (of vit.Encoder
  `fields`) into the classifier's `params`, as is: only the params in
  `_FRESH_PARAMS` that it lacks keep their fresh values (a learned position
  embedding starts from the pretraining sin-cos table), and a global-pool
  classifier drops its final norm (fc_norm replaces it).

  Raises:
    ValueError: naming the params that are missing, extra or mis-shaped.
  """
  loaded = vit.load_encoder(encoder, fields, params['encoder'],
                            flax_model.encoder_fields(),
                            fresh=_FRESH_PARAMS)
  return dict(params, encoder=loaded)


def validate_config(config):
  """Checks pooling, head, feature block and class count before building.

  Raises:
    ValueError naming the field and the fix.
  """
  mc = config.model
  if mc.get('pool', 'avg') not in POOLS:
    raise errors.ConfigError(f'model.pool={mc.pool!r}; use one of {POOLS}.')
  if mc.get('head', 'linear') not in HEADS:
    raise errors.ConfigError(f'model.head={mc.head!r}; use one of {HEADS}.')
  if int(mc.get('num_classes') or 0) < 1:
    raise errors.ConfigError(
        'model.num_classes must be set to the data set\'s '
        'number of classes.')
  best = (config.get('eval') or {}).get('best_metric', 'top1')
  if best not in BEST_METRICS:
    raise errors.ConfigError(
        f'eval.best_metric={best!r}; use one of {BEST_METRICS} '
        '(accuracies: the best checkpoint is the highest).')
  depth = vit.encoder_fields(mc.get('variant'), mc.get('encoder'))['depth']
  block = mc.get('feature_block')
  if block is not None and not 0 <= int(block) < depth:
    raise errors.ConfigError(
        f'model.feature_block={block} is beyond the encoder\'s {depth} '
        f'blocks: use a 0-based index in 0..{depth - 1} (BootMAE\'s '
        '`--depth 10` is feature_block=9).')


METHOD = method.Method(
    name='classifier',
    build_model=functools.partial(method.model_from_config, model.Model),
    batch_spec=batch_spec,
    loss=loss.loss_fn,
    to_pixels=None,
    converter=method.Converter(to_flax=convert.to_flax,
                               to_torch=convert.to_torch,
                               to_torch_keys=convert.to_torch_keys),
    targets=targets,
    validate_config=validate_config,
    pipeline='labelled',
    labelled=method.LabelledTask(
        eval_metrics=loss.eval_metrics,
        from_encoder=from_encoder,
        from_encoder_params=from_encoder_params,
        batch_transform=batch_transform))

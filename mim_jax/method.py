"""The method contract: everything generic code may know about a method.

A MIM method is one package, `mim_jax/methods/<name>/`, whose `__init__.py`
exports `METHOD = Method(...)`; `mim_jax.methods.get(name)` is the only way
generic code reaches it (an explicit registry, read in one place). The
trainer, the step, the planner, the visualiser, the conversion and parity
tools read the fields of these records and nothing else: no hook is found by
`getattr`, `hasattr` or `inspect.signature`, so a missing or misspelt field
fails when the method is imported, not silently at run time.

Call conventions (fixed for every method):

  model = method.build_model(config)            # a flax linen Module
  pred, out = model.apply({'params': p}, batch, train=..., rngs=...)
  loss, aux = method.loss(pred, out, batch, step=step, schedule=schedule,
                          **config.loss)
  pixels = method.to_pixels(config, pred, out, batch)   # or None

`batch` holds the arrays of `method.batch_spec(config, batch_size)` plus the
outputs of the method's target providers (under stop_gradient).

Variables of the model other than 'params' (e.g. BatchNorm's 'batch_stats')
live in `TrainState.model_state`; the step applies the model with them
mutable in training and reads them in evaluation.

Two kinds of records share this contract, told apart by two fields:

* pretraining methods (MAE, CAE, BootMAE): `pipeline='masked'` (images and
  masking noise / masks); a method whose encoder can be fine-tuned and
  probed also declares `classifier=EncoderCard(...)`: its fine-tuning
  encoder fields, the key prefix of its encoder in official files, its
  input normalisation and the official recipes. That record alone makes
  `classifier` configs for it (mim_jax/methods/classifier/config.py reads it
  through the registry); nothing in the classifier names the method.
* labelled tasks (the 'classifier': fine-tuning, linear and attentive
  probes, evaluation only): `pipeline='labelled'` (images and class
  labels) and `labelled=LabelledTask(...)`: the evaluation metrics, the
  on-device batch transform (mixup / cutmix), and how a pretrained encoder
  is loaded, from an official file (timm key names) or from a pretraining
  workdir (its `params['encoder']`, copied as is).
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax import errors

Config = ml_collections.ConfigDict

# Keys the input pipeline makes (see input_pipeline.py): uint8 images
# (normalised on the devices, `mim_jax.images`), the masking noise and the
# mask it implies, and (labelled pipelines) the class label and the
# random-erasing boxes.
PIPELINE_KEYS = ('image', 'noise', 'mask', 'label', 'erase')
# Kinds of target providers (see TargetProvider).
PROVIDER_KINDS = ('ema', 'frozen', 'running')
# What the input pipeline makes for a method (`Method.pipeline`): 'masked',
# images with the masking noise and masks of pretraining; 'labelled', images
# with their class labels (fine-tuning, probes).
PIPELINES = ('masked', 'labelled')
# The tasks an `EncoderCard` holds official recipes for (the classifier's
# 'eval' runs the fine-tuned model with the 'finetune' recipe).
RECIPE_TASKS = ('finetune', 'linprobe', 'attnprobe')


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Training lengths a loss may depend on (e.g. a ramped loss weight).

  None when unknown (a forward-only check); a loss that needs a length it
  does not get must raise.
  """
  total_steps: Optional[int] = None
  steps_per_epoch: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class View:
  """A second view of every crop, made by the pipeline: the same crop and
  flip as 'image', resized to `size` x `size` with Lanczos, uint8 (e.g.
  the 112 px input of a dVAE tokenizer)."""
  size: int


@dataclasses.dataclass(frozen=True)
class TargetProvider:
  """A target network or statistic; it runs inside the jitted train step.

  kind:
    'ema': a momentum copy of (part of) the online params. Its state is
      `TrainState.ema_params` (sharded like the params, checkpointed); the
      step updates it after the optimizer update with the momentum schedule
      of `config.ema` (optim.ema_momentum_schedule). A method has at most
      one.
    'frozen': weights read from a file at every start (e.g. the DALL-E
      tokenizer); replicated on the mesh, passed to the step as an
      argument, never written into checkpoints (the file is the source).
    'running': a statistic updated by the step (e.g. population statistics
      of the targets); its state is `TrainState.target_state[name]`,
      checkpointed.

  Attributes:
    name: unique within the method.
    kind: one of PROVIDER_KINDS.
    compute: (state, batch) -> {key: target}; the step adds these to the
      batch under stop_gradient before the model runs.
    outputs: the keys `compute` adds.
    init: 'ema' and 'running': params -> initial state (traced, inside the
      sharded state creation); 'frozen': config -> host arrays (reads the
      file).
    abstract: 'frozen' only: config -> ShapeDtypeStructs of the weights,
      without reading the file (planning, compiling ahead of time).
    update: 'running' only: (state, batch, step) -> new state.
  """
  name: str
  kind: str
  compute: Callable[[Any, dict], dict]
  outputs: tuple[str, ...]
  init: Callable[..., Any]
  abstract: Optional[Callable[[Config], Any]] = None
  update: Optional[Callable[[Any, dict, Any], Any]] = None

  def __post_init__(self):
    if self.kind not in PROVIDER_KINDS:
      raise TypeError(f'target provider {self.name!r}: kind {self.kind!r} '
                      f'is not one of {PROVIDER_KINDS}.')
    if (self.kind == 'frozen') != (self.abstract is not None):
      raise TypeError(f'target provider {self.name!r}: `abstract` is '
                      "required for kind 'frozen' and only for it.")
    if (self.kind == 'running') != (self.update is not None):
      raise TypeError(f'target provider {self.name!r}: `update` is '
                      "required for kind 'running' and only for it.")
    if not self.outputs and self.kind != 'ema':
      # An 'ema' provider may only keep the average (the weights EMA of
      # fine-tuning); any other provider exists for its outputs.
      raise TypeError(f'target provider {self.name!r} lists no outputs.')


@dataclasses.dataclass(frozen=True)
class Converter:
  """PyTorch <-> Flax conversion of the method's official checkpoints.

  Attributes:
    to_flax: (state_dict, model, params, image_size, strict) -> params
      shaped like `params` (arrays, or ShapeDtypeStructs when strict).
    to_torch: (params, model, image_size) -> state dict with the official
      keys, fixed buffers included (loads with strict=True upstream).
    to_torch_keys: any params-shaped tree (gradients, masks) -> {official
      key: array}, without fixed buffers.
    ema_to_flax: methods with an 'ema' provider: (state_dict, model, params,
      image_size) -> the EMA state from the file, or None when it has none.
    ema_to_torch: (ema, model, image_size) -> the official keys of the EMA
      (e.g. `model_ema.*`); `model` may be None (keys only, no buffers).
    to_hf: methods with a 🤗 transformers model of their own (MAE:
      ViTMAEForPreTraining): (config, model, params) -> (config.json,
      state dict); see mim_jax/convert/hf_vit.py.
    from_hf: (config, model, config.json, state dict, where) -> the
      official state dict, the sizes checked against the config.
  """
  to_flax: Callable[..., Any]
  to_torch: Callable[..., dict]
  to_torch_keys: Callable[[Any], dict]
  ema_to_flax: Optional[Callable[..., Any]] = None
  ema_to_torch: Optional[Callable[..., dict]] = None
  to_hf: Optional[Callable[..., tuple]] = None
  from_hf: Optional[Callable[..., dict]] = None

  def __post_init__(self):
    if (self.ema_to_flax is None) != (self.ema_to_torch is None):
      raise TypeError('Converter: give both ema_to_flax and ema_to_torch, '
                      'or neither.')


def _default_curve_reference(fx: dict):
  return fx['curve']['loss'], fx['curve']['lr']


def _default_reference_decay(fx: dict) -> list[str]:
  return [k for g in fx['curve']['param_groups'] if g['weight_decay'] > 0
          for k in g['params']]


@dataclasses.dataclass(frozen=True)
class ParityAdapter:
  """How a fixture folder of official numbers maps onto the method.

  Attributes:
    experiment_config: config.json -> our experiment ConfigDict.
    batch_from_inputs: (inputs.npz arrays, config.json) -> a batch.
    curve_batches: (train_curve.npz arrays, config.json) -> batches.
    forward_outputs: (loss, pred, out, aux) -> {fixture output key: ours}.
    frozen_keys: config.json -> official keys without a gradient.
    zero_gradient_slices: (state_dict, config.json) -> {key: [slices]}
      whose true gradient is zero (compared with an absolute tolerance).
    tx_config: (config.json, train_curve.json, batch_size) -> the optimizer
      and schedule fields of the experiment config.
    curve_reference: fixture -> (losses, lrs) of the official curve.
    reference_decay: fixture -> official keys with weight decay.
    initial_ema: methods with an EMA: (fixture, model, params) -> EMA state.
    exact_outputs: outputs compared for equality.
    curve_terms: loss terms compared step by step besides the loss.
  """
  experiment_config: Callable[[dict], Config]
  batch_from_inputs: Callable[[dict, dict], dict]
  curve_batches: Callable[[dict, dict], list]
  forward_outputs: Callable[..., dict]
  frozen_keys: Callable[[dict], tuple]
  zero_gradient_slices: Callable[[dict, dict], dict]
  tx_config: Callable[[dict, dict, int], dict]
  curve_reference: Callable[[dict], tuple] = _default_curve_reference
  reference_decay: Callable[[dict], list] = _default_reference_decay
  initial_ema: Optional[Callable[..., Any]] = None
  exact_outputs: tuple[str, ...] = ()
  curve_terms: tuple[str, ...] = ()


def _no_views(config: Config) -> dict[str, View]:
  del config
  return {}


def _no_targets(config: Config) -> tuple[TargetProvider, ...]:
  del config
  return ()


def _no_check(config: Config) -> None:
  del config


def _no_transform(config: Config) -> None:
  del config


def _no_rules(config: Config) -> tuple:
  del config
  return ()


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One official fine-tuning or probe recipe of an encoder (the official
  script's values; the classifier's defaults where the script is silent).

  Attributes:
    epochs: training epochs.
    batch: the global batch size.
    blr: base learning rate; the peak is blr * batch / 256 (MAE's rule)
      unless `lr` is set.
    lr: the absolute peak learning rate (CAE, BootMAE scripts), or None.
    layer_decay: layer-wise learning-rate decay (fine-tuning).
    drop_path: the encoder's stochastic depth rate (fine-tuning).
    warmup: warmup epochs; None: 5 for fine-tuning, 10 for probes.
    feature_block: linear probe on the average-pooled output of this
      0-based block (BootMAE) instead of the final cls token; None: the cls
      token.
  """
  epochs: float = 100.0
  batch: int = 1024
  blr: float = 1e-3
  lr: Optional[float] = None
  layer_decay: float = 0.75
  drop_path: float = 0.0
  warmup: Optional[float] = None
  feature_block: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class EncoderCard:
  """What the evaluation task ('classifier': fine-tuning, linear and
  attentive probes) needs from a pretraining method's encoder; declared by
  the method (`Method.classifier`), read by the classifier's recipes
  through the registry.

  Attributes:
    encoder: the vit.Encoder fields of the encoder as the method's official
      fine-tuning code builds it, over those of the size variant (e.g.
      posemb='learned', qkv_bias='qv', layer_scale, rel_pos_bias); the
      pretraining params['encoder'] must load into it, params it adds
      (layer scale, relative position bias) starting fresh.
    key_prefix: where the method's official state dicts keep the encoder
      in timm key names (`cls_token`, `pos_embed`, `patch_embed.proj.*`,
      `blocks.{i}.*`, `norm.*`): '' for MAE and BootMAE, 'encoder.' for
      CAE.
    mean, std: the input normalisation of its pretraining, kept in
      fine-tuning and probes.
    recipes: {(task, size): Recipe}, task one of RECIPE_TASKS, size 'B',
      'L' or 'H' (ViT-B/16, L/16, H/14): the official recipes; the 'tiny'
      size (the digits run) needs none.
    randaugment: the fine-tuning RandAugment policy (timm's string), or
      None for none.
    finetune_ema: momentum of a weights EMA that fine-tuning keeps and
      evaluates (timm ModelEma), or None for none.
  """
  encoder: Mapping[str, Any]
  key_prefix: str
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  recipes: Mapping[tuple[str, str], Recipe] = dataclasses.field(
      default_factory=dict)
  randaugment: Optional[str] = 'rand-m9-mstd0.5-inc1'
  finetune_ema: Optional[float] = None

  def __post_init__(self):
    if len(self.mean) != 3 or len(self.std) != 3:
      raise TypeError('EncoderCard: mean and std take one value per RGB '
                      f'channel, got {self.mean} and {self.std}.')
    for key, recipe in self.recipes.items():
      if (not isinstance(key, tuple) or len(key) != 2 or
          key[0] not in RECIPE_TASKS):
        raise TypeError(f'EncoderCard: recipe key {key!r} is not a (task, '
                        f'size) with task one of {RECIPE_TASKS}.')
      if not isinstance(recipe, Recipe):
        raise TypeError(f'EncoderCard: recipe {key!r} must be a '
                        f'mim_jax.method.Recipe, got {recipe!r:.80}.')


@dataclasses.dataclass(frozen=True)
class LabelledTask:
  """What a task on labelled images adds to the contract (the classifier:
  fine-tuning, probes, evaluation). Its method's pipeline is 'labelled'.

  Attributes:
    eval_metrics: (pred, out, batch) -> {name: (B,) per-example values},
      the metrics of an evaluation pass (averaged over the valid examples).
    from_encoder: (encoder state dict in timm key names, model, params,
      image_size) -> params with the encoder loaded: a pretraining method's
      official file, its `EncoderCard.key_prefix` stripped.
    from_encoder_params: (encoder params, their vit.Encoder fields, model,
      params) -> params with the encoder loaded: a pretraining workdir's
      `params['encoder']`, copied as is (no key names on the way).
    batch_transform: config -> None, or `(batch, rng) -> batch` run on the
      devices inside the jitted train step before the model (e.g. mixup /
      cutmix of fine-tuning); not run in evaluation.
  """
  eval_metrics: Callable[..., dict]
  from_encoder: Callable[..., Any]
  from_encoder_params: Callable[..., Any]
  batch_transform: Callable[[Config], Optional[Callable]] = _no_transform

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if not callable(getattr(self, field.name)):
        raise TypeError(f'LabelledTask: {field.name} must be callable.')


# Method fields that hold values or records, not functions.
_RECORD_FIELDS = ('name', 'converter', 'parity', 'pipeline', 'labelled',
                  'classifier')


@dataclasses.dataclass(frozen=True)
class Method:
  """One MIM method, as the generic code sees it.

  Attributes:
    name: the registry name (`config.model_name`).
    build_model: config -> the flax Module (from `config.model`, and the
      mask ratio from `config_lib.mask_ratio(config)` for models that
      mask).
    batch_spec: (config, batch_size) -> {key: ShapeDtypeStruct} of the
      arrays the model and loss take from the pipeline: keys from
      PIPELINE_KEYS or from `views`. Only these go to the devices. A uint8
      'image' (`image_batch`'s) reaches the model normalised, float32
      (`mim_jax.images.model_batch`); a float one as it is.
    loss: (pred, out, batch, *, step, schedule, **config.loss) -> (loss,
      aux); scalar entries of aux are logged with the loss.
    to_pixels: (config, pred, out, batch) -> (N, L, p*p*C) numpy
      predictions in the input's normalised pixel space, for figures; None
      (the field) when the method never predicts pixels, and a function may
      return None for configs that do not (token targets).
    converter: the official checkpoint conversion.
    parity: the fixture adapter (None: no official fixtures).
    targets: config -> the target providers (see TargetProvider).
    views: config -> {batch key: View}, extra views the pipeline makes.
    validate_config: config -> None; raises ValueError naming the bad value
      and the fix, before anything is built.
    pipeline: what the input pipeline makes, one of PIPELINES: 'masked'
      (pretraining) or 'labelled' (tasks on labelled images).
    labelled: the evaluation side of a labelled task (see LabelledTask);
      None for pretraining methods.
    classifier: pretraining methods whose encoder the classifier can
      fine-tune and probe: its card (see EncoderCard); None otherwise.
    encoder: config -> the vit.Encoder fields of `params['encoder']`, the
      encoder that feature monitoring and the timm export
      (`convert export --format=timm`) rebuild; None when the method has
      no pretrained ViT encoder.
    init_rules: config -> `mim_jax.models.init_rules.Rule`s that redraw
      params after `model.init` as the official code initialises them
      (its post-construction re-init); () keeps the modules' own inits.
  """
  name: str
  build_model: Callable[[Config], Any]
  batch_spec: Callable[[Config, int], dict]
  loss: Callable[..., tuple]
  to_pixels: Optional[Callable[..., Optional[np.ndarray]]]
  converter: Converter
  parity: Optional[ParityAdapter] = None
  targets: Callable[[Config], tuple] = _no_targets
  views: Callable[[Config], dict] = _no_views
  validate_config: Callable[[Config], None] = _no_check
  pipeline: str = 'masked'
  labelled: Optional[LabelledTask] = None
  classifier: Optional[EncoderCard] = None
  encoder: Optional[Callable[[Config], dict]] = None
  init_rules: Callable[[Config], tuple] = _no_rules

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in _RECORD_FIELDS:
        continue
      if value is not None and not callable(value):
        raise TypeError(f'Method {self.name!r}: {field.name} must be '
                        f'callable, got {type(value).__name__}.')
    if not isinstance(self.converter, Converter):
      raise TypeError(f'Method {self.name!r}: converter must be a '
                      'mim_jax.method.Converter.')
    for field, record in (('parity', ParityAdapter),
                          ('labelled', LabelledTask),
                          ('classifier', EncoderCard)):
      value = getattr(self, field)
      if value is not None and not isinstance(value, record):
        raise TypeError(f'Method {self.name!r}: {field} must be a '
                        f'mim_jax.method.{record.__name__} or None.')
    if self.pipeline not in PIPELINES:
      raise TypeError(f'Method {self.name!r}: pipeline={self.pipeline!r} '
                      f'is not one of {PIPELINES}.')
    if self.labelled is not None and self.pipeline != 'labelled':
      raise TypeError(f'Method {self.name!r}: a labelled task needs '
                      "pipeline='labelled'.")

  # The trainer's shorthands for the labelled task (train.py, steps.py),
  # derived from `labelled`, not declared.


def image_batch(config: Config, batch_size: int, patch_size: int,
                keys: tuple[str, ...],
                views: Mapping[str, View] = None) -> dict:
  """ShapeDtypeStructs of pipeline arrays: 'image' uint8 (B, H, W, 3)
  (the steps normalise it on the devices), 'noise' / 'mask' float32
  (B, L), 'label' int32 (B,), 'erase' int32 (B, K, 4) (K =
  input.random_erasing.max_count), and uint8 (B, S, S, 3) views."""
  size = int(config.input.image_size)
  num_patches = (size // patch_size) ** 2
  erasing = config.input.get('random_erasing') or {}
  shapes = {
      'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), np.uint8),
      'erase': jax.ShapeDtypeStruct(
          (batch_size, int(erasing.get('max_count', 1)), 4), np.int32),
      'noise': jax.ShapeDtypeStruct((batch_size, num_patches), np.float32),
      'mask': jax.ShapeDtypeStruct((batch_size, num_patches), np.float32),
      'label': jax.ShapeDtypeStruct((batch_size,), np.int32)}
  out = {k: shapes[k] for k in keys}
  for k, view in (views or {}).items():
    out[k] = jax.ShapeDtypeStruct((batch_size, view.size, view.size, 3),
                                  np.uint8)
  return out


# The compute dtypes of `config.model.dtype`. Params, optimizer state, the
# softmax, LayerNorm statistics and the losses stay float32 whichever it is
# (docs/training.md, "Precision").
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')


def compute_dtype(value) -> jnp.dtype:
  """`config.model.dtype` (a name such as 'bfloat16') as a jnp dtype.

  Raises:
    errors.ConfigError: not one of COMPUTE_DTYPES.
  """
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in COMPUTE_DTYPES:
    raise errors.ConfigError(
        f'model.dtype={value!r} is not a compute dtype: use one of '
        f'{COMPUTE_DTYPES} (e.g. --config.model.dtype=bfloat16; params '
        'stay float32 either way).')
  return dtype


def model_from_config(factory: Callable[..., Any], config: Config,
                      **fields):
  """`factory(**config.model, **fields)` with the dtype string made a jnp
  dtype, and a message naming the bad key when config.model does not fit.

  `fields` are model fields the method takes from elsewhere in the config
  (e.g. `mask_ratio=config_lib.mask_ratio(config)`, from
  input.mask.ratio); config.model must not set them too.
  """
  kw = config.model.to_dict()
  twice = sorted(set(kw) & set(fields))
  if twice:
    raise errors.ConfigError(
        f'config.model.{twice[0]} is not a config.model field: '
        f'{config.model_name}\'s build_model sets the model\'s {twice[0]} '
        'from another field of the config (config_lib.REMOVED_FIELDS names '
        'it). Remove it from config.model.')
  kw.update(fields)
  if 'dtype' in kw:
    kw['dtype'] = compute_dtype(kw['dtype'])
  try:
    return factory(**kw)
  except TypeError as e:
    raise errors.ConfigError(
        f'config.model does not fit model {config.model_name!r}: {e}. Remove '
        'or rename the key; the fields are those of the model in '
        f'mim_jax/methods/{config.model_name}/model.py.') from e

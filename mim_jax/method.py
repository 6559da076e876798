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

Besides the MIM methods, the registry holds the evaluation task
('classifier': fine-tuning and probes), which starts from any method's
encoder: a method's official state dict holds its encoder's timm-layout keys
under `Converter.encoder_prefix`, and `Method.from_encoder` of the task loads
them.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Config = ml_collections.ConfigDict

# Keys the input pipeline makes (see input_pipeline.py): normalised images,
# the masking noise and the mask it implies, and (labelled pipelines) the
# class label.
PIPELINE_KEYS = ('image', 'noise', 'mask', 'label')
# Kinds of target providers (see TargetProvider).
PROVIDER_KINDS = ('ema', 'frozen', 'running')


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
    encoder_prefix: where the official state dict keeps its ViT encoder in
      timm key names (`cls_token`, `pos_embed`, `patch_embed.proj.*`,
      `blocks.{i}.*`, `norm.*`): '' for MAE and BootMAE, 'encoder.' for
      CAE; None when it has no transferable encoder.
  """
  to_flax: Callable[..., Any]
  to_torch: Callable[..., dict]
  to_torch_keys: Callable[[Any], dict]
  ema_to_flax: Optional[Callable[..., Any]] = None
  ema_to_torch: Optional[Callable[..., dict]] = None
  encoder_prefix: Optional[str] = None

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
class Method:
  """One MIM method, as the generic code sees it.

  Attributes:
    name: the registry name (`config.model_name`).
    build_model: config -> the flax Module (from `config.model`, and the
      mask ratio from `config_lib.mask_ratio(config)` for models that
      mask).
    batch_spec: (config, batch_size) -> {key: ShapeDtypeStruct} of the
      arrays the model and loss take from the pipeline: keys from
      PIPELINE_KEYS or from `views`. Only these go to the devices.
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
    batch_transform: config -> None, or `(batch, rng) -> batch` run on the
      devices inside the jitted train step before the model (e.g. mixup /
      cutmix of fine-tuning); not run in evaluation.
    eval_metrics: (pred, out, batch) -> {name: (B,) per-example values}, the
      metrics of an evaluation pass (averaged over the valid examples);
      None when the method has no evaluation split.
    from_encoder: tasks that start from a pretrained encoder: (encoder
      state dict in timm keys, model, params, image_size) -> params with
      the encoder loaded; None for methods that only load their own files.
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
  batch_transform: Callable[[Config], Optional[Callable]] = _no_transform
  eval_metrics: Optional[Callable[..., dict]] = None
  from_encoder: Optional[Callable[..., Any]] = None
  encoder: Optional[Callable[[Config], dict]] = None
  init_rules: Callable[[Config], tuple] = _no_rules

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in ('name', 'converter', 'parity'):
        continue
      if value is not None and not callable(value):
        raise TypeError(f'Method {self.name!r}: {field.name} must be '
                        f'callable, got {type(value).__name__}.')
    if not isinstance(self.converter, Converter):
      raise TypeError(f'Method {self.name!r}: converter must be a '
                      'mim_jax.method.Converter.')
    if self.parity is not None and not isinstance(self.parity,
                                                  ParityAdapter):
      raise TypeError(f'Method {self.name!r}: parity must be a '
                      'mim_jax.method.ParityAdapter or None.')

  def providers(self, config: Config) -> tuple[TargetProvider, ...]:
    """The config's target providers, checked: unique names, one EMA."""
    providers = tuple(self.targets(config))
    names = [p.name for p in providers]
    if len(set(names)) != len(names):
      raise TypeError(f'Method {self.name!r}: target provider names repeat: '
                      f'{names}.')
    if sum(p.kind == 'ema' for p in providers) > 1:
      raise TypeError(f'Method {self.name!r}: at most one ema provider (its '
                      'state is TrainState.ema_params).')
    return providers

  def ema_provider(self, config: Config) -> Optional[TargetProvider]:
    return next((p for p in self.providers(config) if p.kind == 'ema'),
                None)


def image_batch(config: Config, batch_size: int, patch_size: int,
                keys: tuple[str, ...],
                views: Mapping[str, View] = None) -> dict:
  """ShapeDtypeStructs of pipeline arrays: 'image' float32 (B, H, W, 3),
  'noise' / 'mask' float32 (B, L), 'label' int32 (B,), and uint8
  (B, S, S, 3) views."""
  size = int(config.input.image_size)
  num_patches = (size // patch_size) ** 2
  shapes = {
      'image': jax.ShapeDtypeStruct((batch_size, size, size, 3), np.float32),
      'noise': jax.ShapeDtypeStruct((batch_size, num_patches), np.float32),
      'mask': jax.ShapeDtypeStruct((batch_size, num_patches), np.float32),
      'label': jax.ShapeDtypeStruct((batch_size,), np.int32)}
  out = {k: shapes[k] for k in keys}
  for k, view in (views or {}).items():
    out[k] = jax.ShapeDtypeStruct((batch_size, view.size, view.size, 3),
                                  np.uint8)
  return out


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
    raise ValueError(
        f'config.model.{twice[0]} is not a config.model field: '
        f'{config.model_name}\'s build_model sets the model\'s {twice[0]} '
        'from another field of the config (config_lib.REMOVED_FIELDS names '
        'it). Remove it from config.model.')
  kw.update(fields)
  if 'dtype' in kw:
    kw['dtype'] = jnp.dtype(kw['dtype'])
  try:
    return factory(**kw)
  except TypeError as e:
    raise ValueError(
        f'config.model does not fit model {config.model_name!r}: {e}. Remove '
        'or rename the key; the fields are those of the model in '
        f'mim_jax/methods/{config.model_name}/model.py.') from e

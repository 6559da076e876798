"""Getting params in and out: official PyTorch files and our checkpoints.

One place for what the trainer (`config.init_from`), the conversion tool and
the reconstruction visualiser share; the key names and layouts come from the
method's converter (`Method.converter`).
"""

import json
import os
import re
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util
import tensorflow as tf

from mim_jax import checkpoint
from mim_jax import config_lib
from mim_jax import errors
from mim_jax import experiment
from mim_jax import methods
from mim_jax import sharding
from mim_jax import state as state_lib
from mim_jax.convert import core
from mim_jax.convert import hf_vit
from mim_jax.convert import timm_vit
from mim_jax.models import vit

# The timm key names of a ViT encoder (what `EncoderCard.key_prefix`
# points at): everything else in a pretraining file (decoders, mask
# tokens, momentum copies) is not part of the encoder.
_ENCODER_KEY = re.compile(r'(cls_token|pos_embed|patch_embed\.|blocks\.\d+\.'
                          r'|norm\.)')
# config.init_method of a timm VisionTransformer state dict.
TIMM = 'timm'


def from_torch(config, model, path: str, strict: bool = True,
               state_dict: Optional[dict] = None):
  """Params from an official state dict (.pth/.pt/.npz/.safetensors) or a
  🤗 transformers folder of the method's model (`hf_state_dict`).

  With strict=False, params missing from the file (the decoder of the
  released encoder-only MAE checkpoints) keep a fresh initialisation.
  `state_dict`: the file's contents when already loaded.
  """
  if state_dict is None and hf_vit.is_folder(path):
    state_dict = hf_state_dict(config, model, path)
  shapes = experiment.batch_spec(config, 1)
  init = lambda: state_lib.init_params(model, shapes, config.seed,
                                   experiment.init_rules_of(config))
  target = jax.eval_shape(init) if strict else init()
  sd = core.load_state_dict(path) if state_dict is None else state_dict
  logging.info('Loading %d tensors from %s.', len(sd), path)
  return experiment.method_of(config).converter.to_flax(
      sd, model, target, config.input.image_size, strict=strict)


def ema_from_torch(config, model, path: str, params):
  """The EMA target of an official file (BootMAE `model_ema.*`), or None
  when the method has none or the file lacks it."""
  conv = experiment.method_of(config).converter
  if conv.ema_to_flax is None or hf_vit.is_folder(path):
    return None
  return conv.ema_to_flax(core.load_state_dict(path), model, params,
                          config.input.image_size)


def state_from_workdir(config, model, workdir: str,
                       step: Optional[int] = None):
  """(TrainState, step) of a training run's checkpoint (latest default)."""
  mesh = sharding.make_mesh([('data', -1)])
  abstract = state_lib.create_train_state(
      config, model, mesh, experiment.batch_spec(config, 1),
      materialize=False)[0]
  mgr = checkpoint.make_manager(workdir, keep=10**6, async_save=False)
  state, step = checkpoint.restore_latest(mgr, abstract, step)
  if state is None:
    raise errors.WorkdirError(
        f'No checkpoint in {workdir}/checkpoints: train first, '
        'or pass a PyTorch checkpoint instead.')
  return jax.device_get(state), step


def from_workdir(config, model, workdir: str, step: Optional[int] = None):
  """(params, step) of a training run's checkpoint (latest by default)."""
  state, step = state_from_workdir(config, model, workdir, step)
  return state.params, step


def to_torch(config, model, params, ema=None) -> dict[str, np.ndarray]:
  """params (and the EMA target, for methods that have one) -> state dict
  with the official key names."""
  conv = experiment.method_of(config).converter
  size = config.input.image_size
  sd = conv.to_torch(jax.device_get(params), model, size)
  if ema is not None and conv.ema_to_torch is not None:
    sd.update(conv.ema_to_torch(jax.device_get(ema), model, size))
  return sd


def to_timm(config, params, pool: str = 'token'):
  """The encoder of `params` (a params tree with 'encoder', e.g. the run's
  params or a momentum encoder) as a timm `VisionTransformer` state dict.

  Args:
    config: the run's config; its method's `Method.encoder` gives the
      encoder's fields.
    params: a tree whose 'encoder' entry holds the vit.Encoder params.
    pool: 'token' or 'avg' (see mim_jax/convert/timm_vit.py).

  Returns:
    (state dict in timm key names, the VisionTransformer kwargs it loads
    into with strict=True).

  Raises:
    ValueError: the method declares no encoder, `params` has none, or timm
      cannot represent it (see timm_vit.timm_kwargs).
  """
  if 'encoder' not in params:
    raise ValueError(f'the params hold no encoder (their entries: '
                     f'{sorted(params)}); pass a tree with an "encoder".')
  return timm_vit.encoder_to_timm(jax.device_get(params['encoder']),
                               _encoder_fields(config),
                               int(config.input.image_size), pool)


def timm_kwargs(config, pool: str = 'token') -> dict:
  """The timm `VisionTransformer` kwargs of the config's encoder (what
  `to_timm` matches), checked without reading any params.

  Raises:
    ValueError: as `to_timm`.
  """
  return timm_vit.timm_kwargs(_encoder_fields(config),
                              int(config.input.image_size), pool)


def to_hf(config, model, params, encoder_only: bool = False
          ) -> tuple[dict, dict[str, np.ndarray]]:
  """params as a 🤗 transformers folder's (config.json, state dict): the
  method's own model where it has one (MAE: ViTMAEForPreTraining), else (or
  with `encoder_only`) its encoder as a `ViTModel`.

  Raises:
    errors.ConfigError: the method has no encoder, or transformers cannot
      represent the model (every reason listed).
  """
  conv = experiment.method_of(config).converter
  if conv.to_hf is not None and not encoder_only:
    return conv.to_hf(config, model, jax.device_get(params))
  fields = _encoder_fields(config, 'hf')
  if 'encoder' not in params:
    raise ValueError(f'the params hold no encoder (their entries: '
                     f'{sorted(params)}).')
  return hf_vit.encoder_to_vit(jax.device_get(params['encoder']), fields,
                               int(config.input.image_size))


def hf_state_dict(config, model, path: str) -> dict[str, np.ndarray]:
  """The official state dict of a transformers folder of the method's
  model (its config.json checked against the config first).

  Raises:
    errors.ConfigError: the method has no transformers model, or the
      folder's model_type or sizes do not fit.
    errors.WeightsFileError: a missing, truncated or foreign weights file.
  """
  method = experiment.method_of(config)
  if method.converter.from_hf is None:
    raise errors.ConfigError(
        f'{path!r} is a transformers folder, and {method.name} has no '
        'transformers model to load it into (MAE pretraining, fine-tuning '
        'and probes read them).')
  hf_config, sd = hf_vit.read_folder(path)
  where = os.path.join(path, 'config.json')
  logging.info('Loading %d tensors of %s (%s).', len(sd), path,
               hf_config.get('model_type'))
  return method.converter.from_hf(config, model, hf_config, sd, where)


def hf_encoder(config, model, path: str) -> dict[str, np.ndarray]:
  """The encoder of a transformers ViTMAE or ViT folder, in timm key names
  (decoder and pooler left out), its sizes checked against the model's
  encoder (`model.encoder_fields()`, a classifier's).

  Raises:
    errors.ConfigError: another model_type, or sizes that differ.
    core.ConversionError: keys that are no ViT keys.
  """
  hf_config = hf_vit.with_defaults(hf_vit.read_config(path))
  where = os.path.join(path, 'config.json')
  enc = vit.Encoder(**model.encoder_fields())
  hf_vit.check_sizes(hf_config, hf_vit.encoder_sizes(enc), where)
  note = hf_vit.eps_note(hf_config, enc.layernorm_eps)
  if note:
    logging.info('%s: %s', where, note)
  _, sd = hf_vit.read_folder(path)
  prefix = hf_vit.model_prefix(sd)
  out, unknown = hf_vit.encoder_from_hf(sd, prefix, where)
  rest = [k for k in sd if not k.startswith(prefix)] + unknown
  unknown = [k for k in rest if not k.startswith(('decoder.', 'pooler.'))]
  if unknown:
    raise core.ConversionError(
        f'{path}: {len(unknown)} keys are no ViT encoder keys: '
        f'{sorted(unknown)[:12]}.')
  logging.info('init_from: the %s encoder of %s (%d tensors; decoder and '
               'pooler left out).', hf_config['model_type'], path, len(out))
  return out


def _encoder_fields(config, what: str = 'timm') -> dict:
  method = experiment.method_of(config)
  if method.encoder is None:
    raise errors.ConfigError(
        f'method {method.name!r} declares no pretraining encoder '
        f'(Method.encoder), so it has none to export for {what}; use '
        '--format=official.')
  return method.encoder(config)


def is_workdir(path: str) -> bool:
  """True for a mim_jax training workdir (config.json + checkpoints/; a
  transformers folder's config.json has a model_type instead)."""
  return tf.io.gfile.isdir(path) and tf.io.gfile.exists(
      os.path.join(path, 'config.json')) and not hf_vit.is_folder(path)


def workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote into its workdir (fields
  removed since, as an older run's `mask_ratio`, moved to today's: see
  config_lib.upgrade_saved)."""
  with tf.io.gfile.GFile(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(config_lib.upgrade_saved(json.load(f)))


def encoder_state_dict(method_name: Optional[str], state_dict: dict) -> dict:
  """The encoder of a pretraining state dict of `method_name`, in timm key
  names (its `EncoderCard.key_prefix` stripped, decoders dropped).

  `method_name` None or TIMM: a timm `VisionTransformer` state dict (the
  encoder's timm key names at the top level, e.g. timm's
  `vit_base_patch16_224.mae`). A file that holds no encoder under the
  method's prefix but one at the top level is read as timm's, and the log
  says so (for MAE and BootMAE, whose prefix is '', both are the same).

  Raises:
    errors.ConfigError: the method declares no classifier card.
    errors.WeightsFileError: the file holds no encoder under the method's
      prefix nor timm's names (its first keys listed).
  """
  layouts = [(TIMM, '')]
  if method_name not in (None, TIMM):
    card = methods.get(method_name).classifier
    if card is None:
      raise errors.ConfigError(
          f'method {method_name!r} declares no encoder to '
          'fine-tune (Method.classifier).')
    layouts = [(method_name, card.key_prefix)] + (
        layouts if card.key_prefix else [])
  for name, prefix in layouts:
    out = {k[len(prefix):]: v for k, v in state_dict.items()
           if k.startswith(prefix) and _ENCODER_KEY.match(k[len(prefix):])}
    if out:
      if name != layouts[0][0]:
        logging.info('init_from: no %s encoder keys (prefix %r); the file '
                     'holds a timm VisionTransformer state dict, read as '
                     'such.', method_name, layouts[0][1])
      return out
  wanted = ' nor '.join(f'{name}\'s (prefix {prefix!r})'
                        for name, prefix in layouts)
  raise errors.WeightsFileError(
      f'no encoder keys (cls_token, patch_embed.*, blocks.*) in the state '
      f'dict under {wanted}; its first keys are {sorted(state_dict)[:8]}. '
      'Set config.init_method to the method that wrote the file, or to '
      f'{TIMM!r} for a timm VisionTransformer state dict.')


def initial_params(config, model):
  """(params, model_state or None) that `config.init_from` names, checked
  against `model` before anything compiles (model_state: e.g. a probe's
  BatchNorm statistics, from a workdir of the same method).

  init_from may be:
  - a mim_jax workdir of the same method (its latest params, e.g. a
    fine-tuned classifier for evaluation), or of a pretraining method when
    the config's method is a labelled task (`Method.labelled`): its
    `params['encoder']` is copied as is, checked against the task's;
  - a 🤗 transformers folder (config.json + model.safetensors): a
    ViTMAEForPreTraining for MAE pretraining, or its encoder (or a
    ViTModel's) for labelled tasks;
  - a weights file (.pth/.pt/.npz/.safetensors) of the config's method
    in its official key names (a fine-tuned classifier, or a pretraining
    checkpoint), or, for labelled tasks, a pretraining file of
    `config.init_method` or a timm VisionTransformer state dict (see
    `_labelled_from_file`).

  Raises:
    ValueError: a missing path, or a checkpoint of another architecture
      (naming the unknown, missing and mis-shaped params or keys).
  """
  path = config.init_from
  method = experiment.method_of(config)
  strict = config.get('init_strict', True)
  if hf_vit.is_folder(path):
    _refuse_headless_eval(config, path, 'is a transformers folder (an '
                          'encoder, no classifier head)')
    if method.labelled is not None:
      return method.labelled.from_encoder(
          hf_encoder(config, model, path), model,
          _fresh_params(config, model), config.input.image_size), None
    return from_torch(config, model, path, strict=strict), None
  if is_workdir(path):
    src_config = workdir_config(path)
    if src_config.model_name == method.name:
      # Restored with the run's own config (its optimizer state may differ
      # from ours), then checked against our model.
      state, step = state_from_workdir(
          src_config, method.build_model(src_config), path)
      _check_same(jax.eval_shape(lambda: state_lib.init_params(
          model, experiment.batch_spec(config, 1), config.seed)), state.params,
                  path)
      logging.info('init_from: params of %s at step %d.', path, step)
      return state.params, state.model_state
    if method.labelled is None:
      raise errors.ConfigError(
          f'init_from={path!r} is a {src_config.model_name} workdir, but '
          f'{method.name} loads only its own params; use a '
          f'{method.name} workdir or file.')
    src_method = methods.get(src_config.model_name)
    if src_method.encoder is None:
      raise errors.ConfigError(
          f'init_from={path!r} is a {src_config.model_name} workdir, whose '
          'method declares no encoder (Method.encoder) to start from.')
    src_params, step = from_workdir(
        src_config, src_method.build_model(src_config), path)
    if 'encoder' not in src_params:
      raise errors.WeightsFileError(
          f'init_from={path!r}: its params hold no encoder (their entries: '
          f'{sorted(src_params)}).')
    logging.info('init_from: the %s encoder of %s at step %d.',
                 src_config.model_name, path, step)
    return method.labelled.from_encoder_params(
        src_params['encoder'], src_method.encoder(src_config), model,
        _fresh_params(config, model)), None
  if not tf.io.gfile.exists(path):
    raise errors.MissingFileError(
        f'init_from={path!r} does not exist: give a mim_jax workdir (with '
        'config.json and checkpoints/) or a .pth/.pt/.npz/.safetensors '
        'state dict.')
  sd = core.load_state_dict(path)
  if method.labelled is not None:
    return _labelled_from_file(config, model, path, sd, strict), None
  return from_torch(config, model, path, strict=strict, state_dict=sd), None


def _labelled_from_file(config, model, path: str, sd: dict, strict: bool):
  """A labelled task's params from a weights file: a classifier file
  (`head.*` keys: an official or timm fine-tuned model) loads whole; any
  other file gives the encoder alone (`encoder_state_dict`: the layout of
  `config.init_method`, or timm's), and so does a classifier file that
  does not fit a training run's classifier whole (another class count or
  pooling: its head and fc_norm then start fresh, and the log says why).

  Raises:
    errors.WeightsFileError: the encoder does not fit, or (eval_only) the
      file has no head or does not fit whole.
  """
  has_head = any(k.startswith('head.') for k in sd)
  if not has_head:
    _refuse_headless_eval(config, path,
                          'holds no classifier head (head.* keys)')
  if has_head:
    try:
      return from_torch(config, model, path, strict=strict, state_dict=sd)
    except core.ConversionError as e:
      if config.get('eval_only'):
        raise
      logging.warning(
          'init_from: %s does not load whole into this classifier (%s); '
          'loading its encoder alone: the head and fc_norm start fresh.',
          path, ' '.join(str(e).split())[:600])
  src = config.get('init_method') or None
  logging.info('init_from: the %s encoder of %s.', src or TIMM, path)
  return experiment.method_of(config).labelled.from_encoder(
      encoder_state_dict(src, sd), model, _fresh_params(config, model),
      config.input.image_size)


def _refuse_headless_eval(config, path: str, what: str):
  """An eval config evaluates a classifier as it is: weights without a
  head (`what` says why) are refused.

  Raises:
    errors.WeightsFileError: config.eval_only is set.
  """
  if config.get('eval_only'):
    raise errors.WeightsFileError(
        f'init_from={path!r} {what}, and eval_only evaluates a classifier '
        'as it is: give a fine-tuned file or workdir, or fine-tune from '
        'this one first.')


def _check_same(expected, got, path: str):
  """Raises a ValueError listing params whose names or shapes differ
  (`expected` may hold ShapeDtypeStructs)."""
  flat = lambda t: {'/'.join(k): tuple(v.shape) for k, v in
                    traverse_util.flatten_dict(t).items()}
  want, have = flat(expected), flat(got)
  bad = [f'{k}: {have.get(k)} in {path}, {want.get(k)} in this model'
         for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
  if bad:
    raise errors.WeightsFileError(
        f'init_from={path!r} holds another architecture ({len(bad)} params '
        f'differ): {bad[:12]}. Match config.model to that run.')


def _fresh_params(config, model):
  """The model's initial params (what a loaded encoder leaves fresh),
  drawn in one compiled call (op by op, the tiny configs' init took
  twice as long)."""
  return jax.jit(lambda: state_lib.init_params(
      model, experiment.batch_spec(config, 1), config.seed,
      experiment.init_rules_of(config)))()

r"""Weight conversion between official PyTorch checkpoints and mim_jax.

Export the params of a training run as an official state dict (encoder +
decoder, and BootMAE's momentum encoder; official key names, loads with
strict=True upstream):

  python -m mim_jax.tools.convert export --config=configs/mae_vitb.py \
      --workdir=DIR [--step=N] --out=mae_vitb.pth     # or .npz, .safetensors

Export the run's encoder alone as a timm `VisionTransformer` state dict
(MAE, CAE and BootMAE alike; mim_jax/convert/timm_vit.py):

  python -m mim_jax.tools.convert export --format=timm \
      --config=configs/mae_vitb.py --workdir=DIR [--step=N] \
      [--timm_pool=token|avg] [--timm_ema] --out=vit_b16.pth

The file loads with strict=True into the model below (the log prints the
call with the run's values), and timm's `forward_features` equals our
encoder's output on whole images (all patches, cls token first):

  from timm.models.vision_transformer import VisionTransformer
  VisionTransformer(img_size=S, patch_size=p, in_chans=3, embed_dim=D,
                    depth=n, num_heads=h, mlp_ratio=mlp_dim / D,
                    qkv_bias=True, init_values=None,  # CAE: its layer_scale
                    class_token=True, no_embed_class=False,
                    pos_embed='learn', global_pool='token', fc_norm=False,
                    num_classes=0)

- --timm_pool=token (default): global_pool='token', fc_norm=False. `norm`
  is the encoder's final norm; forward_features is the encoder's output;
  the file holds every encoder param.
- --timm_pool=avg: global_pool='avg', fc_norm=True, the layout of MAE /
  BEiT fine-tuning. forward_features is the last block's output (no final
  norm); as those recipes do, the pretraining final norm is dropped and
  `fc_norm` starts fresh (weight 1, bias 0).
- qkv_bias=True (False only for an encoder without one): the q_bias /
  v_bias of CAE and BootMAE become `qkv.bias` = [q_bias, 0, v_bias], which
  is exact (our attention adds that very vector).
- init_values: None, or the encoder's layer_scale (CAE: 0.1, ViT-L 1e-5):
  timm then has `ls1.gamma` / `ls2.gamma`, which hold our gamma_1 /
  gamma_2 (the value only makes timm build them).
- pos_embed (1, 1 + (S/p)^2, D), cls row first: timm's learned table holds
  the encoder's fixed sin-cos table (MAE's column-first layout, CAE's and
  BootMAE's row-first one; cls row zero), or its learned table.
- No head (num_classes=0). The ViT-B/16 recipes (224 px) of all three
  methods match `timm.create_model('vit_base_patch16_224',
  num_classes=0)` (add global_pool='avg', fc_norm=True for
  --timm_pool=avg, and init_values=0.1 for CAE).
- BootMAE: the online encoder; --timm_ema exports the momentum encoder
  instead (methods whose EMA target holds an encoder). Robust MAE's
  encoder mask token is not used on whole images and is left out.

Either export writes the format its --out suffix names: .pth (torch.save),
.npz, or .safetensors (no pickle; `safetensors.torch.load_file` reads it).
--safetensors asks for safetensors explicitly, and then an --out of another
suffix is refused (with the name to use) rather than silently renamed.

What timm's VisionTransformer cannot represent stops the export with the
reason (BEiT's relative position bias, a LayerNorm epsilon other than
1e-6, an MLP width no float mlp_ratio gives).

Export the run as a 🤗 transformers folder (config.json + model.safetensors,
written atomically; mim_jax/convert/hf_vit.py): MAE as ViTMAEForPreTraining
(encoder and decoder; `from_pretrained(DIR)` reports no missing or
unexpected keys), CAE's and BootMAE's encoders (MAE's with --hf_encoder) as
`ViTModel.from_pretrained(DIR, add_pooling_layer=False)`:

  python -m mim_jax.tools.convert export --format=hf \
      --config=configs/mae_vitb.py --workdir=DIR --out=HF_DIR [--hf_encoder]

What transformers cannot represent is refused with every reason (relative
position bias; robust MAE's encoder mask tokens, population statistics).

Import an official checkpoint into an orbax params checkpoint (and check it):

  python -m mim_jax.tools.convert import --config=configs/mae_vitb.py \
      --torch_ckpt=mae_pretrain_vit_base.pth --out=DIR [--nostrict]

The released `mae_pretrain_vit_*.pth` hold the encoder only: use --nostrict
to keep a freshly initialised decoder (it is listed in the log). PyTorch
files are read with torch.load(weights_only=True), .safetensors files by
mim_jax's own reader (mim_jax/convert/core.py), never through pickle.
--torch_ckpt may also be a transformers ViTMAEForPreTraining folder (its
config.json's sizes are checked against --config first).

Bad input (a missing, empty or damaged file, a config that does not fit the
checkpoint) prints one line, `error: ...`, with exit status 2.
"""

import functools
import os
import sys
from typing import Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from mim_jax import errors

FLAGS = flags.FLAGS


def _define_flags():
  # Only when run as a program: importing the module (tests, notebooks)
  # must not clash with other entry points' flags (--config, --out).
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
  flags.DEFINE_string('workdir', None, 'Training workdir (export).')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
  flags.DEFINE_string('torch_ckpt', None,
                      '.pth/.pt/.npz/.safetensors state dict, or a '
                      'transformers folder (import).')
  flags.DEFINE_string('out', None, 'Output: .pth/.npz/.safetensors '
                      '(export), a folder (export --format=hf, import).')
  flags.DEFINE_bool('safetensors', False, 'export: write safetensors (no '
                    'pickle); --out must then end in .safetensors.')
  flags.DEFINE_bool('strict', True, 'Fail on params missing from the ckpt.')
  flags.DEFINE_enum('format', 'official', ('official', 'timm', 'hf'),
                    'export: official (the method\'s upstream state dict), '
                    'timm (the encoder as a timm VisionTransformer) or hf '
                    '(a 🤗 transformers folder: ViTMAEForPreTraining for '
                    'MAE, ViTModel for other encoders).')
  flags.DEFINE_bool('hf_encoder', False, '--format=hf: the encoder alone '
                    'as a ViTModel, for MAE too.')
  flags.DEFINE_enum('timm_pool', 'token', ('token', 'avg'),
                    '--format=timm: token (global_pool=\'token\', final norm) '
                    'or avg (global_pool=\'avg\', fc_norm=True).')
  flags.DEFINE_bool('timm_ema', False, '--format=timm: export the momentum '
                    '(EMA) encoder instead of the online one (BootMAE).')


def export(config):
  from mim_jax import experiment  # pylint: disable=g-import-not-at-top
  from mim_jax import weights  # pylint: disable=g-import-not-at-top
  from mim_jax.convert import core  # pylint: disable=g-import-not-at-top
  model = experiment.build_model(config)
  state, step = weights.state_from_workdir(config, model, FLAGS.workdir,
                                           FLAGS.step)
  # BootMAE: the momentum encoder too (`model_ema.*`).
  sd = weights.to_torch(config, model, state.params, ema=state.ema_params)
  core.save_state_dict(sd, FLAGS.out)
  logging.info('Wrote %d tensors of step %d to %s', len(sd), step, FLAGS.out)


def export_timm(config, workdir: str, out: str, step: Optional[int] = None,
                pool: str = 'token', ema: bool = False) -> dict:
  """Writes the run's encoder as a timm VisionTransformer state dict.

  Args:
    config: the run's config.
    workdir: its workdir (the checkpoint of `step`, default the latest).
    out: the .pth, .npz or .safetensors to write (by its suffix).
    step: the checkpoint step; None for the latest.
    pool: 'token' or 'avg' (--timm_pool).
    ema: the momentum (EMA) encoder instead of the online one.

  Returns:
    The VisionTransformer kwargs that the file loads into (strict=True).

  Raises:
    errors.ConfigError: the method has no encoder, timm cannot represent
      it, or `ema` without an EMA encoder (checked before the checkpoint is
      read, where the config tells).
  """
  from mim_jax import experiment  # pylint: disable=g-import-not-at-top
  from mim_jax import providers  # pylint: disable=g-import-not-at-top
  from mim_jax import weights  # pylint: disable=g-import-not-at-top
  from mim_jax.convert import core  # pylint: disable=g-import-not-at-top
  from mim_jax.convert import timm_vit  # pylint: disable=g-import-not-at-top
  weights.timm_kwargs(config, pool)
  no_ema = (f'--timm_ema: the {config.model_name} run keeps no EMA of its '
            'encoder (TrainState.ema_params); drop --timm_ema to export the '
            'online encoder.')
  if ema and providers.ema_of(experiment.providers_of(config)) is None:
    raise errors.ConfigError(no_ema)
  model = experiment.build_model(config)
  state, step = weights.state_from_workdir(config, model, workdir, step)
  params, which = state.params, 'online'
  if ema:
    if not state.ema_params or 'encoder' not in state.ema_params:
      raise errors.ConfigError(no_ema)
    params, which = state.ema_params, 'momentum (EMA)'
  sd, kwargs = weights.to_timm(config, params, pool)
  core.save_state_dict(sd, out)
  logging.info(
      'Wrote %d tensors (the %s encoder of step %d) to %s. Load them with\n'
      '  from timm.models.vision_transformer import VisionTransformer\n'
      '  model = %s\n'
      '  model.load_state_dict(%s, strict=True)', len(sd), which, step, out,
      timm_vit.constructor(kwargs),
      f'safetensors.torch.load_file({out!r})' if out.endswith(
          '.safetensors') else f'torch.load({out!r}, weights_only=True)')
  return kwargs


def export_hf(config, workdir: str, out: str, step: Optional[int] = None,
              encoder_only: bool = False) -> dict:
  """Writes the run as a 🤗 transformers folder (config.json +
  model.safetensors, written atomically): MAE as ViTMAEForPreTraining,
  other methods' encoders (or MAE's, with `encoder_only`) as ViTModel.

  Returns:
    The config.json written.

  Raises:
    errors.ConfigError: transformers cannot represent the model (every
      reason), or `out` holds other files.
  """
  from mim_jax import experiment  # pylint: disable=g-import-not-at-top
  from mim_jax import weights  # pylint: disable=g-import-not-at-top
  from mim_jax.convert import hf_vit  # pylint: disable=g-import-not-at-top
  model = experiment.build_model(config)
  state, step = weights.state_from_workdir(config, model, workdir, step)
  hf_config, sd = weights.to_hf(config, model, state.params, encoder_only)
  hf_vit.write_folder(out, hf_config, sd)
  logging.info(
      'Wrote %d tensors of step %d to %s. Load them with\n'
      '  from transformers import %s\n  model = %s', len(sd), step, out,
      hf_config['architectures'][0],
      hf_vit.vit_constructor(hf_config['model_type'], out))
  return hf_config


def import_(config):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mim_jax import experiment  # pylint: disable=g-import-not-at-top
  from mim_jax import weights  # pylint: disable=g-import-not-at-top
  model = experiment.build_model(config)
  params = weights.from_torch(config, model, FLAGS.torch_ckpt,
                              strict=FLAGS.strict)
  out = os.path.abspath(FLAGS.out)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out, jax.tree.map(jax.numpy.asarray, params))
  logging.info('Wrote params of %s to %s', FLAGS.torch_ckpt, out)


def _check_safetensors_flag(command: str):
  """--safetensors: export only, and --out must say so (an --out ending
  in .safetensors writes safetensors with or without the flag)."""
  if not FLAGS.safetensors or FLAGS.format not in ('official', 'timm'):
    return
  if command != 'export':
    raise app.UsageError('--safetensors applies to export; import reads '
                         'any .safetensors --torch_ckpt as it is.')
  if not FLAGS.out.endswith('.safetensors'):
    stem = os.path.splitext(FLAGS.out)[0]
    raise app.UsageError(f'--safetensors writes a safetensors file, but '
                         f'--out={FLAGS.out} does not end in .safetensors: '
                         f'use --out={stem}.safetensors.')


def main(argv):
  if len(argv) != 2 or argv[1] not in ('export', 'import'):
    raise app.UsageError('usage: convert {export|import} --config=... ...')
  if not FLAGS.config or not FLAGS.out:
    raise app.UsageError('--config and --out are required.')
  timm_only = [f'--{name}' for name in ('timm_pool', 'timm_ema')
               if FLAGS[name].present]
  if timm_only and (argv[1] != 'export' or FLAGS.format != 'timm'):
    raise app.UsageError(f'{" and ".join(timm_only)} only apply to '
                         'export --format=timm.')
  if FLAGS['hf_encoder'].present and (argv[1] != 'export' or
                                      FLAGS.format != 'hf'):
    raise app.UsageError('--hf_encoder only applies to export --format=hf.')
  _check_safetensors_flag(argv[1])
  if argv[1] == 'export':
    if not FLAGS.workdir:
      raise app.UsageError('export needs --workdir.')
    if FLAGS.format == 'hf':
      run = functools.partial(export_hf, FLAGS.config, FLAGS.workdir,
                              FLAGS.out, FLAGS.step, FLAGS.hf_encoder)
    elif FLAGS.format == 'timm':
      run = functools.partial(export_timm, FLAGS.config, FLAGS.workdir,
                              FLAGS.out, FLAGS.step, FLAGS.timm_pool,
                              FLAGS.timm_ema)
    else:
      run = functools.partial(export, FLAGS.config)
  else:
    if FLAGS.format != 'official':
      raise app.UsageError(f'--format={FLAGS.format} is an export format; '
                           'import reads official files and transformers '
                           'folders (drop --format).')
    if not FLAGS.torch_ckpt:
      raise app.UsageError('import needs --torch_ckpt.')
    run = functools.partial(import_, FLAGS.config)
  try:  # a missing, empty or damaged file, a bad config: one line
    run()
  except errors.UserError as e:  # (anything else is a bug: traceback)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  _define_flags()
  app.run(main)

r"""Weight conversion between official PyTorch checkpoints and mim_jax.

Export the params of a training run as an official state dict (encoder +
decoder, and BootMAE's momentum encoder; official key names, loads with
strict=True upstream):

  python -m mim_jax.tools.convert export --config=configs/mae_vitb.py \
      --workdir=DIR [--step=N] --out=mae_vitb.pth     # or .npz

Import an official checkpoint into an orbax params checkpoint (and check it):

  python -m mim_jax.tools.convert import --config=configs/mae_vitb.py \
      --torch_ckpt=mae_pretrain_vit_base.pth --out=DIR [--nostrict]

The released `mae_pretrain_vit_*.pth` hold the encoder only: use --nostrict
to keep a freshly initialised decoder (it is listed in the log).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
flags.DEFINE_string('workdir', None, 'Training workdir (export).')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
flags.DEFINE_string('torch_ckpt', None, '.pth/.pt/.npz state dict (import).')
flags.DEFINE_string('out', None, 'Output: .pth/.npz (export) or dir (import).')
flags.DEFINE_bool('strict', True, 'Fail on params missing from the ckpt.')
FLAGS = flags.FLAGS


def export(config):
  from mim_jax import steps  # pylint: disable=g-import-not-at-top
  from mim_jax import weights  # pylint: disable=g-import-not-at-top
  from mim_jax.convert import core  # pylint: disable=g-import-not-at-top
  model = steps.build_model(config)
  state, step = weights.state_from_workdir(config, model, FLAGS.workdir,
                                           FLAGS.step)
  # BootMAE: the momentum encoder too (`model_ema.*`).
  sd = weights.to_torch(config, model, state.params, ema=state.ema_params)
  core.save_state_dict(sd, FLAGS.out)
  logging.info('Wrote %d tensors of step %d to %s', len(sd), step, FLAGS.out)


def import_(config):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mim_jax import steps  # pylint: disable=g-import-not-at-top
  from mim_jax import weights  # pylint: disable=g-import-not-at-top
  model = steps.build_model(config)
  params = weights.from_torch(config, model, FLAGS.torch_ckpt,
                              strict=FLAGS.strict)
  out = os.path.abspath(FLAGS.out)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out, jax.tree.map(jax.numpy.asarray, params))
  logging.info('Wrote params of %s to %s', FLAGS.torch_ckpt, out)


def main(argv):
  if len(argv) != 2 or argv[1] not in ('export', 'import'):
    raise app.UsageError('usage: convert {export|import} --config=... ...')
  if not FLAGS.config or not FLAGS.out:
    raise app.UsageError('--config and --out are required.')
  if argv[1] == 'export':
    if not FLAGS.workdir:
      raise app.UsageError('export needs --workdir.')
    export(FLAGS.config)
  else:
    if not FLAGS.torch_ckpt:
      raise app.UsageError('import needs --torch_ckpt.')
    import_(FLAGS.config)


if __name__ == '__main__':
  app.run(main)

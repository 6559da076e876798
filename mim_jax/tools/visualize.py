r"""Reconstruction figures from any checkpoint, on any images.

  python -m mim_jax.tools.visualize --config=configs/mae_tiny.py \
      --workdir=DIR [--step=N] --out=recon.png
  python -m mim_jax.tools.visualize --config=configs/mae_vitl.py \
      --torch_ckpt=checkpoint-799.pth --out=recon.png \
      --config.input.data=folder:/my/photos

Columns: original | masked | reconstruction | reconstruction + visible, in
un-normalised pixels (norm-pix predictions are mapped back with each patch's
own statistics, as in the official MAE demo). A PyTorch checkpoint must hold
the decoder: it is loaded strictly, so the encoder-only releases
(`mae_pretrain_vit_*.pth`) fail with the list of missing decoder params
rather than being drawn through a random decoder. Bad input (a missing or
damaged checkpoint, data or config) prints one line, `error: ...`, with exit
status 2.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
flags.DEFINE_string('workdir', None, 'Training workdir with checkpoints.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
flags.DEFINE_string('torch_ckpt', None, 'Official checkpoint '
                    '(.pth/.npz/.safetensors).')
flags.DEFINE_integer('num_images', 8, 'Rows of the figure.')
flags.DEFINE_integer('seed', 0, 'Seed of the masks.')
flags.DEFINE_string('out', 'recon.png', 'Output PNG (local or gs://).')
FLAGS = flags.FLAGS


def main(argv):
  from mim_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    _draw(argv)
  except errors.UserError as e:  # anything else is a bug: traceback
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def _draw(argv):
  del argv
  from mim_jax import experiment  # pylint: disable=g-import-not-at-top
  from mim_jax import images  # pylint: disable=g-import-not-at-top
  from mim_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from mim_jax import steps  # pylint: disable=g-import-not-at-top
  from mim_jax import visualize  # pylint: disable=g-import-not-at-top
  from mim_jax import weights  # pylint: disable=g-import-not-at-top
  from mim_jax.models import vit  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  if not config or bool(FLAGS.workdir) == bool(FLAGS.torch_ckpt):
    raise app.UsageError('Give --config and exactly one of --workdir and '
                         '--torch_ckpt.')
  method = experiment.method_of(config)
  model = method.build_model(config)
  if FLAGS.workdir:
    params, step = weights.from_workdir(config, model, FLAGS.workdir,
                                        FLAGS.step)
    logging.info('Params of step %d from %s.', step, FLAGS.workdir)
  else:
    params = weights.from_torch(config, model, FLAGS.torch_ckpt)
  batch = input_pipeline.make_vis_batch(
      config.input, patch_size=vit.patch_size_of(config.model),
      seed=FLAGS.seed, num_images=FLAGS.num_images,
      views={k: v.size for k, v in method.views(config).items()})
  batch = {k: batch[k] for k in experiment.batch_spec(config, 1)}
  forward = steps.make_forward(
      model, image_input=images.ImageInput.from_config(config))
  grid = visualize.render(method, config, forward, params, batch)
  if grid is None:
    raise app.UsageError(
        f'{config.model_name} with these settings predicts no pixels (e.g. '
        'token targets): there is no reconstruction to draw.')
  visualize.save_png(grid, FLAGS.out)
  logging.info('Wrote %s (%dx%d).', FLAGS.out, grid.shape[1], grid.shape[0])


if __name__ == '__main__':
  app.run(main)

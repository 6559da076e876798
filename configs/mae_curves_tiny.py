r"""The recipe of the official PyTorch reference curves
(tests/fixtures/curves_mae_tiny/, config.json and README.md there): the
unmodified official MAE `main_pretrain`, 8 seeds, on 1,024 64-px JPEG crops
of scikit-image's photos.

  python -m mim_jax.main --config=configs/mae_curves_tiny.py \
      --workdir=/tmp/curves_s0 --config.seed=0
  python -m mim_jax.tools.compare_curves --ours=/tmp/curves_s0 \
      --reference=tests/fixtures/curves_mae_tiny/curves.json --out=c.png

Recipe (every value is the reference's): ViT 64 wide, 4 deep, 4 heads,
patch 4, 32-px images; decoder 64 wide, 2 deep, 4 heads; LayerNorm eps 1e-6;
norm-pix targets, 75% random masks; RandomResizedCrop(32, scale 0.2-1,
ratio 3/4-4/3, bicubic) + flip + ImageNet normalisation; batch 32, every
image once per epoch (32 steps); AdamW (0.9, 0.95), eps 1e-8, wd 0.05 (not
on biases and norms), absolute lr 1.5e-3, per-step linear warmup over 2
epochs from lr 0 at step 0, half-cycle cosine to 0 at epoch 15 (480
steps); fp32, no clipping.

The loss is logged every step, so epoch means are exactly upstream's
`MetricLogger.global_avg`. What cannot match draw for draw (the README of
the fixture says why): the data order and the crop, flip and mask draws
come from our own seeded streams, so the comparison is against the seed
distribution.
"""

import os

from mim_jax import config_lib
from mim_jax.methods.mae import config as recipe

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                      'tests', 'fixtures', 'curves_mae_tiny', 'photos',
                      'train')


def get_config(arg=None):
  del arg
  c = config_lib.curves_overrides(recipe.get_config('tiny'),
                                  os.path.normpath(FOLDER))
  c.input.crop_scale = (0.2, 1.0)
  c.lr = 1.5e-3
  c.optim.weight_decay = 0.05
  c.schedule.min_lr = 0.0
  return c

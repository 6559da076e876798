r"""The recipe of the official BootMAE reference curves
(tests/fixtures/curves_bootmae_tiny/, config.json and README.md there): the
unmodified official BootMAE training loop, 8 seeds, on the 1,024 photo
crops of tests/fixtures/curves_mae_tiny/photos.

  python -m mim_jax.main --config=configs/bootmae_curves_tiny.py \
      --workdir=/tmp/bootmae_curves_s0 --config.seed=0
  python -m mim_jax.tools.compare_curves --ours=/tmp/bootmae_curves_s0 \
      --reference=tests/fixtures/curves_bootmae_tiny/curves.json \
      --term=loss_feature --out=c.png

Recipe (every value is the reference's; the official ViT-B script scaled to
a tiny ViT): encoder 64 wide, 4 deep, 4 heads, patch 4, 32-px images,
features tapped after blocks 0 and 3; pixel regressor 48 wide, feature
predictor 64 wide, 2 blocks each; block-wise masks of 39 patches (5..20 per
block) padded with random patches to 48 of 64 after a roll of 0..3;
weighted mask, feature weight 1 ramped over the first quarter of the epochs
(once per epoch); momentum encoder 0.999 + epoch/100 x 0.0009 (per epoch);
RandomResizedCrop(32, scale 0.2-1, bicubic) + flip, mean = std = 0.5; batch
32, every image once per epoch (32 steps), 15 epochs; AdamW (0.9, 0.95), wd
0.05 (not on biases, norms and cls), lr 1.2e-2 x 32/256 = 1.5e-3 after a
linspace warmup of 2 epochs from 0, cosine to 6.25e-5; fp32, no clipping.
"""

import os

from mim_jax import config_lib
from mim_jax.methods.bootmae import config as recipe

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                      'tests', 'fixtures', 'curves_mae_tiny', 'photos',
                      'train')


def get_config(arg=None):
  del arg
  c = config_lib.curves_overrides(recipe.get_config('tiny'),
                                  os.path.normpath(FOLDER))
  c.input.crop_scale = (0.2, 1.0)
  c.input.mask.update(dict(num_masking_patches=39, min_num_patches=5,
                           max_num_patches=20, extra_random=True, roll=3,
                           ratio=0.75))
  c.lr = 1.5e-3
  c.optim.weight_decay = 0.05
  c.schedule.min_lr = 6.25e-5
  # Upstream's dynamic EMA of the ViT-B script: 0.999 -> 0.9999 over epochs
  # 0..100, stepped per epoch (only its first 15 epochs are run here).
  c.ema = dict(momentum=(0.999, 0.9999, 0.99999),
               boundary_epochs=(0, 100, 400))
  return c

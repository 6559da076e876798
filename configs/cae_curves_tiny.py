r"""The recipe of the official CAE reference curves
(tests/fixtures/curves_cae_tiny/, config.json and README.md there): the
unmodified official CAE `run_pretraining.main`, 8 seeds, on the 1,024 photo
crops of tests/fixtures/curves_mae_tiny/photos, with token targets from a
small DALL-E encoder (random weights) stored next to the reference.

  python -m mim_jax.main --config=configs/cae_curves_tiny.py \
      --workdir=/tmp/cae_curves_s0 --config.seed=0
  python -m mim_jax.tools.compare_curves --ours=/tmp/cae_curves_s0 \
      --reference=tests/fixtures/curves_cae_tiny/curves.json \
      --term=loss_align --out=c.png

Recipe (every value is the reference's; the official ViT-B 800-epoch script
scaled to a tiny ViT): encoder 64 wide, 4 deep, 4 heads, patch 4, 32-px
images, layer scale 0.1, drop path 0.1; regressor and decoder 64 wide, 2
blocks, 4 heads, layer scale 0.1; block-wise masks of 32 of 64 patches (at
least 5 per block: upstream's 16 of 196 scaled); the tokenizer's view 64 px
(Lanczos, same crop and flip), sizes read from the tokenizer file;
cross-entropy on the masked tokens + 2 x alignment MSE;
RandomResizedCrop(32, scale 0.08-1, bicubic) + flip, ImageNet mean/std;
batch 32, every image once per epoch (32 steps), 15 epochs; AdamW (0.9,
0.999), wd 0.05 (not on biases, norms and layer scales), clip 3.0, lr
1.5e-3 after a linspace warmup of 2 epochs from 0, cosine to 1e-5; fp32.
"""

import os

from mim_jax import config_lib
from mim_jax.methods.cae import config as recipe

FIXTURES = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'fixtures'))
FOLDER = os.path.join(FIXTURES, 'curves_mae_tiny', 'photos', 'train')
TOKENIZER = os.path.join(FIXTURES, 'curves_cae_tiny', 'tokenizer',
                         'encoder.pkl')


def get_config(arg=None):
  del arg
  c = config_lib.curves_overrides(recipe.get_config('tiny'), FOLDER)
  c.input.crop_scale = (0.08, 1.0)
  c.input.mask.min_num_patches = 5
  c.model.target = 'tokens'
  c.model.encoder.drop_path_rate = 0.1
  # Sizes and vocabulary from the file (None: read them from it).
  c.tokenizer.update(dict(weights=TOKENIZER, hidden=None, groups=None,
                          blocks_per_group=None, vocab_size=None))
  c.lr = 1.5e-3
  c.schedule.min_lr = 1e-5
  return c

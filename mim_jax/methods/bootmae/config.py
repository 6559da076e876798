"""The BootMAE pretraining recipe, every variant (methods.md 4.3;
LightDXY/BootMAE scripts).

AdamW (0.9, 0.95) hard-coded upstream, wd 0.05 (not on biases, norms, q/v
biases or cls; the mask tokens are decayed), lr 1.5e-4 x batch / 256 at
batch 4096, BEiT schedule (linspace warmup over 40 epochs, per-step cosine
to min_lr 1e-4 for ViT-B, 1e-5 for ViT-L), 800 epochs, no clipping; mean =
std = 0.5 inputs; RandomResizedCrop(0.2-1) + flip; 120 block patches (min
16, max 60 per block) + random patches up to 147 of 196 with a roll of
0..3; decoders 512 wide (pixels) and encoder-wide (features), 2 blocks
each, encoder heads; features tapped from the first and last encoder
blocks; feature weight 1 ramped over the first 25% of training; momentum
encoder 0.999 -> 0.9999 over epochs 0-100, then (ViT-B,
--model_ema_dynamic) -> 0.99999 by epoch 400.
"""

from ml_collections.config_dict import placeholder

from mim_jax import config_lib
from mim_jax import optim

# variant -> what differs: the final lr and the momentum schedule.
VARIANTS = {
    'B/16': dict(min_lr=1e-4, momentum=(0.999, 0.9999, 0.99999),
                 boundary_epochs=(0, 100, 400)),
    'L/16': dict(min_lr=1e-5, momentum=(0.999, 0.9999),
                 boundary_epochs=(0, 100)),
}
# On the embedded photos (config_lib.tiny_overrides): 8 x 8 patches, 30
# block + random patches up to 48 masked, tiny encoder and decoders, the
# EMA schedule over steps; otherwise the ViT-B recipe.
VARIANTS['tiny'] = dict(
    VARIANTS['B/16'],
    tiny_model=dict(variant=None, encoder=config_lib.TINY_ENCODER,
                    decoder_width=48, decoder_depth=2, feature_depth=2,
                    taps=(0, 3)),
    tiny_mask=dict(num_masking_patches=30, min_num_patches=4,
                   max_num_patches=16),
    tiny_ema=dict(momentum=(0.99, 0.999), boundary_steps=(0, 300)))


def get_config(variant: str = 'B/16'):
  """The BootMAE recipe for `variant` (a key of VARIANTS)."""
  v = config_lib.pick(VARIANTS, variant)
  c = config_lib.base_config()
  c.model_name = 'bootmae'
  c.model = dict(
      variant=variant, encoder=dict(), decoder_width=512, decoder_depth=2,
      # The first and the last block: [0, 11] (B), [0, 23] (L).
      feature_depth=2, taps=(0, -1),
      # Scanned blocks (the taps cut the encoder's scan in two), remat
      # keeping the named linears (docs/speed.md).
      scan=True, remat_policy='linears', dtype='bfloat16')
  c.loss = dict(feature_weight=1.0, feature_ramp_fraction=0.25,
                weighted_mask=True)
  c.input.mean = (0.5, 0.5, 0.5)
  c.input.std = (0.5, 0.5, 0.5)
  c.input.mask = dict(kind='block', variant='bootmae',
                      num_masking_patches=120, min_num_patches=16,
                      max_num_patches=60, extra_random=True, roll=3,
                      ratio=0.75)
  c.schedule = dict(min_lr=v['min_lr'], warmup='linspace')
  c.optim.wd_exclude = optim.NO_DECAY + ('cls_token',)
  c.ema = dict(momentum=v['momentum'], boundary_epochs=v['boundary_epochs'],
               boundary_steps=placeholder(tuple))
  if 'tiny_model' in v:
    c = config_lib.tiny_overrides(c)
    c.model = dict(v['tiny_model'], scan=False, remat_policy='none',
                   dtype='float32')
    c.input.mask.update(v['tiny_mask'])
    c.ema = dict(v['tiny_ema'], boundary_epochs=placeholder(tuple))
  return c

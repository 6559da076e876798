r"""BootMAE on photos bundled with scikit-image: no downloads. A tiny ViT,
block + random masks (48 of 64 patches), the momentum encoder as
TrainState.ema_params; trains on a 2-core CPU in a few minutes.

  python -m mim_jax.main --config=configs/bootmae_tiny.py \
      --workdir=/tmp/bootmae_tiny
"""

from mim_jax.methods.bootmae import config as recipe


def get_config(arg=None):
  del arg
  return recipe.get_config('tiny')

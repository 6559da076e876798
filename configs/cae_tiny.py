r"""CAE (pixel targets) on photos bundled with scikit-image: no downloads,
no tokenizer. Block-wise masks (32 of 64 patches), a tiny ViT, regressor and
decoder of 2 blocks; trains on a 2-core CPU in a few minutes.

  python -m mim_jax.main --config=configs/cae_tiny.py --workdir=/tmp/cae_tiny
"""

from mim_jax.methods.cae import config as recipe


def get_config(arg=None):
  del arg
  return recipe.get_config('tiny')

r"""BootMAE ViT-B/16 pretraining on ImageNet-1k, the official recipe.

  python -m mim_jax.main --config=configs/bootmae_vitb.py --workdir=gs://...
"""

from mim_jax.methods.bootmae import config as recipe


def get_config(arg=None):
  del arg
  return recipe.get_config('B/16')

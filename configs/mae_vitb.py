r"""MAE ViT-B/16 pretraining on ImageNet-1k, the official recipe.

  python -m mim_jax.main --config=configs/mae_vitb.py --workdir=gs://...
"""

from mim_jax.methods.mae import config as recipe


def get_config(arg=None):
  del arg
  return recipe.get_config('B/16')

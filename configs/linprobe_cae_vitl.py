"""Linear probe of a pretrained CAE ViT-L encoder on ImageNet-1k (frozen
encoder, BN + linear, LARS)."""

from mim_jax.methods.classifier import config as recipe


def get_config():
  return recipe.get_config('linprobe', 'cae', 'L')

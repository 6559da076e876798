"""Top-1/top-5 of an official fine-tuned BootMAE ViT-B classifier on the
ImageNet-1k validation split."""

from mim_jax.methods.classifier import config as recipe


def get_config():
  return recipe.get_config('eval', 'bootmae', 'B')

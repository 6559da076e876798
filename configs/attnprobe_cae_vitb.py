"""Attentive probe of a pretrained CAE ViT-B encoder on ImageNet-1k (CAE:
cross-attention head, SGD)."""

from mim_jax.methods.classifier import config as recipe


def get_config():
  return recipe.get_config('attnprobe', 'cae', 'B')

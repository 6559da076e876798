"""Fine-tuning of a pretrained MAE ViT-B encoder on ImageNet-1k (the official
recipe; methods.md)."""

from mim_jax.methods.classifier import config as recipe


def get_config():
  return recipe.get_config('finetune', 'mae', 'B')

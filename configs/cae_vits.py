r"""CAE ViT-S/16 pretraining on ImageNet-1k, the official recipe (300 epochs).

Token targets from the DALL-E dVAE: put https://cdn.openai.com/dall-e/encoder.pkl
at ~/.cache/mim_jax/dall_e/encoder.pkl (or pass --config.tokenizer.weights),
or train on normalised pixels with --config.model.target=pixels.

  python -m mim_jax.main --config=configs/cae_vits.py --workdir=gs://...
"""

from mim_jax.methods.cae import config as recipe


def get_config(arg=None):
  del arg
  return recipe.get_config('S/16')

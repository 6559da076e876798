r"""Evaluation only: top-1/top-5 of a fine-tuned tiny classifier on the digits
test split.

  python -m mim_jax.main --config=configs/eval_mae_tiny.py \
    --config.init_from=/tmp/ft_tiny --workdir=/tmp/eval_tiny"""

from mim_jax.methods.classifier import config as recipe


def get_config():
  return recipe.get_config('eval', 'mae', 'tiny')

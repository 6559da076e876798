r"""Fine-tuning a tiny MAE encoder on the embedded digits (scikit-learn; 32 px),
on the CPU.

  python -m mim_jax.main --config=configs/finetune_mae_tiny.py \
    --config.init_from=/tmp/mae_tiny --workdir=/tmp/ft_tiny"""

from mim_jax.methods.classifier import config as recipe


def get_config():
  return recipe.get_config('finetune', 'mae', 'tiny')

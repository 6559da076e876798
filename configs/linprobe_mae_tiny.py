r"""Linear probe of a tiny MAE encoder on the embedded digits (scikit-learn; 32
px), on the CPU.

  python -m mim_jax.main --config=configs/linprobe_mae_tiny.py \
    --config.init_from=/tmp/mae_tiny --workdir=/tmp/lin_tiny"""

from mim_jax.methods.classifier import config as recipe


def get_config():
  return recipe.get_config('linprobe', 'mae', 'tiny')

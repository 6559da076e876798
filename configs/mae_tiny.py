r"""The default job: a tiny MAE on photos bundled with scikit-image.

No downloads. Trains on a 2-core CPU in a few minutes and visibly lowers the
loss; writes metrics.jsonl, TensorBoard events, checkpoints and
reconstruction PNGs into --workdir.

  python -m mim_jax.main --config=configs/mae_tiny.py --workdir=/tmp/mae_tiny
"""

from mim_jax.methods.mae import config as recipe


def get_config(arg=None):
  del arg
  return recipe.get_config('tiny')

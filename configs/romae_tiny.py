r"""Robust MAE, tiny, on the photos bundled with scikit-image (no downloads;
a few minutes on a 2-core CPU): the mae_tiny run with the three switches.

  python -m mim_jax.main --config=configs/romae_tiny.py --workdir=/tmp/romae

The mae_tiny recipe (configs/mae_tiny.py; 4 blocks), plus:
  model.decoder_attn_drop = 0.3   paper (rate from secondary summaries)
  loss.pop_norm = 'running'       paper's idea, OUR form (running,
  loss.pop_axis = 'channel'       per-channel, momentum 0.99)
  model.insert_block = 2          OUR scaling of "8th of 12 layers" (7 blocks
                                  before the tokens) to 4 blocks: 2 before
  model.insert_ratio = 0.25       secondary summaries (ViT-B)
  loss.inserted_in_loss = True    OUR choice
"""

from mim_jax.methods.mae import config as recipe


def get_config(arg=None):
  del arg
  return recipe.robust(recipe.get_config('tiny'), insert_block=2,
                       insert_ratio=0.25)

r"""Robust MAE ViT-L/16 pretraining on ImageNet-1k (methods.md section 1).

  python -m mim_jax.main --config=configs/romae_vitl.py --workdir=gs://...

The official MAE ViT-L recipe (configs/mae_vitl.py), plus:
  model.decoder_attn_drop = 0.3   paper: decoder attention-probability
                                  dropout; 0.3 from secondary summaries
  loss.pop_norm = 'running'       paper: population statistics before the
  loss.pop_axis = 'channel'       per-patch normalisation; this form is
  loss.pop_momentum = 0.99        OUR reading
  model.insert_block = None       no encoder mask tokens: the secondary
                                  summaries describe insertion for the
                                  smaller model only (the paper: capacity
                                  decides "to varying degrees")
"""

from mim_jax.methods.mae import config as recipe


def get_config(arg=None):
  del arg
  return recipe.robust(recipe.get_config('L/16'), insert_block=None)

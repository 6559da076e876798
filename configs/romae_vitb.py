r"""Robust MAE ViT-B/16 pretraining on ImageNet-1k ("A Robustly and
Effectively Optimized Pre-training Approach for Masked Autoencoder", ICLR
2023 submission; methods.md section 1).

  python -m mim_jax.main --config=configs/romae_vitb.py --workdir=gs://...

The official MAE ViT-B recipe (configs/mae_vitb.py), plus:
  model.decoder_attn_drop = 0.3   paper: dropout on the decoder's attention
                                  probabilities; 0.3 from secondary
                                  summaries of the paper (unverified)
  loss.pop_norm = 'running'       paper: population statistics before the
  loss.pop_axis = 'channel'       per-patch normalisation; the running,
  loss.pop_momentum = 0.99        per-channel EMA form is OUR reading
  model.insert_block = 7          secondary summaries: 25% extra mask
  model.insert_ratio = 0.25       tokens "at the 8th encoder layer" for
                                  ViT-B; "8th" read as 1-based, i.e.
                                  before block index 7 (OUR reading)
  loss.inserted_in_loss = True    OUR choice (the paper's is unknown)
Everything else (epochs, lr, masks) is MAE's: the paper builds on MAE's
recipe. The measured effect of each switch is in docs/training.md (digits
ablation, benchmarks/romae_ablation.py).
"""

from mim_jax.methods.mae import config as recipe


def get_config(arg=None):
  del arg
  return recipe.robust(recipe.get_config('B/16'), insert_block=7,
                       insert_ratio=0.25)

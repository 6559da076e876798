"""The MAE pretraining recipe, every variant (methods.md 2.2;
facebookresearch/mae PRETRAIN.md): the shared defaults of
`config_lib.base_config` are the official MAE ones; this adds the model
(decoder 512 wide, 8 deep, 16 heads, random 75% masks) and norm-pix
targets (the released checkpoints).

The robust-MAE switches (methods.md 1; `configs/romae_*.py`) are here, off:
attention-probability dropout in the decoder / encoder, encoder mask tokens
(`insert_block`, 0-based, None = off; `insert_ratio` of all patches) and
population statistics before norm-pix (`loss.pop_*`, see
mim_jax/methods/mae/loss.py).
"""

from mim_jax import config_lib

# variant -> (model fields, tiny run on the embedded photos).
VARIANTS = {
    'B/16': (dict(variant='B/16'), False),
    'L/16': (dict(variant='L/16'), False),
    'H/14': (dict(variant='H/14'), False),
    'tiny': (dict(variant=None, scan=False, remat_policy='none',
                  encoder=config_lib.TINY_ENCODER, decoder_width=64,
                  decoder_depth=2, decoder_num_heads=4), True),
}


def get_config(variant: str = 'B/16'):
  """The MAE recipe for `variant` (a key of VARIANTS)."""
  model, tiny = config_lib.pick(VARIANTS, variant)
  c = config_lib.base_config()
  c.model_name = 'mae'
  c.model = dict(
      variant=None, encoder=dict(), decoder_width=512, decoder_depth=8,
      decoder_num_heads=16, decoder_attn_drop=0.0, encoder_attn_drop=0.0,
      insert_block=config_lib.placeholder(int), insert_ratio=0.25,
      scan=True,
      # Recompute LayerNorms, softmax and GELU in the backward pass, keep
      # the linear layers' outputs (layers.REMAT_POLICIES): 1.2x faster on
      # CPU than no remat, and less activation memory (docs/speed.md).
      remat_policy='linears', dtype='bfloat16')
  c.model.update(model)
  c.loss = dict(norm_pix_loss=True, pop_norm='none', pop_axis='channel',
                pop_mean=(0.0, 0.0, 0.0), pop_std=(1.0, 1.0, 1.0),
                pop_momentum=0.99, pop_eps=1e-6, inserted_in_loss=True)
  return config_lib.tiny_overrides(c) if tiny else c


def robust(c, *, insert_block=None, insert_ratio: float = 0.25):
  """The robust-MAE switches on an MAE recipe (methods.md 1; the paper's
  method sections and code are not public, so most values are our reading,
  marked as such):

  - decoder attention-probability dropout 0.3: the paper's ("drop edge at
    the decoding", abstract); the rate 0.3 is from secondary summaries of
    the paper, not verified;
  - population statistics before norm-pix: the paper's idea (abstract);
    the form is ours: 'running' (a debiased EMA, momentum 0.99, of the
    batches' per-channel mean and biased variance, eps 1e-6);
  - encoder mask tokens for `insert_ratio` of all patches before the
    0-based block `insert_block`: 25% at "the 8th layer" is from secondary
    summaries (ViT-B); "8th layer" read as block index 7; counting the
    inserted patches in the loss is ours.
  """
  c.model.decoder_attn_drop = 0.3
  c.loss.pop_norm = 'running'
  c.loss.pop_axis = 'channel'
  c.loss.pop_momentum = 0.99
  c.model.insert_block = insert_block
  c.model.insert_ratio = insert_ratio
  c.loss.inserted_in_loss = True
  return c

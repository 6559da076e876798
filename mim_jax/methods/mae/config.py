"""The MAE pretraining recipe, every variant (methods.md 2.2;
facebookresearch/mae PRETRAIN.md): the shared defaults of
`config_lib.base_config` are the official MAE ones; this adds the model
(decoder 512 wide, 8 deep, 16 heads, random 75% masks) and norm-pix
targets (the released checkpoints).
"""

from mim_jax import config_lib

# variant -> (model fields, tiny run on the embedded photos).
VARIANTS = {
    'B/16': (dict(variant='B/16'), False),
    'L/16': (dict(variant='L/16'), False),
    'H/14': (dict(variant='H/14'), False),
    'tiny': (dict(variant=None, scan=False,
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
      decoder_num_heads=16, decoder_attn_drop=0.0,
      mask_ratio=c.get_ref('mask_ratio'), scan=True, remat_policy='none',
      dtype='float32')
  c.model.update(model)
  c.loss = dict(norm_pix_loss=True)
  return config_lib.tiny_overrides(c) if tiny else c

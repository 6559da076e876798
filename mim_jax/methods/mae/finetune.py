"""How the classifier fine-tunes and probes the MAE encoder (methods.md
2.3-2.4; facebookresearch/mae FINETUNE.md, LINPROBE.md): the record that
`classifier` configs read (`recipe.get_config(task, 'mae', size)`).

The fine-tuning encoder is timm's ViT (qkv bias, no layer scale) with a
learned position embedding initialised from the pretraining sin-cos table
(`models_vit.py` + `interpolate_pos_embed`).
"""

from mim_jax import config_lib
from mim_jax import method

R = method.Recipe

CARD = method.EncoderCard(
    encoder=dict(posemb='learned'),
    key_prefix='',
    mean=config_lib.IMAGENET_MEAN,
    std=config_lib.IMAGENET_STD,
    recipes={
        # FINETUNE.md: blr 5e-4 / 1e-3, layer decay 0.65 / 0.75, drop path
        # 0.1 / 0.2 / 0.3, 100 / 50 / 50 epochs, batch 1024, warmup 5.
        ('finetune', 'B'): R(epochs=100, batch=1024, blr=5e-4,
                             layer_decay=0.65, drop_path=0.1),
        ('finetune', 'L'): R(epochs=50, batch=1024, blr=1e-3,
                             layer_decay=0.75, drop_path=0.2),
        ('finetune', 'H'): R(epochs=50, batch=1024, blr=1e-3,
                             layer_decay=0.75, drop_path=0.3),
        # Linear probe: LARS, blr 0.1, batch 16384, warmup 10, wd 0.
        ('linprobe', 'B'): R(epochs=90, batch=16384, blr=0.1),
        ('linprobe', 'L'): R(epochs=50, batch=16384, blr=0.1),
        ('linprobe', 'H'): R(epochs=50, batch=16384, blr=0.1),
    },
    randaugment='rand-m9-mstd0.5-inc1')

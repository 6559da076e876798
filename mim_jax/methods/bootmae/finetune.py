"""How the classifier fine-tunes and probes the BootMAE encoder (methods.md
4.4-4.5; the official scripts/finetune and scripts/linear): the record that
`classifier` configs read (`recipe.get_config(task, 'bootmae', size)`).

The fine-tuning encoder (models/modeling_finetune_bootmae.py) is BEiT's ViT
with q/v biases and the row-first sin-cos table kept fixed (a parameter
with requires_grad=False). Its VisionTransformer builds every block with
init_values=None and window_size=None and always adds the fixed 14x14
sin-cos table, so the `--abs_pos_emb`, `--disable_rel_pos_bias` and
`--layer_scale_init_value` flags of scripts/finetune/*.sh change nothing:
no layer scale, no relative bias. Inputs are normalised with mean = std =
0.5, as in pretraining.
"""

from mim_jax import method

R = method.Recipe

CARD = method.EncoderCard(
    encoder=dict(qkv_bias='qv', posemb_row_first=True, posemb='sincos',
                 rel_pos_bias=False),
    key_prefix='',
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    recipes={
        # scripts/finetune: warmup 20 (B) / 5 (L), layer decay 0.6 (B) (the
        # paper's table says 0.65; the script sets 0.6).
        ('finetune', 'B'): R(epochs=100, batch=2048, lr=5e-3,
                             layer_decay=0.6, drop_path=0.1, warmup=20),
        ('finetune', 'L'): R(epochs=50, batch=1024, lr=1.5e-3,
                             layer_decay=0.75, drop_path=0.1),
        # scripts/linear: LARS, batch 16384, warmup 10, wd 0, on the average
        # pool of block 10 (B; the README's example says 9, the script 10) /
        # 18 (L) in 1-based counting of the official `--depth`, i.e. the
        # output of 0-based block 9 / 17.
        ('linprobe', 'B'): R(epochs=90, batch=16384, blr=0.1,
                             feature_block=9),
        ('linprobe', 'L'): R(epochs=50, batch=16384, blr=0.07,
                             feature_block=17),
    },
    randaugment='rand-m9-mstd0.5-inc1',
    # A model EMA (timm ModelEma, 0.9998), which it evaluates.
    finetune_ema=0.9998)

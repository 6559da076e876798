"""How the classifier fine-tunes and probes the CAE encoder (methods.md
3.3-3.4; the official scripts): the record that `classifier` configs read
(`recipe.get_config(task, 'cae', size)`).

The fine-tuning encoder is BEiT's ViT (tools/run_class_finetuning.py:
--rel_pos_bias, --sin_pos_emb and --layer_scale_init_value 0.1 are the
defaults, which scripts/cae_{base,large}_finetune.sh keep, ViT-L included;
models/modeling_finetune.py): q/v biases, layer scale 0.1, the row-first
sin-cos table kept fixed (a parameter with requires_grad=False), and a
per-block relative position bias, which the pretraining file lacks and
which starts at zeros. The official state dicts keep the encoder under
'encoder.'.
"""

from mim_jax import config_lib
from mim_jax import method

R = method.Recipe

CARD = method.EncoderCard(
    encoder=dict(qkv_bias='qv', layer_scale=0.1, posemb_row_first=True,
                 posemb='sincos', rel_pos_bias=True),
    key_prefix='encoder.',
    mean=config_lib.IMAGENET_MEAN,
    std=config_lib.IMAGENET_STD,
    recipes={
        # scripts/cae_{base,large}_finetune.sh: absolute lr, batch 4096.
        ('finetune', 'B'): R(epochs=100, batch=4096, lr=8e-3,
                             layer_decay=0.65, drop_path=0.1),
        ('finetune', 'L'): R(epochs=50, batch=4096, lr=2e-3,
                             layer_decay=0.75, drop_path=0.2),
        # Linear probe: LARS, blr 0.1, batch 16384, warmup 10, wd 0.
        ('linprobe', 'B'): R(epochs=90, batch=16384, blr=0.1),
        ('linprobe', 'L'): R(epochs=90, batch=16384, blr=0.1),
        # Attentive probe: SGD momentum 0.9, lr 0.4, batch 8192, 90 epochs.
        ('attnprobe', 'B'): R(epochs=90, batch=8192, lr=0.4),
        ('attnprobe', 'L'): R(epochs=90, batch=8192, lr=0.4),
    },
    # Its fine-tuning scripts leave `--aa` empty: no RandAugment.
    randaugment=None)

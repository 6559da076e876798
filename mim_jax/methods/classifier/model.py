"""Image classifier on the shared ViT encoder: fine-tuning and probing.

One module serves every pretraining method, since they all pretrain
`vit.Encoder`; the method's fine-tune encoder differs only in its fields
(MAE: qkv_bias=True; CAE and BootMAE: BEiT-style qkv_bias='qv' with layer
scale and a row-first sin-cos table). The variants mirror the official
recipes:

* fine-tuning (timm `VisionTransformer` / MAE `models_vit.py` / BEiT): head
  'linear' on the average-pooled patch tokens after `fc_norm`
  (pool='avg'), or on the cls token after the encoder's final norm
  (pool='cls');
* linear probing (MAE / CAE / BootMAE `main_linprobe`): head 'bn_linear', a
  BatchNorm without affine then the linear head, on a frozen encoder;
* attentive probing (CAE `run_attentive.py`): head 'attentive', a learned
  query cross-attending to the encoder's tokens, then BatchNorm and linear.

Param names follow the official checkpoints so that conversion is a rename
(`convert.py`): {'encoder', 'fc_norm' (avg pool), 'head'} and, for the
attentive probe, 'query_token' and 'attentive_block'. BatchNorm running
statistics live in the 'batch_stats' collection.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models import layers
from mim_jax.models import vit

POOLS = ('avg', 'cls')
HEADS = ('linear', 'bn_linear', 'attentive')


def trunc_normal(std: float):
  """timm's `trunc_normal_(std=std)`: a normal cut at -2 and 2 in absolute
  units (not in stds), which for the small head stds is a plain normal."""
  return nn.initializers.truncated_normal(std, lower=-2.0 / std,
                                          upper=2.0 / std)


class BatchNorm(nn.Module):
  """torch `BatchNorm1d(affine=False)` over the last axis.

  Training normalises with the batch's (biased) variance and updates the
  running variance with the unbiased one, as torch does (flax's BatchNorm
  keeps the biased one, a factor n / (n - 1) off after each step). The
  running 'mean' and 'var' are in the 'batch_stats' collection; no params.
  `momentum` is flax's (the weight of the old statistics): torch's 0.1 is
  0.9 here. Statistics are computed in float32.
  """
  momentum: float = 0.9
  epsilon: float = 1e-6
  use_running_average: bool = False

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    d = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (d,),
                            jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (d,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = x.mean(axes)
      var = jnp.square(x - mean).mean(axes)  # two-pass, like torch
      if not self.is_initializing():
        n = x.size // d
        unbiased = var * n / max(n - 1, 1)
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * unbiased
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon)


class CrossAttention(nn.Module):
  """CAE's `CrossAttention`: separate q, k, v projections without bias,
  plus learned `q_bias` and `v_bias` (no key bias, BEiT's choice, which CAE
  keeps for the probe since its models set qkv_bias=True), then `proj`.

  Linear weights start from trunc_normal(.02), CAE's `_init_weights`.
  """
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q, k, v):
    d = q.shape[-1]
    inner = layers.inner_dim(d, self.num_heads, floor_head_dim=False)

    def dense(features, names, name, use_bias):
      return nn.Dense(
          features, use_bias=use_bias, dtype=self.dtype,
          kernel_init=layers.logical(trunc_normal(0.02), names),
          bias_init=layers.logical(nn.initializers.zeros_init(), names[1:]),
          name=name)

    q_bias, v_bias = layers.qv_biases(self, inner)
    q = dense(inner, ('embed', 'heads'), 'q', False)(q) + q_bias.astype(
        self.dtype)
    k = dense(inner, ('embed', 'heads'), 'k', False)(k)
    v = dense(inner, ('embed', 'heads'), 'v', False)(v) + v_bias.astype(
        self.dtype)
    out = layers.attend(q, k, v, self.num_heads, self.dtype)
    return dense(d, ('heads', 'embed'), 'proj', True)(out)


class AttentiveBlock(nn.Module):
  """CAE's `AttentiveBlock`: LayerNorms on the query, key and value inputs,
  then cross attention; no MLP and no residual. CAE's position inputs are
  zero in the probe, so there are none here."""
  num_heads: int
  layernorm_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, tokens):
    norm = lambda name: layers.layer_norm(self.layernorm_eps, self.dtype,
                                          name)
    return CrossAttention(self.num_heads, self.dtype, name='cross_attn')(
        norm('norm_q')(query), norm('norm_k')(tokens),
        norm('norm_v')(tokens))


class BNLinear(nn.Module):
  """MAE's linear-probe head `Sequential(BatchNorm1d(affine=False), Linear)`
  as 'bn' (batch statistics only) and 'linear'."""
  num_classes: int
  kernel_init: Any
  bias_init: Any
  bn_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = BatchNorm(epsilon=self.bn_eps, use_running_average=not train,
                  name='bn')(x)
    return nn.Dense(self.num_classes, dtype=self.dtype,
                    kernel_init=self.kernel_init, bias_init=self.bias_init,
                    name='linear')(x)


class Classifier(nn.Module):
  """ViT encoder + pooling + classification head.

  Attributes:
    encoder: `vit.Encoder` fields (width, depth, qkv_bias, layer_scale,
      posemb, ...). `final_norm` and `taps` are set here: the encoder keeps
      its final norm for pool='cls' only.
    num_classes: head outputs.
    pool: 'avg' (mean of the patch tokens, cls excluded, then the `fc_norm`
      LayerNorm, timm's global_pool='avg' + fc_norm) or 'cls' (the cls
      token after the encoder's final norm). For head='attentive' nothing
      is pooled: the query attends over all tokens, cls included as in CAE,
      after the final norm for pool='cls' (CAE's published `--use_cls`
      recipe) and raw for pool='avg' (CAE's default, where its norm is the
      identity); there is no `fc_norm` LayerNorm then.
    head: 'linear'; 'bn_linear' (BatchNorm without affine, then linear: the
      MAE / CAE / BootMAE linear probe); 'attentive' (CAE's attentive
      probe: query token, `AttentiveBlock`, BatchNorm without affine,
      linear).
    feature_block: take the features from the output of this 0-based block
      instead of the last, through the same normalisation as the last block
      would get: `fc_norm` after pooling for 'avg', the encoder's final norm
      for 'cls' (and the attentive probe). That is what a model truncated
      after that block computes, which is how BootMAE probes (its
      `--depth 10` on ViT-B is feature_block=9, with average pooling); the
      later blocks still run and keep their params, so full checkpoints
      load. With scan=True the encoder's scan runs in two segments.
    freeze_encoder: the encoder outputs pass through `stop_gradient`, so
      probes compute no encoder gradients (the encoder grads are zeros).
    head_init_std: the head kernel's trunc-normal std (timm
      `trunc_normal_`): 2e-5 for MAE fine-tuning, 0.01 for linear probes.
    head_bias_init: the head bias's constant init.
    bn_eps: BatchNorm epsilon; None takes the official value of the head:
      1e-6 for 'bn_linear' (MAE's BatchNorm1d(eps=1e-6)), 1e-5 for
      'attentive' (CAE's LP_BatchNorm, torch's default).
    scan, remat_policy: passed to the encoder.
    dtype: compute dtype of the encoder, fc_norm and attentive block
      (params, BatchNorm, the head and its logits stay float32).
  """
  encoder: dict
  num_classes: int
  pool: str = 'avg'
  head: str = 'linear'
  feature_block: Optional[int] = None
  freeze_encoder: bool = False
  head_init_std: float = 2e-5
  head_bias_init: float = 0.0
  bn_eps: Optional[float] = None
  scan: bool = False
  remat_policy: str = 'none'
  dtype: Any = jnp.float32

  @property
  def depth(self) -> int:
    return int(self.encoder.get('depth', vit.Encoder.depth))

  def encoder_fields(self) -> dict:
    """The `vit.Encoder` fields, validated, with final_norm and taps set.

    Raises:
      ValueError: unknown pool or head, a feature_block outside the
        encoder's blocks, or an encoder `final_norm`
        that contradicts the pooling.
    """
    if self.pool not in POOLS:
      raise ValueError(f'classifier pool={self.pool!r}: use one of {POOLS}.')
    if self.head not in HEADS:
      raise ValueError(f'classifier head={self.head!r}: use one of {HEADS}.')
    fields = dict(self.encoder)
    final_norm = self.pool == 'cls'
    if fields.get('final_norm', final_norm) != final_norm:
      raise ValueError(
          f"encoder final_norm={fields['final_norm']} does not fit "
          f"pool={self.pool!r}: pool='cls' uses the encoder's final norm, "
          "pool='avg' the classifier's fc_norm. Leave final_norm unset.")
    fields['final_norm'] = final_norm
    if self.feature_block is not None:
      if not 0 <= self.feature_block < self.depth:
        raise ValueError(
            f'feature_block={self.feature_block} is outside the encoder '
            f'of depth {self.depth}: use 0..{self.depth - 1} (0-based).')
      fields['taps'] = (self.feature_block,)
      fields['norm_taps'] = final_norm
    return fields

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = False):
    """Classifies `batch['image']` (N, H, W, 3), normalised float32.

    Args:
      batch: dict with 'image'; other keys are ignored.
      train: enables drop path and BatchNorm batch statistics (run with
        mutable=['batch_stats'] for the 'bn_linear' and 'attentive'
        heads, whose running statistics then update).

    Returns:
      (logits, out): logits (N, num_classes) float32; out holds
      'features' (N, width), what enters the head (its BatchNorm
      included): the pooled feature, or the attentive probe's output.
    """
    fields = self.encoder_fields()
    enc = vit.Encoder(**fields, scan=self.scan,
                      remat_policy=self.remat_policy, dtype=self.dtype,
                      name='encoder')
    x, enc_out = enc(batch['image'], train=train)
    if self.feature_block is not None:
      x = enc_out['taps'][0]
    if self.freeze_encoder:
      x = jax.lax.stop_gradient(x)
    eps = fields.get('layernorm_eps', vit.Encoder.layernorm_eps)
    width = x.shape[-1]
    if self.head == 'attentive':
      query = self.param('query_token',
                         layers.logical(nn.initializers.zeros_init(),
                                        (None, None, 'embed')),
                         (1, 1, width))
      query = jnp.broadcast_to(query.astype(self.dtype),
                               (x.shape[0], 1, width))
      feats = AttentiveBlock(enc.num_heads, eps, self.dtype,
                             name='attentive_block')(query, x)[:, 0]
    elif self.pool == 'avg':
      feats = layers.layer_norm(eps, self.dtype, 'fc_norm')(
          x[:, 1:].mean(axis=1))
    else:
      feats = x[:, 0]
    # The head runs in float32 whatever the compute dtype: a (width x
    # classes) matmul, and the logits keep their precision for the loss.
    feats = feats.astype(jnp.float32)
    kernel_init = layers.logical(trunc_normal(self.head_init_std),
                                 ('embed', None))
    bias_init = layers.logical(nn.initializers.constant(self.head_bias_init),
                               (None,))
    if self.head == 'bn_linear':
      logits = BNLinear(self.num_classes, kernel_init, bias_init,
                        1e-6 if self.bn_eps is None else self.bn_eps,
                        jnp.float32, name='head')(feats, train=train)
    else:
      y = feats
      if self.head == 'attentive':
        # CAE names this BatchNorm `fc_norm` (statistics only).
        y = BatchNorm(epsilon=1e-5 if self.bn_eps is None else self.bn_eps,
                      use_running_average=not train, name='fc_norm')(y)
      logits = nn.Dense(self.num_classes, dtype=jnp.float32,
                        kernel_init=kernel_init, bias_init=bias_init,
                        name='head')(y)
    return logits.astype(jnp.float32), {'features': feats}


def Model(*, variant: Optional[str] = None, encoder: Optional[dict] = None,
          **kw) -> Classifier:
  """Builds the Classifier from a ViT variant ('B/16') and/or explicit
  encoder fields."""
  return Classifier(encoder=vit.encoder_fields(variant, encoder), **kw)

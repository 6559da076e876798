"""A throwaway method built through the contract alone
(docs/adding_a_method.md): nothing in mim_jax/ names it. It predicts every
masked patch from the visible tokens' mean latent plus a learned per-position embedding, and
regresses the patch pixels centred by a running per-channel mean (a
'running' target provider, whose state lives in TrainState.target_state).
Its classifier card (`CARD`) alone makes `classifier` configs for it:
fine-tuning and probes of its encoder.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mim_jax import config_lib
from mim_jax import method
from mim_jax.convert import core
from mim_jax.models import layers
from mim_jax.models import vit


class Toy(nn.Module):
  encoder: dict
  mask_ratio: float = 0.75

  @nn.compact
  def __call__(self, batch, *, train=False):
    images, mask = batch['image'], batch['mask']
    enc = vit.Encoder(**self.encoder, name='encoder')
    grid = enc.grid(images)
    ids_vis, _ = vit.split_by_mask(mask, grid, self.mask_ratio)
    latent, _ = enc(images, ids_vis, train=train)
    p = enc.patch_size
    pos = self.param('pos', layers.logical(nn.initializers.normal(0.02),
                                           (None, 'embed')),
                     (grid[0] * grid[1], enc.width))
    x = latent.mean(axis=1, keepdims=True) + pos[None]
    pred = layers.dense(p * p * 3, ('embed', None), jnp.float32, 'head')(x)
    return pred, {'mask': mask,
                  'target': layers.patchify(images, p)}


def loss(pred, out, batch, *, step, schedule):
  del step, schedule
  centred = out['target'] - jnp.tile(batch['channel_mean'],
                                     out['target'].shape[-1] // 3)
  per_patch = ((pred - centred) ** 2).mean(-1)
  mse = (per_patch * out['mask']).sum() / out['mask'].sum()
  return mse, {'mse': mse}


def _running_mean(state, batch, step):
  del step
  return 0.9 * state + 0.1 * batch['image'].mean(axis=(0, 1, 2))


def targets(config):
  del config
  return (method.TargetProvider(
      name='pixel_stats', kind='running',
      compute=lambda state, batch: {'channel_mean': state},
      outputs=('channel_mean',),
      init=lambda params: jnp.zeros((3,), jnp.float32),
      update=_running_mean),)


# (torch prefix, flax prefix) for `convert.core`.
RULES = [('encoder.', 'encoder/'), ('pos', 'pos'), ('head.', 'head/')]

# What the classifier needs: the encoder as fine-tuned (here: as
# pretrained, with a learned position embedding), where official files keep
# it, the input normalisation and (none here) official recipes.
CARD = method.EncoderCard(encoder=dict(posemb='learned'),
                          key_prefix='encoder.',
                          mean=config_lib.IMAGENET_MEAN,
                          std=config_lib.IMAGENET_STD)

METHOD = method.Method(
    name='toy',
    build_model=lambda c: Toy(encoder=dict(c.model.encoder),
                              mask_ratio=config_lib.mask_ratio(c)),
    batch_spec=lambda c, bs: method.image_batch(
        c, bs, vit.patch_size_of(c.model), ('image', 'mask')),
    loss=loss,
    to_pixels=None,
    converter=method.Converter(
        to_flax=lambda sd, model, params, size, strict=True: (
            core.torch_to_flax(sd, params, RULES, strict=strict)),
        to_torch=lambda params, model, size: core.flax_to_torch(params,
                                                                RULES),
        to_torch_keys=functools.partial(core.flax_to_torch, rules=RULES)),
    targets=targets,
    classifier=CARD,
    encoder=lambda c: dict(c.model.encoder))


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  c = config_lib.tiny_overrides(config_lib.base_config())
  c.model_name = 'toy'
  c.model = dict(encoder=dict(config_lib.TINY_ENCODER, depth=1))
  c.input.batch_size = 8
  c.total_steps = 4
  c.warmup_steps = 1
  c.log_every_steps = 2
  c.ckpt_every_steps = 2
  c.mesh = (('data', -1),)
  return c

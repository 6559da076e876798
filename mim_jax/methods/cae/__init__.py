"""CAE, Context Autoencoder (Chen et al. 2022, v1), as one `Method` record.

Files: model.py (encoder, latent regressor, decoder), loss.py (token CE or
pixel MSE + alignment), convert.py (official keys, teacher copy), parity.py
(fixture adapter), config.py (the recipe, every variant), finetune.py (its
encoder's classifier card: fine-tuning and probe recipes). Token targets use
the shared frozen tokenizer provider (mim_jax/targets/tokenizer.py).
"""

from mim_jax import config_lib
from mim_jax import method
from mim_jax.methods.cae import convert
from mim_jax.methods.cae import finetune
from mim_jax.methods.cae import loss
from mim_jax.methods.cae import model
from mim_jax.methods.cae import parity
from mim_jax.models import vit
from mim_jax.targets import pixels
from mim_jax.targets import tokenizer


def build_model(config):
  """The model of `config.model`, masking `config_lib.mask_ratio(config)`
  (input.mask.ratio) of the patches; with token targets and no
  `model.vocab_size`, the vocabulary of the tokenizer file."""
  net = method.model_from_config(model.Model, config,
                                 mask_ratio=config_lib.mask_ratio(config))
  if _tokenizer(config) and config.model.get('vocab_size') is None:
    net = net.clone(vocab_size=tokenizer.sizes(config)['vocab_size'])
  return net


def _tokens(config) -> bool:
  return config.model.get('target', 'tokens') == 'tokens'


def _tokenizer(config) -> bool:
  """Token ids come from the tokenizer (unless a fixture gives them: the
  parity configs have no `tokenizer`)."""
  return _tokens(config) and bool(config.get('tokenizer'))


def views(config) -> dict:
  if not _tokenizer(config):
    return {}
  return {tokenizer.VIEW: tokenizer.view(config,
                                         vit.patch_size_of(config.model))}


def batch_spec(config, batch_size: int) -> dict:
  """Images, the block mask and, for token targets, the tokenizer view."""
  return method.image_batch(config, batch_size,
                            vit.patch_size_of(config.model),
                            ('image', 'mask'), views(config))


def targets(config) -> tuple:
  return (tokenizer.provider(config),) if _tokenizer(config) else ()


def validate_config(config) -> None:
  """Token targets need the tokenizer file's path and a matching vocab; a
  per-block encoder drop path needs the decoders' own rate."""
  build_model(config).decoder_rate()
  if _tokens(config):
    tokenizer.validate_config(config)


def to_pixels(config, pred, out, batch):
  """Pixel targets: the masked predictions on the full grid (visible rows
  zero), norm-pix mapped back with each patch's statistics; token targets
  have no pixels (the dVAE decoder is not part of mim_jax)."""
  del pred
  if _tokens(config):
    return None
  return pixels.to_input_space(
      out['pred_patches'], batch['image'], vit.patch_size_of(config.model),
      config.loss.get('norm_pix_loss', True),
      config.loss.get('norm_pix_eps', 1e-6))


def encoder(config) -> dict:
  """The encoder's vit.Encoder fields (params['encoder'])."""
  return method.model_from_config(model.Model, config).encoder_fields()


def init_rules(config) -> tuple:
  del config
  return model.INIT_RULES


METHOD = method.Method(
    name='cae',
    build_model=build_model,
    batch_spec=batch_spec,
    loss=loss.loss_fn,
    to_pixels=to_pixels,
    converter=method.Converter(to_flax=convert.to_flax,
                               to_torch=convert.to_torch,
                               to_torch_keys=convert.to_torch_keys),
    parity=parity.ADAPTER,
    targets=targets,
    views=views,
    validate_config=validate_config,
    classifier=finetune.CARD,
    encoder=encoder,
    init_rules=init_rules)

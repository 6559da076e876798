"""🤗 transformers ViTMAE / ViT both ways, against the real library (CPU
torch, models built from configs with random weights, no hub access).

With the same `noise`, ViTMAEForPreTraining's loss, mask and logits equal
ours within 1e-5 of their largest value in both directions; the round trip
is bit-exact; CAE's and BootMAE's encoders load into ViTModel and match our
encoder on whole images; bad folders fail with one line before anything
compiles.
"""

import json
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mim_jax import errors
from mim_jax import experiment
from mim_jax import state as state_lib
from mim_jax import weights
from mim_jax.convert import hf_vit
from mim_jax.methods.bootmae import config as bootmae_config
from mim_jax.methods.cae import config as cae_config
from mim_jax.methods.classifier import config as classifier_config
from mim_jax.methods.mae import config as mae_config
from mim_jax.models import layers
from mim_jax.models import vit
from mim_jax.tools import convert as convert_tool

torch = pytest.importorskip('torch')
with warnings.catch_warnings():  # torchvision's missing C ops
  warnings.simplefilter('ignore')
  transformers = pytest.importorskip('transformers')

# Tiny sizes: 32 px images of 4 x 4 patches of 8 px.
MU = dict(width=32, depth=2, num_heads=2, mlp_dim=128, patch_size=8)


def _mae_config():
  c = mae_config.get_config('tiny')
  c.model.update(scan=False, dtype='float32', encoder=dict(MU),
                 decoder_width=16, decoder_depth=1, decoder_num_heads=2)
  return c


def _hf_mae_config(**kw):
  return transformers.ViTMAEConfig(**dict(dict(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=128, image_size=32, patch_size=8,
      decoder_hidden_size=16, decoder_num_hidden_layers=1,
      decoder_num_attention_heads=2, decoder_intermediate_size=64,
      layer_norm_eps=1e-6, norm_pix_loss=True, mask_ratio=0.75), **kw))


def _random_hf_mae(seed=0):
  """ViTMAEForPreTraining with noise on every param; the position tables
  set to the fixed sin-cos ones, as the hub checkpoints hold (transformers
  5.25 builds them as zeros)."""
  torch.manual_seed(seed)
  hm = transformers.ViTMAEForPreTraining(_hf_mae_config()).eval()
  with torch.no_grad():
    for name, p in hm.named_parameters():
      p.add_(0.05 * torch.randn_like(p))
    hm.vit.embeddings.position_embeddings.copy_(
        torch.from_numpy(layers.posemb_sincos_2d(4, 4, 32)))
    hm.decoder.decoder_pos_embed.copy_(
        torch.from_numpy(layers.posemb_sincos_2d(4, 4, 16)))
  return hm


def _inputs(num_patches=16, n=2, seed=0):
  """(images (N, 3, 32, 32), masking noise (N, num_patches))."""
  rs = np.random.RandomState(seed)
  x = rs.randn(n, 3, 32, 32).astype(np.float32)
  return x, rs.rand(n, num_patches).astype(np.float32)


def _rel(got, want):
  return float(np.abs(np.asarray(got) - np.asarray(want)).max() /
               np.abs(np.asarray(want)).max())


def _ours(config, params, x, noise):
  """(loss, pred, mask) of our MAE; `noise` (N, L) masks as the official
  random_masking: argsort(noise), the first len_keep kept."""
  model = experiment.build_model(config)
  batch = {'image': jnp.asarray(x.transpose(0, 2, 3, 1)),
           'noise': jnp.asarray(noise)}
  pred, out = jax.jit(model.apply)({'params': params}, batch)
  loss, _ = experiment.method_of(config).loss(
      pred, out, batch, step=0, schedule=None, **dict(config.loss))
  return float(loss), np.asarray(pred), np.asarray(out['mask'])


def _theirs(hm, x, noise):
  with torch.no_grad():
    o = hm(pixel_values=torch.from_numpy(x), noise=torch.from_numpy(noise))
  return float(o.loss), o.logits.numpy(), o.mask.numpy()


def _assert_parity(ours, theirs, what):
  (la, pa, ma), (lb, pb, mb) = ours, theirs
  np.testing.assert_array_equal(ma, mb)
  assert abs(la - lb) / abs(lb) < 1e-5, (what, la, lb)
  assert _rel(pa, pb) < 1e-5, (what, _rel(pa, pb))


def _load_hf(cls, path, **kw):
  model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert not info['mismatched_keys'], info
  return model.eval()


def test_transformers_to_mim_jax(tmp_path):
  """HF -> ours: save_pretrained's folder, the same weights under
  transformers 5's in-memory names in a pytorch_model.bin, and sharded
  safetensors all import to the same params, which compute HF's loss, mask
  and logits."""
  hm = _random_hf_mae()
  folder = str(tmp_path / 'hf')
  hm.save_pretrained(folder)
  c = _mae_config()
  model = experiment.build_model(c)
  params = weights.from_torch(c, model, folder)
  x, noise = _inputs()
  _assert_parity(_ours(c, params, x, noise), _theirs(hm, x, noise), 'in')
  # transformers 5 names (vit.layers.N.attention.q_proj, ...) and a
  # pickled pytorch_model.bin (torch.load(weights_only=True)).
  other = tmp_path / 'bin'
  other.mkdir()
  (other / 'config.json').write_text((tmp_path / 'hf' /
                                      'config.json').read_text())
  torch.save(hm.state_dict(), str(other / 'pytorch_model.bin'))
  assert any('q_proj' in k for k in hm.state_dict())
  again = weights.from_torch(c, model, str(other))
  jax.tree.map(np.testing.assert_array_equal, again, params)
  shards = str(tmp_path / 'shards')  # model.safetensors.index.json
  hm.save_pretrained(shards, max_shard_size='40KB')
  assert len(hf_vit.weights_files(shards)) > 1
  again = weights.from_torch(c, model, shards)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def _restored(workdir):
  config = weights.workdir_config(workdir)
  config.model.dtype = 'float32'
  model = experiment.build_model(config)
  params, _ = weights.from_workdir(config, model, workdir)
  return config, model, jax.device_get(params)


def test_mim_jax_to_transformers_and_back(curves_short_workdir, tmp_path):
  """ours -> HF (the CLI's export of a trained run): from_pretrained
  loads it with no missing or unexpected keys and computes our loss, mask
  and logits; importing the folder gives the params back bit for bit, and
  fine-tuning starts from its encoder."""
  config, model, params = _restored(curves_short_workdir)
  out = str(tmp_path / 'hf')
  written = convert_tool.export_hf(config, curves_short_workdir, out)
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
  assert written['model_type'] == 'vit_mae'
  assert (written['hidden_size'], written['patch_size'],
          written['mask_ratio'], written['norm_pix_loss'],
          written['layer_norm_eps']) == (64, 4, 0.75, True, 1e-6)
  hm = _load_hf(transformers.ViTMAEForPreTraining, out)
  x, noise = _inputs(num_patches=64, seed=3)
  _assert_parity(_ours(config, params, x, noise), _theirs(hm, x, noise),
                 'out')
  back = weights.from_torch(config, model, out)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Fine-tuning and probes (init_from=out) start from its encoder: the
  # timm-named state dict that `from_encoder` loads, decoder left out.
  ft = classifier_config.get_config('finetune', 'mae', 'tiny')
  encoder = weights.hf_encoder(ft, experiment.build_model(ft), out)
  want, _ = weights.to_timm(config, params)
  assert sorted(encoder) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(encoder[key], value, err_msg=key)


def _random_encoder(config):
  """{'encoder': random params} of the method's encoder (host init)."""
  fields = experiment.method_of(config).encoder(config)
  images = jnp.zeros((1, 32, 32, 3))
  shapes = nn.meta.unbox(jax.eval_shape(
      vit.Encoder(**fields).init, jax.random.key(0), images))['params']
  rs = np.random.RandomState(1)
  # Every param random: layer-scale gammas and q/v biases far from their
  # inits (0.1, 0).
  return fields, {'encoder': jax.tree.map(
      lambda s: 0.2 * rs.randn(*s.shape).astype(np.float32), shapes)}


@pytest.mark.parametrize('recipe', [cae_config, bootmae_config],
                         ids=['cae', 'bootmae'])
def test_encoders_export_to_vitmodel(recipe, tmp_path):
  """CAE (q/v biases, layer scale folded into the projections) and
  BootMAE: ViTModel's last_hidden_state is our encoder's output."""
  c = recipe.get_config('tiny')
  if 'scan' in c.model:
    c.model.scan = False
  fields, params = _random_encoder(c)
  hf_config, sd = weights.to_hf(c, experiment.build_model(c), params)
  assert hf_config['model_type'] == 'vit' and 'pooler.dense.weight' not in sd
  hf_vit.write_folder(str(tmp_path), hf_config, sd)
  hm = _load_hf(transformers.ViTModel, str(tmp_path),
                add_pooling_layer=False)
  x, _ = _inputs()
  with torch.no_grad():
    got = hm(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
  want, _ = jax.jit(vit.Encoder(**fields).apply)(
      {'params': params['encoder']}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert _rel(got, want) < 1e-5
  if recipe is cae_config:
    # Back into CAE's linear probe (layer scale, q/v biases): its cls
    # features are the encoder's, the folded gammas loading as ones.
    lp = classifier_config.get_config('linprobe', 'cae', 'tiny')
    lp.init_from = str(tmp_path)
    model = experiment.build_model(lp)
    params_lp, _ = weights.initial_params(lp, model)
    (_, out), _ = model.apply(
        {'params': params_lp}, {'image': jnp.asarray(x.transpose(0, 2, 3, 1))},
        mutable=['batch_stats'])
    assert _rel(out['features'], np.asarray(want)[:, 0]) < 1e-5


# Bad input: one line each, before anything compiles.


def _folder(tmp_path, hf_config, sd=None):
  path = tmp_path / 'hf'
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(json.dumps(hf_config))
  if sd is not None:
    from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
    st.save_file(sd, str(path / 'model.safetensors'))
  return str(path)


def _mae_folder(tmp_path, **kw):
  cfg = dict(_hf_mae_config(**kw).to_dict(), model_type='vit_mae')
  sd = hf_vit.mae_to_hf(experiment.method_of(_mae_config()).converter.to_torch(
      _zeros(_mae_config()), experiment.build_model(_mae_config()), 32))
  return _folder(tmp_path, cfg, sd)


def _zeros(config):
  shapes = jax.eval_shape(lambda: state_lib.init_params(
      experiment.build_model(config), experiment.batch_spec(config, 1),
      config.seed))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_bad_folders_fail_with_one_line(tmp_path):
  c = _mae_config()
  model = experiment.build_model(c)
  bert = _folder(tmp_path / 'a', dict(model_type='bert'))
  with pytest.raises(errors.ConfigError, match="model_type 'bert' is not"):
    weights.from_torch(c, model, bert)
  wide = _mae_folder(tmp_path / 'b', hidden_size=48)
  with pytest.raises(errors.ConfigError,
                     match=r'config.model.encoder.width=32 but '
                     r'hidden_size=48'):
    weights.from_torch(c, model, wide)
  ok = _mae_folder(tmp_path / 'c')
  name = os.path.join(ok, 'model.safetensors')
  with open(name, 'r+b') as f:
    f.truncate(os.path.getsize(name) - 10)
  with pytest.raises(errors.WeightsFileError, match='is truncated'):
    weights.from_torch(c, model, ok)
  with pytest.raises(errors.WeightsFileError, match='is truncated'):
    hf_vit.check_folder(ok)  # train.py's check before anything is built
  ft = classifier_config.get_config('finetune', 'mae', 'tiny')
  ft.init_from = _mae_folder(tmp_path / 'd')
  with pytest.raises(errors.ConfigError,
                     match=r'config.model.encoder.width=64 but '
                     r'hidden_size=32'):
    weights.initial_params(ft, experiment.build_model(ft))
  ev = classifier_config.get_config('eval', 'mae', 'tiny')
  ev.init_from = ft.init_from
  with pytest.raises(errors.WeightsFileError, match='no classifier head'):
    weights.initial_params(ev, experiment.build_model(ev))


def test_what_transformers_cannot_represent_is_refused():
  c = mae_config.robust(_mae_config(), insert_block=1)
  with pytest.raises(errors.ConfigError) as e:
    weights.to_hf(c, experiment.build_model(c), {})
  for reason in ('encoder mask tokens', 'population-statistics targets',
                 'one attention_probs_dropout_prob'):
    assert reason in str(e.value)
  c = cae_config.get_config('tiny')
  with c.unlocked():
    c.model.encoder.rel_pos_bias = True
  with pytest.raises(errors.ConfigError, match='relative position bias'):
    weights.to_hf(c, experiment.build_model(c), {'encoder': {}})
  bare = ml_collections.ConfigDict(dict(model_name='classifier',
                                        input=dict(image_size=32)))
  with pytest.raises(errors.ConfigError, match='none to export for hf'):
    weights.to_hf(bare, None, {})

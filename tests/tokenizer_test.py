"""CAE token targets end to end: an `encoder.pkl` pickled like the official
file, the pipeline's Lanczos view, the dVAE on the devices, training."""

import json

import jax
import numpy as np
import pytest
import torch

from dalle_torch import TorchEncoder, save_as_official
from mim_jax import errors
from mim_jax import experiment
from mim_jax import input_pipeline
from mim_jax import methods
from mim_jax import sharding
from mim_jax import state as state_lib
from mim_jax import train
from mim_jax.methods.cae import config as cae_config
from mim_jax.models import dvae
from mim_jax.targets import tokenizer

HID, VOCAB = 8, 32


@pytest.fixture(scope='module')
def encoder_pkl(tmp_path_factory):
  torch.manual_seed(0)
  ref = TorchEncoder(n_hid=HID, vocab=VOCAB).eval()
  path = str(tmp_path_factory.mktemp('dalle') / 'encoder.pkl')
  save_as_official(ref, path)
  return ref, path


def _config(path):
  """cae_tiny (32 px, patch 4: an 8 x 8 grid) with token targets."""
  c = cae_config.get_config('tiny')
  c.model.target = 'tokens'
  c.tokenizer.update(dict(weights=path, hidden=HID, vocab_size=VOCAB))
  return c


def test_view_and_token_ids_match_the_torch_tokenizer(encoder_pkl):
  ref, path = encoder_pkl
  c = _config(path)
  c.input.batch_size = 8
  assert c.model.vocab_size == VOCAB  # follows config.tokenizer.vocab_size
  size = tokenizer.view(c, 4).size
  assert size == 64  # 8 x 8 tokens, one per patch
  assert methods.get('cae').views(c) == {tokenizer.VIEW: tokenizer.view(c, 4)}
  batch = next(input_pipeline.make_train_dataset(
      c.input, patch_size=4, seed=0, process_index=0, process_count=1,
      views={tokenizer.VIEW: size}).as_numpy_iterator())
  view = batch['tokenizer_image']
  assert view.dtype == np.uint8 and view.shape == (8, 64, 64, 3)

  # Same crop and flip as the model's view: the 2x2-pooled tokenizer view
  # is close to the (bicubic) image, and far from its mirror image.
  image = batch['image'] / 255.0  # uint8, as the tokenizer view
  pooled = view.reshape(8, 32, 2, 32, 2, 3).mean((2, 4)) / 255.0
  same = np.abs(pooled - image).mean((1, 2, 3))
  mirrored = np.abs(pooled[:, :, ::-1] - image).mean((1, 2, 3))
  assert same.max() < 0.03 and (mirrored > 2 * same).all(), (same, mirrored)

  # The frozen provider, as the train step runs it: weights read from the
  # file and replicated, the batch sharded over the data axis.
  mesh = sharding.make_mesh([('data', -1)])
  frozen = experiment.frozen_targets(c, mesh)
  assert set(frozen) == {'tokenizer'}
  assert all(x.sharding.is_fully_replicated
             for x in jax.tree.leaves(frozen['tokenizer']))
  provider, = methods.get('cae').targets(c)
  assert (provider.name, provider.kind) == ('tokenizer', 'frozen')
  global_batch = sharding.to_global(
      {k: batch[k] for k in experiment.batch_spec(c)},
      sharding.data_sharding(mesh))
  out = jax.jit(provider.compute)(frozen['tokenizer'], global_batch)
  assert set(out) == set(provider.outputs) == {tokenizer.TOKENS}
  ids = np.asarray(out['token_ids'])
  assert ids.shape == (8, 64) and ids.dtype == np.int32
  assert out['token_ids'].sharding.is_equivalent_to(
      sharding.data_sharding(mesh), 2)
  with torch.no_grad():
    x = torch.from_numpy(np.asarray(dvae.map_pixels(
        view.astype(np.float32) / 255.0)).transpose(0, 3, 1, 2))
    want = ref(x).argmax(1).reshape(8, -1).numpy()
  assert (ids == want).mean() > 0.99  # f32 conv order: rare argmax ties


@pytest.mark.slow
def test_token_targets_train(encoder_pkl, tmp_path):
  _, path = encoder_pkl
  c = _config(path)
  c.total_steps, c.warmup_steps = 4, 1
  c.log_every_steps, c.ckpt_every_steps, c.vis_every_steps = 2, 4, 4
  c.input.batch_size = 16
  c.async_ckpt = False
  c.knn.data = None
  spec = experiment.batch_spec(c)
  assert spec[tokenizer.VIEW].shape == (16, 64, 64, 3)
  assert 'token_ids' not in spec  # made inside the step
  provider, = methods.get('cae').targets(c)
  ids = jax.eval_shape(provider.compute, provider.abstract(c), spec)
  assert ids['token_ids'].shape == (16, 64)
  state = train.train_and_evaluate(c, str(tmp_path))
  assert int(state.step) == 4
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  # CE over 32 tokens (about ln 32 = 3.47 at init) + 2 x alignment MSE.
  assert 3.0 < rows[0]['train/loss'] < 12.0
  assert all(np.isfinite(r['train/loss']) for r in rows)
  # The tokenizer is frozen and not part of the state or the checkpoint.
  assert 'tokenizer' not in state.params


def test_missing_weights_file_fails_before_compiling(tmp_path, monkeypatch):

  def no_compile(*a, **k):
    raise AssertionError('state created before the tokenizer check')

  monkeypatch.setattr(state_lib, 'create_train_state', no_compile)
  c = _config(str(tmp_path / 'nothing' / 'encoder.pkl'))
  with pytest.raises(errors.MissingFileError) as e:
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  msg = str(e.value)
  assert 'nothing/encoder.pkl not found' in msg
  assert 'https://cdn.openai.com/dall-e/encoder.pkl' in msg
  assert 'model.target=pixels' in msg


@pytest.mark.parametrize('change, words', [
    ({'weights': None}, ['--config.tokenizer.weights', 'target=pixels']),
    ({'vocab_size': 8192}, ['vocab_size=32', '8192 tokens']),
])
def test_bad_tokenizer_config(change, words):
  c = _config('/x/encoder.pkl')
  # Unlink model.vocab_size from tokenizer.vocab_size (a FieldReference).
  c.model = dict(c.model.to_dict(), vocab_size=VOCAB)
  c.tokenizer.update(change)
  with pytest.raises(ValueError) as e:
    train.validate_config(c, 8, 8)
  for w in words:
    assert w in str(e.value), str(e.value)


@pytest.mark.parametrize('content', [b'', b'<html>404</html>',
                                     b'\x80\x02}q\x00(X'])
def test_a_bad_weights_file_is_a_weights_file_error(tmp_path, content):
  """An empty, foreign or truncated encoder.pkl: one line naming the
  file and where to fetch it again, no traceback from the unpickler."""
  path = tmp_path / 'encoder.pkl'
  path.write_bytes(content)
  c = _config(str(path))
  c.tokenizer.hidden = None  # the sizes are read from the file
  with pytest.raises(errors.WeightsFileError,
                     match='cannot be read.*fetch it again from https'):
    tokenizer.sizes(c)


def test_wrong_architecture_file(encoder_pkl):
  """A config whose sizes disagree with the file: the field and the file's
  value are named, before any conversion."""
  _, path = encoder_pkl
  c = _config(path)
  c.tokenizer.hidden = 16
  with pytest.raises(errors.WeightsFileError) as e:
    tokenizer.load_params(c)
  assert 'with hidden=8' in str(e.value)
  assert 'config.tokenizer.hidden=16' in str(e.value)


def test_sizes_left_none_are_read_from_the_file(encoder_pkl):
  """Any encoder the DALL-E package builds: with config.tokenizer's sizes
  and model.vocab_size None, the file's sizes build the tokenizer and the
  model's output layer."""
  _, path = encoder_pkl
  c = cae_config.get_config('tiny')
  c.model.target = 'tokens'
  c.tokenizer.update(dict(weights=path, hidden=None, groups=None,
                          blocks_per_group=None, vocab_size=None))
  assert tokenizer.sizes(c) == dict(hidden=HID, groups=4, blocks_per_group=2,
                                    vocab_size=VOCAB)
  assert experiment.build_model(c).vocab_size == VOCAB
  train.validate_config(c, 8, 8)
  params = tokenizer.load_params(c)
  assert params['input']['kernel'].shape == (7, 7, 3, HID)


def test_a_file_that_is_not_a_dalle_encoder(tmp_path):
  path = str(tmp_path / 'encoder.pkl')
  torch.save(torch.nn.Linear(3, 4), path)
  c = cae_config.get_config('tiny')
  c.model.target = 'tokens'
  c.tokenizer.update(dict(weights=path, vocab_size=None))
  with pytest.raises(errors.WeightsFileError,
                     match='not a DALL-E dVAE encoder'):
    tokenizer.sizes(c)


def test_pixel_targets_need_no_tokenizer():
  c = cae_config.get_config('tiny')
  c.tokenizer.weights = None
  cae = methods.get('cae')
  assert not cae.targets(c) and not cae.views(c)
  train.validate_config(c, 8, 8)
  assert set(experiment.batch_spec(c)) == {'image', 'mask'}
  assert experiment.frozen_targets(c, jax.sharding.Mesh(
      np.array(jax.devices()), ('data',))) == {}

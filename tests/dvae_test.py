"""DALL-E dVAE encoder: Flax module vs a PyTorch module written from the
published architecture (openai/DALL-E encoder.py), with random weights (the
real ones cannot be downloaded here), through our converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dalle_torch import HID, VOCAB, TorchEncoder, save_as_official
from mim_jax.convert import core
from mim_jax.convert import dvae as convert_dvae
from mim_jax.models import dvae


@pytest.fixture(scope='module')
def converted():
  torch.manual_seed(0)
  ref = TorchEncoder().eval()
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  model = dvae.Encoder(hidden=HID, vocab_size=VOCAB)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 32, 32, 3)))['params']
  return ref, sd, model, shapes, convert_dvae.to_flax(sd, shapes)


def test_flax_encoder_matches_the_torch_architecture(converted):
  ref, _, model, _, params = converted
  rng = np.random.default_rng(0)
  x01 = rng.random((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(np.asarray(dvae.map_pixels(x01))
                                .transpose(0, 3, 1, 2))).numpy()
  got = np.asarray(jax.jit(model.apply)({'params': params},
                                         dvae.map_pixels(x01)))
  assert got.shape == (2, 4, 4, VOCAB)
  want = want.transpose(0, 2, 3, 1)
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
  ids = np.asarray(dvae.token_ids(model, params, x01))
  np.testing.assert_array_equal(ids, want.argmax(-1).reshape(2, -1))


def test_pickled_module_loads_like_the_official_file(converted, tmp_path):
  ref, sd, _, shapes, params = converted
  path = str(tmp_path / 'encoder.pkl')
  save_as_official(ref, path)
  # The classes are pickled as dall_e.encoder.Encoder etc.; the package is
  # not installed, and the loader does not need it.
  with open(path, 'rb') as f:
    assert b'dall_e.encoder' in f.read()
  with pytest.raises(ModuleNotFoundError, match='dall_e'):
    torch.load(path, weights_only=False)
  loaded = convert_dvae.load_encoder_pkl(path)
  assert set(loaded) == set(sd)
  again = convert_dvae.to_flax(loaded, shapes)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_wrong_architecture_names_the_keys(converted):
  _, sd, _, shapes, _ = converted
  bad = dict(sd)
  bad.pop('blocks.group_2.block_1.id_path.w')
  bad['blocks.output.conv.w'] = bad['blocks.output.conv.w'][:8]
  bad['blocks.extra.w'] = np.zeros(3)
  with pytest.raises(core.ConversionError) as e:
    convert_dvae.to_flax(bad, shapes)
  msg = str(e.value)
  assert 'group_2_block_1/id_path/kernel' in msg
  # The file's own names (w, b), and where to get the right file.
  assert 'blocks.output.conv.w: got (8, 128, 1, 1)' in msg
  assert "'blocks.extra.w'" in msg and '.weight' not in msg
  assert convert_dvae.ENCODER_URL in msg

"""DALL-E dVAE encoder: Flax module vs a PyTorch module written from the
published architecture (openai/DALL-E encoder.py), with random weights (the
real ones cannot be downloaded here), through our converter."""

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from mim_jax.convert import core
from mim_jax.convert import dvae as convert_dvae
from mim_jax.models import dvae

HID, VOCAB = 16, 32


class TorchConv(tnn.Module):
  """DALL-E's Conv2d: tensors named w and b, 'same' padding."""

  def __init__(self, n_in, n_out, kw):
    super().__init__()
    self.w = tnn.Parameter(torch.randn(n_out, n_in, kw, kw) /
                           (n_in * kw * kw) ** 0.5)
    self.b = tnn.Parameter(torch.randn(n_out) * 0.1)
    self.kw = kw

  def forward(self, x):
    return tnn.functional.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class TorchBlock(tnn.Module):

  def __init__(self, n_in, n_out, n_layers):
    super().__init__()
    n_hid = n_out // 4
    self.post_gain = 1 / n_layers ** 2
    self.id_path = TorchConv(n_in, n_out, 1) if n_in != n_out else (
        tnn.Identity())
    self.res_path = tnn.Sequential(OrderedDict([
        ('relu_1', tnn.ReLU()), ('conv_1', TorchConv(n_in, n_hid, 3)),
        ('relu_2', tnn.ReLU()), ('conv_2', TorchConv(n_hid, n_hid, 3)),
        ('relu_3', tnn.ReLU()), ('conv_3', TorchConv(n_hid, n_hid, 3)),
        ('relu_4', tnn.ReLU()), ('conv_4', TorchConv(n_hid, n_out, 1))]))

  def forward(self, x):
    return self.id_path(x) + self.post_gain * self.res_path(x)


class TorchEncoder(tnn.Module):

  def __init__(self, n_hid=HID, vocab=VOCAB, groups=4, per_group=2):
    super().__init__()
    n_layers = groups * per_group
    widths = [n_hid * 2 ** g for g in range(groups)]
    parts = [('input', TorchConv(3, n_hid, 7))]
    n_in = n_hid
    for g, width in enumerate(widths, 1):
      blocks = [(f'block_{b}', TorchBlock(n_in if b == 1 else width, width,
                                          n_layers))
                for b in range(1, per_group + 1)]
      if g < groups:
        blocks.append(('pool', tnn.MaxPool2d(kernel_size=2)))
      parts.append((f'group_{g}', tnn.Sequential(OrderedDict(blocks))))
      n_in = width
    parts.append(('output', tnn.Sequential(OrderedDict([
        ('relu', tnn.ReLU()), ('conv', TorchConv(n_in, vocab, 1))]))))
    self.blocks = tnn.Sequential(OrderedDict(parts))

  def forward(self, x):
    return self.blocks(x)


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
  torch.save(ref, path)
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
  assert 'blocks.output.conv.weight: got (8, 128, 1, 1)' in msg
  assert 'blocks.extra.weight' in msg

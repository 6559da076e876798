"""PyTorch <-> Flax conversion of the official MAE state dict."""

import functools
import json
import os
import pickle

import jax
import numpy as np
import pytest
import torch

from conftest import FIXTURES
from mim_jax import errors
from mim_jax import experiment
from mim_jax import methods
from mim_jax import state as state_lib
from mim_jax.convert import core
from mim_jax.methods.mae import parity as parity_mae

# The MAE method's converter (a mim_jax.method.Converter).
CONVERTER = methods.get('mae').converter

MAE_FIXTURE = os.path.join(FIXTURES, 'mae')
IMG = 32


@functools.lru_cache(maxsize=None)
def _fixture_config():
  with open(os.path.join(MAE_FIXTURE, 'config.json')) as f:
    return json.load(f)


def _state_dict():
  with np.load(os.path.join(MAE_FIXTURE, 'state_dict.npz')) as f:
    return {k: f[k] for k in f.files}


def _model_and_shapes(scan=False):
  config = parity_mae.experiment_config(_fixture_config())
  config.model.scan = scan
  model = experiment.build_model(config)
  n = _fixture_config()['batch']
  batch = {'image': jax.ShapeDtypeStruct((n, IMG, IMG, 3), np.float32),
           'noise': jax.ShapeDtypeStruct((n, 64), np.float32)}
  shapes = jax.eval_shape(lambda: state_lib.init_params(model, batch, 0))
  return model, shapes


def _assert_same_state_dict(got, want):
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    g = np.asarray(got[k])
    assert g.shape == v.shape, k
    np.testing.assert_array_equal(g, v, err_msg=k)


def test_fixture_round_trip_is_exact():
  sd = _state_dict()
  assert len(sd) == 86
  model, shapes = _model_and_shapes()
  params = CONVERTER.to_flax(sd, model, shapes, IMG)
  # Names and layouts: Linear (out, in) -> kernel (in, out), conv
  # (O, I, kh, kw) -> (kh, kw, I, O), LayerNorm weight -> scale.
  enc = params['encoder']
  np.testing.assert_array_equal(enc['blocks_2']['attn']['qkv']['kernel'],
                                sd['blocks.2.attn.qkv.weight'].T)
  np.testing.assert_array_equal(enc['patch_embed']['kernel'],
                                sd['patch_embed.proj.weight'].transpose(
                                    2, 3, 1, 0))
  np.testing.assert_array_equal(enc['norm']['scale'], sd['norm.weight'])
  np.testing.assert_array_equal(params['decoder']['pred']['kernel'],
                                sd['decoder_pred.weight'].T)
  np.testing.assert_array_equal(params['decoder']['mask_token'],
                                sd['mask_token'])
  assert (jax.tree.map(np.shape, params) ==
          jax.tree.map(lambda s: s.shape, shapes))
  _assert_same_state_dict(CONVERTER.to_torch(params, model, IMG), sd)


@pytest.mark.parametrize('wrap', [False, True])
def test_torch_checkpoint_round_trip(tmp_path, wrap):
  sd = _state_dict()
  tensors = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
  src = str(tmp_path / 'in.pth')
  torch.save({'model': tensors, 'epoch': 799} if wrap else tensors, src)
  loaded = core.load_state_dict(src)
  _assert_same_state_dict(loaded, sd)

  model, shapes = _model_and_shapes()
  params = CONVERTER.to_flax(loaded, model, shapes, IMG)
  out = str(tmp_path / 'x.pth')
  core.save_state_dict(CONVERTER.to_torch(params, model, IMG), out)
  back = torch.load(out, map_location='cpu', weights_only=True)
  assert sorted(back) == sorted(sd)
  for k, v in back.items():
    assert isinstance(v, torch.Tensor) and v.dtype == torch.float32, k
    assert torch.equal(v, tensors[k]), k


def test_npz_round_trip(tmp_path):
  sd = _state_dict()
  model, shapes = _model_and_shapes()
  params = CONVERTER.to_flax(
      core.load_state_dict(os.path.join(MAE_FIXTURE, 'state_dict.npz')),
      model, shapes, IMG)
  out = str(tmp_path / 'x.npz')
  core.save_state_dict(CONVERTER.to_torch(params, model, IMG), out)
  _assert_same_state_dict(core.load_state_dict(out), sd)
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    core.load_state_dict(str(tmp_path / 'nope.pth'))


def test_safetensors_round_trip_without_pickle(tmp_path, monkeypatch):
  """Written and read back bit for bit with no pickle anywhere (torch.load
  and pickle refuse); bf16 tensors come back as float32; a truncated or
  damaged file is a user error naming the bytes."""
  from safetensors import torch as st  # pylint: disable=g-import-not-at-top
  sd = _state_dict()
  out = str(tmp_path / 'x.safetensors')
  core.save_state_dict(sd, out)
  bf16 = str(tmp_path / 'bf16.safetensors')
  st.save_file({'w': torch.linspace(-3, 3, 7, dtype=torch.bfloat16)}, bf16)
  refuse = lambda *a, **k: pytest.fail('pickle used for a safetensors file')
  for module, name in ((torch, 'load'), (pickle, 'load'), (pickle, 'loads'),
                       (np, 'load')):
    monkeypatch.setattr(module, name, refuse)
  _assert_same_state_dict(core.load_state_dict(out), sd)
  w = core.load_state_dict(bf16)['w']
  assert w.dtype == np.float32
  np.testing.assert_array_equal(w, torch.linspace(
      -3, 3, 7, dtype=torch.bfloat16).float().numpy())
  data = open(out, 'rb').read()
  cut = str(tmp_path / 'cut.safetensors')
  with open(cut, 'wb') as f:
    f.write(data[:-100])
  with pytest.raises(errors.WeightsFileError,
                     match=rf'is truncated: .* {len(data)} bytes, the file '
                     rf'holds {len(data) - 100}; fetch it again'):
    core.load_state_dict(cut)
  header = int.from_bytes(data[:8], 'little')
  with open(cut, 'wb') as f:   # the header cut in half
    f.write(data[:8 + header // 2])
  with pytest.raises(errors.WeightsFileError, match='not a whole safetensors'):
    core.load_state_dict(cut)


@pytest.mark.parametrize('content, error, match', [
    (None, errors.MissingFileError, 'does not exist'),
    (b'', errors.WeightsFileError, r'is empty \(0 bytes\)'),
    (b'<html>404</html>', errors.WeightsFileError,
     'is not a PyTorch checkpoint'),
    (b'PK\x03\x04' + b'\x00' * 60, errors.WeightsFileError,
     'cannot be read'),
    ('tensor', errors.WeightsFileError, 'it holds Tensor'),
    ('mixed', errors.WeightsFileError, r"not tensors: \['epoch'\]"),
])
def test_bad_empty_or_missing_weights_files_are_typed(tmp_path, content,
                                                      error, match):
  """Every way a weights file can be wrong is a user error (one line in
  the CLI) naming the file."""
  path = tmp_path / 'w.pth'
  if content == 'tensor':
    torch.save(torch.zeros(3), path)
  elif content == 'mixed':
    torch.save({'w': torch.zeros(3), 'epoch': 4}, path)
  elif content is not None:
    path.write_bytes(content)
  with pytest.raises(error, match=match) as e:
    core.load_state_dict(str(path))
  assert errors.is_user_error(e.value) and str(path) in str(e.value)


def test_scan_layout_round_trip():
  sd = _state_dict()
  model, shapes = _model_and_shapes(scan=True)
  assert core.is_scanned(shapes)
  params = CONVERTER.to_flax(sd, model, shapes, IMG)
  blocks = params['encoder']['blocks']
  assert blocks['attn']['qkv']['kernel'].shape == (4, 64, 192)
  assert params['decoder']['blocks']['mlp']['fc1']['kernel'].shape == (
      2, 48, 192)
  for i in range(4):
    np.testing.assert_array_equal(blocks['attn']['qkv']['kernel'][i],
                                  sd[f'blocks.{i}.attn.qkv.weight'].T)
    np.testing.assert_array_equal(blocks['norm2']['bias'][i],
                                  sd[f'blocks.{i}.norm2.bias'])
  assert (jax.tree.map(np.shape, params) ==
          jax.tree.map(lambda s: s.shape, shapes))
  _assert_same_state_dict(CONVERTER.to_torch(params, model, IMG), sd)


# ---------------------------------------------------------------------------
# Errors.


def _convert_error(sd, **kw):
  model, shapes = _model_and_shapes()
  with pytest.raises(core.ConversionError) as e:
    CONVERTER.to_flax(sd, model, shapes, IMG, **kw)
  assert isinstance(e.value, ValueError)
  return str(e.value)


def test_unknown_key_is_named():
  sd = _state_dict()
  sd['head.weight'] = np.zeros((10, 64), np.float32)
  msg = _convert_error(sd)
  assert 'unknown keys (1)' in msg and 'head.weight' in msg


def test_missing_key_is_named():
  sd = _state_dict()
  del sd['blocks.1.mlp.fc1.bias']
  msg = _convert_error(sd)
  assert 'missing params (1)' in msg
  assert 'encoder/blocks_1/mlp/fc1/bias' in msg


def test_misshaped_key_names_both_shapes():
  sd = _state_dict()
  sd['blocks.0.mlp.fc1.weight'] = np.zeros((255, 64), np.float32)
  msg = _convert_error(sd)
  assert 'shape mismatches (1)' in msg
  assert 'blocks.0.mlp.fc1.weight: got (255, 64)' in msg
  assert 'model wants (64, 256)' in msg


def test_wrong_pos_embed_is_reported():
  sd = _state_dict()
  sd['pos_embed'] = sd['pos_embed'] + 0.01
  msg = _convert_error(sd)
  assert 'fixed buffers (1)' in msg and 'pos_embed' in msg
  # A table for another image size (wrong shape) as well.
  sd = _state_dict()
  sd['decoder_pos_embed'] = sd['decoder_pos_embed'][:, :50]
  msg = _convert_error(sd)
  assert 'decoder_pos_embed' in msg and '(1, 50, 48)' in msg


def test_all_problems_listed_together():
  sd = _state_dict()
  sd['head.weight'] = np.zeros((10, 64), np.float32)
  del sd['decoder_norm.bias']
  sd['norm.weight'] = np.zeros((65,), np.float32)
  sd['pos_embed'] = np.zeros_like(sd['pos_embed'])
  msg = _convert_error(sd)
  assert 'encoder/norm/scale' not in msg.split('shape mismatches')[0]
  for part in ('unknown keys (1)', 'head.weight', 'missing params (1)',
               'decoder/norm/bias', 'shape mismatches (1)', 'norm.weight',
               'got (65,)', 'fixed buffers (1)', 'pos_embed'):
    assert part in msg, (part, msg)


# ---------------------------------------------------------------------------
# Encoder-only checkpoints (the released mae_pretrain_vit_*.pth).


def _encoder_only(sd):
  return {k: v for k, v in sd.items()
          if not (k.startswith('decoder_') or k == 'mask_token')}


def test_encoder_only_checkpoint_strict_false():
  sd = _state_dict()
  enc_sd = _encoder_only(sd)
  assert 'pos_embed' in enc_sd and len(enc_sd) == 4 * 12 + 6
  model, shapes = _model_and_shapes()
  # Initialised params (not shapes) whose decoder must be kept.
  rng = np.random.default_rng(0)
  init = jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  params = CONVERTER.to_flax(enc_sd, model, init, IMG, strict=False)
  full = CONVERTER.to_flax(sd, model, shapes, IMG)
  for a, b in zip(jax.tree.leaves(params['decoder']),
                  jax.tree.leaves(init['decoder'])):
    np.testing.assert_array_equal(a, b)
  assert (jax.tree.structure(params['encoder']) ==
          jax.tree.structure(full['encoder']))
  for a, b in zip(jax.tree.leaves(params['encoder']),
                  jax.tree.leaves(full['encoder'])):
    np.testing.assert_array_equal(a, b)
  # strict=True refuses it and names what is missing.
  msg = _convert_error(enc_sd)
  assert 'decoder/mask_token' in msg and 'decoder/pred/kernel' in msg
  # strict=False with shapes only: nothing to keep, so it is an error too.
  msg = _convert_error(enc_sd, strict=False)
  assert 'decoder/mask_token' in msg and 'not shapes' in msg

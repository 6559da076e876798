"""The official initialisations redrawn with PyTorch (`methods/<m>/
torch_init.official_init`), against the fixtures bit for bit, and our JAX
init (modules' inits + `Method.init_rules`) against them in distribution."""

import functools
import importlib
import json
import os

import jax
import numpy as np
import pytest
from scipy import stats

from conftest import FIXTURES
from mim_jax import experiment
from mim_jax import state as state_lib
from mim_jax import weights

pytest.importorskip('torch')

# The BEiT-family codes (BootMAE, CAE) compute their sin-cos tables with
# float32 torch ops; ours (layers.posemb_sincos_2d) in float64, rounded once
# to float32, which differs from theirs by a few float32 ulps in about a
# quarter of the entries (|diff| <= 2e-7 at these grids, ~7e-7 at a 14 x 14
# grid and width 768, from the float32 rounding of position * omega).
POS_EMBED_ATOL = {'mae': 0.0, 'bootmae': 1e-6, 'cae': 1e-6}


def _fixture(name: str):
  with open(os.path.join(FIXTURES, name, 'config.json')) as f:
    fc = json.load(f)
  parity = importlib.import_module(f'mim_jax.methods.{name}.parity')
  torch_init = importlib.import_module(f'mim_jax.methods.{name}.torch_init')
  return fc, parity.ADAPTER.experiment_config(fc), torch_init


@pytest.mark.parametrize('name', ['bootmae', 'cae'])
def test_official_init_is_the_fixtures_state_dict(name):
  """official_init redraws the fixture's official state dict bit for bit
  from its seed (order of draws included; BootMAE's model_ema.* copies and
  CAE's alignment encoder too)."""
  fc, config, torch_init = _fixture(name)
  sd = torch_init.official_init(config, fc['seed'])
  ref = np.load(os.path.join(FIXTURES, name, 'state_dict.npz'))
  assert sorted(sd) == sorted(ref.files)
  for k in ref.files:
    assert sd[k].dtype == np.float32, k
    np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)


def test_bootmae_feature_predictor_truncation_keeps_the_draws():
  """feature_depth < decoder_depth (upstream cannot build it): the fixture
  generator's model, the full-depth feature predictor built and drawn, then
  truncated; deeper than decoder_depth is refused."""
  _, config, torch_init = _fixture('bootmae')
  config.model.decoder_depth = 3
  config.model.feature_depth = 3
  full = torch_init.official_init(config, 0)
  config.model.feature_depth = 2
  cut = torch_init.official_init(config, 0)
  dropped = [k for k in full if k.startswith('decode_blocks_1.2.')]
  assert dropped and sorted(cut) == sorted(set(full) - set(dropped))
  for k in cut:
    np.testing.assert_array_equal(cut[k], full[k], err_msg=k)
  config.model.feature_depth = 4
  with pytest.raises(ValueError, match='feature_depth'):
    torch_init.official_init(config, 0)


@functools.lru_cache(maxsize=None)
def _inits(name: str):
  """(ours, official): 3 state dicts each in official key names, ours at
  seeds 0-2 (jitted: one compile, far cheaper than eager init here; the
  momentum encoder's keys included), the official at seeds 1000-1002."""
  _, config, torch_init = _fixture(name)
  model = experiment.build_model(config)
  spec = experiment.batch_spec(config, 1)
  rules = experiment.init_rules_of(config)
  init = jax.jit(lambda s: state_lib.init_params(model, spec, s, rules))
  ema = next((p.init for p in experiment.providers_of(config)
              if p.kind == 'ema'), None)
  ours = []
  for seed in range(3):
    params = init(seed)
    ours.append(weights.to_torch(config, model, params,
                                 None if ema is None else ema(params)))
  official = [torch_init.official_init(config, 1000 + seed)
              for seed in range(3)]
  return ours, official


@pytest.mark.parametrize('name', ['mae', 'bootmae', 'cae'])
def test_our_init_matches_the_official_init_in_distribution(name):
  """Every tensor of our init (3 seeds) against the official init's (3
  other seeds): constants equal, position embeddings equal (see
  POS_EMBED_ATOL), random tensors from the same distribution (KS) with the
  same spread."""
  ours_sds, official_sds = _inits(name)
  assert sorted(ours_sds[0]) == sorted(official_sds[0])
  for k in ours_sds[0]:
    a = np.concatenate([np.asarray(sd[k], np.float64).ravel()
                        for sd in ours_sds])
    b = np.concatenate([sd[k].astype(np.float64).ravel()
                        for sd in official_sds])
    assert a.shape == b.shape, k
    if k.endswith('pos_embed'):
      np.testing.assert_allclose(a, b, rtol=0, atol=POS_EMBED_ATOL[name],
                                 err_msg=k)
    elif np.all(b == b[0]):
      np.testing.assert_array_equal(a, b, err_msg=k)
    else:
      assert stats.ks_2samp(a, b).pvalue > 1e-4, k
      assert abs(a.std() / b.std() - 1) < 0.15, k

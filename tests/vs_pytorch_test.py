"""benchmarks/vs_pytorch.py: its PyTorch MAE is the official computation
(the fixture's loss and gradients), and the script runs end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import FIXTURES
from conftest import ROOT
from mim_jax import experiment
from mim_jax import steps
from mim_jax.parity import core

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import vs_pytorch  # pylint: disable=g-import-not-at-top,g-bad-import-order

pytest.importorskip('torch')
pytest.importorskip('timm')

MAE = os.path.join(FIXTURES, 'mae')


@pytest.mark.parametrize('fused_attn', [None, False],
                         ids=['timm_default', 'explicit'])
def test_proof_reproduces_official_loss_and_grads(fused_attn):
  """timm's default attention (fused SDPA, the one benchmarked) and the
  explicit path of the fixture both give the official loss to 1e-6 and
  gradients to 2e-5 (rel. to max; key-bias third 1e-7 absolute)."""
  out = vs_pytorch.proof(fused_attn)
  assert out['ok'], out
  assert out['loss_rel_err'] <= 1e-6
  assert out['mask_equal'] and out['grads_same_keys']
  assert out['grads_compared'] == 84
  assert out['grad_max_rel_to_max'] <= 2e-5
  assert out['key_bias_max_abs'] <= 1e-7
  if fused_attn is None:
    assert out['attention'] == 'fused'  # what the benchmark times


def test_norm_pix_loss_equals_mim_jax():
  """With norm_pix_loss=True (the benchmarked loss), the PyTorch MAE and
  mim_jax's MAE agree on the fixture's weights and inputs."""
  model, imgs, noise, _ = vs_pytorch.fixture_model(norm_pix_loss=True)
  theirs = model(imgs, noise=noise)[0].item()
  _, _, config, ours_model, batch, params = core.load_converted(MAE)
  config.loss.norm_pix_loss = True
  compute = steps.make_loss_fn(ours_model, experiment.build_loss(config))
  ours = float(jax.jit(compute, static_argnums=3)(
      params, batch, jax.random.PRNGKey(0), False)[0])
  assert abs(ours - theirs) / abs(theirs) <= 1e-5, (ours, theirs)
  with np.load(os.path.join(MAE, 'outputs.npz')) as z:
    plain = float(z['loss'])  # the fixture's loss is on plain pixels
  assert abs(theirs - plain) > 1e-2  # so the switch is exercised


def test_models_are_the_official_ones():
  """The smoke model is the fixture's, B/16 is `mae_vit_base_patch16`,
  and the spec's sin-cos tables are the official ones."""
  with open(os.path.join(MAE, 'config.json')) as f:
    fc = json.load(f)
  smoke = vs_pytorch.official_args(vs_pytorch.jax_config('smoke', 16))
  assert smoke == vs_pytorch.fixture_args(fc, norm_pix_loss=True)
  base = vs_pytorch.official_args(vs_pytorch.jax_config('B/16', 16))
  assert base == dict(
      img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
      num_heads=12, decoder_embed_dim=512, decoder_depth=8,
      decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=True,
      layernorm_eps=1e-6, mask_ratio=0.75)
  small = vs_pytorch.official_args(vs_pytorch.jax_config('S/16', 16))
  assert (small['embed_dim'], small['depth'], small['num_heads']) == (
      384, 12, 6)


def test_spec_tables_are_the_fixtures(tmp_path):
  path = str(tmp_path / 'smoke.npz')
  vs_pytorch.write_spec(vs_pytorch.jax_config('smoke', 16), path)
  with np.load(path) as spec, np.load(
      os.path.join(MAE, 'state_dict.npz')) as sd:
    for k in ('pos_embed', 'decoder_pos_embed'):
      np.testing.assert_array_equal(spec[k], sd[k])


@pytest.mark.slow
def test_smoke_run():
  """`--smoke --dtype=bfloat16` (the CPU path of the GPU check): proof,
  one round of each side, the table and a last JSON line with both sides'
  positive numbers."""
  res = subprocess.run(
      [sys.executable, 'benchmarks/vs_pytorch.py', '--smoke',
       '--dtype=bfloat16'],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert res.returncode == 0, res.stderr[-3000:]
  lines = res.stdout.strip().splitlines()
  assert any(x.startswith('proof (fused attention)') for x in lines)
  out = json.loads(lines[-1])
  assert out['rounds'] == 1 and out['proof']['ok']
  assert (out['dtype'], out['device']) == ('bfloat16', 'cpu')
  assert out['machine']['cores'] >= 1
  assert {'torch', 'jax'} <= set(out['machine'])
  r = out['smoke']
  for side in ('pytorch', 'mim_jax'):
    for k in ('img_per_s', 'matmul_fraction', 'gflop_per_img'):
      assert r[side][k] > 0, (side, k, r[side])
  assert r['pytorch']['gflop_per_img'] == r['mim_jax']['gflop_per_img']
  assert r['ratio'] == pytest.approx(
      r['mim_jax']['img_per_s'] / r['pytorch']['img_per_s'])


@pytest.mark.slow
def test_xla_cpu_limits_smoke():
  """benchmarks/xla_cpu_limits.py: each minimal program runs on both sides
  (in separate processes) and every time and ratio is positive."""
  from benchmarks_test import run_smoke  # pylint: disable=g-import-not-at-top
  out = run_smoke('xla_cpu_limits.py')
  assert out['benchmark'] == 'xla_cpu_limits'
  assert set(out['jax']['attention']) == {
      'head_major', 'token_major', 'jax_nn_dot_product_attention'}
  assert set(out['torch']['attention']) == {'sdpa', 'explicit'}
  assert set(out['jax']['scan_stack']) == {
      'scan', 'unrolled_stack', 'scan_without_stack', 'stack_mib'}
  for side in ('jax', 'torch'):
    for case in out[side].values():
      assert all(v > 0 for v in case.values()), out
  assert set(out['ratios']) == {'attention_vs_sdpa', 'attention_vs_explicit',
                                'scan_stack', 'weight_grad'}
  assert all(v > 0 for v in out['ratios'].values())

"""The planner compiles the sharded train step ahead of time (no run)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from mim_jax import config_lib
from mim_jax.tools import plan


def test_plan_tiny_on_8_devices_fsdp():
  c = config_lib.tiny_overrides(config_lib.mae_config())
  c.min_shard_size = 0
  out = plan.plan(c, 8, peak_tflops=100.0, mfus=(0.5,))
  assert out['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert out['batch_per_device'] == 4
  b, one = out['bytes_per_device'], out['bytes_one_device']
  # Adam keeps two moments per param; nothing is held in an EMA for MAE.
  assert one['opt_state'] >= 2 * one['params'] and b['ema'] == 0
  # Every tiny param divides by 8 except the 48-wide pred output.
  assert out['state_fraction_of_one_device'] < 0.2
  xla = out['xla_memory_per_device']
  assert xla['temporaries'] > 0 and xla['arguments'] >= b['params_opt_ema']
  # The step time follows from the FLOPs at the given MFU and peak.
  t = out['flops_per_step'] / (8 * 100e12 * 0.5)
  assert abs(out['step_time_s_at_mfu']['0.5'] - t) < 1e-12
  assert out['model_flops_per_image'] * 32 == out['flops_per_step']


def test_plan_counts_the_tokenizer_of_token_targets():
  """CAE with token targets: the frozen dVAE's FLOPs and replicated params
  are part of the plan (no weights file is needed to plan)."""
  c = config_lib.cae_tiny_overrides(config_lib.cae_config())
  c.model.target = 'tokens'
  c.tokenizer.update(dict(weights='/nowhere/encoder.pkl', hidden=8,
                          vocab_size=32))
  out = plan.plan(c, 8, mfus=(0.5,))
  tok = out['tokenizer']
  assert tok['view_size'] == 64
  # The 32-token dVAE: 8-64 wide convs at 64..8 px.
  assert 0 < tok['flops_per_step'] < out['flops_per_step']
  assert tok['params_bytes_per_device'] > 0


def test_plan_vitb_on_8_devices_counts_real_flops():
  c = config_lib.mae_config('B/16')
  out = plan.plan(c, 8)
  assert out['config']['scan'] and out['batch_per_device'] == 512
  # MAE ViT-B/16 at 224 px: encoder on 50 tokens, 8-block decoder on 197;
  # forward about 20 GFLOPs per image, a train step about three times that.
  per_image = out['model_flops_per_image'] / 1e9
  assert 45 < per_image < 75, per_image
  assert out['state_fraction_of_one_device'] < 1 / 7
  params = out['bytes_one_device']['params'] / 4
  assert 110e6 < params < 115e6   # ViT-B encoder + MAE decoder, float32


def test_plan_cli_prints_json_and_sets_fake_devices():
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  r = subprocess.run(
      [sys.executable, '-m', 'mim_jax.tools.plan',
       '--config=configs/mae_tiny.py', '--devices=4',
       "--config.mesh=(('data', 2), ('fsdp', 2))"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout)
  assert out['devices'] == 4 and out['mesh'] == {'data': 2, 'fsdp': 2}


def test_plan_rejects_bad_mesh_and_batch_before_compiling():
  c = config_lib.tiny_overrides(config_lib.mae_config())
  c.mesh = (('data', 3), ('fsdp', 2))
  with pytest.raises(ValueError, match='has 6 slots but there are 8 devices'):
    plan.plan(c, 8)
  c.mesh = (('data', -1),)
  c.input.batch_size = 12
  with pytest.raises(ValueError, match='batch size 12 is not divisible by 8'):
    plan.plan(c, 8)


def test_accum_to_fit_picks_smallest_dividing_factor():
  xla = dict(arguments=10, outputs=5, aliased=5, temporaries=100)
  assert plan.accum_to_fit(xla, 8, 1000) == 1
  assert plan.accum_to_fit(xla, 8, 60) == 2      # 50 free, 100 / 2 fits
  assert plan.accum_to_fit(xla, 6, 45) == 3      # 4 does not divide 6
  assert plan.accum_to_fit(xla, 8, 20) is None   # 100 / 8 > 10 free

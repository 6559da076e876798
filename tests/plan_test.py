"""The planner compiles the sharded train step ahead of time (no run)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT
from mim_jax import experiment
from mim_jax import sharding
from mim_jax.methods.cae import config as cae_config
from mim_jax.methods.mae import config as mae_config
from mim_jax.targets import tokenizer
from mim_jax.tools import plan


@pytest.mark.slow
def test_plan_tiny_on_8_devices_fsdp():
  c = mae_config.get_config('tiny')
  c.min_shard_size = 0
  out = plan.plan(c, 8, peak_tflops=100.0, mfus=(0.5,))
  assert out['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert out['batch_per_device'] == 4
  b, one = out['bytes_per_device'], out['bytes_one_device']
  # Adam keeps two moments per param; nothing is held in an EMA for MAE,
  # and MAE has no target networks.
  assert one['opt_state'] >= 2 * one['params'] and b['ema'] == 0
  assert out['target_providers'] == {}
  assert b['target_state'] == b['frozen_targets'] == 0
  assert b['total'] == b['params_opt_ema']
  # Every tiny param divides by 8 except the 48-wide pred output.
  assert out['state_fraction_of_one_device'] < 0.2
  xla = out['xla_memory_per_device']
  assert xla['temporaries'] > 0 and xla['arguments'] >= b['params_opt_ema']
  # The step time follows from the FLOPs at the given MFU and peak.
  t = out['flops_per_step'] / (8 * 100e12 * 0.5)
  assert abs(out['step_time_s_at_mfu']['0.5'] - t) < 1e-12
  assert out['model_flops_per_image'] * 32 == out['flops_per_step']


def _tiny_cae(target):
  c = cae_config.get_config('tiny')
  c.model.target = target
  c.tokenizer.update(dict(weights='/nowhere/encoder.pkl', hidden=8,
                          vocab_size=32))
  return c


@pytest.mark.slow
def test_plan_counts_the_tokenizer_of_token_targets():
  """CAE with token targets: the frozen dVAE runs inside the step, so its
  FLOPs are in flops_per_step and its replicated params in the bytes per
  device (no weights file is needed to plan)."""
  c = _tiny_cae('tokens')
  out = plan.plan(c, 8, mfus=(0.5,))
  assert out['target_providers'] == {'tokenizer': 'frozen'}
  # The tokenizer's view: one token per 4 px patch of the 32 px crops.
  view = experiment.batch_spec(c)[tokenizer.VIEW]
  assert view.shape == (32, 64, 64, 3) and view.dtype == jnp.uint8
  # The 32-token dVAE (8-64 wide convs at 64..8 px), replicated: every
  # device holds all of it; it is no part of the train state.
  module = tokenizer.encoder_of(c)
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 64, 3)))['params']
  b = out['bytes_per_device']
  assert b['frozen_targets'] == sharding.per_device_bytes(params) > 0
  assert out['bytes_one_device']['frozen_targets'] == b['frozen_targets']
  assert b['ema'] == b['target_state'] == 0
  assert b['total'] == b['params_opt_ema'] + b['frozen_targets']
  # Its FLOPs: tokenizing one global batch, as lowered on its own.
  images = jax.ShapeDtypeStruct(view.shape, view.dtype)
  tok_flops = float(jax.jit(
      lambda p, x: tokenizer.tokenize(module, p, x)).lower(
          params, images).cost_analysis()['flops'])
  assert 0 < tok_flops < out['flops_per_step']
  # The same model on pixel targets: no tokenizer, and the step is cheaper
  # by about the dVAE's FLOPs (the token and pixel heads and losses differ
  # by a little).
  pixels = plan.plan(_tiny_cae('pixels'), 8, mfus=(0.5,))
  assert pixels['target_providers'] == {}
  assert pixels['bytes_per_device']['frozen_targets'] == 0
  extra = out['flops_per_step'] - pixels['flops_per_step']
  assert 0.95 * tok_flops < extra < 1.05 * tok_flops, (extra, tok_flops)


@pytest.mark.slow
def test_plan_vitb_on_8_devices_counts_real_flops():
  c = mae_config.get_config('B/16')
  out = plan.plan(c, 8)
  assert out['config']['scan'] and out['batch_per_device'] == 512
  # MAE ViT-B/16 at 224 px: encoder on 50 tokens, 8-block decoder on 197;
  # forward about 20 GFLOPs per image, a train step about three times that.
  per_image = out['model_flops_per_image'] / 1e9
  assert 45 < per_image < 75, per_image
  assert out['state_fraction_of_one_device'] < 1 / 7
  params = out['bytes_one_device']['params'] / 4
  assert 110e6 < params < 115e6   # ViT-B encoder + MAE decoder, float32


def _plan_cli(mesh: str) -> subprocess.CompletedProcess:
  """`python -m mim_jax.tools.plan` of the tiny MAE on 4 fake devices (the
  CLI sets them: XLA_FLAGS unset)."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  return subprocess.run(
      [sys.executable, '-m', 'mim_jax.tools.plan',
       '--config=configs/mae_tiny.py', '--devices=4', f'--config.mesh={mesh}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)


@pytest.mark.slow
def test_plan_cli_prints_json_and_sets_fake_devices():
  r = _plan_cli("(('data', 2), ('fsdp', 2))")
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout)
  assert out['devices'] == 4 and out['mesh'] == {'data': 2, 'fsdp': 2}


def test_plan_cli_prints_a_bad_mesh_as_one_line():
  r = _plan_cli("(('data', 3),)")
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: config.mesh') and '3 slots' in last, last
  assert 'Traceback' not in r.stderr


def test_plan_rejects_bad_mesh_and_batch_before_compiling():
  c = mae_config.get_config('tiny')
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

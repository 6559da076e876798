"""Every script in benchmarks/ runs, in its smoke mode (tiny sizes, one
iteration), as a subprocess; its JSON (the last line of its output) is
parsed and checked. The docs quote figures from these scripts: this
keeps them runnable between the runs that produce the figures.

curves_vs_pytorch.py, vs_pytorch.py and mask_distribution.py have their own
tests (tests/curves_test.py, tests/vs_pytorch_test.py,
tests/mask_distribution_test.py).
"""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import CURVES_SHORT_EPOCHS
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

# Generous: a hang fails, a busy machine should not.
TIMEOUT_S = 300


def _env() -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT)
  # One CPU device: conftest's 8 fake devices only slow the scripts down
  # (compile_bench.py sets its own count).
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+',
                            '', env.get('XLA_FLAGS', '')).strip()
  return env


def run_smoke(script: str, *args: str) -> dict:
  """Runs `benchmarks/<script> --smoke *args`; returns its last line, as
  JSON."""
  cmd = [sys.executable, os.path.join('benchmarks', script), '--smoke',
         *args]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=TIMEOUT_S, check=False)
  assert proc.returncode == 0, (
      f'{" ".join(cmd)} exited with {proc.returncode}:\n'
      f'{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
  lines = proc.stdout.strip().splitlines()
  assert lines, f'{script} printed nothing; stderr:\n{proc.stderr[-3000:]}'
  return json.loads(lines[-1])


def _positive(*values):
  for v in values:
    assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, v


@pytest.mark.slow
def test_mask_bench():
  out = run_smoke('mask_bench.py')
  assert out['benchmark'] == 'block_masks'
  assert set(out['results']) == {'cae', 'beit', 'bootmae'}
  for res in out['results'].values():
    assert set(res) == {
        'plain_python_port', 'block_masks', 'speedup',
        'tf_data_per_batch_stage', 'tf_data_pipeline_block',
        'tf_data_pipeline_random_for_comparison'}
    _positive(*res.values())


@pytest.mark.slow
def test_input_pipeline_bench():
  out = run_smoke('input_pipeline_bench.py')
  assert out['benchmark'] == 'input_pipeline'
  assert (out['image_size'], out['host_batch'], out['batches']) == (32, 32, 2)
  _positive(out['images_per_sec'], out['sec_per_batch'])


@pytest.mark.slow
def test_input_pipeline_bench_jpeg():
  """The real pipeline on written JPEGs: both IDCTs, 1 and 2 threads, the
  per-stage breakdown (of the accurate IDCT), and torchvision's official
  transform on the same files."""
  out = run_smoke('input_pipeline_bench.py', '--jpeg')
  assert out['benchmark'] == 'input_pipeline_jpeg'
  assert (out['image_size'], out['patch_size'], out['host_batch']) == (
      224, 16, 8)
  jpegs = out['jpegs']
  assert jpegs['images'] == 16 and jpegs['quality'] == 90
  assert 224 <= jpegs['mean_width'] <= 500
  assert 224 <= jpegs['mean_height'] <= 500
  assert set(out['results']) == {'accurate', 'fast'}
  for res in out['results'].values():
    assert set(res['threads']) == {'1', '2'}
    for r in res['threads'].values():
      _positive(r['images_per_sec'], r['images_per_cpu_sec'],
                r['images_per_sec_per_thread'])
  # The smoke breaks down the first IDCT only.
  assert 'breakdown_1_thread' not in out['results']['fast']
  breakdown = out['results']['accurate']['breakdown_1_thread']
  assert set(breakdown) == {
      'read', 'decode_crop', 'resize', 'flip', 'mask', 'full_decode',
      'tf_resize', 'float_out', 'jpeg_draft'}
  for r in breakdown.values():
    _positive(r['images_per_sec'], r['images_per_cpu_sec'])
  # Side by side with the official transform (torchvision) on the files.
  for side in ('mim_jax', 'torchvision'):
    assert set(out[side]) == {'normalized', 'uint8'}
    for r in out[side].values():
      _positive(r['images_per_cpu_sec'], *r['runs_images_per_cpu_sec'])
  assert set(out['ratio']) == {'normalized', 'uint8', 'uint8_vs_official'}
  _positive(*out['ratio'].values())


@pytest.mark.slow
def test_eval_check_bench():
  out = run_smoke('eval_check_bench.py')
  assert out['benchmark'] == 'eval_check' and out['files'] == 64
  _positive(out['mean_kb'], *out['scan'].values(),
            *out['byte_check_only'].values())


@pytest.mark.slow
def test_compile_bench():
  out = run_smoke('compile_bench.py')
  assert out['benchmark'] == 'train_step_compile'
  assert set(out['results']) == {'tiny'}
  _positive(out['results']['tiny']['lower_s'],
            out['results']['tiny']['compile_s'])
  assert out['compile_ratio_vs_tiny'] == {'tiny': 1.0}


@pytest.mark.slow
def test_tokenizer_bench():
  out = run_smoke('tokenizer_bench.py')
  assert out['benchmark'] == 'tokenizer'
  assert out['view_size'] == 32
  _positive(out['gflops_per_image'], out['sec_per_image'], out['compile_s'],
            out['params_millions'])


@pytest.mark.slow
def test_train_step_bench():
  out = run_smoke('train_step_bench.py')
  assert out['benchmark'] == 'train_step'
  assert (out['batch'], out['image_size']) == (8, 32)
  _positive(out['compile_sec'], out['step_sec'], out['steps_per_sec'],
            out['images_per_sec'])


@pytest.mark.slow
def test_profile_step():
  """The op profile: every executed instruction in one category, shares
  summing to 1, matmuls present."""
  out = run_smoke('profile_step.py')
  assert out['benchmark'] == 'profile_step'
  _positive(out['step_sec'], out['op_ms_per_step'])
  shares = {k: v['share'] for k, v in out['categories'].items()}
  assert abs(sum(shares.values()) - 1) < 1e-2
  assert shares['matmul/conv'] > 0.2
  assert out['top_ops'] and all(o['ms'] >= 0 for o in out['top_ops'])


@pytest.mark.slow
def test_digits_eval(tmp_path):
  """Pretraining, linear probe and fine-tuning, 2 steps each."""
  out = run_smoke('digits_eval.py', f'--workdir={tmp_path}')
  assert out['seeds'] == [0]
  assert out['settings']['pretrain_steps'] == 2
  for key in ('linear_probe', 'finetune'):
    assert set(out[key]) == {'pretrained'}
    assert 0 <= out[key]['pretrained']['mean'] <= 1
  assert os.path.exists(tmp_path / 'seed0' / 'finetune_pretrained' /
                        'metrics.jsonl')


@pytest.mark.slow
def test_romae_ablation(tmp_path):
  """The 'all' run (every robust-MAE switch): 2 pretraining steps, its
  reconstruction MSE and its step cost."""
  out = run_smoke('romae_ablation.py', f'--workdir={tmp_path}')
  assert out['seeds'] == [0]
  run = out['runs']['all']
  assert set(run) == {'train_loss', 'test_recon_mse', 'cost'}
  _positive(run['train_loss']['mean'], run['test_recon_mse']['mean'],
            run['cost']['step_sec'], run['cost']['flops'])


# The mask stages that mask_bench.py drives (it once crashed with
# KeyError: '_mask_roll' on features it had made by hand).


def _block(**extra):
  from mim_jax.data import masks  # pylint: disable=g-import-not-at-top
  config = dict(kind='block', num_masking_patches=120, min_num_patches=16,
                max_num_patches=60, variant='bootmae', **extra)
  return masks.stages(masks.make_mask_fn(config, 14))


def _hand_made(n, roll):
  features = {'_mask_seed': np.arange(n, dtype=np.int64),
              '_mask_uniform': np.zeros((n, 196), np.float32)}
  if roll:
    features['_mask_roll'] = np.zeros(n, np.int32)
  return features


def test_per_batch_stage_names_missing_features():
  """BootMAE's effective mask needs the roll: a batch without it fails
  with the missing name and how to make it, not a bare KeyError."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _, per_batch = _block(total_masked=147)
  ds = tf.data.Dataset.from_tensor_slices(_hand_made(8, roll=False)).batch(4)
  with pytest.raises(ValueError, match=r"lacks \['_mask_roll'\].*"
                     r'per_example'):
    ds.map(per_batch)


def test_per_batch_stage_refuses_stray_features():
  """Without extra random patches there is no roll: a hand-made one is
  refused instead of leaking into the batch."""
  _, per_batch = _block()
  with pytest.raises(ValueError, match=r"unexpected \['_mask_roll'\]"):
    per_batch(_hand_made(4, roll=True))


@pytest.mark.parametrize('extra', [{}, {'total_masked': 147}])
def test_stages_made_by_the_library_work_in_tf_data(extra):
  """per_example over keys, batch, per_batch: what the benchmark and the
  pipeline do, for the block-only and the effective BootMAE mask."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mim_jax.data import seeds  # pylint: disable=g-import-not-at-top
  per_example, per_batch = _block(**extra)
  key = seeds.base_key(0, seeds.TRAIN)
  ds = tf.data.Dataset.range(8).map(lambda i: seeds.fold_in(key, 0, i))
  batch = ds.map(per_example).batch(8).map(per_batch).get_single_element()
  assert set(batch) == {'mask', 'noise'}
  np.testing.assert_array_equal(batch['mask'].numpy().sum(1),
                                extra.get('total_masked', 120))


@pytest.mark.slow
def test_accelerator_check_smoke(curves_short_workdir, tmp_path):
  """benchmarks/accelerator_check.sh --smoke on the shared short run (its
  MFU part reads that workdir; the other parts' scripts have their own
  smoke tests): one JSON with the device, the part's result and the
  summary, its path printed last; the curves part's report in-process."""
  import accelerator_check  # pylint: disable=g-import-not-at-top,import-error
  out = tmp_path / 'check.json'
  proc = subprocess.run(
      ['bash', 'benchmarks/accelerator_check.sh', '--smoke', '--parts=mfu',
       f'--mfu_workdir={curves_short_workdir}', f'--out={out}'],
      cwd=ROOT, env=dict(_env(), PYTHON=sys.executable),
      capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == str(out)
  r = json.loads(out.read_text())
  assert r['benchmark'] == 'accelerator_check' and r['smoke'] and r['ok']
  assert r['device']['platform'] == 'cpu'
  assert r['device']['slug'] == 'smoke_cpu'
  assert {'jax', 'torch', 'device_kind', 'peak_tflops'} <= set(r['device'])
  assert set(r['parts']) == {'mfu'}
  mfu = r['parts']['mfu']
  assert mfu['ok'] and mfu['rc'] == 0 and mfu['error'] is None
  assert mfu['result']['rows_left_out'] == [1]
  _positive(mfu['result']['mfu'], mfu['result']['images_per_sec'],
            mfu['seconds'], r['total_s'])
  assert r['summary']['train_mfu'] == mfu['result']['mfu']
  curves = accelerator_check.curves(curves_short_workdir, None)
  assert curves['epochs'] == CURVES_SHORT_EPOCHS
  assert curves['dtype'] == 'float32'
  assert {'within_2sigma', 'final_within', 'no_bias', 'met'} <= set(
      curves['goals'])


def test_accelerator_check_records_failures(tmp_path):
  """A part that timed out, failed or was skipped is recorded with its
  error (and its output's tail); the others still count."""
  import accelerator_check  # pylint: disable=g-import-not-at-top,import-error
  for name, status, log in (('slow', '124 30.0 30', 'step 1\n'),
                            ('bad', '1 2.5 60', 'Traceback: boom\n'),
                            ('late', 'skipped 0 0', None),
                            ('good', '0 1.0 60', 'x\n{"a": 1}\n')):
    (tmp_path / f'{name}.status').write_text(status)
    (tmp_path / f'{name}.cmd').write_text(f'run {name}')
    if log is not None:
      (tmp_path / f'{name}.log').write_text(log)
  parts = {n: accelerator_check.part(str(tmp_path), n)
           for n in ('slow', 'bad', 'late', 'good')}
  assert parts['slow']['error'] == 'timed out after 30 s'
  assert parts['bad']['error'] == 'exit status 1'
  assert 'boom' in parts['bad']['log_tail']
  assert parts['late']['error'].startswith('skipped')
  assert parts['good']['ok'] and parts['good']['result'] == {'a': 1}
  assert [p['ok'] for p in parts.values()] == [False, False, False, True]


def test_accelerator_check_peaks(monkeypatch):
  """The GPU's dense bf16 peak from jax's device_kind (PEAK_TFLOPS wins);
  the JSON's file name from it."""
  import accelerator_check as ac  # pylint: disable=g-import-not-at-top,import-error
  monkeypatch.delenv('PEAK_TFLOPS', raising=False)
  for kind, peak in (('NVIDIA H100 80GB HBM3', 989.0),
                     ('NVIDIA H100 PCIe', 756.0), ('NVIDIA H200', 989.0),
                     ('NVIDIA GH200 480GB', 989.0),
                     ('NVIDIA A100-SXM4-80GB', 312.0), ('cpu', None)):
    assert ac.peak_tflops(kind)[0] == peak, kind
  monkeypatch.setenv('PEAK_TFLOPS', '500')
  assert ac.peak_tflops('NVIDIA H100 80GB HBM3') == (500.0, 'PEAK_TFLOPS')
  assert ac.slug('NVIDIA H100 80GB HBM3') == 'nvidia_h100_80gb_hbm3'

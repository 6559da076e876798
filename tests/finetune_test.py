"""Fine-tuning and probes through the shared trainer: layer decay, LARS,
frozen encoders, FSDP equivalence, resume, init_from and bad input.

One tiny MAE pretraining run (a module fixture) is shared by every test
that needs a pretrained encoder.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import PipelineCrash
from conftest import crash_train_pipeline
from conftest import write_parquet_shards
from mim_jax import config_lib
from mim_jax import errors
from mim_jax import experiment
from mim_jax import optim
from mim_jax import sharding
from mim_jax import state as state_lib
from mim_jax import steps
from mim_jax import train
from mim_jax import weights
from mim_jax.convert import core
from mim_jax.data import embedded
from mim_jax.methods.classifier import config as recipe
from mim_jax.methods.mae import config as mae_config

PRETRAIN_STEPS = 8


def _pretrain_config():
  c = mae_config.get_config('tiny')
  c.total_steps = PRETRAIN_STEPS
  c.warmup_steps = 2
  c.log_every_steps = 4
  c.ckpt_every_steps = PRETRAIN_STEPS
  c.vis_every_steps = 10**6
  c.knn.data = None
  c.input.batch_size = 16
  return c


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A tiny MAE workdir, pretrained for a few steps, on the embedded photos
  as parquet shards (`input.data='parquet:...'`)."""
  wd = str(tmp_path_factory.mktemp('mae_tiny'))
  config = _pretrain_config()
  photos = [b for _, b in embedded.load('skimage')]
  config.input.data = 'parquet:' + write_parquet_shards(
      str(tmp_path_factory.mktemp('photos')), 'train', photos)
  train.train_and_evaluate(config, wd)
  return wd


@pytest.fixture(scope='module')
def digits_parquet(tmp_path_factory):
  """The embedded digits' train split and the first 256 of its test split
  as parquet shards (labels, 10 classes in the metadata)."""
  folder = str(tmp_path_factory.mktemp('digits'))
  for split, rows in (('train', None), ('test', 256)):
    write_parquet_shards(
        folder, split, [b for _, b in embedded.load('digits', split)][:rows],
        embedded.labels('digits', split)[:rows], shards=3, row_group=64,
        classes=10)
  return 'parquet:' + folder


def _task_config(task, steps_=4, **model):
  c = recipe.get_config(task, 'mae', 'tiny')
  c.total_steps = steps_
  c.warmup_steps = 1
  c.log_every_steps = 2
  c.ckpt_every_steps = 2
  c.eval.every_steps = None
  c.eval.batch_size = 64
  c.input.batch_size = 16
  c.model.update(model)
  return c


# ---------------------------------------------------------------------------
# The optax chain.


def _tiny_classifier_params(scan=False):
  c = _task_config('finetune', scan=scan)
  model = experiment.build_model(c)
  return state_lib.init_params(model, experiment.batch_spec(c, 1), 0)


# MAE `util/lr_decay.py` with decay d = 0.5 and 4 blocks:
# scale = d ** (4 + 1 - layer_id).
GOLDEN_LAYER_DECAY = {
    'encoder/cls_token': 0.5 ** 5,
    'encoder/pos_embed': 0.5 ** 5,
    'encoder/patch_embed/kernel': 0.5 ** 5,
    'encoder/patch_embed/bias': 0.5 ** 5,
    'encoder/blocks_0/attn/qkv/kernel': 0.5 ** 4,
    'encoder/blocks_0/norm1/scale': 0.5 ** 4,
    'encoder/blocks_1/mlp/fc1/bias': 0.5 ** 3,
    'encoder/blocks_2/attn/proj/kernel': 0.5 ** 2,
    'encoder/blocks_3/norm2/bias': 0.5 ** 1,
    'encoder/blocks_3/mlp/fc2/kernel': 0.5 ** 1,
    'fc_norm/scale': 1.0,
    'fc_norm/bias': 1.0,
    'head/kernel': 1.0,
    'head/bias': 1.0,
}


def test_layer_decay_matches_the_golden_table_for_every_param():
  params = _tiny_classifier_params()
  scales = optim.layer_decay_scales(params, 0.5, 4)
  flat = {'/'.join(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(scales)[0]
          for k in [tuple(str(getattr(p, 'key', p)) for p in k)]}
  for path, want in GOLDEN_LAYER_DECAY.items():
    assert flat[path] == pytest.approx(want), path
  # Every leaf has a scale of the documented form.
  for path, value in flat.items():
    layer = (0 if any(n in path for n in ('cls_token', 'pos_embed',
                                         'patch_embed'))
             else int(path.split('blocks_')[1].split('/')[0]) + 1
             if 'blocks_' in path else 5)
    assert value == pytest.approx(0.5 ** (5 - layer)), path


def test_layer_decay_of_a_scanned_stack_is_per_block():
  params = _tiny_classifier_params(scan=True)
  scales = optim.layer_decay_scales(params, 0.5, 4)
  kernel = scales['encoder']['blocks']['attn']['qkv']['kernel']
  np.testing.assert_allclose(np.ravel(kernel), 0.5 ** np.array([4, 3, 2, 1]))
  assert scales['head']['kernel'] == 1.0


def _lars_config(wd):
  c = _task_config('linprobe')
  c.lr = 0.5
  c.warmup_steps = 0
  c.optim.weight_decay = wd
  c.optim.freeze = ()
  return c


def test_lars_skips_decay_and_trust_ratio_on_1d_params():
  params = {'w': jnp.asarray(np.arange(12.0).reshape(3, 4) / 10 + 0.1),
            'b': jnp.asarray([0.5, -1.0, 2.0, 0.0])}
  grads = {'w': jnp.full((3, 4), 0.3), 'b': jnp.asarray([1.0, 2.0, 3.0,
                                                           4.0])}
  wd, lr = 0.1, 0.5
  tx, schedule = optim.make_tx(_lars_config(wd), params)
  assert float(schedule(0)) == pytest.approx(lr)
  updates, _ = tx.update(grads, tx.init(params), params)
  # 1-D: plain momentum SGD, no decay, no trust scaling.
  np.testing.assert_allclose(updates['b'], -lr * grads['b'], rtol=1e-6)
  # Matrices: (g + wd w) * 0.001 |w| / |g + wd w| (MAE util/lars.py).
  dp = grads['w'] + wd * params['w']
  q = 0.001 * jnp.linalg.norm(params['w']) / jnp.linalg.norm(dp)
  np.testing.assert_allclose(updates['w'], -lr * dp * q, rtol=1e-5)


def test_frozen_params_get_no_update_and_no_optimizer_state():
  params = _tiny_classifier_params()
  c = _task_config('linprobe')
  c.warmup_steps = 0  # a non-zero lr at step 0
  tx, _ = optim.make_tx(c, params)
  state = tx.init(params)
  sizes = sum(x.size for x in jax.tree.leaves(state))
  head = sum(x.size for x in jax.tree.leaves(params['head']))
  assert sizes <= head + 8  # momentum of the head (+ counters), no encoder
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert all(float(jnp.abs(u).max()) == 0
             for u in jax.tree.leaves(updates['encoder']))
  assert float(jnp.abs(updates['head']['kernel']).max()) > 0


# ---------------------------------------------------------------------------
# Steps through the trainer's code.


def _batch(config, n, seed=0):
  rng = np.random.default_rng(seed)
  s = config.input.image_size
  return {'image': rng.standard_normal((n, s, s, 3)).astype(np.float32),
          'label': rng.integers(0, config.model.num_classes, n).astype(
              np.int32)}


def _one_step(config, mesh, params=None, model_state=None):
  model = experiment.build_model(config)
  state, shardings, _, schedule = state_lib.create_train_state(
      config, model, mesh, experiment.batch_spec(config), params=params,
      model_state=model_state)
  step = steps.jit_train_step(config, model, experiment.build_loss(config),
                              schedule, mesh, shardings)
  batch = sharding.to_global(_batch(config, config.input.batch_size),
                             sharding.data_sharding(mesh))
  before = jax.device_get(state)
  state, metrics = step(state, batch, {})
  return before, jax.device_get(state), jax.device_get(metrics)


def _mesh(n):
  return sharding.make_mesh([('data', 1), ('fsdp', n), ('tensor', 1)],
                            jax.devices()[:n])


@pytest.mark.slow
@pytest.mark.parametrize('task', ['finetune', 'linprobe', 'attnprobe'])
def test_step_on_8_devices_with_fsdp_matches_one_device(task):
  config = _task_config(task)
  config.min_shard_size = 1   # shard even the tiny model's matrices
  if task == 'finetune':
    config.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0)
  before, after1, m1 = _one_step(config, _mesh(1))
  _, after8, m8 = _one_step(config, _mesh(8), params=before.params)
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(after1.params),
                  jax.tree.leaves(after8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  if task != 'finetune':
    # The probe's encoder is bit-for-bit the same after the step, and its
    # BatchNorm statistics moved.
    for a, b in zip(jax.tree.leaves(before.params['encoder']),
                    jax.tree.leaves(after8.params['encoder'])):
      np.testing.assert_array_equal(a, b)
    moved = jax.tree.map(lambda x, y: float(np.abs(x - y).max()),
                         before.model_state, after8.model_state)
    assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow
def test_linear_probe_run_keeps_the_pretrained_encoder_exactly(
    pretrained, tmp_path):
  config = _task_config('linprobe', steps_=4)
  config.init_from = pretrained
  config.eval.every_steps = 2
  state = train.train_and_evaluate(config, str(tmp_path / 'lin'))
  src = weights.workdir_config(pretrained)
  src_params, _ = weights.from_workdir(
      src, experiment.build_model(src), pretrained)
  got = jax.device_get(state.params['encoder'])
  want = src_params['encoder']
  assert 'pos_embed' not in want  # pretraining: a fixed table
  for name in ('cls_token', 'patch_embed', 'blocks_0', 'blocks_3'):
    for a, b in zip(jax.tree.leaves(want[name]),
                    jax.tree.leaves(got[name])):
      np.testing.assert_array_equal(a, b)
  rows = [json.loads(line) for line in open(tmp_path / 'lin' /
                                            'metrics.jsonl')]
  evals = [r for r in rows if 'eval/top1' in r]
  assert [r['step'] for r in evals] == [2, 4]
  assert all(0 <= r['eval/top1'] <= r['eval/top5'] <= 1 for r in evals)
  best = json.load(open(tmp_path / 'lin' / 'best.json'))
  assert best['value'] == max(r['eval/top1'] for r in evals)
  assert os.listdir(tmp_path / 'lin' / 'best') == [str(best['step'])]


@pytest.mark.slow
def test_finetune_resume_is_exact_and_eval_only_reproduces(
    pretrained, digits_parquet, tmp_path, monkeypatch):
  """A fine-tune run (mixup/cutmix, RandAugment, random erasing, init_from a
  pretraining workdir; the digits as parquet shards) killed after its
  step-2 checkpoint and restarted ends with the same params as an
  uninterrupted run; evaluation-only of its workdir gives its last
  evaluation."""

  def config():
    c = _task_config('finetune', steps_=4)
    c.init_from = pretrained
    c.input.data = c.eval.data = digits_parquet
    c.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0)
    c.input.random_erasing.prob = 0.25
    c.input.randaugment = 'rand-m9-mstd0.5-inc1'
    return c

  full = train.train_and_evaluate(config(), str(tmp_path / 'full'))
  wd = str(tmp_path / 'half')
  restore = crash_train_pipeline(monkeypatch, 2)
  with pytest.raises(PipelineCrash):
    train.train_and_evaluate(config(), wd)
  restore()
  resumed = train.train_and_evaluate(config(), wd)
  for a, b in zip(jax.tree.leaves(full.params),
                  jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  # Evaluation-only from the fine-tuned workdir gives the run's last eval.
  ev = recipe.get_config('eval', 'mae', 'tiny')
  ev.init_from = str(tmp_path / 'full')
  ev.input.data = ev.eval.data = digits_parquet
  ev.eval.batch_size = 64
  row = train.evaluate(ev, str(tmp_path / 'eval'))
  last = [json.loads(line) for line in open(tmp_path / 'full' /
                                            'metrics.jsonl')
          if 'eval/top1' in line][-1]
  assert row['eval/top1'] == pytest.approx(last['eval/top1'])


# ---------------------------------------------------------------------------
# Bad input, before anything compiles.


def test_init_from_missing_or_truncated_file_is_named(tmp_path):
  config = _task_config('finetune')
  config.init_from = str(tmp_path / 'nope.pth')
  with pytest.raises(errors.MissingFileError, match='does not exist'):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))
  cut = tmp_path / 'cut.safetensors'
  core.save_state_dict({'cls_token': np.ones((1, 1, 64), np.float32)},
                       str(cut))
  cut.write_bytes(cut.read_bytes()[:-8])
  config.init_from = str(cut)
  with pytest.raises(errors.WeightsFileError,
                     match=r'is truncated: its header describes \d+ bytes'):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))


def test_init_from_another_architecture_names_the_keys(pretrained,
                                                        tmp_path):
  config = _task_config('finetune')
  config.init_from = pretrained
  config.model.encoder.width = 32
  config.model.encoder.num_heads = 2
  with pytest.raises(ValueError, match=r'shape mismatches.*blocks_0/'):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))
  deeper = _task_config('finetune')
  deeper.init_from = pretrained
  deeper.model.encoder.depth = 6
  with pytest.raises(ValueError, match=r'lacks .*blocks_4/'):
    train.train_and_evaluate(deeper, str(tmp_path / 'wd2'))


def test_probe_block_beyond_depth_is_refused(tmp_path):
  config = _task_config('linprobe', feature_block=4, pool='avg')
  with pytest.raises(ValueError, match=r'feature_block=4.*0\.\.3'):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))


def test_num_classes_unlike_the_data_set_is_refused(tmp_path):
  config = _task_config('finetune', num_classes=7)
  with pytest.raises(ValueError, match=r'num_classes=7.*10 classes'):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))


def test_unknown_best_metric_is_refused(tmp_path):
  config = _task_config('finetune')
  config.eval.best_metric = 'loss'
  with pytest.raises(ValueError, match=r"best_metric='loss'"):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))


def test_missing_eval_split_is_refused(tmp_path):
  config = _task_config('finetune')
  config.eval.split = 'validation'
  with pytest.raises(ValueError, match=r"no split 'validation'"):
    train.train_and_evaluate(config, str(tmp_path / 'wd'))


# ---------------------------------------------------------------------------
# init_from official PyTorch files.


def test_init_from_official_pretrain_and_finetuned_files(pretrained,
                                                         tmp_path):
  """An MAE pretraining file (encoder + decoder, official keys, here as
  safetensors) gives the classifier its encoder; a fine-tuned file
  (fc_norm.*, head.*) loads whole, exactly."""
  src = weights.workdir_config(pretrained)
  src_model = experiment.build_model(src)
  src_params, _ = weights.from_workdir(src, src_model, pretrained)
  pth = str(tmp_path / 'checkpoint-7.safetensors')
  core.save_state_dict(weights.to_torch(src, src_model, src_params), pth)
  config = _task_config('finetune')
  config.init_from = pth
  model = experiment.build_model(config)
  params, model_state = weights.initial_params(config, model)
  assert model_state is None
  for name in ('cls_token', 'patch_embed', 'blocks_0', 'blocks_3'):
    for a, b in zip(jax.tree.leaves(src_params['encoder'][name]),
                    jax.tree.leaves(params['encoder'][name])):
      np.testing.assert_array_equal(a, b)
  # The learned position embedding starts from the file's sin-cos table.
  np.testing.assert_allclose(
      params['encoder']['pos_embed'][0, 1:],
      core.load_state_dict(pth)['pos_embed'][0, 1:], atol=1e-7)

  # Fine-tuned layout: our classifier exported with official keys.
  ft = str(tmp_path / 'finetuned.pth')
  core.save_state_dict(weights.to_torch(config, model, params), ft)
  assert {'fc_norm.weight', 'head.weight'} <= set(
      core.load_state_dict(ft))
  ev = recipe.get_config('eval', 'mae', 'tiny')
  ev.init_from = ft
  again, _ = weights.initial_params(ev, experiment.build_model(ev))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  ev.init_from = pth   # a pretraining file: nothing to evaluate
  with pytest.raises(errors.WeightsFileError, match='holds no classifier '
                     r'head \(head\.\* keys\)'):
    weights.initial_params(ev, experiment.build_model(ev))

  # No encoder in the layout of init_method nor in timm's: both named.
  odd = str(tmp_path / 'odd.safetensors')
  core.save_state_dict({f'backbone.{k}': v for k, v in
                        core.load_state_dict(pth).items()}, odd)
  config.init_from, config.init_method = odd, 'cae'
  with pytest.raises(errors.WeightsFileError,
                     match=r"under cae's \(prefix 'encoder\.'\) nor timm's "
                     r"\(prefix ''\); its first keys are \['backbone\."):
    weights.initial_params(config, model)


@pytest.mark.parametrize('method', ['cae', 'bootmae'])
def test_init_from_cae_and_bootmae_pretraining_files(method, tmp_path):
  """CAE (encoder under 'encoder.', layer scale, q/v biases) and BootMAE
  (top-level encoder beside its decoders and momentum copy) pretraining
  files give the classifier of their recipe its encoder."""
  from mim_jax import methods  # pylint: disable=g-import-not-at-top
  src = config_lib.load_config_file(f'configs/{method}_tiny.py')
  src_model = experiment.build_model(src)
  src_params = state_lib.init_params(src_model,
                                     experiment.batch_spec(src, 1), 3)
  pth = str(tmp_path / f'{method}.pth')
  core.save_state_dict(weights.to_torch(src, src_model, src_params), pth)
  config = recipe.get_config('finetune', method, 'tiny')
  config.init_from = pth
  params, _ = weights.initial_params(config, experiment.build_model(config))
  want = traverse_util.flatten_dict(src_params['encoder'], sep='/')
  got = traverse_util.flatten_dict(params['encoder'], sep='/')
  # Every pretrained encoder param arrives unchanged (the classifier adds
  # fresh ones: CAE's relative position bias tables).
  assert set(want) - {'norm/scale', 'norm/bias'} <= set(got)
  for k in set(want) & set(got):
    np.testing.assert_array_equal(want[k], got[k], err_msg=k)
  assert methods.get(method).classifier.key_prefix is not None

"""The method contract: the registry, the record's checks, a throwaway
method trained and fine-tuned through the contract alone, one mask count
everywhere, gradient accumulation that keeps the loss terms, and
pre-contract checkpoints that still restore."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax import struct
from flax import traverse_util

from mim_jax import checkpoint
from mim_jax import experiment
from mim_jax import masking
from mim_jax import method
from mim_jax import methods
from mim_jax import sharding
from mim_jax import state as state_lib
from mim_jax import steps
from mim_jax import train
from mim_jax import weights
from mim_jax.data import masks
from mim_jax.methods.bootmae import config as bootmae_config
from mim_jax.methods.cae import config as cae_config
from mim_jax.methods.classifier import config as classifier_config
from mim_jax.models import vit
from tests import toy


def test_registry_names_every_method_and_rejects_unknown_names():
  for name in ('mae', 'cae', 'bootmae'):
    record = methods.get(name)
    assert isinstance(record, method.Method) and record.name == name
    assert record.parity is not None
    assert record.pipeline == 'masked' and record.labelled is None
    assert isinstance(record.classifier, method.EncoderCard)
  task = methods.get('classifier')
  assert task.pipeline == 'labelled' and task.classifier is None
  assert isinstance(task.labelled, method.LabelledTask)
  with pytest.raises(ValueError, match=r"Unknown method 'maee'.*'mae'"):
    methods.get('maee')


def test_record_rejects_a_malformed_method():
  ok = dict(name='x', build_model=len, batch_spec=len, loss=len,
            to_pixels=None, converter=toy.METHOD.converter)
  method.Method(**ok)
  with pytest.raises(TypeError, match='loss must be callable'):
    method.Method(**dict(ok, loss='loss_fn'))
  with pytest.raises(TypeError, match='unexpected keyword'):
    method.Method(**dict(ok, ema_targets=len))   # a misspelt hook fails
  with pytest.raises(TypeError, match="`update` is required for kind "
                     "'running'"):
    method.TargetProvider(name='s', kind='running', compute=len,
                          outputs=('s',), init=len)
  with pytest.raises(TypeError, match='kind'):
    method.TargetProvider(name='s', kind='teacher', compute=len,
                          outputs=('s',), init=len)
  # The pipeline is declared, and a labelled task needs the labelled one.
  with pytest.raises(TypeError, match="pipeline='labeled' is not one of"):
    method.Method(**dict(ok, pipeline='labeled'))
  task = method.LabelledTask(eval_metrics=len, from_encoder=len,
                             from_encoder_params=len)
  method.Method(**dict(ok, pipeline='labelled', labelled=task))
  with pytest.raises(TypeError, match="needs pipeline='labelled'"):
    method.Method(**dict(ok, labelled=task))
  with pytest.raises(TypeError, match='classifier must be a '
                     'mim_jax.method.EncoderCard'):
    method.Method(**dict(ok, classifier=dict(key_prefix='')))
  card = dict(encoder={}, key_prefix='', mean=(0.5,) * 3, std=(0.5,) * 3)
  with pytest.raises(TypeError, match=r"recipe key \('fine-tune', 'B'\)"):
    method.EncoderCard(**card, recipes={('fine-tune', 'B'): method.Recipe()})
  with pytest.raises(TypeError, match='must be a mim_jax.method.Recipe'):
    method.EncoderCard(**card, recipes={('finetune', 'B'): dict(lr=1.0)})
  with pytest.raises(TypeError, match='unexpected keyword'):
    method.Recipe(learning_rate=1.0)   # a misspelt recipe value fails


def test_mask_count_agrees_everywhere():
  """One rule for every L <= 256 and M: the ratio a parity adapter derives
  gives back M in the pipeline's and the models' counts."""
  for num_patches in range(2, 257):
    for count in range(1, num_patches):
      ratio = masking.ratio_for(count, num_patches)
      assert masking.num_masked(num_patches, ratio) == count
      assert masking.num_visible(num_patches, ratio) == num_patches - count
  # M / L itself loses a patch for some pairs (the old `+ 1e-9` fix).
  assert masking.num_masked(49, 36 / 49) == 37
  # The pipeline's random masks and the models' split, end to end.
  for grid, count in ((7, 36), (8, 48), (14, 147), (16, 1), (16, 255)):
    num_patches = grid * grid
    ratio = masking.ratio_for(count, num_patches)
    fn = masks.make_mask_fn({'kind': 'random', 'ratio': ratio}, grid)
    mask = fn(tf.constant([1, 2], tf.int64))['mask'].numpy()
    assert mask.sum() == count
    vis, hidden = vit.split_by_mask(jnp.asarray(mask[None]), (grid, grid),
                                    ratio)
    assert hidden.shape == (1, count) and vis.shape == (1, num_patches - count)
    assert set(np.asarray(hidden[0]).tolist()) == set(
        np.flatnonzero(mask).tolist())


@pytest.fixture(scope='module')
def toy_registered():
  methods.register('toy', 'tests.toy')
  yield
  methods.REGISTRY.pop('toy')


def test_throwaway_method_trains_through_the_contract(toy_registered,
                                                      tmp_path):
  """A method that generic code has never heard of trains, logs its loss
  terms, checkpoints its running target statistics and resumes."""
  del toy_registered
  config = toy.get_config()
  workdir = str(tmp_path)
  state = train.train_and_evaluate(config, workdir)
  rows = [json.loads(l) for l in open(os.path.join(workdir,
                                                   'metrics.jsonl'))]
  assert [r['step'] for r in rows] == [2, 4]
  assert all(np.isfinite(r['train/mse']) for r in rows)
  stats = np.asarray(state.target_state['pixel_stats'])
  assert stats.shape == (3,) and np.abs(stats).sum() > 0
  assert not any(f.startswith('recon_') for f in os.listdir(workdir))
  # Resume: the running statistics come back from the checkpoint.
  config.total_steps = 6
  resumed = train.train_and_evaluate(config, workdir)
  assert int(resumed.step) == 6
  mgr = checkpoint.make_manager(workdir, keep=5, async_save=False)
  abstract = state_lib.create_train_state(
      config, experiment.build_model(config),
      sharding.make_mesh([('data', -1)]), experiment.batch_spec(config, 1),
      materialize=False)[0]
  at4, _ = checkpoint.restore_latest(mgr, abstract, 4)
  np.testing.assert_array_equal(at4.target_state['pixel_stats'], stats)


def test_throwaway_method_is_fine_tuned_through_its_card(toy_registered,
                                                         tmp_path):
  """The toy's `classifier` card alone gives it classifier configs: its
  pretraining workdir's encoder is fine-tuned and evaluated; a method
  without a card is refused by name."""
  del toy_registered
  pre = toy.get_config()
  pre.total_steps = 2
  pre.ckpt_every_steps = 2
  train.train_and_evaluate(pre, str(tmp_path / 'pre'))
  for task in classifier_config.TASKS:
    config = classifier_config.get_config(task, 'toy', 'tiny')
    assert config.init_method == 'toy'
    assert config.model.encoder.posemb == 'learned'
  config = classifier_config.get_config('finetune', 'toy', 'tiny')
  config.model.encoder.depth = pre.model.encoder.depth
  config.init_from = str(tmp_path / 'pre')
  config.total_steps = 2
  config.warmup_steps = 1
  config.log_every_steps = 1
  config.eval.every_steps = 2
  config.input.batch_size = 16
  # The workdir's params['encoder'] arrive as they are; the global-pool
  # classifier drops the final norm and learns the position embedding.
  params, _ = weights.initial_params(config, experiment.build_model(config))
  src, _ = weights.from_workdir(pre, experiment.build_model(pre),
                                str(tmp_path / 'pre'))
  want = traverse_util.flatten_dict(src['encoder'], sep='/')
  got = traverse_util.flatten_dict(params['encoder'], sep='/')
  assert set(want) - {'norm/scale', 'norm/bias'} == set(got) - {'pos_embed'}
  for k in set(want) & set(got):
    np.testing.assert_array_equal(want[k], got[k], err_msg=k)
  state = train.train_and_evaluate(config, str(tmp_path / 'ft'))
  rows = [json.loads(l) for l in open(tmp_path / 'ft' / 'metrics.jsonl')]
  assert all(np.isfinite(r['train/loss']) for r in rows if 'train/loss' in r)
  assert 0.0 <= [r for r in rows if 'eval/top1' in r][-1]['eval/top1'] <= 1
  assert int(state.step) == 2
  with pytest.raises(ValueError, match=r"'classifier' declares no "
                     r'classifier card \(Method.classifier'):
    classifier_config.get_config('finetune', 'classifier', 'tiny')
  with pytest.raises(ValueError, match=r"No official finetune recipe for toy "
                     r'ViT-B; known \(task, size\): \[\]'):
    classifier_config.get_config('finetune', 'toy', 'B')


def _one_step(config, batch, accum):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.grad_accum_steps = accum
    config.input.batch_size = len(batch['image'])
  mesh = sharding.make_mesh([('data', 1)], jax.devices()[:1])
  model = experiment.build_model(config)
  state, shardings, _, schedule = state_lib.create_train_state(
      config, model, mesh, experiment.batch_spec(config))
  step = steps.jit_train_step(config, model, experiment.build_loss(config),
                              schedule, mesh, shardings)
  return step(state, batch, {})[1]


@pytest.mark.slow
@pytest.mark.parametrize('recipe', [cae_config, bootmae_config])
def test_accumulation_keeps_every_loss_term(recipe):
  config = recipe.get_config('tiny')
  config.model.encoder.depth = 1
  if 'taps' in config.model:
    config.model.taps = (0, 0)
  config.total_steps = 10
  config.warmup_steps = 2
  rng = np.random.default_rng(0)
  n, num_patches = 8, 64
  count = masking.num_masked(num_patches, config.input.mask.ratio)
  mask = np.zeros((n, num_patches), np.float32)
  for row in mask:
    row[rng.permutation(num_patches)[:count]] = 1
  batch = {'image': rng.standard_normal((n, 32, 32, 3)).astype(np.float32),
           'mask': mask}
  full = jax.device_get(_one_step(config, batch, 1))
  accum = jax.device_get(_one_step(config, batch, 2))
  assert set(accum) == set(full)
  terms = [k for k in full if k.startswith('loss_')]
  assert terms   # loss_main / loss_align / loss_pixel / loss_feature ...
  for k in full:
    np.testing.assert_allclose(accum[k], full[k], rtol=2e-5, err_msg=k)


@struct.dataclass
class _PreContractState:
  """The TrainState fields before target providers (no target_state)."""
  step: jax.Array
  params: dict
  opt_state: tuple
  ema_params: dict


def test_pre_contract_checkpoint_restores(tmp_path):
  config = bootmae_config.get_config('tiny')
  config.model.encoder.depth = 1
  config.model.taps = (0, 0)
  mesh = sharding.make_mesh([('data', 1)], jax.devices()[:1])
  model = experiment.build_model(config)
  state = state_lib.create_train_state(config, model, mesh,
                                   experiment.batch_spec(config, 2))[0]
  old = _PreContractState(**{f.name: getattr(state, f.name) for f in
                             dataclasses.fields(_PreContractState)})
  mgr = checkpoint.make_manager(str(tmp_path), keep=1, async_save=False)
  checkpoint.save(mgr, 3, old, every=1)
  mgr.wait_until_finished()
  abstract = state_lib.create_train_state(config, model, mesh,
                                      experiment.batch_spec(config, 2),
                                      materialize=False)[0]
  restored, at = checkpoint.restore_latest(mgr, abstract)
  assert at == 3 and restored.target_state is None
  for a, b in zip(jax.tree.leaves((state.params, state.ema_params)),
                  jax.tree.leaves((restored.params, restored.ema_params))):
    np.testing.assert_array_equal(a, b)

"""Sharding on 8 fake CPU devices: logical rules, FSDP, equivalence with one
device, scan/remat under a mesh, bf16, and checkpoint resharding 8 -> 4 -> 1.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mim_jax import checkpoint
from mim_jax import experiment
from mim_jax import sharding
from mim_jax import state as state_lib
from mim_jax import steps
from mim_jax.methods.bootmae import config as bootmae_config
from mim_jax.methods.mae import config as mae_config
from mim_jax.models import vit
from mim_jax.state import TrainState

BATCH, SIZE, L = 8, 32, 64


def _config(**model):
  c = mae_config.get_config('tiny')
  c.model.encoder.depth = 2     # compile time, not coverage, grows with depth
  c.model.decoder_depth = 1
  c.model.update(model)
  c.input.batch_size = BATCH
  c.total_steps = 10
  c.warmup_steps = 0     # the first step already moves the params
  # The key bias has a zero gradient plus rounding noise, which Adam with a
  # tiny eps turns into O(lr) moves that differ between summation orders.
  c.optim.eps = 1e-3
  c.min_shard_size = 0   # shard every param: the tiny model is all small
  return c


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.standard_normal((BATCH, SIZE, SIZE, 3), np.float32),
          'noise': rng.random((BATCH, L), np.float32)}


def _shapes(batch):
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def _mesh(spec, n):
  return sharding.make_mesh(spec, jax.devices()[:n])


def _setup(config, mesh, params=None, materialize=True):
  model = experiment.build_model(config)
  state, shardings, _, schedule = state_lib.create_train_state(
      config, model, mesh, _shapes(_batch()), params=params,
      materialize=materialize)
  step = steps.jit_train_step(config, model, experiment.build_loss(config),
                              schedule, mesh, shardings)
  return state, shardings, step


def _run(step, state, mesh, seeds):
  losses = []
  for s in seeds:
    batch = sharding.to_global(_batch(s), sharding.data_sharding(mesh))
    state, m = step(state, batch, {})   # MAE: no frozen target weights
    losses.append(float(m['loss']))
  return state, losses


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) -
                                 np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _spec(leaf):
  return leaf.sharding.spec


# ---------------------------------------------------------------------------
# Rules and the golden table.

# Tiny MAE on a (data=2, fsdp=2, tensor=2) mesh, every param sharded
# (min_shard_size=0). Blocks repeat the blocks_0 pattern.
GOLDEN = {
    'encoder/patch_embed/kernel': P(None, None, None, 'fsdp'),
    'encoder/patch_embed/bias': P('fsdp'),
    'encoder/cls_token': P(None, None, 'fsdp'),
    'encoder/blocks_0/norm1/scale': P('fsdp'),
    'encoder/blocks_0/norm1/bias': P('fsdp'),
    'encoder/blocks_0/attn/qkv/kernel': P('fsdp', 'tensor'),
    'encoder/blocks_0/attn/qkv/bias': P('tensor'),
    'encoder/blocks_0/attn/proj/kernel': P('tensor', 'fsdp'),
    'encoder/blocks_0/attn/proj/bias': P('fsdp'),
    'encoder/blocks_0/norm2/scale': P('fsdp'),
    'encoder/blocks_0/norm2/bias': P('fsdp'),
    'encoder/blocks_0/mlp/fc1/kernel': P('fsdp', 'tensor'),
    'encoder/blocks_0/mlp/fc1/bias': P('tensor'),
    'encoder/blocks_0/mlp/fc2/kernel': P('tensor', 'fsdp'),
    'encoder/blocks_0/mlp/fc2/bias': P('fsdp'),
    'encoder/norm/scale': P('fsdp'),
    'encoder/norm/bias': P('fsdp'),
    'decoder/decoder_embed/kernel': P(None, 'fsdp'),
    'decoder/decoder_embed/bias': P('fsdp'),
    'decoder/mask_token': P(None, None, 'fsdp'),
    'decoder/pred/kernel': P('fsdp'),
    'decoder/pred/bias': P('fsdp'),   # no named axis: the FSDP fallback
    'decoder/norm/scale': P('fsdp'),
    'decoder/norm/bias': P('fsdp'),
}


def _flat(tree):
  return {'/'.join(str(k.key) for k in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def _golden_for(name):
  if name in GOLDEN:
    return GOLDEN[name]
  # Every block of the encoder and the decoder follows encoder/blocks_0.
  parts = name.split('/')
  return GOLDEN['/'.join(['encoder', 'blocks_0'] + parts[2:])]


def test_golden_partition_specs_tiny_model():
  config = _config()
  mesh = _mesh([('data', 2), ('fsdp', 2), ('tensor', 2)], 8)
  model = experiment.build_model(config)
  _, shardings = state_lib.param_shardings(config, model, mesh,
                                       _shapes(_batch()))
  got = {k: v.spec for k, v in _flat(shardings).items()}
  assert len(got) == 12 + 12 * (2 + 1)   # 12 params per block
  for name, spec in got.items():
    assert spec == _golden_for(name), name


def test_golden_partition_specs_scan_layout_adds_layer_axis():
  config = _config(scan=True)
  mesh = _mesh([('data', 2), ('fsdp', 2), ('tensor', 2)], 8)
  model = experiment.build_model(config)
  _, shardings = state_lib.param_shardings(config, model, mesh,
                                       _shapes(_batch()))
  got = {k: v.spec for k, v in _flat(shardings).items()}
  assert got['encoder/blocks/attn/qkv/kernel'] == P(None, 'fsdp', 'tensor')
  assert got['encoder/blocks/mlp/fc2/bias'] == P(None, 'fsdp')
  assert got['decoder/blocks/norm1/scale'] == P(None, 'fsdp')
  assert got['encoder/cls_token'] == P(None, None, 'fsdp')


def test_fsdp_shards_every_param_above_threshold_vitb():
  config = mae_config.get_config('B/16')
  assert config.model.scan
  mesh = _mesh([('fsdp', 8)], 8)
  model = experiment.build_model(config)
  shapes = {'image': jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32),
            'noise': jax.ShapeDtypeStruct((8, 196), jnp.float32)}
  abstract, shardings = state_lib.param_shardings(config, model, mesh, shapes)
  big = small = 0
  for (name, leaf), sh in zip(_flat(abstract).items(),
                              _flat(shardings).values()):
    if leaf.size >= sharding.DEFAULT_MIN_SHARD_SIZE:
      assert 'fsdp' in jax.tree.leaves(tuple(sh.spec)), name
      big += 1
    else:
      assert sh.spec == P(), name
      small += 1
  # Scanned stacks: 4 kernels + qkv and fc1 biases (encoder), 4 kernels +
  # fc1 bias (decoder, 8 x 2048), patch_embed, decoder_embed and pred.
  assert big == 6 + 5 + 3 and small > 10
  full = sharding.per_device_bytes(abstract, jax.tree.map(
      lambda _: sharding.replicated(mesh), abstract))
  assert sharding.per_device_bytes(abstract, shardings) < full / 7.5


def test_missing_rule_is_named():
  config = _config()
  mesh = _mesh([('fsdp', 8)], 8)
  model = experiment.build_model(config)
  config.sharding_rules = [r for r in sharding.DEFAULT_RULES
                           if r[0] != 'mlp']
  with pytest.raises(ValueError, match=r"\['mlp'\] have no sharding rule"):
    state_lib.param_shardings(config, model, mesh, _shapes(_batch()))
  config.sharding_rules = [r for r in sharding.DEFAULT_RULES
                           if r[0] not in ('act_len', 'kv')]
  with pytest.raises(ValueError, match=r"\['act_len'\] have no sharding"):
    sharding.rules_from_config(config)
  config.sharding_rules = list(sharding.DEFAULT_RULES) + [('embed', 'model')]
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sharding.rules_from_config(config)


def test_param_with_unknown_logical_axis_is_named():
  specs = {'w': P('embed', 'vocab')}
  abstract = {'w': jax.ShapeDtypeStruct((8, 8), jnp.float32)}
  with pytest.raises(ValueError, match=r"\['vocab'\] have no sharding rule"):
    sharding.param_shardings(specs, abstract, _mesh([('fsdp', 8)], 8),
                             sharding.DEFAULT_RULES)


def test_param_without_logical_names_is_named():
  specs = {'w': P('embed', None), 'v': P()}
  abstract = {'w': jax.ShapeDtypeStruct((8, 8), jnp.float32),
              'v': jax.ShapeDtypeStruct((8,), jnp.float32)}
  with pytest.raises(ValueError, match=r"without logical axis names: "
                     r"\[\"\['v'\]\"\]"):
    sharding.param_shardings(specs, abstract, _mesh([('fsdp', 8)], 8),
                             sharding.DEFAULT_RULES)


def test_indivisible_dim_stays_replicated():
  mesh = _mesh([('fsdp', 8)], 8)
  spec = sharding.mesh_spec(P('embed', 'mlp'), (12, 16), mesh,
                            sharding.DEFAULT_RULES)
  assert spec == P()   # 12 % 8 != 0; mlp -> tensor is absent
  assert sharding.mesh_spec(P('mlp', 'embed'), (12, 16), mesh,
                            sharding.DEFAULT_RULES) == P(None, 'fsdp')


def _same_sharding_leaves(tree, like):
  """Asserts `tree` (shardings) equals `like` leaf by leaf, same paths."""
  assert jax.tree.structure(tree) == jax.tree.structure(like)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                          jax.tree.leaves(like)):
    assert a == b, (jax.tree_util.keystr(path), a.spec, b.spec)


def test_state_shardings_follow_params_for_opt_state_and_ema_copies():
  """A real tiny BootMAE state: the Adam moments and the momentum encoder
  (the EMA copy of the encoder) inherit the params' logical axes from the
  boxed params' metadata, so they are sharded exactly like their params;
  counters are replicated."""
  config = bootmae_config.get_config('tiny')
  config.min_shard_size = 0
  mesh = _mesh([('data', 2), ('fsdp', 2), ('tensor', 2)], 8)
  model = experiment.build_model(config)
  shapes = experiment.batch_spec(config, 8)
  state, sh, _, _ = state_lib.create_train_state(config, model, mesh, shapes,
                                             materialize=False)
  assert state.target_state is None and sh.target_state is None
  # The params: as param_shardings gives them, and really split (not all
  # replicated), with distinct specs, so following them means something.
  _, param_sh = state_lib.param_shardings(config, model, mesh, shapes)
  _same_sharding_leaves(sh.params, param_sh)
  specs = {x.spec for x in jax.tree.leaves(sh.params)}
  assert {P('fsdp'), P('fsdp', 'tensor'), P('tensor', 'fsdp')} <= specs
  # Adam's mu and nu: exactly the params' shardings.
  moments = [t for name in ('mu', 'nu') for _, t in
             optax.tree_utils.tree_get_all_with_path(sh.opt_state, name)]
  assert len(moments) == 2
  for m in moments:
    _same_sharding_leaves(m, sh.params)
  # The EMA copy of the encoder: exactly the encoder params' shardings.
  assert set(sh.ema_params) == {'encoder'}
  _same_sharding_leaves(sh.ema_params['encoder'], sh.params['encoder'])
  # The step counter and Adam's count: replicated.
  assert sh.step.spec == P()
  counts = optax.tree_utils.tree_get_all_with_path(sh.opt_state, 'count')
  assert counts and all(c.spec == P() for _, c in counts)
  # The abstract state carries the same shardings.
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(sh)):
    assert a.sharding == b


def test_state_shardings_from_boxed_metadata_of_a_hand_made_tree():
  """`sharding.state_shardings` maps the logical specs of a state traced
  with boxed params: optimizer moments and EMA copies keep the axes of
  their params, unnamed leaves (counters) are replicated."""
  mesh = _mesh([('fsdp', 8)], 8)
  box = lambda shape, names: nn.Partitioned(jnp.zeros(shape), names)
  params = {'enc': {'w': box((16, 8), ('embed', 'mlp'))},
            'dec': {'w': box((8, 8), ('mlp', 'embed'))}}

  def make_state(params):
    return TrainState.create(apply_fn=None, params=params,
                             tx=optax.adam(1e-3),
                             ema_params={'enc': params['enc']})

  boxed = jax.eval_shape(make_state, params)
  out = sharding.state_shardings(nn.get_partition_spec(boxed),
                                 nn.meta.unbox(boxed), mesh,
                                 sharding.DEFAULT_RULES)
  assert out.params['enc']['w'].spec == P('fsdp')
  assert out.params['dec']['w'].spec == P(None, 'fsdp')
  assert out.opt_state[0].mu['enc']['w'].spec == P('fsdp')
  assert out.opt_state[0].mu['dec']['w'].spec == P(None, 'fsdp')
  assert out.opt_state[0].nu['dec']['w'].spec == P(None, 'fsdp')
  assert out.ema_params['enc']['w'].spec == P('fsdp')
  assert out.opt_state[0].count.spec == P()
  assert out.step.spec == P()


# ---------------------------------------------------------------------------
# One train step: sharded == single device.


@functools.lru_cache(maxsize=None)
def _one_device_step():
  """(initial params, params after one step, loss) on a single device."""
  mesh1 = _mesh([('data', 1)], 1)
  state, _, step = _setup(_config(), mesh1)
  params0 = jax.device_get(state.params)
  state, loss = _run(step, state, mesh1, [0])
  return params0, jax.device_get(state.params), loss


@pytest.mark.slow
@pytest.mark.parametrize('scan,remat', [(False, 'none'), (True, 'dots')])
def test_step_on_data4_fsdp2_matches_one_device(scan, remat):
  params0, ref_params, ref_loss = _one_device_step()
  config = _config(scan=scan, remat_policy=remat)
  mesh = _mesh([('data', 4), ('fsdp', 2)], 8)
  init = vit.loop_to_scan(params0) if scan else params0
  state, shardings, step = _setup(config, mesh, params=init)
  qkv = 'blocks' if scan else 'blocks_0'
  assert 'fsdp' in str(_spec(state.params['encoder'][qkv]['attn']['qkv'][
      'kernel']))
  state, loss = _run(step, state, mesh, [0])
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  new = jax.device_get(state.params)
  new = vit.scan_to_loop(new) if scan else new
  assert _max_diff(new, ref_params) <= 1e-5
  # Optimizer moments are sharded like their params.
  leaves = jax.tree.leaves(state.opt_state)
  assert any('fsdp' in str(_spec(x)) for x in leaves if x.ndim >= 2)
  assert jax.tree.structure(shardings.params) == jax.tree.structure(
      state.params)


@pytest.mark.slow
def test_bf16_compute_with_bf16_moments_and_accumulation_under_fsdp():
  config = _config(dtype='bfloat16')
  config.optim.mu_dtype = 'bfloat16'
  config.grad_accum_steps = 2   # 2 microbatches of 4 over (data=2, fsdp=2)
  mesh = _mesh([('data', 2), ('fsdp', 2)], 4)
  state, _, step = _setup(config, mesh)
  state, losses = _run(step, state, mesh, [0, 1])
  assert all(np.isfinite(losses))
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {
      jnp.dtype('float32')}
  mus = [x for x in jax.tree.leaves(state.opt_state)
         if x.dtype == jnp.bfloat16]
  assert mus and any('fsdp' in str(_spec(x)) for x in mus)


# ---------------------------------------------------------------------------
# Reshard on restore.


@pytest.mark.slow
def test_checkpoint_saved_on_8_restores_on_4_and_1(tmp_path):
  config = _config()
  mesh8 = _mesh([('data', 4), ('fsdp', 2)], 8)
  state, _, step = _setup(config, mesh8)
  state, _ = _run(step, state, mesh8, [0])
  mgr = checkpoint.make_manager(str(tmp_path), keep=2, async_save=False)
  checkpoint.save(mgr, 1, state, every=1)
  mgr.wait_until_finished()
  ref, ref_loss = _run(step, state, mesh8, [1, 2])
  ref = jax.device_get(ref.params)
  for spec, n in (([('fsdp', 4)], 4), ([('data', 1)], 1)):
    mesh = _mesh(spec, n)
    target, _, step_n = _setup(config, mesh, materialize=False)
    restored, at = checkpoint.restore_latest(mgr, target)
    assert at == 1 and int(restored.step) == 1
    kernel = restored.params['encoder']['blocks_0']['mlp']['fc1']['kernel']
    assert kernel.sharding.mesh.devices.size == n
    assert kernel.sharding.spec == (P('fsdp') if n == 4 else P())
    cont, loss = _run(step_n, restored, mesh, [1, 2])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert _max_diff(jax.device_get(cont.params), ref) <= 1e-5


def test_restore_onto_another_model_names_the_arrays(tmp_path):
  mesh = _mesh([('data', 1)], 1)
  state, _, _ = _setup(_config(), mesh)
  mgr = checkpoint.make_manager(str(tmp_path), keep=1, async_save=False)
  checkpoint.save(mgr, 1, state, every=1)
  mgr.wait_until_finished()
  other = _config()
  other.model.encoder.mlp_dim = 128
  target, _, _ = _setup(other, mesh, materialize=False)
  with pytest.raises(ValueError, match=r'mlp/fc1/kernel: checkpoint '
                     r'\(64, 256\) vs model \(64, 128\)'):
    checkpoint.restore_latest(mgr, target)
  deeper = _config()
  deeper.model.decoder_depth = 2
  target, _, _ = _setup(deeper, mesh, materialize=False)
  with pytest.raises(ValueError, match=r'only in the model: .*decoder/blocks_1'):
    checkpoint.restore_latest(mgr, target)

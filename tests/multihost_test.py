"""Two JAX processes (4 CPU devices each) train one sharded model together.

This is the multi-host code path of a TPU pod: jax.distributed, one tf.data
shard per process, global arrays from per-process batches, logs and images
from process 0 only, and orbax checkpoints written by both processes; the
checkpoint then restores in a single 8-device process.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ROOT
from mim_jax import checkpoint
from mim_jax import config_lib
from mim_jax import experiment
from mim_jax import main as main_lib
from mim_jax import sharding
from mim_jax import state as state_lib

ARGS = ['--config=configs/mae_tiny.py', '--config.total_steps=6',
        '--config.warmup_steps=2', '--config.log_every_steps=2',
        '--config.ckpt_every_steps=3', '--config.vis_every_steps=6',
        '--config.input.batch_size=16', '--config.async_ckpt=False',
        '--config.knn.data=']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int, **extra):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env.update(extra)
  return env


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_restore_in_one(tmp_path):
  wd = str(tmp_path / 'run')
  port = _free_port()
  cmd = [sys.executable, '-m', 'mim_jax.main', f'--workdir={wd}', *ARGS]
  procs = [subprocess.Popen(
      cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True, env=_env(4, MIM_JAX_COORDINATOR=f'localhost:{port}',
                          MIM_JAX_NUM_PROCESSES='2',
                          MIM_JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  logs = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    logs.append(err)
  for i, (p, err) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f'process {i}:\n{err[-3000:]}'
    assert f'JAX process {i} / 2, 4 local devices of 8' in err
  assert 'host batch 8' in logs[0]
  # One writer: each logged step appears once, images once per vis step.
  assert [r['step'] for r in _rows(wd)] == [2, 4, 6]
  assert sorted(f for f in os.listdir(wd) if f.endswith('.png')) == [
      'recon_0000006.png']
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['3', '6']

  # The cooperative checkpoint restores on another topology: this single
  # process with 8 devices, onto a (data 4, fsdp 2) mesh.
  config = config_lib.load_config_file(
      os.path.join(ROOT, 'configs', 'mae_tiny.py'))
  config.input.batch_size = 16
  mesh = sharding.make_mesh([('data', 4), ('fsdp', 2)])
  model = experiment.build_model(config)
  target, _, _, _ = state_lib.create_train_state(
      config, model, mesh, experiment.batch_spec(config), materialize=False)
  mgr = checkpoint.make_manager(wd, keep=2, async_save=False)
  state, step = checkpoint.restore_latest(mgr, target)
  assert step == 6 and int(state.step) == 6
  kernel = state.params['encoder']['blocks_0']['mlp']['fc1']['kernel']
  assert kernel.sharding.spec == P('fsdp')
  assert np.all(np.isfinite(np.asarray(kernel)))


def test_distributed_args_from_environment():
  assert main_lib.distributed_args({}) is None
  assert main_lib.distributed_args({'TPU_WORKER_HOSTNAMES': 'a'}) is None
  assert main_lib.distributed_args({'TPU_WORKER_HOSTNAMES': 'a,b'}) == {}
  assert main_lib.distributed_args({'MIM_JAX_DISTRIBUTED': '1'}) == {}
  assert main_lib.distributed_args({
      'MIM_JAX_COORDINATOR': 'h:1', 'MIM_JAX_NUM_PROCESSES': '4',
      'MIM_JAX_PROCESS_ID': '2'}) == dict(coordinator_address='h:1',
                                          num_processes=4, process_id=2)
  with pytest.raises(Exception, match='MIM_JAX_PROCESS_ID'):
    main_lib.distributed_args({'MIM_JAX_COORDINATOR': 'h:1',
                               'MIM_JAX_NUM_PROCESSES': '4'})

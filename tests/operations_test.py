"""Operations (M10): the non-finite guard, stop signals and failed saves.

CLI runs are subprocesses with timeouts, since a hang is the failure they
guard against.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT
from conftest import tiny_mae_config
from conftest import wrap_train_pipeline
from mim_jax import checkpoint
from mim_jax import errors
from mim_jax import experiment
from mim_jax import input_pipeline
from mim_jax import method
from mim_jax import nonfinite
from mim_jax import sharding
from mim_jax import signals
from mim_jax import state as state_lib
from mim_jax import steps
from mim_jax import train
from mim_jax import weights

TIMEOUT_S = 300


def _config(**kw):
  return tiny_mae_config(**kw)


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _saved_steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir,
                                                         'checkpoints'))
                if d.isdigit())


def _checkpoint(workdir, step):
  """The arrays of a saved step, as numpy (same 8-device topology)."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'default')
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))


def _all_finite(tree) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def _poison(monkeypatch, batches: set[int]):
  """Training pipelines of normalised float32 images (as a custom pipeline
  may ship them; uint8 pixels cannot be NaN) whose batches `batches`
  (0-based) carry NaN images."""
  real = method.image_batch

  def float_images(*args, **kw):
    shapes = real(*args, **kw)
    return dict(shapes, image=jax.ShapeDtypeStruct(shapes['image'].shape,
                                                   np.float32))

  monkeypatch.setattr(method, 'image_batch', float_images)

  def poison(i, batch):
    image = ((batch['image'] / np.float32(255) - 0.45) / 0.25).astype(
        np.float32)
    return dict(batch, image=np.full_like(image, np.nan) if i in batches
                else image)

  wrap_train_pipeline(monkeypatch, poison)


# ---------------------------------------------------------------------------
# The guard inside the jitted step.


def test_step_guard_keeps_the_state_and_names_the_value():
  """A NaN batch changes nothing but the step counts and names the loss; a
  clean batch then updates as usual."""
  config = _config()
  mesh = sharding.make_mesh(config.mesh)
  model = experiment.build_model(config)
  shapes = experiment.batch_spec(config)
  state, shardings, _, schedule = state_lib.create_train_state(
      config, model, mesh, shapes)
  step = steps.jit_train_step(config, model, experiment.build_loss(config),
                              schedule, mesh, shardings)
  names = nonfinite.names(state)
  assert names[0] == 'loss'
  assert any(n.startswith('grads/encoder/') for n in names)
  assert any(n.startswith('params/decoder/') for n in names)
  assert any(n.startswith('opt_state/') for n in names)
  rng = np.random.default_rng(0)
  n = shapes['noise'].shape[1]
  clean = {'image': rng.standard_normal(shapes['image'].shape, np.float32),
           'noise': rng.random((8, n), np.float32)}
  clean['mask'] = (np.argsort(np.argsort(clean['noise'], 1), 1)
                   >= n // 4).astype(np.float32)
  data_sh = sharding.data_sharding(mesh)
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  bad = dict(clean, image=np.where(rng.random(clean['image'].shape) < 1e-3,
                                   np.nan, clean['image']))
  state, m = step(state, sharding.to_global(bad, data_sh), {})
  assert float(m['skipped']) == 1.0
  assert names[int(m['nonfinite_at'])] == 'loss'
  assert int(state.step) == 1
  after = jax.tree.map(np.asarray, (state.params, state.opt_state))
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    if np.issubdtype(b.dtype, np.floating):  # params and moments: kept
      np.testing.assert_array_equal(a, b)
    else:  # the optimizer's counts advance with the step
      np.testing.assert_array_equal(a, b + 1)
  state, m = step(state, sharding.to_global(clean, data_sh), {})
  assert float(m['skipped']) == 0.0 and int(m['nonfinite_at']) == -1
  assert int(state.step) == 2
  moved = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params,
      before[0]))
  assert max(moved) > 0


@pytest.mark.slow
def test_poisoned_batch_is_skipped_and_counted(tmp_path, monkeypatch):
  """nonfinite='skip': the run goes on past a NaN batch, logs it as
  train/skipped_steps (no loss for that step), and every checkpoint is
  finite."""
  _poison(monkeypatch, {2})
  wd = str(tmp_path / 'skip')
  state = train.train_and_evaluate(_config(), wd)
  assert int(state.step) == 6
  rows = _rows(wd)
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert rows[2]['train/skipped_steps'] == 1.0
  assert 'train/loss' not in rows[2]
  assert all(r['train/skipped_steps'] == 0.0 for i, r in enumerate(rows)
             if i != 2)
  assert all(np.isfinite(r['train/loss']) for i, r in enumerate(rows)
             if i != 2)
  for s in _saved_steps(wd):
    assert _all_finite(_checkpoint(wd, s)), s


def test_stop_mode_stops_at_the_poisoned_step(tmp_path, monkeypatch):
  """nonfinite='stop': the NaN batch of step 3 stops the run with the step,
  the value and the newest (finite) checkpoint in the message."""
  _poison(monkeypatch, {2})
  wd = str(tmp_path / 'stop')
  with pytest.raises(nonfinite.NonFiniteError,
                     match=r'non-finite loss at step 3: nonfinite=stop.*'
                     r'newest checkpoint, step 2'):
    train.train_and_evaluate(_config(nonfinite='stop'), wd)
  assert _saved_steps(wd) == [2]


@pytest.mark.slow
def test_huge_lr_stops_after_k_skips_and_keeps_finite_checkpoints(tmp_path):
  """The issue's probe: lr 1e4 with a checkpoint every step. Params would
  be NaN within a few steps; instead updates are skipped, the run stops
  after K in a row, no checkpoint is written after a skipped step, and
  every checkpoint left (rotation included) is finite."""
  wd = str(tmp_path / 'lr')
  config = _config(lr=1e4, total_steps=30, ckpt_every_steps=1,
                   log_every_steps=20, max_consecutive_skips=3, keep_ckpts=2)
  with pytest.raises(nonfinite.NonFiniteError,
                     match=r'3 steps in a row were skipped '
                     r'\(max_consecutive_skips=3\)') as e:
    train.train_and_evaluate(config, wd)
  msg = str(e.value)
  bad_step = int(msg.split(' at step ')[1].split(':')[0])
  saved = _saved_steps(wd)
  assert saved and max(saved) == bad_step - 3  # the last good step
  assert f'newest checkpoint, step {max(saved)}' in msg
  for s in saved:
    assert _all_finite(_checkpoint(wd, s)), s


def test_bad_nonfinite_options_are_refused_before_building():
  for kw, match in ((dict(nonfinite='ignore'), 'nonfinite'),
                    (dict(max_consecutive_skips=0), 'max_consecutive_skips')):
    with pytest.raises(ValueError, match=match):
      train.validate_config(_config(**kw), 1, 1)


# ---------------------------------------------------------------------------
# The CLI: signals and failed saves.

SMALL = ['--config=configs/mae_tiny.py', '--config.total_steps=24',
         '--config.warmup_steps=4', '--config.log_every_steps=1',
         '--config.ckpt_every_steps=1000', '--config.vis_every_steps=1000',
         '--config.input.batch_size=16', '--config.knn.data=']


def _cli(workdir, *extra):
  return subprocess.Popen(
      [sys.executable, '-m', 'mim_jax.main', f'--workdir={workdir}', *SMALL,
       *extra], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, what: str):
  deadline = time.time() + TIMEOUT_S
  while not predicate():
    assert proc.poll() is None, (f'exited ({proc.returncode}) before '
                                 f'{what}:\n{proc.stderr.read()[-3000:]}')
    assert time.time() < deadline, f'no {what} after {TIMEOUT_S} s'
    time.sleep(0.1)


def _logged_steps(workdir) -> int:
  try:
    return len(_rows(workdir))
  except (OSError, json.JSONDecodeError):
    return 0


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGINT])
def test_signal_saves_then_resume_is_bit_identical(tmp_path, sig):
  """Ctrl-C (SIGINT, which acts as SIGTERM) mid-run: the CLI finishes its
  step, saves it (no periodic save is due), says so on its last line and
  exits with EXIT_STOPPED, with no KeyboardInterrupt traceback; rerun, it
  resumes and ends bit-identical to an uninterrupted run. (SIGTERM's save
  and exit status: faults_test's busy-workdir test.)"""
  wd = str(tmp_path / 'sig')
  proc = _cli(wd)
  _wait_for(lambda: _logged_steps(wd) >= 3, proc, 'logged steps')
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == signals.EXIT_STOPPED, err[-3000:]
  last = err.strip().splitlines()[-1]
  saved = _saved_steps(wd)
  assert len(saved) == 1 and 3 <= saved[0] < 24, (saved, last)
  assert last.startswith(f'{sig.name} at step {saved[0]}: checkpoint saved')
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err

  res = subprocess.run(
      [sys.executable, '-m', 'mim_jax.main', f'--workdir={wd}', *SMALL],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
      text=True, timeout=TIMEOUT_S)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f'Resumed from step {saved[0]}' in res.stderr
  ref = str(tmp_path / 'ref')
  res = subprocess.run(
      [sys.executable, '-m', 'mim_jax.main', f'--workdir={ref}', *SMALL],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
      text=True, timeout=TIMEOUT_S)
  assert res.returncode == 0, res.stderr[-3000:]
  ours, theirs = _rows(wd), _rows(ref)
  assert [r['step'] for r in ours] == list(range(1, 25))
  assert [r['train/loss'] for r in ours] == [r['train/loss'] for r in theirs]
  a, b = _checkpoint(wd, 24), _checkpoint(ref, 24)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_failed_save_exits_with_the_path_instead_of_hanging(tmp_path):
  """The checkpoint folder becomes unusable mid-run (replaced by a file:
  chmod does not stop root). The next save fails; the CLI exits non-zero
  within the timeout, its last line naming the path and the OS error."""
  wd = str(tmp_path / 'ro')
  proc = _cli(wd, '--config.ckpt_every_steps=2')
  ckpts = os.path.join(wd, 'checkpoints')
  _wait_for(lambda: os.path.isdir(os.path.join(ckpts, '2')), proc,
            'first checkpoint')
  # A rename is atomic; deleting would race with the saves writing in it.
  os.rename(ckpts, ckpts + '.gone')
  with open(ckpts, 'w') as f:
    f.write('not a directory')
  _, err = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == 1, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith('error: checkpoint save failed in '), last
  assert 'Errno' in last and 'checkpoints' in last, last


def test_checkpoint_error_names_path_and_errno():
  """OSErrors anywhere in the cause chain, and tensorstore's errors (an
  errno inside a ValueError's text), become one line with path and errno."""
  ts = ValueError('FAILED_PRECONDITION: Error writing local file '
                  '"/w/checkpoints/4.orbax-checkpoint-tmp/x": Not a '
                  "directory [os_error_code='20']")
  msg = str(checkpoint.checkpoint_error(ts, '/w/checkpoints'))
  assert msg.startswith('checkpoint save failed in /w/checkpoints/4.orbax-'
                        'checkpoint-tmp/x: [Errno 20 ENOTDIR] Not a '
                        'directory.'), msg
  try:
    try:
      raise PermissionError(13, 'Permission denied', '/w/checkpoints/6')
    except OSError as inner:
      raise RuntimeError('async save failed') from inner
  except RuntimeError as outer:
    msg = str(checkpoint.checkpoint_error(outer, '/w/checkpoints'))
  assert msg.startswith('checkpoint save failed in /w/checkpoints/6: '
                        '[Errno 13 EACCES] Permission denied.'), msg
  msg = str(checkpoint.checkpoint_error(
      NotADirectoryError('Path is not a directory: /w/c/4.tmp'), '/w/c'))
  assert msg.startswith('checkpoint save failed in /w/c: [Errno 20 ENOTDIR] '
                        'Not a directory.'), msg
  msg = str(checkpoint.checkpoint_error(RuntimeError('boom\nmore'), '/w/c'))
  assert msg.startswith('checkpoint save failed in /w/c: RuntimeError: '
                        'boom.') and '\n' not in msg


# ---------------------------------------------------------------------------
# Resuming: damaged checkpoints.


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One tiny run (6 steps, checkpoints 2, 4, 6) shared by the resume
  tests; each copies it."""
  wd = str(tmp_path_factory.mktemp('trained') / 'wd')
  train.train_and_evaluate(_config(), wd)
  return wd


def _copy(trained, tmp_path) -> str:
  wd = str(tmp_path / 'wd')
  shutil.copytree(trained, wd)
  return wd


def _largest_file(folder: str) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, trained, caplog):
  """A truncated array file in the newest checkpoint: the run logs why,
  resumes from the one before, moves the damaged one aside, and trains on
  to the end (saving that step again)."""
  wd = _copy(trained, tmp_path)
  victim = _largest_file(os.path.join(wd, 'checkpoints', '6'))
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 2)
  caplog.set_level('INFO')
  state = train.train_and_evaluate(_config(total_steps=8), wd)
  assert int(state.step) == 8
  log = caplog.text
  assert 'Checkpoint of step 6' in log and 'cannot be restored' in log
  assert 'Resumed from step 4' in log
  assert os.path.isdir(os.path.join(wd, 'checkpoints_damaged', '6'))
  assert _saved_steps(wd)[-2:] == [6, 8]
  assert [r['step'] for r in _rows(wd)] == list(range(1, 9))


def test_no_restorable_checkpoint_is_one_clear_error(tmp_path, trained):
  wd = _copy(trained, tmp_path)
  for s in _saved_steps(wd):
    victim = _largest_file(os.path.join(wd, 'checkpoints', str(s)))
    with open(victim, 'r+b') as f:
      f.truncate(0)
  with pytest.raises(ValueError, match=r'No checkpoint in .* can be '
                     r'restored: step 6: .*step 4: .*step 2: '):
    train.train_and_evaluate(_config(total_steps=8), wd)


# ---------------------------------------------------------------------------
# Resuming with another config.


def test_layout_change_on_resume_is_refused_before_writing(tmp_path,
                                                           trained):
  """Another decoder width and mu_dtype on an existing workdir: refused
  with every differing field and array listed; config.json, metrics and
  checkpoints are untouched."""
  wd = _copy(trained, tmp_path)
  before = {f: open(os.path.join(wd, f), 'rb').read()
            for f in ('config.json', 'metrics.jsonl')}
  config = _config(total_steps=8)
  config.model.decoder_width = 48
  config.optim.mu_dtype = 'bfloat16'
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(config, wd)
  msg = str(e.value)
  assert 'refused config changes' in msg
  assert 'model.decoder_width: 64 -> 48' in msg
  assert "optim.mu_dtype: None -> 'bfloat16'" in msg
  assert 'shape mismatches' in msg
  assert 'params/decoder/decoder_embed/kernel' in msg  # an array, listed
  for f, data in before.items():
    assert open(os.path.join(wd, f), 'rb').read() == data, f
  assert _saved_steps(wd) == [2, 4, 6]


@pytest.mark.slow
def test_safe_change_on_resume_is_logged_and_kept_in_history(
    tmp_path, trained, caplog):
  """A longer schedule and another logging interval: allowed, logged, and
  the previous config kept as config.6.json."""
  wd = _copy(trained, tmp_path)
  old = json.load(open(os.path.join(wd, 'config.json')))
  caplog.set_level('INFO')
  state = train.train_and_evaluate(
      _config(total_steps=8, log_every_steps=2), wd)
  assert int(state.step) == 8
  assert 'Config changed on resume: total_steps: 6 -> 8' in caplog.text
  assert 'log_every_steps: 1 -> 2' in caplog.text
  assert json.load(open(os.path.join(wd, 'config.6.json'))) == old
  assert json.load(open(os.path.join(wd, 'config.json')))['total_steps'] == 8


def test_workdir_of_an_older_version_resumes(tmp_path, trained, caplog):
  """config.json of runs before the one mask field (input.mask.ratio) also
  holds mask_ratio and model.mask_ratio: the run resumes from its
  checkpoint, and its params load as an init_from workdir."""
  wd = _copy(trained, tmp_path)
  path = os.path.join(wd, 'config.json')
  old = json.load(open(path))
  old['mask_ratio'] = old['model']['mask_ratio'] = old['input']['mask'][
      'ratio']
  json.dump(old, open(path, 'w'))
  src = weights.workdir_config(wd)
  assert 'mask_ratio' not in src and 'mask_ratio' not in src.model
  weights.state_from_workdir(src, experiment.build_model(src), wd)
  caplog.set_level('INFO')
  state = train.train_and_evaluate(_config(total_steps=8), wd)
  assert int(state.step) == 8
  assert 'Resumed from step 6' in caplog.text
  assert 'mask_ratio' not in caplog.text


def test_warmup_not_shorter_than_the_run_is_refused_before_the_workdir(
    tmp_path):
  wd = str(tmp_path / 'never')
  with pytest.raises(ValueError, match=r'warmup \(6 steps\) must be '
                     r'shorter than the run \(total_steps 6\)'):
    train.train_and_evaluate(_config(warmup_steps=6), wd)
  assert not os.path.exists(wd)


# ---------------------------------------------------------------------------
# Messages.


def _run(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT),
                        capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.slow
def test_user_errors_are_one_line_without_traceback(tmp_path):
  """The ViT-B recipe without ImageNet prepared: the last line names the
  problem and the fix, no traceback (exit 2); --verbose shows it."""
  res = _run('mim_jax.main', '--config=configs/mae_vitb.py',
             f'--workdir={tmp_path / "b"}',
             f'--config.input.tfds_data_dir={tmp_path / "no_tfds"}')
  assert res.returncode == 2, res.stderr[-3000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith('error: TFDS data set'), last
  assert 'not prepared' in last and '--verbose' in last
  assert 'Traceback' not in res.stderr
  res = _run('mim_jax.main', '--config=configs/mae_tiny.py',
             f'--workdir={tmp_path / "w"}', '--config.warmup_steps=600',
             '--verbose')
  assert res.returncode == 1 and 'Traceback' in res.stderr
  assert 'must be shorter than the run' in res.stderr
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize('content,match', [
    (b'', r'is empty \(0 bytes\)'),
    (bytes(range(196, 256)) * 4, 'is not a PyTorch checkpoint'),
    (b'PK\x03\x04' + b'\x00' * 60, 'cannot be read'),
])
def test_bad_weights_files_are_named_before_anything_is_made(
    tmp_path, content, match):
  path = tmp_path / 'bad.pth'
  path.write_bytes(content)
  wd = tmp_path / 'never'
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(_config(init_from=str(path)), str(wd))
  if content[:2] != b'PK':  # the header check runs before the workdir
    assert not wd.exists()


@pytest.mark.slow
def test_convert_import_of_an_empty_file_is_one_line(tmp_path):
  path = tmp_path / 'empty.pth'
  path.write_bytes(b'')
  res = _run('mim_jax.tools.convert', 'import', '--config=configs/mae_tiny.py',
             f'--torch_ckpt={path}', f'--out={tmp_path / "out"}')
  assert res.returncode == 2, res.stderr[-2000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last == (f"error: checkpoint '{path}' is empty (0 bytes): its "
                  'download or copy did not finish; fetch it again.'), last
  assert 'Traceback' not in res.stderr


# ---------------------------------------------------------------------------
# Bad image files.


def _broken_files(folder) -> dict[str, bytes]:
  """Real broken files next to good photos: a truncated JPEG, zero bytes,
  text, a PNG named .jpg (fine: decoded by content) and a 20000 x 20000
  JPEG header."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  os.makedirs(folder)
  for i in range(10):
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(
        os.path.join(folder, f'good{i}.jpg'), quality=90)
  good = open(os.path.join(folder, 'good0.jpg'), 'rb').read()
  png = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(
      png, format='PNG')
  huge = bytearray(good)
  i = 2
  while huge[i + 1] not in (0xC0, 0xC2):
    i += 2 + int.from_bytes(huge[i + 2:i + 4], 'big')
  huge[i + 5:i + 9] = (20000).to_bytes(2, 'big') * 2
  bad = {'a_truncated.jpg': good[:len(good) // 2], 'b_empty.jpg': b'',
         'c_text.jpg': b'<html>not an image</html>',
         'e_huge.jpg': bytes(huge)}
  for name, data in dict(bad, **{'d_png.jpg': png.getvalue()}).items():
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(data)
  return bad


@pytest.mark.slow
def test_bad_images_are_skipped_counted_and_logged_by_path(tmp_path,
                                                           caplog):
  folder = str(tmp_path / 'photos')
  bad = _broken_files(folder)
  caplog.set_level('WARNING')
  config = _config(total_steps=4, ckpt_every_steps=4)
  config.input.data = f'folder:{folder}'
  wd = str(tmp_path / 'wd')
  state = train.train_and_evaluate(config, wd)
  assert int(state.step) == 4
  rows = _rows(wd)
  # 15 files, 4 bad: in 4 steps of 8 (over two epochs) each is met twice.
  assert sum(r['train/bad_images'] for r in rows) == 8
  for name in bad:
    logged = [m for m in caplog.messages if name in m]
    assert len(logged) == 1, (name, logged)  # once, by path
  assert not any('d_png.jpg' in m for m in caplog.messages)
  assert all(np.isfinite(r['train/loss']) for r in rows)


def test_bad_images_are_skipped_the_same_way_on_resume(tmp_path):
  """The pipeline started at step k gives exactly the batches an
  uninterrupted one gives from step k, bad-file fills included."""
  folder = str(tmp_path / 'photos')
  _broken_files(folder)
  config = _config()
  config.input.data = f'folder:{folder}'

  def batches(start, count):
    ds = input_pipeline.make_train_dataset(
        config.input, patch_size=4, seed=0, start_step=start,
        process_index=0, process_count=1)
    it = ds.as_numpy_iterator()
    return [next(it) for _ in range(count)]

  whole, resumed = batches(0, 6), batches(3, 3)
  assert sum(int(b['bad_images'].sum()) for b in whole) > 0
  for a, b in zip(whole[3:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_bad_image_error_mode_and_a_folder_of_only_bad_files(tmp_path):
  folder = str(tmp_path / 'photos')
  _broken_files(folder)
  config = _config(total_steps=4)
  config.input.data = f'folder:{folder}'
  config.input.bad_images = 'error'
  with pytest.raises(ValueError, match=r'^bad image .*photos/[abce]_\w+'
                     r'\.jpg: .*bad_images=skip') as e:
    train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert errors.is_user_error(e.value)
  only_bad = str(tmp_path / 'bad_only')
  os.makedirs(only_bad)
  for name in ('a_truncated.jpg', 'b_empty.jpg', 'c_text.jpg'):
    shutil.copy(os.path.join(folder, name), only_bad)
  config.input.data = f'folder:{only_bad}'
  config.input.bad_images = 'skip'
  with pytest.raises(ValueError, match=r'none of the 3 images can be '
                     r'decoded: .*a_truncated\.jpg \(truncated JPEG'):
    train.train_and_evaluate(config, str(tmp_path / 'wd2'))

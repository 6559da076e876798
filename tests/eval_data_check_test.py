"""Evaluation folders are checked whole before a run starts: a bad file
stops it in one line naming the file and the field (eval.bad_images), or
is left out with eval.bad_images='drop' (counts exclude it)."""

import io
import json
import os
import socket
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from conftest import ROOT
from mim_jax import input_pipeline
from mim_jax.data import image_check

IMAGE_SIZE = 32


def _jpeg(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:40, 0:48]
  array = np.stack([x * 5, y * 6, (x + y) * 2], -1) + rng.integers(
      0, 40, (40, 48, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(
      buf, format='JPEG')
  return buf.getvalue()


def _damaged_inside(data: bytes) -> bytes:
  """A JPEG with an unknown marker inside its scan data: header and end
  marker intact (the byte check passes it), TF's decoder fails."""
  sos = data.index(b'\xff\xda')
  start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], 'big')
  mid = (start + len(data)) // 2
  return data[:mid] + b'\xff\xf1' + data[mid:]


def _folder(root, bad: dict[str, bytes] = None) -> str:
  """Classes a/ and b/, three good JPEGs each, plus `bad` {relpath: bytes}.
  """
  files = {f'{c}/{i}.jpg': _jpeg(10 * j + i)
           for j, c in enumerate('ab') for i in range(3)}
  files.update(bad or {})
  for rel, data in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(data)
  return str(root)


def _eval(root, **kw):
  config = ml_collections.ConfigDict(dict(
      data=f'folder:{root}', image_size=IMAGE_SIZE, batch_size=4,
      mean=(0.5,) * 3, std=(0.5,) * 3, max_image_pixels=10**6, prefetch=2))
  return input_pipeline.make_eval_dataset(
      config, data=None, split=None, batch_size=4, process_index=0,
      process_count=1, **kw)


def _labels(ds) -> list[int]:
  rows = list(ds.as_numpy_iterator())
  return sorted(int(y) for b in rows for y, v in zip(b['label'], b['valid'])
                if v > 0)


def test_a_good_folder_passes(tmp_path):
  ds, batches, total = _eval(_folder(tmp_path))
  assert (total, batches) == (6, 2)
  assert _labels(ds) == [0, 0, 0, 1, 1, 1]


def test_a_truncated_jpeg_stops_the_run_naming_the_file_and_field(
    tmp_path):
  truncated = _jpeg(99)[:400]
  root = _folder(tmp_path, {'b/bad.jpg': truncated})
  with pytest.raises(ValueError) as e:
    _eval(root)
  msg = str(e.value)
  assert '\n' not in msg
  assert msg.startswith(f'Evaluation folder {root}: 1 of 7 images cannot '
                        'be decoded: ')
  assert f'{root}/b/bad.jpg (truncated JPEG' in msg
  assert '--config.eval.bad_images=drop' in msg
  # The kNN monitor's sets name their own field.
  with pytest.raises(ValueError, match='--config.knn.bad_images=drop'):
    _eval(root, bad_images_field='knn.bad_images')


def test_drop_leaves_bad_files_out_of_the_counts(tmp_path, caplog):
  root = _folder(tmp_path, {
      'b/bad.jpg': _jpeg(99)[:400],
      'a/inside.jpg': _damaged_inside(_jpeg(98)),
      'b/empty.png': b''})
  with pytest.raises(ValueError) as e:
    _eval(root)
  msg = str(e.value)
  assert '3 of 9 images' in msg and '\n' not in msg
  # Header and end marker intact: only the decode finds it.
  assert (f'{root}/a/inside.jpg (does not decode (jpeg::Uncompress '
          'failed') in msg
  assert f'{root}/b/empty.png (empty file)' in msg
  ds, batches, total = _eval(root, bad_images='drop')
  assert (total, batches) == (6, 2)
  assert _labels(ds) == [0, 0, 0, 1, 1, 1]  # class numbers unchanged
  assert 'leaving them out of the evaluation (eval.bad_images=drop)' in (
      caplog.text)


def test_a_folder_of_only_bad_files_is_refused_even_with_drop(tmp_path):
  root = str(tmp_path)
  for i in range(2):
    os.makedirs(os.path.join(root, 'a'), exist_ok=True)
    with open(os.path.join(root, 'a', f'{i}.jpg'), 'w') as f:
      f.write('<html>not an image</html>')
  with pytest.raises(ValueError, match=r'2 of 2 images cannot be decoded '
                     r'\(none can\).*eval.data at another folder'):
    _eval(root, bad_images='drop')
  with pytest.raises(ValueError, match=r"eval.bad_images='skip': use one "
                     r"of \('error', 'drop'\)"):
    _eval(root, bad_images='skip')


def test_scan_names_each_bad_file_with_its_reason(tmp_path):
  good, paths = _jpeg(0), []
  for name, data in [('ok.jpg', good), ('short.jpg', good[:-200]),
                     ('inside.jpg', _damaged_inside(good)),
                     ('text.png', b'hello'), ('ok2.jpg', good)]:
    paths.append(str(tmp_path / name))
    (tmp_path / name).write_bytes(data)
  bad = image_check.scan(paths, max_pixels=10**6)
  assert sorted(bad) == [1, 2, 3]
  assert bad[1].startswith('truncated JPEG')
  assert bad[2].startswith('does not decode (jpeg::Uncompress failed')
  assert bad[3].startswith('not a JPEG or PNG')
  assert image_check.scan(paths[:1], max_pixels=100) == {
      0: '48 x 40 = 1920 pixels, over input.max_image_pixels=100'}


# Run by each of two JAX processes: the error of bad_images='error', then
# what bad_images='drop' gives this process.
PROCESS = """
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1],
                           num_processes=2, process_id=int(sys.argv[2]))
import ml_collections
from mim_jax import input_pipeline
config = ml_collections.ConfigDict(dict(
    data='folder:' + sys.argv[3], image_size=32, mean=(0.5,) * 3,
    std=(0.5,) * 3))
out = {}
try:
  input_pipeline.make_eval_dataset(config, data=None, split=None,
                                   batch_size=4)
except ValueError as e:
  out['error'] = str(e)
ds, out['batches'], out['total'] = input_pipeline.make_eval_dataset(
    config, data=None, split=None, batch_size=4, bad_images='drop')
out['labels'] = [int(y) for b in ds.as_numpy_iterator()
                 for y, v in zip(b['label'], b['valid']) if v > 0]
print('RESULT', json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_two_processes_scan_half_each_and_agree(tmp_path):
  """Each JAX process of a pod scans half the files; both then name every
  bad file and drop the same ones."""
  root = _folder(tmp_path / 'data', {
      'b/bad1.jpg': _jpeg(99)[:400],  # sorted 7th and 8th: one per process
      'b/bad2.jpg': _damaged_inside(_jpeg(98))})
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  procs = [subprocess.Popen(
      [sys.executable, '-c', PROCESS, f'localhost:{port}', str(i), root],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=240)
    assert p.returncode == 0, stderr[-3000:]
    line, = [x for x in stdout.splitlines() if x.startswith('RESULT ')]
    outs.append(json.loads(line[len('RESULT '):]))
  assert outs[0]['error'] == outs[1]['error']
  assert '2 of 8 images' in outs[0]['error']
  assert 'bad1.jpg (truncated JPEG' in outs[0]['error']
  assert 'bad2.jpg (does not decode' in outs[0]['error']
  assert [o['total'] for o in outs] == [6, 6]
  assert sorted(outs[0]['labels'] + outs[1]['labels']) == [0] * 3 + [1] * 3

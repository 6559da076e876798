r"""Speed of the evaluation-folder check (`image_check.scan`), as JSON.

Writes --files JPEG files, the photos of `embedded:skimage` (up to 512 px a
side, ~90 KB: the size of ImageNet's validation images, ~110 KB at about
500 x 375) cycled over 10 class folders, then times `scan` on them (read,
byte check, decode at 1/8 scale, in a parallel tf.data pass) and, for
comparison, the byte check alone (`problem`, one thread). `files_per_sec`
is the wall-clock rate on this machine; `files_per_cpu_sec` the files per
second of process CPU time (all threads), a per-core figure that also holds
on a busy machine: a host with C free cores checks about C times that.
The files are in the page cache (just written): this is the CPU cost, not
a cold disk's or GCS's.

  python benchmarks/eval_check_bench.py [--files=5000] [--repeats=3]
      [--dir=/tmp/eval_check]

--smoke (the tests): 64 files, one repeat.
"""

import json
import os
import platform
import shutil
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

flags.DEFINE_integer('files', 5000, 'JPEG files to write and check.')
flags.DEFINE_integer('repeats', 3, 'Timed scans (the best is reported).')
flags.DEFINE_string('dir', None, 'Where to write them (default: a '
                    'temporary folder, removed afterwards).')
flags.DEFINE_bool('smoke', False, 'Tests: 64 files, one repeat.')
FLAGS = flags.FLAGS


def _write(root: str, n: int) -> list[str]:
  from mim_jax.data import embedded
  photos = [data for _, data in embedded.load('skimage')]
  paths = []
  for i in range(n):
    path = os.path.join(root, f'c{i % 10}', f'{i:06d}.jpg')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(photos[i % len(photos)])
    paths.append(path)
  return sorted(paths)


def _timed(fn) -> tuple[float, float, object]:
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return time.perf_counter() - wall, time.process_time() - cpu, out


def main(argv):
  del argv
  from mim_jax.data import image_check
  n = 64 if FLAGS.smoke else FLAGS.files
  repeats = 1 if FLAGS.smoke else FLAGS.repeats
  root = FLAGS.dir or tempfile.mkdtemp(prefix='eval_check_')
  try:
    paths = _write(root, n)
    size = sum(os.path.getsize(p) for p in paths) / n
    runs = []
    for _ in range(repeats):
      wall, cpu, bad = _timed(lambda: image_check.scan(
          paths, image_check.DEFAULT_MAX_PIXELS))
      assert not bad, bad
      runs.append((wall, cpu))

    def byte_check():
      for p in paths:
        with open(p, 'rb') as f:
          assert image_check.problem(f.read(),
                                     image_check.DEFAULT_MAX_PIXELS) is None

    b_wall, b_cpu, _ = _timed(byte_check)
  finally:
    if not FLAGS.dir:
      shutil.rmtree(root, ignore_errors=True)
  wall, cpu = min(runs)
  print(json.dumps({
      'benchmark': 'eval_check',
      'files': n, 'mean_kb': round(size / 1e3, 1),
      'cpus': os.cpu_count(), 'load_avg_1min': os.getloadavg()[0],
      'machine': platform.processor() or platform.machine(),
      'scan': {'files_per_sec': round(n / wall),
               'files_per_cpu_sec': round(n / cpu),
               'imagenet_val_50k_sec': round(50_000 * wall / n, 1)},
      'byte_check_only': {'files_per_sec': round(n / b_wall),
                          'files_per_cpu_sec': round(n / b_cpu)},
  }))


if __name__ == '__main__':
  app.run(main)

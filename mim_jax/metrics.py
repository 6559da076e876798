"""clu metric writers: TensorBoard events plus `metrics.jsonl`."""

import json
import os
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Writes one JSON object per written step to `path`: {"step": s, ...}.

  Scalars only. Scalars written again for the step of the last row (an
  evaluation or the kNN monitor after the train row of that step) are
  merged into that row, so the file keeps one row per step. Rows of steps
  after `resume_step` (logged by a run that crashed before its next
  checkpoint) are dropped on open, so a resumed run leaves one row per
  step. Local files are appended to and flushed per row (a merge rewrites
  the file through a temporary file and a rename); object stores (gs://),
  which cannot append, get the whole file rewritten.
  """

  def __init__(self, path: str, resume_step: Optional[int] = None):
    self._path = path
    self._remote = '://' in path
    tf.io.gfile.makedirs(os.path.dirname(path) or '.')
    self._rows = []
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path) as f:
        self._rows = [line for line in f.read().splitlines() if line.strip()]
      if resume_step is not None:
        self._rows = [r for r in self._rows
                      if json.loads(r)['step'] <= resume_step]
    self._rewrite()
    self._f = None if self._remote else tf.io.gfile.GFile(path, 'a')

  def _rewrite(self):
    tmp = self._path + '.tmp'
    with tf.io.gfile.GFile(tmp, 'w') as f:
      f.write(''.join(r + '\n' for r in self._rows))
    tf.io.gfile.rename(tmp, self._path, overwrite=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    if self._rows and json.loads(self._rows[-1])['step'] == row['step']:
      merged = json.loads(self._rows[-1])
      merged.update(row)
      self._rows[-1] = json.dumps(merged)
      if not self._remote:
        self._f.close()
      self._rewrite()
      if not self._remote:
        self._f = tf.io.gfile.GFile(self._path, 'a')
      return
    line = json.dumps(row)
    self._rows.append(line)
    if self._remote:
      self._rewrite()
    else:
      self._f.write(line + '\n')
      self._f.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    if self._f:
      self._f.flush()

  def close(self):
    if self._f:
      self._f.close()


def make_writer(workdir: str, is_main: bool,
                jsonl_name: Optional[str] = 'metrics.jsonl',
                resume_step: Optional[int] = None):
  """TensorBoard + jsonl on the main process, logging only elsewhere.

  Returns:
    (writer, tb_writer): the combined writer for the per-step rows, and the
    TensorBoard-only one (for clu's progress reports, so metrics.jsonl keeps
    exactly one row per logged step).
  """
  tb = metric_writers.create_default_writer(
      workdir, just_logging=not is_main, asynchronous=False)
  if not is_main or not jsonl_name:
    return tb, tb
  return metric_writers.MultiWriter(
      [tb, JsonlWriter(os.path.join(workdir, jsonl_name), resume_step)]), tb

"""clu metric writers: TensorBoard events plus `metrics.jsonl`."""

import json
import os
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per written step to `path`: {"step": s, ...}.

  Scalars only; every line is flushed, so a crashed run keeps its curve.
  """

  def __init__(self, path: str):
    self._path = path
    tf.io.gfile.makedirs(os.path.dirname(path) or '.')
    self._f = tf.io.gfile.GFile(path, 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._f.write(json.dumps(row) + '\n')
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
    self._f.flush()

  def close(self):
    self._f.close()


def make_writer(workdir: str, is_main: bool,
                jsonl_name: Optional[str] = 'metrics.jsonl'):
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
      [tb, JsonlWriter(os.path.join(workdir, jsonl_name))]), tb

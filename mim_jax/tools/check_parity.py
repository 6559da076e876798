r"""Checks mim_jax against a folder of official PyTorch numbers.

  python -m mim_jax.tools.check_parity FIXTURE_DIR [FIXTURE_DIR ...] [--scan]
  python -m mim_jax.tools.check_parity --dtype=bfloat16 FIXTURE_DIR ...

Prints one JSON object per folder (forward outputs, every gradient, the
replayed training curve and final parameters, with the worst errors) and
exits 1 when any check is over the tolerances of the fixtures README.

`--scan` runs the model with its blocks in `nn.scan` (the same official
keys, converted to and from the stacked layout).

With --dtype, it instead replays each fixture's training curve with the
model computing in that dtype (float32 params, optimizer and losses) and
reports the per-step relative deviation of the loss from the fixture's
curve and from our float32 replay (max, mean; every step with --verbose).
Not judged: exits 0 (docs/parity.md has the numbers).
"""

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

flags.DEFINE_bool('verbose', False, 'Include per-step losses in the report.')
flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16'],
                  'Replay the curves in this compute dtype and report the '
                  'deviation (instead of the parity checks).')
flags.DEFINE_bool('scan', False, 'Build the model with scan=True.')
FLAGS = flags.FLAGS


def _drop_per_step(report: dict):
  """The per-step numbers out of a report (kept with --verbose)."""
  report.get('curve', {}).pop('losses', None)
  report.pop('losses', None)
  for key in ('vs_fixture', 'vs_float32', 'float32_vs_fixture'):
    report.get(key, {}).pop('per_step', None)


def main(argv):
  from mim_jax import errors  # pylint: disable=g-import-not-at-top
  from mim_jax.parity import core  # pylint: disable=g-import-not-at-top
  dirs = argv[1:]
  if not dirs:
    raise app.UsageError('usage: python -m mim_jax.tools.check_parity DIR...')
  ok = True
  for d in dirs:
    if not os.path.exists(os.path.join(d, 'config.json')):
      raise app.UsageError(f'{d} is not a fixture folder (no config.json).')
    try:
      report = core.dtype_curve(d, FLAGS.dtype) if FLAGS.dtype else (
          core.run(d, scan=FLAGS.scan))
    except errors.UserError as e:  # bad input: one line; a bug: traceback
      sys.exit(f'error: {e}')
    if not FLAGS.verbose:
      _drop_per_step(report)
    print(json.dumps(report, indent=1, default=float))
    ok &= report.get('pass', True)
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  app.run(main)

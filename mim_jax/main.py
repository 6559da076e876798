r"""Entry point of mim_jax training.

  python -m mim_jax.main --config=configs/mae_tiny.py --workdir=DIR

Any config value can be overridden: --config.input.batch_size=256. The run
resumes automatically from the latest checkpoint in --workdir.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and images.')
flags.DEFINE_bool('verbose', False, 'Show the traceback of errors in the '
                  'config, data or files too (they print one line).')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries:
  """Drops INFO chatter of orbax / tensorstore (dozens of lines per save)."""

  def filter(self, record):
    noisy = ('/orbax/' in record.pathname or '/etils/' in record.pathname)
    return record.levelno >= 30 or not noisy


def distributed_args(env) -> dict | None:
  """How to call jax.distributed.initialize, or None for one process.

  - MIM_JAX_COORDINATOR=host:port with MIM_JAX_NUM_PROCESSES and
    MIM_JAX_PROCESS_ID: explicit (CPU clusters, tests).
  - MIM_JAX_DISTRIBUTED=1, or a TPU VM pod slice (several hosts in
    TPU_WORKER_HOSTNAMES): jax detects everything itself.
  """
  if env.get('MIM_JAX_COORDINATOR'):
    missing = [k for k in ('MIM_JAX_NUM_PROCESSES', 'MIM_JAX_PROCESS_ID')
               if not env.get(k, '').isdigit()]
    if missing:
      raise app.UsageError(
          f'MIM_JAX_COORDINATOR is set but {missing} are not (integers): '
          'set the number of processes and this process\'s index.')
    return dict(coordinator_address=env['MIM_JAX_COORDINATOR'],
                num_processes=int(env['MIM_JAX_NUM_PROCESSES']),
                process_id=int(env['MIM_JAX_PROCESS_ID']))
  if env.get('MIM_JAX_DISTRIBUTED') or env.get(
      'TPU_WORKER_HOSTNAMES', '').count(','):
    return {}
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # pylint: disable=g-import-not-at-top
  import jax
  from mim_jax import checkpoint
  from mim_jax import config_lib
  from mim_jax import errors
  from mim_jax import nonfinite
  from mim_jax import signals
  from mim_jax import train
  # pylint: enable=g-import-not-at-top
  args = distributed_args(os.environ)
  if args is not None:
    jax.distributed.initialize(**args)
  logging.info('JAX process %d / %d, %d local devices of %d.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  config = config_lib.none_for_off(flags.FLAGS.config)
  entry = (train.evaluate if config.get('eval_only')
           else train.train_and_evaluate)
  try:
    entry(config, flags.FLAGS.workdir)
  except signals.Stopped as e:  # saved; a supervisor should rerun
    _exit(e.exit_code, str(e))
  except (nonfinite.NonFiniteError, checkpoint.CheckpointSaveError) as e:
    _exit(1, f'error: {e}', hard=isinstance(e, checkpoint.CheckpointSaveError))
  except errors.UserError as e:  # bad input; anything else is a bug
    if flags.FLAGS.verbose:
      raise
    _exit(2, f'error: {e} (--verbose shows the traceback)')


def _exit(code: int, message: str, hard: bool = False):
  """Ends the process with `message` as the last line of stderr.

  `hard` skips the interpreter's exit handlers: after a failed
  asynchronous save, orbax's background threads may never finish, and a
  normal exit would wait for them forever (a supervisor would never see the
  job end).
  """
  logging.flush()
  sys.stdout.flush()
  print(message, file=sys.stderr, flush=True)
  if hard:
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def run():
  # pylint: disable=g-import-not-at-top
  from mim_jax import config_lib
  from mim_jax import errors
  # pylint: enable=g-import-not-at-top
  try:
    config_lib.check_overrides(sys.argv[1:])
  except errors.UserError as e:
    sys.exit(f'error: {e}')
  app.run(main)


if __name__ == '__main__':
  run()

"""specrl: GRPO post-training with lossless speculative rollouts.

python main.py --config=configs/default.py --workdir=/tmp/specrl
python main.py --config=configs/default.py --workdir=/tmp/r --config.rl.num_generations=4
"""

import logging as pylogging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from specrl import cli, faults, multihost, progress, run_config, train
from specrl import config as config_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and TensorBoard events.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(pylogging.Filter):
  """Orbax logs every save at INFO through absl; keep our lines and real warnings."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  progress.quiet_backend_probe()  # no 'Unable to initialize backend tpu' line on CPU
  # Multi-host: jax.distributed from the environment (specrl.launch, a TPU slice, SLURM:
  # specrl/multihost.py, README "Several processes"); a single process needs nothing.
  multihost.initialize()
  logging.info(
    'JAX %s, %d devices (%s)', jax.__version__, jax.device_count(), jax.devices()[0].platform
  )
  with multihost.exit_on_failure():  # several processes: one line and out, never a hang
    for dotted in config_lib.config_overrides(sys.argv):  # typed here and would do nothing
      msg = run_config.ineffective_override(FLAGS.config, dotted)
      if msg:
        sys.exit(f'error: {msg}')
    try:
      exp = train.build_experiment(FLAGS.config)
    except (ValueError, OSError, faults.FatalError) as e:  # a user mistake: one line
      sys.exit(f'error: {e}')
    try:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir, exp=exp)
    except faults.FatalError as e:  # halted run, bad data, no restorable checkpoint
      logging.error('%s', e)
      sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)  # user mistakes: one line

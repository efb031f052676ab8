"""specrl: GRPO post-training with lossless speculative rollouts.

python main.py --config=configs/default.py --workdir=/tmp/specrl
python main.py --config=configs/default.py --workdir=/tmp/r --config.rl.num_generations=4
"""

import logging as pylogging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from specrl import train

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
  # Multi-host: jax.distributed picks up the cluster from the environment (TPU pods,
  # SLURM, ...); a single process needs nothing.
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()
  logging.info(
    'JAX %s, %d devices (%s)', jax.__version__, jax.device_count(), jax.devices()[0].platform
  )
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)

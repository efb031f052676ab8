"""specrl: GRPO post-training with lossless speculative rollouts.

python main.py --config=configs/default.py --workdir=/tmp/specrl
python main.py --config=configs/default.py --workdir=/tmp/r --config.rl.num_generations=4
"""

import importlib.util
import logging as pylogging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from specrl import config as config_lib
from specrl import faults, multihost, progress, train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and TensorBoard events.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def _load_config_file(spec: str):
  """``path.py[:arg]`` -> that file's ``get_config(arg)`` (the config before overrides)."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_specrl_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_flags(argv):
  """absl flag parsing, with a one-line error for a user mistake: an override of a key the
  config does not have (ml_collections raises AttributeError / KeyError), a value of the
  wrong type, an unknown or missing flag (absl's ``flags.Error``; with a custom parser
  ``app.run`` would show it as a traceback)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:
    spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    if spec is not None:
      config = _load_config_file(spec)
      for dotted in config_lib.config_overrides(argv):
        msg = config_lib.unknown_override(config, dotted)
        if msg:
          sys.exit(f'error: {msg}')
    sys.exit(f'error: bad --config override: {e}')


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
  app.run(main, flags_parser=parse_flags)

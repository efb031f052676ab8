"""What the command-line entry points (``main.py``, ``python -m specrl.sweep``) share: the
config file loaded by its ``path.py[:arg]`` spec, and flag parsing in which a user mistake
is one line ``error: ...`` and a non-zero exit, never a traceback.

Why here: ``app.run(main, flags_parser=...)`` hands every parse error to the custom parser,
and absl's default parser prints a usage banner instead of naming the bad key; both entry
points must say the same thing for the same mistake.
"""

from __future__ import annotations

import importlib.util
import sys
import types

from absl import flags

from specrl import config as config_lib


def load_config_module(spec: str, name: str = '_specrl_config') -> types.ModuleType:
  """The config file named by ``path.py[:arg]`` as a module (its ``get_config`` /
  ``get_hyper``); the ``:arg`` part is ignored here."""
  path = spec.partition(':')[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def parse_flags(argv, flag_values=flags.FLAGS, config_flag: str = 'config'):
  """``flag_values(argv)``, with a one-line error for a user mistake:

  - an override of a key the config does not have (ml_collections raises AttributeError /
    KeyError): ``unknown key config.rl.learning_rate; valid keys: ...``;
  - a value of the wrong type, an unknown or a missing flag (absl's ``flags.Error``):
    ``flag --config.rl.steps=abc: invalid literal for int() ...``.
  """
  try:
    return flag_values(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:
    prefix = f'--{config_flag}='
    spec = next((a[len(prefix) :] for a in argv if a.startswith(prefix)), None)
    if spec is not None:
      _, _, arg = spec.partition(':')
      config = load_config_module(spec).get_config(arg or None)
      for dotted in config_lib.config_overrides(argv, config_flag):
        msg = config_lib.unknown_override(config, dotted)
        if msg:
          sys.exit(f'error: {msg}')
    sys.exit(f'error: bad --{config_flag} override: {e}')

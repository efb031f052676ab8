"""XLA flags for the test suite (no jax import here: :mod:`tests.conftest` reads this before
jax starts).

The suite is dominated by XLA:CPU compile time, and XLA:CPU's older (non-MLIR) fusion
emitters compile ~40% faster: with them the whole suite took 834 s instead of 1213 s
(``pytest -n 2``, 2-core AMD EPYC, jax 0.10.2), and no test ran slower by more than noise.
So :mod:`tests.conftest` adds :data:`LEGACY_EMITTERS` for every test where this XLA still
knows the flag (an XLA that no longer knows it aborts at start-up: it is probed once first,
``SPECRL_TEST_LEGACY_EMITTERS``). What they change:

- Two separately compiled programs that share a computation may round it differently in
  the last bit (XLA fuses the shared part differently). The cotrain / spot tests compare
  the policy update of two different programs, so they assert equality to a few ulps, not
  bits; every resume / reproducibility test compares a program with itself and stays exact.
- Benchmarks, ``main.py`` and the subprocess tests that time or train real work
  (tests/e2e_check.py, the real-model tests) run without them.
- test_multihost runs its processes without them (:func:`without_legacy_emitters`): the one
  CI run that had them there never finished its first launch (> 600 s), cause unseen; no
  other test has shown that.
"""

import os
import subprocess
import sys

LEGACY_EMITTERS = '--xla_cpu_use_fusion_emitters=false'


def accepts_legacy_emitters() -> bool:
  """Whether this XLA starts with :data:`LEGACY_EMITTERS` (a ~2-s subprocess)."""
  env = {**os.environ, 'XLA_FLAGS': LEGACY_EMITTERS, 'JAX_PLATFORMS': 'cpu'}
  code = 'import jax; jax.numpy.zeros(1).block_until_ready()'
  return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True).returncode == 0


def add_flags(flags: str, *extra: str) -> str:
  """``flags`` (an ``XLA_FLAGS`` value) with each of ``extra`` appended unless present: the
  xdist workers inherit the controller's flags and run this module's setup again."""
  have = flags.split()
  return ' '.join(have + [f for f in extra if f not in have])


def without_legacy_emitters(env=None) -> dict:
  """``env`` (default: this process's) with :data:`LEGACY_EMITTERS` taken out of its
  ``XLA_FLAGS``."""
  env = dict(os.environ if env is None else env)
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split() if f != LEGACY_EMITTERS)
  return env

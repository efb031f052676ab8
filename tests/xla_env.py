"""XLA flags for subprocess tests that are nearly all compilation (no jax import here:
:mod:`tests.conftest` reads this before jax starts).

XLA:CPU's older (non-MLIR) fusion emitters compile ~40% faster, but some programs run far
slower under them (tests/test_verify_tokens.py: 19 -> 216 s inside the whole suite), and
two separately compiled programs that give the same bits under the new emitters differed
in the last bit (the cotrain / spot bit-identity tests). So only test_sharding, nearly all
compilation, takes them (2-core Xeon, whole suite: 183 -> 114 s), through
:func:`compile_bound_env`. test_multihost did too (183 -> 119 s) until its first launch
failed to finish in 600 s on CI (it trains: more of its time is run time). An XLA that no longer
knows the flag aborts at start-up, so :mod:`tests.conftest` probes it once first
(``SPECRL_TEST_LEGACY_EMITTERS``).
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


def compile_bound_env(env=None) -> dict:
  """``env`` (default: this process's) for a compile-bound subprocess test: the legacy
  emitters added where the probe found them."""
  env = dict(os.environ if env is None else env)
  if env.get('SPECRL_TEST_LEGACY_EMITTERS') == '1':
    env['XLA_FLAGS'] = env.get('XLA_FLAGS', '') + ' ' + LEGACY_EMITTERS
  return env

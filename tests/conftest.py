"""Shared test setup: CPU only, 64-bit off, repo root on sys.path."""

import os
import shutil
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import xla_env  # noqa: E402  (no jax import: env first)

if 'SPECRL_TEST_LEGACY_EMITTERS' not in os.environ:  # probed once, by the controller
  os.environ['SPECRL_TEST_LEGACY_EMITTERS'] = '1' if xla_env.accepts_legacy_emitters() else '0'
# Tests are dominated by XLA compile time on a 2-core CPU; cheap compiles cut it ~3x, the
# older fusion emitters by a further ~30% (tests/xla_env.py). Inherited by the subprocess
# tests; benchmarks never run under these flags.
_FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true')
if os.environ['SPECRL_TEST_LEGACY_EMITTERS'] == '1':
  _FAST_COMPILE += (xla_env.LEGACY_EMITTERS,)
os.environ['XLA_FLAGS'] = xla_env.add_flags(os.environ.get('XLA_FLAGS', ''), *_FAST_COMPILE)


# One persistent XLA compilation cache per test run, fresh each run (no result depends on
# an earlier run) and shared by the xdist workers (they inherit the controller's
# environment) and the subprocess tests: many tests compile programs another test already
# compiled (the smoke config's train step, resumed runs, engines rebuilt per test); those
# load the executable instead (test_faults: 91 -> 71 s). No size cap: a cap turns on jax's
# LRU eviction, which lists and stats every entry under a file lock on each write --
# quadratic over a run of thousands of compiles, with the other worker waiting on the lock
# (fresh-clone suite, 2-core Xeon: 1666 s with the cap, 1125 s without). Without the lock,
# a read that meets an entry still being written fails to decompress, and jax warns and
# compiles instead.
_OWN_XLA_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _OWN_XLA_CACHE = tempfile.mkdtemp(prefix='specrl-tests-xla-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_XLA_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

# The benchmarks' own cache flag (bench/common.py, ``--compile_cache``, default a fixed
# /tmp dir shared across runs) defaults to this run's cache too: a bench test calling its
# ``main`` in-process must not move the worker's cache out of the run's (results would then
# depend on earlier runs, and the rest of the worker's tests would compile afresh).
os.environ['SPECRL_JAX_CACHE'] = os.environ.get('JAX_COMPILATION_CACHE_DIR', '')

import jax  # noqa: E402
import pytest  # noqa: E402

from specrl import model as model_lib  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running (end-to-end) test')


def pytest_unconfigure(config):
  if _OWN_XLA_CACHE is not None:  # the process that made it (the controller under xdist)
    shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


# The suite's long poles (seconds each on the 2-core CI machine: 150-280), by node id prefix,
# longest first. Collected in file order they start late (test_sharding sorts near the end)
# and one of them runs alone while the other worker idles: ~4 minutes of wall time.
LONG_POLES = (
  'tests/test_sharding.py::test_sharded_matches_single_device',
  'tests/test_end_to_end.py::',
  'tests/test_multihost.py::',
  # then the 40-50 s ones, so none of them is left for the end either
  'tests/test_eagle.py::test_cotrain_run_with_warmup_resumes_exactly',
  'tests/test_async_rl.py::test_one_step_stale_resume_with_a_rollout_in_flight_is_exact',
  'tests/test_faults.py::test_killed_anywhere_resumes_bit_for_bit',
)


def pytest_collection_modifyitems(session, config, items):
  """Run the long poles first, one at the head of each xdist worker's first chunk of
  consecutive tests (``-n N``'s load scheduler hands worker i the i-th chunk of
  ``len(items) // N // 4`` items); in order without xdist. Only the order changes."""
  rank = {
    it.nodeid: next((i for i, p in enumerate(LONG_POLES) if it.nodeid.startswith(p)), None)
    for it in items
  }
  poles = sorted(
    (it for it in items if rank[it.nodeid] is not None), key=lambda it: rank[it.nodeid]
  )
  rest = [it for it in items if rank[it.nodeid] is None]
  workers = getattr(config.option, 'numprocesses', None) or 1
  if not isinstance(workers, int) or workers < 2 or not poles:
    items[:] = poles + rest
    return
  chunk = max(len(items) // workers // 4, 2)
  out = list(rest)
  for i, it in enumerate(poles):  # pole i at the start of worker (i % N)'s chunk
    out.insert(min((i % workers) * chunk + i // workers, len(out)), it)
  items[:] = out


@pytest.fixture(scope='session')
def tiny_cfg():
  return model_lib.ModelConfig(
    vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
  )


@pytest.fixture(scope='session')
def tiny_params(tiny_cfg):
  return model_lib.init_params(tiny_cfg, jax.random.key(0))

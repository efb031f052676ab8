"""Shared test setup: CPU only, 64-bit off, repo root on sys.path."""

import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Tests are dominated by XLA compile time on a 2-core CPU; cheap compiles cut it ~3x.
# (Inherited by the subprocess tests.) Benchmarks never run under these flags.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
  ' --xla_llvm_disable_expensive_passes=true'
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402

from specrl import model as model_lib  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running (end-to-end) test')


@pytest.fixture(scope='session')
def tiny_cfg():
  return model_lib.ModelConfig(
    vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
  )


@pytest.fixture(scope='session')
def tiny_params(tiny_cfg):
  return model_lib.init_params(tiny_cfg, jax.random.key(0))

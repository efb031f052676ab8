"""bench/decode.py --quick runs on CPU and ends with a JSON line of the headline figures."""

import json

import jax.numpy as jnp
import numpy as np

from bench import decode


def test_quick_run_emits_floor_ratios_and_drafter_cost(capsys):
  decode.main(
    ['--quick', '--batches', '1', '--variants', 'plain,int8-pallas', '--steps', '2']
    + ['--reps', '1', '--copy_mib', '8', '--compile_cache', '', '--check']
  )
  out = capsys.readouterr().out.strip().splitlines()
  summary = json.loads(out[-1])
  assert summary['copy_GBps'] > 0
  assert summary['kernel_check_ok'] is True
  assert set(summary['x_floor']) == {'tiny/B1/plain', 'tiny/B1/int8-pallas'}
  assert all(v > 0 for v in summary['x_floor'].values())
  assert summary['c']['tiny/B1/int8-pallas'] > 0
  assert summary['skipped'] == []


def test_kv_bytes_counts_live_prefix_of_k_and_v():
  cfg = decode.model_config('qwen2.5-1.5b')
  # 28 layers x 2 (k, v) x 2 KV heads x 128 x 2 bytes = 28672 bytes per token per sequence
  assert decode.kv_bytes(cfg, batch=3, live=10) == 3 * 10 * 28672


def test_scan_matmuls_returns_the_last_stacked_product():
  x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
  stack = jnp.stack([jnp.eye(3), 2 * jnp.eye(3), 3 * jnp.eye(3)])
  out = decode._scan_matmuls(x, stack, lambda a, w: a @ w)
  np.testing.assert_allclose(np.asarray(out), 3 * np.asarray(x))

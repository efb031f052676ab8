"""The weight-only int8 matmul kernel against its jnp reference, in interpret mode on CPU.

Products of int8 weights and bf16 / f32 activations are exact in f32, so kernel and
reference differ only by f32 summation order: relative error ~1e-7, asserted < 1e-5.
An export test shows the kernel lowers for CUDA (Triton) without a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from specrl import model as model_lib
from specrl import quant
from specrl.kernels import weight_only_matmul as wom
from specrl.kernels.weight_only_matmul_reference import weight_only_matmul_reference


def make_inputs(m, k, n, groups, transposed, dtype, seed):
  """Fresh random activations, int8 weights over the full range, positive scales."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  q = jnp.asarray(rng.integers(-127, 128, (n, k) if transposed else (k, n)), jnp.int8)
  s = jnp.asarray(0.001 + 0.01 * rng.random((groups, n)), jnp.float32)
  return x, q, s


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


CASES = [
  # m, k, n, groups, transposed, dtype, splits, gemv
  (1, 256, 128, 1, False, jnp.bfloat16, None, False),  # decode row, per-channel
  (1, 384, 96, 3, True, jnp.bfloat16, None, False),  # tied head layout, groups of 128
  (5, 512, 64, 4, False, jnp.float32, 2, False),  # forced K split with groups
  (7, 768, 48, 1, True, jnp.float32, 3, False),  # K split, per-channel, transposed
  (33, 256, 32, 1, False, jnp.bfloat16, None, False),  # 64-row tile, padded M
  (40, 512, 32, 2, False, jnp.float32, None, False),  # groups of 256 over two 128-wide steps
  (130, 128, 16, 1, False, jnp.bfloat16, None, False),  # 128-row tiles, two M blocks
  (1, 256, 128, 1, False, jnp.bfloat16, None, True),  # gemv: one row
  (3, 384, 96, 3, True, jnp.float32, None, True),  # gemv, head layout, 2 steps per group
  (8, 512, 64, 2, False, jnp.bfloat16, 2, True),  # gemv, K split of whole groups
]


@pytest.mark.parametrize('m,k,n,groups,transposed,dtype,splits,gemv', CASES)
def test_matches_reference(m, k, n, groups, transposed, dtype, splits, gemv):
  x, q, s = make_inputs(m, k, n, groups, transposed, dtype, seed=m * 1000 + k)
  got = wom.weight_only_matmul(
    x, q, s, transposed=transposed, splits=splits, gemv=gemv, interpret=True
  )
  want = weight_only_matmul_reference(x, q, s, transposed=transposed)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(got)))
  assert rel_err(got, want) < 1e-5


def test_scales_are_per_group():
  """A wrong group -> scale mapping is caught: one group's scale scaled up changes only
  that group's contribution, exactly as in the reference."""
  x, q, s = make_inputs(2, 256, 32, 2, False, jnp.float32, seed=7)
  s2 = s.at[1].multiply(10.0)
  got = wom.weight_only_matmul(x, q, s2, interpret=True)
  want = weight_only_matmul_reference(x, q, s2)
  assert rel_err(got, want) < 1e-5
  assert rel_err(got, weight_only_matmul_reference(x, q, s)) > 0.1


def test_tiling_fills_gpu_and_bounds_partials():
  t = wom.choose_tiling(1, 1536, 1536, 1)  # few N blocks at batch 1: split K
  assert (
    t.splits > 1 and (1536 // t.bn) * t.splits >= wom._TARGET_PROGRAMS or t.splits == (1536 // t.bk)
  )
  t = wom.choose_tiling(256, 1536, 8960, 1)  # many rows: partials would cost too much
  assert t.splits == 1 and t.bm == 128 and t.stages(3) == 2
  t = wom.choose_tiling(1, 896, 151936, 7)  # tied head, groups of 128
  assert t.bk == 128 and t.grouped
  assert wom.supported(896, 151936, 7, jnp.int8)
  assert not wom.supported(896, 151936, 1, jnp.int4)
  assert not wom.supported(100, 64, 1, jnp.int8)  # K not a multiple of 16
  assert not wom.supported(96, 64, 2, jnp.int8)  # groups of 48: not a power of two
  with pytest.raises(ValueError):
    wom.choose_tiling(1, 256, 128, 1, splits=3)
  with pytest.raises(ValueError):  # a split would cut a group of 256 in two
    wom.choose_tiling(1, 512, 128, 2, splits=4, gemv=True)
  with pytest.raises(ValueError):
    wom.choose_tiling(16, 256, 128, 1, gemv=True)
  t = wom.choose_tiling(3, 384, 96, 3, gemv=True)
  assert (t.bm, t.bk, t.steps_per_group) == (4, 64, 2)


@pytest.mark.parametrize('m,gemv', [(64, False), (1, True)])
def test_exports_for_cuda(m, gemv):
  shapes = (
    jax.ShapeDtypeStruct((m, 1536), jnp.bfloat16),
    jax.ShapeDtypeStruct((151936, 1536), jnp.int8),
    jax.ShapeDtypeStruct((1, 151936), jnp.float32),
  )
  f = functools.partial(wom.weight_only_matmul, transposed=True, gemv=gemv, interpret=False)
  target = '__gpu$xla.gpu.triton'
  try:
    exp = export.export(
      jax.jit(f),
      platforms=['cuda'],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(target)],
    )(*shapes)
  except Exception as e:  # pylint: disable=broad-except
    if 'Cannot lower pallas_call on platform' in str(e) or isinstance(e, ImportError):
      pytest.skip(f'this jax cannot lower Pallas for cuda on a CPU-only machine: {e}')
    raise
  assert exp.mlir_module().count(f'custom_call @{target}') == 1


def test_quant_backend_pallas_matches_jnp():
  """The quantized drafter through backend='pallas' (interpret mode) gives the 'jnp'
  backend's logits up to bf16 rounding of the dequantized weight (which 'jnp' does and the
  kernel does not); int4 falls back to the 'jnp' path and is identical."""
  cfg = model_lib.ModelConfig(
    vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64
  )
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens = jnp.array([[3, 9, 27]], jnp.int32)
  pos = jnp.arange(3, dtype=jnp.int32)[None]
  for bits, tol in ((8, 1e-5), (4, 0.0)):
    qp = quant.quantize_params(params, quant.QuantConfig(bits=bits, group_size=16 * (bits == 4)))
    want, _ = model_lib.forward(qp, cfg, tokens, pos)
    got, _ = model_lib.forward(quant.with_backend(qp, 'pallas'), cfg, tokens, pos)
    assert rel_err(got, want) <= tol, bits


def test_quant_backend_pallas_uses_kernel_for_decode_rows_only():
  w = jax.random.normal(jax.random.key(1), (64, 32), jnp.float32)
  qw = quant.quantize_weight(
    w, quant.QuantConfig(bits=8, backend='pallas'), rank=2, n_contract=1, contract_first=True
  )

  def jaxpr(m):
    return str(jax.make_jaxpr(lambda x: qw.qeinsum('mk,kn->mn', x))(jnp.ones((m, 64))))

  assert 'pallas_call' in jaxpr(quant.PALLAS_MAX_ROWS)
  assert 'pallas_call' not in jaxpr(quant.PALLAS_MAX_ROWS + 1)

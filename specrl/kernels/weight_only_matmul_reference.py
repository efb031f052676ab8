"""jnp reference for the weight-only quantized matmul kernel (never imports the kernel).

Contract shared with :func:`specrl.kernels.weight_only_matmul.weight_only_matmul`:

- ``x``: ``[M, K]`` float activations (bf16 or f32);
- ``q``: the integer weight, ``[K, N]`` (``transposed=False``) or ``[N, K]``
  (``transposed=True``: an embedding table used as the tied output head), int8;
- ``scale``: ``[G, N]`` float scales, ``G = K / group_size`` (``G = 1``: per output
  channel), for either layout;
- result: ``out[m, n] = sum_g s[g, n] * sum_{k in group g} x[m, k] * q[k, n]`` in f32,
  ``[M, N]``.

The scale is applied to each group's partial sum (not to the weight before the dot):
integer weights times bf16 activations are exact in f32 products, so this is the order a
kernel that dequantizes on chip can follow without rounding a dequantized weight to bf16.
The reference computes it in f32 with ``Precision.HIGHEST`` (a float64-like ground truth
on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weight_only_matmul_reference(
  x: jax.Array, q: jax.Array, scale: jax.Array, *, transposed: bool = False
) -> jax.Array:
  """``[M, K] x int8 [K, N] (or [N, K]) with scales [G, N] -> f32 [M, N]``."""
  m, k = x.shape
  qk = q.T if transposed else q  # [K, N]
  if qk.shape[0] != k:
    raise ValueError(f'x {x.shape} does not contract with q {q.shape} (transposed={transposed})')
  n = qk.shape[1]
  g = scale.shape[0]
  if scale.shape != (g, n) or k % g:
    raise ValueError(f'scale {scale.shape} must be [G, {n}] with G dividing K = {k}')
  xg = x.astype(jnp.float32).reshape(m, g, k // g)
  qg = qk.astype(jnp.float32).reshape(g, k // g, n)
  part = jnp.einsum('mgk,gkn->gmn', xg, qg, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(part * scale.astype(jnp.float32)[:, None, :], axis=0)

"""Pallas (Triton) weight-only int8 matmul for decode shapes: ``x [M, K] @ q [K, N] * s``.

Why: a decode step multiplies a handful of activation rows (``M = B`` tokens) by every
weight matrix once, so it is bound by the bytes of the weights it reads. XLA's
``x @ dequantize(q)`` materialises the dequantized bf16 weight (or fuses the convert into
a slow dot), so an int8 drafter read ~1x, not 0.5x, of the policy's bytes (issue 17:
int8 drafter step cost c = 0.94-0.96). This kernel loads the int8 tile, converts it to
the activation dtype on chip and feeds the tensor cores, so HBM traffic is the int8
bytes plus the (small) activations, scales and output.

Contract (the reference :mod:`specrl.kernels.weight_only_matmul_reference` computes the
same thing in f32): ``out[m, n] = sum_g s[g, n] * sum_{k in group g} x[m, k] q[k, n]``,
f32 ``[M, N]``. ``q`` is ``[K, N]`` or, with ``transposed=True``, ``[N, K]`` (an embedding
table used as the tied output head). ``scale`` is ``[G, N]``, ``G = 1`` (per output
channel) or ``K / group_size``. Products of int8 values and bf16 activations are exact in
f32, so the only difference from the reference is f32 summation order (and, for f32
activations compiled on a GPU, Triton's tf32 dot).

Tiling (static, :func:`choose_tiling`): grid ``(N / bn, Mp / bm, splits)``; each program
loops over ``K / splits`` in steps of ``bk`` (one group per step when grouped, so the
group's scale multiplies the partial dot), with Triton software-pipelining the loads.
``M`` is padded to ``bm >= 16`` rows (Triton's smallest dot). When ``M`` is small the
``N / bn`` programs alone do not fill the GPU, so ``K`` is split across programs and the
f32 partials ``[splits, Mp, N]`` are summed outside (kept <= 1/4 of the weight bytes).
Shapes the tiling cannot cover (``N`` or ``K`` not a multiple of 16, a group size that is
not a power of two) are reported by :func:`supported`; callers fall back to jnp.

Runs natively through the Triton lowering (``pl.pallas_call``'s default on GPU) and on
CPU in interpret mode (``interpret=True``, the default when the backend is CPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_TARGET_PROGRAMS = 264  # 2 per SM of an H100 / H200 (132 SMs)
_MAX_PARTIAL_FRACTION = 0.25  # f32 partials of a K split: at most this x the weight bytes
_BLOCK_K = (256, 128, 64, 32, 16)
_BLOCK_N = (128, 64, 32, 16)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Static block sizes. bm / bn / bk: tile rows / columns / contracting step; splits:
  programs along K (partials summed outside); m_pad: M rounded up to bm."""

  bm: int
  bn: int
  bk: int
  splits: int
  m_pad: int
  grouped: bool
  steps_per_group: int = 1  # bk steps sharing one scale row (grouped)
  gemv: bool = False  # multiply-and-reduce on CUDA cores instead of a tensor-core dot

  @property
  def num_warps(self) -> int:
    return 4 if self.bm * self.bn <= 64 * 128 else 8

  def stages(self, requested: int) -> int:
    """Pipeline depth: at most 2 for 128-row tiles (shared memory)."""
    return min(requested, 2) if self.bm >= 128 else requested


def _pow2_at_least(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _block_k(k: int, groups: int, cap: int = _BLOCK_K[0]) -> int | None:
  """Grouped: the group size (a power of two >= 16) capped at ``cap``, so a step never
  spans two groups; else the largest power of two <= cap dividing K."""
  if groups > 1:
    gs = k // groups
    return min(gs, cap) if gs >= 16 and gs & (gs - 1) == 0 else None
  return next((b for b in _BLOCK_K if b <= cap and k % b == 0), None)


def supported(k: int, n: int, groups: int, dtype) -> bool:
  """Whether :func:`weight_only_matmul` covers an int weight of this shape / dtype."""
  if jnp.dtype(dtype) != jnp.int8 or k % groups:
    return False
  return _block_k(k, groups) is not None and any(n % b == 0 for b in _BLOCK_N)


def choose_tiling(
  m: int,
  k: int,
  n: int,
  groups: int,
  block_n: int | None = None,
  splits: int | None = None,
  gemv: bool = False,
) -> Tiling:
  """Block sizes for ``[M, K] x [K, N]`` with ``groups`` scale groups along K.

  ``gemv`` (M <= 8 only): no tensor-core dot (whose smallest M is 16) but a broadcast
  multiply and a reduction over a ``[bm, bk, bn]`` register tile, so bk and bn are kept
  at 64.
  """
  if gemv:
    if m > 8:
      raise ValueError(f'gemv tiling needs M <= 8, got {m}')
    bm = _pow2_at_least(m)
    bk = _block_k(k, groups, cap=64)
    bn = block_n or next((b for b in _BLOCK_N if b <= 64 and n % b == 0), None)
  else:
    bm = min(max(16, _pow2_at_least(m)), 128)
    # Shared memory per pipeline stage is ~bm*bk*2 + bk*bn bytes: keep wide K steps for
    # the few-row (decode) case only.
    bk = _block_k(k, groups, cap=256 if bm <= 32 else 128)
    bn = block_n or next((b for b in _BLOCK_N if n % b == 0), None)
  if bk is None or bn is None or n % bn:
    raise ValueError(f'unsupported weight-only matmul shape K={k} N={n} groups={groups}')
  m_pad = -(-m // bm) * bm
  nk = k // bk
  spg = (k // groups) // bk if groups > 1 else 1
  if splits is None:  # splits hold whole groups
    programs = (n // bn) * (m_pad // bm)
    max_splits = max(1, int(_MAX_PARTIAL_FRACTION * k / (4 * m_pad)))
    divisors = [d for d in range(1, nk + 1) if nk % (d * spg) == 0 and d <= max_splits]
    splits = next((d for d in divisors if programs * d >= _TARGET_PROGRAMS), divisors[-1])
  if nk % (splits * spg):
    raise ValueError(f'splits={splits} must divide K / bk = {nk} into whole scale groups')
  return Tiling(
    bm=bm,
    bn=bn,
    bk=bk,
    splits=splits,
    m_pad=m_pad,
    grouped=groups > 1,
    steps_per_group=spg,
    gemv=gemv,
  )


def _kernel(x_ref, q_ref, s_ref, o_ref, *, t: Tiling, steps: int, transposed: bool):
  """One (N block, M block, K split) program.

  x_ref [bm, K/splits]; q_ref [K/splits, bn] (or [bn, K/splits]); s_ref
  [steps / steps_per_group, bn] when grouped (one row per group) else [1, bn]; o_ref
  [bm, bn] f32.
  """

  def body(i, acc):
    off = pl.multiple_of(i * t.bk, t.bk)
    x = x_ref[:, pl.ds(off, t.bk)]
    if transposed:
      w = q_ref[:, pl.ds(off, t.bk)].astype(x.dtype)  # [bn, bk]
    else:
      w = q_ref[pl.ds(off, t.bk), :].astype(x.dtype)  # [bk, bn]
    if t.gemv:  # [bm, bk, bn] products, reduced over bk
      xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
      if transposed:
        part = jnp.sum(xf[:, None, :] * wf[None, :, :], axis=2)
      else:
        part = jnp.sum(xf[:, :, None] * wf[None, :, :], axis=1)
    else:
      dims = (((1,), (1 if transposed else 0,)), ((), ()))
      part = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
    if t.grouped:
      row = i // t.steps_per_group if t.steps_per_group > 1 else i
      part = part * s_ref[pl.ds(row, 1), :].astype(jnp.float32)
    return acc + part

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((t.bm, t.bn), jnp.float32))
  if not t.grouped:
    acc = acc * s_ref[...].astype(jnp.float32)
  o_ref[...] = acc


@functools.partial(
  jax.jit, static_argnames=('transposed', 'interpret', 'block_n', 'splits', 'num_stages', 'gemv')
)
def weight_only_matmul(
  x: jax.Array,
  q: jax.Array,
  scale: jax.Array,
  *,
  transposed: bool = False,
  interpret: bool | None = None,
  block_n: int | None = None,
  splits: int | None = None,
  num_stages: int = 3,
  gemv: bool = False,
) -> jax.Array:
  """``x [M, K]`` times int8 ``q [K, N]`` (``[N, K]`` if transposed), scales ``[G, N]``.

  Returns f32 ``[M, N]`` (see the module docstring for the contract). ``interpret``:
  None -> interpret mode iff the default backend is CPU. ``gemv``: the CUDA-core
  multiply-and-reduce tiling for M <= 8 (see :func:`choose_tiling`; not yet timed on a GPU).
  """
  m, k = x.shape
  n = q.shape[0] if transposed else q.shape[1]
  if (q.shape[1] if transposed else q.shape[0]) != k:
    raise ValueError(f'x {x.shape} does not contract with q {q.shape} (transposed={transposed})')
  groups = scale.shape[0]
  if scale.shape != (groups, n) or k % groups:
    raise ValueError(f'scale {scale.shape} must be [G, {n}] with G dividing K = {k}')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  t = choose_tiling(m, k, n, groups, block_n, splits, gemv)
  ks = k // t.splits
  steps = ks // t.bk
  if t.m_pad != m:
    x = jnp.pad(x, ((0, t.m_pad - m), (0, 0)))
  if transposed:
    q_spec = pl.BlockSpec((t.bn, ks), lambda j, i, s: (j, s))
  else:
    q_spec = pl.BlockSpec((ks, t.bn), lambda j, i, s: (s, j))
  if t.grouped:
    s_spec = pl.BlockSpec((steps // t.steps_per_group, t.bn), lambda j, i, s: (s, j))
  else:
    s_spec = pl.BlockSpec((1, t.bn), lambda j, i, s: (0, j))
  out = pl.pallas_call(
    functools.partial(_kernel, t=t, steps=steps, transposed=transposed),
    out_shape=jax.ShapeDtypeStruct((t.splits, t.m_pad, n), jnp.float32),
    grid=(n // t.bn, t.m_pad // t.bm, t.splits),
    in_specs=[pl.BlockSpec((t.bm, ks), lambda j, i, s: (i, s)), q_spec, s_spec],
    out_specs=pl.BlockSpec((None, t.bm, t.bn), lambda j, i, s: (s, i, j)),
    interpret=interpret,
    compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.stages(num_stages)),
    name='weight_only_matmul',
  )(x, q, scale)
  out = out[0] if t.splits == 1 else jnp.sum(out, axis=0)
  return out[:m]

"""Causal flash attention for the GRPO loss forward (``rl.attention_impl='pallas'``) through
jax's own Pallas kernels: ``jax.experimental.pallas.ops.tpu.flash_attention`` on TPU and
``jax.experimental.pallas.ops.gpu.attention.mha`` (Triton) on GPU.

Why these and not our own: they are maintained with jax, have fused backward kernels (the
[T, T] score matrix never exists, forward or backward) and are what MaxText / levanter run.
What this module adds is the glue our model needs: grouped-query heads (k / v [B, T, K, Dh]
repeated to the H query heads, the layout both kernels take), a sequence padded up to the
block size (padded keys sit after every real query, so a causal mask hides them) and one
``interpret`` switch, so CPU tests run the same kernels in Pallas's interpreter.

The pure-jnp reference is :func:`specrl.kernels.flash_attention_reference.causal_attention`
(it never imports this module); ``specrl.attention.blocked_attention`` is the memory-bounded jnp
path for CPU. Only valid where positions increase by one along the sequence (training's
forward), as for ``rl.attention_impl='xla'``.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp

PLATFORMS = ('gpu', 'tpu')
TPU_LANES = 128  # the TPU kernel's key block must be a multiple of this


def _gqa_repeat(x: jax.Array, heads: int) -> jax.Array:
  """[B, T, K, Dh] -> [B, T, H, Dh]: each key / value head serves H / K query heads (the
  grouping of ``specrl.attention.attention``: query head h reads kv head h // (H / K))."""
  return jnp.repeat(x, heads // x.shape[2], axis=2)


def _gpu(q, k, v, block: int, interpret: bool):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  bs = gpu_attention.BlockSizes(
    block_q=block,
    block_k=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  scale = 1.0 / math.sqrt(q.shape[-1])
  return gpu_attention.mha(
    q, k, v, None, sm_scale=scale, causal=True, block_sizes=bs, interpret=interpret
  )


def _tpu(q, k, v, block: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_attention

  names = (
    'block_q',
    'block_k_major',
    'block_k',
    'block_q_major_dkv',
    'block_k_major_dkv',
    'block_k_dkv',
    'block_q_dkv',
    'block_k_major_dq',
    'block_k_dq',
    'block_q_dq',
  )
  bs = tpu_attention.BlockSizes(block_b=1, **{n: block for n in names})
  scale = 1.0 / math.sqrt(q.shape[-1])
  heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, T, H, Dh] <-> [B, H, T, Dh]

  def run():
    out = tpu_attention.flash_attention(
      heads_first(q), heads_first(k), heads_first(v), causal=True, sm_scale=scale,
      block_sizes=bs,
    )  # fmt: skip
    return heads_first(out)

  with tpu_interpret(interpret):
    return run()


def tpu_interpret(on: bool = True):
  """A context in which TPU Pallas kernels run in the interpreter (``on``) or a no-op. The
  TPU kernel's backward is traced when the gradient is taken, after
  :func:`causal_flash_attention` returned: a caller differentiating it in interpret mode
  takes the gradient inside this context (the tests do)."""
  from jax.experimental.pallas import tpu as pltpu

  return pltpu.force_tpu_interpret_mode() if on else contextlib.nullcontext()


def causal_flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  platform: str | None = None,
  interpret: bool = False,
  block: int = 128,
) -> jax.Array:
  """Causal grouped-query attention, key j visible to query i iff j <= i.

  q [B, T, H, Dh]; k, v [B, T, K, Dh] (H a multiple of K). Returns [B, T, H, Dh] in q's
  dtype. ``platform``: 'gpu' | 'tpu' (default: ``jax.default_backend()``); ``interpret``:
  run the kernel in Pallas's interpreter (any backend: the CPU tests). ``block``: the query
  / key tile (GPU: rounded down to the padded sequence when shorter; TPU: rounded up to a
  multiple of 128 lanes); T is zero-padded up to a multiple of it. Differentiable: the
  kernels' own fused backward passes."""
  platform = platform or jax.default_backend()
  if platform not in PLATFORMS:
    raise ValueError(
      f'the Pallas flash attention kernels run on {PLATFORMS}, not {platform!r}: set '
      "rl.attention_impl='blocked' (memory-bounded jnp) on this backend"
    )
  b, t, h, dh = q.shape
  if h % k.shape[2]:
    raise ValueError(f'query heads {h} must be a multiple of key / value heads {k.shape[2]}')
  if platform == 'tpu':  # the TPU kernel's key tiles are multiples of its 128 lanes
    block = -(-block // TPU_LANES) * TPU_LANES
  else:
    block = min(block, max(8, 1 << (t - 1).bit_length()))  # a short sequence: one tile
  tp = -(-t // block) * block
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))  # noqa: E731
  qp, kp, vp = pad(q), pad(_gqa_repeat(k, h)), pad(_gqa_repeat(v, h))
  run = _gpu if platform == 'gpu' else _tpu
  return run(qp, kp, vp, block, interpret)[:, :t].astype(q.dtype)

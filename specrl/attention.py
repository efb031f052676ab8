"""Attention maths in pure jnp: grouped-query attention over a mask, and the two forms the
training loss can run instead when a [T, T] score matrix is too big.

Why a module of its own. :mod:`specrl.model` wires layers together; which attention a
layer runs is a choice (``rl.attention_impl``: :data:`ATTENTION_IMPLS`) between functions
of the same shapes that must agree up to rounding (``tests/test_train_memory.py``):

- :func:`attention`: the reference, any mask (decode, verify, tree masks, training);
- :func:`blocked_attention`: causal by positions, flash-style in blocks, memory linear in
  the sequence (any backend);
- :func:`xla_causal_attention`: ``jax.nn.dot_product_attention`` (cuDNN on GPU).

The Pallas kernels (:mod:`specrl.kernels`) are the fourth choice, ``'pallas'``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q, k, v, mask, heads_major: bool = False) -> jax.Array:
  """Grouped-query attention.

  q [B, T, H, Dh]; k, v [B, S, K, Dh] (``heads_major``: [B, K, S, Dh], a KV cache
  layer's slice, read in place); mask [B, T, S] bool (True = visible).
  Returns [B, T, H, Dh]. Softmax in f32.
  """
  b, t, h, dh = q.shape
  kh = k.shape[1 if heads_major else 2]
  kv = 'bksd' if heads_major else 'bskd'
  qg = q.reshape(b, t, kh, h // kh, dh)
  scores = jnp.einsum(f'btkgd,{kv}->bkgts', qg, k).astype(jnp.float32) / jnp.sqrt(dh)
  scores = jnp.where(mask[:, None, None], scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum(f'bkgts,{kv}->btkgd', probs, v)
  return out.reshape(b, t, h, dh)


ATTENTION_IMPLS = ('full', 'blocked', 'xla', 'pallas')


def blocked_attention(
  q, k, v, q_pos, k_pos, block: int = 512, skip_masked: bool = True
) -> jax.Array:
  """:func:`attention` with key j visible to query i iff ``k_pos[j] <= q_pos[i]``, in
  memory linear in the sequence (flash-style, pure jnp: any backend).

  q [B, T, H, Dh], q_pos [B, T]; k, v [B, S, K, Dh], k_pos [B, S]. Queries go in blocks of
  ``block`` (``lax.map`` over a ``jax.checkpoint``-ed block), each scanning key blocks with
  an online softmax (running max and sum in f32), so no [T, S] score matrix exists: the
  forward holds one [block, block] tile per (batch, head), the backward recomputes one query
  block's tiles at a time (B x H x block x S). Key blocks that no query of a query block
  can see (every key position above every query position: the causal upper triangle, or
  padding) are skipped by a ``lax.cond`` (``skip_masked=False``: every tile computed, for
  measuring the skip). Equal to :func:`attention` up to float rounding
  (rows with no visible key, which a causal mask never has, differ)."""
  b, t, h, dh = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = h // kh
  bq, bk = min(block, t), min(block, s)
  nq, nk = -(-t // bq), -(-s // bk)
  qp = jnp.pad(q, ((0, 0), (0, nq * bq - t), (0, 0), (0, 0)))
  qpos = jnp.pad(q_pos, ((0, 0), (0, nq * bq - t)), constant_values=-1)
  big = jnp.iinfo(jnp.int32).max  # padded keys: visible to no query
  kpos = jnp.pad(k_pos.astype(jnp.int32), ((0, 0), (0, nk * bk - s)), constant_values=big)
  kp = jnp.pad(k, ((0, 0), (0, nk * bk - s), (0, 0), (0, 0)))
  vp = jnp.pad(v, ((0, 0), (0, nk * bk - s), (0, 0), (0, 0)))
  qb = qp.reshape(b, nq, bq, kh, g, dh).swapaxes(0, 1)  # [nq, B, bq, K, G, Dh]
  qposb = qpos.reshape(b, nq, bq).swapaxes(0, 1)
  kb = kp.reshape(b, nk, bk, kh, dh).swapaxes(0, 1)  # [nk, B, bk, K, Dh]
  vb = vp.reshape(b, nk, bk, kh, dh).swapaxes(0, 1)
  kposb = kpos.reshape(b, nk, bk).swapaxes(0, 1)
  scale = 1.0 / jnp.sqrt(jnp.float32(dh))

  @jax.checkpoint
  def query_block(qi, qpos_i):  # [B, bq, K, G, Dh], [B, bq] -> [B, bq, K, G, Dh]
    def visit(carry, kj, vj, kpos_j):
      m, l, acc = carry  # [B, K, G, bq] x2, [B, K, G, bq, Dh] (f32)
      sc = jnp.einsum('bqkgd,bskd->bkgqs', qi, kj).astype(jnp.float32) * scale
      vis = kpos_j[:, None, :] <= qpos_i[:, :, None]  # [B, bq, bk]
      sc = jnp.where(vis[:, None, None], sc, -1e30)
      m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
      corr = jnp.exp(m - m_new)
      p = jnp.exp(sc - m_new[..., None])
      l = l * corr + jnp.sum(p, axis=-1)
      pv = jnp.einsum('bkgqs,bskd->bkgqd', p.astype(vj.dtype), vj).astype(jnp.float32)
      return m_new, l, acc * corr[..., None] + pv

    def key_block(carry, kv):
      # a key block no query of this block sees (above the causal diagonal, or padding)
      # is skipped: a conditional, so a causal forward does ~half the tiles' work
      kj, vj, kpos_j = kv
      if not skip_masked:
        return visit(carry, kj, vj, kpos_j), None
      seen = jnp.min(kpos_j) <= jnp.max(qpos_i)
      return jax.lax.cond(seen, visit, lambda c, *_: c, carry, kj, vj, kpos_j), None

    init = (
      jnp.full((b, kh, g, bq), -1e30, jnp.float32),
      jnp.zeros((b, kh, g, bq), jnp.float32),
      jnp.zeros((b, kh, g, bq, dh), jnp.float32),
    )
    (_, l, acc), _ = jax.lax.scan(key_block, init, (kb, vb, kposb))
    out = acc / l[..., None]  # [B, K, G, bq, Dh]
    return out.transpose(0, 3, 1, 2, 4).astype(q.dtype)

  out = jax.lax.map(lambda a: query_block(*a), (qb, qposb))  # [nq, B, bq, K, G, Dh]
  return out.swapaxes(0, 1).reshape(b, nq * bq, h, dh)[:, :t]


def xla_causal_attention(q, k, v) -> jax.Array:
  """Causal :func:`attention` (key j visible to query i iff j <= i) through
  ``jax.nn.dot_product_attention``: XLA's fused kernel where the backend has one (cuDNN
  flash attention on GPU), the plain composition elsewhere (no memory saving on CPU).
  Only valid where positions increase by one along the sequence (training's forward)."""
  return jax.nn.dot_product_attention(q, k, v, is_causal=True)

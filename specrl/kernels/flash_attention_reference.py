"""Pure-jnp reference of :mod:`specrl.kernels.flash_attention` (it never imports the kernel):
causal grouped-query attention with the whole [T, T] score matrix, softmax in f32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """q [B, T, H, Dh]; k, v [B, T, K, Dh] -> [B, T, H, Dh]; key j visible to query i iff
  j <= i; query head h reads key / value head h // (H / K)."""
  b, t, h, dh = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, h // kh, dh)
  scores = jnp.einsum('btkgd,bskd->bkgts', qg, k).astype(jnp.float32) / jnp.sqrt(dh)
  causal = jnp.tril(jnp.ones((t, t), bool))
  scores = jnp.where(causal, scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bkgts,bskd->btkgd', probs, v).reshape(b, t, h, dh)

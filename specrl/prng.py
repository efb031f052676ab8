"""Counter-based hash PRNG: every random number specrl's decoding draws is a pure function
of integers, never of a ``jax.random`` key split over a batch.

Why. (1) The Pallas verify kernel must reproduce the jnp reference bit for bit while
visiting the vocabulary in blocks of its own choosing, so noise for token ``v`` is
recomputed where it is needed (:func:`element_bits`). (2) What a sequence samples must not
depend on which batch row it occupies: the adaptive engine compacts batches mid-rollout,
and a resumed run must sample what the uninterrupted one did. So a sampling event is keyed
by ``(rollout seed, sequence id, position, stream)`` (:func:`event_seeds`), and a row of
``[B, V]`` noise by that seed alone.

Arithmetic is int32 two's complement (wrapping multiply + logical shifts): it lowers
identically in XLA, Triton and Mosaic TPU without unsigned-type support. Bits map to
uniforms in the *open* interval ``(0, 1)`` (:func:`uniform_from_bits`), so ``log(u)`` and
``log(-log(u))`` are always finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Streams: independent noise for each purpose.
STREAM_ACCEPT = 1  # verify: acceptance uniforms u_i
STREAM_SAMPLE = 2  # verify: Gumbel noise of the residual / bonus row; plain: the token row
STREAM_PLAIN = 3  # event seed of a plain decoding step (and the prefill's first token)
STREAM_VERIFY = 4  # event seed of a verify pass
STREAM_DRAFT = 5  # event seed of a drafter's proposals
STREAM_TREE = 6  # event seed of a node of a sampled draft tree's verification


def _i32(c: int) -> np.int32:
  """A uint32 constant as the int32 with the same bits (two's complement)."""
  return np.array(c & 0xFFFFFFFF, dtype=np.uint32).view(np.int32)[()]


_M1 = _i32(0x85EBCA6B)  # murmur3 fmix32 multipliers
_M2 = _i32(0xC2B2AE35)
_GOLDEN = _i32(0x9E3779B9)
_ROW = _i32(0x632BE5AB)
_COL = _i32(0x27D4EB2F)


def fmix32(h: jax.Array) -> jax.Array:
  """murmur3 32-bit finaliser (a bijection) on int32 bits. Shape preserved."""
  h = h ^ lax.shift_right_logical(h, jnp.int32(16))
  h = h * _M1
  h = h ^ lax.shift_right_logical(h, jnp.int32(13))
  h = h * _M2
  return h ^ lax.shift_right_logical(h, jnp.int32(16))


def seeds_to_i32(seeds: jax.Array) -> jax.Array:
  """uint32 (or int32) seeds [B] -> int32 with the same bits."""
  seeds = jnp.asarray(seeds)
  if seeds.dtype == jnp.int32:
    return seeds
  return lax.bitcast_convert_type(seeds.astype(jnp.uint32), jnp.int32)


def row_key(seed: jax.Array, row: jax.Array, stream: int) -> jax.Array:
  """Per-(sequence, row, stream) key. seed int32 [...], row int [...] -> int32 [...]."""
  h = fmix32(seed + _GOLDEN * jnp.int32(stream))
  return fmix32(h ^ (row.astype(jnp.int32) * _ROW))


def element_bits(key: jax.Array, col: jax.Array) -> jax.Array:
  """32 random bits for column ``col`` of the row with ``key`` (broadcasting)."""
  return fmix32(key ^ (col * _COL))


def uniform_from_bits(h: jax.Array) -> jax.Array:
  """Top 23 bits -> f32 uniform in the open interval (0, 1): (m + 0.5) / 2^23."""
  m = lax.shift_right_logical(h, jnp.int32(9))  # in [0, 2^23): exact in f32
  return (m.astype(jnp.float32) + jnp.float32(0.5)) * jnp.float32(2.0**-23)


def gumbel_from_bits(h: jax.Array) -> jax.Array:
  """Standard Gumbel noise -log(-log(u)); finite because u is in (0, 1)."""
  return -jnp.log(-jnp.log(uniform_from_bits(h)))


def event_seeds(seed: jax.Array, seq_id: jax.Array, pos: jax.Array, stream: int) -> jax.Array:
  """Seed of one sampling event per sequence: int32 [B] from the rollout ``seed`` (int32
  scalar), ``seq_id`` [B] (the row in the original batch, unchanged by compaction) and the
  position ``pos`` [B] of the last committed token."""
  return element_bits(row_key(seed, seq_id, stream), pos.astype(jnp.int32))


def rollout_seed(rng: jax.Array) -> jax.Array:
  """The int32 seed of a rollout from its ``jax.random`` key."""
  return lax.bitcast_convert_type(jax.random.bits(rng, (), jnp.uint32), jnp.int32)


def row_gumbels(seeds: jax.Array, row: int, vocab: int) -> jax.Array:
  """Gumbel noise f32 [B, vocab] of row ``row`` for per-sequence ``seeds`` [B] (the verify
  reference's residual / bonus noise is this with its own row index)."""
  key = row_key(seeds_to_i32(seeds), jnp.full(seeds.shape, row, jnp.int32), STREAM_SAMPLE)
  return gumbel_from_bits(element_bits(key[:, None], jnp.arange(vocab, dtype=jnp.int32)[None]))

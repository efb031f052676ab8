"""Draft trees from corpus continuations, best-first by empirical frequency.

The model-free drafters find occurrences of the row's context in a corpus (the ``suffix``
drafter: its longest suffix in the group's rows and history; ``ngram``: its last n tokens
earlier in the row). Each occurrence is followed by a continuation ``c_1, c_2, ...``. A
chain proposes the single most frequent one; a tree keeps the trie of all of them: the node
for the prefix ``c_1..c_d`` has empirical frequency

  f(c_1..c_d) = #occurrences continuing with c_1..c_d / #occurrences of the context,

which never grows along a path, so the N - 1 most frequent prefixes (ties: shallower first,
then the earlier occurrence) form a subtree, its nodes in an order where a parent always
precedes its children: :func:`continuation_tree` is "expand best-first to N nodes" without a
priority queue. One sort of the ``[M * D]`` prefix hashes per row (M occurrences, depth cap
D), no ``[M, M]`` comparison.

Prefixes are identified by a 32-bit rolling hash (:func:`specrl.prng.fmix32`); a collision
merges two prefixes into one node, which only costs acceptance (any tree is verified
exactly: :mod:`specrl.kernels.verify_tree_reference`), never correctness.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specrl import prng

NO_TOKEN = -1
_EMPTY = jnp.iinfo(jnp.int32).min
_ROOT = jnp.iinfo(jnp.int32).max  # the parent "hash" of depth-1 prefixes (branch cap)


def prefix_hashes(cont: jax.Array) -> jax.Array:
  """int32 [B, M, D]: hash of ``cont[b, m, :d + 1]``; ``_EMPTY`` where a token is missing."""
  h = jnp.zeros(cont.shape[:2], jnp.int32)
  ok = jnp.ones(cont.shape[:2], bool)
  out = []
  for d in range(cont.shape[2]):
    tok = cont[:, :, d]
    ok &= tok >= 0
    h = prng.fmix32(h * prng._i32(0x01000193) + (tok + 1) * prng._i32(0x9E3779B1) + d + 1)
    out.append(jnp.where(ok, h, _EMPTY))
  return jnp.stack(out, axis=2)


def _run_starts(values_sorted: jax.Array) -> jax.Array:
  """int32 [B, F]: per row of sorted ``values_sorted``, the index of the first entry of
  each entry's run of equal values."""
  return jax.vmap(lambda a: jnp.searchsorted(a, a, side='left'))(values_sorted).astype(jnp.int32)


def _branch_allowed(hs, parent_h, key, first, order, rank, dcap: int, branch: int):
  """bool [B, F]: the prefix of each flat entry is among the ``branch`` best (highest
  ``key``) children of its parent prefix, and so is every ancestor -- a capped node's
  subtree never takes a node. Sibling rank: sort by (parent hash, key descending, index)
  and count from the run start; only ``first`` entries (one per prefix) carry a key.
  ``hs``/``order``/``rank``: the sorted prefix hashes and their permutation (as
  :func:`continuation_tree` has them)."""
  b, f = hs.shape
  by_key = jnp.argsort(-key, axis=1, stable=True)  # key descending, then index
  pk = jnp.take_along_axis(parent_h, by_key, axis=1)
  by_parent = jnp.argsort(pk, axis=1, stable=True)
  perm = jnp.take_along_axis(by_key, by_parent, axis=1)  # (parent, -key, index) order
  pk_s = jnp.take_along_axis(parent_h, perm, axis=1)
  sib_rank_s = jnp.arange(f, dtype=jnp.int32)[None, :] - _run_starts(pk_s)
  sib_rank = jnp.zeros_like(sib_rank_s).at[jnp.arange(b)[:, None], perm].set(sib_rank_s)
  # flat index of the first entry of every entry's prefix: one gather spreads a value
  # of the prefix to all its entries
  head = jnp.take_along_axis(jnp.take_along_axis(order, _run_starts(hs), axis=1), rank, axis=1)
  a3 = jnp.take_along_axis((sib_rank < branch) | ~first, head, axis=1).reshape(b, -1, dcap)
  for d in range(1, dcap):  # an entry's parent prefix is the same occurrence one level up
    a3 = a3.at[:, :, d].set(a3[:, :, d] & a3[:, :, d - 1])
    a3 = jnp.take_along_axis(a3.reshape(b, f), head, axis=1).reshape(b, -1, dcap)
  return a3.reshape(b, f)


def continuation_tree(
  cont: jax.Array, n_nodes: int, weight: jax.Array | None = None, branch: int | None = None
):
  """The draft tree of the N - 1 most frequent continuation prefixes (module doc).

  cont: int32 [B, M, D] the continuation of each occurrence (``< 0`` past its end, or for
  every d where m is no occurrence). ``weight`` (int32 [B, M], optional, >= 1): what each
  occurrence counts (default 1; the suffix drafter counts its longest-match occurrences
  above shorter ones). ``branch`` (static, None/0 = no cap): at most this many children per
  node, the most frequent (TLT's top-b); the nodes a capped subtree would have taken go to
  the next most frequent allowed prefixes. Returns (tokens, parents, depth) int32 [B, N]:
  node 0 the root (token -1: the engine puts the current token there), empty nodes -1.
  """
  b, m, dcap = cont.shape
  k = n_nodes - 1
  h = prefix_hashes(cont).reshape(b, m * dcap)
  tok = cont.reshape(b, m * dcap)
  d = jnp.broadcast_to(jnp.arange(dcap, dtype=jnp.int32), (b, m, dcap)).reshape(b, m * dcap)
  order = jnp.argsort(h, axis=1, stable=True)
  hs = jnp.take_along_axis(h, order, axis=1)
  if weight is None:
    count_s = jax.vmap(
      lambda a: jnp.searchsorted(a, a, side='right') - jnp.searchsorted(a, a, side='left')
    )(hs).astype(jnp.int32)
  else:  # weighted: segment sums of the sorted weights
    w = jnp.broadcast_to(weight.astype(jnp.int32)[:, :, None], (b, m, dcap)).reshape(b, -1)
    cs = jnp.cumsum(jnp.take_along_axis(w, order, axis=1), axis=1)
    cs = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), cs], axis=1)

    def seg(a, c):
      return c[jnp.searchsorted(a, a, side='right')] - c[jnp.searchsorted(a, a, side='left')]

    count_s = jax.vmap(seg)(hs, cs).astype(jnp.int32)
  first_s = jnp.concatenate([jnp.ones((b, 1), bool), hs[:, 1:] != hs[:, :-1]], axis=1)
  first_s &= hs != _EMPTY
  rank = jnp.argsort(order, axis=1)  # sorted index of every flat entry
  count = jnp.take_along_axis(count_s, rank, axis=1)
  first = jnp.take_along_axis(first_s, rank, axis=1)
  key = jnp.where(first, count * (dcap + 1) + (dcap - d), -1)
  prev_h = jnp.concatenate([jnp.full((b, 1), _EMPTY), h[:, :-1]], axis=1)
  if branch:
    parent_h = jnp.where(d == 0, _ROOT, prev_h)
    key = jnp.where(_branch_allowed(hs, parent_h, key, first, order, rank, dcap, branch), key, -1)
  if k > m * dcap:  # fewer candidate prefixes than nodes
    key = jnp.pad(key, ((0, 0), (0, k - m * dcap)), constant_values=-1)
  vals, idx = jax.lax.top_k(key, k)  # descending: a parent before its children
  live = vals > 0
  idx = jnp.minimum(idx, m * dcap - 1)
  take = lambda a: jnp.take_along_axis(a, idx, axis=1)  # noqa: E731
  node_tok, node_d, node_h = take(tok), take(d), take(h)
  parent_h = take(prev_h)
  hit = (node_h[:, None, :] == parent_h[:, :, None]) & live[:, None, :]  # [B, child, cand]
  hit &= jnp.arange(k)[None, None, :] < jnp.arange(k)[None, :, None]
  par = jnp.where(node_d == 0, 0, jnp.where(jnp.any(hit, axis=2), jnp.argmax(hit, axis=2) + 1, -1))
  live &= par >= 0
  tokens = jnp.where(live, node_tok, NO_TOKEN)
  parents = jnp.where(live, par, 0)
  depth = jnp.where(live, node_d + 1, 1)
  root = jnp.zeros((b, 1), jnp.int32)
  return (
    jnp.concatenate([root - 1, tokens], axis=1).astype(jnp.int32),
    jnp.concatenate([root - 1, parents], axis=1).astype(jnp.int32),
    jnp.concatenate([root, depth], axis=1).astype(jnp.int32),
  )

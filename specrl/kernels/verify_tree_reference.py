"""Tree verification by sample-and-compare, keyed like plain decoding: the jnp reference.

A draft tree of N nodes per row (node 0 = the root, the last committed token; ``tokens``
``< 0`` = empty node; ``parents[u] < u``; :mod:`specrl.decoding.tree`) has been fed to the
policy in one pass, giving the logits ``target_logits[:, u]`` of the token after node u.
For a proposal that is a deterministic function of the drafter's inputs (suffix / n-gram
trees and chains) verification needs no acceptance test at all:

  at node u (depth d) draw ``y_u`` from the policy's processed distribution (temperature,
  top-k, top-p) with the very noise the plain step uses at that position -- event seed
  ``seeds[:, u] = event_seeds(seed, seq_id, pos + d, STREAM_PLAIN)`` and Gumbel-max over
  :func:`specrl.prng.row_gumbels` row 0 (:func:`specrl.sampling.sample_seeded`); if some
  child of u carries the token ``y_u`` descend to it, otherwise emit ``y_u`` and stop; at a
  leaf ``y_u`` is the bonus token.

Every emitted token is then the token plain decoding would emit at that position (same
logits up to rounding, same key, same rule), at any temperature: the output *equals* plain
decoding's, a stronger guarantee than equal distributions. Greedy: ``y_u = argmax`` of the
raw logits, as the plain step. A chain is the tree with ``parents = i - 1``.

Pieces the kernel (:mod:`specrl.kernels.verify_tree`) shares: :func:`node_keys` (one
Gumbel row key per node) and :func:`walk` (the descent, ``O(N^2)`` per row on the ``[B, N]``
draws, no vocabulary work). Deliberately broken variants of :func:`child_of` / :func:`walk`
live in ``tests/broken_verifiers.py``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from specrl import sampling
from specrl.prng import STREAM_SAMPLE, element_bits, gumbel_from_bits, row_key, seeds_to_i32


@flax.struct.dataclass
class TreeVerifyResult:
  """Outcome of one tree verify pass for B rows of N nodes.

  num_accepted: int32 [B], accepted depth n (drafts accepted) in 0..N-1.
  tokens: int32 [B, N], the n + 1 emitted tokens then zeros.
  logprobs: f32 [B, N], reported logprob of each emitted token then zeros.
  path: int32 [B, N], node of the accepted path at depth d (``path[:, 0] = 0``) for
    ``d <= n``; ``d`` beyond (so moving slot ``path[d]`` to ``d`` is a no-op there).
  non_first: int32 [B], descents into a child that is not its parent's first child.
  leaf: bool [B], the walk ended at a node without children (the emitted token is a bonus).
  """

  num_accepted: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  path: jax.Array
  non_first: jax.Array
  leaf: jax.Array


def node_keys(seeds: jax.Array) -> jax.Array:
  """Gumbel row keys int32 [B, N] of per-node event seeds [B, N]: exactly the key
  :func:`specrl.prng.row_gumbels` (row 0) gives the plain step with that seed."""
  s = seeds_to_i32(seeds)
  return row_key(s, jnp.zeros(s.shape, jnp.int32), STREAM_SAMPLE)


def sample_nodes(target_logits: jax.Array, seeds: jax.Array, sp: sampling.SamplingParams):
  """The plain step's draw at every node: int32 [B, N] (materialises [B, N, V] noise)."""
  if sp.greedy:
    return sampling.argmax(target_logits)
  vocab = target_logits.shape[-1]
  cols = jnp.arange(vocab, dtype=jnp.int32)
  g = gumbel_from_bits(element_bits(node_keys(seeds)[..., None], cols))
  return sampling.argmax(sampling.processed_logits(target_logits, sp) + g)


def child_of(cur: jax.Array, y_cur: jax.Array, tokens: jax.Array, parents: jax.Array):
  """The first child of node ``cur`` [B] whose token is ``y_cur`` [B]; -1 if none."""
  hit = (parents == cur[:, None]) & (tokens == y_cur[:, None]) & (tokens >= 0)
  return jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1), -1).astype(jnp.int32)


def first_child(cur: jax.Array, tokens: jax.Array, parents: jax.Array):
  """The first (lowest-index) child of node ``cur`` [B]; -1 at a leaf."""
  kid = (parents == cur[:, None]) & (tokens >= 0)
  return jnp.where(jnp.any(kid, axis=1), jnp.argmax(kid, axis=1), -1).astype(jnp.int32)


def walk(y: jax.Array, tokens: jax.Array, parents: jax.Array):
  """Descend from the root while the draw ``y`` at the current node is a child's token.
  Returns (n [B], path [B, N], non_first [B], leaf [B]) (:class:`TreeVerifyResult`)."""
  b, n_nodes = tokens.shape
  take = lambda a, i: jnp.take_along_axis(a, i[:, None], axis=1)[:, 0]  # noqa: E731
  cur = jnp.zeros((b,), jnp.int32)
  alive = jnp.ones((b,), bool)
  n = jnp.zeros((b,), jnp.int32)
  non_first = jnp.zeros((b,), jnp.int32)
  path = [cur]
  for d in range(1, n_nodes):
    c = child_of(cur, take(y, cur), tokens, parents)
    go = alive & (c >= 0)
    non_first += (go & (c != first_child(cur, tokens, parents))).astype(jnp.int32)
    n += go.astype(jnp.int32)
    cur = jnp.where(go, c, cur)
    alive = go
    path.append(jnp.where(go, c, d).astype(jnp.int32))
  leaf = first_child(cur, tokens, parents) < 0
  return n, jnp.stack(path, axis=1), non_first, leaf


def emit(y, n, path, target_logits, sp: sampling.SamplingParams) -> tuple[jax.Array, jax.Array]:
  """Emitted tokens ``y[path[d]]`` and their reported logprobs for ``d <= n``, zeros after."""
  d = jnp.arange(path.shape[1])[None, :]
  toks = jnp.where(d <= n[:, None], jnp.take_along_axis(y, path, axis=1), 0)
  lp_nodes = sampling.token_logprobs(target_logits, y, sp)  # [B, N]: no [B, N, V] gather
  lp = jnp.where(d <= n[:, None], jnp.take_along_axis(lp_nodes, path, axis=1), 0.0)
  return toks.astype(jnp.int32), lp.astype(jnp.float32)


def verify_tree_reference(
  target_logits: jax.Array,
  tokens: jax.Array,
  parents: jax.Array,
  seeds: jax.Array,
  sp: sampling.SamplingParams,
) -> TreeVerifyResult:
  """Sample-and-compare verification (module doc): the contract.

  Args:
    target_logits: f32/bf16 [B, N, V]: the policy's logits after each node.
    tokens: int32 [B, N] node tokens (node 0: the root; < 0: empty); parents int32 [B, N]
      (``parents[:, u] < u``, root -1).
    seeds: int32 [B, N] the plain step's event seed at each node's position.
    sp: sampling settings (static).
  """
  y = sample_nodes(target_logits, seeds, sp)
  n, path, non_first, leaf = walk(y, tokens, parents)
  toks, lp = emit(y, n, path, target_logits, sp)
  return TreeVerifyResult(
    num_accepted=n, tokens=toks, logprobs=lp, path=path, non_first=non_first, leaf=leaf
  )

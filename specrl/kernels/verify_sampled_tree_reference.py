"""Verification of *sampled* draft trees by recursive rejection sampling: the jnp reference.

Sample-and-compare (:mod:`specrl.kernels.verify_tree_reference`) needs a proposal that is a
deterministic function of the drafter's inputs; it then accepts a child ``c`` of node u with
probability ``p_u(c)`` and a tree of top candidates reaches at most the policy's mass on
them. At T > 0 a learned head's *sampled* children can do better (SpecInfer, EAGLE's
T > 0 trees; Jeon et al. 2024, "Recursive Speculative Decoding"): node u's children
``x_1, x_2, ...`` are drawn from the head's ``q_u`` *without replacement* (Gumbel-top-b),
in slot order, and verified one after another:

  ``P = p_u``, ``Q = q_u``; for each child ``x_j`` in slot order: accept with probability
  ``min(1, P(x_j) / Q(x_j))`` (``w * Q(x_j) < P(x_j)``, w uniform) and descend to it;
  else ``P <- normalize(max(P - Q, 0))`` and ``Q <- Q`` without ``x_j``, renormalised.
  If every child is rejected, or u is a leaf, emit ``y ~ P`` and stop.

Why it is lossless (the output follows ``p_u`` exactly, by induction on the children left):
with none left it samples ``P``. Otherwise ``x ~ Q``: the token is ``x`` with probability
``sum_x Q(x) min(1, P(x)/Q(x)) [x = y] = min(P(y), Q(y))``, and on a rejection the rest of
the procedure samples the residual ``max(P - Q, 0) / Z`` exactly *whatever proposal it is
given* (the hypothesis), so the total is ``min(P, Q) + max(P - Q, 0) = P``. The rejected
``x`` has ``P(x) < Q(x)``, hence residual mass 0: removing it from ``Q`` (the
without-replacement draw of the next child) changes no target. Descending into the accepted
child restarts the argument at the next position with the child's own ``p`` and ``q``.

What the proposal must respect (:meth:`specrl.drafters.eagle.EagleDrafter.propose_tree`,
``sampled=True``): the argument conditions on the children drawn so far, so *whether* slot
j of node u exists may depend on anything except the tokens in slots ``>= j`` of u and their
descendants. EAGLE-2's expansion by the drafted token's own probability breaks that (a slot
kept only when its token is likely biases the draw); the head's trees rank a slot by the
j-th largest ``q_u`` (a function of u's distribution, not of the draw) instead.

Not token-exact: the output equals plain decoding's in distribution (statistical tests,
``tests/test_eagle_tree_sampled.py``), not token for token. Greedy (T = 0) never comes here:
sampled trees fall back to the head's top candidates and sample-and-compare, which is exact.

Randomness (:mod:`specrl.prng`), from per-node event seeds ``seeds [B, N]`` of their own
stream (:data:`specrl.prng.STREAM_TREE`) at each node's position: the test of the child at
node t uses ``U(row_key(seeds[t], t, STREAM_ACCEPT))`` and the final draw at node u is
Gumbel-max with ``row_key(seeds[u], 0, STREAM_SAMPLE)``. Every key used in a round belongs to
a node at depth ``<= n + 1`` (position ``<= pos + n + 1``) and the next round's to
positions ``>= pos + n + 2``: no key is ever used twice, and none is shared with the draws
the drafter made (:data:`specrl.prng.STREAM_DRAFT`).

No kernel: the walk carries ``[B, V]`` target and proposal rows through ``N - 1`` child
tests; ``rollout.verify_impl = 'pallas'`` is refused with sampled trees
(:func:`specrl.decoding.tree.check_drafter`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specrl import sampling
from specrl.kernels.verify_tree_reference import TreeVerifyResult, first_child
from specrl.prng import STREAM_ACCEPT, row_gumbels, row_key, seeds_to_i32, uniform_from_bits


def node_probs(logits: jax.Array, sp: sampling.SamplingParams) -> jax.Array:
  """Processed probabilities (temperature, top-k, top-p) [..., V] f32, as a draw samples."""
  return jax.nn.softmax(sampling.processed_logits(logits, sp).astype(jnp.float32), axis=-1)


def full_vocab(q: jax.Array, ids: jax.Array | None, vocab: int) -> jax.Array:
  """Probabilities over a reduced vocabulary ``q [B, R]`` (``ids [R]``; None: ``R = V``)
  as [B, V], zero outside ``ids``."""
  if ids is None:
    return q
  return jnp.zeros(q.shape[:-1] + (vocab,), q.dtype).at[..., ids].set(q)


def accept_uniforms(seeds: jax.Array) -> jax.Array:
  """The child-test uniform of every node: f32 [B, N] (node t's with row t)."""
  n = seeds.shape[1]
  return uniform_from_bits(
    row_key(seeds_to_i32(seeds), jnp.arange(n, dtype=jnp.int32)[None, :], STREAM_ACCEPT)
  )


def residual(p: jax.Array, q: jax.Array) -> jax.Array:
  """``normalize(max(p - q, 0))`` [B, V]; ``p`` itself where that has no mass (rounding)."""
  w = jnp.maximum(p - q, 0.0)
  z = jnp.sum(w, axis=-1, keepdims=True)
  return jnp.where(z > 0, w / jnp.where(z > 0, z, 1.0), p)


def without(q: jax.Array, x: jax.Array) -> jax.Array:
  """``q`` [B, V] with token ``x`` [B] removed and renormalised (the next child's draw)."""
  q = jnp.where(jnp.arange(q.shape[-1])[None, :] == x[:, None], 0.0, q)
  z = jnp.sum(q, axis=-1, keepdims=True)
  return q / jnp.where(z > 0, z, 1.0)


def draw(p: jax.Array, seeds: jax.Array) -> jax.Array:
  """One token of ``p`` [B, V] per row by Gumbel-max keyed by ``seeds`` [B] (row 0)."""
  g = row_gumbels(seeds, 0, p.shape[-1])
  score = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)) + g, -jnp.inf)
  return jnp.argmax(score, axis=-1).astype(jnp.int32)


def verify_sampled_tree_reference(
  target_logits: jax.Array,
  tokens: jax.Array,
  parents: jax.Array,
  draft_logits: jax.Array,
  draft_ids: jax.Array | None,
  seeds: jax.Array,
  sp: sampling.SamplingParams,
  *,
  test_child=None,
) -> TreeVerifyResult:
  """Recursive rejection sampling over sampled draft trees (module doc): the contract.

  Args:
    target_logits: f32/bf16 [B, N, V]: the policy's logits after each node.
    tokens: int32 [B, N] node tokens (node 0 the root; < 0 empty); parents int32 [B, N]
      (``parents[:, u] < u``; siblings in slot order, i.e. the order they were drawn).
    draft_logits: f32 [B, N, R]: row u holds the logits of the distribution node u was
      drawn from (its parent's ``q``, before temperature / top-k / top-p: processed here
      like the drafter processed them); ``draft_ids`` [R] the vocabulary ids of the R
      columns (None: R = V).
    seeds: int32 [B, N] per-node event seeds (module doc "Randomness").
    sp: sampling settings (static, T > 0).
    test_child: the child test ``(w, P(x), Q(x)) -> accept`` (tests swap in broken ones).
  """
  if sp.greedy:
    raise ValueError('sampled draft trees are verified at T > 0 only (greedy: sample-and-compare)')
  test_child = test_child or (lambda w, px, qx: w * qx < px)
  b, n_nodes, vocab = target_logits.shape
  rows = jnp.arange(b)
  p_nodes = node_probs(target_logits, sp)  # [B, N, V]
  q_nodes = node_probs(draft_logits, sp)  # [B, N, R]
  w = accept_uniforms(seeds)
  cur = jnp.zeros((b,), jnp.int32)
  depth = jnp.zeros((b,), jnp.int32)
  non_first = jnp.zeros((b,), jnp.int32)
  path = jnp.broadcast_to(jnp.arange(n_nodes, dtype=jnp.int32), (b, n_nodes))
  p = p_nodes[:, 0]
  q = jnp.zeros((b, vocab), jnp.float32)
  fresh = jnp.ones((b,), bool)  # q not yet loaded for the current node
  for u in range(1, n_nodes):
    x = tokens[:, u]
    child = (parents[:, u] == cur) & (x >= 0)
    q = jnp.where((child & fresh)[:, None], full_vocab(q_nodes[:, u], draft_ids, vocab), q)
    fresh &= ~child
    xi = jnp.maximum(x, 0)
    acc = child & test_child(w[:, u], p[rows, xi], q[rows, xi])
    rej = child & ~acc
    non_first += (acc & (u != first_child(cur, tokens, parents))).astype(jnp.int32)
    depth += acc.astype(jnp.int32)
    path = jnp.where(acc[:, None] & (jnp.arange(n_nodes)[None, :] == depth[:, None]), u, path)
    p = jnp.where(rej[:, None], residual(p, q), p)
    q = jnp.where(rej[:, None], without(q, xi), q)
    cur = jnp.where(acc, u, cur)
    p = jnp.where(acc[:, None], p_nodes[:, u], p)
    fresh |= acc
  y = draw(p, seeds[rows, cur])
  d = jnp.arange(n_nodes, dtype=jnp.int32)[None, :]
  nxt = jnp.take_along_axis(tokens, jnp.roll(path, -1, axis=1), axis=1)  # path[d + 1]'s token
  on_path = d <= depth[:, None]
  toks = jnp.where(d < depth[:, None], nxt, jnp.where(on_path, y[:, None], 0))
  # each path node's emitted token at that node (logprobs per node: no [B, N, V] gather)
  after = (
    jnp.zeros_like(tokens)
    .at[rows[:, None], jnp.where(on_path, path, n_nodes)]
    .set(toks, mode='drop')
  )
  lp_nodes = sampling.token_logprobs(target_logits, after, sp)  # [B, N]
  lp = jnp.where(on_path, jnp.take_along_axis(lp_nodes, path, axis=1), 0.0)
  leaf = first_child(cur, tokens, parents) < 0
  return TreeVerifyResult(
    num_accepted=depth, tokens=toks.astype(jnp.int32), logprobs=lp.astype(jnp.float32),
    path=path, non_first=non_first, leaf=leaf,
  )  # fmt: skip

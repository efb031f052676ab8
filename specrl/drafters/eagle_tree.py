"""Draft trees of the eagle head (``rollout.tree_nodes = N >= 2``; :meth:`EagleTrees.
propose_tree`): instead of one sampled chain the head proposes EAGLE-2's dynamic tree from its
*top* candidates. Depth 1 is the head's top ``b`` (``tree_branch``) tokens after ``ĥ_pos``,
scored by their log q (q: the head's temperature-scaled softmax, over its reduced vocabulary if
any; ties to the lower index). For each depth ``d < D`` (the ``tree_depth`` cap, else N - 1) the
``b`` best candidates of depth d by cumulative score are expanded: one head pass over those b
nodes at head position ``pos - 1 + d``, each fed ``(ĥ of its parent, its token)`` and attending
to the committed head positions ``< pos`` plus its ancestors' and its own K/V (a mask over the
head cache; the b nodes' K/V go to scratch slots ``pos + (d - 1) b + j``, dropped past the
buffer), giving its top b children, scored parent + log q. The N - 1 best candidates of all
depths (a stable sort of the scores: a child's score is at most its parent's and it comes later,
so they form a subtree, parents first) are the tree. ``D - 1`` head passes of b nodes, no draw
from any random stream: the tree is a deterministic function of the head's inputs, so
sample-and-compare verification emits plain decoding's tokens. The head's committed state is
untouched: slots ``< pos`` are not written, ``fed`` becomes ``pos``, and the next round's
catch-up feeds the accepted path's true features over the scratch.

Sampled trees (``tree_children = 'sampled'``, T > 0; :meth:`EagleTrees.
propose_sampled_tree`): the same growth, but each expanded node's b children are *drawn*
from the head's processed q (temperature, top-k, top-p) without replacement (Gumbel-top-b,
row keys of the round's draft seed), and slot j is scored by the j-th largest log q -- not
by the drawn token's own, so that whether a slot is kept never depends on what was drawn
into it. The tree carries each node's q (compact logits [B, N, R]) and is verified by
recursive rejection sampling (:mod:`specrl.kernels.verify_sampled_tree_reference`): each
child is accepted with probability ``min(1, P/Q)``, a rejection moves to the residual, and
the output follows the policy's distribution exactly, but not plain decoding's very
tokens. Why: a top-candidate tree accepts a child with the policy's own mass on it,
``p(c)``; a sampled child is accepted with ``Σ min(p, q)``, which a calibrated head makes
larger (the sampled chain's depth-1 acceptance exceeds the head's top-1 hit rate), and the
later siblings then try the residual. At T = 0 the trees are the top candidates.

The methods are a mixin of :class:`specrl.drafters.eagle.EagleDrafter`: they read its
``model_cfg``, ``hcfg``, ``ecfg`` and its catch-up ``_root``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specrl import attention as attention_lib
from specrl import model as model_lib
from specrl import prng, sampling
from specrl import sharding as shd
from specrl.drafters.eagle_head import head_input, head_logits_compact, head_output


class EagleTrees:
  """Draft trees of the eagle head (module doc)."""

  @property
  def samples_tree_children(self) -> bool:
    """Tree rounds at T > 0 call :meth:`propose_sampled_tree` (``tree_children='sampled'``)."""
    return self.ecfg.tree_children == 'sampled'

  def _top_children(self, dp, feat, sp, branch, keys=None):
    """The head's ``branch`` next tokens after predicted features feat [B, M, D]: (tokens
    int32 [B, M, b], scores f32 [B, M, b], compact logits f32 [B, M, R]).

    ``keys`` None: its likeliest tokens, best first (ties: the lower vocabulary index),
    scored by their log q (q: the head's temperature-scaled softmax, over its reduced
    vocabulary if any). ``keys`` int32 [B, M] (row keys, :mod:`specrl.prng`): b tokens drawn
    without replacement from the processed q (temperature, top-k, top-p: the distribution
    the verifier is given) by Gumbel-top-b, in draw order; slot j's score is the j-th
    largest log q -- not the drawn token's, so that whether a slot is kept never depends on
    what was drawn into it (:mod:`specrl.kernels.verify_sampled_tree_reference`)."""
    lg, ids = head_logits_compact(dp, self.model_cfg, feat)
    b = min(branch, lg.shape[-1])
    if keys is None:
      lq = jax.nn.log_softmax(sampling.scale_logits(lg, sp), axis=-1)
      val, idx = jax.lax.top_k(lq, b)
    else:
      pl = sampling.processed_logits(lg, sp)
      val = jax.lax.top_k(jax.nn.log_softmax(pl, axis=-1), b)[0]
      cols = jnp.arange(lg.shape[-1], dtype=jnp.int32)
      g = prng.gumbel_from_bits(prng.element_bits(keys[..., None], cols))
      idx = jax.lax.top_k(pl + g, b)[1]
    tok = idx if ids is None else jnp.take(ids, idx)
    return tok.astype(jnp.int32), val, lg

  def _tree_layers(self, dp, x, positions, slots, mask, cache, mesh):
    """The head's layers over tree nodes x [B, F, D] at RoPE ``positions`` [B, F]: their k/v
    written to head-cache ``slots`` [B, F] (past the cache: dropped) and query f attending to
    the slots ``mask[b, f]`` [B, F, S] allows. Returns (y [B, F, D], cache)."""
    bidx = jnp.arange(x.shape[0])[:, None]

    def body(carry, xs):
      x, ck, cv = carry
      lp, li = xs

      def kv_fn(k, v):
        nk = ck.at[li, bidx, :, slots].set(k.astype(ck.dtype), mode='drop')  # [L, B, K, S, Dh]
        nv = cv.at[li, bidx, :, slots].set(v.astype(cv.dtype), mode='drop')
        return nk[li].astype(x.dtype), nv[li].astype(x.dtype), mask, (nk, nv)

      attn = lambda q, k, v: attention_lib.attention(q, k, v, mask, heads_major=True)  # noqa: E731
      y, (nk, nv) = model_lib._layer(
        self.hcfg, lp, x, positions, kv_fn, mesh, shd.DECODE_RULES, attn
      )
      return (y, nk, nv), None

    init = (x, cache['k'], cache['v'])
    (x, ck, cv), _ = model_lib._over_layers(body, init, dp['head']['layers'], True)
    return x, {'k': ck, 'v': cv}

  def propose_tree(
    self, dp, state, seq_tokens, pos, n_nodes, depth_cap, seeds, sp, mesh=None, ctx=None,
    branch=None,
  ):  # fmt: skip
    """A draft tree of ``n_nodes`` grown from the head's top candidates (EAGLE-2's dynamic
    tree; module doc "Trees"). Deterministic given the head's outputs: ``seeds`` unused.
    ``branch``: children per expanded node (default ``drafter.eagle.tree_branch``).
    Returns (tokens, parents, depth) int32 [B, N] (node 0 the root, token -1) and the state."""
    tokens, parents, depth, _, state = self._grow_tree(
      dp, state, seq_tokens, pos, n_nodes, depth_cap, None, sp, mesh, ctx, branch
    )
    return tokens, parents, depth, state

  def propose_sampled_tree(
    self, dp, state, seq_tokens, pos, n_nodes, depth_cap, seeds, sp, mesh=None, ctx=None,
    branch=None,
  ):  # fmt: skip
    """A draft tree of ``n_nodes`` whose children are drawn from the head (module doc
    "Sampled trees"), for recursive rejection sampling. ``seeds`` [B]: the round's draft
    event seeds. Returns (tokens, parents, depth int32 [B, N], draft_logits f32 [B, N, R]:
    row u the head's logits node u was drawn from, the head's vocabulary ids [R] or None,
    the state)."""
    tokens, parents, depth, q, state = self._grow_tree(
      dp, state, seq_tokens, pos, n_nodes, depth_cap, seeds, sp, mesh, ctx, branch
    )
    return tokens, parents, depth, q, dp.get('vocab_ids'), state

  def _grow_tree(
    self, dp, state, seq_tokens, pos, n_nodes, depth_cap, seeds, sp, mesh, ctx, branch
  ):  # fmt: skip
    """The tree of :meth:`propose_tree` (``seeds`` None) or :meth:`propose_sampled_tree`
    (children drawn with row keys of ``seeds``: the root's row 0, the j-th node expanded at
    depth d row ``1 + (d - 1) b + j``). Returns (tokens, parents, depth, draft logits [B, N,
    R] or None, state)."""
    cfg = self.model_cfg
    b = int(branch or self.ecfg.tree_branch)
    k = n_nodes - 1
    dmax = max(1, min(int(depth_cap or k), k))
    sampled = seeds is not None

    def keys(rows):  # row keys [B, len(rows)] of the children draws (None: top candidates)
      if not sampled:
        return None
      return prng.row_key(prng.seeds_to_i32(seeds)[:, None], rows[None, :], prng.STREAM_SAMPLE)

    feat, cache, fed = self._root(dp, state, seq_tokens, pos, n_nodes, ctx, mesh)  # ĥ_pos
    bsz, s = pos.shape[0], model_lib.cache_slots(cache)
    root = self._top_children(dp, feat[:, None], sp, b, keys(jnp.zeros((1,), jnp.int32)))
    tok, score, lg = (a[:, 0] for a in root)  # depth 1
    b = tok.shape[1]  # (a vocabulary smaller than the branch)
    # The expanded nodes' K/V take head-cache scratch slots up to pos + (dmax - 1) b - 1,
    # past a length-bucket window (the loop carries the head cache cut to it): carry as
    # many more slots as the buffer has (its end drops the rest, on every path alike), so
    # the tree is the dense path's; cut back to the window after the tree.
    window = s
    s = min(window + (dmax - 1) * b, seq_tokens.shape[1])
    if s > window:
      pad = ((0, 0),) * model_lib.CACHE_SLOT_AXIS + ((0, s - window),) + ((0, 0),)
      cache = jax.tree.map(lambda c: jnp.pad(c, pad[: c.ndim]), cache)
    toks, scores, par_flat, depths = [tok], [score], [jnp.full((bsz, b), -1, jnp.int32)], [1]
    logits = [lg[:, None]]  # of every expanded node (the root first)
    src = [jnp.zeros((bsz, b), jnp.int32)]  # each candidate's expanded parent in `logits`
    par_feat = jnp.broadcast_to(feat[:, None], (bsz, b, feat.shape[-1]))  # of each candidate
    anc = jnp.zeros((bsz, b, 0), jnp.int32)  # head-cache slots of each candidate's ancestors
    offset = 0  # flat index of this level's first candidate
    slot_ids = jnp.arange(s, dtype=jnp.int32)
    for d in range(1, dmax):  # expand depth d's best b candidates: one head pass each level
      fval, fi = jax.lax.top_k(scores[-1], b)  # stable: ties to the earlier candidate
      take = lambda a, fi=fi: jnp.take_along_axis(a, fi.reshape(fi.shape + (1,) * (a.ndim - 2)), 1)  # noqa: E731
      ftok, fpar, fanc = take(toks[-1]), take(par_feat), take(anc)
      slots = pos[:, None] + (d - 1) * b + jnp.arange(b, dtype=jnp.int32)[None, :]
      fanc = jnp.concatenate([fanc, slots[..., None]], axis=2)  # [B, b, d]: with itself
      mask = (slot_ids[None, None, :] < pos[:, None, None]) | jnp.any(
        slot_ids[None, None, :, None] == fanc[:, :, None, :], axis=-1
      )
      x = head_input(dp, cfg, fpar, ftok)
      positions = jnp.broadcast_to((pos - 1 + d)[:, None], ftok.shape)
      y, cache = self._tree_layers(dp, x, positions, slots, mask, cache, mesh)
      out = head_output(dp, cfg, y)  # [B, b, D]: ĥ after each expanded node
      rows = 1 + (d - 1) * b + jnp.arange(b, dtype=jnp.int32)
      ctok, clq, clg = self._top_children(dp, out, sp, b, keys(rows))  # [B, b, b]
      toks.append(ctok.reshape(bsz, b * b))
      scores.append((fval[:, :, None] + clq).reshape(bsz, b * b))
      par_flat.append(jnp.repeat(offset + fi, b, axis=1).astype(jnp.int32))
      depths.append(d + 1)
      logits.append(clg)
      src.append(jnp.broadcast_to(jnp.repeat(rows, b)[None, :], (bsz, b * b)))
      par_feat = jnp.repeat(out, b, axis=1)
      anc = jnp.repeat(fanc, b, axis=1)
      offset += toks[-2].shape[1]
    tokens, parents, depth, sel_src = best_first(toks, scores, par_flat, depths, k, src)
    q = None
    if sampled:  # row u: the logits of u's parent (the root's row: unused)
      q = jnp.take_along_axis(jnp.concatenate(logits, axis=1), sel_src[..., None], axis=1)
    if s > window:
      cache = jax.tree.map(lambda c: c[:, :, :, :window], cache)
    return tokens, parents, depth, q, {'cache': cache, 'fed': jnp.maximum(fed, pos)}


def best_first(toks, scores, par_flat, depths, k: int, src):
  """The ``k`` best candidates of every level (lists of [B, C_d]: tokens, cumulative log q,
  parent's flat candidate index (-1: the root), the level's depth) as a tree of ``k + 1``
  nodes, parents before children. A child's score is its parent's plus a log q <= 0, and
  the candidates are flat in level order, so a stable sort by score puts every parent before
  its children and the best k are a subtree. A candidate of probability 0 (``NEG_INF``
  logits) is an empty node. ``src``: a list like ``toks`` of per-candidate ints, returned
  for the nodes too (the root's 0). Returns (tokens, parents, depth, src) int32 [B, k + 1]."""
  tok = jnp.concatenate(toks, axis=1)
  srcs = jnp.concatenate(src, axis=1)
  score = jnp.concatenate(scores, axis=1)
  pflat = jnp.concatenate(par_flat, axis=1)
  dep = jnp.concatenate(
    [jnp.full(t.shape, d, jnp.int32) for t, d in zip(toks, depths, strict=True)], axis=1
  )
  bsz, c = tok.shape
  if c < k:  # fewer candidates than nodes (a branch of 1: one per level)
    pad = lambda a, v: jnp.pad(a, ((0, 0), (0, k - c)), constant_values=v)  # noqa: E731
    tok, score, pflat, dep = pad(tok, -1), pad(score, -jnp.inf), pad(pflat, -1), pad(dep, 1)
    srcs = pad(srcs, 0)
  sel = jnp.argsort(-score, axis=1, stable=True)[:, :k]
  take = lambda a: jnp.take_along_axis(a, sel, axis=1)  # noqa: E731
  ntok, nscore, npf, ndep = take(tok), take(score), take(pflat), take(dep)
  live = nscore > 0.5 * sampling.NEG_INF
  hit = (sel[:, None, :] == npf[:, :, None]) & live[:, None, :]  # [B, node, candidate node]
  par = jnp.where(npf < 0, 0, jnp.where(jnp.any(hit, axis=2), jnp.argmax(hit, axis=2) + 1, -1))
  live &= par >= 0
  root = jnp.zeros((bsz, 1), jnp.int32)
  return (
    jnp.concatenate([root - 1, jnp.where(live, ntok, -1)], axis=1).astype(jnp.int32),
    jnp.concatenate([root - 1, jnp.where(live, par, 0)], axis=1).astype(jnp.int32),
    jnp.concatenate([root, jnp.where(live, ndep, 1)], axis=1).astype(jnp.int32),
    jnp.concatenate([root, take(srcs)], axis=1).astype(jnp.int32),
  )

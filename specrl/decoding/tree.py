"""Draft trees: proposals of N nodes per row, one verify forward over them, sample-and-compare.

A tree round at state (``pos``: position of the last committed token ``c``; cache holds
slots ``< pos``) with ``N = rcfg.tree_nodes`` static nodes per row:

1. the drafter proposes a :class:`DraftTree`: node 0 is the root ``c``; node ``u >= 1``
   carries a token (``< 0``: empty), a parent ``< u`` and a depth (parent's + 1). A chain
   is the tree with ``parents = i - 1`` (:func:`chain_tree`): a one-hot drafter without a
   tree builder proposes its chain of ``N - 1`` drafts;
2. the policy runs *one* forward over the N nodes (:func:`specrl.model.forward` with
   ``tree_anc``): node u at position ``pos + depth_u`` (:func:`node_positions`), attending
   to the committed prefix (slots ``< pos``) and its ancestors (:func:`ancestors`). Siblings
   share a position, so node u's K/V go to scratch slot ``pos + u`` (the chain's ``k + 1``
   verify slots with ``k = N - 1``: same buffer scratch, same length buckets);
3. :func:`specrl.decoding.verify.verify_tree` walks the tree by sample-and-compare keyed
   like the plain step (:mod:`specrl.kernels.verify_tree_reference`): the emitted tokens
   are plain decoding's tokens. A *sampled* tree (a drafter whose ``samples_tree_children``
   is true, at T > 0: :func:`samples_children`) carries the distribution each node was drawn
   from and is verified by recursive rejection sampling instead
   (:mod:`specrl.kernels.verify_sampled_tree_reference`, its own key stream): plain
   decoding's distribution, not its tokens;
4. the accepted path's K/V move into place (:func:`move_accepted_kv`: node ``path[d]``'s
   k/v, kept from the pass, to slot ``pos + d``: a scatter of ``N`` slots per layer) so the
   cache equals plain decoding's; :func:`specrl.decoding.state.commit` appends the tokens.

Why move, not re-feed: re-feeding the accepted path is a second policy forward of up to N
tokens per round; the move reads and writes ``2 L N K Dh`` values per row. Measured at
SmolLM2-135M's shapes, B = 16, N = 8 on a 2-core CPU (``bench/tree_kv.py``,
``docs/benchmarks.md``): the move ~0.005 s, a re-feed ~1.1-1.4 s (~1 % vs ~2-3 plain steps).
"""

from __future__ import annotations

import inspect

import flax.struct
import jax
import jax.numpy as jnp

from specrl import model as model_lib
from specrl import prng
from specrl import sharding as shd
from specrl.decoding import verify as verify_lib
from specrl.decoding.state import RolloutState, commit, count_acceptance, current_tokens
from specrl.drafters import hooks


@flax.struct.dataclass
class DraftTree:
  """Per-row draft trees of N nodes (static N). tokens int32 [B, N] (node 0 the root; ``< 0``
  empty), parents int32 [B, N] (``parents[:, u] < u``; the root's is -1), depth int32
  [B, N] (the root's 0, a node's = its parent's + 1). A *sampled* tree also carries the
  distribution each node was drawn from: draft_logits f32 [B, N, R] over the vocabulary
  ids draft_ids [R] (None: R = V); None for a deterministic tree."""

  tokens: jax.Array
  parents: jax.Array
  depth: jax.Array
  draft_logits: jax.Array | None = None
  draft_ids: jax.Array | None = None


def chain_tree(cur: jax.Array, drafts: jax.Array) -> DraftTree:
  """The chain ``cur [B] -> drafts [B, k]`` (``< 0``: not proposed) as a tree of k + 1 nodes."""
  b, k = drafts.shape
  tokens = jnp.concatenate([cur[:, None], drafts], axis=1).astype(jnp.int32)
  i = jnp.broadcast_to(jnp.arange(k + 1, dtype=jnp.int32), (b, k + 1))
  return DraftTree(tokens=tokens, parents=i - 1, depth=i)


def normalize(tree: DraftTree, cur: jax.Array) -> DraftTree:
  """The tree as the forward feeds it: the root's token is ``cur``; an empty node (or one
  under an empty node: never reached) becomes an empty leaf of the root (depth 1, fed the
  root's token), so it sees only the prefix, the root and itself."""
  n = tree.tokens.shape[1]
  tokens, parents, depth = tree.tokens, tree.parents, tree.depth
  live = (tokens >= 0).at[:, 0].set(True)
  for u in range(1, n):  # a node under an empty node is empty (parents[u] < u)
    par = jnp.clip(parents[:, u], 0, n - 1)
    live = live.at[:, u].set(live[:, u] & jnp.take_along_axis(live, par[:, None], 1)[:, 0])
  tokens = jnp.where(live, tokens, -1).at[:, 0].set(cur)
  root = jnp.arange(n)[None, :] == 0
  parents = jnp.where(live, parents, 0)
  parents = jnp.where(root, -1, parents)
  depth = jnp.where(live, depth, 1)
  depth = jnp.where(root, 0, depth)
  return tree.replace(tokens=tokens.astype(jnp.int32), parents=parents, depth=depth)


def samples_children(drafter, rcfg) -> bool:
  """Whether this configuration's tree rounds draw sampled trees (``drafter.
  samples_tree_children``, e.g. ``drafter.eagle.tree_children = 'sampled'``), verified by
  recursive rejection sampling. Never at T = 0: greedy trees are the head's top candidates."""
  return bool(getattr(drafter, 'samples_tree_children', False)) and not rcfg.sampling.greedy


def ancestors(parents: jax.Array) -> jax.Array:
  """bool [B, N, N]: ``anc[b, t, u]`` iff node u is node t or one of its ancestors."""
  b, n = parents.shape
  nodes = jnp.arange(n, dtype=jnp.int32)
  anc = jnp.broadcast_to(nodes[:, None] == nodes[None, :], (b, n, n))
  cur = parents
  for _ in range(n - 1):
    anc = anc | ((cur[:, :, None] == nodes[None, None, :]) & (cur[:, :, None] >= 0))
    cur = jnp.where(cur >= 0, jnp.take_along_axis(parents, jnp.maximum(cur, 0), axis=1), -1)
  return anc


def node_positions(pos: jax.Array, depth: jax.Array) -> jax.Array:
  """Position of every node: the row's position plus the node's depth. int32 [B, N]."""
  return pos[:, None] + depth


def move_accepted_kv(cache, pos: jax.Array, path: jax.Array, new_kv):
  """Cache with the accepted path's K/V at slots ``pos + d`` for every d, as plain decoding
  writes them: node ``path[d]``'s k/v, taken from the pass's new k/v ``new_kv`` (``{'k',
  'v'}: [L, B, N, K, Dh]``, :func:`specrl.model.forward`'s ``return_new_kv``). Slots past
  the cache are dropped (rows at its end, the length bucket's window).

  Why from the pass's k/v and not the scratch slots: gathering slot ``pos + path[d]`` back
  out of the cache made XLA fuse the last layer's in-place window update into that gather,
  so the update (and the move's scatter) copied the whole cache every round
  (``tests/test_cache_layout.py``); a scatter whose update reads no cache runs in place."""
  d = jnp.arange(path.shape[1], dtype=jnp.int32)[None, :]
  dst = pos[:, None] + d
  bidx = jnp.arange(pos.shape[0])[:, None]

  def one(c, new):
    vals = new[:, bidx, path]  # [L, B, D, K, Dh]
    # [L, B, K, S, Dh]: advanced (batch, slot) indices split by the head slice go first,
    # so the update is indexed [B, D, L, K, Dh]
    return c.at[:, bidx, :, dst].set(jnp.moveaxis(vals, 0, 2), mode='drop')

  return {'k': one(cache['k'], new_kv['k']), 'v': one(cache['v'], new_kv['v'])}


def check_drafter(drafter, rcfg) -> None:
  """Refuse draft trees (``rcfg.tree_nodes``) with a drafter that cannot propose them: one
  without a tree builder (``propose_tree``: suffix, ngram, eagle's head-grown trees) whose
  drafts are sampled (they need rejection sampling)."""
  if not rcfg.tree_nodes or drafter is None:
    return
  if samples_children(drafter, rcfg) and rcfg.verify_impl != 'jnp':
    raise ValueError(
      f'rollout.verify_impl={rcfg.verify_impl!r}: sampled draft trees ({drafter.name!r} with '
      "sampled tree children) are verified by the jnp reference only: set verify_impl='jnp' "
      "or the drafter's tree children to 'top'"
    )
  if not hasattr(drafter, 'propose_tree') and not getattr(drafter, 'one_hot', False):
    raise ValueError(
      f'rollout.tree_nodes={rcfg.tree_nodes} needs a deterministic drafter: a tree builder '
      f'(suffix, ngram, eagle) or one-hot drafts; {drafter.name!r} samples its drafts, which '
      'sample-and-compare cannot verify exactly: use chains (rollout.tree_nodes=0)'
    )


def propose_tree(
  drafter, draft_params, state: RolloutState, n_nodes: int, rcfg, mesh=None, attend_len=None
):
  """The drafter's tree of ``n_nodes`` (its ``propose_tree`` if it has one, else its chain
  of ``n_nodes - 1`` one-hot drafts). Returns (tree, draft state, policy cache)."""
  draft_seeds = prng.event_seeds(state.seed, state.seq_id, state.pos, prng.STREAM_DRAFT)
  kw = hooks.propose_kwargs(drafter, state)
  if hasattr(drafter, 'propose_tree'):
    if rcfg.tree_branch:  # passed only when set (TreeDrafter: a fixed tree may ignore it)
      if 'branch' not in inspect.signature(drafter.propose_tree).parameters:
        raise ValueError(
          f'rollout.tree_branch={rcfg.tree_branch} (or a tree arm with a branch cap): drafter '
          f'{drafter.name!r} builds trees without a branch cap (set the branch to 0)'
        )
      kw['branch'] = rcfg.tree_branch
    sampled = samples_children(drafter, rcfg)
    propose = drafter.propose_sampled_tree if sampled else drafter.propose_tree
    tokens, parents, depth, *drawn_from, draft_state = propose(
      draft_params, state.draft, hooks.proposal_text(drafter, state, attend_len), state.pos,
      n_nodes, rcfg.tree_depth or None, draft_seeds, rcfg.sampling, mesh=mesh, **kw,
    )  # fmt: skip
    # a sampled tree also returns (draft_logits, draft_ids): what its nodes were drawn from
    return DraftTree(tokens, parents, depth, *drawn_from), draft_state, state.cache
  if not getattr(drafter, 'one_hot', False):
    raise ValueError(
      f'rollout.tree_nodes needs a deterministic (one-hot) drafter; {drafter.name!r} samples '
      'its drafts (verify it with chains: rollout.tree_nodes=0)'
    )
  text = hooks.proposal_text(drafter, state, attend_len)
  drafts, _, draft_state, policy_cache = drafter.propose(
    draft_params, state.draft, text, state.pos, n_nodes - 1, draft_seeds,
    rcfg.sampling, mesh=mesh, policy_cache=state.cache, **kw,
  )  # fmt: skip
  return chain_tree(current_tokens(state), drafts), draft_state, policy_cache


def count_tree(state: RolloutState, before: RolloutState, res, tree: DraftTree) -> RolloutState:
  """Acceptance counters of a tree round: depth i counts as proposed when the walk reached
  a node with children at depth i (``m = n + 1`` unless it ended at a leaf), so per-depth
  acceptance is ``accepted_at / reached``; ``tree_stats`` adds nodes proposed, non-first
  descents and walks that accepted down to a leaf (the bonus token)."""
  n = res.num_accepted
  proposed = n + (~res.leaf).astype(jnp.int32)
  k = tree.tokens.shape[1] - 1
  state = count_acceptance(state, before, n, k, proposed)
  if state.tree_stats is None:
    return state
  active = (~before.done).astype(jnp.int32)
  nodes = jnp.sum(tree.tokens[:, 1:] >= 0, axis=1).astype(jnp.int32)
  bonus = res.leaf & (n > 0)  # accepted down to a leaf (an empty tree's root is none)
  add = jnp.stack([nodes, res.non_first, bonus.astype(jnp.int32)], axis=1)
  return state.replace(tree_stats=state.tree_stats + add * active[:, None])


def tree_round(
  params,
  draft_params,
  state: RolloutState,
  n_nodes: int,
  *,
  cfg,
  rcfg,
  drafter,
  mesh=None,
  attend_len: int | None = None,
) -> RolloutState:
  """One propose / tree verify / move / commit round with ``n_nodes`` static nodes."""
  tree, draft_state, policy_cache = propose_tree(
    drafter, draft_params, state, n_nodes, rcfg, mesh=mesh, attend_len=attend_len
  )
  cur = current_tokens(state)
  tree = normalize(tree, cur)
  fed = jnp.where(tree.tokens >= 0, tree.tokens, cur[:, None])
  positions = node_positions(state.pos, tree.depth)
  logits, (cache, new_kv), *hidden = model_lib.forward(
    params,
    cfg,
    fed,
    positions,
    policy_cache,
    mesh=mesh,
    rules=shd.DECODE_RULES,
    return_hidden=hooks.wants_hidden(drafter),
    attend_len=attend_len,
    tree_anc=ancestors(tree.parents),
    return_new_kv=True,
  )
  node_pos = state.pos[:, None] + tree.depth  # (not the forward's positions helper)
  if tree.draft_logits is None:  # the plain step's key at each node's position
    seeds = prng.event_seeds(state.seed, state.seq_id[:, None], node_pos, prng.STREAM_PLAIN)
    res = verify_lib.verify_tree(
      logits, tree.tokens, tree.parents, seeds, rcfg.sampling, impl=rcfg.verify_impl
    )
  else:  # sampled: recursive rejection sampling, its own stream
    seeds = prng.event_seeds(state.seed, state.seq_id[:, None], node_pos, prng.STREAM_TREE)
    res = verify_lib.verify_sampled_tree(
      logits, tree.tokens, tree.parents, tree.draft_logits, tree.draft_ids, seeds,
      rcfg.sampling, impl=rcfg.verify_impl,
    )  # fmt: skip
  cache = move_accepted_kv(cache, state.pos, res.path, new_kv)
  if hidden:  # the accepted path's hidden states, in depth order
    hidden = [jnp.take_along_axis(hidden[0], res.path[..., None], axis=1)]
  before = state
  state = state.replace(cache=cache, draft=draft_state, step=state.step + 1)
  state = commit(state, res.tokens, res.logprobs, res.num_accepted + 1, rcfg)
  state = state.replace(draft=hooks.rollback(drafter, state.draft, state.pos))
  state = hooks.after_commit(drafter, draft_params, state, before.pos, hidden)
  return count_tree(state, before, res, tree)

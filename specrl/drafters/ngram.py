"""Model-free n-gram (prompt/response lookup) drafter, as in vLLM / SGLang.

Finds the most recent earlier occurrence of the last ``n`` committed tokens in the
sequence and proposes the ``k`` tokens that followed it. Proposals are deterministic, so
the drafter is ``one_hot``: it returns no draft logits and verification takes the
token-only path (draft i accepted with probability p_i(x_i); still lossless).
With no match it proposes repeats of the last token (cheap, and still lossless).
As a tree (``rollout.tree_nodes``, :meth:`NgramDrafter.propose_tree`): all distinct
continuations of every earlier occurrence of the last ``n`` tokens, best-first by frequency.
"""

from __future__ import annotations

import jax.numpy as jnp

from specrl.drafters import tree_build


class NgramDrafter:
  name = 'ngram'
  derived = False  # model-free: no params
  one_hot = True  # deterministic: token-only verification (no [B, k, V] draft logits)
  # every round scans the row's whole text: handed the text cut to the loop's length
  # bucket (drafters.hooks.proposal_text), so the scan follows the live length
  scans_text = True

  def __init__(self, vocab_size: int, ngram: int = 2):
    if ngram < 1:
      raise ValueError(f'drafter.ngram.n must be >= 1, got {ngram}')
    self.vocab_size, self.n = vocab_size, ngram

  def params_from_policy(self, policy_params):
    return None

  def state_logical_axes(self):
    return None

  def prefill(self, draft_params, prompt_tokens, prompt_len, buffer_len, mesh=None):
    return None

  def propose(
    self, draft_params, state, seq_tokens, pos, k, seeds, sp, mesh=None, policy_cache=None
  ):
    b, s = seq_tokens.shape
    n = self.n
    j = jnp.arange(s)[None, :]  # candidate end position of an earlier match
    match = j < pos[:, None]
    match &= j >= n - 1
    for o in range(n):  # seq[j - o] == seq[pos - o]
      cand = jnp.take_along_axis(seq_tokens, jnp.clip(j - o, 0, s - 1), axis=1)
      ref = jnp.take_along_axis(seq_tokens, jnp.clip(pos - o, 0, s - 1)[:, None], axis=1)
      match &= cand == ref
    last = jnp.max(jnp.where(match, j, -1), axis=1)  # most recent match, -1 if none
    idx = last[:, None] + 1 + jnp.arange(k)[None, :]
    # Only committed tokens can be copied; past pos, or without a match, repeat the last.
    idx = jnp.where((last[:, None] >= 0) & (idx <= pos[:, None]), idx, pos[:, None])
    draft_tokens = jnp.take_along_axis(seq_tokens, idx, axis=1).astype(jnp.int32)
    return draft_tokens, None, state, policy_cache

  def propose_tree(
    self,
    draft_params,
    state,
    seq_tokens,
    pos,
    n_nodes,
    depth_cap,
    seeds,
    sp,
    mesh=None,
    branch=None,
  ):
    """A tree of ``n_nodes`` per row: every earlier occurrence of the last ``n`` tokens
    contributes its committed continuation; the distinct prefixes are kept best-first by
    frequency under ``depth_cap`` and ``branch`` children per node
    (:func:`specrl.drafters.tree_build.continuation_tree`). No match: an empty tree.
    Returns (tokens, parents, depth int32 [B, n_nodes], state)."""
    b, s = seq_tokens.shape
    n = self.n
    dcap = min(depth_cap or n_nodes - 1, n_nodes - 1)
    j = jnp.arange(s)[None, :]
    match = (j < pos[:, None]) & (j >= n - 1)
    for o in range(n):
      cand = jnp.take_along_axis(seq_tokens, jnp.clip(j - o, 0, s - 1), axis=1)
      ref = jnp.take_along_axis(seq_tokens, jnp.clip(pos - o, 0, s - 1)[:, None], axis=1)
      match &= cand == ref
    conts = []
    for d in range(dcap):
      at = j + 1 + d
      tok = jnp.take_along_axis(seq_tokens, jnp.clip(at, 0, s - 1), axis=1)
      conts.append(jnp.where(match & (at <= pos[:, None]), tok, -1))
    tokens, parents, depth = tree_build.continuation_tree(
      jnp.stack(conts, axis=-1), n_nodes, branch=branch
    )
    return tokens, parents, depth, state

"""Hybrid suffix drafter: the suffix lookup where it matches, a model drafter elsewhere.

``drafter.suffix.fallback = 'quantized'`` makes the ``suffix`` drafter hybrid: one drafter
to the engine that, per row and per round, proposes

- the suffix drafter's one-hot draft (:mod:`specrl.drafters.suffix`) when the row's text
  has a suffix match of at least ``n_min`` tokens in its group / history, else
- the fallback's sampled draft (the quantized self-drafter; the learned head when it
  lands), with its draft distribution.

Verification stays exact row by row: the round gets a :class:`~specrl.drafters.hooks.
MixedDraft` (the fallback's logits and the per-row one-hot mask) and
:func:`specrl.decoding.verify.verify_mixed` verifies one-hot rows by the token-only path
(fewer than k drafts allowed) and the others by the general path.

The fallback's state stays consistent for rows that used the suffix draft: it must hold
every committed token, also the ones it did not draft.

- Own KV cache (``share_kv = False``): the fallback's ``fed`` counter (:mod:`specrl.
  drafters.model_drafter`) counts its drafts as fed only on rows that proposed them (a
  one-hot row's ``fed`` stays at ``pos + 1``), and each round feeds a window of the last
  ``k + 1`` committed positions ``pos - k .. pos`` before drafting (a round commits at most
  ``k + 1`` tokens), instead of the plain model drafter's 2; re-writing a cached slot is
  harmless. Positions before the window that it has not fed -- a plain phase of the
  adaptive engine, or a longer round's tokens when k shrinks between chunks -- are caught
  up first (:mod:`specrl.drafters.catchup`).
- ``share_kv = True``: the fallback reads the policy's cache, which the verify pass keeps
  complete: nothing to catch up.

Cost: the suffix lookup every round; the fallback's k - 1 autoregressive steps only when
some row needs them (``lax.cond`` on the batch: a round in which every row matched runs the
catch-up feed alone, or nothing with ``share_kv``). A batch that mixes both pays both, as
the fallback alone would plus the lookup.

Params: ``{'fallback': the fallback's params, 'history': the suffix history arrays or
None}``. ``derived`` follows the fallback (the quantized copy is derived from the live
policy); :meth:`history_params` adds the history arrays to derived params.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specrl.drafters.hooks import MixedDraft
from specrl.drafters.model_drafter import ModelDrafter
from specrl.drafters.suffix import SuffixDrafter

FALLBACKS = ('quantized',)  # ('eagle' when the learned head lands)


class HybridSuffixDrafter:
  """``suffix`` with a ``fallback`` model drafter for rows without a match (module doc)."""

  wants_context = True  # the suffix part drafts from the group's rows

  def __init__(self, suffix: SuffixDrafter, fallback: ModelDrafter):
    self.suffix, self.fallback = suffix, fallback
    self.name = f'suffix+{fallback.name}'
    self.vocab_size = suffix.vocab_size
    self.history = suffix.history

  @property
  def derived(self) -> bool:
    return self.fallback.derived

  @property
  def derive_in_train_step(self) -> bool:
    return bool(getattr(self.fallback, 'derive_in_train_step', False))

  # -- params and history (host side)

  def params_from_policy(self, policy_params):
    return {'fallback': self.fallback.params_from_policy(policy_params), 'history': None}

  def history_params(self, prompt_ids, width: int, draft_params=None):
    """``draft_params`` (the fallback's, as :meth:`params_from_policy` gives them; may be
    None: the engine then derives them, and the row drafts from its siblings only) with the
    history arrays of rows ``prompt_ids [B]`` added (None without history)."""
    if draft_params is None:
      return None
    return {**draft_params, 'history': self.suffix.history_params(prompt_ids, width)}

  def record(self, prompt_ids, responses, lengths) -> None:
    self.suffix.record(prompt_ids, responses, lengths)

  def memory_bytes(self) -> int:
    return self.suffix.memory_bytes()

  def host_state(self) -> dict:
    return self.suffix.host_state()

  def load_host_state(self, d: dict) -> None:
    self.suffix.load_host_state(d)

  # -- protocol

  def state_logical_axes(self):
    return self.fallback.state_logical_axes()

  def rollback(self, state, pos):
    return self.fallback.rollback(state, pos)

  def prefill(self, draft_params, prompt_tokens, prompt_len, buffer_len, mesh=None):
    return self.fallback.prefill(
      draft_params['fallback'], prompt_tokens, prompt_len, buffer_len, mesh=mesh
    )

  def init_shared(self, batch: int, seq_len: int):
    return self.suffix.init_shared(batch, seq_len)

  def shared_slot_axes(self):
    return self.suffix.shared_slot_axes()

  def observe(self, dp, shared, tokens, pos_before, pos_after, seq_id, group_ids, prompt_ids):
    return self.suffix.observe(
      None, shared, tokens, pos_before, pos_after, seq_id, group_ids, prompt_ids
    )

  def propose(
    self, draft_params, state, seq_tokens, pos, k, seeds, sp, mesh=None, policy_cache=None, ctx=None
  ):
    """Returns (draft_tokens [B, k]: the suffix draft on rows with a match (-1 where it
    ends), the fallback's elsewhere; ``MixedDraft(fallback logits [B, k, V], one_hot [B])``;
    the fallback's state; the policy cache)."""
    fb, dp = self.fallback, draft_params['fallback']
    sfx, _, _, _ = self.suffix.propose(
      draft_params['history'], None, seq_tokens, pos, k, seeds, sp, ctx=ctx
    )
    one_hot = sfx[:, 0] >= 0  # a suffix match of >= n_min tokens
    b = pos.shape[0]

    def drafted(cache):
      logit0, cache = fb.first_pass(dp, state, seq_tokens, pos, cache, window=k + 1, mesh=mesh)
      tokens, logits, cache = fb.extend(dp, cache, logit0, pos, k, seeds, sp, mesh=mesh)
      return tokens, logits.astype(jnp.float32), cache

    def caught_up(cache):  # every row matched: only keep the fallback's cache complete
      if not fb.share_kv:
        _, cache = fb.first_pass(dp, state, seq_tokens, pos, cache, window=k + 1, mesh=mesh)
      logits = jnp.zeros((b, k, self.vocab_size), jnp.float32)
      return jnp.zeros((b, k), jnp.int32), logits, cache

    cache0 = policy_cache if fb.share_kv else state['cache']
    fb_tokens, fb_logits, cache = jax.lax.cond(jnp.all(one_hot), caught_up, drafted, cache0)
    tokens = jnp.where(one_hot[:, None], sfx, fb_tokens)
    logits = MixedDraft(logits=fb_logits, one_hot=one_hot)
    # the fallback's drafts at pos + 1 .. pos + k - 1 count as fed only where it proposed
    # them (one-hot rows commit the suffix's tokens there; all rows one-hot: none written)
    fed = jnp.where(one_hot, pos + 1, pos + k)
    return (tokens, logits, *fb.wrap_cache(cache, policy_cache, fed))

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
    ctx=None,
    branch=None,
  ):
    """Draft trees (``rollout.tree_nodes``): the suffix part's trees; a row without a match
    gets an empty tree, i.e. its round samples the policy exactly as a plain step (the
    fallback's sampled drafts would need rejection sampling, which tree rounds do not run).
    The fallback's state is left as it is (it catches up when it next drafts)."""
    *tree, _ = self.suffix.propose_tree(
      draft_params['history'], None, seq_tokens, pos, n_nodes, depth_cap, seeds, sp, ctx=ctx,
      branch=branch,
    )  # fmt: skip
    return (*tree, state)

"""Drafters that run a transformer with :func:`specrl.model.forward`.

- ``self``: the policy drafts for itself (acceptance must be 1.0: an engine check).
- ``small_model``: a separate, smaller transformer sharing the tokenizer.

The drafter keeps its own position-indexed KV cache and a per-row counter ``fed`` (int32
[B]): the cache holds the committed token of every position ``< fed``. A round at ``pos``

1. catches up on positions ``fed .. pos - 2`` if any (:func:`specrl.drafters.catchup.
   catch_up`: passes of ``catchup_chunk`` positions; none in the steady state of
   speculative decoding, some after a plain phase of the adaptive engine, which never
   feeds the drafter);
2. feeds the two tokens at ``pos - 1`` and ``pos`` (a fixed window: when the previous round
   accepted all k drafts the drafter never saw the last one; re-writing an already-cached
   slot is harmless: same token, same position, same keys/values), whose last logits give
   draft 1;
3. drafts the other k - 1 autoregressively, writing slots ``pos + 1 .. pos + k - 1``, and
   returns ``fed = pos + k``: those slots hold its drafts, which are the committed tokens
   where they were accepted. The round's commit then calls :meth:`ModelDrafter.rollback`
   with the new ``pos``, which keeps ``fed = min(fed, pos)`` (a rejected draft's slot and
   everything after it are stale).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specrl import model as model_lib
from specrl import sampling
from specrl import sharding as shd
from specrl.drafters import catchup


class ModelDrafter:
  """A transformer drafter. ``own_params`` is used unless ``derive`` maps policy params.

  ``share_kv=True`` (only for drafters with the policy's architecture, e.g. the quantized
  self-drafter): the drafter reads the *policy's* KV cache for every committed position
  and writes its own k/v only at the k draft positions ``pos..pos+k-1`` of that same
  cache. No drafter prefill, no second cache, nothing to catch up. It is exact for the
  policy because the verify pass rewrites slots ``pos..pos+k`` with the policy's own k/v
  before attending, and slots beyond are masked; the drafter's queries attending to
  full-precision keys only changes acceptance, never the output distribution.

  ``catchup_chunk``: positions per catch-up pass (module docstring; own cache only).
  """

  def __init__(
    self,
    name: str,
    cfg: model_lib.ModelConfig,
    own_params=None,
    derive=None,
    share_kv: bool = False,
    derive_in_train_step: bool = False,
    catchup_chunk: int = catchup.CHUNK,
  ):
    if catchup_chunk < 1:
      raise ValueError(f'catchup_chunk must be >= 1, got {catchup_chunk}')
    self.name, self.cfg = name, cfg
    self.own_params, self.derive = own_params, derive
    self.share_kv = share_kv
    # the next rollout's params come out of the jitted GRPO step (hooks.derives_in_train_step)
    self.derive_in_train_step = derive_in_train_step and derive is not None
    self.catchup_chunk = catchup_chunk

  @property
  def derived(self) -> bool:
    return self.derive is not None

  def params_from_policy(self, policy_params):
    if self.derive is not None:
      return self.derive(policy_params)
    if self.own_params is None:
      raise ValueError(f'drafter {self.name!r} has no parameters')
    return self.own_params

  def state_logical_axes(self):
    if self.share_kv:
      return None
    return {'cache': model_lib.cache_logical_axes(), 'fed': ('batch',)}

  def prefill(self, draft_params, prompt_tokens, prompt_len, buffer_len, mesh=None):
    """The cache over ``prompt_tokens`` [B, P] (every slot ``< P`` written; the causal mask
    keeps slots ``< prompt_len`` exact whatever follows them) and ``fed = prompt_len``."""
    if self.share_kv:
      return None
    b, p = prompt_tokens.shape
    cache = model_lib.init_cache(self.cfg, b, buffer_len)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    _, cache = model_lib.forward(
      draft_params, self.cfg, prompt_tokens, positions, cache, mesh=mesh, rules=shd.DECODE_RULES
    )
    return {'cache': cache, 'fed': jnp.asarray(prompt_len, jnp.int32)}

  def rollback(self, state, pos):
    """After a round's commit (``pos`` [B]: the committed positions): of the drafts this
    drafter wrote past the round's ``pos``, only the committed ones count as fed."""
    if state is None:
      return None
    return {**state, 'fed': jnp.minimum(state['fed'], pos)}

  def _feed(self, draft_params, cache, seq_tokens, first, valid, mesh):
    """Feed the committed tokens at positions ``first[:, None] + j`` where ``valid`` [B, T]
    (the others are written out of range: dropped). No logits."""
    t, s = valid.shape[1], model_lib.cache_slots(cache)
    p = first[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    tok = jnp.take_along_axis(seq_tokens, jnp.clip(p, 0, seq_tokens.shape[1] - 1), axis=1)
    _, cache, _ = model_lib.forward(
      draft_params,
      self.cfg,
      tok,
      jnp.where(valid, p, s),
      cache,
      mesh=mesh,
      rules=shd.DECODE_RULES,
      head=False,
    )
    return cache

  def first_pass(
    self, draft_params, state, seq_tokens, pos, policy_cache=None, window=2, mesh=None
  ):
    """Bring the cache up to the current token and return its logits.

    Returns (logits of the current token [B, V], cache). Without ``share_kv``: catch up on
    positions ``fed .. pos - window`` (:mod:`specrl.drafters.catchup`), then feed the
    ``window`` positions ``pos - window + 1 .. pos`` (clipped at 0). The default 2 re-feeds
    ``pos - 1`` in case the last round's final draft was never fed; a caller whose rows may
    have committed tokens this drafter did not draft (the hybrid suffix drafter: up to
    ``k + 1`` of them) passes ``k + 1``, so one pass covers a round's worth of them and the
    catch-up loop only runs after plain phases. Re-writing a cached slot is harmless (same
    token, same position). With ``share_kv`` the policy cache holds every slot ``< pos``:
    only ``pos`` is fed.
    """
    if self.share_kv:
      first_pos = pos[:, None]
      cache = policy_cache
    else:

      def feed(cache, first, valid):
        return self._feed(draft_params, cache, seq_tokens, first, valid, mesh)

      upto = pos - (window - 1)
      cache, _ = catchup.catch_up(feed, state['cache'], state['fed'], upto, self.catchup_chunk)
      first_pos = jnp.maximum(pos[:, None] - jnp.arange(window - 1, -1, -1)[None, :], 0)
    first_tok = jnp.take_along_axis(seq_tokens, first_pos, axis=1)
    logits, cache = model_lib.forward(
      draft_params, self.cfg, first_tok, first_pos, cache, mesh=mesh, rules=shd.DECODE_RULES
    )
    return logits[:, -1], cache

  def extend(self, draft_params, cache, logit0, pos, k, seeds, sp, mesh=None):
    """Sample draft 0 from ``logit0`` [B, V] and k - 1 more autoregressively (fed at
    ``pos + 1 ..``). Returns (draft_tokens int32 [B, k], draft_logits [B, k, V], cache)."""
    cfg = self.cfg
    tok0 = sampling.sample_seeded(logit0, seeds, sp, row=0)

    def body(carry, i):
      cache, tok = carry
      lg, cache = model_lib.forward(
        draft_params,
        cfg,
        tok[:, None],
        (pos + i)[:, None],
        cache,
        mesh=mesh,
        rules=shd.DECODE_RULES,
      )
      nxt = sampling.sample_seeded(lg[:, 0], seeds, sp, row=i)
      return (cache, nxt), (nxt, lg[:, 0])

    if k == 1:
      return tok0[:, None], logit0[:, None], cache
    (cache, _), (toks, lgs) = jax.lax.scan(body, (cache, tok0), jnp.arange(1, k, dtype=jnp.int32))
    draft_tokens = jnp.concatenate([tok0[:, None], toks.T], axis=1)
    draft_logits = jnp.concatenate([logit0[:, None], jnp.swapaxes(lgs, 0, 1)], axis=1)
    return draft_tokens, draft_logits, cache

  def wrap_cache(self, cache, policy_cache, fed):
    """(draft state, policy cache) to return from ``propose`` given the cache written and
    ``fed`` [B] (own cache only: the cache holds the committed token of every slot
    ``< fed``, counting drafts written past ``pos`` until :meth:`rollback` trims them)."""
    if self.share_kv:
      return None, cache
    return {'cache': cache, 'fed': fed.astype(jnp.int32)}, policy_cache

  def propose(
    self, draft_params, state, seq_tokens, pos, k, seeds, sp, mesh=None, policy_cache=None
  ):
    logit0, cache = self.first_pass(draft_params, state, seq_tokens, pos, policy_cache, mesh=mesh)
    draft_tokens, draft_logits, cache = self.extend(
      draft_params, cache, logit0, pos, k, seeds, sp, mesh=mesh
    )
    # drafts 1..k-1 sit at pos + 1 .. pos + k - 1: fed, if committed (``rollback``)
    return (draft_tokens, draft_logits, *self.wrap_cache(cache, policy_cache, pos + k))

"""Drafters that run a transformer with :func:`specrl.model.forward`.

- ``self``: the policy drafts for itself (acceptance must be 1.0: an engine check).
- ``small_model``: a separate, smaller transformer sharing the tokenizer.

The drafter keeps its own position-indexed KV cache. Each round starts by feeding the
two tokens at ``pos - 1`` and ``pos``: when the previous round accepted all k drafts the
drafter never saw the last one, and re-writing an already-cached slot is harmless (same
token, same position, same keys/values), so one uniform T = 2 step covers both cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specrl import model as model_lib
from specrl import sampling
from specrl import sharding as shd


class ModelDrafter:
  """A transformer drafter. ``own_params`` is used unless ``derive`` maps policy params.

  ``share_kv=True`` (only for drafters with the policy's architecture, e.g. the quantized
  self-drafter): the drafter reads the *policy's* KV cache for every committed position
  and writes its own k/v only at the k draft positions ``pos..pos+k-1`` of that same
  cache. No drafter prefill, no second cache. It is exact for the policy because the
  verify pass rewrites slots ``pos..pos+k`` with the policy's own k/v before attending,
  and slots beyond are masked; the drafter's queries attending to full-precision keys
  only changes acceptance, never the output distribution.
  """

  def __init__(
    self,
    name: str,
    cfg: model_lib.ModelConfig,
    own_params=None,
    derive=None,
    share_kv: bool = False,
    derive_in_train_step: bool = False,
  ):
    self.name, self.cfg = name, cfg
    self.own_params, self.derive = own_params, derive
    self.share_kv = share_kv
    # the next rollout's params come out of the jitted GRPO step (hooks.derives_in_train_step)
    self.derive_in_train_step = derive_in_train_step and derive is not None

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
    return None if self.share_kv else {'cache': model_lib.cache_logical_axes()}

  def prefill(self, draft_params, prompt_tokens, prompt_len, buffer_len, mesh=None):
    if self.share_kv:
      return None
    b, p = prompt_tokens.shape
    cache = model_lib.init_cache(self.cfg, b, buffer_len)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    _, cache = model_lib.forward(
      draft_params, self.cfg, prompt_tokens, positions, cache, mesh=mesh, rules=shd.DECODE_RULES
    )
    return {'cache': cache}

  def first_pass(
    self, draft_params, state, seq_tokens, pos, policy_cache=None, refeed=2, mesh=None
  ):
    """Feed the committed tokens the drafter's cache may lack and the current one.

    Returns (logits of the current token [B, V], cache). Without ``share_kv`` the last
    ``refeed`` committed positions ``pos - refeed + 1 .. pos`` are fed (clipped at 0):
    the default 2 re-feeds ``pos - 1`` in case the last round's final draft was never fed;
    a caller whose rows may have committed tokens this drafter did not draft (the hybrid
    suffix drafter: up to ``k + 1`` of them) passes ``k + 1``, so the cache holds every
    committed token. Re-writing a cached slot is harmless (same token, same position).
    With ``share_kv`` the policy cache holds every slot ``< pos``: only ``pos`` is fed.
    """
    if self.share_kv:
      first_pos = pos[:, None]
      cache = policy_cache
    else:
      first_pos = jnp.maximum(pos[:, None] - jnp.arange(refeed - 1, -1, -1)[None, :], 0)
      cache = state['cache']
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

  def wrap_cache(self, cache, policy_cache):
    """(draft state, policy cache) to return from ``propose`` given the cache written."""
    return (None, cache) if self.share_kv else ({'cache': cache}, policy_cache)

  def propose(
    self, draft_params, state, seq_tokens, pos, k, seeds, sp, mesh=None, policy_cache=None
  ):
    logit0, cache = self.first_pass(draft_params, state, seq_tokens, pos, policy_cache, mesh=mesh)
    draft_tokens, draft_logits, cache = self.extend(
      draft_params, cache, logit0, pos, k, seeds, sp, mesh=mesh
    )
    return (draft_tokens, draft_logits, *self.wrap_cache(cache, policy_cache))

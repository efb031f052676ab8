"""One speculative decoding round inside the rollout's ``while_loop``.

Round at state (``pos`` = position of the last committed token ``c``, policy cache
holding slots ``< pos``):

1. the drafter proposes ``x_1..x_k`` with their (raw) logits, sampling from its own
   processed distribution ``q`` (:mod:`specrl.drafters`);
2. the policy runs *one* cache-extending forward pass over ``[c, x_1..x_k]`` at
   positions ``pos..pos+k``, giving ``p_1..p_{k+1}``;
3. :func:`specrl.verify.verify` accepts a prefix of ``n`` drafts by rejection sampling and
   emits ``n + 1`` tokens whose distribution is exactly the policy's;
4. :func:`specrl.rollout.commit` appends them (EOS / ``max_new_tokens`` / cache end cut
   the run). Cache slots of rejected drafts are stale but lie beyond the new ``pos``,
   where the position mask hides them until they are overwritten: rollback by position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl import sharding as shd
from specrl import verify as verify_lib


def round_seeds(rng: jax.Array, step: jax.Array, batch: int) -> jax.Array:
  """Per-sequence uint32 seeds for the verify PRNG of this round. [B]."""
  return jax.random.bits(jax.random.fold_in(rng, step), (batch,), jnp.uint32)


def speculative_step(
  params, draft_params, state: rollout_lib.RolloutState, *, cfg, rcfg, drafter, mesh=None
) -> rollout_lib.RolloutState:
  """One propose / verify / commit round (shapes static: k = rcfg.num_draft)."""
  k = rcfg.num_draft
  b = state.pos.shape[0]
  key = jax.random.fold_in(state.rng, state.step)
  draft_key, verify_key = jax.random.split(key)
  draft_tokens, draft_logits, draft_state, policy_cache = drafter.propose(
    draft_params,
    state.draft,
    state.tokens,
    state.pos,
    k,
    draft_key,
    rcfg.sampling,
    mesh=mesh,
    policy_cache=state.cache,
  )
  cur = rollout_lib.current_tokens(state)
  verify_tokens = jnp.concatenate([cur[:, None], draft_tokens], axis=1)  # [B, k+1]
  positions = state.pos[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
  target_logits, cache = model_lib.forward(
    params, cfg, verify_tokens, positions, policy_cache, mesh=mesh, rules=shd.DECODE_RULES
  )
  res = verify_lib.verify(
    target_logits,
    draft_logits,
    draft_tokens,
    round_seeds(verify_key, state.step, b),
    rcfg.sampling,
    impl=rcfg.verify_impl,
  )
  active = ~state.done
  state = state.replace(
    cache=cache,
    draft=draft_state,
    step=state.step + 1,
    num_rounds=state.num_rounds + active.astype(jnp.int32),
    num_accepted=state.num_accepted + jnp.where(active, res.num_accepted, 0),
  )
  return rollout_lib.commit(state, res.tokens, res.logprobs, res.num_accepted + 1, rcfg)

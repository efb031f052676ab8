"""The drafter protocol: what the speculative engine needs from any drafter.

A drafter is a bundle of pure functions with static configuration; its parameters and
state are pytrees passed through the jitted rollout (never closed over):

- ``params_from_policy(policy_params) -> draft_params``: derive drafter params from the
  *live* policy (identity for ``self``, quantization for ``quantized``, the drafter's own
  weights for ``small_model``). Called inside the jitted step where possible.
- ``prefill(draft_params, prompt_tokens [B,P], prompt_len [B], buffer_len, mesh) -> state``
- ``propose(draft_params, state, seq_tokens [B,S], pos [B], k, seeds, sampling, mesh,
  policy_cache) -> (draft_tokens int32 [B,k], draft_logits f32 [B,k,V], state,
  policy_cache)``: proposals x_1..x_k
  sampled from the drafter's *processed* distribution (same temperature/top-k/top-p as
  the policy; see :mod:`specrl.sampling`), continuing after ``seq_tokens[b, pos[b]]``.
  ``seeds`` int32 [B]: this round's per-sequence seeds; draw draft i with
  ``sampling.sample_seeded(logits, seeds, sp, row=i)`` so a row's proposals do not depend
  on its place in the batch (compaction, resume; :mod:`specrl.prng`).
  ``draft_logits`` are raw logits; verification processes them exactly as sampling did.
  ``policy_cache`` is returned unchanged unless the drafter shares the policy's KV cache
  (then it may write only at the draft positions ``pos..pos+k-1``, which verification
  rewrites).
- ``state_logical_axes()``: logical axes of the state pytree, for sharding.
- ``derived``: True when ``params_from_policy`` computes the draft params from the policy
  params (run inside jit, policy params as arguments); False when it returns the
  drafter's own params (or None), which engines then pass to jitted steps as arguments --
  never closed over as compile-time constants.

Rollback is by position: the engine passes the committed ``pos`` every round and a
drafter must not assume its previous proposals were accepted.
"""

from __future__ import annotations

from typing import Any, Protocol


class Drafter(Protocol):
  name: str
  derived: bool

  def params_from_policy(self, policy_params) -> Any: ...

  def prefill(self, draft_params, prompt_tokens, prompt_len, buffer_len, mesh=None) -> Any: ...

  def propose(
    self, draft_params, state, seq_tokens, pos, k, seeds, sp, mesh=None, policy_cache=None
  ): ...

  def state_logical_axes(self) -> Any: ...

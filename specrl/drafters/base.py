"""The drafter protocol: what the speculative engine needs from any drafter.

A drafter is a bundle of pure functions with static configuration; its parameters and
state are pytrees passed through the jitted rollout (never closed over):

- ``params_from_policy(policy_params) -> draft_params``: derive drafter params from the
  *live* policy (identity for ``self``, quantization for ``quantized``, the drafter's own
  weights for ``small_model``). Called inside the jitted step where possible.
- ``prefill(draft_params, prompt_tokens [B,P], prompt_len [B], buffer_len, mesh) -> state``
  ``buffer_len``: the slots of its position-indexed leaves (those whose logical axes name
  ``'cache_seq'``: a KV cache), the policy cache's -- with ``rollout.grow_kv`` a length
  bucket, not the budget. The engines zero-pad them as the policy cache grows and a decode
  loop carries them cut to its bucket (:func:`specrl.decoding.state.window_slots`), so a
  drafter must read and write them only below the positions a round may touch (writes
  past them are dropped, as on the policy's cache).
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
- ``one_hot = True`` (optional; deterministic drafters: ``ngram``, ``suffix``): ``propose``
  returns ``draft_logits = None`` and the round verifies by the token-only path
  (:func:`specrl.decoding.verify.verify_tokens`: no ``[B, k, V]`` draft logits, no sort of
  them); ``draft_tokens[b, i] < 0`` marks draft i (and every later one) as not proposed,
  so a row may get fewer than k drafts, or none (it then samples the policy as a plain
  step does, and only proposed drafts count in the acceptance statistics).
- ``state_logical_axes()``: logical axes of the state pytree, for sharding.
- ``derived``: True when ``params_from_policy`` computes the draft params from the policy
  params (run inside jit, policy params as arguments); False when it returns the
  drafter's own params (or None), which engines then pass to jitted steps as arguments --
  never closed over as compile-time constants.

Rollback is by position: the engine passes the committed ``pos`` every round and a
drafter must not assume its previous proposals were accepted.

A drafter's own state is fed only inside speculative rounds: the adaptive engine's plain
phases (and a hybrid's one-hot rounds, or a shorter window after k shrinks) commit tokens it
never saw, so a drafter that keeps a position-indexed state must catch up on them itself
when it next proposes, from a per-row "fed up to" counter in its state
(:mod:`specrl.drafters.catchup`; the model drafters and ``eagle`` do). Plain steps never
run the drafter.

Optional parts (:mod:`specrl.drafters.hooks`; checked at trace time, so a drafter without
them traces exactly what it would without them: no extra state, outputs or work):

- Row ids. Every row has ``seq_id`` (its row in the batch ``generate`` was called with;
  it moves with the row when the adaptive engine compacts, and is ``B_orig`` on a padding
  row of a compacted batch), ``group_ids`` (rows that share a prompt, e.g. GRPO's G
  generations; default each row its own group) and ``prompt_ids`` (a stable id of the
  prompt across RL steps; default -1 = unknown), all int32 [B]; both engines take the
  last two as ``generate(..., group_ids=, prompt_ids=)``.
- ``wants_context = True``: ``propose`` gets a keyword ``ctx``
  (:class:`~specrl.drafters.hooks.DraftContext`: the row ids, the shared state, the hidden
  states). Drafters without it are called exactly as above. ``ctx`` is None outside a
  rollout (the step-cost profiler, benchmarks).
- ``init_shared(batch, seq_len) -> pytree``: state that is *not* compacted, built at the
  prefill: leaves ``[B_orig, ...]`` whose leading axis has logical name ``'rows'`` (in no
  sharding rule: replicated), so every row of the original batch -- finished rows
  included -- stays visible to every row. Index it with ``seq_id``; write with
  ``mode='drop'`` (padding rows carry ``B_orig``). It reaches ``propose`` as
  ``ctx.shared`` and is only updated by ``observe``; ``engine.last_draft_shared`` holds it
  after a rollout. ``seq_len``: committed positions are ``< seq_len``.
- ``rollback(state, pos [B]) -> state``: called after every speculative round's commit with
  the committed ``pos`` (not after plain steps). A drafter whose ``propose`` counts the
  drafts it wrote into its own state as fed (they are the committed tokens where accepted)
  trims that count here: the model drafters keep ``fed = min(fed, pos)``.
- ``observe(draft_params, shared, tokens [B,S], pos_before [B], pos_after [B], seq_id,
  group_ids, prompt_ids) -> shared``: called after every commit -- the prefill's first
  token, every plain step (also in the adaptive engine's plain chunks and the static
  engine's plain decoding) and every speculative round. Row b committed
  ``tokens[b, pos_before[b] + 1 : pos_after[b] + 1]`` (none when equal: a finished or
  padding row); after the prefill ``pos_before = prompt_len - 1``, so the prompt is
  ``tokens[b, :pos_before[b] + 1]``. ``draft_params`` may be None (the adaptive engine
  does not derive the drafter's params for plain chunks).
- ``wants_hidden = True`` (implies ``wants_context``): the policy's passes (prefill, plain
  step, verify) also return the final-norm hidden state, kept as ``ctx.hidden [B, W, D]``
  (W = ``rcfg.draft_width + 1``, the compute dtype) with ``ctx.hidden_from [B]``:
  ``hidden[b, j]`` is the hidden state at position ``hidden_from[b] + j``, valid for
  ``j < pos[b] - hidden_from[b]`` -- the committed positions fed by the last pass (a plain
  step: ``pos - 1``; a verify pass: ``c, x_1..x_n`` of the committed ones; the prefill: the
  prompt's last ``min(L, W)`` positions). The token at ``pos`` has not been fed: its hidden
  state comes with the next pass. A row that was done during the last pass has none valid.
  The adaptive engine's lazy drafter prefill (:meth:`prefill` over committed tokens) gets
  no hidden states.
- ``hidden_history = True`` (with ``wants_hidden``): ``ctx.hidden`` is ``[B, S, D]`` by
  position with ``hidden_from = 0`` (S: the slots of the length bucket the decode loop runs
  in -- it grows with the policy cache, :func:`specrl.decoding.state.grow_cache`, and every
  committed position below ``pos`` lies in it) -- the same contract with W = S: every committed
  position ``< pos`` is valid, so a drafter can catch up on positions it has not consumed
  (the prompt, plain phases of the adaptive engine) without an extra policy forward.
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


class TreeDrafter(Protocol):
  """A drafter that proposes draft trees (``rollout.tree_nodes``, adaptive tree arms):
  ``propose_tree(...) -> (tokens, parents, depth int32 [B, n_nodes], state)``, node 0 the
  root, parents before children, empty nodes token -1 (:mod:`specrl.decoding.tree`). The
  tree must be a deterministic function of the drafter's inputs (it is verified by
  sample-and-compare). ``depth_cap`` (None = ``n_nodes - 1``) and, passed only when set
  (``rollout.tree_branch`` / a tree arm's branch), ``branch``: at most that many children per
  node -- a builder that takes no ``branch`` keyword is refused then, naming the drafter.

  A drafter whose ``samples_tree_children`` is true instead has its trees drawn at T > 0:
  ``propose_sampled_tree(...) -> (tokens, parents, depth, draft_logits [B, N, R], draft_ids
  [R] | None, state)``, row u of ``draft_logits`` the distribution node u was drawn from
  (its parent's), siblings in draw order, verified by recursive rejection sampling
  (:mod:`specrl.kernels.verify_sampled_tree_reference`, which says what a builder must
  respect)."""

  def propose_tree(
    self, draft_params, state, seq_tokens, pos, n_nodes, depth_cap, seeds, sp, mesh=None, **kw
  ): ...

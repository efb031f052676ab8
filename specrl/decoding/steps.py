"""Prefill, the plain step, the speculative round, and the one step chooser.

Both engines decode with :func:`decode_step`: the static engine inside one
``lax.while_loop`` (:func:`decode`) with ``k = rcfg.num_draft``, the adaptive engine in
chunks whose k its policy picks. ``k`` is static (a Python int): one compile per k.

A speculative round at state (``pos`` = position of the last committed token ``c``, policy
cache holding slots ``< pos``):

1. the drafter proposes ``x_1..x_k`` with their (raw) logits, sampling from its own
   processed distribution ``q`` (:mod:`specrl.drafters`);
2. the policy runs *one* cache-extending forward pass over ``[c, x_1..x_k]`` at
   positions ``pos..pos+k``, giving ``p_1..p_{k+1}``;
3. :func:`specrl.decoding.verify.verify` accepts a prefix of ``n`` drafts by rejection
   sampling and emits ``n + 1`` tokens whose distribution is exactly the policy's;
4. :func:`specrl.decoding.state.commit` appends them (EOS / ``max_new_tokens`` / cache end
   cut the run). Cache slots of rejected drafts are stale but lie beyond the new ``pos``,
   where the position mask hides them until they are overwritten: rollback by position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specrl import model as model_lib
from specrl import prng, sampling
from specrl import sharding as shd
from specrl.decoding import tree as tree_lib
from specrl.decoding import verify as verify_lib
from specrl.decoding.state import (
  RolloutConfig,
  RolloutState,
  attend_buckets,
  bucket_for,
  commit,
  count_acceptance,
  current_tokens,
  kv_slots,
  put_slots,
  slots_needed,
  window_slots,
)
from specrl.drafters import hooks


def prefill_cache_slots(rcfg: RolloutConfig, buffer_len: int | None = None) -> int:
  """The policy KV slots an engine's prefill allocates: the length bucket of the prompt
  buffer with ``rcfg.grow_kv`` (:func:`specrl.decoding.state.kv_slots`), else the buffer."""
  return kv_slots(rcfg, buffer_len or rcfg.buffer_len, rcfg.max_prompt_len)


def prefill(
  params,
  prompt_tokens,
  prompt_len,
  rng,
  *,
  cfg: model_lib.ModelConfig,
  rcfg: RolloutConfig,
  mesh=None,
  drafter=None,
  draft_params=None,
  buffer_len: int | None = None,
  group_ids=None,
  prompt_ids=None,
  build_draft: bool = True,
  cache_slots: int | None = None,
) -> RolloutState:
  """Prefill the policy (and drafter) caches and commit the first sampled token.

  prompt_tokens: int32 [B, P] right-padded (P = rcfg.max_prompt_len); prompt_len [B].
  ``buffer_len`` (default ``rcfg.buffer_len``): slots of the buffer and caches; the
  adaptive engine starts narrow (``rcfg.seq_len``) and widens when it first speculates.
  ``cache_slots`` (default ``buffer_len``): slots of the policy KV cache, and of the
  drafter's position-indexed state (its KV cache, the hidden history); the engines pass the
  prompt's length bucket with ``rcfg.grow_kv`` (:func:`prefill_cache_slots`) and grow them
  together between loops (:func:`specrl.decoding.state.grow_cache`).
  ``group_ids`` / ``prompt_ids`` int32 [B] (default: each row its own group; -1 = unknown
  prompt). ``build_draft=False``: the drafter's optional hooks (shared state, hidden states,
  ``observe``; :mod:`specrl.drafters.hooks`) are set up but not its own state (the adaptive
  engine builds that lazily).
  """
  b, p = prompt_tokens.shape
  s = buffer_len or rcfg.buffer_len
  rules = shd.DECODE_RULES
  cache = model_lib.init_cache(cfg, b, cache_slots or s)
  cache = jax.tree.map(
    lambda x, ax: shd.constrain(x, ax, mesh, rules),
    cache,
    model_lib.cache_logical_axes(),
    is_leaf=lambda t: isinstance(t, tuple),
  )
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits, cache, *hidden = model_lib.forward(
    params,
    cfg,
    prompt_tokens,
    positions,
    cache,
    mesh=mesh,
    rules=rules,
    return_hidden=hooks.wants_hidden(drafter),
    logits_at=prompt_len - 1,  # the last prompt token's logits only
    # the prompt's slots, not the budget (attend_bucket = 0: the dense reference)
    attend_len=bucket_for(attend_buckets(rcfg, s), p) if rcfg.attend_bucket else None,
  )
  last = logits[:, 0]
  seed = prng.rollout_seed(rng)
  seq_id = jnp.arange(b, dtype=jnp.int32)
  seeds = prng.event_seeds(seed, seq_id, prompt_len - 1, prng.STREAM_PLAIN)
  tok = sampling.sample_seeded(last, seeds, rcfg.sampling)
  lp = sampling.token_logprobs(last, tok, rcfg.sampling)
  tokens = jnp.full((b, s), rcfg.pad_id, jnp.int32).at[:, :p].set(prompt_tokens)
  # the drafter's position-indexed state (its KV cache, the hidden history) starts as wide
  # as the policy cache and grows with it (decoding.state.grow_cache)
  slots = cache_slots or s
  draft_state = None
  if drafter is not None and build_draft:
    draft_state = drafter.prefill(draft_params, prompt_tokens, prompt_len, slots, mesh=mesh)
  zeros = jnp.zeros((b,), jnp.int32)
  kw = jnp.zeros((b, max(rcfg.draft_width, 1)), jnp.int32)
  state = RolloutState(
    tokens=tokens,
    logprobs=jnp.zeros((b, s), jnp.float32),
    pos=prompt_len - 1,
    prompt_len=prompt_len,
    num_generated=zeros,
    done=jnp.zeros((b,), bool),
    finish=zeros,
    cache=cache,
    draft=draft_state,
    seq_id=seq_id,
    seed=seed,
    step=jnp.zeros((), jnp.int32),
    num_rounds=zeros,
    num_accepted=zeros,
    num_drafted=zeros,
    reached=kw,
    accepted_at=kw,
    tree_stats=jnp.zeros((b, 3), jnp.int32) if rcfg.tree_nodes else None,
  )
  state = hooks.start(drafter, state, group_ids, prompt_ids, rcfg.seq_len)
  if hidden:
    width = hooks.hidden_width(drafter, rcfg.draft_width + 1, slots)
    state = state.replace(hidden_history=hooks.keeps_history(drafter))
    state = hooks.record_prefill_hidden(state, hidden[0], prompt_len, width)
  state = commit(state, tok[:, None], lp[:, None], jnp.ones((b,), jnp.int32), rcfg)
  return hooks.observe(drafter, draft_params, state, prompt_len - 1)


def plain_step(
  params,
  state: RolloutState,
  *,
  cfg,
  rcfg: RolloutConfig,
  mesh=None,
  drafter=None,
  draft_params=None,
  attend_len: int | None = None,
):
  """One autoregressive step: feed the current token, sample the next. A drafter is only
  told what was committed and given the hidden state, if it asks (``drafters.hooks``).
  ``attend_len`` (static): attend to the first ``attend_len`` cache slots only (every
  active row's ``pos < attend_len``; None = the whole buffer)."""
  cur = current_tokens(state)
  logits, cache, *hidden = model_lib.forward(
    params,
    cfg,
    cur[:, None],
    state.pos[:, None],
    state.cache,
    mesh=mesh,
    rules=shd.DECODE_RULES,
    return_hidden=hooks.wants_hidden(drafter),
    attend_len=attend_len,
  )
  seeds = prng.event_seeds(state.seed, state.seq_id, state.pos, prng.STREAM_PLAIN)
  tok = sampling.sample_seeded(logits[:, 0], seeds, rcfg.sampling)
  lp = sampling.token_logprobs(logits[:, 0], tok, rcfg.sampling)
  state = state.replace(cache=cache, step=state.step + 1)
  new = commit(state, tok[:, None], lp[:, None], jnp.ones_like(state.pos), rcfg)
  return hooks.after_commit(drafter, draft_params, new, state.pos, hidden)


def speculative_round(
  params,
  draft_params,
  state: RolloutState,
  k: int,
  *,
  cfg,
  rcfg,
  drafter,
  mesh=None,
  attend_len: int | None = None,
) -> RolloutState:
  """One propose / verify / commit round with ``k`` drafts (static). ``attend_len``: the
  verify pass attends to that many cache slots (every active row's ``pos + k <
  attend_len``); the drafter's own passes are its business."""
  draft_seeds = prng.event_seeds(state.seed, state.seq_id, state.pos, prng.STREAM_DRAFT)
  draft_tokens, draft_logits, draft_state, policy_cache = drafter.propose(
    draft_params,
    state.draft,
    hooks.proposal_text(drafter, state, attend_len),
    state.pos,
    k,
    draft_seeds,
    rcfg.sampling,
    mesh=mesh,
    policy_cache=state.cache,
    **hooks.propose_kwargs(drafter, state),
  )
  cur = current_tokens(state)
  # A one-hot drafter (``draft_logits is None``, or a ``MixedDraft``'s one-hot rows) marks
  # drafts it did not propose with -1: the pass feeds the current token there (any token
  # would do: nothing after the row's last proposal can be accepted) and verification
  # skips them.
  fed = jnp.where(draft_tokens >= 0, draft_tokens, cur[:, None])
  verify_tokens = jnp.concatenate([cur[:, None], fed], axis=1)  # [B, k+1]
  positions = state.pos[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
  target_logits, cache, *hidden = model_lib.forward(
    params,
    cfg,
    verify_tokens,
    positions,
    policy_cache,
    mesh=mesh,
    rules=shd.DECODE_RULES,
    return_hidden=hooks.wants_hidden(drafter),
    attend_len=attend_len,
  )
  verify_seeds = prng.event_seeds(state.seed, state.seq_id, state.pos, prng.STREAM_VERIFY)
  if draft_logits is None:  # deterministic drafter: token-only verification
    res = verify_lib.verify_tokens(
      target_logits, draft_tokens, verify_seeds, rcfg.sampling, impl=rcfg.verify_impl
    )
    proposed = jnp.sum(jnp.cumprod(draft_tokens >= 0, axis=1), axis=1).astype(jnp.int32)
  elif isinstance(draft_logits, hooks.MixedDraft):  # per row: one-hot or sampled drafts
    res = verify_lib.verify_mixed(
      target_logits, draft_logits.logits, draft_tokens, draft_logits.one_hot, verify_seeds,
      rcfg.sampling, impl=rcfg.verify_impl,
    )  # fmt: skip
    n_onehot = jnp.sum(jnp.cumprod(draft_tokens >= 0, axis=1), axis=1).astype(jnp.int32)
    proposed = jnp.where(draft_logits.one_hot, n_onehot, k)
  else:
    res = verify_lib.verify(
      target_logits, draft_logits, draft_tokens, verify_seeds, rcfg.sampling,
      impl=rcfg.verify_impl,
    )  # fmt: skip
    proposed = None
  before = state
  state = state.replace(cache=cache, draft=draft_state, step=state.step + 1)
  state = commit(state, res.tokens, res.logprobs, res.num_accepted + 1, rcfg)
  state = state.replace(draft=hooks.rollback(drafter, state.draft, state.pos))
  state = hooks.after_commit(drafter, draft_params, state, before.pos, hidden)
  return count_acceptance(state, before, res.num_accepted, k, proposed)


def decode_step(
  params,
  draft_params,
  state: RolloutState,
  k: int,
  *,
  cfg,
  rcfg,
  drafter=None,
  mesh=None,
  attend_len: int | None = None,
) -> RolloutState:
  """The step chooser both engines use: plain for ``k == 0``, else a speculative round
  with ``k`` drafts (``k <= rcfg.draft_width``, the buffer's scratch). A plain step uses the
  drafter only for its optional hooks (observe, hidden states), at no cost without them.
  ``attend_len`` (static): the policy attends to the first ``attend_len`` cache slots only;
  the caller keeps :func:`slots_needed` ``<= attend_len`` (None = the whole buffer)."""
  if k == 0:
    return plain_step(
      params, state, cfg=cfg, rcfg=rcfg, mesh=mesh, drafter=drafter,
      draft_params=draft_params, attend_len=attend_len,
    )  # fmt: skip
  if drafter is None:
    raise ValueError(f'a speculative step (k={k}) needs a drafter')
  if k > rcfg.draft_width:
    raise ValueError(f'k={k} exceeds the buffer scratch laid out for {rcfg.draft_width}')
  if rcfg.tree_nodes:  # draft trees: a tree round of k + 1 nodes, sample-and-compare
    return tree_lib.tree_round(
      params, draft_params, state, k + 1, cfg=cfg, rcfg=rcfg, drafter=drafter, mesh=mesh,
      attend_len=attend_len,
    )  # fmt: skip
  return speculative_round(
    params, draft_params, state, k, cfg=cfg, rcfg=rcfg, drafter=drafter, mesh=mesh,
    attend_len=attend_len,
  )  # fmt: skip


def fuse_default() -> bool:
  """Whether a decode loop fuses its matmuls by default (:func:`loop_params`), per backend:
  on accelerators (GPU / TPU), where every matmul is a kernel launch with a fixed cost (on
  an H200 ~2.4 ms of the 3.5 ms Qwen2.5-1.5B step is not weight reading), yes; on CPU no:
  there a matmul costs no launch, and on the 2-core Xeon the fused SmolLM2-135M step
  measured the same as the separate one within noise (``bench/fused_step.py``,
  docs/benchmarks.md), so the CPU path stays the one every test and CPU run has used."""
  return jax.default_backend() != 'cpu'


def fuse_setting(rcfg: RolloutConfig) -> bool | None:
  """``rollout.fuse_matmuls`` as :func:`loop_params`' ``fuse``: 'auto' -> None (the
  backend's default, :func:`fuse_default`), 'on' -> True, 'off' -> False."""
  return {'auto': None, 'on': True, 'off': False}[rcfg.fuse_matmuls]


def loop_params(params, unroll_layers: bool | None = None, fuse: bool | None = None, mesh=None):
  """The policy params a decode loop runs on: with ``unroll_layers`` (default: on the CPU
  backend) the layers sliced once (:func:`specrl.model.unstack_layers`; XLA:CPU otherwise
  copies every layer's weights out of the stacked arrays in every step), else ``params``;
  with ``fuse`` (default :func:`fuse_default`; ``rollout.fuse_matmuls``,
  :func:`fuse_setting`) each layer's q/k/v and gate/up weights concatenated once
  (:func:`specrl.model.fuse_layers`: one matmul each per step where there were three and
  two; same math). Fused arrays are placed by their logical axes under
  :data:`specrl.sharding.PARAM_RULES` on ``mesh`` (the parts' own axes: kv heads, MLP
  columns). ``fuse=False`` leaves already fused params as they are. The stored params are
  never changed: this is a derived copy (fusing costs one copy of those weights).
  Idempotent. The adaptive engine calls it once per rollout (jitted, :data:`loop_params_jit`),
  not once per chunk: the slicing copies every weight (~0.2 s for SmolLM2-135M on CPU)."""
  if unroll_layers is None:
    unroll_layers = jax.default_backend() == 'cpu'
  if fuse is None:
    fuse = fuse_default()
  if fuse not in (True, False):  # e.g. 'off', which is truthy: refuse, never guess
    raise ValueError(
      f"loop_params' fuse must be True, False or None (rollout.fuse_matmuls 'on' | 'off' | "
      f"'auto': steps.fuse_setting), got {fuse!r}"
    )
  if fuse and not model_lib.is_fused(params):
    params = model_lib.fuse_layers(params)  # stacked: one concatenation per kind
    params = _place_fused(params, mesh)
  return model_lib.unstack_layers(params) if unroll_layers else params


def _place_fused(params, mesh):
  """The fused layer weights constrained to their logical axes' shardings (PARAM_RULES)."""
  if mesh is None or mesh.size == 1:
    return params
  layers = params['layers']
  stacked = not isinstance(layers, tuple | list)

  def place(lp):
    return {
      n: shd.constrain(a, model_lib.layer_logical_axes(n, stacked), mesh, shd.PARAM_RULES)
      if n in ('wqkv', 'bqkv', 'w_gate_up')
      else a
      for n, a in lp.items()
    }

  return {**params, 'layers': place(layers) if stacked else tuple(place(lp) for lp in layers)}


loop_params_jit = jax.jit(loop_params, static_argnums=(1, 2, 3))


def max_loop_steps(rcfg: RolloutConfig) -> int:
  return rcfg.max_steps or rcfg.max_new_tokens + 1


def decode(
  params,
  state: RolloutState,
  k: int,
  *,
  cfg,
  rcfg: RolloutConfig,
  mesh=None,
  drafter=None,
  draft_params=None,
  min_active=0,
  max_steps=None,
  limit: int | None = None,
  unroll_layers: bool | None = None,
  attend_len: int | None = None,
  shared_len: int | None = None,
  fuse: bool | None = None,
) -> tuple[RolloutState, jax.Array]:
  """Run :func:`decode_step` with ``k`` drafts in a ``lax.while_loop`` until every sequence
  is done, the active count drops to ``min_active`` (compaction), ``max_steps`` rounds ran
  (a chunk), or the global step reaches ``limit`` (default :func:`max_loop_steps`).
  ``min_active`` / ``max_steps`` may be traced int32 scalars. Returns (state, rounds run).

  ``unroll_layers`` (default: on the CPU backend) runs the policy's layers unrolled over
  per-layer weights sliced once before the loop (:func:`specrl.model.unstack_layers`):
  XLA:CPU otherwise copies every layer's weights out of the stacked arrays in every step.
  Same math, same tokens (:func:`loop_params`; already unstacked params pass as they are).
  ``fuse`` (default: ``rcfg.fuse_matmuls``, :func:`fuse_setting`): the q/k/v and gate/up
  matmuls fused (:func:`loop_params`; already fused params pass as they are).

  ``attend_len`` (static; a length bucket, :func:`specrl.decoding.state.attend_buckets`):
  the loop carries only the first ``attend_len`` slots of the policy cache (sliced once
  before it, put back in place once after it), so every step is the plain dense step over
  an ``attend_len``-slot cache -- no per-step work or copy grows with the buffer -- and it
  stops before a step whose active rows would need more (:func:`slots_needed`); the caller
  then moves on to a larger bucket. At the buffer length, or None: the whole cache, no such
  stop (the dense reference). The drafter's position-indexed state -- its own KV cache, the
  hidden history (:func:`specrl.decoding.state.window_slots`) -- is carried cut to the same
  window, so its per-round work follows the live length too.

  ``shared_len`` (static; None = as it is): the drafter's shared corpus by position
  (``shared_slot_axes``, :func:`specrl.drafters.hooks.windows_shared`) is carried cut to its
  first ``shared_len`` slots: the caller passes a length bucket that holds every position
  any row committed, finished rows included, and ``>= attend_len``."""
  limit = max_loop_steps(rcfg) if limit is None else limit
  if fuse is None:
    fuse = fuse_setting(rcfg)
  params = loop_params(params, unroll_layers, fuse, mesh)  # sliced once, not in every step
  bounded = attend_len is not None and attend_len < state.tokens.shape[1]
  full = state
  # the live window; done rows' writes past it are dropped (never read again)
  state = window_slots(state, attend_len if bounded else None, drafter, shared_len)

  def cond(c):
    s, i = c
    go = (jnp.sum(~s.done) > min_active) & (s.step < limit)
    if bounded:
      go &= slots_needed(s, k) <= attend_len
    return go if max_steps is None else go & (i < max_steps)

  def body(c):
    s, i = c
    s = decode_step(params, draft_params, s, k, cfg=cfg, rcfg=rcfg, drafter=drafter, mesh=mesh)
    return s, i + 1

  state, n = jax.lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))
  return put_slots(full, state, drafter), n

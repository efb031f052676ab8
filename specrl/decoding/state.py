"""Rollout config, decode-loop state and :func:`commit`.

Layout. A sequence's tokens live in a buffer ``tokens [B, S]`` indexed by position;
the prompt occupies ``0..L-1`` (right-padded prompt batch), generated tokens follow. The
state invariant, for plain and speculative decoding alike:

  ``pos[b]`` is the position of the last committed token ``tokens[b, pos[b]]``; the
  policy KV cache holds every slot ``< pos[b]``; that token is fed at the next step.

:func:`commit` appends ``count[b]`` new tokens per sequence after ``pos[b]``, cutting at
EOS, ``max_new_tokens`` and the cache end -- the one place finish rules live, so plain
decoding (1 token per step) and speculative decoding (``n + 1`` per verify pass) cannot
disagree about them.

Draft length. ``RolloutConfig.num_draft`` is the static engine's k (0 = plain). The buffer's
scratch (the ``k + 1`` slots a verify pass writes past ``seq_len``) is laid out for
``draft_width = max(num_draft, max_draft)``: the adaptive engine sets ``max_draft`` to the
largest of its arms and runs chunks of any ``k <= max_draft`` on the same buffer.

Row ids and drafter extras. Every row carries ``seq_id`` / ``group_ids`` / ``prompt_ids``
(compacted with the row); a drafter may keep a shared state over the original batch
(``draft_shared``, logical axis ``'rows'``: never compacted) and ask for the policy's hidden
states (``hidden``/``hidden_from``). The contract is in :mod:`specrl.drafters.base`; the
fields are None unless a drafter asks for them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from specrl import model as model_lib
from specrl import sampling
from specrl.drafters import hooks

FINISH_NONE, FINISH_EOS, FINISH_LENGTH, FINISH_CACHE = 0, 1, 2, 3
FINISH_NAMES = {
  FINISH_NONE: 'none',
  FINISH_EOS: 'eos',
  FINISH_LENGTH: 'length',
  FINISH_CACHE: 'cache',
}


FUSE_MATMULS = ('auto', 'on', 'off')


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static rollout settings (hashable)."""

  max_new_tokens: int = 64
  max_prompt_len: int = 32
  cache_len: int = 0  # 0 = max_prompt_len + max_new_tokens (+ draft scratch)
  sampling: sampling.SamplingParams = sampling.SamplingParams()
  eos_id: int = 2
  # more ids that end a response (e.g. Qwen's <|endoftext|> next to the chat's <|im_end|>):
  # the tokenizer's eos_ids other than eos_id
  extra_eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  num_draft: int = 0  # k of the static engine; 0 = plain decoding
  max_draft: int = 0  # scratch laid out for this k too (adaptive engine: its largest arm)
  verify_impl: str = 'jnp'
  max_steps: int = 0  # safety cap on loop iterations; 0 = derived
  # smallest length bucket of decode attention (:func:`attend_buckets`): a step attends to
  # the slots of the smallest power-of-two multiple of this that holds every live row; 0 =
  # every step attends to the whole buffer (the dense reference)
  attend_bucket: int = 256
  # the policy's KV cache holds only the slots of the length bucket in use and grows
  # (doubling, between loops / chunks) as rows get longer (:func:`kv_slots`); False: the
  # whole buffer from the start. Needs attend_bucket > 0 (no buckets: nothing to grow by)
  grow_kv: bool = True
  # draft trees (:mod:`specrl.decoding.tree`): nodes per verify pass, root included (0 =
  # chains: rejection sampling as before); with trees every speculative step with k drafts
  # is a tree round of k + 1 nodes verified by sample-and-compare (one-hot drafters only)
  tree_nodes: int = 0
  tree_depth: int = 0  # depth cap of a drafter's tree builder (0 = tree_nodes - 1)
  tree_branch: int = 0  # children per node of a drafter's tree builder (0 = no cap)
  # the decode loops' per-layer q/k/v and gate/up matmuls fused into one each
  # (:func:`specrl.decoding.steps.loop_params`): 'on' | 'off' | 'auto' (the backend's
  # default, :func:`specrl.decoding.steps.fuse_default`)
  fuse_matmuls: str = 'auto'

  def __post_init__(self):
    if self.fuse_matmuls not in FUSE_MATMULS:
      raise ValueError(
        f'rollout.fuse_matmuls must be one of {FUSE_MATMULS}, got {self.fuse_matmuls!r}'
      )
    if self.max_new_tokens < 1:
      raise ValueError(f'rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}')
    if self.max_prompt_len < 1:
      raise ValueError(f'rollout.max_prompt_len must be >= 1, got {self.max_prompt_len}')
    if self.num_draft < 0 or self.max_draft < 0:
      raise ValueError(
        f'rollout.num_draft and max_draft must be >= 0, got {self.num_draft}, {self.max_draft}'
      )
    if self.verify_impl not in ('jnp', 'pallas'):
      raise ValueError(f"rollout.verify_impl must be 'jnp' or 'pallas', got {self.verify_impl!r}")
    if self.attend_bucket < 0:
      raise ValueError(f'rollout.attend_bucket must be >= 0, got {self.attend_bucket}')
    if self.tree_nodes < 0 or self.tree_nodes == 1:
      raise ValueError(
        f'rollout.tree_nodes must be 0 (chains) or >= 2 (root + drafts), got {self.tree_nodes}'
      )
    if self.tree_depth < 0 or (self.tree_nodes and self.tree_depth > self.tree_nodes - 1):
      raise ValueError(
        f'rollout.tree_depth must be in [0, tree_nodes - 1 = {max(self.tree_nodes - 1, 0)}] '
        f'(0 = no cap), got {self.tree_depth}'
      )
    if self.tree_depth and not self.tree_nodes:
      raise ValueError('rollout.tree_depth needs rollout.tree_nodes >= 2 (it caps tree depth)')
    if self.tree_branch < 0:
      raise ValueError(f'rollout.tree_branch must be >= 0 (0 = no cap), got {self.tree_branch}')
    if self.tree_branch and not self.tree_nodes:
      raise ValueError('rollout.tree_branch needs rollout.tree_nodes >= 2 (it caps children)')
    if self.tree_nodes and self.num_draft not in (0, self.tree_nodes - 1):
      raise ValueError(
        f'rollout.num_draft={self.num_draft} conflicts with rollout.tree_nodes='
        f'{self.tree_nodes} (a tree round verifies tree_nodes - 1 = {self.tree_nodes - 1} '
        'drafts per pass): leave num_draft at 0'
      )
    if self.cache_len and self.cache_len <= self.max_prompt_len:
      raise ValueError(
        f'rollout.cache_len ({self.cache_len}) must exceed rollout.max_prompt_len '
        f'({self.max_prompt_len}) to leave room for generation'
      )

  @property
  def seq_len(self) -> int:
    """Committed-token capacity per sequence (buffer positions that can be committed)."""
    return self.cache_len or (self.max_prompt_len + self.max_new_tokens)

  @property
  def draft_width(self) -> int:
    """The largest k a state of this config can run (scratch and acceptance counters)."""
    return max(self.num_draft, self.max_draft, self.tree_nodes - 1)

  @property
  def buffer_len(self) -> int:
    """Cache/buffer slots: capacity plus scratch for the k + 1 speculative positions."""
    w = self.draft_width
    return self.seq_len + (w + 1 if w else 0)


def attend_buckets(rcfg: RolloutConfig, buffer_len: int | None = None) -> tuple[int, ...]:
  """The length buckets of decode attention over a buffer of ``buffer_len`` slots (default
  ``rcfg.buffer_len``), ascending: ``attend_bucket * 2**i`` below the buffer, then the
  buffer itself. A step whose live rows need at most ``a`` slots (:func:`slots_needed`)
  attends to the first ``a`` only, so it costs the live length, not the budget; each
  bucket is one compiled variant, at most ``log2(buffer / attend_bucket) + 2`` of them.
  ``attend_bucket = 0``: the buffer alone (the dense reference)."""
  s = buffer_len or rcfg.buffer_len
  out, a = [], rcfg.attend_bucket
  while a and a < s:
    out.append(a)
    a *= 2
  return (*out, s)


def bucket_for(buckets: tuple[int, ...], need: int) -> int:
  """The smallest of ``buckets`` (ascending) holding ``need`` slots (else the largest)."""
  for a in buckets:
    if need <= a:
      return a
  return buckets[-1]


def kv_slots(rcfg: RolloutConfig, buffer_len: int, need: int) -> int:
  """Slots the policy KV cache must hold for a loop whose rows need ``need`` slots: the
  length bucket of ``need`` with ``rcfg.grow_kv`` (memory that grows with use), else the
  whole ``buffer_len``. A loop at bucket ``a`` stops before any row needs more than ``a``
  slots (``decoding.steps.decode``), so every K/V write lands inside the cache."""
  if not (rcfg.grow_kv and rcfg.attend_bucket):
    return buffer_len
  return bucket_for(attend_buckets(rcfg, buffer_len), need)


def _resize(x: jax.Array, ax: int, n: int, fill=0) -> jax.Array:
  """``x`` with axis ``ax`` cut or padded (with ``fill``) to ``n``."""
  have = x.shape[ax]
  if n == have:
    return x
  if n < have:
    return jax.lax.slice_in_dim(x, 0, n, axis=ax)
  widths = [(0, 0)] * x.ndim
  widths[ax] = (0, n - have)
  return jnp.pad(x, widths, constant_values=jnp.asarray(fill, x.dtype))


def _slot_axes(state: RolloutState, drafter=None) -> dict:
  """The state's position-indexed per-row fields and the slot axis of each leaf (-1: none):
  the policy KV cache, the drafter's own state (its leaves with a ``'cache_seq'`` logical
  axis, e.g. a drafter's or the eagle head's KV cache) and the hidden history
  (``hidden_history``: ``[B, S, D]`` by position). The three follow the length buckets
  together (:func:`grow_cache`, :func:`window_slots`)."""
  out = {}
  if state.cache is not None:
    out['cache'] = jax.tree.map(lambda _: model_lib.CACHE_SLOT_AXIS, state.cache)
  axes = None if drafter is None or state.draft is None else drafter.state_logical_axes()
  if axes is not None:
    out['draft'] = jax.tree.map(
      lambda t: t.index('cache_seq') if 'cache_seq' in t else -1,
      axes,
      is_leaf=lambda t: isinstance(t, tuple),
    )
  if state.hidden is not None and hooks.is_history(state):
    out['hidden'] = 1
  return out


def _shared_axes(state: RolloutState, drafter=None):
  """Slot axes of the drafter's shared state (``shared_slot_axes``: its corpus of committed
  text by position), or None for drafters that declare none."""
  if state.draft_shared is None or not hooks.windows_shared(drafter):
    return None
  return drafter.shared_slot_axes()


def grow_cache(state: RolloutState, slots: int, drafter=None) -> RolloutState:
  """The state with its policy KV cache ``[L, B, K, S, Dh]`` zero-padded to ``slots``
  slots (``>= S``), and with ``drafter``: its own KV cache and the hidden history too
  (:func:`_slot_axes`; a drafter's state follows the live length as the policy's does).
  Slots past the live length are never read (attention masks by position, the hidden
  history is read below ``pos``), so padding with zeros is exact."""
  upd = {}
  for name, axes in _slot_axes(state, drafter).items():
    grow = lambda ax, x: x if ax < 0 or x.shape[ax] >= slots else _resize(x, ax, slots)  # noqa: E731
    upd[name] = jax.tree.map(grow, axes, getattr(state, name))
  return state.replace(**upd)


def window_slots(
  state: RolloutState, slots: int | None, drafter=None, shared_slots: int | None = None
) -> RolloutState:
  """The state a decode loop at length bucket ``slots`` carries: every position-indexed
  leaf (:func:`_slot_axes`) cut to its first ``slots`` slots, and the drafter's shared
  corpus (``shared_slot_axes``) to its first ``shared_slots`` (None: as they are). Exact for
  a loop that stops before any active row needs more than ``slots`` slots, with
  ``shared_slots`` covering every position any row -- finished ones too -- committed: what
  lies past them is never read (nor, for the corpus, written: it is empty there)."""
  upd = {}
  if slots is not None:
    for name, axes in _slot_axes(state, drafter).items():
      cut = lambda ax, x: x if ax < 0 or x.shape[ax] <= slots else _resize(x, ax, slots)  # noqa: E731
      upd[name] = jax.tree.map(cut, axes, getattr(state, name))
  axes = _shared_axes(state, drafter)
  if shared_slots is not None and axes is not None:
    cut = lambda ax, x: x if ax < 0 or x.shape[ax] <= shared_slots else _resize(x, ax, shared_slots)  # noqa: E731
    upd['draft_shared'] = jax.tree.map(cut, axes, state.draft_shared)
  return state.replace(**upd)


def put_slots(full: RolloutState, window: RolloutState, drafter=None) -> RolloutState:
  """``window`` (a :func:`window_slots` of ``full`` after a loop) with its cut leaves put
  back in place into ``full``'s (a dynamic-update-slice each: in place on a donated
  buffer); the slots past the window keep ``full``'s."""

  def put(ax, f, w):
    if ax < 0 or f.shape[ax] == w.shape[ax]:
      return w
    return jax.lax.dynamic_update_slice(f, w.astype(f.dtype), (0,) * f.ndim)

  upd = {}
  for name, axes in _slot_axes(window, drafter).items():
    upd[name] = jax.tree.map(put, axes, getattr(full, name), getattr(window, name))
  axes = _shared_axes(window, drafter)
  if axes is not None:
    upd['draft_shared'] = jax.tree.map(put, axes, full.draft_shared, window.draft_shared)
  return window.replace(**upd)


def draft_bytes_per_slot(state: RolloutState, drafter=None) -> int:
  """Bytes per (row, slot) of the drafter's position-indexed state: its own KV cache and
  the hidden history (0 for drafters without them)."""
  parts = _slot_axes(state, drafter)
  total = 0
  for name in ('draft', 'hidden'):
    if name not in parts:
      continue
    for ax, x in zip(
      jax.tree.leaves(parts[name]), jax.tree.leaves(getattr(state, name)), strict=True
    ):
      if ax >= 0:
        total += int(x.size // (x.shape[ax] * state.pos.shape[0])) * x.dtype.itemsize
  return total


def draft_slots(state: RolloutState, drafter=None) -> int:
  """Slots the drafter's position-indexed state holds now (0: none)."""
  parts = _slot_axes(state, drafter)
  for name in ('draft', 'hidden'):
    for ax, x in zip(
      jax.tree.leaves(parts.get(name, ())), jax.tree.leaves(getattr(state, name)), strict=False
    ):
      if ax >= 0:
        return int(x.shape[ax])
  return 0


def kv_bytes_per_slot(state: RolloutState) -> int:
  """Bytes of the policy KV cache per (row, slot): all layers, K and V."""
  return sum(
    int(c.size // (c.shape[1] * c.shape[model_lib.CACHE_SLOT_AXIS])) * c.dtype.itemsize
    for c in jax.tree.leaves(state.cache)
  )


def slots_needed(state: RolloutState, k: int) -> jax.Array:
  """int32 []: slots the next step with ``k`` drafts reads for the active rows -- its
  queries sit at ``pos .. pos + k`` and see the slots up to themselves. 0 when none is
  active (done rows' outputs are discarded, so they need nothing)."""
  live = jnp.where(state.done, 0, state.pos + k + 1)
  return jnp.max(live).astype(jnp.int32)


@flax.struct.dataclass
class RolloutState:
  """Decode-loop carry. B = batch, S = buffer slots, K = ``rcfg.draft_width`` (>= 1)."""

  tokens: jax.Array  # int32 [B, S] prompt + committed tokens, by position
  logprobs: jax.Array  # f32 [B, S] reported logprob of the token at each position
  pos: jax.Array  # int32 [B] position of the last committed token
  prompt_len: jax.Array  # int32 [B]
  num_generated: jax.Array  # int32 [B]
  done: jax.Array  # bool [B]
  finish: jax.Array  # int32 [B] FINISH_*
  cache: dict  # policy KV cache {'k','v'}: [L, B, K, S, Dh]
  draft: Any  # drafter state pytree (None for plain decoding)
  seq_id: jax.Array  # int32 [B] row in the original batch (moves with the row on compaction)
  seed: jax.Array  # int32 [] rollout seed: every draw is keyed by (seed, seq_id, pos)
  step: jax.Array  # int32 [] loop iterations so far
  # speculative statistics, per sequence (see specrl.decoding.spec_math for alpha)
  num_rounds: jax.Array  # int32 [B] verify passes while active
  num_accepted: jax.Array  # int32 [B] accepted drafts that were committed
  num_drafted: jax.Array  # int32 [B] drafts proposed to the row while active
  reached: jax.Array  # int32 [B, K] rounds where draft i was proposed, drafts < i accepted
  accepted_at: jax.Array  # int32 [B, K] rounds where draft i was accepted and committed
  # Row ids and the drafter's optional extras (:mod:`specrl.drafters.hooks`); set by prefill.
  group_ids: Any = None  # int32 [B] rows that share a prompt
  prompt_ids: Any = None  # int32 [B] stable prompt id across RL steps (-1 = unknown)
  draft_shared: Any = None  # drafter state NOT compacted: leaves [B_orig, ...] ('rows')
  hidden: Any = None  # [B, W, D] policy hidden states at positions hidden_from + j ...
  # (by position, hidden_from = 0, for a drafter with ``hidden_history``: W = the policy
  # cache's slots, grown with it; every position < pos)
  hidden_from: Any = None  # int32 [B] ... valid for j < pos - hidden_from (W = K + 1)
  # tree rounds only (``rcfg.tree_nodes``): int32 [B, 3] nodes proposed, descents into a
  # non-first child, walks that accepted down to a leaf (bonus token)
  tree_stats: Any = None
  # static: ``hidden`` is the by-position history (``hidden_history`` drafters), whatever its
  # width (it follows the length buckets, like the policy cache); else the last pass's window
  hidden_history: bool = flax.struct.field(pytree_node=False, default=False)


TREE_STATS = ('nodes', 'non_first', 'leaf')


@flax.struct.dataclass
class RolloutOutput:
  """What a rollout returns. N = max_new_tokens.

  ``tokens`` is the full buffer (prompt + response, by position) for training;
  ``response``/``response_logprobs`` are right-padded per-sequence responses.
  """

  tokens: jax.Array  # int32 [B, S]
  logprobs: jax.Array  # f32 [B, S]
  prompt_len: jax.Array  # int32 [B]
  response: jax.Array  # int32 [B, N]
  response_logprobs: jax.Array  # f32 [B, N]
  length: jax.Array  # int32 [B]
  finish: jax.Array  # int32 [B]
  num_rounds: jax.Array  # int32 [B]
  num_accepted: jax.Array  # int32 [B]
  num_drafted: jax.Array  # int32 [B]
  reached: jax.Array  # int32 [B, K]
  accepted_at: jax.Array  # int32 [B, K]
  tree_stats: Any = None  # int32 [B, 3] (RolloutState.tree_stats) or None


# RolloutState fields that a RolloutOutput is made of (with a batch axis).
OUTPUT_FIELDS = (
  'tokens',
  'logprobs',
  'pos',
  'prompt_len',
  'num_generated',
  'done',
  'finish',
  'num_rounds',
  'num_accepted',
  'num_drafted',
  'reached',
  'accepted_at',
)


def state_logical_axes(draft_axes=None, like: RolloutState | None = None) -> RolloutState:
  """Logical axes of every state leaf (``sharding.DECODE_RULES`` maps them to the mesh).

  ``like``: a (possibly abstract) state whose optional leaves -- the drafter's shared state
  and hidden states -- get axes only where it has them (None: it has none)."""
  b, bs, bk = ('batch',), ('batch', 'cache_seq'), ('batch', None)
  shared = None if like is None else like.draft_shared
  has_hidden = like is not None and like.hidden is not None
  return RolloutState(
    tokens=bs,
    logprobs=bs,
    pos=b,
    prompt_len=b,
    num_generated=b,
    done=b,
    finish=b,
    cache=model_lib.cache_logical_axes(),
    draft=draft_axes,
    seq_id=b,
    seed=(),
    step=(),
    num_rounds=b,
    num_accepted=b,
    num_drafted=b,
    reached=bk,
    accepted_at=bk,
    group_ids=b,
    prompt_ids=b,
    draft_shared=None if shared is None else hooks.shared_logical_axes(shared),
    hidden=hooks.hidden_axes(like) if has_hidden else None,
    hidden_from=b if has_hidden else None,
    tree_stats=bk if like is not None and like.tree_stats is not None else None,
    hidden_history=like is not None and like.hidden_history,
  )


def commit(state: RolloutState, new_tokens, new_logprobs, count, rcfg: RolloutConfig):
  """Append up to ``count[b]`` tokens of ``new_tokens [B, M]`` after ``pos[b]``.

  Cuts at the first EOS (kept), at ``max_new_tokens`` and at the buffer capacity; done
  sequences take nothing. Returns the new state.
  """
  b, m = new_tokens.shape
  active = ~state.done
  room_new = rcfg.max_new_tokens - state.num_generated
  room_cache = rcfg.seq_len - 1 - state.pos
  take = jnp.minimum(jnp.minimum(count, room_new), room_cache)
  take = jnp.where(active, jnp.maximum(take, 0), 0)
  j = jnp.arange(m)[None, :]
  is_eos = new_tokens == rcfg.eos_id
  for e in rcfg.extra_eos_ids:
    is_eos |= new_tokens == e
  is_eos &= j < take[:, None]
  first_eos = jnp.argmax(is_eos, axis=1)
  has_eos = jnp.any(is_eos, axis=1)
  take = jnp.where(has_eos, first_eos + 1, take)
  valid = j < take[:, None]
  write_pos = jnp.where(valid, state.pos[:, None] + 1 + j, state.tokens.shape[1])  # OOB: dropped
  bidx = jnp.arange(b)[:, None]
  tokens = state.tokens.at[bidx, write_pos].set(new_tokens.astype(jnp.int32), mode='drop')
  logprobs = state.logprobs.at[bidx, write_pos].set(new_logprobs, mode='drop')
  num_generated = state.num_generated + take
  pos = state.pos + take
  hit_len = num_generated >= rcfg.max_new_tokens
  hit_cache = pos >= rcfg.seq_len - 1
  finish = jnp.where(
    active & has_eos,
    FINISH_EOS,
    jnp.where(
      active & hit_len, FINISH_LENGTH, jnp.where(active & hit_cache, FINISH_CACHE, state.finish)
    ),
  )
  done = state.done | (active & (has_eos | hit_len | hit_cache))
  return state.replace(
    tokens=tokens,
    logprobs=logprobs,
    pos=pos,
    num_generated=num_generated,
    done=done,
    finish=finish.astype(jnp.int32),
  )


def count_acceptance(
  state: RolloutState, before: RolloutState, n, k: int, proposed=None
) -> RolloutState:
  """Add one round's acceptance counters (``spec_math``'s definitions): drafts proposed to
  active rows, and per position the rounds that reached / committed-accepted it.
  ``proposed`` int32 [B]: drafts each row was proposed (one-hot drafters may propose fewer
  than ``k``, or none); None = ``k``."""
  active = ~before.done
  take = state.num_generated - before.num_generated  # tokens committed this round
  n_committed = jnp.where(active, jnp.minimum(n, take), 0)  # accepted drafts the row got
  i = jnp.arange(state.reached.shape[1])[None, :]
  m = jnp.full_like(n, k) if proposed is None else proposed
  on = active[:, None] & (i < m[:, None])
  reached = on & (i <= n_committed[:, None])
  accepted = on & (i < n_committed[:, None])
  return state.replace(
    num_rounds=state.num_rounds + active.astype(jnp.int32),
    num_accepted=state.num_accepted + n_committed,
    num_drafted=state.num_drafted + m * active.astype(jnp.int32),
    reached=state.reached + reached.astype(jnp.int32),
    accepted_at=state.accepted_at + accepted.astype(jnp.int32),
  )


def current_tokens(state: RolloutState) -> jax.Array:
  """The last committed token of each sequence, int32 [B]."""
  return jnp.take_along_axis(state.tokens, state.pos[:, None], axis=1)[:, 0]


def finalize(state: RolloutState, rcfg: RolloutConfig) -> RolloutOutput:
  """Gather right-padded responses out of the position-indexed buffer."""
  n = rcfg.max_new_tokens
  idx = state.prompt_len[:, None] + jnp.arange(n)[None, :]
  valid = jnp.arange(n)[None, :] < state.num_generated[:, None]
  idx = jnp.minimum(idx, state.tokens.shape[1] - 1)
  resp = jnp.where(valid, jnp.take_along_axis(state.tokens, idx, axis=1), rcfg.pad_id)
  resp_lp = jnp.where(valid, jnp.take_along_axis(state.logprobs, idx, axis=1), 0.0)
  return RolloutOutput(
    tokens=state.tokens,
    logprobs=state.logprobs,
    prompt_len=state.prompt_len,
    response=resp,
    response_logprobs=resp_lp,
    length=state.num_generated,
    finish=state.finish,
    num_rounds=state.num_rounds,
    num_accepted=state.num_accepted,
    num_drafted=state.num_drafted,
    reached=state.reached,
    accepted_at=state.accepted_at,
    tree_stats=state.tree_stats,
  )

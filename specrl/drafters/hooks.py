"""The optional parts of the drafter protocol, and the helpers the decoding core calls them by.

Every part here is opt-in: the core checks for it in Python, at trace time, so a drafter
that defines none of them traces exactly what it traced before (no extra state, outputs or
work). See :mod:`specrl.drafters.base` for the contract of each part:

- ``wants_context = True``: ``propose`` also gets ``ctx=``:class:`DraftContext` (row ids,
  the drafter's shared state, the policy's hidden states);
- ``wants_hidden = True``: the policy passes return their last hidden state and the state
  keeps it (``RolloutState.hidden``); implies ``wants_context``;
- ``hidden_history = True`` (with ``wants_hidden``): keep the hidden state of *every*
  committed position, not only the last pass's (``hidden [B, S, D]`` by position,
  ``hidden_from = 0``), for drafters that consume features they may have missed (plain
  phases, the prompt);
- ``init_shared(batch, seq_len) -> pytree``: state that is *not* compacted, leaves
  ``[B_orig, ...]`` (logical axis ``'rows'``), indexed by ``seq_id``;
- ``shared_slot_axes() -> pytree`` (with ``init_shared``): the shared leaves by position
  (e.g. the suffix corpus), which a decode loop then carries cut to a length bucket that
  holds every committed position (:func:`windows_shared`);
- ``observe(draft_params, shared, tokens, pos_before, pos_after, seq_id, group_ids,
  prompt_ids) -> shared``: called after every commit, plain steps included;
- ``rollback(state, pos) -> state``: called after every speculative round's commit with the
  committed ``pos``, so a drafter that counts the drafts it wrote into its own state as fed
  (:mod:`specrl.drafters.model_drafter`) keeps only the committed ones.

Train-time parts, asked by the train loop (end of this module): ``derive_in_train_step``
(draft params re-derived inside the jitted GRPO step), :class:`PromptHistory` (drafts from
earlier answers), ``host_state`` / ``load_host_state`` (host state in checkpoints:
:class:`specrl.checkpointing.HostState`) and
:class:`TrainsOnline` (a :class:`DrafterTrainer` with device state in ``TrainState.drafter``).

The helpers take the decode-loop state duck-typed (fields ``pos``, ``tokens``, ``seq_id``,
``group_ids``, ``prompt_ids``, ``draft_shared``, ``hidden``, ``hidden_from``), so this
module imports nothing from :mod:`specrl.decoding` (no import circle).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import flax
import jax
import jax.numpy as jnp

ROWS = 'rows'  # logical axis of the original batch (shared drafter state: never compacted)
HIDDEN_AXES = ('batch', None, 'embed')  # RolloutState.hidden [B, W, D]
HISTORY_AXES = ('batch', 'cache_seq', 'embed')  # ... [B, S, D] by position (hidden_history)


@flax.struct.dataclass
class DraftContext:
  """What ``propose(..., ctx=)`` sees besides the tokens. B = the (possibly compacted)
  batch, B_orig = the batch ``generate`` was called with, W = ``rcfg.draft_width + 1``."""

  seq_id: jax.Array  # int32 [B] row of the original batch; B_orig marks a padding row
  group_ids: jax.Array  # int32 [B] rows with the same id share a prompt (GRPO's G samples)
  prompt_ids: jax.Array  # int32 [B] stable id of the prompt across RL steps; -1 = unknown
  shared: Any  # the drafter's ``init_shared`` pytree, leaves [B_orig, ...]; or None
  hidden: Any  # [B, W, D] policy's final-norm hidden states (``wants_hidden``); or None
  hidden_from: Any  # int32 [B] position of hidden[:, 0]; valid j < pos - hidden_from


@flax.struct.dataclass
class MixedDraft:
  """The ``draft_logits`` of a drafter whose rows come from two kinds of proposal (the
  hybrid suffix drafter): ``one_hot[b]`` rows are deterministic drafts (token-only
  verification, ``draft_tokens < 0`` = not proposed), the others were sampled from
  ``logits[b]`` (general verification). Each row is verified by exactly its own path
  (:func:`specrl.decoding.verify.verify_mixed`)."""

  logits: jax.Array  # [B, k, V] raw draft logits (ignored on one-hot rows)
  one_hot: jax.Array  # bool [B]


def wants_hidden(drafter) -> bool:
  return drafter is not None and bool(getattr(drafter, 'wants_hidden', False))


def wants_context(drafter) -> bool:
  return drafter is not None and (
    bool(getattr(drafter, 'wants_context', False)) or wants_hidden(drafter)
  )


def keeps_history(drafter) -> bool:
  """True for a drafter that wants the hidden state of every committed position."""
  return wants_hidden(drafter) and bool(getattr(drafter, 'hidden_history', False))


def hidden_width(drafter, window: int, buffer_len: int) -> int:
  """Width of ``RolloutState.hidden``: ``buffer_len`` (by position; the engines pass the
  policy cache's slots, which grow with the length buckets) for a drafter that keeps the
  history, else ``window`` (the last pass's positions)."""
  return buffer_len if keeps_history(drafter) else window


def is_history(state) -> bool:
  """``state.hidden`` is position-indexed (``RolloutState.hidden_history``, set by the
  prefill for a drafter that keeps the history; its width follows the length buckets)."""
  return bool(getattr(state, 'hidden_history', False))


def hidden_axes(state):
  """Logical axes of ``state.hidden``: buffer slots are ``'cache_seq'`` in the history
  layout (widened and compacted with the caches)."""
  return HISTORY_AXES if is_history(state) else HIDDEN_AXES


def observes(drafter) -> bool:
  return drafter is not None and hasattr(drafter, 'observe')


def init_shared(drafter, batch: int, seq_len: int):
  """The drafter's uncompacted state for a batch of ``batch`` rows, or None."""
  if drafter is None or not hasattr(drafter, 'init_shared'):
    return None
  return drafter.init_shared(batch, seq_len)


def windows_shared(drafter) -> bool:
  """The drafter's shared state has leaves by position (``shared_slot_axes() -> pytree``
  of the slot axis of each shared leaf, -1 = none; e.g. the suffix corpus ``[B, seq_len]``):
  a decode loop then carries only the first ``w`` slots of them, ``w`` a length bucket
  holding every position any row committed (:func:`specrl.decoding.state.window_slots`),
  so a lookup over the corpus costs the live length, not the budget. The drafter must
  read and write nothing past the committed positions there."""
  return drafter is not None and hasattr(drafter, 'shared_slot_axes')


def shared_logical_axes(shared) -> Any:
  """Logical axes of a shared pytree: ``'rows'`` on the leading axis, nothing else named
  (``'rows'`` is in no rule table, so the shared state is replicated on every device and
  compaction, which moves ``'batch'`` axes only, leaves it alone)."""
  return jax.tree.map(lambda x: (ROWS,) + (None,) * (x.ndim - 1), shared)


def start(drafter, state, group_ids, prompt_ids, seq_len: int):
  """Set the row ids (``seq_id`` = row index; ``group_ids`` default: each row its own group;
  ``prompt_ids`` default -1) and the drafter's shared state on a freshly built state."""
  b = state.pos.shape[0]
  seq_id = jnp.arange(b, dtype=jnp.int32)
  group_ids = seq_id if group_ids is None else jnp.asarray(group_ids, jnp.int32)
  prompt_ids = jnp.full((b,), -1, jnp.int32) if prompt_ids is None else prompt_ids
  return state.replace(
    seq_id=seq_id,
    group_ids=group_ids,
    prompt_ids=jnp.asarray(prompt_ids, jnp.int32),
    draft_shared=init_shared(drafter, b, seq_len),
  )


def context(state) -> DraftContext:
  """The :class:`DraftContext` of a decode-loop state."""
  return DraftContext(
    seq_id=state.seq_id,
    group_ids=state.group_ids,
    prompt_ids=state.prompt_ids,
    shared=state.draft_shared,
    hidden=state.hidden,
    hidden_from=state.hidden_from,
  )


def proposal_text(drafter, state, attend_len: int | None):
  """The committed text ``[B, S]`` a proposal reads: cut to the loop's length bucket
  (``attend_len``, which holds every active row's committed positions) for a drafter that
  declares ``scans_text = True`` (it scans its row's whole text every round, e.g. ngram's
  match search: that scan must follow the live length, not the budget); the whole buffer
  otherwise (drafters that index it by position, or size scratch by its width)."""
  if attend_len is None or not getattr(drafter, 'scans_text', False):
    return state.tokens
  return state.tokens[:, :attend_len]


def propose_kwargs(drafter, state) -> dict:
  """Extra keyword arguments for ``drafter.propose``: ``ctx`` for drafters that want it."""
  return {'ctx': context(state)} if wants_context(drafter) else {}


def observe(drafter, draft_params, state, pos_before: jax.Array):
  """Tell an observing drafter what was committed since ``pos_before`` [B] (the state
  after the commit); the state unchanged for other drafters."""
  if not observes(drafter):
    return state
  shared = drafter.observe(
    draft_params,
    state.draft_shared,
    state.tokens,
    pos_before,
    state.pos,
    state.seq_id,
    state.group_ids,
    state.prompt_ids,
  )
  return state.replace(draft_shared=shared)


def rollback(drafter, draft_state, pos: jax.Array):
  """The drafter's state after a speculative round committed up to ``pos`` [B] (its
  ``rollback``; the state unchanged for drafters without one)."""
  if drafter is None or not hasattr(drafter, 'rollback'):
    return draft_state
  return drafter.rollback(draft_state, pos)


def record_hidden(state, hidden: jax.Array, first_pos: jax.Array):
  """Keep a pass's hidden states ``[B, T, D]`` (T <= W) fed at positions ``first_pos + j``.

  Only the committed positions are valid afterwards: the pass fed the committed token at
  ``first_pos`` and the drafts after it, of which exactly those at positions ``< pos`` (the
  new position of the last committed token, itself not fed yet) were committed.
  """
  b, t, _ = hidden.shape
  w = state.hidden.shape[1]
  if is_history(state):  # by position: write the pass's slots, keep every other one
    slots = first_pos[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :]
    h = state.hidden.at[jnp.arange(b)[:, None], slots].set(
      hidden.astype(state.hidden.dtype), mode='drop'
    )
    return state.replace(hidden=h)
  if t > w:
    raise ValueError(f'a pass of {t} positions does not fit hidden width {w}')
  h = jnp.pad(hidden.astype(state.hidden.dtype), ((0, 0), (0, w - t), (0, 0)))
  return state.replace(hidden=h, hidden_from=first_pos.astype(jnp.int32))


def record_prefill_hidden(state, hidden: jax.Array, prompt_len: jax.Array, width: int):
  """Start ``state.hidden [B, W=width, D]`` from the prompt pass's hidden states ``[B, P, D]``:
  its last W committed positions ``max(L - W, 0) .. L - 1`` (L = ``prompt_len``; the first
  sampled token then sits at ``pos = L``, not fed yet). Slots past L - 1 are not valid.
  With ``state.hidden_history`` (W = the policy cache's slots) this is the by-position
  layout."""
  w = width
  first = jnp.maximum(prompt_len - w, 0)
  idx = jnp.minimum(first[:, None] + jnp.arange(w)[None, :], hidden.shape[1] - 1)
  h = jnp.take_along_axis(hidden, idx[:, :, None], axis=1)
  return state.replace(hidden=h, hidden_from=first.astype(jnp.int32))


def after_commit(drafter, draft_params, state, pos_before: jax.Array, hidden: list):
  """After a pass committed (``pos_before`` [B]: positions fed first; ``hidden``: the pass's
  ``[hidden [B, T, D]]`` if it returned one, else ``[]``): keep the hidden states, observe."""
  if hidden:
    state = record_hidden(state, hidden[0], pos_before)
  return observe(drafter, draft_params, state, pos_before)


# ------------------------------------------------------------------- train-time capabilities
# What the train loop may ask of a drafter. Declared by the drafter (an attribute, or the
# methods of a protocol below), never recognised by its name.


def derives_in_train_step(drafter) -> bool:
  """``derive_in_train_step = True``: the next rollout's draft params are a function of
  the policy's (``params_from_policy``) computed inside the jitted GRPO step from the new
  params, so the drafter never drifts (the quantized copy; the hybrid with a quantized
  fallback). ``derived`` alone (``self``) only says the params come from the policy: the
  engines derive those themselves, nothing is computed in the train step."""
  return drafter is not None and bool(getattr(drafter, 'derive_in_train_step', False))


@runtime_checkable
class PromptHistory(Protocol):
  """Drafts from earlier answers to the same prompt id (``suffix`` with ``history``)."""

  def history_params(self, prompt_ids, width: int, draft_params=None):
    """The rollout's draft params with the stored answers of rows ``prompt_ids [B]``."""

  def record(self, prompt_ids, responses, lengths) -> None:
    """Store a rollout's answers ``responses [B, N]`` (first ``lengths [B]`` tokens)."""

  def memory_bytes(self) -> int:
    """Bytes held (logged as ``spec/history_bytes``)."""


@runtime_checkable
class DrafterTrainer(Protocol):
  """Trains a drafter alongside the policy (the eagle head's :class:`HeadTrainer`).

  Its device state lives in ``TrainState.drafter`` (saved and restored by orbax with the
  train state); host state, if it also has :class:`specrl.checkpointing.HostState`'s
  methods, is saved under ``name``.
  The loop calls, in this order: :meth:`init_state` once, before any restore;
  :meth:`wrap_grpo` once, when the jitted steps are built; every step :meth:`before_step`,
  the (wrapped) GRPO step, then :meth:`after_step` with the new state.
  """

  name: str  # the host state's item name in checkpoints

  def init_state(self, mesh) -> Any:
    """The initial ``TrainState.drafter`` pytree, placed on ``mesh``."""

  def before_step(self, exp, state, step: int):
    """Work before loop step ``step`` (e.g. a warm-up); returns the train state."""

  def wrap_grpo(self, exp, step_fn, grpo, state_sh, batch_sh):
    """The GRPO function with the drafter's update in it: ``fn(state, batch) -> (state,
    metrics, draft_params)``, like ``grpo``; ``step_fn`` is the unjitted GRPO step."""

  def after_step(self, state) -> None:
    """Follow the state after a step (the step donated the previous drafter arrays)."""


@runtime_checkable
class TrainsOnline(Protocol):
  """A drafter with a :class:`DrafterTrainer`."""

  def make_trainer(self, exp) -> DrafterTrainer | None:
    """The run's trainer (the same object for the same drafter), or None (e.g. a mode
    that does not train)."""


def make_trainer(drafter, exp) -> DrafterTrainer | None:
  """``drafter``'s trainer for the run ``exp``, or None."""
  return drafter.make_trainer(exp) if isinstance(drafter, TrainsOnline) else None

"""Device-state surgery for the adaptive engine: widen, compact (gather / scatter rows),
strip, clear scratch, chunk statistics, and the jitted decode chunk.

Which axis of each leaf is the batch (or buffer-slot) axis comes from the logical axes
(:func:`specrl.decoding.state.state_logical_axes`), so any drafter state that declares its
axes is compacted and widened correctly: KV caches ``[L, B, K, S, Dh]`` on axis 1,
``[B, ...]`` leaves on axis 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specrl.decoding import steps as steps_lib
from specrl.decoding.state import (
  OUTPUT_FIELDS,
  RolloutConfig,
  RolloutOutput,
  RolloutState,
  slots_needed,
  state_logical_axes,
)

# Layout of the per-chunk stats vector (int32 [8]).
ST_STEPS, ST_ACTIVE, ST_TOKENS, ST_ROUNDS, ST_ACCEPTED, ST_STEP, ST_LIVE, ST_SPAN = range(8)


def state_axes(state: RolloutState, drafter) -> RolloutState:
  """Logical axes matching ``state``: the drafter's state axes only if it carries one, its
  shared state and hidden states only if present, no caches for a stripped accumulator
  (see :func:`strip`)."""
  draft_axes = drafter.state_logical_axes() if state.draft is not None else None
  axes = state_logical_axes(draft_axes, like=state)
  return axes.replace(cache=None) if state.cache is None else axes


def arg_signature(args) -> tuple:
  """(shape, dtype) of every leaf of ``args``: completes a compiled function's cache key.
  Why: state that is never compacted (a drafter's ``draft_shared``, history params) has the
  *original* batch as leading axis, which a (bucket, strategy) key alone does not fix."""
  return tuple(
    (getattr(x, 'shape', ()), str(getattr(x, 'dtype', ''))) for x in jax.tree.leaves(args)
  )


def axis_positions(axes, name: str) -> Any:
  """Pytree like ``axes`` (logical-axis tuples): the position of ``name`` in each, -1 = none
  (e.g. ``'batch'``: axis 1 of a KV cache ``[L, B, K, S, Dh]``, axis 0 elsewhere)."""
  return jax.tree.map(
    lambda t: t.index(name) if name in t else -1, axes, is_leaf=lambda t: isinstance(t, tuple)
  )


def widen(state: RolloutState, axes, extra: int, pad_id: int):
  """Append ``extra`` scratch slots to every buffer-slot axis (``tokens`` gets
  ``pad_id``, logprobs and KV caches zeros). Slots past ``seq_len`` are never read."""

  def one(ax, x):
    if x is None or ax < 0:
      return x
    widths = [(0, 0)] * x.ndim
    widths[ax] = (0, extra)
    fill = pad_id if x.dtype == jnp.int32 else 0
    return jnp.pad(x, widths, constant_values=jnp.asarray(fill, x.dtype))

  return jax.tree.map(one, axes, state)


def gather_rows(state: RolloutState, idx: jax.Array, axes) -> RolloutState:
  """Rows ``idx`` (int32 [b]) of every batched leaf: a state of batch b.

  KV caches ``[L, B, K, S, Dh]`` are gathered on axis 1, ``[B, ...]`` leaves on axis 0;
  ``rng`` and ``step`` (no batch axis) are shared, and so is a drafter's shared state
  (axis ``'rows'``: every row of the original batch, never compacted).
  """
  return jax.tree.map(lambda ax, x: x if ax < 0 else jnp.take(x, idx, axis=ax), axes, state)


def compaction_plan(done: np.ndarray, origin, target: int, bsz: int):
  """Host-side plan of a compaction to batch ``target``: (idx, origin, new_origin), int32.

  ``idx`` [target]: the active rows of the current batch, then copies of a finished row as
  padding; ``origin`` [b]: each current row's original index (``None`` = identity);
  ``new_origin`` [target]: the same for the compacted rows, ``bsz`` for padding rows.
  """
  active, finished = np.nonzero(~done)[0], np.nonzero(done)[0]
  idx = np.concatenate([active, np.full(target - len(active), finished[0])]).astype(np.int32)
  cur = np.arange(len(done), dtype=np.int32) if origin is None else origin
  new_origin = np.where(np.arange(target) < len(active), cur[idx], bsz).astype(np.int32)
  return idx, cur, new_origin


def compact_rows(state: RolloutState, idx: jax.Array, origin: jax.Array, axes) -> RolloutState:
  """:func:`gather_rows` for compaction: rows ``idx`` with ``seq_id = origin`` (int32 [b]:
  each row's original index, B_orig for the padding rows that repeat a finished row, so
  a drafter writing into its shared state at ``seq_id`` with ``mode='drop'`` skips them)."""
  return gather_rows(state, idx, axes).replace(seq_id=origin)


def scatter_rows(acc: RolloutState, state: RolloutState, origin: jax.Array) -> RolloutState:
  """Write the output fields of ``state`` (batch b) into ``acc`` (batch B) at rows
  ``origin`` (int32 [b]; B = padding row, dropped)."""
  fields = OUTPUT_FIELDS
  if acc.tree_stats is not None and state.tree_stats is not None:  # draft trees' counters
    fields = (*fields, 'tree_stats')
  upd = {f: getattr(acc, f).at[origin].set(getattr(state, f), mode='drop') for f in fields}
  return acc.replace(**upd)


def strip(state: RolloutState) -> RolloutState:
  """The state without caches and drafter extras: what the output needs."""
  return state.replace(cache=None, draft=None, draft_shared=None, hidden=None, hidden_from=None)


def clear_scratch(out: RolloutOutput, seq_len: int, width: int, pad_id: int) -> RolloutOutput:
  """Blank the buffer's scratch slots ``>= seq_len`` (never committed; see the module
  docstring) and cut ``tokens``/``logprobs`` ``[B, S]`` to ``[B, width]``."""
  s = out.tokens.shape[1]
  scratch = jnp.arange(s)[None, :] >= seq_len
  toks = jnp.where(scratch, pad_id, out.tokens)[:, :width]
  lps = jnp.where(scratch, 0.0, out.logprobs)[:, :width]
  if width > s:
    toks = jnp.pad(toks, ((0, 0), (0, width - s)), constant_values=pad_id)
    lps = jnp.pad(lps, ((0, 0), (0, width - s)))
  return out.replace(tokens=toks, logprobs=lps)


def state_stats(state: RolloutState, steps) -> jax.Array:
  """int32 [8]: steps, active, sum generated, sum rounds, sum accepted, global step, the
  cache slots the next plain step needs (:func:`specrl.decoding.state.slots_needed`: the
  length bucket of the next chunk is chosen from it) and the slots any row's committed
  text spans, finished rows' too (a drafter's shared corpus window)."""
  return jnp.stack(
    [
      jnp.asarray(steps, jnp.int32),
      jnp.sum(~state.done).astype(jnp.int32),
      jnp.sum(state.num_generated),
      jnp.sum(state.num_rounds),
      jnp.sum(state.num_accepted),
      state.step,
      slots_needed(state, 0),
      jnp.max(state.pos).astype(jnp.int32) + 1,
    ]
  )


def decode_chunk(
  params,
  draft_params,
  state: RolloutState,
  min_active,
  max_steps,
  *,
  k: int,
  cfg,
  rcfg: RolloutConfig,
  drafter,
  mesh,
  limit: int,
  attend_len: int | None = None,
  shared_len: int | None = None,
):
  """At most ``max_steps`` rounds of :func:`specrl.decoding.steps.decode_step` with ``k``
  drafts (0 = plain), stopping once ``active <= min_active`` or the global step reaches
  ``limit``, or before a step that needs more than ``attend_len`` cache slots (the chunk's
  length bucket; None = the dense reference, no such stop). ``min_active``/``max_steps``
  are traced int32 scalars: one compile per (batch, k, length bucket). Returns (state,
  int32 [2, 7] :func:`state_stats` before and after)."""
  before = state_stats(state, 0)
  state, n = steps_lib.decode(
    params,
    state,
    k,
    cfg=cfg,
    rcfg=rcfg,
    mesh=mesh,
    drafter=drafter,
    draft_params=draft_params,
    min_active=min_active,
    max_steps=max_steps,
    limit=limit,
    attend_len=attend_len,
    shared_len=shared_len,
  )
  return state, jnp.stack([before, state_stats(state, n)])

"""The one step-cost profiler: the adaptive engine's cost model, the static engine's
draft/verify time estimates and the benchmarks all time steps here.

Steps inside a ``while_loop`` cannot be timed one by one, so unit costs are measured on
inputs of the real shapes: each timed call runs ``reps`` steps in a jitted ``fori_loop``
with the cache carried and donated (no per-call dispatch, host sync or cache copy, as inside
the rollout's loop; :class:`LoopTimer`), and the median of ``iters`` calls is taken, the
units of one profile timed round-robin (:func:`interleaved_medians`).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from specrl import model as model_lib
from specrl import sampling
from specrl import sharding as shd
from specrl.decoding import tree as tree_lib
from specrl.decoding.spec_math import CostProfile
from specrl.decoding.steps import loop_params_jit
from specrl.drafters import hooks


def never(x: jax.Array) -> jax.Array:
  """Always-False data dependency on all of ``x`` [B, ...] -> bool [B] (keeps XLA from
  dropping or hoisting the timed work)."""
  return jnp.max(x.reshape(x.shape[0], -1), axis=1) > 1e30


def median_seconds(fn, *args, iters: int = 3) -> float:
  """Median wall time of ``fn(*args)`` over ``iters`` calls, after one warm-up call (the
  one-unit case of :func:`interleaved_medians`)."""
  return interleaved_medians({'fn': lambda: fn(*args)}, warmup=1, iters=iters)['fn']


def interleaved_medians(fns: dict, warmup: int = 1, iters: int | dict = 5) -> dict:
  """Median wall seconds of each no-argument callable (outputs blocked on), timed
  round-robin.

  Calling ``a, b, c, a, b, c, ...`` rather than ``a, a, a, b, b, b, ...`` exposes every
  callable to the same background load, so ratios between them stay meaningful on a
  shared or throttling machine (a plain step timed in a quiet minute and a verify pass in a
  busy one once gave the adaptive engine v = 1.22 where a rollout's rounds cost 1.87 plain
  steps). ``warmup`` untimed rounds come first (compilation). ``iters`` may be a per-name
  dict: a callable with fewer calls than the longest is called in evenly spread rounds.
  """
  counts = {name: iters[name] if isinstance(iters, dict) else iters for name in fns}
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  rounds = max(counts.values(), default=0)
  times: dict = {name: [] for name in fns}
  for r in range(rounds):
    for name, fn in fns.items():
      n = counts[name]
      if (r + 1) * n // rounds > r * n // rounds:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


class CarryCell:
  """One carried value (a KV cache) that several :class:`LoopTimer` s pass along: each call
  donates it and stores the updated one back. Its contents never matter to a timing (the
  shapes fix the work), only that it is not held once per timer."""

  def __init__(self, value):
    self.value = value


class LoopTimer:
  """A jitted ``fn(*fixed, *carried) -> (out, *carried)`` called again and again with its
  carried state (KV caches, drafter state) donated and fed back, so it is updated in place
  as inside the rollout's ``while_loop``. ``timer()`` runs one call (``reps`` steps) and
  returns ``out`` (block on it to time).

  With ``cell`` (a :class:`CarryCell`), the last carried value is not the timer's own: it
  is taken from the cell and put back after the call, so timers interleaved on one cell
  (:func:`measure_profile`) hold one KV cache between them, not one each."""

  def __init__(self, fn, fixed, carried, reps: int, cell: CarryCell | None = None):
    n, m = len(fixed), len(carried) + (cell is not None)
    self.fn = jax.jit(fn, donate_argnums=tuple(range(n, n + m)))
    self.fixed, self.carried, self.reps, self.cell = tuple(fixed), tuple(carried), reps, cell

  def __call__(self):
    shared = () if self.cell is None else (self.cell.value,)
    out, *carried = self.fn(*self.fixed, *self.carried, *shared)
    if self.cell is not None:
      *carried, self.cell.value = carried
    self.carried = tuple(carried)
    return out


def forward_loop(cfg, batch: int, t: int, pos0: int, reps: int, mesh=None, sp=None):
  """fn(params, cache) -> (tokens, cache): ``reps`` cache-extending policy forwards over
  T = t tokens at positions ``pos0..pos0+t-1``. With ``sp``, each step samples the last
  position and feeds the token back, as decoding does."""

  def fn(params, cache):
    tok = jnp.full((batch, t), 3, jnp.int32)
    positions = jnp.broadcast_to(pos0 + jnp.arange(t, dtype=jnp.int32), (batch, t))

    def body(i, carry):
      cache, tok = carry
      logits, cache = model_lib.forward(
        params, cfg, tok, positions, cache, mesh=mesh, rules=shd.DECODE_RULES
      )
      if sp is None:
        return cache, tok + never(logits).astype(jnp.int32)[:, None]
      seeds = jnp.full((batch,), i, jnp.int32)
      nxt = sampling.sample_seeded(logits[:, -1], seeds, sp)
      return cache, jnp.broadcast_to(nxt[:, None], tok.shape)

    cache, tok = jax.lax.fori_loop(0, reps, body, (cache, tok))
    return tok, cache

  return fn


def tree_forward_loop(cfg, parents, pos0: int, reps: int, mesh=None):
  """fn(params, cache) -> (tokens, cache): ``reps`` tree verify forwards (the tree round's
  forward: ``tree_anc`` mask, node positions ``pos0 + depth``, K/V to scratch slots) of the
  draft trees ``parents`` int32 [B, N] (parents before children, the root's -1) -- what a
  tree arm's verify pass costs, beside :func:`forward_loop`'s chain of ``T = N``."""
  parents = jnp.asarray(parents, jnp.int32)
  batch, n = parents.shape
  depth = jnp.zeros_like(parents)
  for u in range(1, n):
    depth = depth.at[:, u].set(jnp.take_along_axis(depth, parents[:, u : u + 1], 1)[:, 0] + 1)
  anc = tree_lib.ancestors(parents)
  positions = pos0 + depth

  def fn(params, cache):
    tok = jnp.full((batch, n), 3, jnp.int32)

    def body(i, carry):
      cache, tok = carry
      logits, cache = model_lib.forward(
        params, cfg, tok, positions, cache, mesh=mesh, rules=shd.DECODE_RULES, tree_anc=anc
      )
      return cache, tok + never(logits).astype(jnp.int32)[:, None]

    cache, tok = jax.lax.fori_loop(0, reps, body, (cache, tok))
    return tok, cache

  return fn


def synthetic_context(drafter, seq, pos, k: int, hidden_dim: int | None):
  """``propose``'s keyword arguments for timing: a :class:`~specrl.drafters.hooks.DraftContext`
  of the right shapes (each row its own group, unknown prompt ids, fresh shared state, zero
  hidden states) for drafters that want one; none for the others."""
  if not hooks.wants_context(drafter):
    return {}
  b, s = seq.shape
  ids = jnp.arange(b, dtype=jnp.int32)
  hidden = None
  if hooks.wants_hidden(drafter):
    if hidden_dim is None:
      raise ValueError(f'drafter {drafter.name!r} wants hidden states: pass hidden_dim')
    hidden = jnp.zeros((b, k + 1, hidden_dim), jnp.float32)
  ctx = hooks.DraftContext(
    seq_id=ids,
    group_ids=ids,
    prompt_ids=jnp.full((b,), -1, jnp.int32),
    shared=hooks.init_shared(drafter, b, s),
    hidden=hidden,
    hidden_from=pos,
  )
  return {'ctx': ctx}


def propose_loop(drafter, k: int, sp, reps: int, mesh=None, hidden_dim: int | None = None):
  """fn(draft_params, seq [B, S], pos [B], draft_state, cache) -> (pos, draft_state, cache):
  ``reps`` drafter proposals of k tokens after ``pos`` (called as the speculative round
  calls it; drafters that want a context get :func:`synthetic_context`)."""

  def fn(dp, seq, pos, dstate, cache):
    kw = synthetic_context(drafter, seq, pos, k, hidden_dim)

    def body(i, carry):
      dstate, cache, pos = carry
      toks, logits, dstate, cache = drafter.propose(
        dp,
        dstate,
        seq,
        pos,
        k,
        jnp.full(pos.shape, i, jnp.int32),  # per-row seeds
        sp,
        mesh=mesh,
        policy_cache=cache,
        **kw,
      )
      dep = toks[:, 0] < -1  # one-hot drafters (logits None) mark no proposal with -1
      if logits is not None:  # (a hybrid's MixedDraft: its logits)
        dep |= never(getattr(logits, 'logits', logits))
      return dstate, cache, pos + dep.astype(pos.dtype)

    dstate, cache, pos = jax.lax.fori_loop(0, reps, body, (dstate, cache, pos))
    return pos, dstate, cache

  return fn


def tree_propose_loop(
  drafter, n_nodes: int, depth: int, sp, reps: int, mesh=None, hidden_dim: int | None = None
):
  """:func:`propose_loop` for a tree builder: ``reps`` ``drafter.propose_tree`` calls of
  ``n_nodes`` nodes (depth cap ``depth``, 0 = none) after ``pos``; same signature. A
  drafter that samples its trees at ``sp`` (``samples_tree_children``) is timed on
  ``propose_sampled_tree``, the call its tree rounds make."""
  sampled = bool(getattr(drafter, 'samples_tree_children', False)) and not sp.greedy

  def fn(dp, seq, pos, dstate, cache):
    kw = synthetic_context(drafter, seq, pos, n_nodes - 1, hidden_dim)

    def body(i, carry):
      dstate, pos = carry
      propose = drafter.propose_sampled_tree if sampled else drafter.propose_tree
      toks, *_, dstate = propose(
        dp, dstate, seq, pos, n_nodes, depth or None, jnp.full(pos.shape, i, jnp.int32), sp,
        mesh=mesh, **kw,
      )  # fmt: skip
      return dstate, pos + (toks[:, -1] < -1).astype(pos.dtype)  # never: keeps the work

    dstate, pos = jax.lax.fori_loop(0, reps, body, (dstate, pos))
    return pos, dstate, cache

  return fn


def measure_profile(
  cfg,
  params,
  drafter,
  draft_params,
  *,
  batch: int,
  buffer_len: int,
  k_ref: int,
  sp,
  max_prompt_len: int,
  pos0: int | None = None,
  reps: int = 4,
  iters: int = 3,
  mesh=None,
  k_prop: int | None = None,
  unroll_layers: bool | None = None,
  tree_depth: int | None = None,
  fuse: bool | None = None,
) -> CostProfile:
  """Time the unit costs of plain and speculative rounds at ``batch`` (see
  :class:`~specrl.decoding.spec_math.CostProfile`). Without a drafter (or ``k_ref = 0``)
  only the plain forward is timed. ``pos0``: the position the timed steps write at
  (default mid-buffer: attention over a typical live prefix). ``k_prop``: the second
  proposal length timed (default ``min(k_ref, 2)``: two points pin the linear proposal cost
  down cheaply for the adaptive engine; a benchmark reporting c at k passes ``k_ref``, so
  c is measured at k, not extrapolated). ``unroll_layers`` (default: on the CPU backend,
  :func:`specrl.decoding.steps.loop_params`): time the policy's forwards over per-layer
  weights sliced once (:func:`specrl.model.unstack_layers`), the layout the decode loop
  runs. Why it matters: over stacked layers a CPU step costs ~1.4x more (SmolLM2-135M, B = 1:
  44 vs 31 ms) while a k + 1 token pass costs the same, so v came out ~1.15 where a
  rollout's round measures 1.8-1.9 and the cost model speculated where it loses.
  ``tree_depth`` (not None: the rounds are draft trees, ``rollout.tree_nodes``, with this
  depth cap, 0 = none): a drafter with a tree builder is timed proposing trees of k + 1
  nodes (:func:`tree_propose_loop`; an eagle tree costs other than its sampled chain).
  ``fuse`` (default :func:`specrl.decoding.steps.fuse_default`; the engines pass
  ``rollout.fuse_matmuls``): time the fused q/k/v and gate/up matmuls, as the loop runs."""
  pos0 = buffer_len // 2 if pos0 is None else pos0
  fwd_params = loop_params_jit(params, unroll_layers, fuse, mesh)
  speculative = drafter is not None and k_ref >= 1
  kp = (min(k_ref, 2) if k_prop is None else k_prop) if speculative else 0
  if speculative and not 1 <= kp <= k_ref:
    raise ValueError(f'k_prop={kp} must be in [1, k_ref={k_ref}]')

  # every unit carries the one policy cache of this cell (as big as the rollout's own)
  cell = CarryCell(model_lib.init_cache(cfg, batch, buffer_len))

  def fwd_timer(t):
    return LoopTimer(forward_loop(cfg, batch, t, pos0, reps, mesh), (fwd_params,), (), reps, cell)

  # every unit built first, then timed round-robin (interleaved_medians): v = fwd_ref / fwd1
  # and c = prop / fwd1 are ratios of calls that saw the same background load
  timers = {'fwd1': fwd_timer(1)}
  if speculative:
    timers['fwd_ref'] = fwd_timer(k_ref + 1)
    dstate_abs = jax.eval_shape(
      lambda dp: drafter.prefill(
        dp,
        jnp.zeros((batch, max_prompt_len), jnp.int32),
        jnp.ones((batch,), jnp.int32),
        buffer_len,
        mesh=mesh,
      ),
      draft_params,
    )
    seq = jnp.full((batch, buffer_len), 3, jnp.int32)
    pos = jnp.full((batch,), pos0, jnp.int32)

    def prop_timer(k):
      dstate = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), dstate_abs)
      if tree_depth is not None and hasattr(drafter, 'propose_tree'):
        fn = tree_propose_loop(drafter, k + 1, tree_depth, sp, reps, mesh, hidden_dim=cfg.d_model)
      else:
        fn = propose_loop(drafter, k, sp, reps, mesh, hidden_dim=cfg.d_model)
      return LoopTimer(fn, (draft_params, seq, pos), (dstate,), reps, cell)

    timers['prop1'] = prop_timer(1)
    if kp > 1:
      timers['prop_ref'] = prop_timer(kp)
  sec = {name: t / reps for name, t in interleaved_medians(timers, iters=iters).items()}
  if not speculative:
    fwd1 = sec['fwd1']
    return CostProfile(batch=batch, k_ref=0, fwd1=fwd1, fwd_ref=fwd1, prop1=0.0, prop_ref=0.0)
  return CostProfile(
    batch=batch, k_ref=k_ref, fwd1=sec['fwd1'], fwd_ref=sec['fwd_ref'], prop1=sec['prop1'],
    prop_ref=sec.get('prop_ref', sec['prop1']), k_prop=kp,
  )  # fmt: skip

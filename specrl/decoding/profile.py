"""The one step-cost profiler: the adaptive engine's cost model, the static engine's
draft/verify time estimates and the benchmarks all time steps here.

Steps inside a ``while_loop`` cannot be timed one by one, so unit costs are measured on
synthetic inputs of the real shapes: each timed call runs ``reps`` steps in a jitted
``fori_loop`` with the cache carried (no per-call dispatch or host sync, as inside the
rollout's loop), and the median of ``iters`` calls is taken.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from specrl import model as model_lib
from specrl import sharding as shd
from specrl.decoding.spec_math import CostProfile


def never(x: jax.Array) -> jax.Array:
  """Always-False data dependency on all of ``x`` [B, ...] -> bool [B] (keeps XLA from
  dropping or hoisting the timed work)."""
  return jnp.max(x.reshape(x.shape[0], -1), axis=1) > 1e30


def median_seconds(fn, *args, iters: int = 3) -> float:
  """Median wall time of ``fn(*args)`` over ``iters`` calls, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def forward_loop(cfg, batch: int, t: int, pos0: int, reps: int, mesh=None):
  """fn(params, cache) running ``reps`` cache-extending policy forwards over T = t tokens."""

  def fn(params, cache):
    tok = jnp.full((batch, t), 3, jnp.int32)
    positions = jnp.broadcast_to(pos0 + jnp.arange(t, dtype=jnp.int32), (batch, t))

    def body(_, carry):
      cache, tok = carry
      logits, cache = model_lib.forward(
        params, cfg, tok, positions, cache, mesh=mesh, rules=shd.DECODE_RULES
      )
      return cache, tok + never(logits).astype(jnp.int32)[:, None]

    return jax.lax.fori_loop(0, reps, body, (cache, tok))[1]

  return fn


def propose_loop(drafter, batch: int, buffer_len: int, k: int, pos0: int, sp, reps, mesh=None):
  """fn(draft_params, draft_state, cache) running ``reps`` drafter proposals of k tokens."""

  def fn(dp, dstate, cache):
    seq = jnp.full((batch, buffer_len), 3, jnp.int32)
    pos = jnp.full((batch,), pos0, jnp.int32)

    def body(i, carry):
      dstate, cache, seq = carry
      toks, logits, dstate, cache = drafter.propose(
        dp,
        dstate,
        seq,
        pos,
        k,
        jnp.full((batch,), i, jnp.int32),  # per-row seeds
        sp,
        mesh=mesh,
        policy_cache=cache,
      )
      dep = never(logits) | (toks[:, 0] < 0)
      return dstate, cache, seq.at[:, 0].add(dep.astype(jnp.int32))

    return jax.lax.fori_loop(0, reps, body, (dstate, cache, seq))[2]

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
) -> CostProfile:
  """Time the unit costs of plain and speculative rounds at ``batch`` (see
  :class:`~specrl.decoding.spec_math.CostProfile`). Without a drafter (or ``k_ref = 0``)
  only the plain forward is timed. ``pos0``: the position the timed steps write at
  (default mid-buffer: attention over a typical live prefix)."""
  pos0 = buffer_len // 2 if pos0 is None else pos0
  cache = model_lib.init_cache(cfg, batch, buffer_len)

  def timed(fn, *args):
    return median_seconds(jax.jit(fn), *args, iters=iters) / reps

  fwd1 = timed(forward_loop(cfg, batch, 1, pos0, reps, mesh), params, cache)
  if drafter is None or k_ref < 1:
    return CostProfile(batch=batch, k_ref=0, fwd1=fwd1, fwd_ref=fwd1, prop1=0.0, prop_ref=0.0)
  fwd_ref = timed(forward_loop(cfg, batch, k_ref + 1, pos0, reps, mesh), params, cache)
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
  dstate = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), dstate_abs)

  def prop(k):
    fn = propose_loop(drafter, batch, buffer_len, k, pos0, sp, reps, mesh)
    return timed(fn, draft_params, dstate, cache)

  prop1 = prop(1)
  kp = min(k_ref, 2)
  prop_ref = prop(kp) if kp > 1 else prop1
  return CostProfile(
    batch=batch, k_ref=k_ref, fwd1=fwd1, fwd_ref=fwd_ref, prop1=prop1, prop_ref=prop_ref, k_prop=kp
  )

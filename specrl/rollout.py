"""The static rollout engine: prefill + ``lax.while_loop`` decode, plain or speculative.

The decoding itself (state, ``commit``, prefill, plain step, speculative round, the step
chooser) lives in :mod:`specrl.decoding`; this module jits it for one model config, rollout
config, mesh and drafter, and validates prompts and summarises rollouts for both engines
(:func:`prepare_prompts`, :func:`rollout_metrics`). The draft length is
``rcfg.num_draft`` (0 = plain).

Length buckets. A step pays for the live length, not the token budget: decode runs as one
``while_loop`` per length bucket (:func:`specrl.decoding.state.attend_buckets`), each
compiled with attention over that many cache slots, and the host moves to the next bucket
when the longest live row outgrows the current one (one small read of ``pos``/``done`` per
switch). At most ``len(attend_buckets)`` decode variants per batch size; the metrics report
the buckets a rollout ran (``rollout/length_buckets``) and that bound
(``rollout/length_bucket_variants``). ``rollout.attend_bucket = 0`` is the dense reference:
one loop attending to the whole buffer.

Sharding. :class:`RolloutEngine` jits ``prefill`` and ``decode`` against a
``jax.sharding.Mesh``: params use ``sharding.PARAM_RULES`` (the same shardings as the
train step), the batch and KV cache use ``sharding.DECODE_RULES``. The state (KV caches
included) is built with ``jax.eval_shape`` + ``out_shardings`` and *donated* to the
decode step, so the cache is updated in place. Drafter params are jit arguments with
their own shardings (never closed over).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from specrl import drafters as drafters_lib
from specrl import model as model_lib
from specrl import multihost as mh
from specrl import sharding as shd
from specrl.decoding import executables, spec_math
from specrl.decoding import profile as profile_lib
from specrl.decoding import tree as tree_lib
from specrl.decoding.state import (
  FINISH_CACHE,
  FINISH_EOS,
  FINISH_LENGTH,
  FINISH_NAMES,
  FINISH_NONE,
  RolloutConfig,
  RolloutOutput,
  RolloutState,
  attend_buckets,
  bucket_for,
  draft_bytes_per_slot,
  draft_slots,
  finalize,
  grow_cache,
  kv_bytes_per_slot,
  kv_slots,
  state_logical_axes,
)
from specrl.decoding.steps import (
  decode,
  fuse_setting,
  max_loop_steps,
  prefill,
  prefill_cache_slots,
)
from specrl.drafters import hooks

__all__ = [
  'FINISH_CACHE',
  'FINISH_EOS',
  'FINISH_LENGTH',
  'FINISH_NAMES',
  'FINISH_NONE',
  'RolloutConfig',
  'RolloutEngine',
  'RolloutOutput',
  'RolloutState',
  'prepare_prompts',
  'prepare_row_ids',
  'rollout_metrics',
]


class RolloutEngine:
  """Jitted, sharded rollout for one model config, rollout config, mesh and drafter.

  ``generate(params, prompt_tokens, prompt_len, rng, draft_params=None, group_ids=None,
  prompt_ids=None)`` returns a :class:`RolloutOutput` (device arrays) and a dict of
  host-side metrics (row ids: :func:`prepare_row_ids`). ``last_draft_shared``: the
  drafter's shared state (``init_shared``, :mod:`specrl.drafters.hooks`) at the end of the
  last rollout, rows of the original batch; None for drafters without one.
  """

  def __init__(
    self, cfg: model_lib.ModelConfig, rcfg: RolloutConfig, mesh: Mesh | None = None, drafter=None
  ):
    self.cfg, self.rcfg, self.drafter = cfg, rcfg, drafter
    self.mesh = mesh if mesh is not None else shd.make_mesh((1, 1, 1), jax.devices()[:1])
    if rcfg.num_draft and drafter is None:
      raise ValueError('rollout.num_draft > 0 needs a drafter (rollout.drafter != "none")')
    tree_lib.check_drafter(drafter, rcfg)
    self._token = object()  # this engine's keys in the process-wide executable cache
    self._costs: dict = {}  # (batch, width) -> measure_step_costs
    self.last_draft_shared = None
    self.last_buckets: list[int] = []  # length buckets the last rollout decoded in

  # -- shardings
  def param_shardings(self, params):
    axes = model_lib.param_logical_axes(self.cfg)
    return shd.tree_shardings(axes, params, self.mesh, shd.PARAM_RULES)

  def _batch_sharding(self, ndim):
    spec = shd.logical_to_spec(
      ('batch',) + (None,) * (ndim - 1), (0,) * ndim, self.mesh, shd.DECODE_RULES
    )
    return NamedSharding(self.mesh, spec)

  def _state_shardings(self, abstract_state):
    draft_axes = self.drafter.state_logical_axes() if self.drafter is not None else None
    axes = state_logical_axes(draft_axes, like=abstract_state)
    return shd.tree_shardings(axes, abstract_state, self.mesh, shd.DECODE_RULES)

  def _compiled(self, batch: int, params, draft_params):
    """(prefill, finalize, shardings) jitted for ``batch`` rows: one entry of two
    executables in the process-wide LRU (:mod:`specrl.decoding.executables`)."""
    return executables.CACHE.get(
      (self._token, batch), lambda: self._build(batch, params, draft_params), weight=2
    )

  def _decode_fn(self, batch: int, attend_len: int | None, shardings, shared_len=None):
    """The decode loop at length bucket ``attend_len`` (and the drafter's shared corpus cut
    to ``shared_len`` slots) for ``batch`` rows: one executable per (batch, bucket, corpus
    bucket) in the process-wide LRU."""
    return executables.CACHE.get(
      (self._token, batch, 'decode', attend_len, shared_len),
      lambda: self._build_decode(attend_len, shardings, shared_len),
    )

  def _build_decode(self, attend_len: int | None, shardings, shared_len=None):
    cfg, rcfg, mesh, drafter = self.cfg, self.rcfg, self.mesh, self.drafter
    k = rcfg.num_draft if drafter is not None else 0
    psh, dsh, st_sh = shardings

    def decode_fn(params, draft_params, state):
      return decode(
        params, state, k, cfg=cfg, rcfg=rcfg, mesh=mesh, drafter=drafter,
        draft_params=draft_params, attend_len=attend_len, shared_len=shared_len,
      )[0]  # fmt: skip

    return jax.jit(
      decode_fn, in_shardings=(psh, dsh, st_sh), out_shardings=st_sh, donate_argnums=(2,)
    )

  def _build(self, batch: int, params, draft_params):
    cfg, rcfg, mesh, drafter = self.cfg, self.rcfg, self.mesh, self.drafter

    def prefill_fn(params, draft_params, toks, lens, rng, group_ids, prompt_ids):
      return prefill(
        params,
        toks,
        lens,
        rng,
        cfg=cfg,
        rcfg=rcfg,
        mesh=mesh,
        drafter=drafter,
        draft_params=draft_params,
        group_ids=group_ids,
        prompt_ids=prompt_ids,
        cache_slots=prefill_cache_slots(rcfg),
      )

    p = rcfg.max_prompt_len
    abstract = jax.eval_shape(
      prefill_fn,
      params,
      draft_params,
      jax.ShapeDtypeStruct((batch, p), jnp.int32),
      jax.ShapeDtypeStruct((batch,), jnp.int32),
      jax.random.key(0),
      jax.ShapeDtypeStruct((batch,), jnp.int32),
      jax.ShapeDtypeStruct((batch,), jnp.int32),
    )
    st_sh = self._state_shardings(abstract)
    psh = self.param_shardings(params)
    dsh = None if draft_params is None else jax.tree.map(lambda x: x.sharding, draft_params)
    rep, row = shd.replicated(mesh), self._batch_sharding(1)
    prefill_j = jax.jit(
      prefill_fn,
      in_shardings=(psh, dsh, self._batch_sharding(2), row, rep, row, row),
      out_shardings=st_sh,
    )
    finalize_j = jax.jit(lambda s: finalize(s, rcfg))
    return prefill_j, finalize_j, (psh, dsh, st_sh)

  def _grow_fn(self, batch: int, have: int, slots: int, shardings):
    """The state with its policy KV cache (and the drafter's position-indexed state: its
    KV cache, the hidden history) grown from ``have`` to ``slots`` slots."""
    st_sh, drafter = shardings[2], self.drafter
    return executables.CACHE.get(
      (self._token, batch, 'grow', have, slots),
      lambda: jax.jit(
        lambda st: grow_cache(st, slots, drafter), in_shardings=(st_sh,), out_shardings=st_sh
      ),
    )

  def _decode(self, batch, params, draft_params, state, shardings):
    """Decode to the end, one loop per length bucket, smallest first (the buckets a loop
    stops at are left once the longest live row outgrows them). With ``rcfg.grow_kv`` the
    policy KV cache is grown to each bucket before its loop (a loop never writes past its
    bucket). The drafter's position-indexed state (its KV cache, the hidden history) grows
    with the policy cache; its shared corpus (``hooks.windows_shared``) is carried cut to the
    bucket holding every row's committed text (finished rows' too). Returns (state, buckets
    run, KV usage: peak cache bytes, bytes per slot, the drafter's peak and per slot)."""
    rcfg, drafter = self.rcfg, self.drafter
    buckets = attend_buckets(rcfg)
    k = rcfg.num_draft if drafter is not None else 0
    limit = max_loop_steps(rcfg)
    visited = []
    usage = {'peak': 0, 'per_slot': kv_bytes_per_slot(state)}
    usage.update(draft_peak=0, draft_per_slot=draft_bytes_per_slot(state, drafter))
    while True:
      shared = None  # the corpus as it is (the dense path: the whole of it)
      if len(buckets) == 1:  # the dense path: no host read before the one loop
        a = buckets[0]
      else:
        pos, done, step = mh.to_host((state.pos, state.done, state.step))
        if done.all() or step >= limit:
          break
        a = bucket_for(buckets, int(pos[~done].max()) + k + 1)  # slots_needed, on host
        if hooks.windows_shared(drafter):  # every committed position, finished rows too
          w = bucket_for(buckets, max(a, int(pos.max()) + 1))
          shared = w if w < rcfg.seq_len else None
      have = model_lib.cache_slots(state.cache)
      slots = kv_slots(rcfg, rcfg.buffer_len, a)
      if slots > have:  # grow first: every write of the loop lands inside the cache
        state = self._grow_fn(batch, have, slots, shardings)(state)
      now = model_lib.cache_slots(state.cache)
      usage.setdefault('slots', []).append(now)
      usage['peak'] = max(usage['peak'], batch * now * usage['per_slot'])
      dnow = draft_slots(state, drafter)
      usage.setdefault('draft_slots', []).append(dnow)
      usage['draft_peak'] = max(usage['draft_peak'], batch * dnow * usage['draft_per_slot'])
      attend = a if rcfg.attend_bucket else None  # 0: the dense reference
      usage.setdefault('shared', []).append(shared)
      fn = self._decode_fn(batch, attend, shardings, shared)
      state = fn(params, draft_params, state)
      visited.append(a)
      if a == buckets[-1]:  # the last bucket has no stop of its own: ran to the end
        break
    return state, visited, usage

  def measure_step_costs(
    self, params, batch: int, draft_params=None, width: int | None = None
  ) -> dict:
    """Seconds of one plain decode step (T = 1), one verify pass (T = k + 1) and one
    drafter proposal of k tokens at this batch size (:mod:`specrl.decoding.profile`), with
    attention (and the drafter's position-indexed state) over ``width`` slots (default: the
    whole buffer).

    Steps run inside a ``while_loop`` can't be timed individually, so per-rollout drafter
    and verify times are estimated as (verify passes) x these costs. :meth:`generate` passes
    the widest length bucket its loops ran at: a 32k-token budget whose answers stop within
    a 16-slot bucket must not be priced (nor profiled, for seconds) at 32k slots. Cached per
    (batch, width).
    """
    width = self.rcfg.buffer_len if width is None else int(width)
    if (batch, width) in self._costs:
      return self._costs[(batch, width)]
    if self.drafter is not None and draft_params is None:
      draft_params = self.drafter.params_from_policy(params)
    k = self.rcfg.num_draft if self.drafter is not None else 0
    prof = profile_lib.measure_profile(
      self.cfg,
      params,
      self.drafter,
      draft_params,
      batch=batch,
      buffer_len=width,
      k_ref=k,
      sp=self.rcfg.sampling,
      max_prompt_len=self.rcfg.max_prompt_len,
      # the prompt's end, where decoding starts; inside the window with room for a round
      pos0=max(0, min(self.rcfg.max_prompt_len - 1, width - k - 2)),
      mesh=self.mesh,
      fuse=fuse_setting(self.rcfg),  # the layout the decode loop runs
    )
    costs = {'plain_step_s': prof.fwd1}
    if k:
      costs['verify_pass_s'] = prof.verify(k)
      costs['draft_k_s'] = prof.propose(k)
    self._costs[(batch, width)] = costs
    return costs

  def generate(
    self,
    params,
    prompt_tokens,
    prompt_len,
    rng,
    draft_params=None,
    group_ids=None,
    prompt_ids=None,
    estimate_costs: bool = False,
  ):
    prompt_tokens, prompt_len = prepare_prompts(
      prompt_tokens, prompt_len, self.rcfg, self.cfg.vocab_size
    )
    group_ids, prompt_ids = prepare_row_ids(group_ids, prompt_ids, prompt_tokens.shape[0])
    # Several processes: the rows given are this process's block (specrl.multihost); the
    # rollout runs on the global batch, every process's block in process order.
    b = prompt_tokens.shape[0] * mh.process_count()
    if mh.is_multiprocess():
      row2, row1 = self._batch_sharding(2), self._batch_sharding(1)
      prompt_tokens = mh.global_rows(prompt_tokens, row2)
      prompt_len, group_ids, prompt_ids = (
        mh.global_rows(x, row1) for x in (prompt_len, group_ids, prompt_ids)
      )
    if self.drafter is not None and draft_params is None:
      draft_params = self.drafter.params_from_policy(params)
    draft_params = drafters_lib.place_draft_params(self.drafter, draft_params, self.mesh)
    prefill_j, finalize_j, shardings = self._compiled(b, params, draft_params)
    t0 = time.perf_counter()
    state = prefill_j(params, draft_params, prompt_tokens, prompt_len, rng, group_ids, prompt_ids)
    state, visited, kv = self._decode(b, params, draft_params, state, shardings)
    self.last_draft_shared = state.draft_shared
    out = finalize_j(state)
    out = jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    metrics = rollout_metrics(out, dt)
    metrics.update(executables.CACHE.metrics())
    metrics['rollout/length_buckets'] = len(visited)
    metrics['rollout/length_bucket_variants'] = len(attend_buckets(self.rcfg))
    metrics.update(kv_metrics(out, kv['peak'], kv['per_slot']))
    if kv['draft_per_slot']:
      metrics.update(kv_metrics(out, kv['draft_peak'], kv['draft_per_slot'], 'draft_kv'))
    self.last_buckets = visited
    self.last_kv_slots = kv.get('slots', [])  # the policy cache's slots in each loop
    self.last_draft_slots = kv.get('draft_slots', [])  # the drafter's (0: none)
    self.last_shared_slots = kv.get('shared', [])  # its shared corpus' (None: all)
    if estimate_costs and self.rcfg.num_draft:
      # (no loop ran when every row ended at its prefill token: the first bucket's costs)
      width = max(visited, default=attend_buckets(self.rcfg)[0])
      costs = self.measure_step_costs(params, b, draft_params, width=width)
      passes = int(mh.to_host(out.num_rounds).max())
      metrics['spec/draft_time_est_s'] = passes * costs['draft_k_s']
      metrics['spec/verify_time_est_s'] = passes * costs['verify_pass_s']
      metrics['spec/draft_cost_ratio'] = costs['draft_k_s'] / (
        self.rcfg.num_draft * costs['plain_step_s']
      )
    return out, metrics


def prepare_prompts(prompt_tokens, prompt_len, rcfg: RolloutConfig, vocab_size: int | None = None):
  """Validate a prompt batch and right-pad it to ``rcfg.max_prompt_len``.

  Every engine goes through here, so bad input fails the same way everywhere: a batch
  wider than ``max_prompt_len``, an empty prompt, lengths that do not match the tokens
  given, a prompt that leaves no room in the cache, or (with ``vocab_size``) a token id
  outside the model's vocabulary (its embedding would be NaN: a silent wrong answer).
  Returns int32 numpy
  (tokens [B, max_prompt_len], lengths [B]).
  """
  prompt_tokens = np.asarray(prompt_tokens, np.int32)
  prompt_len = np.asarray(prompt_len, np.int32)
  b, p = prompt_tokens.shape
  if p > rcfg.max_prompt_len:
    raise ValueError(
      f'prompt batch is {p} tokens wide but rollout.max_prompt_len is '
      f'{rcfg.max_prompt_len} (the KV cache holds {rcfg.seq_len} '
      'positions): shorten the prompts or raise rollout.max_prompt_len'
    )
  if p < rcfg.max_prompt_len:
    prompt_tokens = np.pad(
      prompt_tokens, ((0, 0), (0, rcfg.max_prompt_len - p)), constant_values=rcfg.pad_id
    )
  if prompt_len.min() < 1:
    raise ValueError('every prompt needs at least one token')
  if prompt_len.shape != (b,) or prompt_len.max() > p:
    raise ValueError(
      f'prompt_len must be [{b}] lengths <= the {p} prompt tokens '
      f'given, got shape {prompt_len.shape}, max {int(prompt_len.max())}'
    )
  if prompt_len.max() >= rcfg.seq_len:
    raise ValueError(
      f'a prompt of {int(prompt_len.max())} tokens does not fit the cache '
      f'(rollout cache holds {rcfg.seq_len} positions)'
    )
  if vocab_size is not None:
    used = np.arange(prompt_tokens.shape[1])[None, :] < prompt_len[:, None]
    bad = used & ((prompt_tokens < 0) | (prompt_tokens >= vocab_size))
    if bad.any():
      row, col = map(int, np.argwhere(bad)[0])
      raise ValueError(
        f'prompt row {row} has token id {int(prompt_tokens[row, col])} at position {col}, '
        f'outside the model vocabulary [0, {vocab_size}): a tokenizer / model mismatch'
      )
  return prompt_tokens, prompt_len


def prepare_row_ids(group_ids, prompt_ids, batch: int):
  """Validate the row ids of a batch of ``batch`` prompts (both engines). Returns int32
  numpy ``(group_ids [B], prompt_ids [B])``.

  ``group_ids``: rows with the same id share a prompt (e.g. GRPO's G generations of one
  prompt); default: every row its own group. ``prompt_ids``: a stable id of each row's
  prompt across RL steps (e.g. the dataset index); default -1 = unknown. Drafters see both
  (:class:`specrl.drafters.hooks.DraftContext`); decoding itself never reads them.
  """
  ids = []
  for name, x, default in (
    ('group_ids', group_ids, np.arange(batch)),
    ('prompt_ids', prompt_ids, np.full(batch, -1)),
  ):
    x = np.asarray(default if x is None else x)
    if x.shape != (batch,) or not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f'{name} must be {batch} integers (one per row), got {x.dtype} {x.shape}')
    ids.append(x.astype(np.int32))
  return tuple(ids)


def live_kv_slots(prompt_len, length) -> int:
  """Peak over decode steps of the KV slots the active rows need (sum of position + 1),
  for rows advancing one token per step (plain decoding: exact; speculative rounds advance
  rows faster, so there it estimates): row i holds ``prompt_len[i] + t`` slots at step t
  while ``t < length[i]``."""
  plen = np.asarray(prompt_len, np.int64)
  n = np.asarray(length, np.int64)
  if n.size == 0 or n.max() <= 0:
    return int(plen.sum())
  n = np.maximum(n, 0)
  t = np.arange(int(n.max()))  # steps 0 .. T-1; O(B + T), not [T, B]
  left = np.cumsum(np.bincount(n, minlength=t.size + 1))[: t.size]  # rows with n <= t
  plen_left = np.cumsum(np.bincount(n, weights=plen, minlength=t.size + 1))[: t.size]
  live = (plen.sum() - plen_left) + t * (n.size - left)
  return int(live.max())


def kv_metrics(out, peak_bytes: int, per_slot: int, name: str = 'kv') -> dict:
  """The policy KV cache's use in a rollout (issue 26): ``rollout/kv_peak_gb``, the most
  the cache held (batch x slots x bytes per slot, at a loop / chunk start);
  ``rollout/kv_live_gb``, the peak of what the active rows needed (:func:`live_kv_slots`
  of the output) and their ratio ``rollout/kv_peak_over_live`` (the goal with
  ``rollout.grow_kv`` and compaction: <= 2). ``name='draft_kv'``: the same for the
  drafter's position-indexed state (its KV cache and the hidden history)."""
  live = live_kv_slots(*mh.to_host((out.prompt_len, out.length))) * per_slot
  m = {f'rollout/{name}_peak_gb': peak_bytes / 2**30, f'rollout/{name}_live_gb': live / 2**30}
  m[f'rollout/{name}_peak_over_live'] = peak_bytes / max(live, 1)
  return m


def rollout_metrics(out: RolloutOutput, seconds: float) -> dict:
  """Host-side summary of one rollout (both engines): lengths, throughput and, when the
  rollout speculated, the speculation metrics of :func:`spec_math.speculation_metrics`.
  Over the global batch: the same numbers on every process (:func:`specrl.multihost.to_host`)."""
  fields = ('length', 'num_rounds', 'num_accepted', 'num_drafted', 'reached', 'accepted_at')
  h = dict(zip(fields, mh.to_host(tuple(getattr(out, f) for f in fields)), strict=True))
  length = h['length']
  m = {
    'rollout/time_s': seconds,
    'rollout/tokens': int(length.sum()),
    'rollout/tokens_per_s': float(length.sum() / max(seconds, 1e-9)),
    'rollout/len_mean': float(length.mean()),
    'rollout/len_max': int(length.max()),
  }
  m.update(
    spec_math.speculation_metrics(
      rounds=int(h['num_rounds'].sum()),
      accepted=int(h['num_accepted'].sum()),
      drafted=int(h['num_drafted'].sum()),
      reached=h['reached'].sum(axis=0).tolist(),
      accepted_at=h['accepted_at'].sum(axis=0).tolist(),
    )
  )
  tree_stats = getattr(out, 'tree_stats', None)  # evaluation passes summed counts
  if tree_stats is not None:  # draft trees: nodes, non-first descents, depth histogram
    nodes, non_first, leaf = mh.to_host(tree_stats).sum(axis=0).tolist()
    m.update(
      spec_math.tree_metrics(
        int(h['num_rounds'].sum()), nodes, non_first, leaf,
        h['accepted_at'].sum(axis=0).tolist(),
      )
    )  # fmt: skip
  return m

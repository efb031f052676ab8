"""Adaptive long-tail rollout engine: batch compaction, and speculation only when it pays.

Why. RL rollouts have long-tailed response lengths: most sequences finish early and the
batch then decodes a handful of stragglers at the cost of the full static batch. Two
remedies, both lossless:

- *Compaction*: when the number of active sequences falls to a bucket boundary
  (``AdaptiveConfig.buckets``, powers of two by default), the active rows of every
  ``[B, ...]`` leaf of the state (tokens, logprobs, positions, flags, counters, the policy
  KV cache and the drafter's state) are gathered into the smallest bucket that holds them
  (:mod:`specrl.adaptive.state_ops`; a drafter's shared ``'rows'`` state stays whole);
  results are scattered back into the original ``[B, ...]`` layout when rows leave (at the
  next compaction and at the end).
- *Strategy per phase*: a small batch is memory/latency bound, which is where speculative
  decoding pays; a full batch usually is not. At every chunk boundary a policy
  (:mod:`specrl.adaptive.policies`) chooses plain decoding (``0``) or speculation with a
  draft length ``k`` from ``AdaptiveConfig.arms`` for the next chunk.

Decoding runs in *chunks*: one jitted ``lax.while_loop`` of the shared step chooser
(:func:`specrl.decoding.steps.decode_step`) for at most ``chunk_steps`` rounds that also
stops when the active count reaches the next bucket boundary. The host only syncs at
chunk boundaries (a 6-int stats vector), never per token. Jitted functions are compiled
ahead of time per (bucket, strategy) and cached on the engine.

Drafter state (a drafter's own KV cache) is built lazily, by a drafter prefill over the
committed tokens when a rollout first speculates -- typically in the tail, at a small
compacted batch -- so plain phases pay nothing for it (``always`` builds it at prefill).
Nor do later plain chunks feed it: the drafter catches up on their tokens at the first
round of the next speculative chunk, from the per-row "fed up to" counter in its state
(compacted with the row; :mod:`specrl.drafters.catchup`).

Buffer layout. A rollout starts on the *narrow* buffer of plain decoding (``seq_len``
slots), so a batch that never speculates pays exactly what the static plain engine pays;
the first speculative chunk widens the state once to ``seq_len + k_max + 1`` slots
(``k_max = max(arms)``; ``RolloutConfig.max_draft``). A chunk with ``k < k_max`` runs on
that wider buffer: nothing reads the scratch slots ``>= seq_len`` (every reader stays at
``<= pos < seq_len``; the KV cache masks by position); the final output clears them and is
cut or padded to ``rcfg.buffer_len`` (:func:`~specrl.adaptive.state_ops.clear_scratch`),
so outputs are laid out as the static engine's.

Host syncs. A plain chunk whose decision cannot change before the next bucket boundary
(every policy but TLT's patience count) runs to that boundary in one ``while_loop``; the
prefill is not synced at all. A batch that never compacts and never speculates is thus
prefill + one loop + finalize, as in the static engine.

RNG. Every draw is keyed by (rollout seed, sequence id, position) (:mod:`specrl.prng`),
so compaction never changes what a row samples: plain phases give the static engine's
tokens for the same key (logprobs agree up to XLA's batch-size-dependent rounding), and
with a deterministic policy (``never``, ``always``) a rollout is a function of its inputs.
``cost_model`` and ``tlt`` decide from measured times, so which k runs when can vary
between runs (every run is still lossless).

Entry point: :class:`AdaptiveRolloutEngine` -- same ``generate`` signature and output as
:class:`specrl.rollout.RolloutEngine`, plus ``engine.last_report`` (phases, decisions,
compile times, a trace for plotting) and the host-state hook (``host_state`` /
``load_host_state``) that puts what it learned into checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from specrl import drafters as drafters_lib
from specrl import model as model_lib
from specrl import multihost as mh
from specrl import sharding as shd
from specrl.adaptive.config import PLAIN, AdaptiveConfig, TreeArm, drafts, tree_arm
from specrl.adaptive.decisions import Decider
from specrl.adaptive.policies import ChunkObs, strategy_name
from specrl.adaptive.report import AdaptiveReport
from specrl.adaptive.state_ops import (
  ST_ACCEPTED,
  ST_ACTIVE,
  ST_LIVE,
  ST_ROUNDS,
  ST_SPAN,
  ST_STEP,
  ST_STEPS,
  ST_TOKENS,
  arg_signature,
  axis_positions,
  clear_scratch,
  compact_rows,
  compaction_plan,
  decode_chunk,
  scatter_rows,
  state_axes,
  state_stats,
  strip,
  widen,
)
from specrl.decoding import executables
from specrl.decoding import profile as profile_lib
from specrl.decoding import tree as tree_lib
from specrl.decoding.spec_math import CostProfile
from specrl.decoding.state import (
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
)
from specrl.decoding.steps import (
  fuse_setting,
  loop_params_jit,
  max_loop_steps,
  prefill,
  prefill_cache_slots,
)
from specrl.drafters import hooks
from specrl.rollout import kv_metrics, prepare_prompts, prepare_row_ids, rollout_metrics

log = logging.getLogger(__name__)


def _as_tree_arm(s: int, rcfg: RolloutConfig) -> int:
  """``rollout.tree_nodes`` with the adaptive engine: chain arm k -> the tree of k + 1
  nodes under ``rollout.tree_depth`` / ``tree_branch`` (tree arms stay as they are)."""
  if tree_arm(s) is not None:
    return s
  depth = min(rcfg.tree_depth or s, s)
  return TreeArm(depth=depth, branch=rcfg.tree_branch, nodes=s + 1).id


class AdaptiveRolloutEngine:
  """Rollout with compaction and a per-phase plain/speculative choice.

  Same interface as :class:`specrl.rollout.RolloutEngine` (``generate``, row ids,
  ``last_draft_shared``) and output; ``tail_hook(params, bucket)``, if set, runs before every
  chunk (eagle ``spot`` head updates; its time is out of the timings: adaptive/tail_hook_s);
  ``rcfg.num_draft`` is ignored unless ``acfg.enabled`` is False (the policy picks k).
  The output buffer is ``rcfg.buffer_len`` wide, as the static engine's. Compiled
  functions, profiles and what the policy has learned persist across calls;
  :meth:`with_config` makes an engine with another :class:`AdaptiveConfig` that shares
  the compiled functions and profiles.
  """

  def __init__(
    self,
    cfg: model_lib.ModelConfig,
    rcfg: RolloutConfig,
    acfg: AdaptiveConfig | None = None,
    drafter=None,
    mesh=None,
    _shared: AdaptiveRolloutEngine | None = None,
  ):
    acfg = AdaptiveConfig() if acfg is None else acfg
    if rcfg.num_draft:
      raise ValueError(
        f"rollout.num_draft={rcfg.num_draft} is the static engine's draft length; the "
        'adaptive engine takes its draft lengths from adaptive.arms (set rollout.num_draft=0)'
      )
    if acfg.policy != 'never' and drafter is None:
      raise ValueError(
        f"adaptive.policy {acfg.policy!r} needs a drafter (use 'never' for "
        'plain decoding with compaction)'
      )
    if rcfg.tree_nodes:  # rollout.tree_nodes: every chain arm k runs a tree of k + 1 nodes
      acfg = dataclasses.replace(acfg, arms=tuple(_as_tree_arm(s, rcfg) for s in acfg.arms))
    trees = [t for t in map(tree_arm, acfg.arms) if t is not None]
    max_nodes = max((t.nodes for t in trees), default=0)
    if trees and acfg.policy != 'never':  # tree arms need a drafter that can propose trees
      tree_lib.check_drafter(drafter, dataclasses.replace(rcfg, tree_nodes=max_nodes))
    self.cfg, self.rcfg, self.acfg, self.drafter = cfg, rcfg, acfg, drafter
    self.mesh = mesh if mesh is not None else shd.make_mesh((1, 1, 1), jax.devices()[:1])
    self.k_max = acfg.k_max
    # One config for every chunk: scratch laid out for the largest arm; each chunk's k is
    # a static argument of the step chooser. The state starts narrow (plain decoding's
    # ``seq_len`` slots) and is widened to ``buffer_len`` when a rollout first speculates.
    # Laid out for every arm (a 'never' engine never widens, so this costs it nothing) and,
    # for engines made by :meth:`with_config`, at least as wide as the engine they share
    # compiled functions and profiles with.
    scratch = max(acfg.k_max, _shared._wrcfg.max_draft if _shared is not None else 0)
    # the state carries tree counters when any arm is a tree (each chunk's own tree shape
    # comes from :meth:`_step_rcfg`), or the engine it shares compiled functions with has
    # them (one state structure for both)
    shared_nodes = _shared._wrcfg.tree_nodes if _shared is not None else 0
    self._wrcfg = dataclasses.replace(
      rcfg,
      max_draft=scratch,
      tree_nodes=max(max_nodes, shared_nodes),
      tree_depth=0,
      tree_branch=0,
    )
    self.narrow_len = rcfg.seq_len
    self.buffer_len = self._wrcfg.buffer_len
    # Drafter state (e.g. its own KV cache) exists only for drafters that keep one, and is
    # built lazily (:meth:`_attach_draft`) when a rollout first speculates -- usually late,
    # at a small compacted batch -- except for the 'always' policy (built at prefill).
    self._stateful = (
      drafter is not None and self.k_max > 0 and drafter.state_logical_axes() is not None
    )
    self._eager_draft = self._stateful and acfg.policy == 'always'
    self._prefill_len = self.buffer_len if acfg.policy == 'always' else self.narrow_len
    # rollout.grow_kv: the policy KV cache holds the chunk's length bucket, grown between
    # chunks (widening leaves it alone); memory follows the live rows, not the budget
    self._grow_kv = bool(rcfg.grow_kv and rcfg.attend_bucket)
    # compiled functions live in the process-wide LRU (decoding/executables.py) under this
    # token, shared with the engines made by with_config
    self._token = _shared._token if _shared is not None else object()
    self._profiles: dict = _shared._profiles if _shared is not None else {}
    self._prefill_s: dict = _shared._prefill_s if _shared is not None else {}  # batch -> s
    # the choice at each chunk boundary and what it learned (host state, no JAX)
    self.decider = Decider(acfg, self.k_max, max_loop_steps(rcfg))
    self.last_report: AdaptiveReport | None = None
    self.last_draft_shared = None  # as RolloutEngine's
    self.tail_hook = None  # callable(params, bucket): see the class docstring

  @property
  def profiles(self) -> dict:
    """(batch, buffer_len) -> :class:`CostProfile` measured (or set) so far."""
    return dict(self._profiles)

  def with_config(self, acfg: AdaptiveConfig) -> AdaptiveRolloutEngine:
    return AdaptiveRolloutEngine(self.cfg, self.rcfg, acfg, self.drafter, self.mesh, _shared=self)

  # -- profiles

  def set_profile(self, profile: CostProfile) -> None:
    """Use ``profile`` for its batch size instead of measuring (tests, offline tables)."""
    self._profiles[(profile.batch, self.buffer_len)] = profile

  def _profile(self, b: int, params, dparams_fn, report: AdaptiveReport) -> CostProfile:
    """The cost profile at batch b (measured on first use; ``dparams_fn()`` gives the
    drafter's params, derived outside the profiling time)."""
    key = (b, self.buffer_len)
    if key not in self._profiles:
      dparams = dparams_fn()
      t0 = time.perf_counter()
      self._profiles[key] = self._measure_profile(b, params, dparams)
      report.profile_s[b] = report.profile_s.get(b, 0.0) + time.perf_counter() - t0
    return self._profiles[key]

  def _measure_profile(self, b: int, params, dparams) -> CostProfile:
    """Time the unit costs at batch b on synthetic inputs of the real shapes."""
    return profile_lib.measure_profile(
      self.cfg,
      params,
      self.drafter,
      dparams,
      batch=b,
      buffer_len=self.buffer_len,
      k_ref=self._wrcfg.max_draft,
      sp=self.rcfg.sampling,
      max_prompt_len=self.rcfg.max_prompt_len,
      pos0=self.rcfg.seq_len // 2,
      reps=self.acfg.profile_reps,
      iters=self.acfg.profile_iters,
      mesh=self.mesh,
      fuse=fuse_setting(self.rcfg),  # the layout the chunks run
      # draft trees: when the widest arm is a tree, the profile times proposing a tree of
      # its nodes and depth (other arms' costs are inter/extrapolated until measured)
      tree_depth=self._profile_tree_depth(),
    )

  def _profile_tree_depth(self) -> int | None:
    t = tree_arm(self.acfg.always_arm) if self.acfg.policy != 'never' else None
    return None if t is None else t.depth

  # -- compiled functions (AOT, cached per shape; compile time reported per bucket)

  def _state_shardings(self, state: RolloutState):
    """Decode-layout shardings of a state of any batch and width (``DECODE_RULES``: a
    batch that the batch mesh axes do not divide -- a small compacted bucket -- is
    replicated); a stripped state (no caches) gets its fields' shardings only."""
    return shd.tree_shardings(state_axes(state, self.drafter), state, self.mesh, shd.DECODE_RULES)

  def _shardings(self, tree):
    """Shardings for an argument or result pytree: states get their canonical decode
    layout (so every function that passes a state on agrees on it, whatever XLA would
    have picked), device arrays keep theirs, host values are replicated."""
    rep = shd.replicated(self.mesh)
    mesh_devices = set(self.mesh.devices.flat)

    def one(x):
      if isinstance(x, RolloutState):
        return self._state_shardings(x)
      if isinstance(x, jax.Array) and x.sharding.device_set == mesh_devices:
        return x.sharding
      return rep  # host values, and arrays placed elsewhere (e.g. a key on device 0)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, RolloutState))

  def _compiled(self, key, fn, args, donate, report: AdaptiveReport, bucket: int):
    """AOT-compile ``fn`` once per ``key`` and argument shapes (compile time reported per
    bucket). States in and out use :meth:`_state_shardings`, so functions compiled apart
    (prefill, chunks, compaction, widening) pass states on without resharding."""
    key = key + arg_signature(args)  # draft_shared: original batch

    def build():
      t0 = time.perf_counter()
      out_abs = jax.eval_shape(fn, *args)
      jitted = jax.jit(
        fn,
        donate_argnums=donate,
        in_shardings=self._shardings(args),
        out_shardings=self._shardings(out_abs),
      )
      compiled = jitted.lower(*args).compile()
      dt = time.perf_counter() - t0
      report.compile_s[bucket] = report.compile_s.get(bucket, 0.0) + dt
      log.info('adaptive: compiled %s in %.2fs', key[:3], dt)
      return compiled

    return executables.CACHE.get((self._token, *key), build)

  def _attend_len(self, width: int, need: int) -> int | None:
    """The length bucket of a chunk on a ``width``-slot buffer whose first step needs
    ``need`` slots (None: ``rollout.attend_bucket = 0``, the dense reference)."""
    if not self.rcfg.attend_bucket:
      return None
    return bucket_for(attend_buckets(self._wrcfg, width), need)

  def _chunk_lengths(self, width: int, live: int, strategies) -> dict[int, int]:
    """strategy -> the slots a chunk of it would attend to now (its length bucket, the
    buffer width when dense): what its costs are keyed by (a speculative chunk runs on the
    wide buffer and needs its drafts' slots too; as the chunk itself is laid out below)."""
    out = {}
    for s in strategies:
      w = width if s == PLAIN else max(width, self.buffer_len)
      out[s] = self._attend_len(w, live + drafts(s)) or w
    return out

  def _step_rcfg(self, strategy: int) -> RolloutConfig:
    """The rollout config a chunk of ``strategy`` decodes with: a tree arm's shape as
    ``tree_nodes`` / ``tree_depth`` / ``tree_branch`` (a tree round), none for a chain."""
    t, w = tree_arm(strategy), self._wrcfg
    if t is None:
      return dataclasses.replace(w, tree_nodes=0) if w.tree_nodes else w
    depth = 0 if t.depth >= t.nodes - 1 else t.depth
    return dataclasses.replace(w, tree_nodes=t.nodes, tree_depth=depth, tree_branch=t.branch)

  def _shared_len(self, width: int, attend: int | None, span: int) -> int | None:
    """Slots of the drafter's shared corpus a chunk carries (``hooks.windows_shared``): the
    length bucket holding the chunk's ``attend`` and ``span`` (every position any row of the
    rollout committed: finished and compacted-away rows' text stays visible); None = all."""
    if attend is None or not hooks.windows_shared(self.drafter):
      return None
    w = bucket_for(attend_buckets(self._wrcfg, width), max(attend, span))
    return w if w < self.rcfg.seq_len else None

  def _chunk_fn(self, b, strategy, args, report, has_draft, attend_len=None, shared_len=None):
    cfg, rcfg, drafter, mesh = self.cfg, self._step_rcfg(strategy), self.drafter, self.mesh
    limit = max_loop_steps(self.rcfg)

    def fn(params, dparams, state, min_active, max_steps):
      return decode_chunk(
        params,
        dparams,
        state,
        min_active,
        max_steps,
        k=drafts(strategy),
        cfg=cfg,
        rcfg=rcfg,
        drafter=drafter,  # plain steps only use its optional hooks (observe, hidden)
        mesh=mesh,
        limit=limit,
        attend_len=attend_len,
        shared_len=shared_len,
      )

    key = ('chunk', b, strategy, args[2].tokens.shape[1], has_draft, attend_len, shared_len)
    return self._compiled(key, fn, args, (2,), report, b)

  def _widen(self, state, report):
    """The state on the wide buffer (``buffer_len`` slots), for speculation."""
    b, s = state.tokens.shape
    axes = axis_positions(state_axes(state, self.drafter), 'cache_seq')
    if self._grow_kv:  # the policy cache, and the drafter's state by position, grow by buckets
      none = lambda t: None if t is None else jax.tree.map(lambda _: -1, t)  # noqa: E731
      axes = axes.replace(cache=none(axes.cache), draft=none(axes.draft), hidden=none(axes.hidden))
    extra, pad = self.buffer_len - s, self.rcfg.pad_id
    f = self._compiled(
      ('widen', b, 0, s, state.cache is None, state.draft is not None, self._grow_kv),
      lambda st: widen(st, axes, extra, pad),
      (state,),
      (),  # new shapes: nothing to donate into
      report,
      b,
    )
    return f(state)

  def _grow(self, state, slots: int, report):
    """The state with its policy KV cache grown to ``slots`` slots (``rollout.grow_kv``:
    doubling by length buckets; a chunk at bucket ``a`` stops before any row needs more)."""
    have = model_lib.cache_slots(state.cache)
    if slots <= have:
      return state
    b, drafter = state.tokens.shape[0], self.drafter
    f = self._compiled(
      ('grow', b, 0, have, slots, state.draft is not None),
      lambda st: grow_cache(st, slots, drafter),
      (state,),
      (),  # new shapes: nothing to donate into
      report,
      b,
    )
    return f(state)

  def _attach_draft(self, state, dparams, report):
    """Build the drafter's state for a running batch: its prefill over every committed
    token (positions ``0..pos``; slots beyond hold stale tokens that the drafter's causal
    mask hides until its proposals overwrite them). Why lazily: a drafter cache for the
    full batch is wasted work when speculation only pays in the small-batch tail.
    With ``rollout.grow_kv`` its state is as wide as the policy cache (grown to the chunk's
    bucket first: every active row's committed positions lie below it) and the prefill
    runs over those slots only, not the budget."""
    b, s = state.tokens.shape
    drafter, seq_len, mesh = self.drafter, self.rcfg.seq_len, self.mesh
    if self._grow_kv:
      s = seq_len = min(seq_len, model_lib.cache_slots(state.cache))

    def fn(dp, st):
      ds = drafter.prefill(dp, st.tokens[:, :seq_len], st.pos + 1, s, mesh=mesh)
      return st.replace(draft=ds)

    f = self._compiled(('attach', b, 0, s), fn, (dparams, state), (1,), report, b)
    return f(dparams, state)

  # -- decisions

  @property
  def memory(self):
    """What the policy has learned (:class:`~specrl.adaptive.policies.Memory`), the
    decider's."""
    return self.decider.memory

  @memory.setter
  def memory(self, mem) -> None:
    self.decider.memory = mem

  def _decide(
    self,
    obs: ChunkObs | None,
    b,
    n_active,
    current,
    params,
    dparams_fn,
    report: AdaptiveReport,
    lengths: dict[int, int] | None = None,
  ) -> tuple[int, int, dict]:
    """(strategy, max_steps, info) for the next chunk at batch ``b``: the decider's
    (:meth:`Decider.decide`), with the bucket's cost profile measured first where the
    policy prices strategies (once per batch bucket)."""
    dec = self.decider
    prof = self._profile(b, params, dparams_fn, report) if dec.needs_profile else None
    return dec.decide(obs, b, n_active, current, prof, lengths)

  def _bucket_for(self, n_active: int, b: int) -> int:
    """Smallest bucket >= n_active (b itself when no bucket below b fits)."""
    fits = [x for x in self.acfg.buckets if n_active <= x < b]
    return min(fits) if fits else b

  def _boundary(self, b: int) -> int:
    """Active count at which a chunk at batch b stops for compaction (0: none)."""
    if not self.acfg.compaction:
      return 0
    below = [x for x in self.acfg.buckets if x < b]
    return max(below) if below else 0

  # -- the rollout

  def generate(
    self, params, prompt_tokens, prompt_len, rng, draft_params=None, group_ids=None, prompt_ids=None
  ):
    """The static engine's ``generate`` (same arguments and output), decoded in chunks:
    before each, compact to the smallest bucket holding the active rows and let the policy
    pick plain decoding or a draft length; after each, read its 6-int stats."""
    rcfg, acfg = self.rcfg, self.acfg
    prompt_tokens, prompt_len = prepare_prompts(
      prompt_tokens, prompt_len, rcfg, self.cfg.vocab_size
    )
    row_ids = prepare_row_ids(group_ids, prompt_ids, prompt_tokens.shape[0])
    if mh.is_multiprocess():  # this process's rows -> the global batch (host values are
      # replicated inputs of the prefill, as with one process)
      prompt_tokens, prompt_len = mh.allgather_rows(prompt_tokens), mh.allgather_rows(prompt_len)
      row_ids = tuple(mh.allgather_rows(x) for x in row_ids)
    bsz = prompt_tokens.shape[0]
    dparams_fn = self._draft_params_getter(params, draft_params)
    report = AdaptiveReport(batch=bsz, policy=acfg.policy)
    self.decider.start_rollout()
    i32 = np.int32
    t_start = time.perf_counter()

    def now():  # seconds since the start, compile and profiling time excluded
      extra = sum(report.compile_s.values()) + sum(report.profile_s.values()) + report.hook_s
      return time.perf_counter() - t_start - extra

    state, prefill_left = self._prefill(
      params, dparams_fn, prompt_tokens, prompt_len, rng, row_ids, report, now
    )
    n_active, step = bsz, 0
    limit = max_loop_steps(rcfg)
    # CPU: layers sliced once per rollout; q/k/v and gate/up fused (rollout.fuse_matmuls)
    loop_params = loop_params_jit(params, None, fuse_setting(rcfg), self.mesh)
    pending = None  # a chunk whose stats are not read yet
    b, origin, acc = bsz, None, None
    report.kv_per_slot = kv_bytes_per_slot(state)
    current: int | None = None
    obs: ChunkObs | None = None
    live = rcfg.max_prompt_len + 1  # slots a plain step needs after prefill (at most)
    self._span = rcfg.max_prompt_len + 1  # slots any row committed to (at most), so far
    self.last_windows = []  # per chunk: (batch, strategy, attend_len, shared_len)
    while n_active > 0 and step < limit:
      target = self._bucket_for(n_active, b) if acfg.compaction else b
      if target < b:
        state, origin, acc = self._compact(state, origin, acc, target, bsz, report)
        report.compactions.append((now(), b, target, n_active))
        b = target
      if self.tail_hook is not None:  # before each chunk (after a host sync but the first)
        t_hook = time.perf_counter()
        self.tail_hook(params, b)
        report.hook_s += time.perf_counter() - t_hook
      lengths = self._chunk_lengths(state.tokens.shape[1], live, (PLAIN, *acfg.arms))
      strategy, max_steps = self._agreed_decision(
        obs, b, n_active, current, params, dparams_fn, report, lengths, now, step
      )
      dparams = None if strategy == PLAIN else dparams_fn()
      if strategy != PLAIN and state.tokens.shape[1] < self.buffer_len:
        state = self._widen(state, report)
      width = state.tokens.shape[1]
      attend = self._attend_len(width, live + drafts(strategy))
      if self._grow_kv:  # grow first: every write of the chunk lands inside the cache
        state = self._grow(state, attend or width, report)
      if strategy != PLAIN and self._stateful and state.draft is None:
        state = self._attach_draft(state, dparams, report)
      self._note_memory(state, b, report)
      # the drafter's shared corpus: a bucket holding every row's committed text
      shared = self._shared_len(width, attend, self._span)
      self.last_windows.append((b, strategy, attend, shared))
      cargs = (loop_params, dparams, state, i32(self._boundary(b)), i32(max_steps))
      report.length_buckets.add((width, attend))
      chunk = self._chunk_fn(b, strategy, cargs, report, state.draft is not None, attend, shared)
      t0 = now()
      report.trace.append((t0, n_active, b, strategy))
      state, both = chunk(*cargs)
      # A plain chunk with nothing left to compact into and no step cap ends the rollout
      # (all done, or the global step limit): finalize without waiting on its stats, so
      # the host sync does not sit between the loop and the finalize (as in the static
      # engine); the stats are read after the finalize is dispatched.
      last = strategy == PLAIN and self._boundary(b) == 0 and max_steps >= limit
      last &= attend is None or attend == width  # the last length bucket: no stop of its own
      pending = (both, t0, b, strategy, n_active, 0.0 if obs is not None else prefill_left)
      pending += (attend or width,)  # the chunk's length bucket: its costs' key
      if last:
        break
      obs, pending = self._observe(pending, report, now), None
      current = strategy
      n_active, step, live = obs.active_end, obs.global_step, obs.live_slots
      if obs.steps == 0 and self._bucket_for(n_active, b) == b:  # no progress possible
        break

    self.last_draft_shared = state.draft_shared  # rows of the original batch: not compacted
    out = self._finalize(state, acc, origin, b, bsz, report)
    if pending is not None:
      self._observe(pending, report, now)
    out = jax.block_until_ready(out)
    dt = time.perf_counter() - t_start - report.hook_s
    self.last_report = report
    return out, self._metrics(out, dt, report)

  def _draft_params_getter(self, params, draft_params):
    """A function giving the drafter's params on first use only (a rollout that never
    speculates never pays for them): derived from the policy inside jit (params are
    arguments), or the drafter's own params as they are -- never closed over as jit
    constants."""
    derived = []

    def dparams_fn():
      if self.drafter is None:
        return None
      if not derived:
        dp = draft_params
        if dp is None and not self.drafter.derived:
          dp = self.drafter.params_from_policy(params)
        elif dp is None:
          derive = executables.CACHE.get(
            (self._token, 'derive'), lambda: jax.jit(self.drafter.params_from_policy)
          )
          dp = derive(params)
        derived.append(drafters_lib.place_draft_params(self.drafter, dp, self.mesh))
      return derived[0]

    return dparams_fn

  def _prefill(self, params, dparams_fn, prompt_tokens, prompt_len, rng, row_ids, report, now):
    """(state, prefill seconds still to take off the first chunk's time). The prefill is
    not synced (after the first rollout at this batch size, which measures it once): the
    first chunk runs at the full batch whatever finished at prefill (a row done at its
    first token only shows up as a smaller active count after it), and the prefill's
    measured time is taken off that chunk's time before it is learned from."""
    cfg, mesh, wrcfg, bsz = self.cfg, self.mesh, self._wrcfg, prompt_tokens.shape[0]

    def prefill_fn(params, dparams, toks, lens, rng, group_ids, prompt_ids):
      pkw = dict(drafter=self.drafter, draft_params=dparams, buffer_len=self._prefill_len)
      pkw['cache_slots'] = prefill_cache_slots(wrcfg, self._prefill_len)
      pkw.update(group_ids=group_ids, prompt_ids=prompt_ids, build_draft=self._eager_draft)
      state = prefill(params, toks, lens, rng, cfg=cfg, rcfg=wrcfg, mesh=mesh, **pkw)
      return state, state_stats(state, 0)

    dp0 = dparams_fn() if self._eager_draft else None
    args = (params, dp0, prompt_tokens, prompt_len, rng) + row_ids
    prefill_j = self._compiled(
      ('prefill', bsz, 0, self._prefill_len, self._eager_draft), prefill_fn, args, (), report, bsz
    )
    state, pstats = prefill_j(*args)
    if bsz in self._prefill_s:
      return state, self._prefill_s[bsz]
    t0 = now()
    jax.block_until_ready(pstats)
    self._prefill_s[bsz] = now() - t0
    return state, 0.0

  def _agreed_decision(
    self, obs, b, n_active, current, params, dparams_fn, report, lengths, now, step
  ) -> tuple[int, int]:
    """(strategy, max_steps) for the next chunk, the same in every process, recorded in
    the report (and logged) where the strategy changes."""
    strategy, max_steps, info = self._decide(
      obs, b, n_active, current, params, dparams_fn, report, lengths
    )
    if mh.is_multiprocess() and self.acfg.policy not in ('always', 'never'):
      # decided from measured times, which differ between processes: process 0's choice
      strategy, max_steps = (int(x) for x in mh.broadcast(np.asarray([strategy, max_steps])))
    else:  # from replicated data: the same everywhere, or a clear error before dispatch
      mh.check_agree(
        f'the adaptive decision (strategy, steps) at bucket {b}', [strategy, max_steps]
      )
    if strategy != current:
      d = dict(t=now(), step=step, bucket=b, active=n_active, strategy=strategy, **info)
      report.decisions.append(d)
      log.info(
        'adaptive[%s]: bucket %d, %d active -> %s %s',
        self.acfg.policy,
        b,
        n_active,
        strategy_name(strategy),
        info,
      )
    report.chosen.setdefault(b, [])
    if not report.chosen[b] or report.chosen[b][-1] != strategy:
      report.chosen[b].append(strategy)
    return strategy, max_steps

  def _note_memory(self, state, b: int, report: AdaptiveReport) -> None:
    """The peak KV bytes of the policy's cache and the drafter's state, as the chunk about
    to run at batch ``b`` holds them."""
    report.kv_peak = max(
      report.kv_peak, b * model_lib.cache_slots(state.cache) * report.kv_per_slot
    )
    report.draft_kv_per_slot = dper = draft_bytes_per_slot(state, self.drafter)
    report.draft_kv_peak = max(report.draft_kv_peak, b * draft_slots(state, self.drafter) * dper)

  def _finalize(self, state, acc, origin, b: int, bsz: int, report: AdaptiveReport):
    """The rollout's output in the original ``[bsz, ...]`` layout: rows still in the
    compacted state scattered back into those that left earlier, scratch cleared, cut or
    padded to ``rcfg.buffer_len`` (dispatched, not waited on)."""
    seq_len, width, pad, wrcfg = (
      self.rcfg.seq_len,
      self.rcfg.buffer_len,
      self.rcfg.pad_id,
      self._wrcfg,
    )
    fin_width = state.tokens.shape[1]

    def fin_fn(acc, st, origin):
      if acc is not None:
        st = scatter_rows(acc, st, origin)
      return clear_scratch(finalize(st, wrcfg), seq_len, width, pad)

    if acc is not None and acc.tokens.shape[1] < fin_width:  # rows left before widening
      acc = self._widen(acc, report)
    fargs = (acc, strip(state), origin)
    key = ('final', bsz, None if acc is None else b, fin_width)
    return self._compiled(key, fin_fn, fargs, (), report, bsz)(*fargs)

  def _observe(self, pending, report: AdaptiveReport, now) -> ChunkObs:
    """Read a chunk's stats (a host sync), record it and fold it into the memory."""
    both, t0, b, strategy, n_active, prefill_s, length = pending
    st0, stats = mh.to_host(both)
    t1 = now()
    # The first chunk also waited for the prefill: learn from its time without it (not at
    # all if that leaves too little to be a measurement); the report keeps the wall time.
    learn_s = t1 - t0 - prefill_s
    delta = stats - st0
    obs = ChunkObs(
      bucket=b,
      strategy=strategy,
      steps=int(stats[ST_STEPS]),
      seconds=max(learn_s, 0.0),
      tokens=int(delta[ST_TOKENS]),
      rounds=int(delta[ST_ROUNDS]),
      accepted=int(delta[ST_ACCEPTED]),
      active_start=n_active,
      active_end=int(stats[ST_ACTIVE]),
      global_step=int(stats[ST_STEP]),
      live_slots=int(stats[ST_LIVE]),
      timed=learn_s > 0.25 * (t1 - t0),
      length=length,
    )
    report.trace.append((t1, obs.active_end, b, strategy))
    self._span = max(self._span, int(stats[ST_SPAN]))  # committed slots, every row so far
    ph = report.phases.setdefault(
      f'b{b}/{strategy_name(strategy)}',
      dict(time_s=0.0, tokens=0, steps=0, accepted=0, drafted=0),
    )
    ph['time_s'] += t1 - t0
    ph['tokens'] += obs.tokens
    ph['steps'] += obs.steps
    ph['accepted'] += obs.accepted
    ph['drafted'] += obs.rounds * drafts(obs.strategy)
    report.drafted += obs.rounds * drafts(obs.strategy)
    prof = self._profiles.get((b, self.buffer_len))
    self.decider.observe(obs, prof)
    return obs

  def _compact(self, state, origin, acc, target, bsz, report):
    """Gather the active rows into batch ``target``; write the rows leaving into ``acc``.

    Returns (state, origin, acc): ``origin`` int32 [target] maps rows to the original
    batch (``bsz`` for padding rows, which repeat a finished row and are never written
    back).
    """
    b = state.pos.shape[0]
    done = mh.to_host(state.done)
    idx, cur_origin, new_origin = compaction_plan(done, origin, target, bsz)
    mh.check_agree(f'the compaction plan to bucket {target}', idx)  # no-op with one process
    has_draft = state.draft is not None
    axes = axis_positions(state_axes(state, self.drafter), 'batch')
    if acc is None:  # still at the original batch: every row's home is itself
      g = self._compiled(
        ('gather', b, target, state.tokens.shape[1], has_draft),
        lambda st, i, o: compact_rows(st, i, o, axes),
        (state, idx, new_origin),
        (),
        report,
        target,
      )
      return g(state, idx, new_origin), new_origin, strip(state)

    if acc.tokens.shape[1] < state.tokens.shape[1]:  # rows left before widening
      acc = self._widen(acc, report)

    def fn(acc, st, idx, origin, new_origin):  # one compile per (b, target): scatter, gather
      return scatter_rows(acc, strip(st), origin), compact_rows(st, idx, new_origin, axes)

    args = (acc, state, idx, cur_origin, new_origin)
    key = ('compact', b, target, state.tokens.shape[1], acc.tokens.shape[1], bsz, has_draft)
    f = self._compiled(key, fn, args, (0,), report, target)
    acc, state = f(*args)
    return state, new_origin, acc

  def _metrics(self, out: RolloutOutput, seconds: float, report: AdaptiveReport) -> dict:
    m = rollout_metrics(out, seconds)
    m.update(report.metrics())
    m.update(executables.CACHE.metrics())
    # length buckets (attention over the first ``a`` slots) the chunks ran in, and the bound
    # on them: the buckets of the narrow (plain-only) and the wide buffer
    widths = {self._prefill_len, self.buffer_len}
    m['rollout/length_buckets'] = len(report.length_buckets)
    m['rollout/length_bucket_variants'] = len(
      {(w, a) for w in widths for a in attend_buckets(self._wrcfg, w)}
    )
    m.update(kv_metrics(out, report.kv_peak, report.kv_per_slot))
    if report.draft_kv_per_slot:  # the drafter's state by position (its KV cache, hidden)
      m.update(kv_metrics(out, report.draft_kv_peak, report.draft_kv_per_slot, 'draft_kv'))
    # the running i.i.d. per-token acceptance implied by tokens per pass (the cost model's);
    # not spec/alpha (committed accepted / drafted): see specrl.decoding.spec_math
    m['adaptive/implied_alpha'] = float(self.memory.alpha)
    return m

  # -- host state (checkpointed with the train state)

  def host_state(self) -> dict:
    """What the engine has learned across rollouts (:meth:`Decider.host_state`). Profiles
    are re-measured after a restart."""
    return self.decider.host_state()

  def load_host_state(self, d: dict) -> None:
    self.decider.load_host_state(d)

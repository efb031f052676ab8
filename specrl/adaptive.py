"""Adaptive long-tail rollout: batch compaction, and speculation only when it pays.

Why. RL rollouts have long-tailed response lengths: most sequences finish early and the
batch then decodes a handful of stragglers at the cost of the full static batch. Two
remedies, both lossless:

- *Compaction*: when the number of active sequences falls to a bucket boundary
  (``AdaptiveConfig.buckets``, powers of two by default), the active rows of every
  ``[B, ...]`` leaf of :class:`specrl.rollout.RolloutState` (tokens, logprobs, positions,
  flags, the policy KV cache ``[L, B, S, K, Dh]`` -- batch on axis 1 -- and the drafter's
  state) are gathered into the smallest bucket that holds them; decoding continues there.
  Results are scattered back into the original ``[B, ...]`` layout when rows leave (at
  the next compaction and at the end). Which axis of each leaf is the batch axis comes
  from the logical axes (:func:`specrl.rollout.state_logical_axes`), so any drafter state
  that declares its axes is compacted correctly.
- *Strategy per phase*: a small batch is memory/latency bound, which is where speculative
  decoding pays; a full batch usually is not. At every chunk boundary a policy chooses
  plain decoding (``0``) or speculation with draft length ``k`` for the next chunk.

Decoding runs in *chunks*: one jitted ``lax.while_loop`` of at most ``chunk_steps`` rounds
that also stops when the active count reaches the next bucket boundary. The host only
syncs at chunk boundaries (a 6-int stats vector), never per token. Jitted functions are
compiled ahead of time per (bucket, strategy) and cached on the engine: the compile cost
is paid once per bucket per engine and reported per bucket.

Drafter state (a drafter's own KV cache) is built lazily, by a drafter prefill over the
committed tokens when a rollout first speculates -- typically in the tail, at a small
compacted batch -- so plain phases pay nothing for it (``always`` builds it at prefill).

Buffer layout. ``RolloutConfig.buffer_len = seq_len + k + 1`` depends on ``num_draft``.
A rollout starts on the *narrow* buffer of plain decoding (``seq_len`` slots), so a batch
that never speculates pays exactly what the static plain engine pays; the first
speculative chunk widens the state once (:func:`widen`, one copy of the caches, usually
at a small compacted batch) to ``seq_len + k_max + 1`` slots, ``k_max`` being the largest
k the policy may choose. A chunk with draft length ``k < k_max`` runs with
``replace(rcfg, num_draft=k)`` on that wider buffer: :func:`specrl.rollout.commit` drops
not-taken tokens at index ``state.tokens.shape[1]``, and nothing reads the scratch slots
``>= seq_len`` (every reader stays at ``<= pos < seq_len``; the KV cache masks by
position); the final output clears them and is cut or padded to the static engine's
``rcfg.buffer_len`` (:func:`clear_scratch`), so outputs are identical to the static
engine's.

Host syncs. A plain chunk whose decision cannot change before the next bucket boundary
(every policy but TLT's patience count: plain phases learn nothing that moves them) runs
to that boundary in one ``while_loop``; the prefill is not synced at all. A batch that
never compacts and never speculates is thus prefill + one loop + finalize, as in the
static engine.

RNG. Per-round randomness is ``fold_in(state.rng, state.step)``, shared by the rows of a
``[B, V]`` categorical. Compaction changes B, so sampled tokens differ from an uncompacted
run (each row still samples the policy exactly: lossless, checked statistically in the
tests). Greedy tokens are identical; logprobs too, up to XLA's batch-size-dependent
rounding (XLA:CPU's forward at batch 1 differs from the same rows at batch 8 by <= 2.4e-7;
batches 2..8 agree bitwise) -- a property of the compiler, not of compaction.

Policies (``AdaptiveConfig.policy``):

- ``cost_model`` (default): maximise expected tokens/s per active row,
  ``E[tokens/round] / time/round``, with ``E = (1 - a^(k+1)) / (1 - a)`` (1 for plain) and
  time/round from a per-bucket :class:`CostProfile` (policy forward at T = 1 and
  T = k_max + 1, drafter ``propose`` at k = 1 and 2, timed when a bucket is first used;
  linear in k) corrected online by measured chunk times (the first chunk of a rollout
  also waits for the unsynced prefill: its measured time is taken off); ``a`` is the
  running per-token acceptance, raised towards 1 while few rounds were observed
  (optimism: else a low prior never speculates and never learns ``a``); a speculative
  round's cost is divided by the measured *yield* at that (bucket, k) -- committed /
  emitted tokens, < 1 when rows finish mid-run and waste the rest of their drafts,
  which acceptance alone misses.
  Hysteresis: switch only for a ``1 + hysteresis`` better rate.
- ``tlt``: speculation on once the active count stays ``<= tlt_threshold`` for
  ``tlt_patience`` steps; then epsilon-greedy over ``arms`` per bucket, reward = tokens
  per second of the chunk (= accepted tokens x batch / step time), median over a window.
- ``roofline``: on iff predicted speedup ``L / (g r + v) > roofline_min_speedup`` with
  ``L = (1 - a^(g+1)) / (1 - a)``, ``r``, ``v`` the draft (per token) and verify costs
  relative to a plain step; ``g`` moves up the ladder when the measured acceptance is
  ``>= roofline_up`` and down when ``<= roofline_down``.
- ``always`` (``always_k``) / ``never``: fixed baselines.

Entry point: :class:`AdaptiveRolloutEngine` -- same ``generate`` signature and output as
:class:`specrl.rollout.RolloutEngine`, plus ``engine.last_report`` (phases, decisions,
compile times, a trace for plotting).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl import sharding as shd
from specrl import speculative

log = logging.getLogger(__name__)

POLICIES = ('cost_model', 'tlt', 'roofline', 'always', 'never')
PLAIN = 0  # strategy id of plain decoding; k >= 1 = speculation with k drafts

# RolloutState fields with a batch axis that the output needs (scattered back).
_OUT_FIELDS = (
  'tokens',
  'logprobs',
  'pos',
  'prompt_len',
  'num_generated',
  'done',
  'finish',
  'num_rounds',
  'num_accepted',
)
# Layout of the per-chunk stats vector (int32 [6]).
_ST_STEPS, _ST_ACTIVE, _ST_TOKENS, _ST_ROUNDS, _ST_ACCEPTED, _ST_STEP = range(6)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
  """Static settings of the adaptive rollout (hashable).

  ``enabled=False`` gives the static engine's behaviour through the same code path: no
  compaction, and a fixed strategy (``rcfg.num_draft``: 0 = plain).
  """

  enabled: bool = True
  compaction: bool = True
  buckets: tuple[int, ...] = (256, 128, 64, 32, 16, 8, 4, 2, 1)
  policy: str = 'cost_model'
  arms: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)  # draft lengths cost_model / tlt choose
  chunk_steps: int = 16  # rounds per jitted chunk (host decisions in between)
  # cost model
  hysteresis: float = 0.1  # switch strategy only for a > (1 + hysteresis) better rate
  alpha_prior: float = 0.7  # per-token acceptance assumed before any is measured
  alpha_memory: float = 64.0  # inertia of the running acceptance, in sequence-rounds
  # Optimism while acceptance is unmeasured: decide with a + (1 - a) * m / (m + n) after n
  # sequence-rounds of speculation (m = alpha_optimism; 0 = off). Without it a pessimistic
  # prior never speculates and so never learns the real acceptance.
  alpha_optimism: float = 16.0
  learn_online: bool = True  # correct profiled costs with measured chunk times
  cost_memory: float = 8.0  # inertia of measured round times, in rounds
  profile_reps: int = 4  # steps per timed profiling call
  profile_iters: int = 3  # timed profiling calls (median)
  # always
  always_k: int = 4
  # TLT
  tlt_threshold: int = 32
  tlt_patience: int = 8  # steps at <= threshold before speculation turns on
  tlt_epsilon: float = 0.1
  tlt_window: int = 8  # rewards per (bucket, k) arm kept for the median
  tlt_default_k: int = 4  # first arm when no arm has a reward yet
  # roofline
  roofline_ladder: tuple[int, ...] = (5, 7, 9, 11)
  roofline_up: float = 0.94
  roofline_down: float = 0.85
  roofline_min_speedup: float = 1.05
  seed: int = 0  # host RNG of the TLT bandit
  # scratch slots of the state buffer = k_max + 1; 0 = the largest k the policy can pick.
  # Engines with equal k_max share compiled functions (see AdaptiveRolloutEngine.with_config).
  k_max: int = 0

  def __post_init__(self):
    def bad(field, msg):
      raise ValueError(f'adaptive.{field} {msg}, got {getattr(self, field)!r}')

    if self.policy not in POLICIES:
      bad('policy', f'must be one of {POLICIES}')
    b = self.buckets
    if not b or any(x < 1 for x in b) or list(b) != sorted(set(b), reverse=True):
      bad('buckets', 'must be distinct positive batch sizes in descending order')
    if not self.arms or any(k < 1 for k in self.arms):
      bad('arms', 'must be draft lengths >= 1')
    if not self.roofline_ladder or any(k < 1 for k in self.roofline_ladder):
      bad('roofline_ladder', 'must be draft lengths >= 1')
    if self.chunk_steps < 1:
      bad('chunk_steps', 'must be >= 1')
    if self.always_k < 1:
      bad('always_k', 'must be >= 1')
    if not 0.0 <= self.alpha_prior < 1.0:
      bad('alpha_prior', 'must be in [0, 1)')
    if not 0.0 <= self.tlt_epsilon <= 1.0:
      bad('tlt_epsilon', 'must be in [0, 1]')
    if self.tlt_window < 1 or self.tlt_patience < 0 or self.tlt_threshold < 1:
      bad('tlt_window', 'window >= 1, patience >= 0 and threshold >= 1 are required')
    if self.hysteresis < 0:
      bad('hysteresis', 'must be >= 0')
    if self.alpha_optimism < 0:
      bad('alpha_optimism', 'must be >= 0')
    if self.k_max and self.k_max < self.policy_k_max():
      bad(
        'k_max',
        f'must be 0 or >= {self.policy_k_max()}, the largest k policy {self.policy!r} can choose',
      )

  def policy_k_max(self) -> int:
    """Largest draft length the policy can choose."""
    if self.policy == 'never':
      return 0
    return {
      'cost_model': max(self.arms),
      'tlt': max(self.arms),
      'roofline': max(self.roofline_ladder),
      'always': self.always_k,
    }[self.policy]

  def buffer_k(self) -> int:
    """The k the state buffer is laid out for (its scratch slots: ``k + 1``)."""
    return self.k_max or self.policy_k_max()


# ----------------------------------------------------------------------------- theory


def expected_tokens(alpha: float, k: int) -> float:
  """Expected tokens per round, ``(1 - a^(k+1)) / (1 - a)``; 1 for plain (k = 0).

  Leviathan et al. 2023 with i.i.d. per-token acceptance ``a``: k drafts, the accepted
  prefix, plus the one token the verify pass always emits.
  """
  if k <= 0:
    return 1.0
  a = min(max(float(alpha), 0.0), 1.0)
  if a >= 1.0 - 1e-12:
    return float(k + 1)
  return (1.0 - a ** (k + 1)) / (1.0 - a)


def optimistic_alpha(alpha: float, n: float, optimism: float) -> float:
  """Acceptance to decide with after ``n`` observed sequence-rounds: ``alpha`` raised
  towards 1 by ``optimism / (optimism + n)`` (1 before any observation, -> alpha as n
  grows): optimism in the face of uncertainty, so speculation is tried where it would
  pay at a high acceptance, and dropped once measured not to pay."""
  if optimism <= 0:
    return alpha
  return alpha + (1.0 - alpha) * optimism / (optimism + n)


def alpha_from_tokens_per_round(tau: float, k: int) -> float:
  """Invert :func:`expected_tokens`: the per-token acceptance giving ``tau`` tokens per
  round at draft length k (bisection; ``tau`` clipped to ``[1, k + 1]``)."""
  if k <= 0:
    raise ValueError('acceptance is only defined for k >= 1')
  tau = min(max(float(tau), 1.0), k + 1.0)
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    if expected_tokens(mid, k) < tau:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


@flax.struct.dataclass
class CostProfile:
  """Measured unit costs (seconds) at one batch size and buffer length.

  ``fwd1``/``fwd_ref``: one policy cache-extending forward at T = 1 / T = ``k_ref + 1``;
  ``prop1``/``prop_ref``: one drafter ``propose`` of 1 / ``k_prop`` tokens (0: ``k_ref``).
  Costs at other k are linear inter/extrapolations: a forward's cost is affine in T over
  this small range, and ``propose`` is one T <= 2 step plus k - 1 T = 1 steps (so two
  points pin it down; the profiler measures k = 1, 2, the cheapest).
  """

  batch: int
  k_ref: int
  fwd1: float
  fwd_ref: float
  prop1: float
  prop_ref: float
  k_prop: int = 0

  def verify(self, k: int) -> float:
    """Policy forward over the k + 1 verify tokens."""
    return self.fwd1 + (self.fwd_ref - self.fwd1) * k / max(self.k_ref, 1)

  def propose(self, k: int) -> float:
    kp = self.k_prop or self.k_ref
    if kp <= 1:
      return self.prop1 * k
    return self.prop1 + (self.prop_ref - self.prop1) * (k - 1) / (kp - 1)

  def round(self, s: int) -> float:
    """Profiled seconds per round of strategy ``s`` (0 = plain), engine overhead excluded."""
    return self.fwd1 if s == PLAIN else self.propose(s) + self.verify(s)


@flax.struct.dataclass
class ChunkObs:
  """What the host learns from one chunk: the policies' only input from the device."""

  bucket: int  # batch size the chunk ran at
  strategy: int  # 0 = plain, else k
  steps: int  # rounds run
  seconds: float  # wall time of the chunk (dispatch to stats on the host)
  tokens: int  # tokens committed (all rows)
  rounds: int  # sequence-rounds of verification (speculative only)
  accepted: int  # accepted drafts over those rounds
  active_start: int
  active_end: int
  # False: ``seconds`` is no per-round cost (e.g. it includes other work), so it is not
  # learned from. (The engine takes the prefill off a rollout's first chunk instead.)
  timed: bool = True
  global_step: int = 0  # the rollout's loop iterations after the chunk

  @property
  def yield_(self) -> float | None:
    """Committed / emitted tokens over this chunk's verify passes (None when it did not
    speculate): a pass emits accepted + 1 tokens per row, but a row that reaches EOS,
    ``max_new_tokens`` or the cache end mid-run commits fewer -- short tails waste
    long drafts, which the acceptance alone does not show."""
    if self.strategy == PLAIN or self.rounds <= 0:
      return None
    return min(max(self.tokens / (self.accepted + self.rounds), 0.0), 1.0)

  @property
  def alpha(self) -> float | None:
    """Per-token acceptance measured in this chunk (None when it did not speculate)."""
    if self.strategy == PLAIN or self.rounds <= 0:
      return None
    return alpha_from_tokens_per_round(1.0 + self.accepted / self.rounds, self.strategy)


# ----------------------------------------------------------------------------- policies


def cost_model_choose(
  costs: Mapping[int, float], alpha: float, current: int | None, hysteresis: float
) -> tuple[int, dict[int, float]]:
  """Strategy with the highest expected tokens/s per active row, with hysteresis.

  Args:
    costs: strategy (0 = plain, k = speculative) -> seconds per round at this bucket.
    alpha: running per-token acceptance.
    current: the strategy in use (kept unless another is ``> 1 + hysteresis`` better).
  Returns:
    (strategy, rates {strategy: expected tokens per second per row}).
  """
  rates = {s: expected_tokens(alpha, s) / max(t, 1e-12) for s, t in costs.items()}
  best = max(sorted(rates), key=lambda s: rates[s])  # ties: the smallest k (plain first)
  if current in rates and rates[best] <= rates[current] * (1.0 + hysteresis):
    return current, rates
  return best, rates


@flax.struct.dataclass
class TltState:
  """TLT-style policy state. ``rewards`` ((bucket, k) -> recent rewards) persists across
  rollouts; ``below_steps`` / ``on`` are per rollout (see :func:`tlt_reset`)."""

  below_steps: int = 0
  on: bool = False
  rewards: dict = flax.struct.field(pytree_node=False, default_factory=dict)


def tlt_reset(state: TltState) -> TltState:
  return state.replace(below_steps=0, on=False)


def tlt_update(
  state: TltState,
  obs: ChunkObs | None,
  n_active: int,
  bucket: int,
  acfg: AdaptiveConfig,
  u: tuple[float, float],
) -> tuple[TltState, int, int]:
  """One TLT decision for the next chunk.

  Args:
    obs: the chunk just run (None before the first).
    n_active: active sequences now; bucket: the batch size the next chunk runs at.
    u: two uniforms in [0, 1) (explore?, which arm) -- passed in to keep this pure.
  Returns:
    (state, strategy, max_steps): ``max_steps`` caps the next chunk so that the patience
    count is checked on time (``acfg.chunk_steps`` otherwise).
  """
  rewards = dict(state.rewards)
  below = state.below_steps
  if obs is not None:
    if obs.strategy != PLAIN and obs.steps > 0 and obs.seconds > 0:
      key = (obs.bucket, obs.strategy)
      rewards[key] = (rewards.get(key, ()) + (obs.tokens / obs.seconds,))[-acfg.tlt_window :]
    if obs.active_start <= acfg.tlt_threshold:
      below += obs.steps
  if n_active > acfg.tlt_threshold:
    below = 0
  on = state.on or (n_active <= acfg.tlt_threshold and below >= acfg.tlt_patience)
  state = state.replace(below_steps=below, on=on, rewards=rewards)
  if not on:
    room = acfg.tlt_patience - below if n_active <= acfg.tlt_threshold else acfg.chunk_steps
    return state, PLAIN, max(1, min(acfg.chunk_steps, room))
  arms = tuple(acfg.arms)
  if u[0] < acfg.tlt_epsilon:
    return state, arms[min(int(u[1] * len(arms)), len(arms) - 1)], acfg.chunk_steps
  # exploit: best median reward in this bucket, else in the nearest larger bucket with data
  for b in sorted({bk for bk, _ in rewards if bk >= bucket}):
    scored = {k: statistics.median(rewards[(b, k)]) for k in arms if (b, k) in rewards}
    if scored:
      return state, max(sorted(scored), key=lambda k: scored[k]), acfg.chunk_steps
  default = acfg.tlt_default_k if acfg.tlt_default_k in arms else arms[len(arms) // 2]
  return state, default, acfg.chunk_steps


@flax.struct.dataclass
class RooflineState:
  """Roofline policy state: position on the draft-length ladder (persists)."""

  index: int = 0


def roofline_update(
  state: RooflineState,
  alpha: float,
  measured_alpha: float | None,
  ratios: Mapping[int, tuple[float, float]],
  acfg: AdaptiveConfig,
) -> tuple[RooflineState, int, float]:
  """Move the ladder on the last chunk's measured acceptance, then decide on/off.

  Args:
    alpha: running per-token acceptance (for the predicted L).
    measured_alpha: acceptance measured by the chunk just run (None if it did not
      speculate: the ladder stays).
    ratios: gamma -> (r, v): draft cost per token and verify cost per round, both
      relative to one plain step, at the bucket of the next chunk.
  Returns:
    (state, strategy (gamma or 0), predicted speedup).
  """
  ladder = tuple(acfg.roofline_ladder)
  idx = min(state.index, len(ladder) - 1)
  if measured_alpha is not None:
    if measured_alpha >= acfg.roofline_up:
      idx = min(idx + 1, len(ladder) - 1)
    elif measured_alpha <= acfg.roofline_down:
      idx = max(idx - 1, 0)
  g = ladder[idx]
  r, v = ratios[g]
  speedup = expected_tokens(alpha, g) / max(g * r + v, 1e-12)
  strategy = g if speedup > acfg.roofline_min_speedup else PLAIN
  return state.replace(index=idx), strategy, speedup


@flax.struct.dataclass
class Memory:
  """What an engine learns across rollouts (host-side; all updates are pure ``replace``).

  ``costs``: (bucket, strategy) -> measured seconds per round; ``corr``: (bucket, 'plain'
  | 'spec') -> measured / profiled; ``alpha``: running per-token acceptance, measured over
  ``alpha_n`` sequence-rounds.
  """

  alpha: float
  alpha_n: float = 0.0  # sequence-rounds of speculation observed (all rollouts)
  costs: dict = flax.struct.field(pytree_node=False, default_factory=dict)
  corr: dict = flax.struct.field(pytree_node=False, default_factory=dict)
  # (bucket, k) -> measured committed / emitted tokens of speculation (ChunkObs.yield_)
  yields: dict = flax.struct.field(pytree_node=False, default_factory=dict)
  tlt: TltState = dataclasses.field(default_factory=TltState)
  roofline: RooflineState = dataclasses.field(default_factory=RooflineState)


def memory_observe(
  mem: Memory, obs: ChunkObs, profile: CostProfile | None, acfg: AdaptiveConfig
) -> Memory:
  """Fold one chunk into the running acceptance and the measured round costs."""
  alpha, alpha_n = mem.alpha, mem.alpha_n
  a = obs.alpha
  if a is not None:
    w = obs.rounds / (obs.rounds + acfg.alpha_memory)
    alpha = (1.0 - w) * alpha + w * a
    alpha_n += obs.rounds
  costs, corr, yields = dict(mem.costs), dict(mem.corr), dict(mem.yields)
  y = obs.yield_
  if y is not None:
    w = obs.rounds / (obs.rounds + acfg.alpha_memory)
    key = (obs.bucket, obs.strategy)
    yields[key] = y if key not in yields else (1.0 - w) * yields[key] + w * y
  if acfg.learn_online and obs.timed and obs.steps > 0 and obs.seconds > 0:
    per_round = obs.seconds / obs.steps
    w = obs.steps / (obs.steps + acfg.cost_memory)
    key = (obs.bucket, obs.strategy)
    costs[key] = per_round if key not in costs else (1 - w) * costs[key] + w * per_round
    if profile is not None:
      kind = 'plain' if obs.strategy == PLAIN else 'spec'
      ratio = per_round / max(profile.round(obs.strategy), 1e-12)
      ck = (obs.bucket, kind)
      corr[ck] = ratio if ck not in corr else (1 - w) * corr[ck] + w * ratio
  return mem.replace(alpha=alpha, alpha_n=alpha_n, costs=costs, corr=corr, yields=yields)


def round_costs(
  mem: Memory,
  profile: CostProfile,
  bucket: int,
  strategies: Sequence[int],
  learn_online: bool = True,
) -> dict[int, float]:
  """Seconds per round of each strategy at ``bucket``: measured if seen, else profiled and
  scaled by the measured/profiled ratio of its kind (spec falls back to plain's ratio:
  the engine overhead a profile of bare forwards misses)."""
  out = {}
  for s in strategies:
    if learn_online and (bucket, s) in mem.costs:
      out[s] = mem.costs[(bucket, s)]
      continue
    kind = 'plain' if s == PLAIN else 'spec'
    c = mem.corr.get((bucket, kind), mem.corr.get((bucket, 'plain'), 1.0))
    out[s] = profile.round(s) * (c if learn_online else 1.0)
  return out


def strategy_name(s: int) -> str:
  return 'plain' if s == PLAIN else f'k{s}'


# ----------------------------------------------------------------------------- device fns


def state_axes(state: rollout_lib.RolloutState, drafter) -> rollout_lib.RolloutState:
  """Logical axes matching ``state``: the drafter's state axes only if it carries one, no
  caches for a stripped accumulator (see :func:`strip`)."""
  draft_axes = drafter.state_logical_axes() if state.draft is not None else None
  axes = rollout_lib.state_logical_axes(draft_axes)
  return axes.replace(cache=None) if state.cache is None else axes


def axis_positions(axes, name: str) -> Any:
  """Pytree like ``axes`` (logical-axis tuples): the position of ``name`` in each, -1 = none
  (e.g. ``'batch'``: axis 1 of a KV cache ``[L, B, S, K, Dh]``, axis 0 elsewhere)."""
  return jax.tree.map(
    lambda t: t.index(name) if name in t else -1, axes, is_leaf=lambda t: isinstance(t, tuple)
  )


def widen(state: rollout_lib.RolloutState, axes, extra: int, pad_id: int):
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


def gather_rows(state: rollout_lib.RolloutState, idx: jax.Array, axes) -> rollout_lib.RolloutState:
  """Rows ``idx`` (int32 [b]) of every batched leaf: a state of batch b.

  KV caches ``[L, B, S, K, Dh]`` are gathered on axis 1, ``[B, ...]`` leaves on axis 0;
  ``rng`` and ``step`` (no batch axis) are shared.
  """
  return jax.tree.map(lambda ax, x: x if ax < 0 else jnp.take(x, idx, axis=ax), axes, state)


def scatter_rows(
  acc: rollout_lib.RolloutState, state: rollout_lib.RolloutState, origin: jax.Array
) -> rollout_lib.RolloutState:
  """Write the output fields of ``state`` (batch b) into ``acc`` (batch B) at rows
  ``origin`` (int32 [b]; B = padding row, dropped)."""
  upd = {f: getattr(acc, f).at[origin].set(getattr(state, f), mode='drop') for f in _OUT_FIELDS}
  return acc.replace(**upd)


def strip(state: rollout_lib.RolloutState) -> rollout_lib.RolloutState:
  """The state without caches: what the output needs."""
  return state.replace(cache=None, draft=None)


def clear_scratch(
  out: rollout_lib.RolloutOutput, seq_len: int, width: int, pad_id: int
) -> rollout_lib.RolloutOutput:
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


def state_stats(state: rollout_lib.RolloutState, steps) -> jax.Array:
  """int32 [6]: steps, active, sum generated, sum rounds, sum accepted, global step."""
  return jnp.stack(
    [
      jnp.asarray(steps, jnp.int32),
      jnp.sum(~state.done).astype(jnp.int32),
      jnp.sum(state.num_generated),
      jnp.sum(state.num_rounds),
      jnp.sum(state.num_accepted),
      state.step,
    ]
  )


def decode_chunk(
  params,
  draft_params,
  state: rollout_lib.RolloutState,
  min_active,
  max_steps,
  *,
  cfg,
  rcfg: rollout_lib.RolloutConfig,
  drafter,
  mesh,
  limit: int,
):
  """At most ``max_steps`` rounds (plain if ``rcfg.num_draft == 0``, else speculative with
  k = ``rcfg.num_draft``), stopping once ``active <= min_active`` or the global step
  reaches ``limit``. ``min_active``/``max_steps`` are traced int32 scalars: one compile
  per (batch, k). Returns (state, int32 [2, 6] :func:`state_stats` before and after)."""
  if rcfg.num_draft:

    def step_fn(s):
      return speculative.speculative_step(
        params, draft_params, s, cfg=cfg, rcfg=rcfg, drafter=drafter, mesh=mesh
      )
  else:

    def step_fn(s):
      return rollout_lib.plain_step(params, s, cfg=cfg, rcfg=rcfg, mesh=mesh)

  def cond(c):
    s, i = c
    return (jnp.sum(~s.done) > min_active) & (i < max_steps) & (s.step < limit)

  def body(c):
    s, i = c
    return step_fn(s), i + 1

  before = state_stats(state, 0)
  state, n = jax.lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))
  return state, jnp.stack([before, state_stats(state, n)])


def _never(x):
  """Always-False data dependency on all of ``x`` (keeps timed work from being dropped)."""
  return jnp.max(x.reshape(x.shape[0], -1), axis=1) > 1e30


# ----------------------------------------------------------------------------- engine


@dataclasses.dataclass
class AdaptiveReport:
  """Host-side record of one adaptive rollout (for logs and plots).

  ``trace``: (seconds since start, active, bucket, strategy) at every chunk start and end,
  compile and profiling time excluded (it is reported in ``compile_s`` / ``profile_s``);
  ``phases``: 'b{bucket}/{plain|k<k>}' -> {'time_s', 'tokens', 'steps'};
  ``decisions``: one dict per strategy change; ``compile_s`` / ``profile_s``: per bucket.
  """

  batch: int
  policy: str
  trace: list = dataclasses.field(default_factory=list)
  phases: dict = dataclasses.field(default_factory=dict)
  decisions: list = dataclasses.field(default_factory=list)
  compile_s: dict = dataclasses.field(default_factory=dict)
  profile_s: dict = dataclasses.field(default_factory=dict)
  compactions: list = dataclasses.field(default_factory=list)  # (t, from, to, active)
  chosen: dict = dataclasses.field(default_factory=dict)  # bucket -> strategies in order
  drafted: int = 0  # draft tokens proposed to active rows (sum of k x sequence-rounds)

  def phase_table(self) -> list[dict]:
    rows = []
    for name, p in self.phases.items():
      rows.append(
        dict(
          phase=name,
          time_s=p['time_s'],
          tokens=p['tokens'],
          steps=p['steps'],
          tokens_per_s=p['tokens'] / max(p['time_s'], 1e-9),
        )
      )
    return rows


class AdaptiveRolloutEngine:
  """Rollout with compaction and a per-phase plain/speculative choice.

  Same interface as :class:`specrl.rollout.RolloutEngine`: ``generate(params,
  prompt_tokens, prompt_len, rng, draft_params=None) -> (RolloutOutput, metrics)``;
  ``rcfg.num_draft`` is ignored unless ``acfg.enabled`` is False (the policy picks k).
  The output buffer is ``rcfg.buffer_len`` wide, as the static engine's. Compiled
  functions, profiles and what the policy has learned persist across calls;
  :meth:`with_config` makes an engine with another :class:`AdaptiveConfig` that shares
  the compiled functions and profiles.
  """

  def __init__(
    self,
    cfg: model_lib.ModelConfig,
    rcfg: rollout_lib.RolloutConfig,
    acfg: AdaptiveConfig | None = None,
    drafter=None,
    mesh=None,
    _shared: AdaptiveRolloutEngine | None = None,
  ):
    acfg = AdaptiveConfig() if acfg is None else acfg
    if not acfg.enabled:
      static = 'always' if rcfg.num_draft else 'never'
      acfg = dataclasses.replace(
        acfg, compaction=False, policy=static, always_k=max(rcfg.num_draft, 1), k_max=rcfg.num_draft
      )
    if acfg.policy != 'never' and drafter is None:
      raise ValueError(
        f"adaptive.policy {acfg.policy!r} needs a drafter (use 'never' for "
        'plain decoding with compaction)'
      )
    self.cfg, self.rcfg, self.acfg, self.drafter = cfg, rcfg, acfg, drafter
    self.mesh = mesh if mesh is not None else shd.make_mesh((1, 1, 1), jax.devices()[:1])
    self.k_max = acfg.buffer_k()
    # The state starts narrow (plain decoding's ``seq_len`` slots) and is widened to
    # ``buffer_len`` when a rollout first speculates (see the module docstring).
    self.narrow_len = rcfg.seq_len
    self.buffer_len = dataclasses.replace(rcfg, num_draft=self.k_max).buffer_len
    # Drafter state (e.g. its own KV cache) exists only for drafters that keep one, and is
    # built lazily (:meth:`_attach_draft`) when a rollout first speculates -- usually late,
    # at a small compacted batch -- except for the 'always' policy (built at prefill).
    self._stateful = (
      drafter is not None and self.k_max > 0 and drafter.state_logical_axes() is not None
    )
    self._eager_draft = self._stateful and acfg.policy == 'always'
    self._prefill_len = self.buffer_len if acfg.policy == 'always' else self.narrow_len
    self._fns: dict = _shared._fns if _shared is not None else {}
    self._profiles: dict = _shared._profiles if _shared is not None else {}
    self._prefill_s: dict = _shared._prefill_s if _shared is not None else {}  # batch -> s
    self.memory = Memory(alpha=acfg.alpha_prior)
    self._rng = np.random.default_rng(acfg.seed)
    self.last_report: AdaptiveReport | None = None

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
    cfg, s, kr = self.cfg, self.buffer_len, self.k_max
    reps, iters = self.acfg.profile_reps, self.acfg.profile_iters
    pos0 = self.rcfg.seq_len // 2
    mesh, rules = self.mesh, shd.DECODE_RULES

    def timed(fn, *args):
      fn = jax.jit(fn)
      jax.block_until_ready(fn(*args))  # compile + warm
      ts = []
      for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
      return statistics.median(ts) / reps

    def fwd_loop(t):
      def fn(params, cache):
        tok = jnp.full((b, t), 3, jnp.int32)
        positions = jnp.broadcast_to(pos0 + jnp.arange(t, dtype=jnp.int32), (b, t))

        def body(_, carry):
          cache, tok = carry
          logits, cache = model_lib.forward(
            params, cfg, tok, positions, cache, mesh=mesh, rules=rules
          )
          return cache, tok + _never(logits).astype(jnp.int32)[:, None]

        return jax.lax.fori_loop(0, reps, body, (cache, tok))[1]

      return fn

    cache = model_lib.init_cache(cfg, b, s)
    fwd1 = timed(fwd_loop(1), params, cache)
    fwd_ref = timed(fwd_loop(kr + 1), params, cache)
    drafter, sp = self.drafter, self.rcfg.sampling
    p = self.rcfg.max_prompt_len
    dstate_abs = jax.eval_shape(
      lambda dp: drafter.prefill(
        dp, jnp.zeros((b, p), jnp.int32), jnp.ones((b,), jnp.int32), s, mesh=mesh
      ),
      dparams,
    )
    dstate = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), dstate_abs)

    def prop_loop(k):
      def fn(dp, dstate, cache):
        seq = jnp.full((b, s), 3, jnp.int32)
        pos = jnp.full((b,), pos0, jnp.int32)

        def body(i, carry):
          dstate, cache, seq = carry
          toks, logits, dstate, cache = drafter.propose(
            dp,
            dstate,
            seq,
            pos,
            k,
            jax.random.fold_in(jax.random.key(0), i),
            sp,
            mesh=mesh,
            policy_cache=cache,
          )
          return dstate, cache, seq.at[:, 0].add(_never(logits).astype(jnp.int32))

        return jax.lax.fori_loop(0, reps, body, (dstate, cache, seq))[2]

      return fn

    prop1 = timed(prop_loop(1), dparams, dstate, cache)
    kp = min(kr, 2)
    prop_ref = timed(prop_loop(kp), dparams, dstate, cache) if kp > 1 else prop1
    return CostProfile(
      batch=b, k_ref=kr, fwd1=fwd1, fwd_ref=fwd_ref, prop1=prop1, prop_ref=prop_ref, k_prop=kp
    )

  # -- compiled functions (AOT, cached per shape; compile time reported per bucket)

  def _state_shardings(self, state: rollout_lib.RolloutState):
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
      if isinstance(x, rollout_lib.RolloutState):
        return self._state_shardings(x)
      if isinstance(x, jax.Array) and x.sharding.device_set == mesh_devices:
        return x.sharding
      return rep  # host values, and arrays placed elsewhere (e.g. a key on device 0)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, rollout_lib.RolloutState))

  def _compiled(self, key, fn, args, donate, report: AdaptiveReport, bucket: int):
    """AOT-compile ``fn`` for ``args`` once per ``key`` (compile time reported per bucket).
    States in and out use :meth:`_state_shardings`, so functions compiled separately
    (prefill, chunks, compaction, widening) hand states to each other without resharding
    or layout mismatches on a multi-device mesh."""
    if key not in self._fns:
      t0 = time.perf_counter()
      out_abs = jax.eval_shape(fn, *args)
      jitted = jax.jit(
        fn,
        donate_argnums=donate,
        in_shardings=self._shardings(args),
        out_shardings=self._shardings(out_abs),
      )
      self._fns[key] = jitted.lower(*args).compile()
      dt = time.perf_counter() - t0
      report.compile_s[bucket] = report.compile_s.get(bucket, 0.0) + dt
      log.info('adaptive: compiled %s in %.2fs', key[:3], dt)
    return self._fns[key]

  def _chunk_fn(self, b, strategy, args, report, has_draft):
    rcfg = dataclasses.replace(self.rcfg, num_draft=strategy)
    cfg, drafter, mesh = self.cfg, self.drafter, self.mesh
    limit = rollout_lib.max_loop_steps(self.rcfg)

    def fn(params, dparams, state, min_active, max_steps):
      return decode_chunk(
        params,
        dparams,
        state,
        min_active,
        max_steps,
        cfg=cfg,
        rcfg=rcfg,
        drafter=drafter if strategy else None,
        mesh=mesh,
        limit=limit,
      )

    key = ('chunk', b, strategy, args[2].tokens.shape[1], has_draft)
    return self._compiled(key, fn, args, (2,), report, b)

  def _width_rcfg(self, width: int) -> rollout_lib.RolloutConfig:
    """The rollout config whose ``buffer_len`` is ``width`` (narrow or widened)."""
    k = width - self.rcfg.seq_len - 1 if width > self.rcfg.seq_len else 0
    return dataclasses.replace(self.rcfg, num_draft=max(k, 0))

  def _widen(self, state, report):
    """The state on the wide buffer (``buffer_len`` slots), for speculation."""
    b, s = state.tokens.shape
    axes = axis_positions(state_axes(state, self.drafter), 'cache_seq')
    extra, pad = self.buffer_len - s, self.rcfg.pad_id
    f = self._compiled(
      ('widen', b, 0, s, state.cache is None, state.draft is not None),
      lambda st: widen(st, axes, extra, pad),
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
    full batch is wasted work when speculation only pays in the small-batch tail."""
    b, s = state.tokens.shape
    drafter, seq_len, mesh = self.drafter, self.rcfg.seq_len, self.mesh

    def fn(dp, st):
      ds = drafter.prefill(dp, st.tokens[:, :seq_len], st.pos + 1, s, mesh=mesh)
      return st.replace(draft=ds)

    f = self._compiled(('attach', b, 0, s), fn, (dparams, state), (1,), report, b)
    return f(dparams, state)

  # -- decisions

  def _decide(
    self,
    obs: ChunkObs | None,
    b: int,
    n_active: int,
    current: int | None,
    params,
    dparams_fn,
    report: AdaptiveReport,
  ) -> tuple[int, int, dict]:
    """(strategy, max_steps, info) for the next chunk at batch ``b``."""
    acfg, mem = self.acfg, self.memory
    steps = acfg.chunk_steps
    # A plain chunk learns nothing that could change a cost-model / roofline decision at
    # this bucket (acceptance is only measured while speculating; plain's measured cost
    # rescales the speculative estimates alike), so it runs to the bucket boundary.
    to_boundary = rollout_lib.max_loop_steps(self.rcfg)
    if acfg.policy == 'never':
      return PLAIN, to_boundary, {}
    if acfg.policy == 'always':
      return acfg.always_k, steps, {}
    if acfg.policy == 'tlt':
      u = (float(self._rng.random()), float(self._rng.random()))
      tlt, s, steps = tlt_update(mem.tlt, obs, n_active, b, acfg, u)
      self.memory = mem.replace(tlt=tlt)
      return s, steps, dict(below_steps=tlt.below_steps)
    prof = self._profile(b, params, dparams_fn, report)
    if acfg.policy == 'cost_model':
      arms = tuple(k for k in acfg.arms if k <= self.k_max)
      costs = round_costs(mem, prof, b, (PLAIN,) + arms, acfg.learn_online)
      # seconds per round -> per *committed* round: a measured yield < 1 (rows finishing
      # mid-run) makes long drafts at this bucket proportionally dearer
      costs = {k: c / max(mem.yields.get((b, k), 1.0), 1e-3) for k, c in costs.items()}
      alpha = optimistic_alpha(mem.alpha, mem.alpha_n, acfg.alpha_optimism)
      s, rates = cost_model_choose(costs, alpha, current, acfg.hysteresis)
      steps = to_boundary if s == PLAIN else steps
      return s, steps, dict(alpha=alpha, rate=rates[s], plain_rate=rates[PLAIN])
    # roofline
    ladder = tuple(acfg.roofline_ladder)
    costs = round_costs(mem, prof, b, (PLAIN,) + ladder, acfg.learn_online)
    corr = mem.corr.get((b, 'spec'), mem.corr.get((b, 'plain'), 1.0)) if acfg.learn_online else 1.0
    ratios = {}
    for g in ladder:
      draft = prof.propose(g) * corr
      ratios[g] = (draft / g / costs[PLAIN], max(costs[g] - draft, 0.0) / costs[PLAIN])
    measured = obs.alpha if obs is not None else None
    rs, s, speedup = roofline_update(mem.roofline, mem.alpha, measured, ratios, acfg)
    self.memory = mem.replace(roofline=rs)
    steps = to_boundary if s == PLAIN else steps
    return s, steps, dict(alpha=mem.alpha, gamma=ladder[rs.index], speedup=speedup)

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

  def generate(self, params, prompt_tokens, prompt_len, rng, draft_params=None):
    rcfg = self.rcfg
    srcfg = self._width_rcfg(self._prefill_len)
    prompt_tokens, prompt_len = rollout_lib.prepare_prompts(prompt_tokens, prompt_len, rcfg)
    bsz = prompt_tokens.shape[0]
    derived = []

    def dparams_fn():
      """The drafter's params, derived from the policy on first use only (a rollout that
      never speculates never pays for them)."""
      if draft_params is not None or self.drafter is None:
        return draft_params
      if not derived:
        if ('derive',) not in self._fns:
          self._fns[('derive',)] = jax.jit(self.drafter.params_from_policy)
        derived.append(self._fns[('derive',)](params))
      return derived[0]

    acfg = self.acfg
    report = AdaptiveReport(batch=bsz, policy=acfg.policy)
    self.memory = self.memory.replace(tlt=tlt_reset(self.memory.tlt))
    cfg, mesh = self.cfg, self.mesh
    sdrafter = self.drafter if self._eager_draft else None
    i32 = np.int32

    t_start = time.perf_counter()

    def now():  # seconds since the start, compile and profiling time excluded
      extra = sum(report.compile_s.values()) + sum(report.profile_s.values())
      return time.perf_counter() - t_start - extra

    def prefill_fn(params, dparams, toks, lens, rng):
      state = rollout_lib.prefill(
        params,
        toks,
        lens,
        rng,
        cfg=cfg,
        rcfg=srcfg,
        mesh=mesh,
        drafter=sdrafter,
        draft_params=dparams,
      )
      return state, state_stats(state, 0)

    args = (params, dparams_fn() if sdrafter else None, prompt_tokens, prompt_len, rng)
    prefill_j = self._compiled(
      ('prefill', bsz, 0, self._prefill_len, self._eager_draft), prefill_fn, args, (), report, bsz
    )
    # Not synced (after the first rollout at this batch size, which measures the prefill
    # once): the first chunk runs at the full batch whatever finished at prefill (a row
    # done at its first token only shows up as a smaller active count after it), and the
    # prefill's measured time is taken off that chunk's time before it is learned from.
    state, pstats = prefill_j(*args)
    if bsz not in self._prefill_s:
      t0 = now()
      jax.block_until_ready(pstats)
      self._prefill_s[bsz] = now() - t0
      prefill_left = 0.0
    else:
      prefill_left = self._prefill_s[bsz]
    n_active, step = bsz, 0
    limit = rollout_lib.max_loop_steps(rcfg)
    pending = None  # a chunk whose stats are not read yet
    b, origin, acc = bsz, None, None
    current: int | None = None
    obs: ChunkObs | None = None
    while n_active > 0 and step < limit:
      target = self._bucket_for(n_active, b) if acfg.compaction else b
      if target < b:
        state, origin, acc = self._compact(state, origin, acc, target, bsz, report)
        report.compactions.append((now(), b, target, n_active))
        b = target
      strategy, max_steps, info = self._decide(
        obs, b, n_active, current, params, dparams_fn, report
      )
      if strategy != current:
        d = dict(t=now(), bucket=b, active=n_active, strategy=strategy, **info)
        report.decisions.append(d)
        log.info(
          'adaptive[%s]: bucket %d, %d active -> %s %s',
          acfg.policy,
          b,
          n_active,
          strategy_name(strategy),
          info,
        )
      report.chosen.setdefault(b, [])
      if not report.chosen[b] or report.chosen[b][-1] != strategy:
        report.chosen[b].append(strategy)
      dparams = None if strategy == PLAIN else dparams_fn()
      cargs = (params, dparams, state, i32(self._boundary(b)), i32(max_steps))
      if strategy != PLAIN and state.tokens.shape[1] < self.buffer_len:
        state = self._widen(state, report)
      if strategy != PLAIN and self._stateful and state.draft is None:
        state = self._attach_draft(state, dparams, report)
      cargs = (params, dparams, state) + cargs[3:]
      chunk = self._chunk_fn(b, strategy, cargs, report, state.draft is not None)
      t0 = now()
      report.trace.append((t0, n_active, b, strategy))
      state, both = chunk(*cargs)
      # A plain chunk with nothing left to compact into and no step cap ends the rollout
      # (all done, or the global step limit): finalize without waiting on its stats, so
      # the host sync does not sit between the loop and the finalize (as in the static
      # engine); the stats are read after the finalize is dispatched.
      last = strategy == PLAIN and self._boundary(b) == 0 and max_steps >= limit
      pending = (both, t0, b, strategy, n_active, 0.0 if obs is not None else prefill_left)
      if last:
        break
      obs, pending = self._observe(pending, report, now), None
      current = strategy
      n_active, step = obs.active_end, obs.global_step
      if obs.steps == 0 and self._bucket_for(n_active, b) == b:  # no progress possible
        break

    seq_len, width, pad = rcfg.seq_len, rcfg.buffer_len, rcfg.pad_id
    fin_width = state.tokens.shape[1]
    frcfg = self._width_rcfg(fin_width)

    def fin_fn(acc, st, origin):
      if acc is not None:
        st = scatter_rows(acc, st, origin)
      return clear_scratch(rollout_lib.finalize(st, frcfg), seq_len, width, pad)

    if acc is not None and acc.tokens.shape[1] < fin_width:  # rows left before widening
      acc = self._widen(acc, report)
    fargs = (acc, strip(state), origin)
    key = ('final', bsz, None if acc is None else b, fin_width)
    fin = self._compiled(key, fin_fn, fargs, (), report, bsz)
    out = fin(*fargs)
    if pending is not None:
      self._observe(pending, report, now)
    out = jax.block_until_ready(out)
    dt = time.perf_counter() - t_start
    self.last_report = report
    return out, self._metrics(out, dt, report)

  def _observe(self, pending, report: AdaptiveReport, now) -> ChunkObs:
    """Read a chunk's stats (a host sync), record it and fold it into the memory."""
    both, t0, b, strategy, n_active, prefill_s = pending
    st0, stats = np.asarray(jax.device_get(both))
    t1 = now()
    # The first chunk also waited for the prefill: learn from its time without it (not at
    # all if that leaves too little to be a measurement); the report keeps the wall time.
    learn_s = t1 - t0 - prefill_s
    delta = stats - st0
    obs = ChunkObs(
      bucket=b,
      strategy=strategy,
      steps=int(stats[_ST_STEPS]),
      seconds=max(learn_s, 0.0),
      tokens=int(delta[_ST_TOKENS]),
      rounds=int(delta[_ST_ROUNDS]),
      accepted=int(delta[_ST_ACCEPTED]),
      active_start=n_active,
      active_end=int(stats[_ST_ACTIVE]),
      global_step=int(stats[_ST_STEP]),
      timed=learn_s > 0.25 * (t1 - t0),
    )
    report.trace.append((t1, obs.active_end, b, strategy))
    ph = report.phases.setdefault(
      f'b{b}/{strategy_name(strategy)}', dict(time_s=0.0, tokens=0, steps=0)
    )
    ph['time_s'] += t1 - t0
    ph['tokens'] += obs.tokens
    ph['steps'] += obs.steps
    report.drafted += obs.rounds * obs.strategy
    prof = self._profiles.get((b, self.buffer_len))
    self.memory = memory_observe(self.memory, obs, prof, self.acfg)
    return obs

  def _compact(self, state, origin, acc, target, bsz, report):
    """Gather the active rows into batch ``target``; write the rows leaving into ``acc``.

    Returns (state, origin, acc): ``origin`` int32 [target] maps rows to the original
    batch (``bsz`` for padding rows, which repeat a finished row and are never written
    back).
    """
    b = state.pos.shape[0]
    done = np.asarray(jax.device_get(state.done))
    active = np.nonzero(~done)[0]
    finished = np.nonzero(done)[0]
    idx = np.concatenate([active, np.full(target - len(active), finished[0])]).astype(np.int32)
    cur_origin = np.arange(b, dtype=np.int32) if origin is None else origin
    new_origin = np.where(np.arange(target) < len(active), cur_origin[idx], bsz).astype(np.int32)
    has_draft = state.draft is not None
    axes = axis_positions(state_axes(state, self.drafter), 'batch')
    if acc is None:  # still at the original batch: every row's home is itself
      g = self._compiled(
        ('gather', b, target, state.tokens.shape[1], has_draft),
        lambda st, i: gather_rows(st, i, axes),
        (state, idx),
        (),
        report,
        target,
      )
      return g(state, idx), new_origin, strip(state)

    if acc.tokens.shape[1] < state.tokens.shape[1]:  # rows left before widening
      acc = self._widen(acc, report)

    def fn(acc, st, idx, origin):  # one compile per (b, target): scatter the old, gather
      return scatter_rows(acc, strip(st), origin), gather_rows(st, idx, axes)

    args = (acc, state, idx, cur_origin)
    key = ('compact', b, target, state.tokens.shape[1], acc.tokens.shape[1], bsz, has_draft)
    f = self._compiled(key, fn, args, (0,), report, target)
    acc, state = f(*args)
    return state, new_origin, acc

  def _metrics(
    self, out: rollout_lib.RolloutOutput, seconds: float, report: AdaptiveReport
  ) -> dict:
    m = rollout_lib.rollout_metrics(out, seconds, dataclasses.replace(self.rcfg, num_draft=0))
    rounds = int(np.asarray(out.num_rounds).sum())
    acc = int(np.asarray(out.num_accepted).sum())
    spec_time = sum(p['time_s'] for n, p in report.phases.items() if not n.endswith('plain'))
    decode_time = sum(p['time_s'] for p in report.phases.values())
    m.update(
      {
        'adaptive/compile_s': float(sum(report.compile_s.values())),
        'adaptive/profile_s': float(sum(report.profile_s.values())),
        'adaptive/decode_s': float(decode_time),
        'adaptive/spec_time_frac': float(spec_time / max(decode_time, 1e-9)),
        'adaptive/compactions': len(report.compactions),
        'adaptive/chunks': len(report.trace) // 2,
        'adaptive/alpha': float(self.memory.alpha),
        'spec/verify_passes': rounds,
        'spec/accepted': acc,
      }
    )
    if report.drafted:  # only rollouts that speculated have an acceptance to report
      m['spec/acceptance'] = float(acc / report.drafted)
      m['spec/tokens_per_pass'] = float((acc + rounds) / max(rounds, 1))
    for name, p in report.phases.items():
      m[f'adaptive/phase/{name}/time_s'] = float(p['time_s'])
      m[f'adaptive/phase/{name}/tokens_per_s'] = float(p['tokens'] / max(p['time_s'], 1e-9))
    for bucket, ks in report.chosen.items():
      m[f'adaptive/k/b{bucket}'] = int(ks[-1])
    for bucket, sec in report.compile_s.items():
      m[f'adaptive/compile_s/b{bucket}'] = float(sec)
    return m


def policy_info(acfg: AdaptiveConfig) -> str:
  """One line describing a config, for logs."""
  extra = {
    'always': f'k={acfg.always_k}',
    'tlt': f'thr={acfg.tlt_threshold}',
    'roofline': f'ladder={acfg.roofline_ladder}',
  }.get(acfg.policy, '')
  return f'{acfg.policy}{" " + extra if extra else ""}, compaction={acfg.compaction}'


__all__ = [
  'AdaptiveConfig',
  'AdaptiveReport',
  'AdaptiveRolloutEngine',
  'ChunkObs',
  'CostProfile',
  'Memory',
  'RooflineState',
  'TltState',
  'alpha_from_tokens_per_round',
  'cost_model_choose',
  'expected_tokens',
  'optimistic_alpha',
  'roofline_update',
  'round_costs',
  'tlt_update',
]

"""The adaptive engine's decision policies and what it learns: pure host maths.

No JAX here (not even NumPy): every function maps plain numbers and frozen dataclasses to
new ones, so the policies are unit-tested with hand-made inputs, and what the engine has
learned (:class:`Memory`) is plain data that goes into checkpoints
(:func:`memory_to_json` / :func:`memory_from_json`).

- ``cost_model`` (:func:`cost_model_choose`): maximise expected tokens/s per active row,
  ``expected_tokens(a, k) / seconds per round``, with hysteresis.
- ``tlt`` (:func:`tlt_update`): speculation on once the active count stays
  ``<= tlt_threshold`` for ``tlt_patience`` steps; then epsilon-greedy over the arms per
  bucket, reward = tokens per second of the chunk, median over a window.
- ``roofline`` (:func:`roofline_update`): on iff predicted speedup ``L / (g r + v)`` beats
  ``roofline_min_speedup``; ``g`` climbs the ladder (the arms) on measured acceptance.

Costs are keyed by (batch bucket, length bucket, strategy): a chunk runs at one batch
bucket and attends to one length bucket (``rollout.attend_bucket``; the slots the chunk's
steps attend to), and at long budgets a step over an 8k-slot window costs many times one
over 256 slots, with a different verify / plain ratio. Acceptance (``alpha``,
``bucket_alpha``, ``passes``, ``yields``) stays keyed by batch bucket: it is a property of
the drafter and the text, not of the attention window. See :func:`round_costs` for the
fallback of cells not measured yet.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence

from specrl.adaptive.config import PLAIN, AdaptiveConfig, TreeArm, drafts, tree_arm
from specrl.decoding.spec_math import (
  CostProfile,
  alpha_from_tokens_per_round,
  expected_tokens,
  optimistic_alpha,
)


@dataclasses.dataclass(frozen=True)
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
  live_slots: int = 0  # cache slots the next plain step needs (picks the length bucket)
  # slots the chunk's steps attended to (its length bucket; the buffer width when dense);
  # 0: unknown -- its costs are learned as the batch bucket's length-unknown cells
  length: int = 0

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
    """The implied per-token acceptance of this chunk (None when it did not speculate): the
    i.i.d. rate whose ``expected_tokens`` equals the measured tokens per pass
    (:func:`alpha_from_tokens_per_round`), so the cost model can extrapolate to other k.
    Higher than ``spec/alpha`` (accepted / drafted) at the same tau; see
    :mod:`specrl.decoding.spec_math`."""
    if self.strategy == PLAIN or self.rounds <= 0 or tree_arm(self.strategy) is not None:
      return None  # a tree's tokens per pass are no chain's: kept per arm (Memory.passes)
    return alpha_from_tokens_per_round(1.0 + self.accepted / self.rounds, self.strategy)

  @property
  def tokens_per_pass(self) -> float | None:
    """Tokens a verify pass emitted per row (accepted + 1), None when it did not speculate."""
    if self.strategy == PLAIN or self.rounds <= 0:
      return None
    return 1.0 + self.accepted / self.rounds


# ----------------------------------------------------------------------------- policies


def cost_model_choose(
  costs: Mapping[int, float],
  alpha: float,
  current: int | None,
  hysteresis: float,
  tokens: Mapping[int, float] | None = None,
) -> tuple[int, dict[int, float]]:
  """Strategy with the highest expected tokens/s per active row, with hysteresis.

  Args:
    costs: strategy (0 = plain, k = speculative, a tree id) -> seconds per round here.
    alpha: running per-token acceptance (chains: ``expected_tokens(alpha, k)`` per pass).
    current: the strategy in use (kept unless another is ``> 1 + hysteresis`` better).
    tokens: expected tokens per pass of strategies priced otherwise (tree arms:
      :func:`arm_tokens_per_pass`).
  Returns:
    (strategy, rates {strategy: expected tokens per second per row}).
  """
  tokens = tokens or {}

  def per_pass(s):
    return tokens[s] if s in tokens else expected_tokens(alpha, s)

  rates = {s: per_pass(s) / max(t, 1e-12) for s, t in costs.items()}
  best = max(sorted(rates), key=lambda s: rates[s])  # ties: the smallest k (plain first)
  if current in rates and rates[best] <= rates[current] * (1.0 + hysteresis):
    return current, rates
  return best, rates


@dataclasses.dataclass(frozen=True)
class TltState:
  """TLT-style policy state. ``rewards`` ((bucket, k) -> recent rewards) persists across
  rollouts; ``below_steps`` / ``on`` are per rollout (see :func:`tlt_reset`)."""

  below_steps: int = 0
  on: bool = False
  rewards: dict = dataclasses.field(default_factory=dict)


def tlt_reset(state: TltState) -> TltState:
  return dataclasses.replace(state, below_steps=0, on=False)


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
  state = dataclasses.replace(state, below_steps=below, on=on, rewards=rewards)
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


@dataclasses.dataclass(frozen=True)
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
  ladder = acfg.ladder
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
  return dataclasses.replace(state, index=idx), strategy, speedup


@dataclasses.dataclass(frozen=True)
class Memory:
  """What an engine learns across rollouts (host-side; all updates are pure ``replace``).

  ``costs``: (bucket, length, strategy) -> measured seconds per round; ``corr``: (bucket,
  length, 'plain' | 'spec') -> measured / profiled (``length``: the chunk's length bucket,
  :attr:`ChunkObs.length`; a key without it, ``(bucket, strategy)`` / ``(bucket, kind)``,
  is a cell of unknown length: memory saved before costs were keyed by length, or chunks
  observed without one; see :func:`round_costs`); ``alpha``: running implied per-token
  acceptance (the i.i.d. rate that gives the measured tokens per pass,
  :attr:`ChunkObs.alpha`; the metric ``adaptive/implied_alpha``, not ``spec/alpha``),
  measured over ``alpha_n``
  sequence-rounds; ``bucket_alpha``: bucket -> (alpha, n), the same per bucket
  (acceptance differs along a rollout: the tail's rows are the long ones, and a drafter that
  reads finished siblings has more to read there), used where a bucket has been measured
  (:func:`alpha_at`). Acceptance, ``yields`` and ``passes`` are keyed by batch bucket only.
  """

  alpha: float
  alpha_n: float = 0.0  # sequence-rounds of speculation observed (all rollouts)
  bucket_alpha: dict = dataclasses.field(default_factory=dict)
  costs: dict = dataclasses.field(default_factory=dict)
  corr: dict = dataclasses.field(default_factory=dict)
  # (bucket, k) -> measured committed / emitted tokens of speculation (ChunkObs.yield_)
  yields: dict = dataclasses.field(default_factory=dict)
  tlt: TltState = dataclasses.field(default_factory=TltState)
  roofline: RooflineState = dataclasses.field(default_factory=RooflineState)
  # (bucket, strategy) -> (measured tokens per verify pass, sequence-rounds observed): what
  # the cost model prices tree arms with (no chain formula inverted for an acceptance)
  passes: dict = dataclasses.field(default_factory=dict)


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
  bucket_alpha = dict(mem.bucket_alpha)
  if a is not None:
    prev, n = bucket_alpha.get(obs.bucket, (mem.alpha, 0.0))
    w = obs.rounds / (obs.rounds + acfg.alpha_memory)
    bucket_alpha[obs.bucket] = ((1.0 - w) * prev + w * a, n + obs.rounds)
  costs, corr, yields = dict(mem.costs), dict(mem.corr), dict(mem.yields)
  passes = dict(mem.passes)
  tpp = obs.tokens_per_pass
  if tpp is not None:
    key = (obs.bucket, obs.strategy)
    prev, n = passes.get(key, (tpp, 0.0))
    w = obs.rounds / (obs.rounds + acfg.alpha_memory)
    passes[key] = ((1.0 - w) * prev + w * tpp if n else tpp, n + obs.rounds)
  y = obs.yield_
  if y is not None:
    w = obs.rounds / (obs.rounds + acfg.alpha_memory)
    key = (obs.bucket, obs.strategy)
    yields[key] = y if key not in yields else (1.0 - w) * yields[key] + w * y
  if acfg.learn_online and obs.timed and obs.steps > 0 and obs.seconds > 0:
    per_round = obs.seconds / obs.steps
    w = obs.steps / (obs.steps + acfg.cost_memory)
    cell = (obs.bucket, obs.length) if obs.length else (obs.bucket,)
    key = (*cell, obs.strategy)
    costs[key] = per_round if key not in costs else (1 - w) * costs[key] + w * per_round
    if profile is not None:
      kind = 'plain' if obs.strategy == PLAIN else 'spec'
      ratio = per_round / max(profile.round(drafts(obs.strategy)), 1e-12)
      ck = (*cell, kind)
      corr[ck] = ratio if ck not in corr else (1 - w) * corr[ck] + w * ratio
  return dataclasses.replace(
    mem,
    alpha=alpha,
    alpha_n=alpha_n,
    bucket_alpha=bucket_alpha,
    costs=costs,
    corr=corr,
    yields=yields,
    passes=passes,
  )


def tree_tokens_prior(alpha: float, arm: TreeArm) -> float:
  """Tokens per pass a tree arm is assumed to reach before it is measured: a chain of
  ``depth`` levels whose level is passed when any of its ``w`` candidates is right,
  ``1 - (1 - alpha)^w``, with ``w`` = the arm's nodes per level (capped by its branch).
  For a chain (one node per level) this is :func:`expected_tokens`."""
  w = (arm.nodes - 1) / arm.depth
  if arm.branch:
    w = min(w, arm.branch)
  a = min(max(float(alpha), 0.0), 1.0)
  return expected_tokens(1.0 - (1.0 - a) ** max(w, 1.0), arm.depth)


def arm_tokens_per_pass(mem: Memory, bucket: int, s: int, alpha: float, optimism: float) -> float:
  """Expected tokens per verify pass of tree arm ``s`` at ``bucket``: its measured tokens
  per pass (this bucket's, else the mean over the buckets it ran in), pulled towards the
  optimistic prior (:func:`tree_tokens_prior` at acceptance ``alpha``) by ``optimism /
  (optimism + n)`` after ``n`` sequence-rounds of it -- as the chains' acceptance is
  (:func:`optimistic_alpha`), so an arm is tried where it could pay and dropped once
  measured not to."""
  prior = tree_tokens_prior(optimistic_alpha(alpha, 0.0, optimism), tree_arm(s))
  if (bucket, s) in mem.passes:
    tpp, n = mem.passes[(bucket, s)]
  else:
    seen = [(t, n) for (b, x), (t, n) in mem.passes.items() if x == s and n > 0]
    n = sum(m for _, m in seen)
    tpp = sum(t * m for t, m in seen) / n if n else prior
  if optimism <= 0 or not n:
    return tpp if n else prior
  return tpp + (prior - tpp) * optimism / (optimism + n)


def alpha_at(mem: Memory, bucket: int) -> tuple[float, float]:
  """(acceptance, sequence-rounds observed) to decide with at ``bucket``: the bucket's own
  once it has been measured, else the running acceptance over all buckets."""
  return mem.bucket_alpha.get(bucket, (mem.alpha, mem.alpha_n))


def _nearest_length(lengths, length: int) -> int:
  """The length bucket of ``lengths`` nearest ``length`` (in log2: buckets double; ties:
  the longer, whose costs are the dearer)."""
  return min(lengths, key=lambda x: (abs(math.log2(x / length)), -x))


def corr_at(mem: Memory, bucket: int, length: int | None, kind: str) -> float:
  """Measured / profiled seconds per round of ``kind`` ('plain' | 'spec') for a chunk at
  (``bucket``, ``length``); the first of:

  1. this cell, measured;
  2. the nearest measured length bucket of the same batch bucket (log2 distance, ties: the
     longer), scaled by plain's measured length ratio ``corr(plain, length) / corr(plain,
     nearest)`` when plain is measured at both (spec: the verify / plain ratio measured
     there is carried over; plain: unscaled);
  3. spec: plain's correction at this cell by 1 -- 2 (the engine overhead a profile of bare
     forwards misses, which speculation pays too);
  4. the batch bucket's length-unknown cell (``(bucket, kind)``: memory from before costs
     were keyed by length), spec falling back to plain's;
  5. 1 (the profile as measured).

  ``length`` None: the length-unknown cell only (4 -- 5). Never another batch bucket's.
  """
  corr = mem.corr
  if length:
    c = _corr_at_length(corr, bucket, length, kind)
    if c is None and kind != 'plain':
      c = _corr_at_length(corr, bucket, length, 'plain')
    if c is not None:
      return c
  return corr.get((bucket, kind), corr.get((bucket, 'plain'), 1.0))


def plain_measured(mem: Memory, bucket: int, length: int | None = None) -> bool:
  """Whether plain's round cost has been measured at batch ``bucket`` and length bucket
  ``length`` (None: at any length, or in the length-unknown cell): what :func:`corr_at`
  needs to price plain and speculation alike there."""
  if length:
    return (bucket, length, 'plain') in mem.corr
  return any(k[0] == bucket and k[-1] == 'plain' for k in mem.corr)


def _corr_at_length(corr: dict, bucket: int, length: int, kind: str) -> float | None:
  """Rules 1 -- 2 of :func:`corr_at` (None: nothing measured at this batch bucket)."""
  if (bucket, length, kind) in corr:
    return corr[(bucket, length, kind)]
  seen = [k[1] for k in corr if len(k) == 3 and k[0] == bucket and k[2] == kind]
  if not seen:
    return None
  near = _nearest_length(seen, length)
  c = corr[(bucket, near, kind)]
  here, there = corr.get((bucket, length, 'plain')), corr.get((bucket, near, 'plain'))
  if kind != 'plain' and here is not None and there:
    c *= here / there
  return c


def round_costs(
  mem: Memory,
  profile: CostProfile,
  bucket: int,
  strategies: Sequence[int],
  learn_online: bool = True,
  lengths: Mapping[int, int] | int | None = None,
) -> dict[int, float]:
  """Seconds per round of each strategy for a chunk at ``bucket`` attending to
  ``lengths[s]`` slots (an int: every strategy's; None: unknown). Measured if this
  (bucket, length, strategy) cell has been seen, else the profiled round (a tree of N
  nodes as a chain of N - 1 drafts) times :func:`corr_at` -- the measured / profiled ratio
  of its kind at this cell, else at the nearest measured length bucket of the same batch
  bucket (scaled by plain's length ratio), else plain's, else the length-unknown cell's.
  So a new length bucket is priced from what was measured at its neighbours, never
  profiled again (the one profile per batch bucket is the shape of the cost in k; the
  corrections carry the length)."""
  out = {}
  for s in strategies:
    length = lengths.get(s) if isinstance(lengths, Mapping) else lengths
    key = (bucket, length, s) if length else (bucket, s)
    if learn_online and key in mem.costs:
      out[s] = mem.costs[key]
      continue
    kind = 'plain' if s == PLAIN else 'spec'
    c = corr_at(mem, bucket, length, kind) if learn_online else 1.0
    out[s] = profile.round(drafts(s)) * c
  return out


def strategy_name(s: int) -> str:
  """'plain', 'k<k>' (a chain) or 'tree<depth>_<branch>_<nodes>'."""
  if s == PLAIN:
    return 'plain'
  t = tree_arm(s)
  return f'k{s}' if t is None else f'tree{t.name}'


def policy_info(acfg: AdaptiveConfig) -> str:
  """One line describing a config, for logs."""
  extra = {
    'always': f'k={acfg.k_max}',
    'tlt': f'thr={acfg.tlt_threshold}',
    'roofline': f'ladder={acfg.ladder}',
  }.get(acfg.policy, '')
  return f'{acfg.policy}{" " + extra if extra else ""}, compaction={acfg.compaction}'


def _cells(rows, value=float) -> dict:
  """Rows ``[bucket, length, x, v]`` -> {(bucket, length, x): v}; rows ``[bucket, x, v]``
  (memory saved before costs were keyed by length) -> {(bucket, x): v}, the length-unknown
  cells (:func:`corr_at`)."""
  out = {}
  for *k, v in rows:
    x = k[-1] if isinstance(k[-1], str) else int(k[-1])
    out[(*(int(i) for i in k[:-1]), x)] = value(v)
  return out


def _pairs(d: dict) -> list:
  """A dict with tuple keys as a JSON-able list of [key..., value]."""
  return [[*k, v] if isinstance(k, tuple) else [k, v] for k, v in sorted(d.items(), key=str)]


def memory_to_json(mem: Memory) -> dict:
  """What the engine has learned, as JSON-able data (for the host-state checkpoint)."""
  return dict(
    alpha=mem.alpha,
    alpha_n=mem.alpha_n,
    bucket_alpha=[[b, a, n] for b, (a, n) in sorted(mem.bucket_alpha.items())],
    costs=_pairs(mem.costs),
    corr=_pairs(mem.corr),
    yields=_pairs(mem.yields),
    tlt=dict(
      below_steps=mem.tlt.below_steps,
      on=mem.tlt.on,
      rewards=[[b, k, list(r)] for (b, k), r in sorted(mem.tlt.rewards.items())],
    ),
    roofline_index=mem.roofline.index,
    passes=[[b, s, t, n] for (b, s), (t, n) in sorted(mem.passes.items())],
  )


def memory_from_json(d: dict) -> Memory:
  """Inverse of :func:`memory_to_json`."""
  return Memory(
    alpha=float(d['alpha']),
    alpha_n=float(d['alpha_n']),
    bucket_alpha={int(b): (float(a), float(n)) for b, a, n in d.get('bucket_alpha', [])},
    costs=_cells(d['costs']),
    corr=_cells(d['corr']),
    yields={(int(b), int(k)): float(v) for b, k, v in d['yields']},
    tlt=TltState(
      below_steps=int(d['tlt']['below_steps']),
      on=bool(d['tlt']['on']),
      rewards={(int(b), int(k)): tuple(float(x) for x in r) for b, k, r in d['tlt']['rewards']},
    ),
    roofline=RooflineState(index=int(d['roofline_index'])),
    passes={(int(b), int(s)): (float(t), float(n)) for b, s, t, n in d.get('passes', [])},
  )

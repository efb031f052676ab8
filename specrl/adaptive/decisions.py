"""The adaptive engine's decision maker: what runs next at a chunk boundary, and what it learned.

Why a module of its own. The engine (:mod:`specrl.adaptive.engine`) moves device state
(prefill, chunks, compaction, widening); choosing plain or an arm for the next chunk is
host bookkeeping over measured numbers: the policies' pure maths
(:mod:`specrl.adaptive.policies`) plus the state between decisions -- the learned
:class:`~specrl.adaptive.policies.Memory`, the TLT bandit's RNG and the plain probes. A
:class:`Decider` holds exactly that state, no JAX, so a decision is tested from a
hand-made :class:`~specrl.decoding.spec_math.CostProfile` and memory without compiling a
model, and the engine's checkpointed host state is the decider's.

The plain probe (``AdaptiveConfig.plain_probe_steps``). Costs are keyed by (batch bucket,
length bucket, strategy). Before the cost model speculates at a cell where plain never
ran, it runs ``plain_probe_steps`` plain steps there: otherwise plain stays priced from
the profile (taken at the full buffer width, or another length bucket) while the arm is
priced at the length it runs, and a mispriced plain keeps an arm running that loses to it
(a plain chunk costs nothing against plain decoding). The probe is a measurement, not a
switch: the decision after it keeps the arm chosen before it as the incumbent.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from specrl.adaptive.config import PLAIN, AdaptiveConfig, drafts, tree_arm
from specrl.adaptive.policies import (
  ChunkObs,
  Memory,
  alpha_at,
  arm_tokens_per_pass,
  corr_at,
  cost_model_choose,
  memory_from_json,
  memory_observe,
  memory_to_json,
  plain_measured,
  roofline_update,
  round_costs,
  strategy_name,
  tlt_reset,
  tlt_update,
)
from specrl.decoding.spec_math import CostProfile, optimistic_alpha

MAX_PROBES = 2  # plain probes per (batch bucket, length bucket): one retry of an unlearnable one


class Decider:
  """Chooses (strategy, max_steps) for each chunk of a rollout and learns from its result.

  ``acfg``: the policy and its settings; ``k_max``: the longest draft the engine's scratch
  holds (arms beyond it are never chosen); ``to_boundary``: the step count that lets a
  chunk run to its bucket boundary (plain chunks, whose decision cannot change sooner).

  State: ``memory`` (what the policies learned: acceptance, costs, bandit state), ``rng``
  (the TLT bandit's draws), ``probes`` ((batch bucket, length bucket) -> plain probes
  run) and ``after_probe`` (batch bucket -> the arm a running probe defers; per rollout).
  """

  def __init__(self, acfg: AdaptiveConfig, k_max: int, to_boundary: int):
    # A plain chunk learns nothing that could change a cost-model / roofline decision at
    # its bucket (acceptance is only measured while speculating; plain's measured cost
    # rescales the speculative estimates alike), so it runs to the bucket boundary.
    self.acfg, self.k_max, self.to_boundary = acfg, k_max, to_boundary
    self.memory = Memory(alpha=acfg.alpha_prior)
    self.rng = np.random.default_rng(acfg.seed)
    self.probes: dict[tuple[int, int | None], int] = {}
    self.after_probe: dict[int, int] = {}

  @property
  def needs_profile(self) -> bool:
    """Whether :meth:`decide` prices strategies from a cost profile (measured per batch
    bucket by the engine, once)."""
    return self.acfg.policy in ('cost_model', 'roofline')

  def start_rollout(self) -> None:
    """A new rollout: the bandit's per-rollout counters restart and a probe's deferred arm
    never outlives its rollout; what was learned (costs, acceptance, probes) stays."""
    self.memory = dataclasses.replace(self.memory, tlt=tlt_reset(self.memory.tlt))
    self.after_probe.clear()

  def observe(self, obs: ChunkObs, prof: CostProfile | None) -> None:
    """Fold a finished chunk into the memory (``prof``: its batch bucket's profile)."""
    self.memory = memory_observe(self.memory, obs, prof, self.acfg)

  def decide(
    self,
    obs: ChunkObs | None,
    b: int,
    n_active: int,
    current: int | None,
    prof: CostProfile | None,
    lengths: dict[int, int] | None = None,
  ) -> tuple[int, int, dict]:
    """(strategy, max_steps, info) for the next chunk at batch ``b`` (``n_active`` rows
    active; ``obs``: the chunk just run, None at the start; ``current``: the strategy
    running, None at the start; ``prof``: the bucket's cost profile when
    :attr:`needs_profile`; ``lengths``: strategy -> the length bucket its chunk would
    attend to, None: unknown). ``info`` goes into the report's decision record."""
    acfg = self.acfg
    if acfg.policy == 'never':
      return PLAIN, self.to_boundary, {}
    if acfg.policy == 'always':
      return acfg.always_arm, acfg.chunk_steps, {}
    if acfg.policy == 'tlt':
      u = (float(self.rng.random()), float(self.rng.random()))
      tlt, s, steps = tlt_update(self.memory.tlt, obs, n_active, b, acfg, u)
      self.memory = dataclasses.replace(self.memory, tlt=tlt)
      return s, steps, dict(below_steps=tlt.below_steps)
    if acfg.policy == 'cost_model':
      return self._cost_model(b, current, prof, lengths)
    return self._roofline(obs, b, prof, lengths)

  def _cost_model(self, b, current, prof, lengths) -> tuple[int, int, dict]:
    acfg, mem = self.acfg, self.memory
    arms = tuple(k for k in acfg.arms if drafts(k) <= self.k_max)
    costs = round_costs(mem, prof, b, (PLAIN,) + arms, acfg.learn_online, lengths)
    # seconds per round -> per *committed* round: a measured yield < 1 (rows finishing
    # mid-run) makes long drafts at this bucket proportionally dearer
    costs = {k: c / max(mem.yields.get((b, k), 1.0), 1e-3) for k, c in costs.items()}
    measured = alpha_at(mem, b)  # (running acceptance, its weight in sequence-rounds)
    alpha = optimistic_alpha(*measured, acfg.alpha_optimism)
    # tree arms: their own measured tokens per pass (optimistic until measured)
    tokens = {
      k: arm_tokens_per_pass(mem, b, k, measured[0], acfg.alpha_optimism)
      for k in arms
      if tree_arm(k) is not None
    }
    # At a rollout's start plain is the incumbent: speculation must beat it by the
    # hysteresis margin, as any switch must (it widens the buffer and builds the drafter's
    # state, which no rate includes). A near tie -- typically an arm whose rate its
    # optimistic prior still lifts just above plain's -- decodes plain.
    incumbent = PLAIN if current is None else current
    resumed = self.after_probe.pop(b, None)  # a probe defers, never replaces, the arm
    if resumed is not None and current == PLAIN:
      incumbent = resumed
    s, rates = cost_model_choose(costs, alpha, incumbent, acfg.hysteresis, tokens)
    # every strategy's predicted rate, for the decision record (reports, bench --reports)
    info = dict(alpha=alpha, rate=rates[s], plain_rate=rates[PLAIN])
    info['rates'] = {strategy_name(k): round(float(v), 4) for k, v in rates.items()}
    plain_len = None if lengths is None else lengths[PLAIN]
    if s != PLAIN and self.probe_due(b, plain_len):
      self.probes[(b, plain_len)] = self.probes.get((b, plain_len), 0) + 1
      self.after_probe[b] = s
      info = dict(info, probe=True)
      return PLAIN, acfg.plain_probe_steps, _with_length(info, plain_len)
    steps = self.to_boundary if s == PLAIN else acfg.chunk_steps
    return s, steps, _with_length(info, None if lengths is None else lengths[s])

  def _roofline(self, obs, b, prof, lengths) -> tuple[int, int, dict]:
    acfg, mem = self.acfg, self.memory
    ladder = acfg.ladder
    costs = round_costs(mem, prof, b, (PLAIN,) + ladder, acfg.learn_online, lengths)
    ratios = {}
    for g in ladder:
      length = None if lengths is None else lengths[g]
      corr = corr_at(mem, b, length, 'spec') if acfg.learn_online else 1.0
      draft = prof.propose(g) * corr
      ratios[g] = (draft / g / costs[PLAIN], max(costs[g] - draft, 0.0) / costs[PLAIN])
    measured = obs.alpha if obs is not None else None
    alpha = alpha_at(mem, b)[0]
    rs, s, speedup = roofline_update(mem.roofline, alpha, measured, ratios, acfg)
    self.memory = dataclasses.replace(mem, roofline=rs)
    steps = self.to_boundary if s == PLAIN else acfg.chunk_steps
    return s, steps, dict(alpha=alpha, gamma=ladder[rs.index], speedup=speedup)

  def probe_due(self, b: int, length: int | None) -> bool:
    """Whether the next chunk at batch ``b``, attending ``length`` slots, must be a plain
    probe: plain is unmeasured at that cell (priced from another length bucket, plain is
    off by its length's share of the step: 10-25% from 256 to 1024 slots for SmolLM2 at
    B = 1) and fewer than :data:`MAX_PROBES` probes ran there (a probe whose time could not
    be learned from, e.g. one that waited for the prefill, is retried once). Only the cost
    model learning online probes; ``plain_probe_steps = 0`` turns it off."""
    acfg = self.acfg
    return bool(
      acfg.plain_probe_steps
      and acfg.learn_online
      and self.probes.get((b, length), 0) < MAX_PROBES
      and not plain_measured(self.memory, b, length)
    )

  # -- host state (checkpointed with the train state)

  def host_state(self) -> dict:
    """What was learned across rollouts, as JSON-able data: the policy's memory and the
    TLT bandit's RNG (probes are re-run after a restart, as profiles are re-measured)."""
    return dict(memory=memory_to_json(self.memory), rng=self.rng.bit_generator.state)

  def load_host_state(self, d: dict) -> None:
    self.memory = memory_from_json(d['memory'])
    self.rng.bit_generator.state = d['rng']


def _with_length(info: dict, length: int | None) -> dict:
  """``info`` with the chunk's length bucket, when known."""
  return info if length is None else dict(info, length=length)

"""Adaptive long-tail rollout: compaction and a per-phase plain/speculative choice.

- :mod:`~specrl.adaptive.config`: :class:`AdaptiveConfig` (pure Python);
- :mod:`~specrl.adaptive.policies`: the decision policies and the engine's memory (pure
  host maths, no JAX);
- :mod:`~specrl.adaptive.decisions`: :class:`Decider`, the choice at each chunk boundary and
  the state it learns (memory, bandit RNG, plain probes; host only);
- :mod:`~specrl.adaptive.state_ops`: device-state surgery (widen, compact, decode chunk);
- :mod:`~specrl.adaptive.engine`: :class:`AdaptiveRolloutEngine`.
"""

from specrl.adaptive.config import PLAIN, POLICIES, AdaptiveConfig
from specrl.adaptive.decisions import Decider
from specrl.adaptive.engine import AdaptiveRolloutEngine
from specrl.adaptive.policies import (
  ChunkObs,
  Memory,
  RooflineState,
  TltState,
  alpha_at,
  cost_model_choose,
  memory_from_json,
  memory_observe,
  memory_to_json,
  policy_info,
  roofline_update,
  round_costs,
  strategy_name,
  tlt_update,
)
from specrl.adaptive.report import AdaptiveReport
from specrl.decoding.spec_math import (
  CostProfile,
  alpha_from_tokens_per_round,
  expected_tokens,
  optimistic_alpha,
)

__all__ = [
  'PLAIN',
  'POLICIES',
  'AdaptiveConfig',
  'AdaptiveReport',
  'AdaptiveRolloutEngine',
  'ChunkObs',
  'CostProfile',
  'Decider',
  'Memory',
  'RooflineState',
  'TltState',
  'alpha_from_tokens_per_round',
  'cost_model_choose',
  'expected_tokens',
  'memory_from_json',
  'alpha_at',
  'memory_observe',
  'memory_to_json',
  'optimistic_alpha',
  'policy_info',
  'roofline_update',
  'round_costs',
  'strategy_name',
  'tlt_update',
]

"""Static settings of the adaptive rollout engine (pure Python, no JAX).

The draft lengths the engine may use come from one knob, ``arms``: ``cost_model`` and
``tlt`` choose among them, ``roofline`` climbs them as its ladder (ascending), ``always``
speculates with the largest. The state buffer's scratch is laid out for
:meth:`AdaptiveConfig.k_max` (``max(arms)``; 0 for ``never``).
"""

from __future__ import annotations

import dataclasses

POLICIES = ('cost_model', 'tlt', 'roofline', 'always', 'never')
PLAIN = 0  # strategy id of plain decoding; k >= 1 = speculation with k drafts


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
  """Static settings of the adaptive rollout (hashable). Defaults equal configs/default.py."""

  compaction: bool = True
  buckets: tuple[int, ...] = (256, 128, 64, 32, 16, 8, 4, 2, 1)
  policy: str = 'cost_model'
  arms: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)  # the draft lengths of every policy
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
  # TLT
  tlt_threshold: int = 32
  tlt_patience: int = 8  # steps at <= threshold before speculation turns on
  tlt_epsilon: float = 0.1
  tlt_window: int = 8  # rewards per (bucket, k) arm kept for the median
  tlt_default_k: int = 4  # first arm when no arm has a reward yet (middle arm if absent)
  # roofline (its ladder is ``arms``, ascending)
  roofline_up: float = 0.94
  roofline_down: float = 0.85
  roofline_min_speedup: float = 1.05
  seed: int = 0  # host RNG of the TLT bandit

  def __post_init__(self):
    def bad(field, msg):
      raise ValueError(f'adaptive.{field} {msg}, got {getattr(self, field)!r}')

    if self.policy not in POLICIES:
      bad('policy', f'must be one of {POLICIES}')
    b = self.buckets
    if not b or any(x < 1 for x in b) or list(b) != sorted(set(b), reverse=True):
      bad('buckets', 'must be distinct positive batch sizes in descending order')
    if not self.arms or any(k < 1 for k in self.arms) or len(set(self.arms)) != len(self.arms):
      bad('arms', 'must be distinct draft lengths >= 1')
    if self.chunk_steps < 1:
      bad('chunk_steps', 'must be >= 1')
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
    if self.profile_reps < 1 or self.profile_iters < 1:
      bad('profile_reps', 'profile_reps and profile_iters must be >= 1')

  @property
  def k_max(self) -> int:
    """Largest draft length the policy can choose (the buffer's scratch)."""
    return 0 if self.policy == 'never' else max(self.arms)

  @property
  def ladder(self) -> tuple[int, ...]:
    """The roofline policy's draft-length ladder: the arms, ascending."""
    return tuple(sorted(self.arms))

"""Static settings of the adaptive rollout engine (pure Python, no JAX).

The draft lengths the engine may use come from one knob, ``arms``: ``cost_model`` and
``tlt`` choose among them, ``roofline`` climbs them as its ladder (ascending; chains only),
``always`` speculates with the largest. An arm is a chain of k drafts or a draft tree
(:class:`TreeArm`, TLT's ``depth_branch_nodes`` notation, e.g. ``'8_4_48'``). The state
buffer's scratch is laid out for :meth:`AdaptiveConfig.k_max` (the most drafts per pass; 0
for ``never``).
"""

from __future__ import annotations

import dataclasses

POLICIES = ('cost_model', 'tlt', 'roofline', 'always', 'never')
PLAIN = 0  # strategy id of plain decoding; k >= 1 = speculation with k drafts
# Tree arms have strategy ids >= TREE_BASE that spell their shape in decimal digits
# (``TREE_BASE + nodes * 10**4 + branch * 10**2 + depth``), so ids are stable across runs and
# checkpoints (the engine's memory is keyed by them) and read back without a table.
TREE_BASE = 10_000_000


@dataclasses.dataclass(frozen=True)
class TreeArm:
  """A draft-tree arm in TLT's ``depth_branch_nodes`` notation: at most ``depth`` levels,
  at most ``branch`` children per node (0 = no cap), ``nodes`` verify tokens per row, root
  (the last committed token) included -- so it verifies ``nodes - 1`` drafts per pass as a
  chain arm ``k = nodes - 1`` does, but spread over alternatives."""

  depth: int
  branch: int
  nodes: int

  @property
  def name(self) -> str:
    return f'{self.depth}_{self.branch}_{self.nodes}'

  @property
  def id(self) -> int:
    return TREE_BASE + self.nodes * 10_000 + self.branch * 100 + self.depth


def tree_arm(s: int) -> TreeArm | None:
  """The tree shape of strategy id ``s`` (None: plain or a chain)."""
  if s < TREE_BASE:
    return None
  r = s - TREE_BASE
  return TreeArm(depth=r % 100, branch=(r // 100) % 100, nodes=r // 10_000)


def drafts(s: int) -> int:
  """Draft tokens verified per pass by strategy ``s`` (0 plain, k a chain, nodes - 1 a tree):
  what sizes its scratch slots and verify forward."""
  t = tree_arm(s)
  return s if t is None else t.nodes - 1


def parse_arm(a) -> int:
  """An ``adaptive.arms`` entry -> strategy id: an int k >= 1 (a chain of k drafts), a
  ``'depth_branch_nodes'`` string (a tree, e.g. ``'4_2_8'``) or a tree id. Raises
  ValueError naming the entry."""
  if isinstance(a, str):
    parts = a.split('_')
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
      raise ValueError(f"adaptive.arms entry {a!r} is no 'depth_branch_nodes' tree (e.g. '4_2_8')")
    d, b, n = (int(p) for p in parts)
    if not (2 <= n < 1000 and 1 <= d <= n - 1 and d < 100 and 0 <= b < 100):
      raise ValueError(
        f'adaptive.arms tree {a!r}: needs 2 <= nodes < 1000, 1 <= depth <= nodes - 1 (and '
        '< 100), 0 <= branch < 100 (0 = no cap)'
      )
    return TreeArm(d, b, n).id
  if isinstance(a, bool) or not isinstance(a, int) or a < 1:
    raise ValueError(f"adaptive.arms entry {a!r} must be a draft length >= 1 or a 'd_b_n' tree")
  if a >= TREE_BASE:
    t = tree_arm(a)
    parse_arm(t.name)  # validates the decoded shape
  return a


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
  """Static settings of the adaptive rollout (hashable). Defaults equal configs/default.py."""

  compaction: bool = True
  buckets: tuple[int, ...] = (256, 128, 64, 32, 16, 8, 4, 2, 1)
  policy: str = 'cost_model'
  # the draft lengths of every policy; a 'depth_branch_nodes' string is a draft-tree arm
  # (TreeArm; stored as its strategy id)
  arms: tuple = (1, 2, 3, 4, 5, 6, 7, 8)
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
  # Before the cost model speculates at a (batch bucket, length bucket) cell where plain
  # has not run, a chunk of this many plain steps measures plain there (0 = off): the one
  # profile per batch bucket is taken at the buffer's full width, so an unmeasured plain
  # is priced at that width (or at another length) while a measured arm is priced at the
  # length it ran (at a 1024-token budget plain was priced 25% slow)
  plain_probe_steps: int = 16
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
    if not self.arms:
      bad('arms', 'must name at least one draft length or tree')
    object.__setattr__(self, 'arms', tuple(parse_arm(a) for a in self.arms))
    if len(set(self.arms)) != len(self.arms):
      bad('arms', 'must be distinct')
    if self.policy == 'roofline' and any(tree_arm(s) for s in self.arms):
      bad(
        'arms',
        'of the roofline policy must be chains: its ladder is chain-only (draft trees: '
        "use 'cost_model' or 'tlt')",
      )
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
    if self.plain_probe_steps < 0:
      bad('plain_probe_steps', 'must be >= 0 (0 = off)')
    if self.alpha_optimism < 0:
      bad('alpha_optimism', 'must be >= 0')
    if self.profile_reps < 1 or self.profile_iters < 1:
      bad('profile_reps', 'profile_reps and profile_iters must be >= 1')

  @property
  def k_max(self) -> int:
    """Most drafts per pass the policy can choose (the buffer's scratch)."""
    return 0 if self.policy == 'never' else max(drafts(s) for s in self.arms)

  @property
  def always_arm(self) -> int:
    """The ``always`` policy's arm: the one with the most drafts per pass (ties: the later
    in ``arms``)."""
    return max(reversed(self.arms), key=drafts)

  @property
  def ladder(self) -> tuple[int, ...]:
    """The roofline policy's draft-length ladder: the arms, ascending (chains only)."""
    return tuple(sorted(self.arms))

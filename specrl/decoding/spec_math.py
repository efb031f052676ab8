"""Speculation maths, defined once (pure Python: no JAX, no NumPy).

Acceptance, as every metric, benchmark and doc of specrl uses it:

- ``alpha`` = committed accepted drafts / drafts proposed to active rows. A draft that
  the verifier accepted but that :func:`specrl.decoding.state.commit` cut off (EOS earlier
  in the run, ``max_new_tokens``, the cache end) is *not* accepted: the row did not get it.
  (The metric ``spec/alpha``.)
- ``per_position[i]`` (i = 0 for the first draft) = P(draft i accepted | drafts < i
  accepted): rounds where draft i was accepted and committed / rounds where it was
  proposed with every earlier draft accepted.
- ``tau`` = :func:`tokens_per_pass`: committed tokens per verify pass, 1 + committed
  accepted drafts / passes (``spec/tokens_per_pass``). With k drafts per pass,
  ``alpha = (tau - 1) / k`` (drafts cut off aside).

Under the i.i.d. model of Leviathan et al. (2023), with per-token acceptance ``a`` a round
with k drafts emits :func:`expected_tokens` ``(1 - a^(k+1)) / (1 - a)`` tokens, and
:func:`alpha_from_tokens_per_round` inverts it: the *implied* per-token rate of a measured
tau (the adaptive engine's cost model uses it to extrapolate to other k; its running value
is the metric ``adaptive/implied_alpha``). This ``a`` is **not** ``alpha``: ``alpha`` is the
mean accepted fraction of k drafts, and ``expected_tokens(alpha, k) <= 1 + k alpha = tau``
(35% less at alpha = 0.5, k = 4). Ideal speedups (:func:`ideal_speedup`) therefore take the
measured tau, never ``expected_tokens(alpha, k)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def expected_tokens(alpha: float, k: int) -> float:
  """Expected tokens per round, ``(1 - a^(k+1)) / (1 - a)``; 1 for plain (k = 0).

  k drafts with i.i.d. per-token acceptance ``a``: the accepted prefix, plus the one
  token the verify pass always emits.
  """
  if k <= 0:
    return 1.0
  a = min(max(float(alpha), 0.0), 1.0)
  if a >= 1.0 - 1e-12:
    return float(k + 1)
  return (1.0 - a ** (k + 1)) / (1.0 - a)


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


def optimistic_alpha(alpha: float, n: float, optimism: float) -> float:
  """Acceptance to decide with after ``n`` observed sequence-rounds: ``alpha`` raised
  towards 1 by ``optimism / (optimism + n)`` (1 before any observation, -> alpha as n
  grows): optimism in the face of uncertainty, so speculation is tried where it would
  pay at a high acceptance, and dropped once measured not to pay."""
  if optimism <= 0:
    return alpha
  return alpha + (1.0 - alpha) * optimism / (optimism + n)


def tokens_per_pass(accepted: int, rounds: int) -> float:
  """Measured tau: committed tokens per verify pass, ``1 + accepted / rounds`` (every pass
  emits its committed accepted drafts plus one token); 1.0 when nothing was verified."""
  return 1.0 + accepted / rounds if rounds > 0 else 1.0


def expected_tokens_per_position(per_position: Sequence[float]) -> float:
  """Expected tokens per round when draft i is accepted with probability ``p_i`` given
  drafts < i accepted: ``1 + p_1 + p_1 p_2 + ... + p_1 ... p_k`` (the per-position rates
  of :func:`acceptance`; with every ``p_i = a`` this is :func:`expected_tokens`)."""
  total, reach = 1.0, 1.0
  for p in per_position:
    reach *= min(max(float(p), 0.0), 1.0)
    total += reach
  return total


def ideal_speedup(tau: float, k: int, c: float, v: float = 1.0) -> float:
  """Leviathan et al.'s ideal speedup: tokens per round over a round's cost in plain steps,
  ``tau / (k c + v)`` (``c`` = one drafter token / one plain step, ``v`` = verify pass /
  plain step).

  ``tau`` is tokens per round: the measured :func:`tokens_per_pass`, or
  :func:`expected_tokens_per_position` of measured per-position rates, or, for the i.i.d.
  model, :func:`expected_tokens` of a *per-token* rate. Not ``expected_tokens(alpha, k)``
  with ``alpha`` = accepted / drafted: that understates tau (see the module docstring).
  """
  if not 1.0 - 1e-9 <= tau <= k + 1.0 + 1e-9:
    raise ValueError(f'tau (tokens per round) must be in [1, k + 1] = [1, {k + 1}], got {tau}')
  return tau / (k * c + v)


def acceptance(
  accepted: int, drafted: int, reached: Sequence[int] = (), accepted_at: Sequence[int] = ()
) -> tuple[float | None, list[float | None]]:
  """(alpha, per_position) from the rollout counters (see the module docstring).

  Args:
    accepted: committed accepted drafts (all rows); drafted: drafts proposed to active rows.
    reached[i]: rounds where draft i was proposed with drafts < i accepted.
    accepted_at[i]: rounds where draft i was accepted and committed.
  Returns:
    alpha (None if nothing was drafted) and per-position acceptances (None where
    position i was never reached).
  """
  alpha = accepted / drafted if drafted > 0 else None
  per_position = [a / r if r > 0 else None for a, r in zip(accepted_at, reached, strict=True)]
  return alpha, per_position


def speculation_metrics(
  rounds: int,
  accepted: int,
  drafted: int,
  reached: Sequence[int] = (),
  accepted_at: Sequence[int] = (),
  prefix: str = 'spec',
) -> dict:
  """The speculation metrics every engine, the train loop and the benchmarks report:
  ``spec/alpha``, ``spec/per_position/<i>`` (1-based), ``spec/verify_passes``,
  ``spec/accepted``, ``spec/drafted``, ``spec/tokens_per_pass`` (committed accepted drafts
  + 1 per pass). Empty when nothing was drafted."""
  if drafted <= 0:
    return {}
  alpha, per_pos = acceptance(accepted, drafted, reached, accepted_at)
  m = {
    f'{prefix}/alpha': float(alpha),
    f'{prefix}/verify_passes': int(rounds),
    f'{prefix}/accepted': int(accepted),
    f'{prefix}/drafted': int(drafted),
    f'{prefix}/tokens_per_pass': tokens_per_pass(accepted, rounds),
  }
  for i, a in enumerate(per_pos):
    if a is not None:
      m[f'{prefix}/per_position/{i + 1}'] = float(a)
  return m


def tree_metrics(
  rounds: int,
  nodes: int,
  non_first: int,
  leaf: int,
  accepted_at: Sequence[int] = (),
  prefix: str = 'spec',
) -> dict:
  """Draft-tree metrics (``rollout.tree_nodes``): ``spec/tree/nodes_per_pass`` (non-root
  nodes proposed per verify pass), ``spec/tree/non_first_per_pass`` (descents into a child
  that is not its parent's first), ``spec/tree/leaf_frac`` (passes whose walk accepted
  down to a leaf: the bonus token) and the accepted-depth histogram
  ``spec/tree/depth/<d>`` (fraction of passes that accepted exactly d drafts, from
  ``accepted_at[i]`` = passes accepting more than i). Empty without passes."""
  if rounds <= 0:
    return {}
  m = {
    f'{prefix}/tree/nodes_per_pass': nodes / rounds,
    f'{prefix}/tree/non_first_per_pass': non_first / rounds,
    f'{prefix}/tree/leaf_frac': leaf / rounds,
  }
  at_least = [rounds, *accepted_at, 0]
  for d in range(len(at_least) - 1):
    m[f'{prefix}/tree/depth/{d}'] = (at_least[d] - at_least[d + 1]) / rounds
  return m


@dataclasses.dataclass(frozen=True)
class CostProfile:
  """Measured unit costs (seconds) at one batch size and buffer length.

  ``fwd1``/``fwd_ref``: one policy cache-extending forward at T = 1 / T = ``k_ref + 1``;
  ``prop1``/``prop_ref``: one drafter ``propose`` of 1 / ``k_prop`` tokens (0: ``k_ref``).
  Costs at other k are linear inter/extrapolations: a forward's cost is affine in T over
  this small range, and ``propose`` is one T <= 2 step plus k - 1 T = 1 steps (so two
  points pin it down; :func:`specrl.decoding.profile.measure_profile` measures k = 1, 2).
  Slopes are clamped at 0: more tokens never cost less, but on a loaded machine the two
  timed points can come out inverted, and extrapolating the inverted slope gave negative
  proposal costs (a CI run measured c = -0.12 at k = 4).
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
    return self.fwd1 + max(self.fwd_ref - self.fwd1, 0.0) * k / max(self.k_ref, 1)

  def propose(self, k: int) -> float:
    kp = self.k_prop or self.k_ref
    if kp <= 1:
      return self.prop1 * k
    return self.prop1 + max(self.prop_ref - self.prop1, 0.0) * (k - 1) / (kp - 1)

  def round(self, k: int) -> float:
    """Profiled seconds per round with k drafts (0 = plain), engine overhead excluded."""
    return self.fwd1 if k == 0 else self.propose(k) + self.verify(k)

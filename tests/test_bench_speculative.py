"""bench/speculative.py: a row's acceptance and ideal-speedup columns from the counters."""

import pytest

from bench import speculative


def test_ideal_is_measured_tokens_per_pass_over_round_cost():
  # Position-dependent acceptance at k = 4: 80 rounds accept drafts 1..4 (given the earlier
  # ones) in 72, 36, 18 and 9 rounds: tau = 1 + 135 / 80 = 2.69 tokens per pass, while the
  # i.i.d. formula at alpha = 135 / 320 says 1.71 (the ideal understated by 36%, "% of
  # ideal" overstated 1.57x).
  k, c, v = 4, 0.25, 1.6
  row = speculative.ideal_columns(accepted=135, drafted=320, rounds=80, k=k, c=c, v=v)
  assert row['alpha'] == pytest.approx(135 / 320)
  assert row['tau'] == pytest.approx(2.6875)
  assert row['ideal'] == pytest.approx(2.6875 / (k * c + 1))
  assert row['ca_ideal'] == pytest.approx(2.6875 / (k * c + v))
  # every draft accepted: k + 1 tokens per pass
  full = speculative.ideal_columns(accepted=40, drafted=40, rounds=10, k=k, c=1.0, v=1.0)
  assert (full['alpha'], full['tau'], full['ideal']) == (1.0, 5.0, 1.0)

"""Tests of the jnp speculative-verification reference (specrl.kernels.verify_reference).

Hand cases pin the deterministic parts (greedy, certain accepts/rejects, zeros after n);
chi-square tests check losslessness: the emitted tokens of one batched verify call over
many seeds are distributed as the target's processed distribution p. Every deliberately
broken verifier of :mod:`tests.broken_verifiers` (no residual correction, unfiltered draft
q, wrong temperature, target off by one) must fail the same test, so the test demonstrably
has power.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from specrl.decoding import verify as dispatch
from specrl.kernels import verify_reference as verify_lib
from specrl.sampling import NEG_INF, SamplingParams, processed_logits
from tests import broken_verifiers
from tests.jit_util import run

N_SEEDS = 20000
PASS_P = 1e-3  # a correct verifier must give p-value > PASS_P (fixed seeds: deterministic)
FAIL_P = 1e-6  # the broken verifier must give p-value < FAIL_P

V = 5
P_LOGITS = np.log(
  np.array(
    [
      [0.35, 0.25, 0.2, 0.12, 0.08],
      [0.1, 0.4, 0.2, 0.2, 0.1],
      [0.3, 0.1, 0.1, 0.2, 0.3],
    ],
    np.float32,
  )
)  # target, k + 1 = 3 positions
Q_LOGITS = np.log(
  np.array(
    [
      [0.1, 0.1, 0.1, 0.6, 0.1],  # mass on token 3, where p is small -> many rejections
      [0.45, 0.05, 0.1, 0.2, 0.2],
    ],
    np.float32,
  )
)  # draft, k = 2


def _ref(*args):
  *arrays, sp = args
  return run(verify_lib.verify_reference, *arrays, sp=sp)


def _onehot_logits(tokens, vocab):
  """Deterministic proposal: logits 0 at the token, NEG_INF elsewhere. [..., V]."""
  return jnp.where(jnp.arange(vocab) == jnp.asarray(tokens)[..., None], 0.0, NEG_INF)


def _probs(logits, sp):
  return np.asarray(jax.nn.softmax(processed_logits(jnp.asarray(logits), sp), axis=-1), np.float64)


def _batch(target, draft, sp, n=N_SEEDS, seed=0):
  """Broadcast fixed logits to n sequences; drafts drawn from the processed q."""
  rng = np.random.default_rng(seed)
  q = _probs(draft, sp)
  x = np.stack([rng.choice(V, size=n, p=qi / qi.sum()) for qi in q], axis=1).astype(np.int32)
  t = jnp.broadcast_to(jnp.asarray(target), (n,) + target.shape)
  d = jnp.broadcast_to(jnp.asarray(draft), (n,) + draft.shape)
  seeds = jnp.asarray(rng.integers(0, 2**32, size=n, dtype=np.uint32))
  return t, d, jnp.asarray(x), seeds


def _chisq(samples, p):
  """p-value of samples ~ p; zero-probability bins must be empty."""
  samples = np.asarray(samples)
  counts = np.bincount(samples, minlength=len(p)).astype(np.float64)
  support = p > 0
  assert counts[~support].sum() == 0, f'sampled a zero-probability token: {counts}'
  assert counts.sum() > 100
  return scipy.stats.chisquare(counts[support], p[support] / p[support].sum() * counts.sum()).pvalue


def _loss_p_values(verifier, target, draft, sp):
  """p-values of token0 ~ p_0, token1 | n>=1 ~ p_1 and token2 | n==2 ~ p_2."""
  t, d, x, seeds = _batch(target, draft, sp)
  res = verifier(t, d, x, seeds, sp)
  n, toks = np.asarray(res.num_accepted), np.asarray(res.tokens)
  p = _probs(target, sp)
  return (_chisq(toks[:, 0], p[0]), _chisq(toks[n >= 1, 1], p[1]), _chisq(toks[n == 2, 2], p[2]))


# ----------------------------------------------------------------------------------
# Hash PRNG
# ----------------------------------------------------------------------------------


def test_uniforms_open_interval_and_roughly_uniform():
  key = verify_lib.row_key(jnp.int32(7), jnp.int32(3), verify_lib.STREAM_SAMPLE)
  u = np.asarray(verify_lib.uniform_from_bits(verify_lib.element_bits(key, jnp.arange(200000))))
  assert u.min() > 0.0 and u.max() < 1.0
  assert scipy.stats.kstest(u, 'uniform').pvalue > PASS_P
  # Extreme bits still give finite Gumbels.
  extremes = jnp.array([0, -1, 2**31 - 1, -(2**31)], jnp.int32)
  assert np.isfinite(np.asarray(verify_lib.gumbel_from_bits(extremes))).all()


def test_hash_depends_on_every_input():
  base = verify_lib.element_bits(verify_lib.row_key(jnp.int32(1), jnp.int32(2), 2), jnp.int32(3))
  for seed, row, stream, col in [(9, 2, 2, 3), (1, 5, 2, 3), (1, 2, 1, 3), (1, 2, 2, 4)]:
    other = verify_lib.element_bits(
      verify_lib.row_key(jnp.int32(seed), jnp.int32(row), stream), jnp.int32(col)
    )
    assert int(other) != int(base)


def test_uint32_seeds_match_int32_bits():
  s = jnp.array([0, 1, 2**31, 2**32 - 1], jnp.uint32)
  np.testing.assert_array_equal(
    np.asarray(verify_lib.seeds_to_i32(s)), np.array([0, 1, -(2**31), -1], np.int32)
  )


# ----------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------


def test_greedy_accept_reject_pattern():
  # argmax per position: 3, 1, 4 (position 0 has a tie 3 vs 4: first index wins).
  t = jnp.array([[0.0, 1.0, 2.0, 5.0, 5.0], [0.0, 9.0, 2.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 3.0]])
  lsm = np.asarray(jax.nn.log_softmax(t, axis=-1))
  cases = [
    ([3, 2], 1, [3, 1, 0]),  # accept, reject -> argmax at 1
    ([4, 1], 0, [3, 0, 0]),  # tie token 4 is not the argmax
    ([3, 1], 2, [3, 1, 4]),  # all accepted -> bonus argmax
  ]
  drafts = jnp.array([c[0] for c in cases], jnp.int32)
  b = len(cases)
  res = _ref(
    jnp.broadcast_to(t, (b, 3, V)),
    jnp.zeros((b, 2, V)),
    drafts,
    jnp.zeros((b,), jnp.uint32),
    SamplingParams(temperature=0.0),
  )
  for i, (_, n, toks) in enumerate(cases):
    assert int(res.num_accepted[i]) == n
    assert res.tokens[i].tolist() == toks
    want = [float(lsm[j, toks[j]]) if j <= n else 0.0 for j in range(3)]
    np.testing.assert_allclose(np.asarray(res.logprobs[i]), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_certain_accepts_then_bonus(temperature):
  # p one-hot on the drafts (accepted with probability 1) and on token 2 at the bonus row.
  b = 64
  x = jnp.broadcast_to(jnp.array([4, 0], jnp.int32), (b, 2))
  t = jnp.broadcast_to(_onehot_logits(jnp.array([4, 0, 2]), V), (b, 3, V))
  res = _ref(
    t,
    _onehot_logits(x, V),
    x,
    jnp.arange(b, dtype=jnp.uint32),
    SamplingParams(temperature=temperature),
  )
  assert (np.asarray(res.num_accepted) == 2).all()
  assert (np.asarray(res.tokens) == [4, 0, 2]).all()
  np.testing.assert_allclose(np.asarray(res.logprobs), 0.0, atol=1e-6)


@pytest.mark.parametrize('sp', [SamplingParams(1.0), SamplingParams(0.5, top_k=2)])
def test_certain_reject_samples_residual(sp):
  # p_0(x_0) = 0 -> rejected; residual p_0 - q_0 = p_0 (one-hot on 1); zeros after n.
  b = 64
  t = jnp.broadcast_to(_onehot_logits(jnp.array([1, 3, 3]), V), (b, 3, V))
  x = jnp.broadcast_to(jnp.array([2, 3], jnp.int32), (b, 2))
  res = _ref(t, _onehot_logits(x, V), x, jnp.arange(b, dtype=jnp.uint32), sp)
  assert (np.asarray(res.num_accepted) == 0).all()
  assert (np.asarray(res.tokens) == [1, 0, 0]).all()
  assert (np.asarray(res.logprobs)[:, 1:] == 0.0).all()


def test_zero_residual_falls_back_to_p():
  # q == p and the draft lies outside the top-k set: p(x) = q(x) = 0 -> rejected, the
  # residual max(0, p - q) is identically 0, so token0 must be drawn from p_0 itself.
  sp = SamplingParams(temperature=1.0, top_k=3)
  target = P_LOGITS
  t, d, _, seeds = _batch(target, target[:2], sp)
  x = jnp.full((N_SEEDS, 2), 4, jnp.int32)  # token 4 has the smallest logit at row 0
  res = _ref(t, d, x, seeds, sp)
  assert (np.asarray(res.num_accepted) == 0).all()
  assert _chisq(np.asarray(res.tokens[:, 0]), _probs(target, sp)[0]) > PASS_P


def test_deterministic_proposal_accept_rate_and_residual():
  # n-gram style one-hot q: x accepted w.p. p(x); on rejection, p without x renormalised.
  sp = SamplingParams(temperature=1.0)
  x0 = 1
  t = jnp.broadcast_to(jnp.asarray(P_LOGITS), (N_SEEDS, 3, V))
  x = jnp.full((N_SEEDS, 2), x0, jnp.int32)
  d = _onehot_logits(x, V)
  seeds = jnp.arange(N_SEEDS, dtype=jnp.uint32)
  res = _ref(t, d, x, seeds, sp)
  n, toks = np.asarray(res.num_accepted), np.asarray(res.tokens)
  p0 = _probs(P_LOGITS, sp)[0]
  acc = (n >= 1).sum()
  assert scipy.stats.binomtest(int(acc), N_SEEDS, p0[x0]).pvalue > PASS_P
  resid = p0.copy()
  resid[x0] = 0.0
  assert _chisq(toks[n == 0, 0], resid) > PASS_P
  assert _chisq(toks[:, 0], p0) > PASS_P


def test_tokens_and_logprobs_after_n_are_zero():
  t, d, x, seeds = _batch(P_LOGITS, Q_LOGITS, SamplingParams(), n=500)
  res = _ref(t, d, x, seeds, SamplingParams())
  n = np.asarray(res.num_accepted)[:, None]
  j = np.arange(3)[None]
  assert (np.asarray(res.tokens)[j > n] == 0).all()
  assert (np.asarray(res.logprobs)[j > n] == 0).all()
  assert (np.asarray(res.logprobs)[j <= n] < 0).all()
  np.testing.assert_array_equal(
    np.asarray(res.tokens)[:, :2][j[:, :2] < n], np.asarray(x)[j[:, :2] < n]
  )


# ----------------------------------------------------------------------------------
# Losslessness (chi-square over many seeds in one batched call)
# ----------------------------------------------------------------------------------


def _sp_id(sp):
  return f'T{sp.temperature}-k{sp.top_k}-p{sp.top_p}'


SETTINGS = [
  SamplingParams(temperature=1.0),
  SamplingParams(temperature=0.7, top_k=3),
  SamplingParams(temperature=1.0, top_p=0.8),
]


@pytest.mark.parametrize('sp', SETTINGS, ids=_sp_id)
@pytest.mark.parametrize('same_q', [False, True], ids=['q!=p', 'q==p'])
def test_emitted_tokens_follow_target(sp, same_q):
  draft = P_LOGITS[:2] if same_q else Q_LOGITS
  pvals = _loss_p_values(_ref, P_LOGITS, draft, sp)
  assert min(pvals) > PASS_P, pvals


# Each broken verifier (tests/broken_verifiers.py) under settings where its defect matters.
BROKEN = [
  ('no_residual', SETTINGS[0]),
  ('no_residual', SETTINGS[1]),
  ('no_residual', SETTINGS[2]),
  ('unfiltered_draft', SETTINGS[1]),
  ('unfiltered_draft', SETTINGS[2]),
  ('wrong_temperature', SETTINGS[1]),
  ('target_off_by_one', SETTINGS[0]),
]


@pytest.mark.parametrize('mutant,sp', BROKEN, ids=[f'{m}-{_sp_id(sp)}' for m, sp in BROKEN])
def test_broken_verifier_is_caught(monkeypatch, mutant, sp):
  broken_verifiers.install(mutant, monkeypatch, k=Q_LOGITS.shape[0])

  def broken(*args):
    *arrays, sp_ = args
    return run(broken_verifiers.VERIFY_MOD.verify_reference, *arrays, sp=sp_)

  pvals = _loss_p_values(broken, P_LOGITS, Q_LOGITS, sp)
  assert min(pvals) < FAIL_P, f'{mutant} verifier not caught: {pvals}'


def test_acceptance_rate_matches_theory():
  # P(accept x_0) = sum_v min(p_0, q_0) when x_0 ~ q_0.
  sp = SamplingParams(temperature=1.0)
  t, d, x, seeds = _batch(P_LOGITS, Q_LOGITS, sp)
  n = np.asarray(_ref(t, d, x, seeds, sp).num_accepted)
  p, q = _probs(P_LOGITS, sp)[0], _probs(Q_LOGITS, sp)[0]
  assert (
    scipy.stats.binomtest(int((n >= 1).sum()), N_SEEDS, float(np.minimum(p, q).sum())).pvalue
    > PASS_P
  )


def test_dispatcher():
  t, d, x, seeds = _batch(P_LOGITS, Q_LOGITS, SamplingParams(), n=4)
  a = run(dispatch.verify, t, d, x, seeds, sp=SamplingParams(), impl='jnp')
  b = _ref(t, d, x, seeds, SamplingParams())
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  with pytest.raises(ValueError, match='impl'):
    dispatch.verify(t, d, x, seeds, SamplingParams(), impl='cuda')

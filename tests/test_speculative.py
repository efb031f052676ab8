"""Losslessness of speculative rollouts: statistical tests that can fail, and exact checks.

The statistical tests draw many speculative samples of the first ``M = k + 3`` generated
tokens from a tiny-vocabulary policy and compare them with the *exact* joint distribution
of the policy (computed by enumerating all ``V^M`` continuations) by chi-square. ``M``
covers the prefill token, one whole verify round (k drafts + the bonus token when all are
accepted) and the token after it, drafted from the position the drafter re-feeds after a
full accept. Rollouts run to ``2k + 3`` tokens so that, nothing being cut in the first
two rounds, ``num_rounds == 2`` exactly when both rounds accepted all k drafts: the tests
assert that this all-accepted + bonus path was taken often. Deliberately broken verifiers
(:mod:`tests.broken_verifiers`) are rejected by the same machinery: the test has power.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import model as model_lib
from specrl import quant, sampling
from specrl import rl as rl_lib
from specrl import rollout as rollout_lib
from specrl.drafters import ModelDrafter, NgramDrafter
from specrl.sampling import SamplingParams
from tests import broken_verifiers, stats

V = 4
CFG = model_lib.ModelConfig(
  vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
)
DCFG = model_lib.ModelConfig(
  vocab_size=V, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, d_ff=16
)
PROMPT = [1, 3, 2]
N_SAMPLES = 12000
K = 2  # drafts per verify pass
M = K + 3  # generated tokens compared: prefill, k drafts + bonus, the token after the bonus
MAX_NEW = 2 * K + 3  # two all-accepted rounds fill it exactly (nothing cut before)
PASS_P = 1e-3  # a correct rollout must give p > PASS_P (fixed seeds: deterministic)
FAIL_P = 1e-6  # a broken verifier must give p < FAIL_P

POLICY = model_lib.init_params(CFG, jax.random.key(0))
POOR = model_lib.init_params(DCFG, jax.random.key(42))
NOISY = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(5), x.shape), POLICY)


def _poor_drafter():
  """Often rejected: exercises the residual path."""
  return ModelDrafter('small_model', DCFG, own_params=POOR)


def _noisy_drafter():
  """The policy plus noise: often accepts all k drafts (bonus path), sometimes rejects."""
  return ModelDrafter('small_model', CFG, own_params=NOISY)


def _spec_samples(sp, drafter, seed=0, verify_impl='jnp', n=N_SAMPLES):
  """(first M generated tokens [N, M], RolloutOutput on host, metrics)."""
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=MAX_NEW,
    max_prompt_len=len(PROMPT),
    eos_id=-1,
    sampling=sp,
    num_draft=K,
    verify_impl=verify_impl,
  )
  eng = rollout_lib.RolloutEngine(CFG, rcfg, drafter=drafter)
  toks = np.tile(np.asarray(PROMPT, np.int32), (n, 1))
  lens = np.full((n,), len(PROMPT), np.int32)
  out, m = eng.generate(POLICY, toks, lens, jax.random.key(seed))
  out = jax.device_get(out)
  assert (out.length == MAX_NEW).all()
  return out.response[:, :M], out, m


def _pvalue(sp, drafter, seed=0, verify_impl='jnp', n=N_SAMPLES):
  """Chi-square p-value of the first M tokens against the policy, and the rollout output."""
  samples, out, _ = _spec_samples(sp, drafter, seed, verify_impl, n)
  conts, probs = stats.exact_joint(POLICY, CFG, PROMPT, M, sp)
  return stats.chi2_pvalue(samples, conts, probs), out


def _all_accepted_rows(out) -> float:
  """Fraction of rows whose first two rounds accepted all k drafts (so the bonus token of
  round 1 and the round drafted after it are among the M tokens compared)."""
  return float(np.mean(out.num_rounds == 2))


def _rejecting_rows(out) -> float:
  """Fraction of rows that needed a third round: some draft was rejected (residual path)."""
  return float(np.mean(out.num_rounds > 2))


SETTINGS = {
  'T1': SamplingParams(1.0),
  'T0.7-topk2': SamplingParams(0.7, top_k=2),
  'T0.7-topp0.8': SamplingParams(0.7, top_p=0.8),
}


@pytest.mark.parametrize('setting', list(SETTINGS))
def test_noisy_policy_drafter_is_lossless_through_the_bonus_token(setting):
  p, out = _pvalue(SETTINGS[setting], _noisy_drafter(), seed=2)
  assert _all_accepted_rows(out) > 0.2, 'the all-accepted + bonus path was rarely taken'
  assert _rejecting_rows(out) > 0.2, 'the residual path was rarely taken'
  assert p > PASS_P, f'speculative samples do not follow the policy (p={p:.2e})'


@pytest.mark.parametrize('setting', list(SETTINGS))
def test_poor_small_model_drafter_is_lossless(setting):
  p, out = _pvalue(SETTINGS[setting], _poor_drafter(), seed=1)
  assert _rejecting_rows(out) > 0.5  # the drafter really is poor: rejections happen
  assert p > PASS_P, f'speculative samples do not follow the policy (p={p:.2e})'


def test_lossless_with_the_pallas_verify_kernel_in_the_loop():
  """The Pallas kernel (interpret mode on CPU) inside the speculative rollout.

  Fewer samples: the interpreted kernel's run time (not compile time) grows with the batch;
  the kernel's bit-exactness against the reference is tested in tests/kernels.
  """
  p, out = _pvalue(
    SETTINGS['T0.7-topk2'], _noisy_drafter(), seed=8, verify_impl='pallas', n=N_SAMPLES // 3
  )
  assert _all_accepted_rows(out) > 0.2 and _rejecting_rows(out) > 0.2
  assert p > PASS_P, f'p={p:.2e}'


def test_ngram_drafter_is_lossless():
  p, _ = _pvalue(SETTINGS['T0.7-topk2'], NgramDrafter(V, ngram=1), seed=3)
  assert p > PASS_P, f'p={p:.2e}'


# Each broken verifier under a setting where its defect matters, with the drafter whose
# proposals expose it; the same seed and setting pass with the correct verifier above.
BROKEN = [
  ('no_residual', 'T1', _poor_drafter, 1),
  ('unfiltered_draft', 'T0.7-topk2', _poor_drafter, 1),
  ('unfiltered_draft', 'T0.7-topp0.8', _poor_drafter, 1),
  ('wrong_temperature', 'T0.7-topk2', _poor_drafter, 1),
  ('target_off_by_one', 'T1', _poor_drafter, 1),
]


@pytest.mark.parametrize(
  'mutant,setting,make_drafter,seed', BROKEN, ids=[f'{b[0]}-{b[1]}' for b in BROKEN]
)
def test_chi_square_rejects_broken_verifier(monkeypatch, mutant, setting, make_drafter, seed):
  broken_verifiers.install(mutant, monkeypatch, K)
  p, _ = _pvalue(SETTINGS[setting], make_drafter(), seed=seed)
  assert p < FAIL_P, f'the chi-square test failed to detect the {mutant} verifier (p={p:.2e})'


# ----------------------------------------------------------------------------- exact checks

GCFG = model_lib.ModelConfig(
  vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
GPARAMS = model_lib.init_params(GCFG, jax.random.key(3))


def _prompts(b=6, p=5, seed=0):
  rng = np.random.default_rng(seed)
  lens = rng.integers(1, p + 1, size=b).astype(np.int32)
  toks = rng.integers(3, GCFG.vocab_size, size=(b, p)).astype(np.int32)
  toks[np.arange(p)[None, :] >= lens[:, None]] = 0
  return toks, lens


def _gen(drafter, k, sp, n_new=9, eos=-1, seed=0, toks=None, lens=None):
  if toks is None:
    toks, lens = _prompts()
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=n_new,
    max_prompt_len=toks.shape[1],
    eos_id=eos,
    sampling=sp,
    num_draft=k if drafter else 0,
  )
  eng = rollout_lib.RolloutEngine(GCFG, rcfg, drafter=drafter)
  out, m = eng.generate(GPARAMS, toks, lens, jax.random.key(seed))
  return jax.device_get(out), m


GREEDY = SamplingParams(temperature=0.0)


def test_greedy_speculative_equals_greedy_plain_with_poor_drafter():
  dcfg = model_lib.ModelConfig(
    vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
  )
  drafter = ModelDrafter(
    'small_model', dcfg, own_params=model_lib.init_params(dcfg, jax.random.key(9))
  )
  plain, _ = _gen(None, 0, GREEDY)
  spec, m = _gen(drafter, 3, GREEDY)
  np.testing.assert_array_equal(spec.response, plain.response)
  np.testing.assert_array_equal(spec.length, plain.length)
  np.testing.assert_allclose(spec.response_logprobs, plain.response_logprobs, atol=1e-5)
  # ragged acceptance across the batch: sequences did not all advance alike
  assert len(set(spec.num_rounds.tolist())) > 1 or m['spec/alpha'] < 1.0


@pytest.mark.parametrize('sp', [GREEDY, SamplingParams(1.0)], ids=['greedy', 'T1'])
def test_self_drafter_accepts_everything(sp):
  k, n_new = 4, 11  # 1 token from prefill, then 2 full rounds of 5, so exactly 2 passes
  spec, m = _gen(ModelDrafter('self', GCFG, derive=lambda p: p), k, sp, n_new=n_new, seed=4)
  assert m['spec/alpha'] == 1.0
  assert m['spec/tokens_per_pass'] == k + 1
  assert (spec.num_rounds == 2).all() and (spec.length == n_new).all()


def test_eos_inside_accepted_run_and_max_new_tokens_inside_draft():
  plain, _ = _gen(None, 0, GREEDY, n_new=8)
  eos = int(plain.response[0, 2])  # emitted mid-run by greedy decoding
  self_d = ModelDrafter('self', GCFG, derive=lambda p: p)
  p2, _ = _gen(None, 0, GREEDY, n_new=8, eos=eos)
  s2, _ = _gen(self_d, 4, GREEDY, n_new=8, eos=eos)  # k + 1 = 5 per pass; 8 = 1 + 5 + 2
  np.testing.assert_array_equal(s2.response, p2.response)
  np.testing.assert_array_equal(s2.length, p2.length)
  np.testing.assert_array_equal(s2.finish, p2.finish)
  assert s2.finish[0] == rollout_lib.FINISH_EOS and s2.length[0] <= 3
  assert (s2.length <= 8).all() and (s2.finish == rollout_lib.FINISH_LENGTH).any()


LOGPROB_SETTINGS = {
  'T0.8-topk6': SamplingParams(0.8, top_k=6),
  'T1.3-topp0.7': SamplingParams(1.3, top_p=0.7),
}


@pytest.mark.parametrize('setting', list(LOGPROB_SETTINGS))
@pytest.mark.parametrize('mode', ['plain', 'speculative'])
def test_reported_logprobs_equal_train_time_logprobs(mode, setting):
  """Rollout logprobs are exactly what training recomputes for the same tokens.

  Training (the PPO ratio's denominator) scores a finished sequence with one forward pass:
  ``rl.sequence_logprobs`` and ``sampling.token_logprobs`` (unfiltered ``log_softmax(logits
  / T)``). The rollout reports a logprob for every committed token: plain steps, and in
  speculative rounds accepted drafts, residual tokens and bonus tokens. They must agree to
  f32 rounding (KV-cache vs full-sequence attention), and the tolerance must be tight
  enough to tell the wrong temperature or filtered (renormalised) logprobs apart.
  """
  sp = LOGPROB_SETTINGS[setting]
  drafter, k = None, 0
  if mode == 'speculative':
    noisy = jax.tree.map(
      lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), GPARAMS
    )
    drafter, k = ModelDrafter('small_model', GCFG, own_params=noisy), 3
  out, _ = _gen(drafter, k, sp, seed=7)
  tokens = jnp.asarray(out.tokens)
  b, s = tokens.shape
  pos = np.arange(s)[None, :]
  committed = (pos >= out.prompt_len[:, None]) & (pos < (out.prompt_len + out.length)[:, None])
  if mode == 'speculative':  # accepted drafts, rejections and all-accepted rounds all occur
    assert out.num_accepted.sum() > 0 and (out.num_accepted < k * out.num_rounds).any()
    assert (out.num_accepted == k * out.num_rounds).any()

  train = np.asarray(rl_lib.sequence_logprobs(GPARAMS, GCFG, tokens, sp.temperature))
  logits, _ = model_lib.forward(
    GPARAMS, GCFG, tokens[:, :-1], jnp.broadcast_to(jnp.arange(s - 1), (b, s - 1))
  )
  by_sampling = np.asarray(sampling.token_logprobs(logits, tokens[:, 1:], sp))
  reported = np.asarray(out.logprobs)
  np.testing.assert_allclose(reported[committed], train[committed], rtol=0, atol=1e-5)
  np.testing.assert_allclose(
    reported[:, 1:][committed[:, 1:]], by_sampling[committed[:, 1:]], atol=1e-5
  )
  for i in range(b):  # the right-padded response view holds the same numbers
    n = int(out.length[i])
    lo = int(out.prompt_len[i])
    np.testing.assert_array_equal(out.response_logprobs[i, :n], reported[i, lo : lo + n])
    np.testing.assert_array_equal(out.response[i, :n], out.tokens[i, lo : lo + n])

  # The check can fail: T = 1 or the filtered, renormalised distribution differ by >> 1e-5.
  at_t1 = np.asarray(rl_lib.sequence_logprobs(GPARAMS, GCFG, tokens, 1.0))
  assert np.abs(at_t1 - reported)[committed].max() > 1e-3
  filtered = jax.nn.log_softmax(sampling.processed_logits(logits, sp), axis=-1)
  filtered = np.asarray(jnp.take_along_axis(filtered, tokens[:, 1:, None], axis=-1)[..., 0])
  assert np.abs(filtered - reported[:, 1:])[committed[:, 1:]].max() > 1e-3


# ----------------------------------------------------------------------------- quantized


def _quantized(bits, share_kv, cfg):
  qcfg = quant.QuantConfig(
    bits=bits,
    group_size=8 if bits == 4 else None,
    quantize_embeddings=False,
    quantize_lm_head=False,
  )
  return ModelDrafter(
    'quantized', cfg, derive=lambda p: quant.quantize_params(p, qcfg), share_kv=share_kv
  )


@pytest.mark.parametrize('share_kv', [False, True], ids=['own_cache', 'shared_kv'])
def test_quantized_drafter_is_lossless(share_kv):
  p, out = _pvalue(SETTINGS['T0.7-topk2'], _quantized(4, share_kv, CFG), seed=11)
  assert _rejecting_rows(out) > 0.0
  assert p > PASS_P, f'p={p:.2e}'


@pytest.mark.parametrize('share_kv', [False, True], ids=['own_cache', 'shared_kv'])
def test_quantized_drafter_greedy_equals_plain(share_kv):
  plain, _ = _gen(None, 0, GREEDY)
  spec, m = _gen(_quantized(8, share_kv, GCFG), 3, GREEDY)
  np.testing.assert_array_equal(spec.response, plain.response)
  np.testing.assert_array_equal(spec.length, plain.length)
  assert m['spec/alpha'] > 0.5  # int8 of the policy itself mostly agrees

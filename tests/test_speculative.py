"""Losslessness of speculative rollouts: statistical tests that can fail, and exact checks.

The statistical tests draw many speculative samples of the first few generated tokens
from a tiny-vocabulary policy and compare them with the *exact* joint distribution of
the policy (computed by enumerating all continuations) by chi-square. A deliberately
broken verifier (no residual correction) is rejected by the same test: the test has power.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl import sampling
from specrl.decoding import verify as dispatch
from specrl.drafters import ModelDrafter, NgramDrafter
from specrl.kernels import verify_reference as verify_lib
from specrl.sampling import SamplingParams
from tests import stats

V = 5
CFG = model_lib.ModelConfig(
  vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
)
DCFG = model_lib.ModelConfig(
  vocab_size=V, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, d_ff=16
)
PROMPT = [1, 3, 2]
N_SAMPLES = 12000
M = 3  # generated tokens compared (the first comes from prefill, then verify rounds)


def _sharpen(params, scale):
  """Peaked, interesting distributions for a tiny random model (tied head)."""
  return {**params, 'embed': params['embed'] * scale}


POLICY = _sharpen(model_lib.init_params(CFG, jax.random.key(0)), 1.0)
POOR = _sharpen(model_lib.init_params(DCFG, jax.random.key(42)), 1.0)


def _spec_samples(sp, drafter, k, seed=0, verify_impl='jnp'):
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=M,
    max_prompt_len=len(PROMPT),
    eos_id=-1,
    sampling=sp,
    num_draft=k,
    verify_impl=verify_impl,
  )
  eng = rollout_lib.RolloutEngine(CFG, rcfg, drafter=drafter)
  toks = np.tile(np.asarray(PROMPT, np.int32), (N_SAMPLES, 1))
  lens = np.full((N_SAMPLES,), len(PROMPT), np.int32)
  out, m = eng.generate(POLICY, toks, lens, jax.random.key(seed))
  out = jax.device_get(out)
  assert (out.length == M).all()
  return out.response[:, :M], m


def _pvalue(sp, drafter, k, seed=0, verify_impl='jnp'):
  samples, m = _spec_samples(sp, drafter, k, seed, verify_impl)
  conts, probs = stats.exact_joint(POLICY, CFG, PROMPT, M, sp)
  return stats.chi2_pvalue(samples, conts, probs), m


SETTINGS = {
  'T1': SamplingParams(1.0),
  'T0.7-topk3': SamplingParams(0.7, top_k=3),
  'T0.7-topp0.8': SamplingParams(0.7, top_p=0.8),
}


@pytest.mark.parametrize('setting', list(SETTINGS))
def test_poor_small_model_drafter_is_lossless(setting):
  drafter = ModelDrafter('small_model', DCFG, own_params=POOR)
  p, m = _pvalue(SETTINGS[setting], drafter, k=2, seed=1)
  assert m['spec/alpha'] < 0.9  # the drafter really is poor: rejections happen
  assert p > 1e-3, f'speculative samples do not follow the policy (p={p:.2e})'


def test_lossless_with_the_pallas_verify_kernel_in_the_loop():
  """The Pallas kernel (interpret mode on CPU) inside the speculative rollout."""
  drafter = ModelDrafter('small_model', DCFG, own_params=POOR)
  p, m = _pvalue(SETTINGS['T0.7-topk3'], drafter, k=2, seed=8, verify_impl='pallas')
  assert m['spec/alpha'] < 0.9
  assert p > 1e-3, f'p={p:.2e}'


def test_good_noisy_policy_drafter_is_lossless():
  noisy = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape), POLICY)
  drafter = ModelDrafter('small_model', CFG, own_params=noisy)
  p, m = _pvalue(SETTINGS['T1'], drafter, k=3, seed=2)
  assert 0.5 < m['spec/alpha'] < 1.0
  assert p > 1e-3, f'p={p:.2e}'


def test_ngram_drafter_is_lossless():
  p, _ = _pvalue(SETTINGS['T0.7-topk3'], NgramDrafter(V, ngram=1), k=2, seed=3)
  assert p > 1e-3, f'p={p:.2e}'


def _broken_verify(target_logits, draft_logits, draft_tokens, seeds, sp, impl='jnp', **kw):
  """Skips the residual correction: on rejection, resamples from p_n instead of (p_n - q_n)+."""
  res = verify_lib.verify_reference(target_logits, draft_logits, draft_tokens, seeds, sp)
  b, k = draft_tokens.shape
  rows, n = jnp.arange(b), res.num_accepted
  keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0), s))(seeds)
  resampled = jax.vmap(lambda lg, key: sampling.sample(lg, key, sp))(target_logits[rows, n], keys)
  tokens = res.tokens.at[rows, n].set(jnp.where(n < k, resampled, res.tokens[rows, n]))
  return res.replace(tokens=tokens)


def test_chi_square_rejects_broken_verifier(monkeypatch):
  monkeypatch.setattr(dispatch, 'verify', _broken_verify)
  drafter = ModelDrafter('small_model', DCFG, own_params=POOR)
  p, _ = _pvalue(SETTINGS['T1'], drafter, k=2, seed=1)
  assert p < 1e-6, f'the test failed to detect a broken verifier (p={p:.2e})'


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


def test_speculative_logprobs_are_the_policys():
  drafter = ModelDrafter(
    'small_model',
    GCFG,
    own_params=jax.tree.map(
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), GPARAMS
    ),
  )
  sp = SamplingParams(0.8, top_k=6)
  spec, _ = _gen(drafter, 3, sp, seed=7)
  from specrl import rl as rl_lib

  lp = rl_lib.sequence_logprobs(GPARAMS, GCFG, jnp.asarray(spec.tokens), 0.8)
  toks, lens = _prompts()
  for b in range(len(lens)):
    sl = slice(lens[b], lens[b] + spec.length[b])
    np.testing.assert_allclose(spec.logprobs[b, sl], lp[b, sl], atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- quantized


def _quantized(bits, share_kv, cfg):
  from specrl import quant

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
  p, m = _pvalue(SETTINGS['T0.7-topk3'], _quantized(4, share_kv, CFG), k=2, seed=12)
  assert m['spec/alpha'] < 1.0
  assert p > 1e-3, f'p={p:.2e}'


@pytest.mark.parametrize('share_kv', [False, True], ids=['own_cache', 'shared_kv'])
def test_quantized_drafter_greedy_equals_plain(share_kv):
  plain, _ = _gen(None, 0, GREEDY)
  spec, m = _gen(_quantized(8, share_kv, GCFG), 3, GREEDY)
  np.testing.assert_array_equal(spec.response, plain.response)
  np.testing.assert_array_equal(spec.length, plain.length)
  assert m['spec/alpha'] > 0.5  # int8 of the policy itself mostly agrees

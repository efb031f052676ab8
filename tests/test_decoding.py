"""The decoding core's contracts: acceptance counted as spec_math defines it, sampling that
does not depend on a row's place in the batch, drafter params passed as jit arguments."""

import dataclasses

import jax
import numpy as np
import pytest

from specrl import adaptive
from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl.decoding import spec_math
from specrl.drafters import ModelDrafter
from specrl.sampling import SamplingParams

CFG = model_lib.ModelConfig(
  vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
DCFG = dataclasses.replace(CFG, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32)
PARAMS = model_lib.init_params(CFG, jax.random.key(0))


def _prompts(b=8, p=6, seed=0):
  rng = np.random.default_rng(seed)
  lens = rng.integers(1, p + 1, size=b).astype(np.int32)
  toks = rng.integers(3, CFG.vocab_size, size=(b, p)).astype(np.int32)
  toks[np.arange(p)[None, :] >= lens[:, None]] = 0
  return toks, lens


def test_spec_math_acceptance_definitions():
  assert spec_math.acceptance(6, 8, [2, 2, 2, 1], [2, 2, 1, 1]) == (0.75, [1.0, 1.0, 0.5, 1.0])
  assert spec_math.acceptance(0, 0, [0], [0]) == (None, [None])
  m = spec_math.speculation_metrics(rounds=2, accepted=6, drafted=8, reached=[2], accepted_at=[1])
  assert m['spec/alpha'] == 0.75 and m['spec/tokens_per_pass'] == 4.0
  assert m['spec/per_position/1'] == 0.5
  assert spec_math.speculation_metrics(rounds=0, accepted=0, drafted=0) == {}
  assert spec_math.expected_tokens(0.5, 2) == pytest.approx(1.75)
  assert spec_math.ideal_speedup(5.0, 4, 0.0) == 5.0


def test_ideal_speedup_takes_tokens_per_round_not_the_accepted_fraction():
  """Position-dependent acceptance (the first draft is easy, later ones hard): 80 rounds of
  k = 4 accept drafts 1..4 given the earlier ones in 72, 36, 18 and 9 rounds. The ideal is
  the measured tau over a round's cost; alpha = accepted / drafted fed into the i.i.d.
  formula gives 1.71 tokens per round where the rounds emitted 2.69."""
  k, rounds, accepted, drafted = 4, 80, 72 + 36 + 18 + 9, 4 * 80
  tau = spec_math.tokens_per_pass(accepted, rounds)
  assert tau == pytest.approx(2.6875)
  assert spec_math.expected_tokens_per_position([0.9, 0.5, 0.5, 0.5]) == pytest.approx(tau)
  assert spec_math.expected_tokens_per_position([0.7] * 3) == pytest.approx(
    spec_math.expected_tokens(0.7, 3)
  )
  alpha, _ = spec_math.acceptance(accepted, drafted)
  assert alpha == pytest.approx((tau - 1) / k)
  assert spec_math.expected_tokens(alpha, k) == pytest.approx(1.7067, abs=1e-4)  # not tau
  assert spec_math.ideal_speedup(tau, k, c=0.1) == pytest.approx(2.6875 / 1.4)
  assert spec_math.ideal_speedup(tau, k, c=0.1, v=1.5) == pytest.approx(2.6875 / 1.9)
  # the i.i.d. per-token rate implied by tau reproduces tau (the adaptive engine's alpha)
  implied = spec_math.alpha_from_tokens_per_round(tau, k)
  assert implied > alpha + 0.2
  assert spec_math.ideal_speedup(spec_math.expected_tokens(implied, k), k, 0.1) == pytest.approx(
    2.6875 / 1.4
  )
  with pytest.raises(ValueError, match='tokens per round'):
    spec_math.ideal_speedup(alpha, k, 0.1)  # an acceptance passed where tau belongs
  m = spec_math.speculation_metrics(rounds, accepted, drafted)
  assert m['spec/tokens_per_pass'] == pytest.approx(tau)


def test_alpha_excludes_drafts_cut_off_by_the_length_limit():
  """The policy drafting for itself (every draft accepted by the verifier), k = 4 and
  max_new_tokens = 1 + 5 + 2: the first token comes from prefill, round 1 commits 4 drafts
  + the bonus, round 2's 4 accepted drafts are cut to 2 by the length limit. alpha counts
  what rows got: 6 / 8 (the old count said 8 / 8)."""
  k = 4
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=8, max_prompt_len=6, eos_id=-1, sampling=SamplingParams(0.0), num_draft=k
  )
  eng = rollout_lib.RolloutEngine(CFG, rcfg, drafter=ModelDrafter('self', CFG, derive=lambda p: p))
  toks, lens = _prompts()
  out, m = eng.generate(PARAMS, toks, lens, jax.random.key(0))
  out = jax.device_get(out)
  assert (out.num_rounds == 2).all() and (out.length == 8).all()
  assert (out.num_drafted == 2 * k).all() and (out.num_accepted == 6).all()
  assert m['spec/alpha'] == 0.75
  per_pos = [m[f'spec/per_position/{i}'] for i in range(1, k + 1)]
  assert per_pos == [1.0, 1.0, 0.5, 1.0]


def test_adaptive_plain_phases_sample_what_the_static_engine_samples():
  """Sampled (T = 1) tokens of a ragged batch that compacts 8 -> 4 -> 2 -> 1 equal the
  static engine's for the same key: a row's draws are keyed by (seed, sequence id,
  position), not by its row in the (compacted) batch. Logprobs agree up to XLA's
  batch-size-dependent rounding."""
  sp = SamplingParams(1.0)
  toks, _ = _prompts()
  lens = np.array([1, 6, 3, 6, 5, 6, 4, 6], np.int32)  # rows hit the cache end at 14..10 tokens
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=14, max_prompt_len=6, cache_len=16, eos_id=-1, sampling=sp
  )
  static, _ = rollout_lib.RolloutEngine(CFG, rcfg).generate(PARAMS, toks, lens, jax.random.key(3))
  eng = adaptive.AdaptiveRolloutEngine(
    CFG, rcfg, adaptive.AdaptiveConfig(policy='never', buckets=(8, 4, 2, 1))
  )
  out, _ = eng.generate(PARAMS, toks, lens, jax.random.key(3))
  assert [c[2] for c in eng.last_report.compactions] == [4, 2, 1]
  static, out = jax.device_get((static, out))
  np.testing.assert_array_equal(out.tokens, static.tokens)
  np.testing.assert_allclose(out.logprobs, static.logprobs, atol=1e-6)
  # and the draws are random (the test could fail): another key gives other tokens
  other, _ = eng.generate(PARAMS, toks, lens, jax.random.key(4))
  assert not np.array_equal(np.asarray(other.tokens), out.tokens)


def test_small_model_params_are_jit_arguments_not_constants():
  """A drafter's own params are passed to the compiled steps: new params (a drafter
  trained between rollouts) take effect in an engine that already compiled, exactly as
  in a fresh engine. Closed-over params would stay baked into the executable."""
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=10, max_prompt_len=6, eos_id=-1, sampling=SamplingParams(0.0)
  )
  acfg = adaptive.AdaptiveConfig(policy='always', arms=(2,), buckets=(8,))
  first = model_lib.init_params(DCFG, jax.random.key(1))
  second = model_lib.init_params(DCFG, jax.random.key(2))
  drafter = ModelDrafter('small_model', DCFG, own_params=first)
  eng = adaptive.AdaptiveRolloutEngine(CFG, rcfg, acfg, drafter=drafter)
  toks, lens = _prompts()
  out1, _ = eng.generate(PARAMS, toks, lens, jax.random.key(0))
  drafter.own_params = second
  out2, _ = eng.generate(PARAMS, toks, lens, jax.random.key(0))
  fresh = adaptive.AdaptiveRolloutEngine(
    CFG, rcfg, acfg, drafter=ModelDrafter('small_model', DCFG, own_params=second)
  )
  ref, _ = fresh.generate(PARAMS, toks, lens, jax.random.key(0))
  out1, out2, ref = jax.device_get((out1, out2, ref))
  assert not np.array_equal(out1.num_accepted, ref.num_accepted)  # the params matter
  np.testing.assert_array_equal(out2.num_accepted, ref.num_accepted)
  np.testing.assert_array_equal(out2.tokens, ref.tokens)

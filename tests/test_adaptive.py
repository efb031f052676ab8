"""Adaptive long-tail rollout: compaction is lossless, the policies choose as specified.

Exact checks run greedy decoding on a ragged batch (per-sequence length budgets through
the cache end: a prompt of length p generates ``cache_len - p`` tokens) and compare with
the static engine token for token; the sampled check is a chi-square test against the
policy's exact joint distribution with a compaction in the middle of the rollout. The
engines of one file share their compiled functions (``with_config``), so the file pays
for each (bucket, strategy) compile once.
"""

import dataclasses

import jax
import numpy as np
import pytest

from specrl import adaptive
from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl.adaptive import AdaptiveConfig, ChunkObs, CostProfile
from specrl.drafters import ModelDrafter
from specrl.sampling import SamplingParams
from tests import stats


def init_params(cfg, seed):
  """Fan-in-scaled Gaussian params in numpy: like ``model.init_params`` without its
  (slow, on a loaded CPU) jitted truncated-normal compile per config."""
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    name = jax.tree_util.keystr(path[-1:]).strip("[]'")
    if name.endswith('norm'):
      return np.ones(shape, np.float32)
    if name == 'embed':
      fan_in = shape[-1]  # unit-scale logits through the tied head
    elif name == 'wo':
      fan_in = shape[-3] * shape[-2]
    else:
      fan_in = shape[-3] if name in ('wq', 'wk', 'wv') else shape[-2]
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(
    leaf, model_lib.param_shapes(cfg), is_leaf=lambda t: isinstance(t, tuple)
  )


GREEDY = SamplingParams(temperature=0.0)
CFG = model_lib.ModelConfig(
  vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
PARAMS = init_params(CFG, 3)
DCFG = model_lib.ModelConfig(
  vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
)
DRAFTER = ModelDrafter('small_model', DCFG, own_params=init_params(DCFG, 9))
CACHE = 20
# generated tokens per row: ragged, rows finishing out of order, one long straggler
LENGTHS = np.array([8, 3, 18, 5, 9, 4, 7, 6])
RCFG = rollout_lib.RolloutConfig(
  max_new_tokens=18, max_prompt_len=17, cache_len=CACHE, eos_id=-1, sampling=GREEDY
)
# all engines here lay out the buffer for k <= 2 and share their compiled functions
BASE = AdaptiveConfig(
  policy='never',
  buckets=(8, 4, 1),
  chunk_steps=3,
  arms=(1, 2),
  learn_online=False,
  alpha_prior=0.5,
  alpha_memory=1e12,
  alpha_optimism=0,
  tlt_threshold=4,
  tlt_patience=2,
  tlt_default_k=1,
  tlt_epsilon=0.0,
)
_ROOT = []


def engine(**kw) -> adaptive.AdaptiveRolloutEngine:
  if not _ROOT:
    _ROOT.append(adaptive.AdaptiveRolloutEngine(CFG, RCFG, BASE, drafter=DRAFTER))
  return _ROOT[0].with_config(dataclasses.replace(BASE, **kw))


def prompts(lengths):
  plen = (CACHE - np.asarray(lengths)).astype(np.int32)
  rng = np.random.default_rng(0)
  toks = rng.integers(3, CFG.vocab_size, size=(len(plen), RCFG.max_prompt_len)).astype(np.int32)
  toks[np.arange(RCFG.max_prompt_len)[None, :] >= plen[:, None]] = 0
  return toks, plen


def generate(eng, lengths=LENGTHS, seed=0):
  toks, plen = prompts(lengths)
  out, m = eng.generate(PARAMS, toks, plen, jax.random.key(seed))
  return jax.device_get(out), m


_REF = []


def reference():
  """The static engine's greedy rollout of the ragged batch."""
  if not _REF:
    out, _ = generate(rollout_lib.RolloutEngine(CFG, RCFG))
    np.testing.assert_array_equal(out.length, LENGTHS)
    _REF.append(out)
  return _REF[0]


def assert_same(out, ref, atol=1e-6):
  """Exact tokens; logprobs to ``atol``. Why not bitwise: XLA:CPU's forward at batch 1
  differs from the same rows at batch 8 by up to ~2e-7 (a different matmul lowering),
  with no compaction involved; batches 2..8 agree bitwise here."""
  for f in ('tokens', 'response', 'length', 'finish', 'prompt_len', 'num_rounds'):
    np.testing.assert_array_equal(getattr(out, f), getattr(ref, f), err_msg=f)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=atol, rtol=0)
  np.testing.assert_allclose(out.response_logprobs, ref.response_logprobs, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- exactness


def test_chunks_run_on_layers_sliced_once_per_rollout(monkeypatch):
  """On CPU the decode loop runs over per-layer weight slices; the engine slices them once
  per rollout and hands every chunk the sliced params (each chunk slicing again copied every
  weight: ~0.2 s a chunk on SmolLM2-135M)."""
  from specrl.adaptive import engine as engine_mod

  seen = []

  def spy(params, *a, **kw):
    seen.append(isinstance(params['layers'], tuple))
    return real(params, *a, **kw)

  real = engine_mod.decode_chunk
  monkeypatch.setattr(engine_mod, 'decode_chunk', spy)
  eng = adaptive.AdaptiveRolloutEngine(CFG, RCFG, dataclasses.replace(BASE, policy='never'))
  out, m = generate(eng)
  assert m['adaptive/compactions'] >= 1 and len(seen) >= 2  # several chunks compiled
  assert all(seen) == (jax.default_backend() == 'cpu'), seen
  assert_same(jax.device_get(out), reference())


def test_compaction_changes_nothing_but_the_batch_greedy_plain():
  ref = reference()
  comp, m = generate(engine(compaction=True))
  static, m0 = generate(engine(compaction=False))
  assert m['adaptive/compactions'] == 2 and m0['adaptive/compactions'] == 0  # 8 -> 4 -> 1
  assert_same(comp, static)
  assert_same(comp, ref)
  assert_same(static, ref, atol=0.0)  # same batch throughout: bitwise
  assert comp.tokens.shape == ref.tokens.shape  # scratch slots cut to the static width


def _profile(b, fwd1, fwd_ref, prop1, prop_ref):
  return CostProfile(batch=b, k_ref=2, fwd1=fwd1, fwd_ref=fwd_ref, prop1=prop1, prop_ref=prop_ref)


# Synthetic unit costs (alpha fixed at 0.5: E[tokens] = 1, 1.5, 1.75 for plain, k=1, k=2):
# at batch 8 speculation cannot pay; at 4, k = 1 is best; at 1, k = 2 is.
SYNTHETIC = [
  _profile(8, 1.0, 20.0, 1.0, 2.0),  # rounds: plain 1, k1 11.5, k2 22
  _profile(4, 1.0, 1.2, 0.1, 5.0),  # plain 1, k1 1.2, k2 6.2
  _profile(1, 1.0, 1.0, 0.6, 0.6),
]  # plain 1, k1 1.6, k2 1.6


def cost_model_engine():
  eng = engine(policy='cost_model')
  for p in SYNTHETIC:
    eng.set_profile(p)
  return eng


def test_strategy_switches_and_compaction_keep_greedy_outputs():
  eng = cost_model_engine()
  out, m = generate(eng)
  rep = eng.last_report
  assert rep.chosen == {8: [0], 4: [1], 1: [2]}, rep.chosen  # plain -> k=1 -> k=2
  assert m['adaptive/compactions'] == 2 and m['spec/verify_passes'] > 0
  assert 0 < m['adaptive/spec_time_frac'] < 1
  # two acceptance figures, two names: the cost model's implied per-token rate, and
  # spec_math's committed accepted / drafted
  assert 'adaptive/alpha' not in m and 0 <= m['adaptive/implied_alpha'] <= 1
  assert m['adaptive/implied_alpha'] == eng.memory.alpha and 0 <= m['spec/alpha'] <= 1
  ref = reference()
  for f in ('tokens', 'response', 'length', 'finish'):
    np.testing.assert_array_equal(getattr(out, f), getattr(ref, f), err_msg=f)
  np.testing.assert_allclose(out.response_logprobs, ref.response_logprobs, atol=1e-5)
  # metrics and the trace cover every phase
  assert {'b8/plain', 'b4/k1', 'b1/k2'} == set(rep.phases)
  assert rep.trace[0][1] == 8 and rep.trace[-1][1] == 0
  assert (m['adaptive/k/b8'], m['adaptive/k/b4'], m['adaptive/k/b1']) == (0, 1, 2)
  assert m['adaptive/phase/b1/k2/tokens_per_s'] > 0
  # acceptance per bucket where it speculated; together the rollout's accepted / drafted
  assert 'adaptive/alpha/b8' not in m
  per = {b: rep.phases[p] for b, p in (('b4', 'b4/k1'), ('b1', 'b1/k2'))}
  for b, p in per.items():
    assert m[f'adaptive/alpha/{b}'] == pytest.approx(p['accepted'] / p['drafted'])
  assert sum(p['drafted'] for p in per.values()) == m['spec/drafted']
  assert sum(p['accepted'] for p in per.values()) == m['spec/accepted']


def test_speculative_greedy_with_and_without_compaction():
  """Same draft length throughout: rounds and accepted drafts per row must match too --
  a drafter cache gathered wrongly changes acceptance (never the outputs)."""
  comp, m = generate(engine(policy='always', arms=(1,)))
  static, m0 = generate(engine(policy='always', arms=(1,), compaction=False))
  assert m['adaptive/compactions'] == 2 and m0['adaptive/compactions'] == 0
  assert_same(comp, static)
  np.testing.assert_array_equal(comp.num_accepted, static.num_accepted)
  assert 0 < m['spec/accepted'] < m['spec/verify_passes']  # a poor drafter: some rejected
  # k = 1 throughout: accepted / drafted = accepted / verify passes
  assert m['spec/alpha'] == pytest.approx(m['spec/accepted'] / m['spec/verify_passes'])
  np.testing.assert_array_equal(comp.response, reference().response)


@pytest.mark.parametrize('policy', ['cost_model', 'tlt'])
def test_batch_finishing_at_once_never_speculates(policy):
  eng = cost_model_engine().with_config(dataclasses.replace(BASE, policy=policy))
  _, m = generate(eng, lengths=np.full(8, 12))
  assert m.get('spec/verify_passes', 0) == 0 and m['adaptive/compactions'] == 0
  assert all(k.endswith('plain') for k in eng.last_report.phases)
  if policy == 'cost_model':  # adaptivity costs nothing: prefill, one while_loop, finalize
    assert m['adaptive/chunks'] == 1, eng.last_report.trace
  # the same policy on the ragged batch does speculate in the tail (the test can fail)
  out, m = generate(eng)
  assert m['spec/verify_passes'] > 0
  np.testing.assert_array_equal(out.response, reference().response)


# ----------------------------------------------------------------------------- lossless

V = 5
SCFG = model_lib.ModelConfig(
  vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
)
SDCFG = model_lib.ModelConfig(
  vocab_size=V, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, d_ff=16
)
PROMPT = [1, 3, 2]


def test_sampled_outputs_stay_lossless_after_compaction():
  """12000 rows of PROMPT (3 tokens each) plus 4384 decoys that finish at prefill (their
  prompts fill the cache), so the batch compacts 16384 -> 12288 (288 padding rows) with
  both KV caches gathered, and every decoded token is sampled (speculatively, with a poor
  drafter: rejections happen) in the compacted batch. One compacted chunk keeps the compile
  bill small; mid-rollout compactions are checked exactly by the greedy tests above."""
  policy = init_params(SCFG, 0)
  poor = ModelDrafter('small_model', SDCFG, own_params=init_params(SDCFG, 42))
  sp = SamplingParams(1.0)
  m_new = 3
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=m_new, max_prompt_len=5, cache_len=6, eos_id=-1, sampling=sp
  )
  acfg = AdaptiveConfig(policy='always', arms=(2,), buckets=(16384, 12288), chunk_steps=8)
  n, d = 12000, 4384
  toks = np.zeros((n + d, 5), np.int32)
  toks[:n, :3] = PROMPT
  toks[n:] = [2, 4, 1, 3, 1]
  lens = np.array([3] * n + [5] * d, np.int32)
  perm = np.random.default_rng(0).permutation(n + d)  # interleaved: a misaligned gather
  toks, lens = toks[perm], lens[perm]  # hands target rows decoy caches
  target = lens == 3
  eng = adaptive.AdaptiveRolloutEngine(SCFG, rcfg, acfg, drafter=poor)
  out, m = eng.generate(policy, toks, lens, jax.random.key(1))
  out = jax.device_get(out)
  assert [c[1:] for c in eng.last_report.compactions] == [(16384, 12288, n)]
  assert (out.length[target] == m_new).all() and (out.length[~target] == 1).all()
  assert (out.num_rounds[target] >= 1).all() and (out.num_rounds[~target] == 0).all()
  assert m['spec/accepted'] < 0.9 * 2 * m['spec/verify_passes']  # rejections happen
  conts, probs = stats.exact_joint(policy, SCFG, PROMPT, m_new, sp)
  p = stats.chi2_pvalue(out.response[target, :m_new], conts, probs)
  assert p > 1e-3, f'adaptive samples do not follow the policy (p={p:.2e})'


# ----------------------------------------------------------------------------- choosers


def test_expected_tokens_and_acceptance_inverse():
  assert adaptive.expected_tokens(0.5, 0) == 1.0
  assert adaptive.expected_tokens(0.5, 2) == pytest.approx(1.75)
  assert adaptive.expected_tokens(1.0, 4) == 5.0
  for a in (0.0, 0.3, 0.9):
    for k in (1, 4):
      tau = adaptive.expected_tokens(a, k)
      assert adaptive.alpha_from_tokens_per_round(tau, k) == pytest.approx(a, abs=1e-6)
  obs = ChunkObs(
    bucket=4,
    strategy=3,
    steps=10,
    seconds=1.0,
    tokens=0,
    rounds=40,
    accepted=40 * 3,
    active_start=4,
    active_end=4,
  )
  assert obs.alpha == pytest.approx(1.0, abs=1e-6)
  # optimism while unmeasured: 1 before any round, -> the estimate as rounds accumulate
  assert adaptive.optimistic_alpha(0.5, 0, 16) == 1.0
  assert adaptive.optimistic_alpha(0.5, 16, 16) == pytest.approx(0.75)
  assert adaptive.optimistic_alpha(0.5, 1e9, 16) == pytest.approx(0.5)
  assert adaptive.optimistic_alpha(0.5, 0, 0) == 0.5
  mem = adaptive.memory_observe(
    adaptive.Memory(alpha=0.5), obs, None, AdaptiveConfig(alpha_memory=40.0)
  )
  assert mem.alpha == pytest.approx(0.75, abs=1e-6) and mem.alpha_n == 40


def _costs(t_plain, t_draft, t_verify, ks):
  return {0: t_plain, **{k: k * t_draft + t_verify(k) for k in ks}}


def test_cost_model_plain_when_speculation_cannot_pay():
  # drafting a token costs as much as a policy step: no k can beat plain decoding
  costs = _costs(1.0, 1.0, lambda k: 1.0 + 0.05 * k, range(1, 9))
  for alpha in (0.0, 0.7, 0.99):
    s, rates = adaptive.cost_model_choose(costs, alpha, None, 0.1)
    assert s == 0, (alpha, rates)


def test_cost_model_picks_the_largest_expected_throughput_k():
  ks = range(1, 9)
  costs = _costs(1.0, 0.08, lambda k: 1.0 + 0.1 * k, ks)
  alpha = 0.8
  s, rates = adaptive.cost_model_choose(costs, alpha, None, 0.1)
  brute = {k: adaptive.expected_tokens(alpha, k) / costs[k] for k in ks}
  best = max(brute, key=brute.get)
  assert 1 < best < 8 and s == best  # an interior optimum: neither the smallest nor largest
  assert rates[s] == pytest.approx(brute[best]) and rates[s] > rates[0]
  # hysteresis: a current strategy within 10% of the best is kept ...
  near = max((k for k in ks if k != best and brute[k] * 1.1 >= brute[best]), key=brute.get)
  assert adaptive.cost_model_choose(costs, alpha, near, 0.1)[0] == near
  # ... plain is not (speculation is far better), and a low alpha turns speculation off
  assert adaptive.cost_model_choose(costs, alpha, 0, 0.1)[0] == best
  assert adaptive.cost_model_choose(costs, 0.05, best, 0.1)[0] == 0


def test_round_costs_profile_then_measured():
  prof = _profile(4, 1.0, 1.2, 0.1, 5.0)
  mem = adaptive.Memory(alpha=0.5)
  assert adaptive.round_costs(mem, prof, 4, (0, 1, 2)) == pytest.approx({0: 1.0, 1: 1.2, 2: 6.2})
  acfg = AdaptiveConfig(cost_memory=0.0)
  obs = ChunkObs(
    bucket=4,
    strategy=0,
    steps=10,
    seconds=20.0,
    tokens=40,
    rounds=0,
    accepted=0,
    active_start=4,
    active_end=4,
  )
  mem = adaptive.memory_observe(mem, obs, prof, acfg)  # plain measured at 2.0 s / round
  got = adaptive.round_costs(mem, prof, 4, (0, 1, 2))
  assert got == pytest.approx({0: 2.0, 1: 2.4, 2: 12.4})  # spec scaled by plain's ratio
  assert adaptive.round_costs(mem, prof, 4, (0,), learn_online=False) == {0: 1.0}


def test_profile_costs_never_fall_with_more_tokens():
  """Two timed points that came out inverted (a loaded machine) must not extrapolate to
  cheaper, or negative, longer proposals and passes (a CI run measured c = -0.12)."""
  prof = CostProfile(batch=4, k_ref=2, fwd1=1.0, fwd_ref=0.9, prop1=0.3, prop_ref=0.1, k_prop=2)
  assert [prof.propose(k) for k in (1, 2, 4, 8)] == [0.3] * 4
  assert [prof.verify(k) for k in (0, 1, 4)] == [1.0] * 3
  ok = CostProfile(batch=4, k_ref=2, fwd1=1.0, fwd_ref=1.2, prop1=0.1, prop_ref=0.2, k_prop=2)
  assert ok.propose(4) == pytest.approx(0.4) and ok.verify(4) == pytest.approx(1.4)


def _obs(active_start, active_end, steps=4, strategy=0, tokens=0, seconds=1.0, bucket=4):
  return ChunkObs(
    bucket=bucket,
    strategy=strategy,
    steps=steps,
    seconds=seconds,
    tokens=tokens,
    rounds=0,
    accepted=0,
    active_start=active_start,
    active_end=active_end,
  )


def test_tlt_turns_on_after_patience_at_or_below_threshold():
  acfg = AdaptiveConfig(
    policy='tlt', tlt_threshold=32, tlt_patience=8, chunk_steps=16, tlt_epsilon=0.0, tlt_default_k=4
  )
  st = adaptive.TltState()
  no_explore = (0.99, 0.0)
  st, s, _ = adaptive.tlt_update(st, None, 64, 64, acfg, no_explore)
  assert s == 0
  st, s, steps = adaptive.tlt_update(st, _obs(64, 30, steps=16), 30, 32, acfg, no_explore)
  assert s == 0 and st.below_steps == 0 and steps == 8  # just crossed: patience starts
  st, s, steps = adaptive.tlt_update(st, _obs(30, 28, steps=5), 28, 32, acfg, no_explore)
  assert s == 0 and st.below_steps == 5 and steps == 3  # 3 more steps to go
  st, s, _ = adaptive.tlt_update(st, _obs(28, 27, steps=3), 27, 32, acfg, no_explore)
  assert st.on and s == 4  # on, no rewards yet: the default arm
  # once on it stays on (the batch only shrinks)
  st, s, _ = adaptive.tlt_update(st, _obs(27, 20, strategy=4, tokens=100), 20, 32, acfg, no_explore)
  assert st.on and s == 4
  # a batch above the threshold never turns on, however long it runs
  st2 = adaptive.TltState()
  for _ in range(5):
    st2, s, _ = adaptive.tlt_update(st2, _obs(40, 40, steps=16), 40, 64, acfg, no_explore)
    assert s == 0 and not st2.on


def test_tlt_epsilon_greedy_median_reward_per_bucket():
  acfg = AdaptiveConfig(
    policy='tlt', arms=(1, 2, 3, 4), tlt_threshold=32, tlt_patience=0, tlt_epsilon=0.1, tlt_window=3
  )
  st = adaptive.TltState(on=True)
  # arm 2: rewards 10, 100, 11 (median 11); arm 3: 12, 12, 1 (median 12) in bucket 8
  for k, r in [(2, 10), (3, 12), (2, 100), (3, 12), (2, 11), (3, 1)]:
    obs = _obs(8, 8, strategy=k, tokens=r, seconds=1.0, bucket=8)
    st, s, _ = adaptive.tlt_update(st, obs, 8, 8, acfg, (0.5, 0.0))
  assert st.rewards[(8, 2)] == (10.0, 100.0, 11.0) and s == 3  # median, not mean
  obs = _obs(8, 8, strategy=2, tokens=5, seconds=1.0, bucket=8)  # window drops the 10
  st, s, _ = adaptive.tlt_update(st, obs, 8, 8, acfg, (0.5, 0.0))
  assert st.rewards[(8, 2)] == (100.0, 11.0, 5.0) and s == 3
  # explore with probability epsilon: u[0] < 0.1 picks the arm u[1] points at
  assert adaptive.tlt_update(st, None, 8, 8, acfg, (0.05, 0.0))[1] == 1
  assert adaptive.tlt_update(st, None, 8, 8, acfg, (0.05, 0.99))[1] == 4
  # a smaller bucket with no data of its own uses the nearest larger bucket's best arm
  assert adaptive.tlt_update(st, None, 4, 4, acfg, (0.5, 0.0))[1] == 3


def test_roofline_ladder_and_threshold():
  acfg = AdaptiveConfig(policy='roofline', arms=(11, 5, 9, 7))  # the ladder: ascending
  assert acfg.ladder == (5, 7, 9, 11)
  rv = {g: (0.1, 1.0 + 0.05 * g) for g in acfg.ladder}  # cheap drafts
  st = adaptive.RooflineState()
  st, s, sp = adaptive.roofline_update(st, 0.95, None, rv, acfg)
  assert st.index == 0 and s == 5 and sp > 1.05  # no measurement yet: the ladder stays
  for want in (1, 2, 3, 3):  # acceptance >= 0.94 steps up, clamped at the top
    st, s, _ = adaptive.roofline_update(st, 0.95, 0.95, rv, acfg)
    assert st.index == want
  assert s == 11
  st, s, _ = adaptive.roofline_update(st, 0.9, 0.9, rv, acfg)  # in between: stays
  assert st.index == 3
  for want in (2, 1, 0, 0):  # acceptance <= 0.85 steps down, clamped at the bottom
    st, _, _ = adaptive.roofline_update(st, 0.85, 0.85, rv, acfg)
    assert st.index == want
  # the speedup threshold: L / (g r + v) must exceed 1.05
  g = 5
  need = adaptive.expected_tokens(0.6, g)  # with g r + v == L the speedup is exactly 1
  exact = {gg: (0.0, need) for gg in acfg.ladder}
  assert adaptive.roofline_update(st, 0.6, None, exact, acfg)[1] == 0
  just = {gg: (0.0, need / 1.06) for gg in acfg.ladder}
  _, s, sp = adaptive.roofline_update(st, 0.6, None, just, acfg)
  assert s == g and sp == pytest.approx(1.06)


def test_config_validation():
  with pytest.raises(ValueError, match='policy'):
    AdaptiveConfig(policy='sometimes')
  with pytest.raises(ValueError, match='buckets'):
    AdaptiveConfig(buckets=(4, 8))
  with pytest.raises(ValueError, match='drafter'):
    adaptive.AdaptiveRolloutEngine(CFG, RCFG, AdaptiveConfig(policy='tlt'))
  with pytest.raises(ValueError, match='arms'):
    AdaptiveConfig(arms=(2, 2))
  assert AdaptiveConfig(policy='roofline', arms=(5, 7, 9, 11)).k_max == 11
  assert AdaptiveConfig(policy='always', arms=(3,)).k_max == 3
  assert AdaptiveConfig(policy='never').k_max == 0
  # one source of k per engine: the static engine's knob is refused, naming the one that applies
  with pytest.raises(ValueError, match='adaptive.arms'):
    adaptive.AdaptiveRolloutEngine(
      CFG, dataclasses.replace(RCFG, num_draft=2), AdaptiveConfig(policy='always'), DRAFTER
    )


def test_cost_model_learns_yield_and_skips_the_prefill_chunk():
  """Two ways the measured costs can mislead, each checked: a chunk whose time is not a
  round cost (``timed=False``) is not learned from, and a speculative chunk
  whose rows finish mid-run commits fewer tokens than its acceptance predicts."""
  prof = _profile(4, 1.0, 1.2, 0.1, 0.2)  # plain 1.0 s/round; k2: 0.2 + 1.04 = 1.24
  acfg = AdaptiveConfig(cost_memory=0.0, alpha_memory=0.0)
  mem = adaptive.Memory(alpha=0.99)
  first = dataclasses.replace(
    _obs(4, 4, steps=2, seconds=10.0, tokens=8), timed=False
  )  # 5 s/"round": other work inside
  mem = adaptive.memory_observe(mem, first, prof, acfg)
  assert mem.costs == {} and mem.corr == {}
  costs = adaptive.round_costs(mem, prof, 4, (0, 2))
  assert adaptive.cost_model_choose(costs, 0.99, None, 0.1)[0] == 2  # ~3 tokens / 1.24 s
  # k = 2 at acceptance ~1, but rows stop after ~1 token: 40 committed of 120 emitted
  spec = ChunkObs(
    bucket=4,
    strategy=2,
    steps=10,
    seconds=12.4,
    tokens=40,
    rounds=40,
    accepted=80,
    active_start=4,
    active_end=4,
  )
  assert spec.yield_ == pytest.approx(1 / 3)
  mem = adaptive.memory_observe(mem, spec, prof, acfg)
  assert mem.yields[(4, 2)] == pytest.approx(1 / 3)
  eng = adaptive.AdaptiveRolloutEngine(CFG, RCFG, AdaptiveConfig(arms=(2,)), drafter=DRAFTER)
  eng.set_profile(prof)
  eng.memory = mem
  report = adaptive.AdaptiveReport(batch=4, policy='cost_model')
  s, _, info = eng._decide(None, 4, 4, 2, PARAMS, lambda: None, report)
  assert s == 0, info  # 3 x 1/3 tokens per 1.24 s < 1 token per 1.0 s: back to plain


def test_a_rollout_starts_speculating_only_for_more_than_the_hysteresis_margin():
  """Plain is the incumbent at a rollout's start: an arm predicted 6% faster (within the
  10% hysteresis) is not started, one 25% faster is; once speculating, the 6% arm is kept
  (the margin is a switching cost, not a threshold on speculation)."""
  acfg = dict(policy='cost_model', arms=(2,), alpha_prior=0.5, alpha_optimism=0.0)
  report = adaptive.AdaptiveReport(batch=4, policy='cost_model')
  # plain 1.0 s per round; k2: 1.75 tokens per pass (alpha 0.5) per fwd_ref + prop_ref
  for fwd_ref, started in ((1.5, False), (1.25, True)):  # k2: 1.06x / 1.25x plain's rate
    eng = engine(**acfg)
    eng.set_profile(_profile(4, 1.0, fwd_ref, 0.075, 0.15))
    s, _, info = eng._decide(None, 4, 4, None, PARAMS, lambda: None, report)
    assert s == (2 if started else 0), info
    # with no incumbent (the pure choice), k2 would have been started at both costs
    assert adaptive.cost_model_choose({0: 1.0, 2: fwd_ref + 0.15}, 0.5, None, 0.1)[0] == 2
  eng.set_profile(_profile(4, 1.0, 1.5, 0.075, 0.15))  # 1.06x again, k2 already running
  assert eng._decide(None, 4, 4, 2, PARAMS, lambda: None, report)[0] == 2


def test_memory_and_host_state_round_trip_through_json():
  """What the engine learned goes into checkpoints as JSON (the host-state hook)."""
  import json

  mem = adaptive.Memory(
    alpha=0.61,
    alpha_n=12.0,
    costs={(8, 0): 0.01, (4, 2): 0.02},
    corr={(8, 'plain'): 1.1, (4, 'spec'): 0.9},
    yields={(4, 2): 0.8},
    tlt=adaptive.TltState(below_steps=3, on=True, rewards={(4, 2): (1.0, 2.0)}),
    roofline=adaptive.RooflineState(index=2),
  )
  assert adaptive.memory_from_json(json.loads(json.dumps(adaptive.memory_to_json(mem)))) == mem
  eng = engine(policy='tlt')
  eng.memory = mem
  eng.decider.rng.random()
  state = json.loads(json.dumps(eng.host_state()))
  fresh = engine(policy='tlt')
  fresh.load_host_state(state)
  assert fresh.memory == mem and fresh.decider.rng.random() == eng.decider.rng.random()


def test_policies_and_speculation_maths_are_pure_python():
  """The adaptive engine's decisions are host maths: the modules that make them import no
  JAX or NumPy (directly or through other specrl modules), so they are unit-tested with
  plain numbers and can run anywhere."""
  import ast
  import pathlib

  root = pathlib.Path(__file__).resolve().parents[1]
  pure = ['specrl/adaptive/config.py', 'specrl/adaptive/policies.py', 'specrl/adaptive/report.py']
  pure += ['specrl/decoding/spec_math.py']
  seen, todo = set(), list(pure)
  while todo:
    path = todo.pop()
    if path in seen:
      continue
    seen.add(path)
    for node in ast.walk(ast.parse((root / path).read_text())):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
      if isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module]
      for name in names:
        assert name.split('.')[0] not in ('jax', 'numpy', 'flax'), (path, name)
        if name.startswith('specrl.'):
          todo.append(name.replace('.', '/') + '.py')
  assert len(seen) == len(pure)  # they import only each other (and the stdlib)

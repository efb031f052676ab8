"""The hybrid suffix drafter (``drafter.suffix.fallback``; :mod:`specrl.drafters.hybrid`).

Per-row dispatch (rows without a suffix match get the fallback's draft and distribution,
rows with one the one-hot suffix draft), the fallback's KV cache holding every committed
token after suffix rounds, config validation, and end to end: lossless by chi-square at
T = 1 / top-p and T = 0.7 / top-k through mixed rounds (both kinds of rows in one batch),
with broken verifiers of either path caught by the same test; greedy equals plain greedy in
the static and the adaptive engine (with compaction), built from the config.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from specrl import adaptive, drafters, train
from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl.drafters import hooks
from specrl.drafters.hybrid import HybridSuffixDrafter
from specrl.drafters.model_drafter import ModelDrafter
from specrl.drafters.suffix import SuffixDrafter
from specrl.sampling import SamplingParams
from tests import broken_verifiers, stats
from tests.test_suffix_drafter import RAGGED, _ragged_prompts

V = 4
CFG = model_lib.ModelConfig(
  vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
)
POLICY = model_lib.init_params(CFG, jax.random.key(0))
OTHER = model_lib.init_params(CFG, jax.random.key(7))  # a fallback that often disagrees


def _config_hybrid(vocab=V, **quantized):
  c = default.get_config('smoke')
  c.rollout.drafter = 'suffix'
  c.drafter.suffix.update(fallback='quantized', n_min=2, n_max=4)
  c.drafter.quantized.update(quantized)
  return c, drafters.make_drafter(c, dataclasses.replace(CFG, vocab_size=vocab))


def test_config_builds_the_hybrid_and_refuses_an_unknown_fallback():
  c, d = _config_hybrid(share_kv=True)
  assert isinstance(d, HybridSuffixDrafter)
  assert (d.name, d.derived, d.fallback.share_kv, d.suffix.n_min) == (
    'suffix+quantized',
    True,
    True,
    2,
  )
  c.drafter.suffix.fallback = 'eagle_head'
  with pytest.raises(ValueError, match="must be one of \\('', 'quantized'\\)"):
    drafters.make_drafter(c, CFG)


# ----------------------------------------------------------------------------- dispatch

VOCAB, S, K = 16, 16, 3
CFG16 = dataclasses.replace(CFG, vocab_size=VOCAB)
POLICY16 = model_lib.init_params(CFG16, jax.random.key(1))


def _batch(texts, groups):
  """Tokens, pos and a context whose shared state has observed every row's text."""
  toks = np.zeros((len(texts), S), np.int32)
  for i, t in enumerate(texts):
    toks[i, : len(t)] = t
  pos = np.array([len(t) - 1 for t in texts], np.int32)
  ids = np.arange(len(texts), dtype=np.int32)
  g = np.asarray(groups, np.int32)
  sfx = SuffixDrafter(VOCAB, n_min=2, n_max=4)
  shared = sfx.observe(None, sfx.init_shared(len(texts), S), toks, pos * 0, pos, ids, g, ids)
  ctx = hooks.DraftContext(ids, jnp.asarray(g), jnp.asarray(ids), shared, None, None)
  return jnp.asarray(toks), jnp.asarray(pos), ctx


def test_rows_without_a_match_get_the_fallbacks_draft_and_rows_with_one_the_suffixs():
  texts = [[5, 6, 7], [1, 5, 6, 7, 8, 9, 10], [2, 3, 4, 11, 12], [13, 14, 15, 9, 2]]
  toks, pos, ctx = _batch(texts, [0, 0, 1, 2])  # only row 0 matches (in its sibling row 1)
  fb = ModelDrafter('quantized', CFG16, derive=lambda p: p)
  d = HybridSuffixDrafter(SuffixDrafter(VOCAB, n_min=2, n_max=4), fb)
  dp = d.params_from_policy(POLICY16)
  state = d.prefill(dp, toks, pos + 1, S)
  sp = SamplingParams(1.0)
  seeds = jnp.arange(4, dtype=jnp.int32) + 11
  tokens, mixed, _, _ = d.propose(dp, state, toks, pos, K, seeds, sp, ctx=ctx)
  tokens, one_hot = np.asarray(tokens), np.asarray(mixed.one_hot)
  np.testing.assert_array_equal(one_hot, [True, False, False, False])
  np.testing.assert_array_equal(tokens[0], [8, 9, 10])  # the suffix draft from row 1
  # the fallback's own proposal on the other rows: same tokens, same distribution
  ft, fl, _, _ = fb.propose(dp['fallback'], state, toks, pos, K, seeds, sp)
  np.testing.assert_array_equal(tokens[1:], np.asarray(ft)[1:])
  np.testing.assert_allclose(np.asarray(mixed.logits)[1:], np.asarray(fl)[1:], atol=1e-5)


def test_the_fallback_cache_holds_every_committed_token_after_suffix_rounds():
  """A round drafted by the suffix commits up to k + 1 tokens the fallback never fed; the
  hybrid's next proposal must leave the fallback's cache equal to a prefill over the whole
  committed text (the plain model drafter's 2-token re-feed would leave stale slots)."""
  prompt_len, committed = 5, 5 + K  # K + 1 tokens committed since the fallback's prefill
  text = [3, 1, 4, 1, 5, 9, 2, 6]
  texts = [text, text[:2] + [9, 2, 6, 7, 9, 2]]  # both end "9 2": every row matches
  toks, pos, ctx = _batch(texts, [0, 0])
  fb = ModelDrafter('quantized', CFG16, derive=lambda p: p)
  d = HybridSuffixDrafter(SuffixDrafter(VOCAB, n_min=2, n_max=4), fb)
  dp = d.params_from_policy(POLICY16)
  state = d.prefill(dp, toks[:, :prompt_len], jnp.full((2,), prompt_len), S)
  want = fb.prefill(dp['fallback'], toks[:, :committed], pos + 1, S)['cache']
  _, mixed, new, _ = d.propose(
    dp, state, toks, pos, K, jnp.zeros(2, jnp.int32), SamplingParams(1.0), ctx=ctx
  )
  assert np.asarray(mixed.one_hot).all()  # the catch-up-only branch ran
  for name in ('k', 'v'):
    got, ref, old = (
      np.asarray(c[name])[:, :, :committed] for c in (new['cache'], want, state['cache'])
    )
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert np.abs(old - ref).max() > 1e-3  # before: the suffix's tokens were missing


# ----------------------------------------------------------------------------- end to end

PROMPT = [1, 3, 2]
KE, M = 2, 5
N_SAMPLES, G = 6000, 8
PASS_P, FAIL_P = 1e-3, 1e-6


class _Recording(HybridSuffixDrafter):
  """Records, per round, the fraction of rows that got the one-hot suffix draft."""

  fractions: list

  def propose(self, *args, **kw):
    out = super().propose(*args, **kw)
    jax.debug.callback(lambda f: self.fractions.append(float(f)), jnp.mean(out[1].one_hot))
    return out


def _hybrid_pvalue(sp, seed=0, n=N_SAMPLES):
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=2 * KE + 3, max_prompt_len=3, eos_id=-1, sampling=sp, num_draft=KE
  )
  fallback = ModelDrafter('other', CFG, own_params=OTHER)  # disagrees often: rejections
  d = _Recording(SuffixDrafter(V, n_min=2, n_max=3), fallback)
  d.fractions = []
  eng = rollout_lib.RolloutEngine(CFG, rcfg, drafter=d)
  toks = np.tile(np.asarray(PROMPT, np.int32), (n, 1))
  groups = np.arange(n, dtype=np.int32) // G
  out, _ = eng.generate(POLICY, toks, np.full((n,), 3), jax.random.key(seed), None, groups)
  out = jax.device_get(out)
  conts, probs = stats.exact_joint(POLICY, CFG, PROMPT, M, sp)
  alpha = out.num_accepted.sum() / max(out.num_drafted.sum(), 1)
  return stats.chi2_pvalue(out.response[:, :M], conts, probs), alpha, np.asarray(d.fractions)


SETTINGS = {
  'T1-topp0.9': SamplingParams(1.0, top_p=0.9),
  'T0.7-topk3': SamplingParams(0.7, top_k=3),
}


@pytest.mark.parametrize('setting', list(SETTINGS))
def test_hybrid_is_lossless_through_mixed_rounds(setting):
  p, alpha, fractions = _hybrid_pvalue(SETTINGS[setting], seed=5)
  assert 0.2 < alpha < 0.95, f'alpha {alpha}: accepts and rejects both needed'
  mixed = fractions[(fractions > 0) & (fractions < 1)]
  assert len(mixed) >= 2 and 0.1 < fractions.mean() < 0.9, f'rounds not mixed: {fractions}'
  assert p > PASS_P, f'hybrid-drafted samples do not follow the policy (p={p:.2e})'


@pytest.mark.parametrize('mutant', ['onehot_keeps_draft', 'no_residual'])
def test_a_broken_verifier_of_either_path_is_caught(mutant, monkeypatch):
  broken_verifiers.install(mutant, monkeypatch, KE)
  p, _, _ = _hybrid_pvalue(SETTINGS['T1-topp0.9'], seed=5)
  assert p < FAIL_P, f'{mutant} was not caught (p={p:.2e})'


@pytest.mark.parametrize(
  'engine,share_kv', [('static', False), ('static', True), ('adaptive', False)]
)
def test_greedy_equals_plain_greedy(engine, share_kv):
  toks, plen = _ragged_prompts()
  groups = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int32)
  plain_cfg = dataclasses.replace(RAGGED, sampling=SamplingParams(0.0))
  plain, _ = rollout_lib.RolloutEngine(CFG, plain_cfg).generate(
    POLICY, toks, plen, jax.random.key(1)
  )
  _, d = _config_hybrid(share_kv=share_kv)
  if engine == 'static':
    eng = rollout_lib.RolloutEngine(CFG, dataclasses.replace(plain_cfg, num_draft=3), drafter=d)
  else:
    acfg = adaptive.AdaptiveConfig(policy='always', buckets=(8, 4, 1), chunk_steps=3, arms=(3,))
    eng = adaptive.AdaptiveRolloutEngine(CFG, plain_cfg, acfg, drafter=d)
  out, _ = eng.generate(POLICY, toks, plen, jax.random.key(1), group_ids=groups)
  out, plain = jax.device_get((out, plain))
  s = plain_cfg.seq_len
  np.testing.assert_array_equal(out.tokens[:, :s], plain.tokens[:, :s])
  assert out.num_accepted.sum() > 0
  if engine == 'adaptive':
    assert eng.last_report.compactions


def test_grpo_steps_derive_the_fallback_and_add_the_history():
  c = default.get_config('smoke')
  c.log_every = 100
  c.rollout.drafter, c.rollout.num_draft = 'suffix', 2
  c.drafter.suffix.update(fallback='quantized', history=2)
  exp = train.build_experiment(c)
  assert hooks.derives_in_train_step(exp.drafter)
  seen = []
  history_params = exp.drafter.history_params
  exp.drafter.history_params = lambda *a: seen.append(history_params(*a)) or seen[-1]
  state = train.init_state(exp)
  fns = train.jitted_steps(exp, jax.tree.map(lambda x: x.sharding, state))
  batch, _, _, m = train.rollout_batch(exp, state.params, 0, state.rng)  # derived here
  assert m['spec/history_bytes'] > 0 and 'spec/alpha' in m
  state, _, draft = fns[1](state, batch)  # the next rollout's fallback, from the new params
  assert any(x.dtype == np.int8 for x in jax.tree.leaves(draft['fallback']))
  assert draft['history'] is None
  train.rollout_batch(exp, state.params, 0, state.rng, draft)  # the same prompts again
  first, second = seen
  assert first['history']['len'].sum() == 0  # nothing recorded before the first rollout
  assert second['history']['len'].min() > 0  # every row sees its prompt's earlier answers


@pytest.mark.parametrize('impl', ['jnp', 'pallas'])
def test_verify_mixed_gives_each_row_its_own_paths_result(impl):
  from specrl.decoding import verify as verify_lib
  from specrl.kernels import verify_reference as ref

  b, k, v = 12, 3, 9
  t = 2.0 * jax.random.normal(jax.random.key(0), (b, k + 1, v))
  dl = 2.0 * jax.random.normal(jax.random.key(1), (b, k, v))
  x = jax.random.randint(jax.random.key(2), (b, k), 0, v)
  x = x.at[1, 1:].set(-1).at[4].set(-1)  # one-hot rows with fewer drafts, or none
  one_hot = jnp.arange(b) % 3 != 2
  seeds = jnp.arange(b, dtype=jnp.uint32) * 31
  sp = SamplingParams(0.8, top_p=0.9)
  x = jnp.where(one_hot[:, None], x, jnp.maximum(x, 0))
  mixed = jax.jit(lambda oh: verify_lib.verify_mixed(t, dl, x, oh, seeds, sp, impl=impl))
  got = jax.device_get(mixed(one_hot))
  tok = jax.device_get(jax.jit(ref.verify_tokens_reference, static_argnums=3)(t, x, seeds, sp))
  gen = jax.jit(ref.verify_reference, static_argnums=4)(t, dl, jnp.maximum(x, 0), seeds, sp)
  gen = jax.device_get(gen)
  oh = np.asarray(one_hot)
  for name in ('num_accepted', 'tokens'):
    want = np.where(
      oh.reshape((-1,) + (1,) * (getattr(tok, name).ndim - 1)),
      getattr(tok, name),
      getattr(gen, name),
    )
    np.testing.assert_array_equal(getattr(got, name), want)
  assert (got.num_accepted[oh] != gen.num_accepted[oh]).any() or (
    got.tokens[oh] != gen.tokens[oh]
  ).any()
  # all rows one-hot: the token-only branch alone
  all_t = jax.device_get(mixed(jnp.ones(b, bool)))
  np.testing.assert_array_equal(all_t.tokens, tok.tokens)


def test_adaptive_engine_runs_two_original_batch_sizes_with_uncompacted_state():
  """The suffix drafter's shared state has the original batch as leading axis: the same
  bucket reached from B = 8 and from B = 4 needs two compiles, not one reused wrongly."""
  toks, plen = _ragged_prompts()
  acfg = adaptive.AdaptiveConfig(policy='always', buckets=(8, 4, 1), chunk_steps=3, arms=(3,))
  plain_cfg = dataclasses.replace(RAGGED, sampling=SamplingParams(0.0))
  eng = adaptive.AdaptiveRolloutEngine(CFG, plain_cfg, acfg, drafter=SuffixDrafter(V))
  for rows in (slice(0, 8), slice(0, 4)):
    g = np.arange(8, dtype=np.int32)[rows] // 4
    out, _ = eng.generate(POLICY, toks[rows], plen[rows], jax.random.key(1), group_ids=g)
    assert np.asarray(out.length).min() > 0

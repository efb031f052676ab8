"""The eagle drafter: lossless (chi-square, untrained / trained / reduced vocabulary), greedy
equals plain greedy, the head is fed the policy's true hidden states at every committed
position (prompt, plain phases and verify passes, no extra policy forward), it works in the
adaptive engine, and its training lowers its loss and leaves the policy's update alone."""

import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import default
from specrl import checkpointing as ckpt_lib
from specrl import model as model_lib
from specrl import rl as rl_lib
from specrl import rollout as rollout_lib
from specrl import train
from specrl.decoding import steps as steps_lib
from specrl.drafters import eagle, hooks
from specrl.drafters import eagle_train as et
from specrl.sampling import SamplingParams
from tests import test_speculative as ts


def make(cfg, seed=1, **kw):
  ecfg = eagle.EagleConfig(**kw)
  return eagle.EagleDrafter(cfg, ecfg, eagle.init_head(cfg, ecfg.n_layers, jax.random.key(seed)))


def test_config_section_has_every_field():
  sec = default.get_config().drafter.eagle.to_dict()
  for f in dataclasses.fields(eagle.EagleConfig):
    assert f.name in sec, f'config.drafter.eagle.{f.name} is missing'
    assert sec[f.name] == f.default, f.name
  assert eagle.EagleConfig.from_config(default.get_config().drafter.eagle) == eagle.EagleConfig()
  with pytest.raises(ValueError, match='mode'):
    eagle.EagleConfig(mode='sometimes')


def test_head_file_round_trips_and_bad_files_are_clear_errors(tmp_path):
  """A saved head (with its reduced vocabulary) comes back leaf for leaf through
  ``drafter.eagle.head_path``; a head of another shape, a non-head file and a vocabulary
  size the config contradicts are errors that say so."""
  cfg = ts.CFG
  d = make(cfg, seed=3, reduced_vocab=3)
  head = jax.tree.map(lambda x: x + 0.25, d.head_params)  # not the init: loading must read it
  vocab = jnp.asarray([0, 2, 3], jnp.int32)
  path = str(tmp_path / 'head.npz')
  eagle.save_head(path, head, vocab)
  sec = default.get_config().drafter.eagle
  sec.head_path, sec.reduced_vocab = path, 3
  got = eagle.make_eagle_drafter(sec, cfg, jax.random.key(0))
  for a, b in zip(jax.tree.leaves(got.head_params), jax.tree.leaves(head), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(got.vocab_ids), np.asarray(vocab))
  sec.reduced_vocab = 0
  with pytest.raises(ValueError, match='reduced_vocab=3'):
    eagle.make_eagle_drafter(sec, cfg, jax.random.key(0))
  with pytest.raises(ValueError, match='n_layers=2'):
    eagle.load_head(path, cfg, 2)
  wide = dataclasses.replace(cfg, d_model=2 * cfg.d_model)
  with pytest.raises(ValueError, match='has shape'):
    eagle.load_head(path, wide, 1)
  junk = tmp_path / 'junk.npz'
  junk.write_text('not a zip')
  with pytest.raises(ValueError, match='not an eagle head file'):
    eagle.load_head(str(junk), cfg, 1)
  with pytest.raises(FileNotFoundError, match='head_path'):
    eagle.load_head(str(tmp_path / 'absent.npz'), cfg, 1)


def test_a_bfloat16_head_file_is_half_the_size_and_a_named_digest_is_checked(tmp_path):
  """``save_head(..., 'bfloat16')`` (a GPU-trained head must come back under a device
  call's 16 MiB) stores the weights' bf16 bits and loads them back as the head's float32,
  bf16-rounded; ``drafter.eagle.head_sha256`` refuses another file naming both digests, and
  is refused without a head_path or when it is not a sha256."""
  cfg = ts.CFG
  head = jax.tree.map(lambda x: x + 0.1, make(cfg, seed=4).head_params)
  vocab = jnp.asarray([0, 2, 3], jnp.int32)
  full, half = str(tmp_path / 'f32.npz'), str(tmp_path / 'bf16.npz')
  eagle.save_head(full, head, vocab)
  eagle.save_head(half, head, vocab, 'bfloat16')
  with np.load(full) as f, np.load(half) as h:  # the weights' bytes halve (zip headers stay)
    weights = [k for k in f.files if k != eagle.VOCAB_KEY]
    assert sorted(h[eagle.BF16_KEY].tolist()) == sorted(weights)
    assert 2 * sum(h[k].nbytes for k in weights) == sum(f[k].nbytes for k in weights)
  sec = default.get_config().drafter.eagle
  sec.head_path, sec.reduced_vocab, sec.head_sha256 = half, 3, eagle.file_sha256(half)
  got = eagle.make_eagle_drafter(sec, cfg, jax.random.key(0))
  for a, b in zip(jax.tree.leaves(got.head_params), jax.tree.leaves(head), strict=True):
    assert a.dtype == b.dtype == jnp.float32
    want = np.asarray(b).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(a), want)
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(got.head_params), jax.tree.leaves(head), strict=True)
  )  # rounded: the bf16 file really is bf16
  np.testing.assert_array_equal(np.asarray(got.vocab_ids), np.asarray(vocab))
  sec.head_path = full  # another file than the digest names
  with pytest.raises(ValueError, match=rf'has sha256 {eagle.file_sha256(full)}, .*expects '):
    eagle.make_eagle_drafter(sec, cfg, jax.random.key(0))
  with pytest.raises(ValueError, match='64 lowercase hex digits'):
    eagle.EagleConfig(head_path=full, head_sha256='abc')
  with pytest.raises(ValueError, match='head_path, which is empty'):
    eagle.EagleConfig(head_sha256='0' * 64)
  with pytest.raises(ValueError, match='head dtype must be one of'):
    eagle.save_head(full, head, vocab, 'float16')


def test_a_loaded_vocabulary_survives_the_first_rollout():
  """The trainer re-picks the reduced vocabulary from decayed counts of recent rollouts; a
  head that comes with one (a warmed head's file) keeps it for the ids no rollout emitted
  yet, instead of the lowest unseen ids."""
  cfg = ts.CFG  # V = 4
  d = make(cfg, reduced_vocab=2)
  d.vocab_ids = jnp.asarray([2, 3], jnp.int32)
  tr = et.trainer(d)
  tr.observe_tokens(np.array([[1, 1]]), np.array([[0, 1]]))  # one response token: id 1
  np.testing.assert_array_equal(np.asarray(d.vocab_ids), [1, 2])  # seen first, then saved
  fresh = make(cfg, reduced_vocab=2)  # default vocabulary: the lowest ids, as before
  tr = et.trainer(fresh)
  tr.observe_tokens(np.array([[3, 3]]), np.array([[0, 1]]))
  np.testing.assert_array_equal(np.asarray(fresh.vocab_ids), [0, 3])


# ----------------------------------------------------------------------------- training


def spec_batch(cfg, params, n=64, seed=0):
  """Policy generations (T = 1) of the chi-square test's prompt: tokens, response mask."""
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=ts.MAX_NEW, max_prompt_len=len(ts.PROMPT), eos_id=-1, sampling=ts.SETTINGS['T1']
  )
  eng = rollout_lib.RolloutEngine(cfg, rcfg)
  toks = np.tile(np.asarray(ts.PROMPT, np.int32), (n, 1))
  out, _ = eng.generate(params, toks, np.full((n,), len(ts.PROMPT), np.int32), jax.random.key(seed))
  return jnp.asarray(out.tokens[:, : rcfg.seq_len]), jnp.asarray(
    et.response_mask(out, rcfg.seq_len)
  )


_TRAINED = []
TRAIN_STEPS = 40  # enough for the loss to fall well below 0.6x and alpha to be high


def trained_drafter(steps=TRAIN_STEPS):
  """A head trained on the policy's own generations (the warm-up path): cached."""
  if not _TRAINED:
    d = make(ts.CFG, lr=3e-3)
    opt = et.make_optimizer(d.ecfg)
    hs = et.init_head_state(d.head_params, opt)
    toks, mask = spec_batch(ts.CFG, ts.POLICY)
    hs, m0, _, _ = et.warmup(
      d, hs, ts.POLICY, lambda i: (toks, mask), steps=1, budget_s=60, optimizer=opt
    )
    hs, m1, _, done = et.warmup(
      d, hs, ts.POLICY, lambda i: (toks, mask), steps=steps, budget_s=120, optimizer=opt
    )
    _TRAINED.append((d, m0, m1, done))
  return _TRAINED[0]


def test_head_update_lowers_its_loss_on_a_fixed_buffer():
  d, m0, m1, done = trained_drafter()
  assert done == TRAIN_STEPS
  # the soft CE is bounded below by the policy's entropy: the feature loss and the
  # teacher-forced acceptance of draft 1 (sum min(p, q)) show the head learning
  assert m1['head/smooth_l1'] < 0.3 * m0['head/smooth_l1'], (m0, m1)
  assert m1['head/ce'] < m0['head/ce'] and m1['head/loss'] < m0['head/loss'], (m0, m1)
  assert m1['head/accept_t1'] > 0.9 > m0['head/accept_t1'], (m0, m1)


def _scaled_policy():
  """ts.POLICY with a non-trivial final-norm weight (SmolLM2's is in [-2.1, 3.3]: its
  final-norm hidden states have |h| ~45 and give logits of tens of nats)."""
  g = jax.random.uniform(jax.random.key(3), (ts.CFG.d_model,), minval=0.5, maxval=3.0)
  return {**ts.POLICY, 'final_norm': g * jnp.where(jnp.arange(ts.CFG.d_model) % 5, 1.0, -1.0)}


def _policy_features(params, toks):
  pos = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
  return model_lib.forward(params, ts.CFG, toks, pos, return_hidden=True)[2], pos


def test_untrained_head_predicts_the_current_feature():
  """init_head: ĥ_{t+1} = h_t exactly, whatever the policy's final-norm weight (the head
  starts at the policy's feature scale instead of a random point far from it: on SmolLM2 a
  random head's first soft CE was ~19 nats and Adam diverged)."""
  pol = _scaled_policy()
  toks = jnp.asarray(np.random.default_rng(1).integers(0, ts.CFG.vocab_size, (3, 9)), jnp.int32)
  h, pos = _policy_features(pol, toks)
  d = make(ts.CFG)
  dp = d.params_from_policy(pol)
  pred = eagle.predict_features(dp, ts.CFG, d.hcfg, h[:, :-1], toks[:, 1:], pos[:, :-1])
  np.testing.assert_allclose(pred, h[:, :-1], rtol=1e-4, atol=1e-4)


def test_head_features_have_the_policys_final_norm_scale():
  """Whatever the head's weights, ĥ = rms_norm(y, g): ĥ / g has unit RMS at every position,
  as the policy's own final-norm features do (so the draft logits have the policy's
  scale)."""
  pol = _scaled_policy()
  toks = jnp.asarray(np.random.default_rng(2).integers(0, ts.CFG.vocab_size, (2, 7)), jnp.int32)
  h, pos = _policy_features(pol, toks)
  d = make(ts.CFG)
  noisy = jax.tree.map(
    lambda x: x + 0.5 * jax.random.normal(jax.random.key(4), x.shape), d.head_params
  )
  dp = eagle.draft_params(pol, noisy)
  pred = eagle.predict_features(dp, ts.CFG, d.hcfg, h[:, :-1], toks[:, 1:], pos[:, :-1])
  g = pol['final_norm']
  for x in (pred, h):
    np.testing.assert_allclose(jnp.sqrt(jnp.mean((x / g) ** 2, -1)), 1.0, rtol=1e-3)


@pytest.mark.parametrize('reduced', [0, 2])
def test_topk_targets_give_the_full_softmax_loss(reduced):
  """head_loss with the policy's top-k targets (k = V: all of them, cached per batch in the
  warm-up) equals the loss from the full softmax, with and without a reduced vocabulary;
  with k < V the CE only drops the tail's mass."""
  cfg = ts.CFG
  toks, mask = spec_batch(cfg, ts.POLICY, n=4)
  h = et.policy_hidden(ts.POLICY, cfg, toks)
  d = make(cfg, reduced_vocab=reduced)
  vids = jnp.array([1, 2], jnp.int32) if reduced else None  # V = 4
  kw = dict(cfg=cfg, hcfg=d.hcfg, ecfg=d.ecfg)
  args = (d.head_params, ts.POLICY, vids, toks, h, mask)
  full, mf = et.head_loss(*args, **kw)
  topv, mv = et.head_loss(*args, et.policy_targets(ts.POLICY, cfg, h, cfg.vocab_size), **kw)
  for name in mf:
    np.testing.assert_allclose(mv[name], mf[name], rtol=1e-5, atol=1e-6, err_msg=name)
  _, m2 = et.head_loss(*args, et.policy_targets(ts.POLICY, cfg, h, 2), **kw)
  assert np.isfinite(mf['head/ce']) and m2['head/accept_t1'] <= mf['head/accept_t1']
  assert m2['head/ce'] < mf['head/ce'] if not reduced else m2['head/ce'] <= mf['head/ce']
  # the policy's mass inside the head's vocabulary: all of it without a reduced one, else
  # exactly p(1) + p(2) from the full softmax; it bounds draft 1's acceptance
  p = jax.nn.softmax(eagle.head_logits(eagle.draft_params(ts.POLICY, None), cfg, h[:, 1:]), -1)
  mass = p[..., 1] + p[..., 2] if reduced else jnp.sum(p, -1)
  m = mask[:, 2:].astype(jnp.float32)
  np.testing.assert_allclose(mf['head/vocab_mass'], jnp.sum(mass * m) / jnp.sum(m), rtol=1e-5)
  assert (mf['head/vocab_mass'] < 0.99) == bool(reduced)
  assert mf['head/accept_t1'] <= mf['head/vocab_mass'] + 1e-6


# ----------------------------------------------------------------------------- lossless

# Rows per chi-square test: 2/3 of test_speculative's (the broken-verifier power checks
# there use N_SAMPLES; the all-accepted / rejecting row counts below stay in the hundreds).
N_CHI = 8000


@pytest.mark.parametrize('setting', ['T1', 'T0.7-topk2'])
def test_untrained_head_is_lossless(setting):
  p, out = ts._pvalue(ts.SETTINGS[setting], make(ts.CFG), seed=21, n=N_CHI)
  assert ts._rejecting_rows(out) > 0.2, 'an untrained head should be rejected often'
  assert p > ts.PASS_P, f'p={p:.2e}'


@pytest.mark.parametrize('setting', ['T1', 'T0.7-topp0.8'])
def test_trained_head_is_lossless_through_the_bonus_token(setting):
  d = trained_drafter()[0]
  p, out = ts._pvalue(ts.SETTINGS[setting], d, seed=22, n=N_CHI)
  assert ts._all_accepted_rows(out) > 0.3, 'the all-accepted + bonus path was rarely taken'
  assert ts._rejecting_rows(out) > 0.02  # a trained head: rare, but hundreds of rows
  assert p > ts.PASS_P, f'p={p:.2e}'


def test_reduced_vocabulary_is_lossless():
  d = trained_drafter()[0]
  red = eagle.EagleDrafter(
    ts.CFG,
    dataclasses.replace(d.ecfg, reduced_vocab=2),
    d.head_params,
    vocab_ids=jnp.array([1, 2], jnp.int32),
  )
  dp = red.params_from_policy(ts.POLICY)
  lg = eagle.head_logits(dp, ts.CFG, jnp.ones((3, ts.CFG.d_model)))
  assert (lg[:, jnp.array([0, 3])] < -1e29).all()  # zero draft probability outside
  p, out = ts._pvalue(ts.SETTINGS['T0.7-topk2'], red, seed=23, n=N_CHI)
  assert ts._rejecting_rows(out) > 0.02
  assert p > ts.PASS_P, f'p={p:.2e}'


# ----------------------------------------------------------------------------- exactness

GCFG = model_lib.ModelConfig(
  vocab_size=16, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
)
GPARAMS = model_lib.init_params(GCFG, jax.random.key(0))
LENS = np.array([8, 3, 5, 1, 7, 2], np.int32)
TOKS = np.random.default_rng(0).integers(3, 16, (6, 8)).astype(np.int32)


def _rcfg(k, sp=ts.SETTINGS['T1'], **kw):
  return rollout_lib.RolloutConfig(
    max_new_tokens=20, max_prompt_len=8, eos_id=-1, sampling=sp, num_draft=k, **kw
  )


@functools.cache
def _plain_greedy():
  return rollout_lib.RolloutEngine(GCFG, _rcfg(0, SamplingParams(0.0))).generate(
    GPARAMS, TOKS, LENS, jax.random.key(3)
  )[0]


@pytest.mark.parametrize('chunk', [32, 2])
def test_greedy_equals_plain_greedy(chunk):
  greedy = SamplingParams(0.0)
  plain = _plain_greedy()
  d = make(GCFG, catchup_chunk=chunk)
  spec, m = rollout_lib.RolloutEngine(GCFG, _rcfg(3, greedy), drafter=d).generate(
    GPARAMS, TOKS, LENS, jax.random.key(3)
  )
  np.testing.assert_array_equal(spec.response, plain.response)
  np.testing.assert_allclose(spec.response_logprobs, plain.response_logprobs, atol=1e-5)
  assert m['spec/verify_passes'] > 0


def test_head_is_fed_the_policys_hidden_state_at_every_position():
  """Prefill, 5 plain steps (the adaptive engine's plain phase), then speculative rounds of
  k = 2 and 3: the state's hidden history equals a full forward's final-norm hidden states,
  and the head's KV cache below ``fed`` equals the head run teacher-forced on those (true
  features at the right positions with the right next tokens; catch-up included)."""
  d = make(GCFG, catchup_chunk=4)
  rcfg = _rcfg(0, max_draft=3)
  dp = d.params_from_policy(GPARAMS)
  kw = dict(cfg=GCFG, rcfg=rcfg, drafter=d)
  st = jax.jit(
    lambda p, dp, t, l: steps_lib.prefill(p, t, l, jax.random.key(0), draft_params=dp, **kw)
  )(GPARAMS, dp, TOKS, LENS)
  for k, n in ((0, 5), (2, 2), (3, 2)):
    st, _ = jax.jit(
      lambda p, dp, s, k=k, n=n: steps_lib.decode(p, s, k, draft_params=dp, max_steps=n, **kw)
    )(GPARAMS, dp, st)
  st = jax.device_get(st)
  s = st.tokens.shape[1]
  pos = np.broadcast_to(np.arange(s), st.tokens.shape)
  _, _, ref_h = model_lib.forward(
    GPARAMS, GCFG, jnp.asarray(st.tokens), jnp.asarray(pos), return_hidden=True
  )
  ref_h = np.asarray(ref_h)
  assert (st.hidden_from == 0).all() and st.hidden.shape == ref_h.shape
  fed = st.draft['fed']
  assert (fed < st.pos).all() and (fed > LENS + 5).all()  # caught up on plain + 2 rounds
  for b in range(len(LENS)):
    np.testing.assert_allclose(st.hidden[b, : st.pos[b]], ref_h[b, : st.pos[b]], atol=2e-5)
  x = eagle.head_input(dp, GCFG, jnp.asarray(ref_h[:, :-1]), jnp.asarray(st.tokens[:, 1:]))
  cache = model_lib.init_cache(d.hcfg, len(LENS), s)
  _, cache = eagle.head_layers(dp['head']['layers'], d.hcfg, x, jnp.asarray(pos[:, :-1]), cache)
  for name in ('k', 'v'):
    for b in range(len(LENS)):
      np.testing.assert_allclose(
        st.draft['cache'][name][:, b, :, : fed[b]],
        np.asarray(cache[name])[:, b, :, : fed[b]],
        atol=2e-5,
      )
  # and the first draft's logits are the teacher-forced head's at position pos - 1 (the
  # window pass's output, through the head's final norm and the policy's LM head)
  seeds = jnp.arange(len(LENS), dtype=jnp.uint32)
  _, dl, _, _ = d.propose(
    dp, st.draft, st.tokens, st.pos, 2, seeds, rcfg.sampling, ctx=hooks.context(st)
  )
  pred = eagle.predict_features(
    dp, GCFG, d.hcfg, jnp.asarray(ref_h[:, :-1]), jnp.asarray(st.tokens[:, 1:]), pos[:, :-1]
  )
  tf = eagle.head_logits(dp, GCFG, pred[jnp.arange(len(LENS)), st.pos - 1])
  np.testing.assert_allclose(dl[:, 0], tf, atol=1e-4)


def test_adaptive_engine_plain_then_speculative_greedy():
  """The adaptive engine's cost-model policy on the ragged batch goes plain -> k=1 -> k=2
  (compacting): the head catches up on the plain phase's features; outputs are plain
  greedy's."""
  from tests import test_adaptive as ta

  eng = ta.adaptive.AdaptiveRolloutEngine(
    ta.CFG, ta.RCFG, dataclasses.replace(ta.BASE, policy='cost_model'), drafter=make(ta.CFG)
  )
  for p in ta.SYNTHETIC:
    eng.set_profile(p)
  out, m = ta.generate(eng)
  assert m['spec/verify_passes'] > 0 and m['adaptive/compactions'] > 0
  assert any(k.endswith('plain') for k in eng.last_report.phases)
  ref = ta.reference()
  for f in ('tokens', 'response', 'length'):
    np.testing.assert_array_equal(getattr(out, f), getattr(ref, f), err_msg=f)


# ----------------------------------------------------------------------------- cotrain


@functools.cache
def _grpo_batch(cfg):
  out, _ = rollout_lib.RolloutEngine(cfg, _rcfg(0)).generate(GPARAMS, TOKS, LENS, jax.random.key(1))
  s = _rcfg(0).seq_len
  mask = et.response_mask(out, s)
  return {
    'tokens': jnp.asarray(out.tokens[:, :s]),
    'response_mask': jnp.asarray(mask),
    'old_logprobs': jnp.asarray(out.logprobs[:, :s] * mask),
    'advantages': jnp.linspace(-1.0, 1.0, len(LENS)),
  }


def assert_same_policy_update(before, plain, other):
  """``other``'s policy state (step, params, optimizer state) is ``plain``'s, both one
  step from ``before``: integers exactly, floats to float32 rounding. Not bit for bit: two
  separately compiled programs that share the policy's step may fuse (and round) it
  differently (tests/xla_env.py); seen: 2 of 256 elements 6 ulps apart. A gradient leaking
  from the head into the policy would change the update itself, O(lr) per element, which
  the second bound (1e-4 of the largest change the step made to the leaf) catches."""
  pick = lambda st: jax.tree.leaves((st.step, st.params, st.opt_state))  # noqa: E731
  for b, p, o in zip(pick(before), pick(plain), pick(other), strict=True):
    b, p, o = np.asarray(b), np.asarray(p), np.asarray(o)
    if not np.issubdtype(p.dtype, np.floating):
      np.testing.assert_array_equal(o, p)
      continue
    np.testing.assert_allclose(o, p, rtol=1e-5, atol=1e-9)
    assert np.max(np.abs(o - p), initial=0.0) <= 1e-4 * np.max(np.abs(p - b), initial=0.0)


def test_cotrain_leaves_the_policy_update_unchanged():
  """The fused step (head trained on the GRPO loss's own hidden states, in
  ``TrainState.drafter``) gives the plain step's policy state (to float rounding:
  :func:`assert_same_policy_update`), and the head moves."""
  cfg = GCFG
  d = make(cfg)
  opt = rl_lib.make_optimizer(1e-3, 0.0, 1.0)
  hopt = et.make_optimizer(d.ecfg)
  hs = et.init_head_state(d.head_params, hopt)
  state = rl_lib.init_train_state(GPARAMS, opt, jax.random.key(0), False).replace(drafter=hs)
  rl = rl_lib.RLConfig(num_generations=2)
  batch = _grpo_batch(cfg)
  step_fn = functools.partial(rl_lib.train_step, cfg=cfg, rl=rl, optimizer=opt)
  plain_state, pm = jax.jit(step_fn)(state, batch)
  fused = jax.jit(
    functools.partial(
      et.cotrain_step, step_fn=step_fn, cfg=cfg, hcfg=d.hcfg, ecfg=d.ecfg, optimizer=hopt
    )
  )
  co_state, cm = fused(state, batch)
  assert_same_policy_update(state, plain_state, co_state)
  assert float(cm['loss']) == pytest.approx(float(pm['loss']), rel=1e-6)
  assert plain_state.drafter is not None  # the plain step carries the head through
  hs2 = co_state.drafter
  assert int(hs2.step) == 1 and np.isfinite(float(cm['head/loss']))
  # fc's token half and the layers' output projections start at zero (init_head): at step 1
  # only those, the rest of fc and the final norms' scales have a gradient
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), hs.params, hs2.params)
  assert moved['fc'], moved
  assert moved['layers']['wo'] and moved['layers']['w_down'], moved


def test_train_step_returns_the_policys_hidden_states_in_batch_order():
  """What cotrain trains on instead of a second forward: the GRPO loss's final-norm hidden
  states, unshuffled to batch order (3 shuffled minibatches, 2 epochs; lr = 0, so every
  minibatch sees the same params)."""
  opt = rl_lib.make_optimizer(0.0, 0.0, 1.0)
  state = rl_lib.init_train_state(GPARAMS, opt, jax.random.key(0), False)
  rl = rl_lib.RLConfig(num_generations=2, num_minibatches=3, num_epochs=2)
  batch = _grpo_batch(GCFG)
  fn = functools.partial(rl_lib.train_step, cfg=GCFG, rl=rl, optimizer=opt, return_hidden=True)
  _, _, hidden = jax.jit(fn)(state, batch)
  ref = et.policy_hidden(GPARAMS, GCFG, batch['tokens'])
  assert hidden.shape == ref.shape
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref), atol=2e-5)


def test_head_state_round_trips_through_the_orbax_checkpoint(tmp_path):
  """Head params + optimizer state go through orbax as ``TrainState.drafter`` (shape
  checked on restore); the small host state (token counts, reduced vocabulary, warmed)
  through the host item."""
  d = make(GCFG, reduced_vocab=4)
  tr = et.trainer(d)
  hs = tr.hstate.replace(
    step=jnp.int32(7), params=jax.tree.map(lambda x: x + 0.5, tr.hstate.params)
  )
  opt = rl_lib.make_optimizer(1e-3, 0.0, 1.0)
  state = rl_lib.init_train_state(GPARAMS, opt, jax.random.key(0), False).replace(drafter=hs)
  tr.observe_tokens(np.array([[3, 5, 8, 9, 9, 1]]), np.array([[1, 1, 1, 1, 1, 0]]))
  np.testing.assert_array_equal(d.vocab_ids, [3, 5, 8, 9])  # the 4 most frequent responses
  tr.warmed = True
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  ck.register('eagle_head', tr)
  ck.save(3, state)
  ck.close()
  assert 'leaves' not in tr.host_state()  # no arrays of the head in the JSON host state
  fresh = make(GCFG, reduced_vocab=4)
  tr2 = et.trainer(fresh)
  target = rl_lib.init_train_state(GPARAMS, opt, jax.random.key(1), False)
  ck2 = ckpt_lib.Checkpointer(str(tmp_path))
  ck2.register('eagle_head', tr2)
  restored = ck2.restore(target.replace(drafter=tr2.hstate))
  for a, b in zip(jax.tree.leaves(restored.drafter), jax.tree.leaves(hs), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(fresh.vocab_ids, [3, 5, 8, 9])
  np.testing.assert_array_equal(tr2.counts, tr.counts)
  assert tr2.warmed
  big = make(dataclasses.replace(GCFG, d_model=24), reduced_vocab=4)  # a different head
  wrong = target.replace(drafter=et.trainer(big).hstate)
  with pytest.raises(ckpt_lib.CheckpointMismatch, match='drafter'):
    ck2.restore(wrong)
  ck2.close()


@pytest.fixture
def compile_cache(tmp_path):
  """A persistent XLA compilation cache for one test: the resumed run loads the first
  run's executables instead of compiling them again (a restarted process would too).
  Restored (off) afterwards."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  compilation_cache.reset_cache()
  yield
  for n, v in old.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


def test_cotrain_run_with_warmup_resumes_exactly(tmp_path, compile_cache):
  """The loop with the head: warm-up before the first GRPO step, cotrain fused into the
  GRPO step, reduced vocabulary from the rollouts, all in the checkpoint. One run of
  1 SFT + 3 GRPO steps checkpoints after step 3 (warm-up and two cotrain steps done) and
  at the end; a copy of its directory without the last checkpoint resumes from step 3
  and must end with the uninterrupted run's params, head and metrics."""
  c = default.get_config('smoke')
  c.sft.steps, c.rl.steps, c.checkpoint_every = 1, 3, 3
  c.log_every = 100
  c.rollout.drafter = 'eagle'
  c.drafter.eagle.update(mode='cotrain', warmup_steps=2, reduced_vocab=12)
  c.eval.prompts = 0  # validation is tested elsewhere: keep the runs short
  full, hist = train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert sorted(os.listdir(tmp_path / 'a' / 'checkpoints')) == ['3', '4']
  shutil.copytree(tmp_path / 'a' / 'checkpoints', tmp_path / 'b' / 'checkpoints')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '4')
  resumed, hist_b = train.train_and_evaluate(c, str(tmp_path / 'b'))
  assert [m['step'] for m in hist_b] == [3]
  assert int(full.drafter.step) == 2 + 3  # warm-up updates + 1 per cotrain GRPO step
  arrays = lambda st: jax.tree.leaves((st.params, st.opt_state, st.drafter))  # noqa: E731
  for a, b in zip(arrays(full), arrays(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for key in ('train/head/loss', 'train/head/ce', 'spec/alpha', 'train/loss'):
    assert hist_b[-1][key] == hist[-1][key], key
  assert hist[1]['train/head/loss'] > 0 and 'spec/alpha' in hist[1]

"""Drafter state follows the live length, not the token budget (issue 26, item 3).

A decode loop at length bucket ``a`` carries the drafter's position-indexed state cut to
the window it may touch, as it does the policy's KV cache: the eagle head's KV cache and
the hidden history, a model drafter's own KV cache (grown with the policy cache between
loops / chunks, ``rollout.grow_kv``), and the suffix drafter's shared corpus (cut to the
bucket holding every committed position, finished rows' text included). Checked here:
greedy tokens, logprobs and acceptance counts equal the dense reference
(``attend_bucket = 0``) across bucket switches on both engines (the adaptive one with
compaction and a lazily attached drafter), the bytes one compiled suffix / eagle round
accesses barely grow with the budget, and the eagle state's peak bytes follow the live rows.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import adaptive
from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl.decoding import steps
from specrl.decoding.state import RolloutConfig, attend_buckets, bucket_for, window_slots
from specrl.drafters import eagle, hooks
from specrl.drafters.model_drafter import ModelDrafter
from specrl.drafters.ngram import NgramDrafter
from specrl.drafters.suffix import SuffixDrafter
from specrl.sampling import SamplingParams
from tests.test_long_decode import (
  COST_CFG,
  GREEDY,
  _assert_same,
  _bytes_accessed,
  mostly_short_workload,
)
from tests.test_rollout import CFG, params

# 8 rows in groups of two (suffix siblings), prompts of ragged lengths; greedy with these
# end-of-sequence ids ends rows 2, 4, 6 (long prompts) within a few tokens and row 5 later,
# while rows 0, 1, 3, 7 run to the budget: finished rows' text stays in the corpus
P = 12
LENS = np.array([2, 2, 11, 3, 10, 4, 9, 5], np.int32)
GROUPS = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
EOS = (3, 5, 1)


def _toks():
  rng = np.random.default_rng(0)
  toks = rng.integers(3, CFG.vocab_size, size=(8, P)).astype(np.int32)
  toks[np.arange(P)[None, :] >= LENS[:, None]] = 0
  return toks


def _rcfg(**kw):
  return RolloutConfig(
    max_new_tokens=28, max_prompt_len=P, eos_id=EOS[0], extra_eos_ids=EOS[1:], sampling=GREEDY,
    attend_bucket=8, **kw,
  )  # fmt: skip


def _eagle(attends: bool = False):
  """A fresh head (``attends``: its attention's output projection random, not zero as
  ``init_head`` starts it, so what its attention reads changes its outputs)."""
  head = eagle.init_head(CFG, 1, jax.random.key(1))
  if attends:
    wo = head['layers']['wo']
    head['layers']['wo'] = jax.random.normal(jax.random.key(2), wo.shape, wo.dtype)
  return eagle.EagleDrafter(CFG, eagle.EagleConfig(catchup_chunk=4), head)


DRAFTERS = {
  'suffix': lambda: SuffixDrafter(CFG.vocab_size, n_min=1, n_max=4),
  'eagle': _eagle,
  'small_model': lambda: ModelDrafter(
    'small_model', CFG, own_params=model_lib.init_params(CFG, jax.random.key(7)), catchup_chunk=4
  ),
}


def _static(rcfg, drafter, lens=LENS):
  eng = rollout_lib.RolloutEngine(CFG, rcfg, drafter=drafter)
  toks = np.where(np.arange(P)[None, :] < lens[:, None], _toks(), 0)
  out, m = eng.generate(params(), toks, lens, jax.random.key(0), group_ids=GROUPS)
  return jax.device_get(out), m, eng


def _same_with_acceptance(out, ref):
  _assert_same(out, ref)
  np.testing.assert_array_equal(out.num_accepted, ref.num_accepted)
  np.testing.assert_array_equal(out.num_rounds, ref.num_rounds)
  np.testing.assert_array_equal(out.accepted_at, ref.accepted_at)


@pytest.mark.parametrize('name', list(DRAFTERS))
def test_static_engine_drafters_equal_dense_reference_across_buckets(name):
  drafter = DRAFTERS[name]()
  rcfg = _rcfg(num_draft=2)
  out, m, eng = _static(rcfg, drafter)
  ref, _, ref_eng = _static(dataclasses.replace(rcfg, attend_bucket=0), drafter)
  _same_with_acceptance(out, ref)
  assert out.num_accepted.sum() > 0
  assert (out.length < 28).sum() >= 3 and (out.length == 28).sum() >= 3, out.length
  buckets = attend_buckets(rcfg)
  assert eng.last_buckets == list(buckets[1:]), eng.last_buckets  # 16, 32, buffer: 2 switches
  assert eng.last_kv_slots == eng.last_buckets
  if name == 'suffix':  # the corpus carried: the live bucket (the buffer's: all of it)
    assert eng.last_shared_slots == [16, 32, None], eng.last_shared_slots
  else:  # the drafter's KV cache (and eagle's hidden history) grew with the policy cache
    assert eng.last_draft_slots == eng.last_buckets, eng.last_draft_slots
    assert ref_eng.last_draft_slots == [rcfg.buffer_len]
    assert m['rollout/draft_kv_peak_over_live'] > 0


def test_eagle_tree_over_a_window_is_the_dense_paths_tree(monkeypatch):
  """Rows 6..7 slots below a 24-slot window's end propose 6-node trees of branch 2 (a head
  temperature of 0.05: peaked, so the trees are 5 deep): the expanded nodes' K/V go to
  head-cache slots up to pos + 7, past the window. Over the head cache and hidden history
  cut to the window every one of them is kept, as over the whole buffer (none dropped
  inside it), and the tree is the one over the whole buffer."""
  d = _eagle(attends=True)
  rcfg = dataclasses.replace(_rcfg(max_draft=5), max_prompt_len=18, eos_id=-1, extra_eos_ids=())
  dp = d.params_from_policy(params())
  lens = np.array([17, 18, 12, 16, 17, 18, 10, 17], np.int32)
  toks = np.random.default_rng(2).integers(3, CFG.vocab_size, size=(8, 18)).astype(np.int32)
  st = jax.jit(
    lambda pr, dp, t, n: steps.prefill(
      pr, t, n, jax.random.key(0), cfg=CFG, rcfg=rcfg, drafter=d, draft_params=dp
    )
  )(params(), dp, toks, lens)
  dropped = []  # tree-node slots inside the buffer but past the head cache (lost K/V)
  tree_layers = eagle.EagleDrafter._tree_layers

  def spy(self, dp, x, positions, slots, mask, cache, mesh):
    width = cache['k'].shape[3]
    dropped.append(int(((slots >= width) & (slots < rcfg.buffer_len)).sum()))
    return tree_layers(self, dp, x, positions, slots, mask, cache, mesh)

  monkeypatch.setattr(eagle.EagleDrafter, '_tree_layers', spy)
  out = []
  for s in (st, window_slots(st, 24, d)):
    *tree, ds = d.propose_tree(
      dp, s.draft, s.tokens, s.pos, 6, None, jnp.zeros((8,), jnp.int32), SamplingParams(0.05),
      ctx=hooks.context(s), branch=2,
    )  # fmt: skip
    out.append((tree, ds['cache']['k'].shape[3]))
  (full, s_full), (win, s_win) = out
  assert s_win == 24 and s_full == rcfg.buffer_len  # the window's cache comes back cut
  assert len(dropped) == 8 and not any(dropped), dropped  # 4 expansions per tree
  for a, b in zip(full, win, strict=True):
    np.testing.assert_array_equal(a, b)
  assert np.asarray(full[2]).max() == 5  # deep trees: their scratch reaches past 24


def _adaptive(rcfg, drafter):
  from tests import test_adaptive as ta

  acfg = dataclasses.replace(ta.BASE, policy='cost_model')
  eng = adaptive.AdaptiveRolloutEngine(CFG, rcfg, acfg, drafter=drafter)
  for p in ta.SYNTHETIC:  # plain at 8 rows, k = 1 at 4, k = 2 at 1
    eng.set_profile(p)
  out, m = eng.generate(params(), _toks(), LENS, jax.random.key(0), group_ids=GROUPS)
  return jax.device_get(out), m, eng


@pytest.mark.parametrize('name', list(DRAFTERS))
def test_adaptive_engine_drafters_equal_dense_reference_with_compaction(name):
  """Plain at 8 rows, then (compacted to 4) speculating with k = 1: the model drafters'
  state is attached lazily, as wide as the grown policy cache, the hidden history grew from
  the prompt's bucket; the corpus is cut to the bucket of every committed position."""
  drafter = DRAFTERS[name]()
  rcfg = _rcfg()
  out, m, eng = _adaptive(rcfg, drafter)
  ref, _, ref_eng = _adaptive(dataclasses.replace(rcfg, attend_bucket=0), drafter)
  _same_with_acceptance(out, ref)
  assert out.num_accepted.sum() > 0
  assert m['adaptive/compactions'] >= 1
  assert m['rollout/length_buckets'] >= 3
  assert all(a is None and s is None for *_, a, s in ref_eng.last_windows)  # dense
  assert len({a for *_, a, _ in eng.last_windows}) >= 3, eng.last_windows  # 2 switches
  spec = [w for w in eng.last_windows if w[1] != 0]
  assert spec and all(a is not None and a < eng.buffer_len for _, _, a, _ in spec[:1])
  if name == 'suffix':
    assert any(s is not None for *_, s in eng.last_windows)
  else:
    assert m['rollout/draft_kv_peak_over_live'] > 0


def _round_bytes(budget: int, name: str, live: int = 256, b: int = 4, k: int = 2) -> float:
  """Bytes accessed by one compiled speculative round (propose, verify, commit, observe)
  as the static engine's loop runs it: over the state the loop at the bucket holding
  ``live`` slots carries (:func:`window_slots`: the policy and drafter caches and the hidden
  history cut to the bucket -- grown to it, with ``rollout.grow_kv`` -- and the suffix
  corpus to the bucket of every committed position), for a ``budget``-slot buffer."""
  p = 32
  rcfg = RolloutConfig(
    max_new_tokens=budget - p - k - 1, max_prompt_len=p, num_draft=k, sampling=GREEDY,
    attend_bucket=256,
  )  # fmt: skip
  assert rcfg.buffer_len == budget
  a = bucket_for(attend_buckets(rcfg), live)
  assert a == 256
  cfg = COST_CFG
  lp = steps.loop_params(model_lib.init_params(cfg, jax.random.key(0)))
  if name == 'eagle':
    d = eagle.EagleDrafter(cfg, eagle.EagleConfig(), eagle.init_head(cfg, 1, jax.random.key(1)))
    dp = d.params_from_policy(lp)
  elif name == 'ngram':
    d, dp = NgramDrafter(cfg.vocab_size, ngram=2), None
  else:
    d, dp = SuffixDrafter(cfg.vocab_size, n_min=1, n_max=4, max_group=4), None
  toks = jax.ShapeDtypeStruct((b, p), jnp.int32)
  lens = jax.ShapeDtypeStruct((b,), jnp.int32)
  kw = dict(cfg=cfg, rcfg=rcfg, drafter=d, draft_params=dp, cache_slots=a)
  state = jax.eval_shape(
    lambda pr, dp, t, n: steps.prefill(pr, t, n, jax.random.key(0), **kw), lp, dp, toks, lens
  )
  state = jax.eval_shape(lambda s: window_slots(s, a, d, a), state)  # the loop's carry

  def round_(pr, dp, s):  # as the loop at bucket a runs it
    return steps.decode_step(pr, dp, s, k, cfg=cfg, rcfg=rcfg, drafter=d, attend_len=a)

  return _bytes_accessed(jax.jit(round_, donate_argnums=2).lower(lp, dp, state).compile())


@pytest.mark.parametrize('name', ['suffix', 'eagle', 'ngram'])
def test_round_bytes_do_not_grow_with_the_budget(name):
  """<= 256 live tokens: a 4096-slot budget's suffix / eagle / ngram round accesses <= 1.3x
  a 256-slot one's (the [B, S] token and logprob buffers' commit is what still grows). Before
  the drafters' state followed the buckets (the loop cut the policy cache only) the suffix
  round scanned the whole corpus and the eagle round the whole head cache and hidden
  history: 3.8x and 6.6x (b43feda, measured with this helper and that loop's carry; here
  1.06x and 1.05x). The ngram drafter scans its row's text every round: handed the whole
  [B, S] buffer (before ``scans_text``) its round was 1.14x, handed the bucket's 1.06x; the
  model's step dominates these bytes, so its bound is tighter."""
  small, big = _round_bytes(256, name), _round_bytes(4096, name)
  assert big <= (1.1 if name == 'ngram' else 1.3) * small, (big, small, big / small)


def test_a_512_budget_eagle_rollout_of_mostly_short_answers_holds_at_most_2x_its_live_state():
  """16 rows with a 508-token budget, 14 ending at their first token, the adaptive engine
  speculating with eagle throughout (k = 2) and compacting (16 -> 2 rows): the head's KV
  cache and the hidden history grow with the live rows, as the policy cache does, and
  their peak is within 2x the peak live need (sum over active rows of position + 1, times
  their bytes per slot). Held for the whole buffer from the start (b43feda: both were
  allocated at the buffer's width) it would be 16 x 515 slots: ~8x."""
  toks, lens, eos = mostly_short_workload()
  b, p = toks.shape
  rcfg = RolloutConfig(
    max_new_tokens=508, max_prompt_len=p, eos_id=eos[0], extra_eos_ids=tuple(eos[1:]),
    sampling=GREEDY, attend_bucket=64,
  )  # fmt: skip
  acfg = adaptive.AdaptiveConfig(
    policy='always', buckets=(16, 8, 4, 2, 1), chunk_steps=256, arms=(2,), learn_online=False
  )
  eng = adaptive.AdaptiveRolloutEngine(CFG, rcfg, acfg, drafter=_eagle())
  out, m = eng.generate(params(), toks, lens, jax.random.key(0))
  length = np.asarray(out.length)
  assert length.max() == 508 and (length <= 1).sum() >= 12, length  # mostly short
  assert m['spec/verify_passes'] > 0 and out.num_accepted.sum() > 0
  per_slot = eng.last_report.draft_kv_per_slot  # head cache K and V, hidden [D] f32
  assert per_slot == 2 * CFG.n_kv_heads * CFG.head_dim * 4 + CFG.d_model * 4
  live = rollout_lib.live_kv_slots(np.asarray(out.prompt_len), length) * per_slot
  np.testing.assert_allclose(m['rollout/draft_kv_live_gb'], live / 2**30)
  assert m['rollout/draft_kv_peak_over_live'] <= 2.0, m
  assert m['rollout/kv_peak_over_live'] <= 2.0, m
  assert b * eng.buffer_len * per_slot / live > 4  # the whole buffer for the batch: >> 2x


def test_suffix_corpus_and_history_cut_to_their_text_draft_the_same():
  """The suffix history's arrays are as wide as the power of two holding the longest
  stored answer (>= 16), not the budget; the chains and trees drafted from them and from
  the sibling corpus cut to 16 slots (a bucket holding every committed position, as a
  decode loop carries it) are the ones drafted from budget-wide arrays and corpus (the
  ranking of stored positions, the tree builder's order of occurrences are the same)."""
  rng = np.random.default_rng(5)
  d = SuffixDrafter(4, n_min=1, n_max=3, history=3)
  lengths = np.array([20, 9, 33, 5, 17, 12])
  d.record([1, 1, 2, 2, 2, 1], rng.integers(0, 4, (6, 40)), lengths)
  assert d.history_params([1], width=4096)['tokens'].shape == (1, 3, 32)
  assert d.history_params([1, 2], width=4096)['tokens'].shape == (2, 3, 64)
  assert d.history_params([1], width=24)['tokens'].shape == (1, 3, 24)  # never the budget's
  assert d.history_params([7], width=4096)['tokens'].shape == (1, 3, 16)
  texts = [rng.integers(0, 4, n).tolist() for n in (6, 3, 9, 4)]
  toks = np.zeros((4, 256), np.int32)
  for i, t in enumerate(texts):
    toks[i, : len(t)] = t
  pos, ids = np.array([len(t) - 1 for t in texts], np.int32), np.array([1, 2, 2, 1], np.int32)
  cut = d.history_params(ids, width=4096)
  wide = dict(cut, tokens=jnp.pad(cut['tokens'], ((0, 0), (0, 0), (0, 448)), constant_values=-1))

  @functools.partial(jax.jit, static_argnums=3)
  def drafts(dp, toks, pos, corpus):
    sid, groups = jnp.arange(4, dtype=jnp.int32), jnp.array([0, 0, 1, 1], jnp.int32)
    shared = d.observe(None, d.init_shared(4, 256), toks, pos * 0, pos, sid, groups, ids)
    shared['tokens'] = shared['tokens'][:, :corpus]
    ctx = hooks.DraftContext(sid, groups, jnp.asarray(ids), shared, None, None)
    chain = d.propose(dp, None, toks, pos, 4, None, None, ctx=ctx)[0]
    return chain, d.propose_tree(dp, None, toks, pos, 6, None, None, None, ctx=ctx)[:3]

  a, b = drafts(cut, toks, pos, 16), drafts(wide, toks, pos, 256)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert (np.asarray(a[0]) >= 0).sum() > 4  # it drafted


def test_static_cost_estimates_are_profiled_at_the_widest_bucket_the_rollout_ran(monkeypatch):
  """``estimate_costs`` (spec/draft_time_est_s, spec/verify_time_est_s) prices a rollout's
  passes at the attention window its loops ran, not the budget's: a rollout that stays
  within the first 16-slot bucket of a 4k-token budget is profiled over 16 slots, once per
  (batch, width). (Profiled over the budget, a 32k-budget rollout of 8-token answers was
  priced at ~50x its whole rollout time, and the profile took seconds of each run.)"""
  from specrl.decoding import profile as profile_lib

  widths = []
  real = profile_lib.measure_profile

  def recording(*a, **kw):
    widths.append(kw['buffer_len'])
    return real(*a, **kw)

  monkeypatch.setattr(profile_lib, 'measure_profile', recording)
  toks = np.where(np.arange(P)[None, :] < LENS[:, None], _toks(), 0)
  # the decode loop capped at 2 rounds (as if every answer stopped there): prompts of up
  # to 11 tokens + 2 rounds of k + 1 = 3 stay within the first bucket, 16 slots
  rcfg = dataclasses.replace(_rcfg(num_draft=2), max_new_tokens=4096, max_steps=2)
  eng = rollout_lib.RolloutEngine(CFG, rcfg, drafter=DRAFTERS['suffix']())
  for seed in (0, 1):
    _, m = eng.generate(
      params(), toks, LENS, jax.random.key(seed), group_ids=GROUPS, estimate_costs=True
    )
    assert m['spec/draft_time_est_s'] >= 0 and m['spec/verify_time_est_s'] >= 0, m
  assert eng.last_buckets == [16], eng.last_buckets
  assert widths == [16], widths  # the second rollout reused the first's profile
  assert rcfg.buffer_len > 4096

"""Decode steps pay for the live length, not the token budget (issue 26, item 1).

A decode loop carries only the first ``a`` cache slots, ``a`` the length bucket that
holds every live row (``rollout.attend_bucket``), and its steps attend to those; the
static engine runs one loop per bucket, the adaptive one picks each chunk's. Checked here:
the bytes one compiled plain step accesses barely grow with the budget (while the dense
reference's grow with it), and greedy tokens and logprobs equal the dense reference
(``attend_bucket = 0``: every step over the whole buffer) across bucket switches, plain,
sampled and with a chain drafter, on both engines (the adaptive one with compaction).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl.decoding import steps
from specrl.decoding.state import RolloutConfig, attend_buckets, bucket_for
from specrl.drafters import NgramDrafter
from specrl.sampling import SamplingParams
from tests.test_rollout import CFG, params

GREEDY = SamplingParams(temperature=0.0)
# the cost test's model: two layers, so the window's in-place update is in every budget's
# step (over one layer and a 256-slot budget XLA drops it: the window is the whole buffer)
COST_CFG = dataclasses.replace(CFG, n_layers=2, head_dim=16)


def _bytes_accessed(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, list | tuple):  # older jax: one dict per computation
    ca = ca[0]
  return float(ca['bytes accessed'])


def _step_bytes(budget: int, attend_bucket: int, live: int = 256, b: int = 4) -> float:
  """Bytes accessed by one compiled plain decode step as the static engine's loop runs it,
  for a buffer of ``budget`` slots and ``live`` slots in use: the loop body, over the
  cache window the loop carries (the first ``a`` slots, ``a`` the bucket holding ``live``;
  the whole buffer on the dense reference path)."""
  p = 32
  rcfg = RolloutConfig(
    max_new_tokens=budget - p, max_prompt_len=p, sampling=GREEDY, attend_bucket=attend_bucket
  )
  assert rcfg.buffer_len == budget
  a = bucket_for(attend_buckets(rcfg), live)
  assert a == (min(256, budget) if attend_bucket else budget)
  cfg = COST_CFG
  lp = steps.loop_params(model_lib.init_params(cfg, jax.random.key(0)))
  toks = jax.ShapeDtypeStruct((b, p), jnp.int32)
  lens = jax.ShapeDtypeStruct((b,), jnp.int32)
  state = jax.eval_shape(
    lambda pr, t, n: steps.prefill(pr, t, n, jax.random.key(0), cfg=cfg, rcfg=rcfg), lp, toks, lens
  )
  window = lambda c: jax.ShapeDtypeStruct((*c.shape[:3], a, *c.shape[4:]), c.dtype)  # noqa: E731
  state = state.replace(cache=jax.tree.map(window, state.cache))

  def step(pr, s):
    return steps.decode_step(pr, None, s, 0, cfg=cfg, rcfg=rcfg)

  return _bytes_accessed(jax.jit(step, donate_argnums=1).lower(lp, state).compile())


def test_step_bytes_do_not_grow_with_the_budget():
  """<= 256 live tokens: a 4096-slot budget's step accesses <= 1.2x a 256-slot one's (the
  [B, S] token and logprob buffers' commit is what still grows). The dense reference (the
  path before length buckets) reads and writes every slot: there the bound fails."""
  small, big = _step_bytes(256, 256), _step_bytes(4096, 256)
  assert big <= 1.2 * small, (big, small, big / small)
  dense_small, dense_big = _step_bytes(256, 0), _step_bytes(4096, 0)
  assert dense_big > 5 * dense_small, (dense_big, dense_small)  # the test can fail


def test_buckets_are_bounded_and_cover_the_buffer():
  rcfg = RolloutConfig(max_new_tokens=4000, max_prompt_len=96, attend_bucket=256)
  assert attend_buckets(rcfg) == (256, 512, 1024, 2048, 4096)
  rcfg = RolloutConfig(max_new_tokens=8000, max_prompt_len=192, num_draft=3, attend_bucket=256)
  bs = attend_buckets(rcfg)
  assert bs[-1] == rcfg.buffer_len == 8196 and len(bs) == 7  # 256 .. 4096 and the buffer
  assert attend_buckets(dataclasses.replace(rcfg, attend_bucket=0)) == (8196,)
  assert bucket_for(bs, 257) == 512 and bucket_for(bs, 9000) == 8196
  with pytest.raises(ValueError, match='attend_bucket'):
    RolloutConfig(attend_bucket=-1)


def test_window_forward_equals_dense():
  """One cache-extending pass (T = 3 at ragged positions) over the window of the first 16
  slots: same logits as over the whole buffer, same cache in the window, rest untouched."""
  b, s = 3, 40
  rng = np.random.default_rng(0)
  cache = {
    n: jnp.asarray(rng.standard_normal((CFG.n_layers, b, CFG.n_kv_heads, s, CFG.head_dim)))
    for n in ('k', 'v')
  }
  cache = jax.tree.map(lambda x: x.astype(jnp.float32), cache)
  pos = jnp.array([[2, 3, 4], [9, 10, 11], [13, 14, 15]], jnp.int32)
  toks = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, 3)), jnp.int32)
  fwd = jax.jit(model_lib.forward, static_argnames=('cfg', 'attend_len'))
  ref, ref_cache = fwd(params(), cfg=CFG, tokens=toks, positions=pos, cache=cache)
  out, new_cache = fwd(params(), cfg=CFG, tokens=toks, positions=pos, cache=cache, attend_len=16)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for n in ('k', 'v'):
    np.testing.assert_array_equal(new_cache[n], ref_cache[n])


def _prompts(b=4, p=6, seed=0):
  rng = np.random.default_rng(seed)
  lens = rng.integers(1, p + 1, size=b).astype(np.int32)
  toks = rng.integers(3, CFG.vocab_size, size=(b, p)).astype(np.int32)
  toks[np.arange(p)[None, :] >= lens[:, None]] = 0
  return toks, lens


def _rollout(rcfg, drafter=None, seed=0):
  eng = rollout_lib.RolloutEngine(CFG, rcfg, drafter=drafter)
  # prompts of <= 3 tokens with k = 2: the first step fits the first bucket
  toks, lens = _prompts(p=6 if drafter is None else 3)
  out, m = eng.generate(params(), toks, lens, jax.random.key(seed))
  if rcfg.attend_bucket:  # rollout.grow_kv: the cache grew with the buckets, never ahead
    assert eng.last_kv_slots == eng.last_buckets, (eng.last_kv_slots, eng.last_buckets)
  return jax.device_get(out), m, eng.last_buckets


def _assert_same(out, ref):
  np.testing.assert_array_equal(out.response, ref.response)
  np.testing.assert_array_equal(out.length, ref.length)
  np.testing.assert_array_equal(out.finish, ref.finish)
  np.testing.assert_allclose(out.response_logprobs, ref.response_logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  'sampling,num_draft',
  [(GREEDY, 0), (SamplingParams(temperature=1.0), 0), (GREEDY, 2)],
  ids=['greedy', 'sampled', 'ngram-k2'],
)
def test_static_engine_equals_dense_reference_across_buckets(sampling, num_draft):
  """A 30-token budget (+ draft scratch) in buckets of 8, 16 and the buffer, short prompts:
  the rollout crosses them all and commits what the dense reference commits."""
  rcfg = RolloutConfig(
    max_new_tokens=24, max_prompt_len=6, eos_id=-1, sampling=sampling, num_draft=num_draft,
    attend_bucket=8,
  )  # fmt: skip
  drafter = NgramDrafter(CFG.vocab_size, 2) if num_draft else None
  out, m, visited = _rollout(rcfg, drafter)
  ref, _, ref_visited = _rollout(dataclasses.replace(rcfg, attend_bucket=0), drafter)
  _assert_same(out, ref)
  assert (out.length == 24).all()
  buckets = list(attend_buckets(rcfg))  # 8, 16, buffer (plain); 8, 16, 32, buffer (k = 2)
  assert visited == buckets[: len(visited)] and len(visited) >= 3, (visited, buckets)
  assert ref_visited == [rcfg.buffer_len]
  # rollout.grow_kv: the policy cache held each loop's bucket, grown before the loop (a
  # k = 2 round never straddles a bucket: the loop stops first, the next one grows first;
  # _rollout checks the slots), and the tokens equal the dense reference's
  assert m['rollout/kv_peak_over_live'] > 0
  assert m['rollout/length_buckets'] == len(visited)
  assert m['rollout/length_bucket_variants'] == len(attend_buckets(rcfg))
  if num_draft:
    np.testing.assert_array_equal(out.num_accepted, ref.num_accepted)
    assert out.num_accepted.sum() > 0  # the drafter did get drafts accepted


@pytest.mark.parametrize('policy', ['never', 'always'])
def test_adaptive_engine_equals_dense_reference_with_compaction(policy):
  """The adaptive engine picks each chunk's length bucket from the longest live row: with
  compaction (8 -> 4 (-> 1) rows as ragged rows reach the cache end), plain ('never') or
  speculating with a chain drafter ('always', k in 1..2), it commits what the dense
  reference commits."""
  from specrl import adaptive

  rcfg = RolloutConfig(
    max_new_tokens=40, max_prompt_len=8, cache_len=40, eos_id=-1, sampling=GREEDY,
    attend_bucket=8,
  )  # fmt: skip
  acfg = adaptive.AdaptiveConfig(
    policy=policy, buckets=(8, 4, 1), chunk_steps=4, arms=(1, 2), learn_online=False
  )
  drafter = NgramDrafter(CFG.vocab_size, 2)
  lens = np.arange(1, 9, dtype=np.int32)  # rows reach the cache end one step apart
  rng = np.random.default_rng(1)
  toks = rng.integers(3, CFG.vocab_size, size=(8, 8)).astype(np.int32)
  toks[np.arange(8)[None, :] >= lens[:, None]] = 0
  outs = []
  for ab in (8, 0):
    eng = adaptive.AdaptiveRolloutEngine(
      CFG, dataclasses.replace(rcfg, attend_bucket=ab), acfg, drafter=drafter
    )
    out, m = eng.generate(params(), toks, lens, jax.random.key(0))
    outs.append((jax.device_get(out), m))
  (out, m), (ref, mref) = outs
  _assert_same(out, ref)
  np.testing.assert_array_equal(out.num_accepted, ref.num_accepted)
  assert m['adaptive/compactions'] >= 1
  assert m['rollout/length_buckets'] >= 3, m['rollout/length_buckets']
  assert mref['rollout/length_buckets'] == 1  # dense: the whole buffer


def mostly_short_workload(b: int = 16, p: int = 4):
  """(prompts [b, p], lengths [b], eos ids): random prompts whose greedy answers under the
  tiny model mostly end at their first token -- every id but those the most repetitive
  row's answer repeats ends a response -- while that row (and any twin) runs to the budget."""
  rng = np.random.default_rng(3)
  toks = rng.integers(3, CFG.vocab_size, size=(b, p)).astype(np.int32)
  lens = np.full((b,), p, np.int32)
  short = RolloutConfig(max_new_tokens=64, max_prompt_len=p, eos_id=-1, sampling=GREEDY)
  probe, _ = rollout_lib.RolloutEngine(CFG, short).generate(params(), toks, lens, jax.random.key(0))
  resp = np.asarray(probe.response)[:, :64]
  star = int(np.argmin([len(set(r[8:].tolist())) for r in resp]))  # the most repetitive row
  return toks, lens, sorted(set(range(CFG.vocab_size)) - set(resp[star].tolist()))


def test_a_4k_budget_rollout_of_mostly_short_answers_holds_at_most_2x_its_live_kv():
  """Issue 26's memory goal: 16 rows with a 4092-token budget, 14 of them ending at their
  first token (every id but the one two rows' greedy answers repeat is an end-of-sequence
  id), the adaptive engine with compaction (16 -> 2 rows): the policy KV cache grows with
  the live rows (``rollout.grow_kv``, buckets of 256 up to the buffer) and its peak is
  within 2x the peak live need (sum over active rows of position + 1; here 1.0x). Without
  growth (``grow_kv=False``, measured once: 8.0x) the whole buffer is held from the start."""
  from specrl import adaptive

  toks, lens, eos = mostly_short_workload()
  b, p = toks.shape
  rcfg = RolloutConfig(
    max_new_tokens=4092, max_prompt_len=p, eos_id=eos[0], extra_eos_ids=tuple(eos[1:]),
    sampling=GREEDY,
  )  # fmt: skip
  assert rcfg.grow_kv and rcfg.attend_bucket == 256  # the defaults
  acfg = adaptive.AdaptiveConfig(
    policy='never', buckets=(16, 8, 4, 2, 1), chunk_steps=256, learn_online=False
  )
  out, m = adaptive.AdaptiveRolloutEngine(CFG, rcfg, acfg).generate(
    params(), toks, lens, jax.random.key(0)
  )
  length = np.asarray(out.length)
  assert length.max() == 4092 and (length <= 1).sum() >= 12, length  # mostly short
  per_slot = 2 * CFG.n_layers * CFG.n_kv_heads * CFG.head_dim * 4
  live = rollout_lib.live_kv_slots(np.asarray(out.prompt_len), length) * per_slot
  np.testing.assert_allclose(m['rollout/kv_live_gb'], live / 2**30)
  assert m['rollout/kv_peak_over_live'] <= 2.0, m
  # what holding the whole buffer for the batch would have been (grow_kv=False): >> 2x
  assert b * rcfg.buffer_len * per_slot / live > 4

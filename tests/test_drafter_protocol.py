"""The drafter protocol's optional parts (``specrl.drafters.hooks``) on both engines.

A toy drafter records, in its shared (never compacted) state, what ``observe`` told it:
committed tokens per original row and the row's group / prompt ids; its ``propose`` checks
what the context shows against a full forward. Checked with plain decoding only and with
speculation on every round, with compaction (8 -> 4 -> 1 rows) in the adaptive engine.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import adaptive, sampling
from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl.adaptive import state_ops
from specrl.decoding import steps
from specrl.drafters import NgramDrafter
from specrl.sampling import SamplingParams

CFG = model_lib.ModelConfig(
  vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)
PARAMS = model_lib.init_params(CFG, jax.random.key(3))
CACHE = 20
LENGTHS = np.array([8, 3, 18, 5, 9, 4, 7, 6])  # ragged: rows finish out of order
GROUPS = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)  # G = 2 generations per prompt
PROMPT_IDS = np.array([70, 70, 11, 11, 52, 52, 9, 9], np.int32)
RCFG = rollout_lib.RolloutConfig(
  max_new_tokens=18, max_prompt_len=17, cache_len=CACHE, eos_id=-1, sampling=SamplingParams()
)
BIG = 1 << 20


class RecordingDrafter:
  """Proposes k repeats of the current token (one-hot, as the n-gram drafter without a
  match: lossless); records in its shared state what ``observe`` reports per original row;
  ``propose`` sends what its context shows to ``self.seen`` (host) for the test to check."""

  name = 'recording'
  derived = False
  wants_context = True

  def __init__(self, wants_hidden=False):
    self.wants_hidden = wants_hidden
    self.seen = []

  def params_from_policy(self, policy_params):
    return None

  def state_logical_axes(self):
    return None

  def prefill(self, draft_params, prompt_tokens, prompt_len, buffer_len, mesh=None):
    return None

  def init_shared(self, batch, seq_len):
    z = jnp.zeros((batch,), jnp.int32)
    big = z + BIG
    return dict(count=z, first=big, gmin=big, gmax=-big, pmin=big, pmax=-big, calls=z)

  def observe(self, dp, shared, tokens, pos_before, pos_after, seq_id, group_ids, prompt_ids):
    at = lambda x: x.at[seq_id]  # noqa: E731  (padding rows: seq_id = B, dropped)
    return dict(
      count=at(shared['count']).add(pos_after - pos_before, mode='drop'),
      first=at(shared['first']).min(pos_before, mode='drop'),
      gmin=at(shared['gmin']).min(group_ids, mode='drop'),
      gmax=at(shared['gmax']).max(group_ids, mode='drop'),
      pmin=at(shared['pmin']).min(prompt_ids, mode='drop'),
      pmax=at(shared['pmax']).max(prompt_ids, mode='drop'),
      calls=at(shared['calls']).add((pos_after > pos_before).astype(jnp.int32), mode='drop'),
    )

  def propose(self, dp, state, seq_tokens, pos, k, rng, sp, mesh=None, policy_cache=None, ctx=None):
    b = pos.shape[0]
    row = jnp.minimum(ctx.seq_id, ctx.shared['count'].shape[0] - 1)
    count = ctx.shared['count'][row]
    first = ctx.shared['first'][row]
    hidden = ctx.hidden if ctx.hidden is not None else jnp.zeros((b, 1, 1))
    hfrom = ctx.hidden_from if ctx.hidden_from is not None else jnp.zeros((b,), jnp.int32)
    args = (ctx.seq_id, ctx.group_ids, ctx.prompt_ids, count, first, pos, hidden, hfrom)
    jax.debug.callback(lambda *a: self.seen.append([np.asarray(x) for x in a]), *args)
    cur = jnp.take_along_axis(seq_tokens, pos[:, None], axis=1)
    toks = jnp.broadcast_to(cur, (b, k)).astype(jnp.int32)
    onehot = jnp.arange(CFG.vocab_size)[None, None, :] == toks[..., None]
    return toks, jnp.where(onehot, 0.0, sampling.NEG_INF), state, policy_cache


def prompts():
  plen = (CACHE - LENGTHS).astype(np.int32)  # each row generates to the cache end
  rng = np.random.default_rng(0)
  toks = rng.integers(3, CFG.vocab_size, size=(len(plen), RCFG.max_prompt_len)).astype(np.int32)
  toks[np.arange(RCFG.max_prompt_len)[None, :] >= plen[:, None]] = 0
  return toks, plen


def full_hidden(tokens):
  """Final-norm hidden states of a cache-free forward over committed sequences [B, S, D]."""
  s = tokens.shape[1]
  pos = np.broadcast_to(np.arange(s, dtype=np.int32), tokens.shape)
  return np.asarray(model_lib.forward(PARAMS, CFG, jnp.asarray(tokens), pos, return_hidden=True)[2])


def check_rollout(eng, drafter, speculates: bool):
  toks, plen = prompts()
  out, _ = eng.generate(
    PARAMS, toks, plen, jax.random.key(1), group_ids=GROUPS, prompt_ids=PROMPT_IDS
  )
  out = jax.device_get(out)
  np.testing.assert_array_equal(out.length, LENGTHS)
  sh = jax.device_get(eng.last_draft_shared)
  # observe saw every committed token of every row, finished rows included
  np.testing.assert_array_equal(sh['count'], out.length)
  np.testing.assert_array_equal(sh['first'], plen - 1)  # first call: after the prefill
  for lo, hi, want in (('gmin', 'gmax', GROUPS), ('pmin', 'pmax', PROMPT_IDS)):
    np.testing.assert_array_equal(sh[lo], want)  # every observation carried the row's ids
    np.testing.assert_array_equal(sh[hi], want)
  if not speculates:  # one call per committed token (plus nothing for finished rows)
    np.testing.assert_array_equal(sh['calls'], out.length)
  if not speculates:
    assert not drafter.seen
    return
  assert drafter.seen, 'propose never ran'
  ref_h = full_hidden(out.tokens[:, :CACHE]) if drafter.wants_hidden else None
  checked = 0
  for seq_id, gid, pid, count, first, pos, hidden, hfrom in drafter.seen:
    real = seq_id < len(LENGTHS)  # padding rows of a compacted batch carry B
    assert real.any()
    r = seq_id[real]
    np.testing.assert_array_equal(gid[real], GROUPS[r])
    np.testing.assert_array_equal(pid[real], PROMPT_IDS[r])
    np.testing.assert_array_equal(first[real], plen[r] - 1)
    np.testing.assert_array_equal(count[real], pos[real] - first[real])  # observed up to pos
    if ref_h is None:
      continue
    for i in np.nonzero(real)[0]:
      n = pos[i] - hfrom[i]
      assert 1 <= n <= hidden.shape[1] or (n == 0 and count[i] == LENGTHS[seq_id[i]])  # done
      want = ref_h[seq_id[i], hfrom[i] : pos[i]]
      np.testing.assert_allclose(hidden[i, :n], want, atol=2e-5, rtol=1e-5)
      checked += 1
  assert checked or ref_h is None


@pytest.mark.parametrize('num_draft', [0, 2])
def test_static_engine_row_ids_shared_state_and_observe(num_draft):
  drafter = RecordingDrafter(wants_hidden=bool(num_draft))
  rcfg = dataclasses.replace(RCFG, num_draft=num_draft)
  eng = rollout_lib.RolloutEngine(CFG, rcfg, drafter=drafter)
  check_rollout(eng, drafter, speculates=bool(num_draft))


@pytest.mark.parametrize('policy', ['never', 'always'])
def test_adaptive_engine_with_compaction(policy):
  drafter = RecordingDrafter(wants_hidden=policy == 'always')
  acfg = adaptive.AdaptiveConfig(policy=policy, buckets=(8, 4, 1), chunk_steps=3, arms=(2,))
  eng = adaptive.AdaptiveRolloutEngine(CFG, RCFG, acfg, drafter=drafter)
  check_rollout(eng, drafter, speculates=policy == 'always')
  assert eng.last_report.compactions, 'the batch was never compacted'


def test_row_ids_are_validated():
  with pytest.raises(ValueError, match='group_ids must be 3 integers'):
    rollout_lib.prepare_row_ids(np.zeros(2), None, 3)
  g, p = rollout_lib.prepare_row_ids(None, None, 3)
  np.testing.assert_array_equal(g, [0, 1, 2])
  np.testing.assert_array_equal(p, [-1, -1, -1])


# ----------------------------------------------------------------------------- hidden states

HRCFG = rollout_lib.RolloutConfig(
  max_new_tokens=10, max_prompt_len=6, num_draft=3, eos_id=-1, sampling=SamplingParams()
)


def _prefill(drafter, lens):
  toks = np.random.default_rng(1).integers(3, CFG.vocab_size, size=(len(lens), 6))
  toks = np.where(np.arange(6)[None, :] < lens[:, None], toks, 0).astype(np.int32)
  kw = dict(cfg=CFG, rcfg=HRCFG, drafter=drafter)
  return jax.jit(lambda p, t, n, r: steps.prefill(p, t, n, r, **kw))(
    PARAMS, toks, lens, jax.random.key(5)
  )


@pytest.mark.parametrize('ks', [(0, 0, 0, 0), (3, 1, 3, 3)], ids=['plain', 'speculative'])
def test_hidden_states_match_a_full_forward(ks):
  """After the prefill and every plain step / speculative round, ``state.hidden`` holds the
  policy's final-norm hidden state at positions ``hidden_from .. pos - 1``."""
  drafter = RecordingDrafter(wants_hidden=True)
  lens = np.array([1, 2, 6, 4], np.int32)  # shorter and longer than W = 4
  state = _prefill(drafter, lens)
  step = jax.jit(
    lambda s, k: steps.decode_step(PARAMS, None, s, k, cfg=CFG, rcfg=HRCFG, drafter=drafter),
    static_argnums=1,
  )
  snaps = [jax.device_get(state)]
  for k in ks:
    state = step(state, k)
    snaps.append(jax.device_get(state))
  ref = full_hidden(snaps[-1].tokens[:, : HRCFG.seq_len])
  assert snaps[-1].hidden.shape == (4, HRCFG.draft_width + 1, CFG.d_model)
  for s in snaps:
    for b in range(4):
      n = s.pos[b] - s.hidden_from[b]
      assert 1 <= n <= s.hidden.shape[1] or (n == 0 and s.done[b])  # a done row keeps none
      want = ref[b, s.hidden_from[b] : s.pos[b]]
      np.testing.assert_allclose(s.hidden[b, :n], want, atol=2e-5, rtol=1e-5)
  assert snaps[0].hidden_from.tolist() == np.maximum(lens - 4, 0).tolist()


def test_no_hidden_state_without_a_drafter_asking():
  """No drafter asking: the state has no hidden field and a plain step traces exactly
  the jaxpr it traces without any drafter (no extra outputs, no extra work)."""
  lens = np.array([2, 5], np.int32)

  def jaxpr(drafter):
    state = _prefill(drafter, lens)
    fn = lambda s: steps.decode_step(PARAMS, None, s, 0, cfg=CFG, rcfg=HRCFG, drafter=drafter)  # noqa: E731
    return state, jax.make_jaxpr(fn)(state)

  s0, plain = jaxpr(None)
  s1, with_ngram = jaxpr(NgramDrafter(CFG.vocab_size))
  assert s0.hidden is None and s1.hidden is None and s1.draft_shared is None
  assert str(with_ngram) == str(plain)
  s2, with_hidden = jaxpr(RecordingDrafter(wants_hidden=True))
  assert s2.hidden is not None
  assert len(with_hidden.out_avals) > len(plain.out_avals)


def test_compaction_moves_batch_rows_and_leaves_shared_rows():
  """Compaction gathers 'batch' rows (padding rows get seq_id = B) and leaves the drafter's
  shared 'rows' state whole."""
  done = np.array([False, True, False, True, True])
  idx, cur, new_origin = state_ops.compaction_plan(done, None, 4, 5)
  np.testing.assert_array_equal(idx, [0, 2, 1, 1])
  np.testing.assert_array_equal(new_origin, [0, 2, 5, 5])
  drafter = RecordingDrafter()
  state = _prefill(drafter, np.array([1, 2, 3, 2, 1], np.int32))
  axes = state_ops.axis_positions(state_ops.state_axes(state, drafter), 'batch')
  small = state_ops.compact_rows(state, idx, new_origin, axes)
  np.testing.assert_array_equal(small.seq_id, [0, 2, 5, 5])
  np.testing.assert_array_equal(small.group_ids, [0, 2, 1, 1])
  np.testing.assert_array_equal(small.pos, np.asarray(state.pos)[idx])
  assert small.draft_shared['count'].shape == (5,)  # all original rows, untouched
  np.testing.assert_array_equal(small.draft_shared['count'], state.draft_shared['count'])


@pytest.mark.parametrize('wants_hidden', [False, True])
def test_cost_profiler_gives_context_drafters_a_context(wants_hidden):
  """The adaptive engine's cost model times ``propose`` outside a rollout: a drafter that
  wants a context (row ids, shared state, hidden states) gets one of the right shapes."""
  from specrl.decoding import profile

  drafter = RecordingDrafter(wants_hidden=wants_hidden)
  prof = profile.measure_profile(
    CFG, PARAMS, drafter, None, batch=4, buffer_len=24, k_ref=2, sp=SamplingParams(),
    max_prompt_len=8, reps=1, iters=1,
  )  # fmt: skip
  assert prof.prop1 > 0 and prof.prop_ref > 0
  seq_id, group_ids, prompt_ids, *_, hidden, _ = drafter.seen[-1]
  assert (seq_id == np.arange(4)).all() and (prompt_ids == -1).all()
  assert hidden.shape == ((4, 3, CFG.d_model) if wants_hidden else (4, 1, 1))


@pytest.mark.parametrize('unroll,fuse', [(None, None), (False, True)])
def test_cost_profiler_times_the_decode_loops_layer_layout(unroll, fuse, monkeypatch):
  """On CPU the decode loop runs the policy over per-layer weights sliced once
  (``unstack_layers``); the profiler must time that layout (by default on CPU), or its
  plain step is the stacked scan's, ~1.4x dearer on SmolLM2, and v comes out too low.
  Likewise the fused q/k/v and gate/up weights when the loop fuses (``fuse``; the engines
  pass ``rollout.fuse_matmuls``; default: the backend's, off on CPU)."""
  from specrl.decoding import profile

  seen, fused = [], []

  def forward_spy(params, *a, **kw):
    seen.append(isinstance(params['layers'], tuple))
    fused.append(model_lib.is_fused(params))
    return real_forward(params, *a, **kw)

  real_forward = model_lib.forward
  monkeypatch.setattr(model_lib, 'forward', forward_spy)
  profile.measure_profile(
    CFG, PARAMS, None, None, batch=2, buffer_len=16, k_ref=0, sp=SamplingParams(),
    max_prompt_len=4, reps=1, iters=1, unroll_layers=unroll, fuse=fuse,
  )  # fmt: skip
  assert seen and all(seen) == (unroll is None and jax.default_backend() == 'cpu'), seen
  assert any(seen) == all(seen)
  want = steps.fuse_default() if fuse is None else fuse
  assert fused and all(f == want for f in fused), fused


def test_cost_profile_times_its_units_round_robin(monkeypatch):
  """v = fwd_ref / fwd1 and c = prop / fwd1 are ratios, so the profile times its units
  interleaved (a, b, c, d, a, b, c, d, ...): a change of machine load between units cannot
  skew them (timed one unit after the other, SmolLM2's v once came out 1.22 where a
  rollout's rounds cost 1.87 plain steps). All alive at once, they share one policy cache
  (on a device a rollout-sized cache each would be 4x the memory)."""
  from specrl.decoding import profile

  order = []
  real_call = profile.LoopTimer.__call__

  def spy(self):
    order.append(id(self))
    return real_call(self)

  monkeypatch.setattr(profile.LoopTimer, '__call__', spy)
  caches = []
  real_init = model_lib.init_cache
  monkeypatch.setattr(
    model_lib, 'init_cache', lambda *a, **k: caches.append(a) or real_init(*a, **k)
  )
  prof = profile.measure_profile(
    CFG, PARAMS, RecordingDrafter(), None, batch=2, buffer_len=24, k_ref=3,
    sp=SamplingParams(), max_prompt_len=8, reps=1, iters=3,
  )  # fmt: skip
  units = list(dict.fromkeys(order))
  assert len(units) == 4  # fwd1, fwd_ref (k_ref + 1 tokens), prop at k = 1 and k_prop = 2
  assert order == units * 4  # one warm-up round, then 3 timed rounds of every unit
  assert len(caches) == 1  # the units pass one policy cache along (CarryCell), not one each
  assert prof.k_prop == 2 and min(prof.fwd1, prof.fwd_ref, prof.prop1, prof.prop_ref) > 0


def test_interleaved_medians_spread_a_units_fewer_calls_evenly():
  from specrl.decoding import profile

  calls = []
  fns = {n: (lambda n=n: calls.append(n) or jnp.zeros(())) for n in 'ab'}
  med = profile.interleaved_medians(fns, warmup=1, iters={'a': 4, 'b': 2})
  assert calls == ['a', 'b', 'a', 'a', 'b', 'a', 'a', 'b'] and sorted(med) == ['a', 'b']

"""The adaptive engine's costs keyed by (batch bucket, length bucket, strategy) (issue 26,
item 3): the cost model decides per length bucket, unmeasured cells fall back to the
nearest measured length bucket of the same batch bucket, and memory saved before the
change (keys without a length) still loads."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from specrl import adaptive
from specrl import rollout as rollout_lib
from specrl.adaptive import AdaptiveConfig, ChunkObs, CostProfile, policies
from tests.test_adaptive import CFG, DRAFTER, GREEDY, PARAMS

# plain 1.0 s / round, k2: 0.2 + 1.2 = 1.4 (the profile: dense, one length)
PROF = CostProfile(batch=4, k_ref=2, fwd1=1.0, fwd_ref=1.2, prop1=0.1, prop_ref=0.2)
ACFG = AdaptiveConfig(policy='cost_model', arms=(2,), cost_memory=0.0, alpha_memory=0.0)


def _obs(strategy, seconds, length, steps=10, bucket=4):
  rounds = 0 if strategy == 0 else 40
  return ChunkObs(
    bucket=bucket,
    strategy=strategy,
    steps=steps,
    seconds=seconds,
    tokens=40 + rounds,
    rounds=rounds,
    accepted=rounds,
    active_start=4,
    active_end=4,
    length=length,
  )


def _learn(*obs, mem=None):
  mem = mem if mem is not None else policies.Memory(alpha=0.5)
  for o in obs:
    mem = policies.memory_observe(mem, o, PROF, ACFG)
  return mem


def test_cost_model_chooses_differently_for_two_length_buckets_of_one_batch_bucket():
  """At 256 slots a k2 round costs 2x a plain one (weights dominate: the verify pass of 3
  tokens is no cheaper per token): speculation loses. At 8192 slots both are dominated by
  the KV read, k2 costs 1.1x plain: speculation pays. Same batch bucket, same acceptance."""
  mem = _learn(
    _obs(0, 10.0, 256),  # plain 1.0 s / round
    _obs(2, 20.0, 256),  # k2 2.0
    _obs(0, 40.0, 8192),  # plain 4.0
    _obs(2, 44.0, 8192),  # k2 4.4
  )
  assert mem.costs == {
    (4, 256, 0): 1.0,
    (4, 256, 2): 2.0,
    (4, 8192, 0): 4.0,
    (4, 8192, 2): pytest.approx(4.4),
  }
  assert set(mem.corr) == {
    (4, 256, 'plain'),
    (4, 256, 'spec'),
    (4, 8192, 'plain'),
    (4, 8192, 'spec'),
  }
  assert set(mem.yields) == {(4, 2)} and set(mem.bucket_alpha) == {4}  # acceptance: batch
  alpha = 0.5  # 1.75 tokens per k2 pass
  short = policies.round_costs(mem, PROF, 4, (0, 2), lengths=256)
  long = policies.round_costs(mem, PROF, 4, (0, 2), lengths={0: 8192, 2: 8192})
  assert policies.cost_model_choose(short, alpha, None, 0.1)[0] == 0  # 1.75 / 2 < 1
  assert policies.cost_model_choose(long, alpha, None, 0.1)[0] == 2  # 1.75 / 4.4 > 1 / 4
  # through the engine's decision: each strategy priced at the length bucket it would run
  eng = adaptive.AdaptiveRolloutEngine(
    CFG, _rcfg(), dataclasses.replace(ACFG, alpha_prior=0.5, alpha_optimism=0), DRAFTER
  )
  eng.set_profile(PROF)
  eng.memory = dataclasses.replace(mem, bucket_alpha={4: (0.5, 1e9)})
  report = adaptive.AdaptiveReport(batch=4, policy='cost_model')
  s, _, info = eng._decide(None, 4, 4, None, PARAMS, lambda: None, report, {0: 256, 2: 256})
  assert s == 0 and info['length'] == 256, info
  s, _, info = eng._decide(None, 4, 4, None, PARAMS, lambda: None, report, {0: 8192, 2: 8192})
  assert s == 2 and info['length'] == 8192, info
  # keyed by batch bucket alone (the old model), the two lengths would mix into one cost
  old = policies.Memory(alpha=0.5)
  for o in (_obs(0, 10.0, 0), _obs(2, 20.0, 0), _obs(0, 40.0, 0), _obs(2, 44.0, 0)):
    old = policies.memory_observe(old, o, PROF, dataclasses.replace(ACFG, cost_memory=10.0))
  assert set(old.costs) == {(4, 0), (4, 2)}


def test_unmeasured_cells_fall_back_to_the_nearest_length_bucket_of_the_batch_bucket():
  mem = _learn(
    _obs(0, 10.0, 256),  # plain corr 1.0 at 256
    _obs(2, 28.0, 256),  # spec corr 2.0 at 256 (k2 profiled 1.4)
    _obs(0, 30.0, 1024),  # plain corr 3.0 at 1024
    _obs(0, 50.0, 8, bucket=8),  # another batch bucket: never used for bucket 4
  )
  corr = policies.corr_at
  # 1. measured cells
  assert corr(mem, 4, 256, 'spec') == pytest.approx(2.0)
  assert corr(mem, 4, 1024, 'plain') == pytest.approx(3.0)
  # 2. spec at 1024: the verify / plain ratio measured at 256, scaled by plain's 3x
  assert corr(mem, 4, 1024, 'spec') == pytest.approx(6.0)
  # plain at 512: the nearest measured (256 and 1024 are equally near in log2: the
  # longer), unscaled; at 4096: 1024; at 64: 256
  assert corr(mem, 4, 512, 'plain') == pytest.approx(3.0)
  assert corr(mem, 4, 4096, 'plain') == pytest.approx(3.0)
  assert corr(mem, 4, 64, 'plain') == pytest.approx(1.0)
  # spec at 4096: nearest spec length 256; plain is not measured at 4096: unscaled
  assert corr(mem, 4, 4096, 'spec') == pytest.approx(2.0)
  # round costs: measured cell, else profile x correction
  got = policies.round_costs(mem, PROF, 4, (0, 2), lengths={0: 1024, 2: 1024})
  assert got == pytest.approx({0: 3.0, 2: 1.4 * 6.0})
  # 3. spec with nothing speculative measured at the batch bucket: plain's correction
  only_plain = _learn(_obs(0, 30.0, 1024))
  assert corr(only_plain, 4, 1024, 'spec') == pytest.approx(3.0)
  assert corr(only_plain, 4, 2048, 'spec') == pytest.approx(3.0)  # plain's nearest
  # 5. nothing measured at the batch bucket (bucket 8's measurements are not used): 1
  assert corr(mem, 2, 1024, 'plain') == 1.0 and corr(mem, 2, 1024, 'spec') == 1.0
  assert policies.round_costs(mem, PROF, 2, (0, 2), lengths=1024) == pytest.approx({0: 1.0, 2: 1.4})
  # learn_online off: the profile alone
  assert policies.round_costs(mem, PROF, 4, (0, 2), False, 1024) == pytest.approx({0: 1.0, 2: 1.4})


def test_memory_from_before_length_keys_loads_and_prices_every_length():
  old_json = {  # memory_to_json as written before costs were keyed by length
    'alpha': 0.61,
    'alpha_n': 12.0,
    'bucket_alpha': [[4, 0.7, 10.0]],
    'costs': [[4, 0, 2.0], [4, 2, 3.0], [8, 0, 0.01]],
    'corr': [[4, 'plain', 2.0], [4, 'spec', 2.5], [8, 'plain', 1.1]],
    'yields': [[4, 2, 0.8]],
    'tlt': {'below_steps': 3, 'on': True, 'rewards': [[4, 2, [1.0, 2.0]]]},
    'roofline_index': 1,
    'passes': [],
  }
  mem = policies.memory_from_json(json.loads(json.dumps(old_json)))
  assert mem.costs == {(4, 0): 2.0, (4, 2): 3.0, (8, 0): 0.01}
  assert mem.corr == {(4, 'plain'): 2.0, (4, 'spec'): 2.5, (8, 'plain'): 1.1}
  assert policies.memory_to_json(mem) == old_json  # kept as they were
  # no length: the old lookups
  assert policies.round_costs(mem, PROF, 4, (0, 2)) == {0: 2.0, 2: 3.0}
  # any length bucket: the length-unknown corrections (4.), until that length is measured
  got = policies.round_costs(mem, PROF, 4, (0, 2), lengths=512)
  assert got == pytest.approx({0: 2.0, 2: 1.4 * 2.5})
  mem = _learn(_obs(0, 40.0, 512), mem=mem)
  assert mem.costs[(4, 512, 0)] == 4.0 and mem.costs[(4, 0)] == 2.0
  got = policies.round_costs(mem, PROF, 4, (0, 2), lengths=512)
  assert got == pytest.approx({0: 4.0, 2: 1.4 * 4.0})  # spec: plain's at this length (3.)
  # mixed memory (old and new cells) round-trips through JSON
  back = policies.memory_from_json(json.loads(json.dumps(policies.memory_to_json(mem))))
  assert back == mem


def _rcfg():
  # budgets of 26 tokens over a 32-slot cache in 8-slot length buckets: chunks at 16, 32
  return rollout_lib.RolloutConfig(
    max_new_tokens=26,
    max_prompt_len=6,
    cache_len=32,
    eos_id=-1,
    sampling=GREEDY,
    attend_bucket=8,
  )


def test_engine_learns_costs_per_length_bucket_of_its_chunks():
  acfg = AdaptiveConfig(
    policy='always', arms=(2,), buckets=(4,), chunk_steps=3, learn_online=True, alpha_prior=0.5
  )
  eng = adaptive.AdaptiveRolloutEngine(CFG, _rcfg(), acfg, DRAFTER)
  rng = np.random.default_rng(0)
  toks = rng.integers(3, CFG.vocab_size, size=(4, 6)).astype(np.int32)
  eng.generate(PARAMS, toks, np.full(4, 6, np.int32), jax.random.key(0))
  report = eng.last_report
  ran = {a for _, a in report.length_buckets}
  assert len(ran) >= 2, report.length_buckets  # the rollout crossed length buckets
  cells = set(eng.memory.costs)
  assert all(len(k) == 3 for k in cells), cells
  assert {k[1] for k in cells} <= ran and len({k[1] for k in cells}) >= 2
  assert {k[0] for k in cells} == {4} and {k[2] for k in cells} == {2}


def test_plain_is_measured_before_speculating_at_a_cell_where_it_never_ran():
  """The one profile per batch bucket is taken at the buffer's full width. An arm that ran
  is priced at the length it ran; plain, if it never ran there, stays priced at the full
  width -- too slow -- and the arm keeps running on a false comparison (1x4 at a 1024-token
  budget: plain priced at 14.4 tok/s per row, measured ~19). So before speculating at a
  (batch bucket, length bucket) cell where plain has not run, a plain chunk of
  ``plain_probe_steps`` measures plain there."""
  acfg = dataclasses.replace(ACFG, alpha_prior=0.5, alpha_optimism=0, plain_probe_steps=5)
  # the decision alone (host maths, no model): PROF is plain 1.0 s, k2 1.4 s per round,
  # k2 1.25x plain at alpha 0.5
  new = lambda a=acfg: adaptive.Decider(a, k_max=2, to_boundary=64)  # noqa: E731
  dec = new()
  lengths = {0: 256, 2: 256}

  def decide(current=None):
    return dec.decide(None, 4, 4, current, PROF, lengths)

  # k2 ran at 256 (0.9 s a round: the short length is cheaper than the full-width
  # profile; 2 tokens per pass); plain never ran: without the probe, k2 (2 / 0.9 tokens
  # per s) beats the profiled plain (1 / 1.0) by 2.2x
  dec.memory = _learn(_obs(2, 9.0, 256))
  assert (
    policies.cost_model_choose(
      policies.round_costs(dec.memory, PROF, 4, (0, 2), lengths=lengths), 0.5, None, 0.1
    )[0]
    == 2
  )
  s, steps, info = decide(current=2)
  assert (s, steps, info['probe'], info['length']) == (0, 5, True, 256), info
  # measured: plain is 0.4 s a round here, faster than k2's 2 tokens per 0.9 s
  dec.memory = _learn(_obs(0, 2.0, 256, steps=5), mem=dec.memory)
  s, steps, info = decide(current=0)
  assert s == 0 and 'probe' not in info, info
  # the probe is a measurement, not a switch: after it, the arm chosen before it is the
  # incumbent, kept at a near tie (plain measured at 0.48 s a round: 2.08 tokens per s
  # against k2's 2.22, within the 10% margin; plain as the incumbent would have stayed)
  dec.memory = _learn(_obs(2, 9.0, 256))
  dec.probes.clear()
  assert decide(current=None)[2]['probe']
  dec.memory = _learn(_obs(0, 2.4, 256, steps=5), mem=dec.memory)
  assert decide(current=0)[0] == 2
  assert decide(current=0)[0] == 0  # (deferred once: a later plain chunk is plain's again)
  # where plain measures slow, the arm runs after the probe (with plain's correction: 2.0)
  dec2 = new()
  dec2.memory = _learn(_obs(0, 10.0, 256, steps=5))
  s, _, info = dec2.decide(None, 4, 4, 0, PROF, lengths)
  assert s == 2 and 'probe' not in info, info
  # a length bucket plain has not run at is a cell of its own, probed too: priced from
  # 256 slots, plain would be off by its length's share of the step
  s, _, info = dec2.decide(None, 4, 4, 2, PROF, {0: 512, 2: 512})
  assert s == 0 and info['probe'] and info['length'] == 512, info
  # a probe that taught nothing (untimed) is retried once, then the arm runs unprobed
  dec3 = new()
  got = [dec3.decide(None, 4, 4, None, PROF, lengths)[0] for _ in range(3)]
  assert got == [0, 0, 2]
  # off: plain_probe_steps = 0, or learn_online off (nothing would be learned)
  for off in (dict(plain_probe_steps=0), dict(learn_online=False)):
    off_dec = new(dataclasses.replace(acfg, **off))
    assert off_dec.decide(None, 4, 4, None, PROF, lengths)[0] == 2


def test_a_rollout_probes_plain_once_per_batch_bucket_then_speculates():
  """Through generate: the first chunk at the bucket is a plain probe of
  ``plain_probe_steps`` steps (measured: plain's correction is learned), then the arm; the
  next rollout, plain already measured, probes no more."""
  acfg = AdaptiveConfig(
    policy='cost_model',
    arms=(2,),
    buckets=(4,),
    chunk_steps=3,
    alpha_prior=0.5,
    alpha_optimism=0,
    plain_probe_steps=4,
  )
  rcfg = dataclasses.replace(_rcfg(), attend_bucket=0)  # one length bucket: chunks run whole
  eng = adaptive.AdaptiveRolloutEngine(CFG, rcfg, acfg, DRAFTER)
  eng.set_profile(PROF)  # k2 1.25x plain as profiled
  rng = np.random.default_rng(0)
  toks = rng.integers(3, CFG.vocab_size, size=(4, 6)).astype(np.int32)
  out, _ = eng.generate(PARAMS, toks, np.full(4, 6, np.int32), jax.random.key(0))
  rep = eng.last_report
  # (then the measured costs decide: on this CPU the tiny model's k2 may lose to plain)
  assert rep.chosen[4][:2] == [0, 2], rep.chosen
  first, second = rep.decisions[:2]
  assert first['probe'] and (first['step'], second['step']) == (0, 4), rep.decisions
  assert policies.plain_measured(eng.memory, 4)
  # the probe changes no token: greedy, plain's own output
  ref = rollout_lib.RolloutEngine(CFG, rcfg)
  want, _ = ref.generate(PARAMS, toks, np.full(4, 6, np.int32), jax.random.key(0))
  np.testing.assert_array_equal(out.response, want.response)
  eng.generate(PARAMS, toks, np.full(4, 6, np.int32), jax.random.key(1))
  assert not any(d.get('probe') for d in eng.last_report.decisions), eng.last_report.decisions

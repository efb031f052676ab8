"""The process-wide bound on compiled executables (``specrl.decoding.executables``): the
LRU on its own, then a sweep of batch sizes and arms through both engines: under a small
bound the live count never exceeds it (and evictions are counted in the metrics); under a
bound that fits the distinct shapes a repeat of the sweep compiles and evicts nothing."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import default
from specrl import adaptive, experiment
from specrl import rollout as rollout_lib
from specrl.decoding import executables
from specrl.drafters import NgramDrafter
from tests.test_adaptive import BASE, CFG, PARAMS, RCFG


def test_lru_bound_weights_and_counts():
  c = executables.ExecutableCache(limit=4)
  built = []

  def build(x):
    return lambda: built.append(x) or x

  assert c.get('a', build('a')) == 'a' and c.get('a', build('a2')) == 'a'  # hit: not rebuilt
  c.get('b', build('b'), weight=3)
  assert c.live == 4 and c.evictions == 0
  c.get('a', build('a3'))  # 'a' is now the most recent: 'b' goes first
  c.get('c', build('c'))
  assert 'b' not in c and 'a' in c and c.evictions == 1 and c.live == 2
  c.get('d', build('d'), weight=3)  # over: the least recent ('a', then 'c') go
  assert c.live <= 4 and c.peak <= 4 and 'd' in c
  assert built == ['a', 'b', 'c', 'd'] and c.hits == 2 and c.misses == 4
  m = c.metrics()
  assert m['compile/evictions'] == c.evictions and m['compile/limit'] == 4
  for bad in (0, 2, 2.5, True, '8'):
    with pytest.raises(ValueError, match='rollout.max_executables must be an integer >= 3'):
      executables.ExecutableCache(bad)


def test_a_bad_limit_in_the_config_is_refused_naming_the_field():
  c = default.get_config('smoke')
  c.rollout.max_executables = 1
  with pytest.raises(ValueError, match='rollout.max_executables'):
    experiment.build_experiment(c)


def _engines():
  """Static engines (plain; ngram with k = 2) and adaptive ones (ngram, 'always', arms 1
  and 2 sharing compiled functions, compaction 8 -> 4 -> 1)."""
  rcfg = dataclasses.replace(RCFG, max_new_tokens=6, cache_len=0, max_prompt_len=4)
  d = NgramDrafter(CFG.vocab_size, 2)
  statics = [
    rollout_lib.RolloutEngine(CFG, rcfg),
    rollout_lib.RolloutEngine(CFG, dataclasses.replace(rcfg, num_draft=2), drafter=d),
  ]
  acfg = dataclasses.replace(BASE, policy='always', chunk_steps=2)
  ada = adaptive.AdaptiveRolloutEngine(CFG, rcfg, acfg, d)
  adas = [ada.with_config(dataclasses.replace(acfg, arms=arms)) for arms in ((1,), (2,))]
  return statics, adas


def _sweep(engines, cache):
  """Batch sizes 1 and 2 through each static engine, batch 8 through each adaptive one.
  Returns (metrics, live executables after the call) per rollout."""
  statics, adas = engines
  rng = np.random.default_rng(0)
  seen = []
  for e in statics:
    for b in (1, 2):
      toks = rng.integers(1, CFG.vocab_size, (b, 4)).astype(np.int32)
      _, m = e.generate(PARAMS, toks, np.full(b, 3, np.int32), jax.random.key(b))
      seen.append((m, cache.live))
  for eng in adas:
    toks = rng.integers(1, CFG.vocab_size, (8, 4)).astype(np.int32)
    lens = np.array([2, 3, 4, 2, 3, 4, 2, 3], np.int32)
    _, m = eng.generate(PARAMS, toks, lens, jax.random.key(8))
    seen.append((m, cache.live))
  return seen


def test_a_sweep_stays_under_the_bound_and_a_fitting_bound_never_thrashes(monkeypatch):
  engines = _engines()
  cache = executables.ExecutableCache(limit=1000)
  monkeypatch.setattr(executables, 'CACHE', cache)
  _sweep(engines, cache)
  distinct = cache.live  # every executable of the sweep, once
  assert cache.evictions == 0 and distinct >= 2 * 2 * 3 + 4
  # a bound that fits them exactly: the sweep again compiles and evicts nothing
  cache.set_limit(distinct)
  misses = cache.misses
  seen = _sweep(engines, cache)
  assert cache.evictions == 0 and cache.misses == misses
  assert seen[-1][0]['compile/evictions'] == 0 and seen[-1][0]['compile/live'] == distinct
  # a bound below them: never more live than the bound, evictions counted in the metrics
  small = executables.ExecutableCache(limit=5)
  monkeypatch.setattr(executables, 'CACHE', small)
  seen = _sweep(engines, small)
  assert small.peak <= 5 and all(live <= 5 for _, live in seen)
  assert small.evictions > 0
  m = seen[-1][0]
  assert m['compile/evictions'] == small.evictions and m['compile/limit'] == 5

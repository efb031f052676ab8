"""Sampled draft trees (``drafter.eagle.tree_children = 'sampled'``) and their verifier,
recursive rejection sampling (:mod:`specrl.kernels.verify_sampled_tree_reference`).

Lossless in distribution, not token for token, so every check is statistical and shown to
have power:

- the verifier alone on a Markov "policy" and "head" with many rows: a sampled tree's round,
  continued by exact draws from the policy, gives 3-token sequences whose chi-square against
  the exact joint passes; verifiers with the residual update, or the removal of the rejected
  child from the proposal, left out fail it; so does a builder that keeps a child slot by
  the drawn token's own probability (EAGLE-2's expansion; the module doc says why not);
- the eagle drafter's sampled trees through the rollout engines (static: chi-square on the
  first tokens against the exact joint; a residual-less verifier caught there too;
  the adaptive engine: the same; with EOS and compaction, the static engine's very tokens,
  since every draw is keyed by sequence and position), with non-first children accepted,
  and the head's KV after the rounds equal to feeding the committed path;
- refusals: an unknown ``tree_children``, the Pallas verifier.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import adaptive
from specrl import rollout as rollout_lib
from specrl.decoding import tree as tree_lib
from specrl.decoding.state import RolloutConfig
from specrl.drafters import eagle
from specrl.kernels import verify_sampled_tree_reference as rrs
from specrl.sampling import SamplingParams
from tests import stats
from tests import test_eagle_tree as tet
from tests import test_speculative as ts

PASS_P, FAIL_P = 1e-3, 1e-6
T1 = SamplingParams(1.0)

# ----------------------------------------------------------------------------- the verifier

V = 5
ROOT = 2
_rng = np.random.default_rng(3)
# policy p(next | last) and a poor head q(next | last) (zeros included: residual corners)
P_TAB = _rng.dirichlet(np.full(V, 0.7), size=V)
Q_TAB = _rng.dirichlet(np.full(V, 0.7), size=V)
Q_TAB[:, 4] = 0.0
Q_TAB /= Q_TAB.sum(1, keepdims=True)
# node: root, its 3 children, two under the first child, one under the second
PARENTS = np.array([-1, 0, 0, 0, 1, 1, 2], np.int32)


def _sample_trees(rng, n, own_prob_slots=False):
  """n trees of shape PARENTS, every node's children drawn without replacement from
  Q_TAB[its token] (Gumbel-top-k, in draw order). ``own_prob_slots``: the broken builder,
  which keeps a node's second child only when its own q is above 0.2."""
  tokens = np.full((n, len(PARENTS)), -1, np.int64)
  tokens[:, 0] = ROOT
  kids = {}
  for u, par in enumerate(PARENTS):
    if par >= 0:
      kids.setdefault(par, []).append(u)
  for par in sorted(kids):
    q = Q_TAB[tokens[:, par]]  # [n, V]
    g = rng.gumbel(size=q.shape)
    order = np.argsort(-(np.log(np.where(q > 0, q, 1e-300)) + g), axis=1)
    for j, u in enumerate(kids[par]):
      tokens[:, u] = order[:, j]
      if own_prob_slots and j == 1:
        tokens[:, u] = np.where(q[np.arange(n), order[:, j]] > 0.2, order[:, j], -1)
  return tokens


def _round_then_policy(tokens, seeds, rng, m=3, sp=T1):
  """One verify round over the trees, then exact policy draws up to m tokens. [n, m]."""
  n = tokens.shape[0]
  last = np.where(tokens >= 0, tokens, 0)
  target = jnp.log(jnp.asarray(P_TAB[last], jnp.float32))  # [n, N, V]
  draft = jnp.log(jnp.asarray(Q_TAB[last[:, PARENTS.clip(0)]], jnp.float32) + 1e-38)
  par = jnp.broadcast_to(jnp.asarray(PARENTS), tokens.shape)
  # a fresh function each call: a monkeypatched piece is traced, not a cached trace
  verify = jax.jit(lambda *a: rrs.verify_sampled_tree_reference(*a, None, seeds, sp))
  res = verify(target, jnp.asarray(tokens, jnp.int32), par, draft)
  out = np.asarray(res.tokens)[:, :m].copy()
  k = np.asarray(res.num_accepted) + 1
  for j in range(1, m):  # continue rows that emitted fewer than m tokens, exactly
    cont = j >= k
    prev = out[:, j - 1]
    draw = (rng.random(n)[:, None] < np.cumsum(P_TAB[prev], axis=1)).argmax(1)
    out[:, j] = np.where(cont, draw, out[:, j])
  return out, res


def _exact3():
  conts = np.array([(a, b, c) for a in range(V) for b in range(V) for c in range(V)])
  a, b, c = conts.T
  return conts, P_TAB[ROOT, a] * P_TAB[a, b] * P_TAB[b, c]


def _verifier_pvalue(n=120_000, own_prob_slots=False):
  rng = np.random.default_rng(11)
  tokens = _sample_trees(rng, n, own_prob_slots)
  seeds = jnp.asarray(rng.integers(-(2**31), 2**31 - 1, tokens.shape), jnp.int32)
  out, res = _round_then_policy(tokens, seeds, rng)
  conts, probs = _exact3()
  return stats.chi2_pvalue(out, conts, probs), res


def test_verifier_output_follows_the_policy_and_takes_every_path():
  p, res = _verifier_pvalue()
  assert p > PASS_P, p
  n = np.asarray(res.num_accepted)
  # rejections at the root (residual draws), second / third children, both depths, leaves
  assert (n == 0).mean() > 0.05 and (n == 2).mean() > 0.05, np.bincount(n)
  assert np.asarray(res.non_first).sum() > 0.1 * len(n)
  assert np.asarray(res.leaf)[n == 2].all() and not np.asarray(res.leaf)[n == 0].any()


@pytest.mark.parametrize('mutant', ['no_residual', 'keeps_rejected_child', 'own_prob_slots'])
def test_broken_sampled_tree_verifiers_are_caught(monkeypatch, mutant):
  if mutant == 'no_residual':
    monkeypatch.setattr(rrs, 'residual', lambda p, q: p)
  elif mutant == 'keeps_rejected_child':
    monkeypatch.setattr(rrs, 'without', lambda q, x: q)
  p, _ = _verifier_pvalue(own_prob_slots=mutant == 'own_prob_slots')
  assert p < FAIL_P, f'the chi-square test missed the {mutant} verifier (p={p:.2e})'


# ------------------------------------------------------------------- the drafter's trees

M = 4  # first tokens compared: the prefill token, a depth-2 round (3 tokens) and one more
N_ROWS = 8000
PROMPT = [1, 3, 2]


def _sampled_drafter(vocab=None):
  d = tet._drafter(branch=2, vocab=vocab)
  d.ecfg = dataclasses.replace(d.ecfg, tree_children='sampled')
  return d


def _rollout_samples(sp, drafter, engine='static'):
  rcfg = RolloutConfig(
    max_new_tokens=M + 2, max_prompt_len=len(PROMPT), sampling=sp, eos_id=-1,
    attend_bucket=0, num_draft=4, tree_nodes=5, tree_depth=2,
  )  # fmt: skip
  toks = np.tile(np.asarray(PROMPT, np.int32), (N_ROWS, 1))
  lens = np.full((N_ROWS,), len(PROMPT), np.int32)
  if engine == 'static':
    eng = rollout_lib.RolloutEngine(ts.CFG, rcfg, drafter=drafter)
  else:
    acfg = adaptive.AdaptiveConfig(policy='always', buckets=(N_ROWS,), arms=(4,), chunk_steps=1)
    rcfg = dataclasses.replace(rcfg, num_draft=0)  # the arm: a tree of 5 nodes, depth 2
    eng = adaptive.AdaptiveRolloutEngine(ts.CFG, rcfg, acfg, drafter=drafter)
  out, m = eng.generate(ts.POLICY, toks, lens, jax.random.key(4))
  out = jax.device_get(out)
  return np.asarray(out.response)[:, :M], out, m


@pytest.mark.parametrize('name', ['t1', 'top_p'])
def test_sampled_eagle_trees_follow_the_policy_in_the_static_engine(name):
  sp = tet.SETTINGS[name]
  samples, out, m = _rollout_samples(sp, _sampled_drafter())
  conts, probs = stats.exact_joint(ts.POLICY, ts.CFG, PROMPT, M, sp)
  p = stats.chi2_pvalue(samples, conts, probs)
  assert p > PASS_P, p
  nodes, non_first, leaf = np.asarray(out.tree_stats).sum(0)
  assert non_first > 0.05 * N_ROWS and leaf > 0.05 * N_ROWS, (non_first, leaf)
  assert m['spec/accepted'] > 0


def test_a_residual_less_verifier_is_caught_through_the_engine(monkeypatch):
  monkeypatch.setattr(rrs, 'residual', lambda p, q: p)
  sp = tet.SETTINGS['t1']
  samples, _, _ = _rollout_samples(sp, _sampled_drafter())
  conts, probs = stats.exact_joint(ts.POLICY, ts.CFG, PROMPT, M, sp)
  assert stats.chi2_pvalue(samples, conts, probs) < FAIL_P


def test_sampled_eagle_trees_follow_the_policy_in_the_adaptive_engine():
  sp = tet.SETTINGS['t1']
  samples, out, m = _rollout_samples(sp, _sampled_drafter(), engine='adaptive')
  conts, probs = stats.exact_joint(ts.POLICY, ts.CFG, PROMPT, M, sp)
  assert stats.chi2_pvalue(samples, conts, probs) > PASS_P
  assert np.asarray(out.tree_stats)[:, 1].sum() > 0 and m['spec/accepted'] > 0


def test_sampled_trees_keep_the_head_cache_teacher_forced():
  d = _sampled_drafter(vocab=tet.REDUCED)
  st = tet._run(tet._rcfg(tet.SETTINGS['top_p'], n=6, depth=3), d)
  nodes, non_first, leaf = st.tree_stats.sum(0)
  assert non_first > 0 and st.num_accepted.sum() > st.num_rounds.sum()
  proposed = np.unique(np.concatenate(d.proposed)[:, 1:])
  assert set(proposed.tolist()) <= set(tet.REDUCED) | {-1}
  tet._assert_head_cache_is_teacher_forced(st, d)


def test_sampled_tree_refusals():
  with pytest.raises(ValueError, match='tree_children'):
    eagle.EagleConfig(tree_children='sample')
  d = _sampled_drafter()
  rcfg = RolloutConfig(
    max_new_tokens=4, max_prompt_len=3, sampling=SamplingParams(1.0), tree_nodes=4,
    verify_impl='pallas',
  )  # fmt: skip
  with pytest.raises(ValueError, match="verify_impl='jnp'"):
    tree_lib.check_drafter(d, rcfg)
  greedy = dataclasses.replace(rcfg, sampling=SamplingParams(0.0))
  tree_lib.check_drafter(d, greedy)  # greedy trees are the top candidates: any verifier
  assert not tree_lib.samples_children(d, greedy)


def test_sampled_trees_with_compaction_emit_the_static_engines_tokens():
  """Every draw of a sampled tree round is keyed by (seed, sequence, position), so the
  adaptive engine's rounds, compacted mid-rollout, emit the static engine's tokens."""
  sp = tet.SETTINGS['t1']
  base = dataclasses.replace(tet._rcfg(sp, n=6, depth=3, eos=1), max_new_tokens=2 * tet.NEW)
  static = rollout_lib.RolloutEngine(
    ts.CFG, dataclasses.replace(base, num_draft=5), drafter=_sampled_drafter()
  )
  want, _ = static.generate(ts.POLICY, tet.TOKS, tet.LENS, jax.random.key(0))
  acfg = adaptive.AdaptiveConfig(policy='always', buckets=(8, 2), arms=(5,), chunk_steps=2)
  eng = adaptive.AdaptiveRolloutEngine(ts.CFG, base, acfg, drafter=_sampled_drafter())
  out, m = eng.generate(ts.POLICY, tet.TOKS, tet.LENS, jax.random.key(0))
  assert len(set(np.asarray(want.length).tolist())) > 1  # EOS at different lengths
  assert m['adaptive/compactions'] >= 1 and m['spec/accepted'] > 0
  np.testing.assert_array_equal(np.asarray(out.length), np.asarray(want.length))
  np.testing.assert_array_equal(np.asarray(out.response), np.asarray(want.response))
  assert np.asarray(out.tree_stats)[:, 1].sum() > 0  # non-first descents

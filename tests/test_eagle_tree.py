"""Eagle trees (``EagleDrafter.propose_tree``): the head's top-b candidates grown best-first
into a tree and verified by sample-and-compare.

- token equality with plain decoding (same seeds) at T = 1 and with top-p, in the static
  engine and the adaptive one (with EOS and compaction), with a trained tiny head, and
  descents into non-first children happen (``tree_stats``' non-first count); the top-p
  static case with a reduced-vocabulary head (3 of the 4 ids, not the lowest, in another
  order), whose trees only ever hold those full-vocabulary ids (every proposal recorded);
  on 8 devices: ``tests/sharded_tree_check.py``;
- after the tree rounds (partial acceptance included) the head's KV cache below ``fed``
  equals the head's KV from feeding the committed path teacher-forced;
- the builder: parents precede children, depth 1 holds the head's top b (mapped back to
  full-vocabulary ids when the head's vocabulary is reduced), its refusals.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl.decoding import steps
from specrl.decoding.state import RolloutConfig
from specrl.drafters import eagle, hooks
from specrl.sampling import SamplingParams
from tests import test_eagle as te
from tests import test_speculative as ts

CFG, POLICY = ts.CFG, ts.POLICY  # V = 4: a branch of 2 covers half the vocabulary
B, P, NEW = 8, 4, 16
TOKS = np.random.default_rng(7).integers(0, CFG.vocab_size, (B, P)).astype(np.int32)
LENS = np.array([4, 2, 3, 4, 1, 4, 3, 2], np.int32)
SETTINGS = {'t1': SamplingParams(1.0), 'top_p': SamplingParams(1.0, top_p=0.8)}
# a reduced vocabulary: not the lowest ids (a head proposing its compact indices 0..2 would
# propose id 0) and not in id order (a mapping that sorts would reorder the children)
REDUCED = (2, 1, 3)


class _Recording(eagle.EagleDrafter):
  """The eagle drafter keeping every tree it proposes (tokens [B, N]) in ``proposed``."""

  def propose_tree(self, *a, **kw):
    out = super().propose_tree(*a, **kw)
    jax.debug.callback(lambda t: self.proposed.append(np.asarray(t)), out[0])
    return out

  def propose_sampled_tree(self, *a, **kw):
    out = super().propose_sampled_tree(*a, **kw)
    jax.debug.callback(lambda t: self.proposed.append(np.asarray(t)), out[0])
    return out


def _drafter(branch=2, vocab=None):
  d = te.trained_drafter()[0]
  ecfg = dataclasses.replace(d.ecfg, tree_branch=branch, reduced_vocab=len(vocab or ()))
  ids = None if vocab is None else jnp.asarray(vocab, jnp.int32)
  rec = _Recording(CFG, ecfg, d.head_params, ids)
  rec.proposed = []
  return rec


def _rcfg(sp, n=0, depth=0, eos=-1):
  return RolloutConfig(
    max_new_tokens=NEW, max_prompt_len=P, sampling=sp, eos_id=eos, attend_bucket=0,
    tree_nodes=n, tree_depth=depth,
  )  # fmt: skip


def _run(rcfg, drafter):
  dp = drafter.params_from_policy(POLICY) if drafter is not None else None
  k = rcfg.draft_width if rcfg.tree_nodes else 0

  @jax.jit
  def go(params, dp, toks, lens):
    st = steps.prefill(
      params, toks, lens, jax.random.key(2), cfg=CFG, rcfg=rcfg, drafter=drafter, draft_params=dp
    )
    return steps.decode(params, st, k, cfg=CFG, rcfg=rcfg, drafter=drafter, draft_params=dp)[0]

  return jax.device_get(go(POLICY, dp, TOKS, LENS))


def _assert_head_cache_is_teacher_forced(st, d):
  """The head's KV below ``fed``: what feeding the committed tokens with the policy's true
  hidden states writes (no tree scratch left in a committed slot)."""
  dp = d.params_from_policy(POLICY)
  s = st.tokens.shape[1]
  pos = np.broadcast_to(np.arange(s), st.tokens.shape)
  _, _, h = model_lib.forward(
    POLICY, CFG, jnp.asarray(st.tokens), jnp.asarray(pos), return_hidden=True
  )
  x = eagle.head_input(dp, CFG, h[:, :-1], jnp.asarray(st.tokens[:, 1:]))
  cache = model_lib.init_cache(d.hcfg, B, s)
  _, cache = eagle.head_layers(dp['head']['layers'], d.hcfg, x, jnp.asarray(pos[:, :-1]), cache)
  fed = st.draft['fed']
  assert (fed > LENS + NEW // 2).all(), fed  # caught up through most of the decode
  for name in ('k', 'v'):
    for b in range(B):
      np.testing.assert_allclose(
        st.draft['cache'][name][:, b, :, : fed[b]],
        np.asarray(cache[name])[:, b, :, : fed[b]],
        atol=2e-5,
      )


@pytest.mark.parametrize(
  'name,vocab', [('t1', None), ('top_p', REDUCED)], ids=['t1', 'top_p_reduced']
)
def test_eagle_trees_emit_plain_tokens_and_keep_the_head_cache(name, vocab):
  sp = SETTINGS[name]
  plain = _run(_rcfg(sp), None)
  d = _drafter(vocab=vocab)
  st = _run(_rcfg(sp, n=6, depth=3), d)
  w = P + NEW
  np.testing.assert_array_equal(st.pos, plain.pos)
  np.testing.assert_array_equal(st.tokens[:, :w], plain.tokens[:, :w])
  np.testing.assert_allclose(st.logprobs[:, :w], plain.logprobs[:, :w], atol=1e-5)
  # (tokens equal plain decoding's whatever the trees hold: their contents are checked here)
  proposed = np.concatenate(d.proposed)[:, 1:]  # every round's non-root nodes
  assert (proposed >= 0).all()  # full trees: no empty node
  ids = np.unique(proposed).tolist()
  assert ids == sorted(vocab or range(CFG.vocab_size)), ids  # only (and all) the head's ids
  nodes, non_first, leaf = st.tree_stats.sum(0)
  rounds = st.num_rounds.sum()
  assert nodes == 5 * rounds  # a full tree every pass
  assert non_first > 0 and leaf > 0, (nodes, non_first, leaf)  # second children accepted
  assert st.num_accepted.sum() > rounds  # > 1 accepted draft per pass: the head is trained
  _assert_head_cache_is_teacher_forced(st, d)


def test_adaptive_engine_eagle_trees_with_compaction_emit_plain_tokens():
  from specrl import adaptive

  sp = SETTINGS['top_p']
  base = dataclasses.replace(_rcfg(sp, eos=1), max_new_tokens=2 * NEW)  # a long tail
  plain, _ = rollout_lib.RolloutEngine(CFG, base).generate(POLICY, TOKS, LENS, jax.random.key(0))
  rcfg = dataclasses.replace(base, tree_nodes=6, tree_depth=3)
  acfg = adaptive.AdaptiveConfig(policy='always', buckets=(8, 2), arms=(5,), chunk_steps=2)
  eng = adaptive.AdaptiveRolloutEngine(CFG, rcfg, acfg, drafter=_drafter())
  out, m = eng.generate(POLICY, TOKS, LENS, jax.random.key(0))  # one row of 32, most < 6
  assert len(set(np.asarray(plain.length).tolist())) > 1  # EOS at different lengths
  np.testing.assert_array_equal(np.asarray(out.length), np.asarray(plain.length))
  np.testing.assert_array_equal(np.asarray(out.response), np.asarray(plain.response))
  np.testing.assert_allclose(out.response_logprobs, plain.response_logprobs, atol=1e-5)
  assert m['adaptive/compactions'] >= 1 and m['spec/accepted'] > 0
  assert np.asarray(out.tree_stats)[:, 1].sum() > 0  # non-first descents


def test_tree_builder_takes_the_heads_top_candidates():
  """Depth 1 holds the head's top-b tokens at the root, best first; every parent precedes
  its children with depth = parent's + 1; the depth cap holds; seeds are not read. The same
  with the head's vocabulary reduced to ``REDUCED``: its nodes are those full-vocabulary
  ids, depth 1 the top b of its logits (``NEG_INF`` elsewhere)."""
  d, red = _drafter(branch=3), _drafter(branch=3, vocab=REDUCED)
  rcfg = _rcfg(SETTINGS['t1'], n=6, depth=2)
  dps = (d.params_from_policy(POLICY), red.params_from_policy(POLICY))

  @jax.jit
  def go(params, dps, toks, lens):
    st = steps.prefill(
      params, toks, lens, jax.random.key(2), cfg=CFG, rcfg=rcfg, drafter=d, draft_params=dps[0]
    )
    ctx = hooks.context(st)
    out = []
    for dr, dp in zip((d, red), dps, strict=True):  # the same state: the heads share params
      tree = dr.propose_tree(dp, st.draft, st.tokens, st.pos, 6, 2, None, rcfg.sampling, ctx=ctx)
      feat = dr._root(dp, st.draft, st.tokens, st.pos, 6, ctx, None)[0]
      out.append((tree[:3], eagle.head_logits(dp, CFG, feat)))
    return out

  trees = jax.device_get(go(POLICY, dps, TOKS, LENS))
  for (tree, q), ids in zip(trees, (None, REDUCED), strict=True):
    toks, par, dep = tree
    top3 = np.argsort(-q, axis=1, kind='stable')[:, :3]
    for b in range(B):
      kids = [u for u in range(1, 6) if par[b, u] == 0]
      assert toks[b, kids].tolist() == top3[b, : len(kids)].tolist() and len(kids) >= 1
      for u in range(1, 6):
        assert 0 <= par[b, u] < u and dep[b, u] == dep[b, par[b, u]] + 1 <= 2
    if ids is not None:
      assert np.isin(toks[:, 1:], ids).all(), toks  # no empty node, none outside the ids
  with pytest.raises(ValueError, match='tree_branch must be >= 1'):
    eagle.EagleConfig(tree_branch=0)


def test_profile_times_tree_proposals_for_tree_rounds():
  """With draft trees (``tree_depth`` given, as the adaptive engine passes it when
  ``rollout.tree_nodes`` is set) the step-cost profiler times the drafter's tree builder for
  arm k (a tree of k + 1 nodes), not its sampled chain."""
  from specrl.decoding import profile as profile_lib

  class TreeOnly(eagle.EagleDrafter):
    def propose(self, *a, **kw):
      raise AssertionError('the profile of tree rounds timed the chain')

  d = TreeOnly(CFG, eagle.EagleConfig(tree_branch=2), eagle.init_head(CFG, 1, jax.random.key(1)))
  prof = profile_lib.measure_profile(
    CFG, POLICY, d, d.params_from_policy(POLICY), batch=2, buffer_len=32, k_ref=3,
    sp=SETTINGS['t1'], max_prompt_len=P, reps=1, iters=1, tree_depth=2,
  )  # fmt: skip
  assert prof.prop1 > 0 and prof.prop_ref > 0 and prof.k_prop == 2


def test_a_branch_one_tree_at_greedy_is_the_heads_greedy_chain():
  """At T = 0 the sampled chain is the head's argmax chain, and a tree of branch 1 is the
  head's top-1 path: the same tokens from the same state, also with a reduced vocabulary,
  and the same head KV written (branch 1 puts depth d's node in the chain's slot
  pos + d - 1, at the same RoPE position): the docs compare the two shapes' acceptance by
  depth, so a difference between the paths must show here first."""
  sp = SamplingParams(0.0)
  seeds = jnp.zeros((B, 2), jnp.uint32)
  for vocab in (None, REDUCED):
    d = _drafter(branch=1, vocab=vocab)
    rcfg = _rcfg(sp, n=6, depth=5)
    dp = d.params_from_policy(POLICY)

    @jax.jit
    def go(params, dp, toks, lens, d=d, rcfg=rcfg):
      st = steps.prefill(
        params, toks, lens, jax.random.key(2), cfg=CFG, rcfg=rcfg, drafter=d, draft_params=dp
      )
      ctx = hooks.context(st)
      tree = d.propose_tree(dp, st.draft, st.tokens, st.pos, 6, 5, None, sp, ctx=ctx)
      chain = d.propose(dp, st.draft, st.tokens, st.pos, 5, seeds, sp, ctx=ctx)
      return tree[:2], chain[0], tree[3]['cache'], chain[2]['cache']

    (toks, par), chain, tree_kv, chain_kv = jax.device_get(go(POLICY, dp, TOKS, LENS))
    assert (par[:, 1:] == np.arange(5)[None]).all(), par  # a path: node u's parent is u - 1
    np.testing.assert_array_equal(toks[:, 1:], chain)
    for name in ('k', 'v'):
      np.testing.assert_allclose(tree_kv[name], chain_kv[name], atol=1e-6, err_msg=name)
    assert len(np.unique(chain)) > 1, chain  # not a constant proposal

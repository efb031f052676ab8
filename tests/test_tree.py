"""Draft trees (``specrl.decoding.tree``): the tree verify forward and sample-and-compare.

- the tree mask of a chain is the causal mask (same logits and cache as the chain pass);
- the Pallas tree kernel (interpret mode) equals the jnp reference on the same seeds;
- token equality: suffix trees (GRPO siblings), ngram trees and deterministic chains emit
  exactly plain decoding's tokens at T = 1, T = 0.7 + top-k and top-p, with descents into
  non-first children and bonus (leaf) tokens counted, and after the tree rounds the policy
  cache at every committed slot equals plain decoding's;
- four broken tree verifiers (``tests/broken_verifiers.py``) each break that equality;
- a chi-square test of 3-token continuations under a fixed-table tree drafter (root
  branching 3, depth 3) against the exact distribution;
- the builders' trees on hand-built corpora and the config's refusals.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import model as model_lib
from specrl.decoding import steps, tree
from specrl.decoding.state import RolloutConfig
from specrl.drafters import tree_build
from specrl.drafters.ngram import NgramDrafter
from specrl.drafters.suffix import SuffixDrafter
from specrl.kernels import verify_tree as tree_kernel
from specrl.kernels import verify_tree_reference as tree_ref
from specrl.sampling import SamplingParams
from tests import broken_verifiers, stats

P, G, NEW = 6, 4, 16
SETTINGS = {
  't1': SamplingParams(1.0),
  't07_topk': SamplingParams(0.7, top_k=5),
  'top_p': SamplingParams(1.0, top_p=0.8),
}


class _ChainOnly:
  """The suffix drafter without its tree builder: a one-hot chain drafter (k = N - 1)."""

  name, derived, one_hot, wants_context = 'suffix_chain', False, True, True

  def __init__(self, inner):
    self.inner = inner

  def __getattr__(self, a):
    if a == 'propose_tree':
      raise AttributeError(a)
    return getattr(self.inner, a)


def _batch():
  prompts = np.asarray(jax.random.randint(jax.random.key(1), (2, P), 1, 16)).repeat(G, 0)
  return prompts, np.full(2 * G, P, np.int32), np.arange(2 * G, dtype=np.int32) // G


def _run(params, cfg, rcfg, drafter):
  """prefill + dense decode to the end, jitted fresh (a mutant must be traced anew)."""
  k = rcfg.num_draft

  @jax.jit
  def go(params, toks, lens, groups):
    st = steps.prefill(
      params, toks, lens, jax.random.key(2), cfg=cfg, rcfg=rcfg, drafter=drafter,
      group_ids=groups,
    )  # fmt: skip
    return steps.decode(params, st, k, cfg=cfg, rcfg=rcfg, drafter=drafter)[0]

  return go(params, *_batch())


_PLAIN = {}


def _plain(params, cfg, name):
  if name not in _PLAIN:
    rcfg = RolloutConfig(
      max_new_tokens=NEW, max_prompt_len=P, sampling=SETTINGS[name], eos_id=-1, attend_bucket=0,
      num_draft=0, max_draft=5,
    )  # fmt: skip
    _PLAIN[name] = _run(params, cfg, rcfg, None)
  return _PLAIN[name]


def _tree_cfg(name, n=6, depth=3):
  return RolloutConfig(
    max_new_tokens=NEW, max_prompt_len=P, sampling=SETTINGS[name], eos_id=-1, attend_bucket=0,
    num_draft=n - 1, tree_nodes=n, tree_depth=depth,
  )  # fmt: skip


def _assert_equal_to_plain(plain, st):
  w = P + NEW  # committed positions (the buffers' scratch widths differ)
  np.testing.assert_array_equal(np.asarray(st.pos), np.asarray(plain.pos))
  np.testing.assert_array_equal(np.asarray(st.tokens)[:, :w], np.asarray(plain.tokens)[:, :w])
  np.testing.assert_allclose(
    np.asarray(st.logprobs)[:, :w], np.asarray(plain.logprobs)[:, :w], atol=1e-5
  )


def _assert_cache_equal(plain, st):
  pos = np.asarray(plain.pos)
  for name in ('k', 'v'):
    a, b = np.asarray(st.cache[name]), np.asarray(plain.cache[name])
    for r, p in enumerate(pos):  # every committed slot (< pos: the last token is not fed)
      np.testing.assert_allclose(a[:, r, :, :p], b[:, r, :, :p], atol=2e-5, rtol=1e-5)


def test_chain_tree_mask_is_the_causal_pass(tiny_cfg, tiny_params):
  b, k, s = 3, 4, 24
  toks = jax.random.randint(jax.random.key(3), (b, k + 1), 0, tiny_cfg.vocab_size)
  pos = jnp.asarray([5, 9, 13], jnp.int32)
  cache = model_lib.init_cache(tiny_cfg, b, s)
  cache = jax.tree.map(lambda c: c + jax.random.normal(jax.random.key(4), c.shape), cache)
  positions = pos[:, None] + jnp.arange(k + 1)[None, :]
  chain = tree.chain_tree(toks[:, 0], toks[:, 1:])
  fwd = jax.jit(model_lib.forward, static_argnums=1)
  lg_a, ca = fwd(tiny_params, tiny_cfg, toks, positions, cache)
  lg_b, cb = fwd(
    tiny_params, tiny_cfg, toks, positions, cache, tree_anc=tree.ancestors(chain.parents)
  )
  np.testing.assert_allclose(lg_a, lg_b, atol=1e-6)
  np.testing.assert_allclose(ca['k'], cb['k'], atol=1e-6)


@pytest.mark.parametrize('sp', [SETTINGS['t07_topk'], SamplingParams(0.0)], ids=str)
def test_tree_kernel_equals_reference(sp):
  rng = np.random.default_rng(0)
  b, n, v = 2, 7, 64
  logits = jnp.asarray(rng.normal(size=(b, n, v)) * 2, jnp.float32)
  parents = jnp.asarray(np.tile([-1, 0, 0, 0, 1, 1, 4], (b, 1)), jnp.int32)
  seeds = jnp.asarray(rng.integers(0, 2**31, size=(b, n)), jnp.int32)
  y = tree_ref.sample_nodes(logits, seeds, sp)
  toks = jnp.asarray(rng.integers(0, v, size=(b, n)), jnp.int32)
  toks = toks.at[:, 1].set(y[:, 0]).at[:, 5].set(y[:, 1])  # descend 0 -> 1 -> 5 (not first)
  ref = tree_ref.verify_tree_reference(logits, toks, parents, seeds, sp)
  ker = tree_kernel.verify_tree_pallas(logits, toks, parents, seeds, sp, interpret=True)
  for f in ('num_accepted', 'tokens', 'path', 'non_first', 'leaf'):
    np.testing.assert_array_equal(getattr(ref, f), getattr(ker, f), err_msg=f)
  np.testing.assert_allclose(ref.logprobs, ker.logprobs, atol=1e-5)
  assert (np.asarray(ref.num_accepted) >= 2).all() and (np.asarray(ref.non_first) == 1).all()


@pytest.mark.parametrize('name', list(SETTINGS))
def test_suffix_trees_emit_plain_decoding_tokens_and_cache(tiny_cfg, tiny_params, name):
  plain = _plain(tiny_params, tiny_cfg, name)
  st = _run(tiny_params, tiny_cfg, _tree_cfg(name), SuffixDrafter(16, n_min=1, n_max=4))
  _assert_equal_to_plain(plain, st)
  _assert_cache_equal(plain, st)
  nodes, non_first, leaf = np.asarray(st.tree_stats).sum(0)
  accepted = int(np.asarray(st.num_accepted).sum())
  assert non_first > 0 and leaf > 0 and accepted > 0, (nodes, non_first, leaf, accepted)
  assert nodes > np.asarray(st.num_rounds).sum()  # more than one node per pass on average


def test_ngram_trees_and_deterministic_chains_emit_plain_tokens(tiny_cfg, tiny_params):
  plain = _plain(tiny_params, tiny_cfg, 't1')
  st = _run(tiny_params, tiny_cfg, _tree_cfg('t1'), NgramDrafter(16, 1))
  _assert_equal_to_plain(plain, st)
  assert np.asarray(st.tree_stats)[:, 1].sum() > 0  # non-first descents
  chain = _ChainOnly(SuffixDrafter(16, n_min=1, n_max=4))
  st = _run(tiny_params, tiny_cfg, _tree_cfg('t1', n=4, depth=0), chain)
  _assert_equal_to_plain(plain, st)
  _assert_cache_equal(plain, st)
  assert np.asarray(st.num_accepted).sum() > 0
  assert np.asarray(st.tree_stats)[:, 1].sum() == 0  # a chain has no second child


@pytest.mark.parametrize('mutant', list(broken_verifiers.TREE_MUTANTS))
def test_broken_tree_verifiers_are_caught(tiny_cfg, tiny_params, monkeypatch, mutant):
  plain = _plain(tiny_params, tiny_cfg, 't1')
  broken_verifiers.install_tree(mutant, monkeypatch)
  st = _run(tiny_params, tiny_cfg, _tree_cfg('t1'), SuffixDrafter(16, n_min=1, n_max=4))
  same = np.array_equal(np.asarray(st.tokens)[:, : P + NEW], np.asarray(plain.tokens)[:, : P + NEW])
  assert not same, f'{mutant} emitted plain decoding tokens: the test cannot see it'


class _TableTree:
  """A fixed tree per current token (a deterministic drafter): root -> 3 children, each
  with a chain of 2 below (N = 10, depth 3)."""

  name, derived, one_hot = 'table_tree', False, True

  def __init__(self, table):
    self.table = jnp.asarray(table, jnp.int32)  # [V, 9]: the non-root nodes' tokens

  def params_from_policy(self, p):
    return None

  def state_logical_axes(self):
    return None

  def prefill(self, *a, **kw):
    return None

  def propose_tree(self, dp, state, seq_tokens, pos, n_nodes, depth_cap, seeds, sp, mesh=None):
    cur = jnp.take_along_axis(seq_tokens, pos[:, None], axis=1)[:, 0]
    b = cur.shape[0]
    toks = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), self.table[cur]], axis=1)
    par = jnp.asarray([-1, 0, 0, 0, 1, 2, 3, 4, 5, 6], jnp.int32)
    dep = jnp.asarray([0, 1, 1, 1, 2, 2, 2, 3, 3, 3], jnp.int32)
    return toks, jnp.broadcast_to(par, (b, 10)), jnp.broadcast_to(dep, (b, 10)), state


def test_tree_continuations_match_the_exact_distribution(tiny_cfg, tiny_params):
  sp = SamplingParams(1.0)
  prompt = [3, 1, 4, 1, 5]
  conts, probs = stats.exact_joint(tiny_params, tiny_cfg, prompt, 3, sp)
  v = tiny_cfg.vocab_size
  joint = probs.reshape(v, v, v)
  table = np.zeros((v, 9), np.int32)
  for r in range(v):  # children: the 3 likeliest second tokens; below each its likeliest
    kids = np.argsort(-joint[r].sum(1))[:3]
    table[r, :3] = kids
    table[r, 3:6] = [np.argmax(joint[r, c]) for c in kids]
    table[r, 6:9] = (table[r, 3:6] + 1) % v  # depth 3 (cut by max_new_tokens)
  n_rows = 3000
  rcfg = RolloutConfig(
    max_new_tokens=3, max_prompt_len=len(prompt), sampling=sp, eos_id=-1, attend_bucket=0,
    num_draft=9, tree_nodes=10,
  )  # fmt: skip
  d = _TableTree(table)

  @jax.jit
  def go(params):
    toks = jnp.tile(jnp.asarray(prompt, jnp.int32), (n_rows, 1))
    lens = jnp.full((n_rows,), len(prompt), jnp.int32)
    st = steps.prefill(params, toks, lens, jax.random.key(5), cfg=tiny_cfg, rcfg=rcfg, drafter=d)
    return steps.decode(params, st, 9, cfg=tiny_cfg, rcfg=rcfg, drafter=d)[0]

  st = go(tiny_params)
  samples = np.asarray(st.tokens)[:, len(prompt) : len(prompt) + 3]
  n_acc = np.asarray(st.num_accepted)
  assert (n_acc >= 1).mean() > 0.2 and np.asarray(st.tree_stats)[:, 1].sum() > 100
  assert stats.chi2_pvalue(samples, conts, probs) > 1e-3


def test_builders_expand_best_first_by_frequency():
  cont = jnp.asarray([[[3, 4, 5], [3, 4, 6], [3, 7, -1], [-1, -1, -1], [8, 9, 1]]], jnp.int32)
  build = jax.jit(tree_build.continuation_tree, static_argnums=1)
  toks, par, dep = (np.asarray(a)[0] for a in build(cont, 7))
  # "3" (3 occurrences), "3 4" (2), then the count-1 prefixes shallower first, ties by
  # occurrence: "8", "3 7", "8 9", "3 4 5"
  assert toks[1:].tolist() == [3, 4, 8, 7, 9, 5]
  assert par[1:].tolist() == [0, 1, 0, 1, 3, 2] and dep[1:].tolist() == [1, 2, 1, 2, 2, 3]
  # weighted (the suffix drafter's longest-match occurrences first): "3 4" x64 beats "5" x2
  cont = jnp.asarray([[[3, 4], [5, 6], [5, 7]]], jnp.int32)
  weight = jnp.asarray([[64, 1, 1]], jnp.int32)
  wbuild = jax.jit(tree_build.continuation_tree, static_argnums=1)
  toks, par, _ = (np.asarray(a)[0] for a in wbuild(cont, 6, weight))
  assert toks[1:].tolist() == [3, 4, 5, 6, 7] and par[1:].tolist() == [0, 1, 0, 3, 3]
  seq = jnp.asarray([[1, 2, 3, 1, 2, 4, 1, 2, 3, 5, 1, 2, 0, 0]], jnp.int32)
  ngram = NgramDrafter(16, 2)
  propose = jax.jit(lambda s, p: ngram.propose_tree(None, None, s, p, 6, 2, None, None)[:3])
  t, p, d = propose(seq, jnp.asarray([11]))
  t, p, d = np.asarray(t)[0], np.asarray(p)[0], np.asarray(d)[0]
  assert t[1] == 3 and t[2] == 4 and p[1] == p[2] == 0  # after "1 2": 3 (x2), 4 (x1)
  assert d.max() <= 2  # the depth cap


def test_tree_config_refusals():
  with pytest.raises(ValueError, match='tree_nodes must be 0'):
    RolloutConfig(tree_nodes=1)
  with pytest.raises(ValueError, match='tree_depth must be in'):
    RolloutConfig(tree_nodes=4, tree_depth=4)
  with pytest.raises(ValueError, match='conflicts with rollout.tree_nodes'):
    RolloutConfig(tree_nodes=4, num_draft=2)
  assert dataclasses.replace(RolloutConfig(), tree_nodes=8).draft_width == 7
  from configs import default
  from specrl import run_config

  c = default.get_config('smoke')
  c.rollout.tree_nodes = 8
  with pytest.raises(ValueError, match='tree_nodes=8 needs a drafter'):
    run_config.resolve_num_draft(c, has_drafter=False)
  assert run_config.resolve_num_draft(c, has_drafter=True) == 7  # the static engine's k
  c.rollout.num_draft = 4
  with pytest.raises(ValueError, match='conflicts with config.rollout.tree_nodes'):
    run_config.resolve_num_draft(c, has_drafter=True)
  with pytest.raises(ValueError, match='needs a deterministic'):
    tree.check_drafter(type('Sampled', (), {'name': 'quantized'})(), RolloutConfig(tree_nodes=4))


def test_adaptive_engine_trees_with_compaction_emit_plain_tokens(tiny_cfg, tiny_params):
  """Tree rounds in the adaptive engine, TLT exploring (epsilon = 1) two tree arms: arm 5
  under ``rollout.tree_nodes`` (the tree ``3_0_6``: depth cap 3, no branch cap) and the
  explicit, branch-capped ``3_2_6``; EOS ends rows at different lengths and the batch is
  compacted 8 -> 2: still plain decoding's tokens, both arms ran, each has its measured
  tokens per pass in the engine's memory."""
  from specrl import adaptive
  from specrl import rollout as rollout_lib

  sp = SETTINGS['t07_topk']
  base = RolloutConfig(max_new_tokens=NEW, max_prompt_len=P, sampling=sp, eos_id=3, attend_bucket=0)
  toks, lens, groups = _batch()
  plain, _ = rollout_lib.RolloutEngine(tiny_cfg, base).generate(
    tiny_params, toks, lens, jax.random.key(2), group_ids=groups
  )
  rcfg = dataclasses.replace(base, tree_nodes=6, tree_depth=3)
  acfg = adaptive.AdaptiveConfig(
    policy='tlt', buckets=(8, 2), arms=(5, '3_2_6'), chunk_steps=2, tlt_threshold=8,
    tlt_patience=0, tlt_epsilon=1.0, seed=3,
  )  # fmt: skip
  eng = adaptive.AdaptiveRolloutEngine(tiny_cfg, rcfg, acfg, drafter=SuffixDrafter(16, 1, 4))
  arms = eng.acfg.arms  # the chain arm 5 became a tree
  assert [adaptive.strategy_name(s) for s in arms] == ['tree3_0_6', 'tree3_2_6']
  rc = eng._step_rcfg(arms[1])
  assert (rc.tree_nodes, rc.tree_depth, rc.tree_branch) == (6, 3, 2)
  out, m = eng.generate(tiny_params, toks, lens, jax.random.key(2), group_ids=groups)
  np.testing.assert_array_equal(np.asarray(out.length), np.asarray(plain.length))
  assert len(set(np.asarray(plain.length).tolist())) > 1  # EOS at different lengths
  np.testing.assert_array_equal(np.asarray(out.response), np.asarray(plain.response))
  np.testing.assert_allclose(out.response_logprobs, plain.response_logprobs, atol=1e-5)
  assert m['adaptive/compactions'] >= 1 and m['spec/accepted'] > 0
  assert m['spec/tree/nodes_per_pass'] > 1 and 'spec/tree/depth/0' in m
  assert np.asarray(out.tree_stats)[:, 1].sum() > 0  # non-first descents, kept by compaction
  ran = {k.split('/')[1] for k in eng.last_report.phases}
  assert {'tree3_0_6', 'tree3_2_6'} <= ran, ran
  assert {s for _, s in eng.memory.passes} == set(arms)


def test_trees_on_eight_devices_emit_plain_tokens():
  """Tree rounds on a (2, 2, 2) mesh of 8 fake devices vs plain decoding on one device
  (tests/sharded_tree_check.py, a subprocess): suffix trees in the adaptive engine
  (compaction), eagle trees from a trained head in the static engine, the head's KV cache
  teacher-forced below ``fed`` and sharded over the batch and its kv heads; sampled eagle
  trees: the 1-device run's tokens on 8 devices."""
  import json
  import os
  import subprocess
  import sys

  here = os.path.dirname(os.path.abspath(__file__))
  r = subprocess.run(
    [sys.executable, os.path.join(here, 'sharded_tree_check.py')],
    capture_output=True, text=True, timeout=600, check=False,
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  for name in ('adaptive', 'eagle'):
    assert res[name]['equal'] and res[name]['lp_diff'] < 1e-5, res
    assert res[name]['accepted'] > 0 and res[name]['non_first'] > 0, res  # second children
    assert res[name]['leaf'] > 0, res  # bonus tokens
  assert res['adaptive']['compactions'] >= 1, res
  e = res['eagle']
  assert e['accepted'] > e['rounds'], e  # > 1 accepted draft per pass: the head is trained
  assert e['nodes'] == 5 * e['rounds'], e  # a full tree every pass
  # head KV below fed teacher-forced in every row, fed caught up to the last tree round's
  # root (pos - fed <= depth cap + 1)
  assert e['head_kv_diff'] < 2e-5 and e['unfed'] <= 4, e
  # head KV cache [L, B, K, S, Dh]: the batch over data x fsdp, its 2 kv heads over tensor;
  # hidden history [B, S, D]: the batch over data x fsdp
  batch = ['data', 'fsdp']
  assert e['layouts'] == [[None, batch, 'tensor', None, None], [batch, None, None]], e
  smp = res['sampled']  # sampled eagle trees: 8 devices = 1 device, token for token
  assert smp['equal'] and smp['differs_from_plain'], smp
  assert smp['accepted'] > 0 and smp['non_first'] > 0, smp


def test_builders_cap_children_per_node():
  """``branch`` keeps the most frequent children of every node; the nodes a capped subtree
  would have taken go to the next allowed prefixes (never to a capped node's children)."""
  cont = jnp.asarray(
    [[[5, 6, 7], [5, 6, 8], [5, 9, 1], [2, 3, 4], [2, 3, 4], [4, 1, 1], [5, 6, 7]]], jnp.int32
  )
  build = jax.jit(tree_build.continuation_tree, static_argnums=(1, 3))
  toks, par, _ = (np.asarray(a)[0] for a in build(cont, 8, None, None))
  assert toks[1:].tolist() == [5, 6, 2, 3, 7, 4, 4]  # uncapped: "4" at the root too
  toks, par, dep = (np.asarray(a)[0] for a in build(cont, 8, None, 2))
  # root: 5 (x4), 2 (x2) -- "4" (x1) capped; under "5": 6, 9; the last node is "5 9", not
  # "5 6 8" (deeper at the same count) nor anything under the capped "4"
  assert toks[1:].tolist() == [5, 6, 2, 3, 7, 4, 9]
  assert par[1:].tolist() == [0, 1, 0, 3, 2, 4, 1]
  for node in range(1, 8):  # at most 2 children per node
    assert (par[1:] == node).sum() <= 2 and (par[1:] == 0).sum() <= 2
  toks, par, _ = (np.asarray(a)[0] for a in build(cont, 8, None, 1))
  assert toks[1:4].tolist() == [5, 6, 7] and (toks[4:] == -1).all()  # a single chain


def test_tree_arms_in_tlt_notation_and_their_pricing():
  """Adaptive arms: 'depth_branch_nodes' strings beside chain lengths, stable ids, refusals,
  and the cost model pricing a tree arm by its own measured tokens per pass."""
  from specrl import adaptive
  from specrl.adaptive import policies
  from specrl.adaptive.config import TreeArm, drafts, tree_arm

  acfg = adaptive.AdaptiveConfig(arms=(3, '4_2_8', '8_4_48'))
  t = tree_arm(acfg.arms[1])
  assert t == TreeArm(depth=4, branch=2, nodes=8) and drafts(acfg.arms[1]) == 7
  assert tree_arm(3) is None and drafts(3) == 3
  assert acfg.k_max == 47 and acfg.always_arm == acfg.arms[2]
  assert policies.strategy_name(acfg.arms[1]) == 'tree4_2_8'
  assert adaptive.AdaptiveConfig(arms=acfg.arms).arms == acfg.arms  # ids parse back
  for bad, msg in [
    (('4_2',), 'depth_branch_nodes'),
    (('9_2_8',), 'depth <= nodes - 1'),
    ((0,), 'draft length >= 1'),
    ((3, 3), 'distinct'),
  ]:
    with pytest.raises(ValueError, match=msg):
      adaptive.AdaptiveConfig(arms=bad)
  with pytest.raises(ValueError, match='roofline policy must be chains'):
    adaptive.AdaptiveConfig(policy='roofline', arms=(2, '2_2_4'))
  # pricing: chain k = 3 and tree 4_2_8 at equal measured cost; acceptance 0.3
  tree_id, mem = acfg.arms[1], policies.Memory(alpha=0.3)
  obs = policies.ChunkObs(
    bucket=4, strategy=tree_id, steps=10, seconds=1.0, tokens=120, rounds=40, accepted=80,
    active_start=4, active_end=4,
  )  # fmt: skip
  assert obs.alpha is None and obs.tokens_per_pass == 3.0  # no chain formula for a tree
  mem = policies.memory_observe(mem, obs, None, acfg)
  assert mem.passes[(4, tree_id)] == (3.0, 40.0) and mem.alpha == 0.3
  tpp = policies.arm_tokens_per_pass(mem, 4, tree_id, 0.3, optimism=0.0)
  assert tpp == 3.0  # measured
  prior = policies.arm_tokens_per_pass(policies.Memory(alpha=0.3), 4, tree_id, 0.3, 0.0)
  assert policies.tree_tokens_prior(0.3, TreeArm(7, 1, 8)) == pytest.approx(
    policies.expected_tokens(0.3, 7)
  )  # a chain-shaped tree is priced as the chain
  assert 1.0 < prior < 5.0
  costs = {0: 1.0, 3: 1.5, tree_id: 1.5}
  s, rates = policies.cost_model_choose(costs, 0.3, None, 0.1, {tree_id: tpp})
  assert s == tree_id and rates[tree_id] == pytest.approx(2.0)
  back = policies.memory_from_json(policies.memory_to_json(mem))
  assert back.passes == mem.passes


def test_hybrid_trees_emit_plain_tokens_with_unmatched_rows(tiny_cfg, tiny_params):
  """The hybrid (suffix + int8 fallback) under trees, static engine, the Pallas tree kernel
  (interpret mode) and length buckets with KV growth: matched rows verify the suffix part's
  branch-capped trees, unmatched rows an empty tree (a plain-step sample, never the
  fallback's sampled drafts); the output is the dense plain run's tokens."""
  from configs import default
  from specrl import drafters
  from specrl import rollout as rollout_lib

  c = default.get_config('smoke')
  c.rollout.drafter = 'suffix'
  c.drafter.suffix.update(fallback='quantized', n_min=2, n_max=4)
  hybrid = drafters.make_drafter(c, tiny_cfg)
  assert hasattr(hybrid, 'fallback') and hasattr(hybrid, 'propose_tree')
  sp = SETTINGS['top_p']
  base = RolloutConfig(
    max_new_tokens=NEW, max_prompt_len=P, sampling=sp, eos_id=-1, attend_bucket=0
  )
  toks, lens, groups = _batch()
  plain, _ = rollout_lib.RolloutEngine(tiny_cfg, base).generate(
    tiny_params, toks, lens, jax.random.key(2), group_ids=groups
  )
  rcfg = dataclasses.replace(
    base, num_draft=5, tree_nodes=6, tree_depth=3, tree_branch=2, verify_impl='pallas',
    attend_bucket=8,  # length buckets 8 / 16 / 32 with a growing cache vs the dense plain run
  )  # fmt: skip
  eng = rollout_lib.RolloutEngine(tiny_cfg, rcfg, drafter=hybrid)
  out, m = eng.generate(tiny_params, toks, lens, jax.random.key(2), group_ids=groups)
  np.testing.assert_array_equal(np.asarray(out.response), np.asarray(plain.response))
  np.testing.assert_allclose(out.response_logprobs, plain.response_logprobs, atol=1e-5)
  nodes, non_first, _ = np.asarray(out.tree_stats).sum(0)
  assert non_first > 0 and m['spec/accepted'] > 0
  assert len(set(eng.last_kv_slots)) > 1  # the cache grew between length buckets
  # some passes proposed nothing (no match of n_min = 2 yet): fewer nodes than 5 per pass
  assert nodes < 5 * np.asarray(out.num_rounds).sum()

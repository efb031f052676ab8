"""The group-sibling suffix drafter (``specrl.drafters.suffix``).

Matching on hand-built token arrays (longest match, frequency, recency, group isolation,
history by prompt id, no match -> not drafted, a sibling compacted away stays visible), the
history store's bounds and host-state round trip, and end-to-end: lossless speculative
rollouts drafted from siblings (and history) by chi-square, with a broken token-only
verifier rejected by the same test; greedy equals plain greedy in the static and the
adaptive engine (with compaction), whose shared state then holds every row's full text.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from specrl import adaptive, checkpointing, drafters
from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl.drafters import hooks
from specrl.drafters.suffix import SuffixDrafter
from specrl.sampling import SamplingParams
from tests import broken_verifiers, stats

VOCAB = 32
S = 16


def _ctx_and_tokens(drafter, texts, groups, batch_rows=None, prompt_ids=None):
  """Shared state after observing ``texts`` (lists of ids, one per original row) and the
  context of a batch made of ``batch_rows`` of them (default all: no compaction)."""
  r = len(texts)
  toks = np.zeros((r, S), np.int32)
  for i, t in enumerate(texts):
    toks[i, : len(t)] = t
  pos = np.array([len(t) - 1 for t in texts], np.int32)
  groups = np.asarray(groups, np.int32)
  sid = np.arange(r, dtype=np.int32)
  pids = np.full(r, -1, np.int32) if prompt_ids is None else np.asarray(prompt_ids, np.int32)
  shared = drafter.init_shared(r, S)
  shared = drafter.observe(None, shared, jnp.asarray(toks), pos * 0, pos, sid, groups, pids)
  rows = np.arange(r) if batch_rows is None else np.asarray(batch_rows)
  ctx = hooks.DraftContext(
    seq_id=jnp.asarray(sid[rows]),
    group_ids=jnp.asarray(groups[rows]),
    prompt_ids=jnp.asarray(pids[rows]),
    shared=shared,
    hidden=None,
    hidden_from=None,
  )
  return ctx, jnp.asarray(toks[rows]), jnp.asarray(pos[rows])


def _propose(drafter, texts, groups, k=3, dp=None, **kw):
  ctx, toks, pos = _ctx_and_tokens(drafter, texts, groups, **kw)
  draft, logits, _, _ = drafter.propose(dp, None, toks, pos, k, None, None, ctx=ctx)
  assert logits is None  # one-hot: token-only verification
  return np.asarray(draft)


def test_match_only_in_a_sibling_and_never_from_another_group():
  d = SuffixDrafter(VOCAB, n_min=2, n_max=4)
  texts = [[5, 6, 7], [1, 5, 6, 7, 8, 9, 10], [5, 6, 7, 20, 21, 22, 23]]
  # row 0's siblings: row 1 (group 0); row 2 (group 1) also continues 5 6 7 -- never used
  out = _propose(d, texts, [0, 0, 1])
  np.testing.assert_array_equal(out[0], [8, 9, 10])
  # alone in its group, row 2 only has its own text: no earlier 6 7 / 22 23 occurrence
  np.testing.assert_array_equal(out[2], [-1, -1, -1])


def test_longest_match_wins_then_frequency_then_recency():
  d = SuffixDrafter(VOCAB, n_min=1, n_max=4)
  # query ends "3 4": the 3-token match "2 3 4 -> 11" beats the frequent 2-token "3 4 -> 12"
  texts = [[2, 3, 4], [2, 3, 4, 11], [9, 3, 4, 12], [8, 3, 4, 12]]
  np.testing.assert_array_equal(_propose(d, texts, [0] * 4, k=1)[0], [11])
  # equal match lengths: the most frequent next token (12 twice, 11 once)
  texts = [[7, 3, 4], [2, 3, 4, 11], [9, 3, 4, 12], [8, 3, 4, 12]]
  np.testing.assert_array_equal(_propose(d, texts, [0] * 4, k=1)[0], [12])
  # a tie in frequency: the most recent occurrence (later position) wins
  texts = [[7, 3, 4], [3, 4, 11], [1, 1, 3, 4, 13]]
  np.testing.assert_array_equal(_propose(d, texts, [0] * 3, k=1)[0], [13])


def test_no_match_is_not_drafted_and_extension_stops_where_the_match_ends():
  d = SuffixDrafter(VOCAB, n_min=2, n_max=3)
  texts = [[1, 2, 3], [2, 3, 9], [4, 5, 6]]
  out = _propose(d, texts, [0, 0, 0], k=3)
  np.testing.assert_array_equal(out[0], [9, -1, -1])  # "3 9" occurs nowhere after that
  np.testing.assert_array_equal(out[2], [-1, -1, -1])  # "5 6": no n_min match


def test_a_row_beyond_max_group_still_sees_its_own_text():
  # G = 24 rows in one group, max_group = 16: rows 16..23 are not among the first 16
  d = SuffixDrafter(VOCAB, n_min=2, n_max=4, max_group=16)
  own = [5, 6, 7, 8, 5, 6]  # its own earlier "5 6" continues with 7 8
  texts = [[1, 2]] * 16 + [[3, 4]] * 7 + [own]
  out = _propose(d, texts, [0] * 24, k=2)
  np.testing.assert_array_equal(out[23], [7, 8])
  np.testing.assert_array_equal(out[0], [-1, -1])  # rows inside the first 16 unchanged
  # the same row with the group small enough: identical proposal
  np.testing.assert_array_equal(_propose(d, [own], [0], k=2)[0], [7, 8])


def test_a_finished_compacted_away_sibling_stays_visible():
  d = SuffixDrafter(VOCAB, n_min=2, n_max=4)
  texts = [[5, 6, 7], [1, 5, 6, 7, 8, 9, 10], [3, 3]]
  # compacted batch: row 0 and a padding row (seq_id = B_orig); row 1 has left the batch
  ctx, toks, pos = _ctx_and_tokens(d, texts, [0, 0, 1], batch_rows=[0, 0])
  ctx = ctx.replace(seq_id=jnp.array([0, 3], jnp.int32))
  draft, _, _, _ = d.propose(None, None, toks, pos, 3, None, None, ctx=ctx)
  np.testing.assert_array_equal(np.asarray(draft)[0], [8, 9, 10])


def test_history_by_prompt_id():
  d = SuffixDrafter(VOCAB, n_min=2, n_max=4, history=2, history_prompts=2)
  d.record([70, 70, 11], np.array([[5, 6, 7, 8], [1, 1, 1, 1], [5, 6, 7, 9]]), [4, 2, 4])
  d.record([70], np.array([[5, 6, 7, 30]]), [4])  # newest answer to 70; keeps the last 2
  assert [len(v) for v in d.store.answers.values()] == [1, 2]
  dp = d.history_params([70, 11, 99], width=6)
  assert dp['tokens'].shape == (3, 2, 6)
  texts = [[4, 6, 7], [4, 6, 7], [4, 6, 7]]
  out = _propose(d, texts, [0, 1, 2], k=1, dp=dp)
  np.testing.assert_array_equal(out[:, 0], [30, 9, -1])  # newest first; unknown prompt: none
  d.record([12], np.array([[1, 2]]), [2])  # a third prompt id evicts the oldest (11)
  assert sorted(d.store.answers) == [12, 70]
  assert d.memory_bytes() == 4 * (4 + 2 + 2)


def test_history_width_follows_the_longest_answer_not_the_budget():
  """A 32k budget with 20-token answers: the arrays are 32 wide (the power of two above
  the longest answer of the rows asked for), never wider than the budget, at least 16."""
  d = SuffixDrafter(VOCAB, history=2)
  d.record([1, 2], np.arange(2 * 40).reshape(2, 40) % VOCAB, [20, 40])
  assert d.history_params([1], width=32768)['tokens'].shape == (1, 2, 32)
  assert d.history_params([1, 2], width=32768)['tokens'].shape == (2, 2, 64)
  assert d.history_params([2], width=24)['tokens'].shape == (1, 2, 24)
  assert d.history_params([7], width=32768)['tokens'].shape == (1, 2, 16)


def test_host_state_round_trip():
  d = SuffixDrafter(VOCAB, history=3)
  d.record([4, 4, 9], np.arange(12).reshape(3, 4), [4, 3, 1])
  arrays = {}  # as a checkpoint stores it: JSON with the answers as array references
  saved = json.loads(json.dumps(checkpointing._to_json(d.host_state(), arrays)))
  assert arrays and all(a.dtype == np.int32 for a in arrays.values())
  saved = checkpointing._from_json(saved, arrays)
  e = SuffixDrafter(VOCAB, history=3)
  e.load_host_state(saved)
  a, b = d.history_params([4, 9], 5), e.history_params([4, 9], 5)
  for key in ('tokens', 'len'):
    np.testing.assert_array_equal(a[key], b[key])
  assert e.memory_bytes() == d.memory_bytes() > 0


def test_config_builds_the_drafter_and_refuses_bad_values():
  c = default.get_config('smoke')
  c.rollout.drafter = 'suffix'
  c.drafter.suffix.update(n_min=1, n_max=5, history=2)
  cfg = model_lib.ModelConfig(vocab_size=VOCAB)
  d = drafters.make_drafter(c, cfg)
  assert (d.name, d.n_min, d.n_max, d.history, d.one_hot) == ('suffix', 1, 5, 2, True)
  c.drafter.suffix.n_min = 9
  with pytest.raises(ValueError, match='n_min <= n_max'):
    drafters.make_drafter(c, cfg)


# ----------------------------------------------------------------------------- end to end

V = 4
CFG = model_lib.ModelConfig(
  vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
)
POLICY = model_lib.init_params(CFG, jax.random.key(0))
PROMPT = [1, 3, 2]
K, M = 2, 5
N_SAMPLES, G = 6000, 8
PASS_P, FAIL_P = 1e-3, 1e-6


def _suffix_pvalue(sp, history: bool, seed=0, verify_impl='jnp', n=N_SAMPLES):
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=2 * K + 3, max_prompt_len=3, eos_id=-1, sampling=sp, num_draft=K,
    verify_impl=verify_impl,
  )  # fmt: skip
  d = SuffixDrafter(V, n_min=1, n_max=3, history=2 if history else 0)
  eng = rollout_lib.RolloutEngine(CFG, rcfg, drafter=d)
  toks = np.tile(np.asarray(PROMPT, np.int32), (n, 1))
  lens = np.full((n,), 3, np.int32)
  groups = np.arange(n, dtype=np.int32) // G
  pids = groups % 50  # 50 prompt ids, each with G answers from an earlier step
  dp = None
  if history:
    earlier = np.random.default_rng(seed + 1).integers(0, V, size=(n, 2 * K + 3))
    d.record(pids, earlier, np.full(n, 2 * K + 3))
    dp = d.history_params(pids, 2 * K + 3)
  out, _ = eng.generate(POLICY, toks, lens, jax.random.key(seed), dp, groups, pids)
  out = jax.device_get(out)
  conts, probs = stats.exact_joint(POLICY, CFG, PROMPT, M, sp)
  alpha = out.num_accepted.sum() / max(out.num_drafted.sum(), 1)
  return stats.chi2_pvalue(out.response[:, :M], conts, probs), out, alpha


SETTINGS = {
  'T1-topp0.9': SamplingParams(1.0, top_p=0.9),
  'T0.7-topk3': SamplingParams(0.7, top_k=3),
}


@pytest.mark.parametrize('history', [False, True], ids=['siblings', 'siblings+history'])
@pytest.mark.parametrize('setting', list(SETTINGS))
def test_suffix_drafter_is_lossless(setting, history):
  p, out, alpha = _suffix_pvalue(SETTINGS[setting], history, seed=3)
  drafted = out.num_drafted / np.maximum(out.num_rounds, 1)
  assert 0.2 < alpha < 0.95, f'alpha {alpha}: accepts and rejects both needed'
  if not history:  # (with history nearly every row finds a match)
    assert (drafted < K).mean() > 0.05, 'rows with fewer than k drafts were never seen'
  assert p > PASS_P, f'suffix-drafted samples do not follow the policy (p={p:.2e})'


def test_suffix_drafter_is_lossless_with_the_pallas_token_kernel():
  p, _, _ = _suffix_pvalue(SETTINGS['T0.7-topk3'], False, seed=4, verify_impl='pallas', n=800)
  assert p > PASS_P, f'p={p:.2e}'


def test_a_broken_token_only_verifier_is_caught(monkeypatch):
  broken_verifiers.install('onehot_keeps_draft', monkeypatch, K)
  p, _, _ = _suffix_pvalue(SETTINGS['T1-topp0.9'], False, seed=3)
  assert p < FAIL_P, f'the broken verifier was not caught (p={p:.2e})'


RAGGED = rollout_lib.RolloutConfig(max_new_tokens=18, max_prompt_len=17, cache_len=20, eos_id=-1)


def _ragged_prompts():
  lengths = np.array([8, 3, 18, 5, 9, 4, 7, 6])  # rows reach the cache end out of order
  plen = (20 - lengths).astype(np.int32)
  base = np.tile(np.arange(17) % 3 + 1, (8, 1))  # repetitive: siblings match often (ids < V)
  return np.where(np.arange(17)[None] < plen[:, None], base, 0).astype(np.int32), plen


@pytest.mark.parametrize('engine', ['static', 'adaptive'])
def test_greedy_equals_plain_greedy_and_finished_siblings_stay_in_the_corpus(engine):
  toks, plen = _ragged_prompts()
  groups = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int32)
  sp = SamplingParams(0.0)
  plain_cfg = dataclasses.replace(RAGGED, sampling=sp)
  plain, _ = rollout_lib.RolloutEngine(CFG, plain_cfg).generate(
    POLICY, toks, plen, jax.random.key(1)
  )
  d = SuffixDrafter(V, n_min=2, n_max=4)
  if engine == 'static':
    rcfg = dataclasses.replace(plain_cfg, num_draft=3)
    eng = rollout_lib.RolloutEngine(CFG, rcfg, drafter=d)
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
  sh = jax.device_get(eng.last_draft_shared)  # every row's whole text, finished rows too
  np.testing.assert_array_equal(sh['end'], plen + out.length - 1)
  np.testing.assert_array_equal(sh['tokens'][:, :s], plain.tokens[:, :s])
  np.testing.assert_array_equal(sh['group'], groups)

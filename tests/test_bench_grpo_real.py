"""bench/grpo_real.py and bench/grpo_paired.py at CI size: the tiny embedded model on the
arith task, two GRPO steps; their JSON lines have every field. Plain and adaptive + suffix
(a model-free drafter: the per-bucket acceptance without a second model to compile) in
independent runs, plain, compaction only, suffix trees and the cotrained eagle head (its own
head update per step) in the paired run keep it short; the int8 strategy shares every code
path of the benches but the drafter's name. The real-model runs are benchmarks, not
tests."""

import json

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from bench import grpo_paired, grpo_real
from specrl import train
from specrl.drafters import eagle


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """One persistent compile cache for this file (the strategies' train steps and greedy
  engines are the same programs: compiled once); restored (off) afterwards. The bench is
  passed ``--compile_cache ''`` so it leaves the setting to this fixture."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('xla_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  compilation_cache.reset_cache()
  yield ''
  for n, v in old.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


RUN_FIELDS = (
  'steps',
  'build_s',
  'wall_s',
  'rollout_s',
  'train_s',
  'eval_s',
  'tokens',
  'once_s',
  'rollout_steady_s',
  'wall_steady_s',
  'alpha',
  'load_avg',
  'final',
  'reward',
  'paired_vs_plain',
)


def test_tiny_run_reports_every_field(capsys, tmp_path, cache):
  strategies = ['plain', 'adaptive_suffix']  # compaction: the paired test below
  grpo_real.main(
    ['--tiny', '--steps', '2', '--strategies', ','.join(strategies), '--workdir', str(tmp_path),
     '--compile_cache', cache]
  )  # fmt: skip
  res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert res['bench'] == 'grpo_real' and res['tiny'] and res['steps'] == 2
  assert res['skipped'] == {} and list(res['results']) == strategies
  for name, r in res['results'].items():
    for f in RUN_FIELDS:
      assert f in r, (name, f)
    assert len(r['steps']) == 2 and r['wall_s'] > 0 and r['rollout_s'] > 0
    for row in r['steps']:
      assert set(grpo_real.STEP_FIELDS) <= set(row)
    assert set(r['final']) >= {k for k, _ in grpo_real.EVAL_METRICS}
    assert all(0.0 <= r['final'][k] <= 1.0 for k, _ in grpo_real.EVAL_METRICS)
    refs = [x for x in ('plain',) if x != name]  # vs compaction: the same code
    for ref in refs:
      for kind in ('rollout_ratio', 'whole_run_ratio'):
        assert r[f'{kind}_vs_{ref}'] > 0 and r[f'{kind}_vs_{ref}_steady'] > 0
    if name != 'plain':  # paired held-out differences vs plain, each with its interval
      assert set(r['paired_vs_plain']) == {k for k, _ in grpo_real.EVAL_METRICS}
      for p in r['paired_vs_plain'].values():
        assert p['ci95'] >= 0 and isinstance(p['agrees'], bool)
  # a drafter's acceptance, per bucket where the adaptive engine speculated
  r = res['results']['adaptive_suffix']
  assert r['alpha'] is None or 0.0 <= r['alpha'] <= 1.0
  for row in r['steps']:
    assert all(k.startswith('b') and 0.0 <= a <= 1.0 for k, a in row['alpha'].items())


def test_missing_head_file_is_skipped_with_a_reason(capsys, tmp_path, cache):
  grpo_real.main(
    ['--tiny', '--steps', '1', '--strategies', 'plain,adaptive_eagle', '--eagle_head',
     str(tmp_path / 'none.npz'), '--workdir', str(tmp_path), '--compile_cache', cache]
  )  # fmt: skip
  res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 'not found' in res['skipped']['adaptive_eagle'] and list(res['results']) == ['plain']


def test_tiny_paired_run_times_every_strategy_on_one_run(capsys, tmp_path, cache):
  """bench/grpo_paired.py: every strategy rolls out every step on the trained params; the
  token-exact ones emit plain's very tokens in every row (checked on the run itself); the
  cotrained eagle head updates once per step, charged to its whole run only."""
  strategies = ['plain', 'compaction', 'adaptive_suffix_tree', 'adaptive_eagle']
  strategies += ['adaptive_eagle_tree']
  rows_out = tmp_path / 'rows.jsonl'
  grpo_paired.main(
    ['--tiny', '--steps', '2', '--strategies', 'compaction,plain,adaptive_suffix_tree,'
     'adaptive_eagle,adaptive_eagle_tree', '--rows_out', str(rows_out), '--save_head',
     str(tmp_path / 'head.npz'), '--head_dtype', 'bfloat16', '--compile_cache', cache]
  )  # fmt: skip
  out = capsys.readouterr().out
  res = json.loads(out.strip().splitlines()[-1])
  assert res['bench'] == 'grpo_paired' and res['steps'] == 2
  assert res['strategies'] == strategies  # the reference first, whatever the order given
  shared = res['shared']
  assert shared['train_s'] > 0 and shared['whole_run_bound_vs_plain'] > 1.0
  assert [e['step'] for e in shared['evals']] == [0, 2]
  for name, r in res['results'].items():
    assert r['rollout_s'] > 0 and r['tokens'] > 0
    whole = r['rollout_s'] + r['train_extra_s'] + shared['train_s'] + shared['eval_s']
    assert r['whole_run_s'] == pytest.approx(whole, rel=1e-3)  # the JSON rounds
    assert (r['train_extra_s'] > 0) == (name in grpo_real.EAGLE), name
    assert 0 <= r['train_extra_steady_s'] <= r['train_extra_s']
    if name in grpo_paired.TOKEN_EXACT:
      assert r['exact_rows'] == 1.0 and r['lossless'], name
      assert r['reward_vs_plain']['diff'] == 0.0
    if name != 'plain':
      assert r['rollout_ratio_vs_plain'] > 0 and r['whole_run_ratio_vs_plain'] > 0
  assert res['eagle'] == dict(head='', vocab=0, warmup_steps=0)
  rows = [json.loads(line) for line in rows_out.read_text().splitlines()]
  assert [r['step'] for r in rows] == [0, 1]
  assert all(r[s]['rows'] == 8 for r in rows for s in strategies)
  # the head trained once per step (its loss on the step's batch), beside the run
  assert all(r[s]['head_loss'] > 0 for r in rows for s in grpo_real.EAGLE if s in strategies)
  for name in ('head.npz', 'head_adaptive_eagle_tree.npz'):  # each strategy's trained head
    with np.load(tmp_path / name) as saved:  # for --eagle_head, in bfloat16
      assert len(saved.files) > 3 and eagle.BF16_KEY in saved.files
    digest = eagle.file_sha256(str(tmp_path / name))
    assert f'head saved to {tmp_path / name} (bfloat16, sha256 {digest})' in out
  # the rows file alone gives the run's summary back (as for a run still going)
  grpo_paired.main(['--from_rows', str(rows_out)])
  again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert again['shared']['steps_done'] == 2
  for name, r in res['results'].items():
    assert again['results'][name]['rollout_s'] == pytest.approx(r['rollout_s'], rel=1e-3)
    assert again['results'][name].get('exact_rows') == r.get('exact_rows')
  assert again['shared']['eval_s'] == pytest.approx(shared['eval_s'], rel=1e-3, abs=1e-3)


def test_paired_summary_flags_a_strategy_that_is_not_lossless():
  """``summarize``: a token-exact strategy with one differing row, or any strategy whose
  rewards differ from plain's beyond their interval, is not lossless."""

  def rows(rewards, exact):
    return [
      dict(rollout_s=1.0, derive_s=0.0, once_s=0.0, engine_s=1.0, tokens=8, drafted=0.0,
           accepted=0.0, reward=r, rows=4, exact_rows=e)
      for r, e in zip(rewards, exact, strict=True)
    ]  # fmt: skip

  shared = dict(train_s=1.0, eval_s=0.0)
  ref = rows([0.5, 0.2, 0.7, 0.1], [4] * 4)
  same = grpo_paired.summarize('compaction', rows([0.5, 0.2, 0.7, 0.1], [4] * 4), shared, ref)
  assert same['exact_rows'] == 1.0 and same['lossless']
  one_row = grpo_paired.summarize(
    'compaction', rows([0.5, 0.2, 0.7, 0.1], [4, 3, 4, 4]), shared, ref
  )
  assert one_row['exact_rows'] == 15 / 16 and not one_row['lossless']
  # a sampled strategy may differ row by row, not in its rewards' distribution
  assert grpo_paired.summarize('adaptive_int8', rows([0.5, 0.2, 0.7, 0.1], [0] * 4), shared, ref)[
    'lossless'
  ]
  higher = grpo_paired.summarize('adaptive_int8', rows([0.9, 0.7, 1.0, 0.6], [0] * 4), shared, ref)
  assert not higher['reward_vs_plain']['agrees'] and not higher['lossless']


def test_sampled_eagle_tree_strategy_draws_its_trees():
  """``adaptive_eagle_tree_sampled``: the eagle tree arm with children drawn from the head
  and verified by recursive rejection sampling (jnp: no kernel); ``adaptive_eagle_tree``
  keeps the head's top children (sample-and-compare, plain's very tokens)."""
  base = grpo_real.tiny_config(1)
  built = {
    s: train.build_experiment(grpo_real.strategy_config(s, base))
    for s in ('adaptive_eagle_tree', 'adaptive_eagle_tree_sampled')
  }
  for s, exp in built.items():
    assert exp.config.adaptive.arms == ('2_2_3',), s
    assert exp.config.drafter.eagle.mode == 'cotrain', s
  assert built['adaptive_eagle_tree_sampled'].drafter.samples_tree_children
  assert built['adaptive_eagle_tree_sampled'].rollout_cfg.verify_impl == 'jnp'
  assert not built['adaptive_eagle_tree'].drafter.samples_tree_children
  assert 'adaptive_eagle_tree_sampled' not in grpo_paired.TOKEN_EXACT


def test_cotrained_head_trains_the_strategys_drafter():
  """``grpo_paired.CotrainedHead``: one head update on a GRPO batch moves the head the
  strategy's drafter proposes with, and is timed."""
  exp = train.build_experiment(
    grpo_real.strategy_config('adaptive_eagle', grpo_real.tiny_config(1))
  )
  head = grpo_paired.CotrainedHead(exp)
  state = train.init_state(exp)
  before = jax.tree.map(np.asarray, exp.drafter.head_params)
  s = exp.rollout_cfg.seq_len
  toks = np.random.RandomState(0).randint(3, 90, (8, s)).astype(np.int32)
  mask = np.zeros((8, s), np.float32)
  mask[:, 6:] = 1.0
  secs, m = head.update(
    state.params, train.global_batch(exp, {'tokens': toks, 'response_mask': mask})
  )
  assert secs > 0 and m['head/loss'] > 0
  assert int(head.trainer.hstate.step) == 1
  assert exp.drafter.head_params is head.trainer.hstate.params
  moved = jax.tree.map(
    lambda a, b: float(np.abs(np.asarray(a) - b).max()), exp.drafter.head_params, before
  )
  assert max(jax.tree.leaves(moved)) > 0


def test_paired_results_give_per_step_ratios_vs_plain_and_vs_compaction():
  """``results``: per-step geometric-mean ratios with their interval, the first step (compiles)
  left out, vs plain and vs compaction (what speculation adds on top of compaction)."""

  def strat(secs, once=0.0):
    return dict(rollout_s=secs, derive_s=0.0, once_s=once, engine_s=secs, tokens=8,
                drafted=4.0, accepted=2.0, reward=0.5, rows=4, exact_rows=4)  # fmt: skip

  once = [9.0, 0.0, 0.0, 0.0, 0.0]  # the first step's compiles
  rows = [
    dict(step=i, train_s=1.0, eval_s=0.0, load=1.0, plain=strat(2.0 * f),
         compaction=strat(1.6 * f), adaptive_eagle=strat(1.6 * f / 1.1 + once[i], once[i]))
    for i, f in enumerate([1.0, 1.0, 2.0, 0.5, 1.5])
  ]  # fmt: skip
  res, shared = grpo_paired.results(rows)
  e = res['adaptive_eagle']
  assert e['step_ratio_vs_compaction']['geo_mean'] == pytest.approx(1.1)
  assert e['step_ratio_vs_plain']['geo_mean'] == pytest.approx(1.1 * 2.0 / 1.6)
  assert e['step_ratio_vs_compaction']['lo'] <= 1.1 <= e['step_ratio_vs_compaction']['hi']
  assert 'step_ratio_vs_compaction' not in res['compaction']
  assert e['rollout_ratio_vs_compaction'] < 1.0 < e['rollout_ratio_vs_compaction_steady']
  assert shared['steps_done'] == 5

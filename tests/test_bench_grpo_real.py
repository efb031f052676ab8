"""bench/grpo_real.py at CI size: the tiny embedded model on the arith task, two GRPO steps
per strategy; its JSON line has every field. Plain, compaction only and adaptive + suffix
(a model-free drafter: the per-bucket acceptance without a second model to compile) keep
it short; the eagle and int8 strategies share every code path of the bench but the
drafter's name. The real-model runs are benchmarks, not tests."""

import json

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from bench import grpo_real


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
  strategies = ['plain', 'compaction', 'adaptive_suffix']
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
    refs = [x for x in ('plain', 'compaction') if x != name]
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

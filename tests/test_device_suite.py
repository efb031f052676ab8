"""bench/device_suite.py: every section end to end on CPU (``--cpu_smoke``), budgets that
skip later cells cleanly, resume, and the shell wrapper the device call runs."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench import device_suite as ds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(out) -> dict:
  return {f: json.load(open(os.path.join(out, f))) for f in os.listdir(out) if f.endswith('.json')}


def cells(files: dict, letter: str) -> dict:
  return files[ds.SECTIONS[letter][1]]['sections'][letter]['cells']


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  """One real ``--cpu_smoke`` run of every section (tiny shapes; ~30 s on 2 idle cores, 133 s
  beside a benchmark). Budgets far above that: the test asserts that no cell was skipped, and
  budget skipping has its own test below; a slow machine must not turn into a failure."""
  out = tmp_path_factory.mktemp('suite')
  budgets = ','.join(f'{k}=600' for k in ds.SMOKE.budgets)
  argv = ['--cpu_smoke', '--out', str(out), '--compile_cache', '', '--budget_s', '3600']
  assert ds.main([*argv, '--section_budgets', budgets]) == 0
  return out


def test_cpu_smoke_runs_every_section_into_four_files(smoke):
  files = load(smoke)
  assert sorted(files) == sorted(ds.RESULT_FILES) and len(files) <= 4
  assert not [f for f in os.listdir(smoke) if f.endswith('.tmp')]
  env = files['suite_decode.json']['env']
  assert env['grid'] == 'cpu_smoke' and env['backend'] == 'cpu' and env['copy_GBps'] > 0
  for f in files.values():
    for letter, sec in f['sections'].items():
      assert ds.SECTIONS[letter][1] == f['file']
      assert sec['counts']['error'] == 0, sec
      assert not [k for k, r in sec['cells'].items() if r.get('skipped') == 'budget'], sec
      assert sec['spent_s'] <= sec['budget_s']
  g = ds.SMOKE
  a = cells(files, 'a')
  assert len(a) == len(g.new_tokens) * len(g.batches)
  for r in a.values():
    assert r['ms'] > 0 and r['floor_ms'] > 0 and r['x_floor'] > 0 and r['steps_ok'] is True
    assert r['floor_buffer_ms'] >= r['floor_ms']
    assert r['ms_fused'] > 0 and r['fused_speedup'] > 0  # fused matmuls, same cell
  assert [r.get('greedy_match') for r in a.values()][0] is True  # first cell of the model
  b = cells(files, 'b')
  assert sorted(r['drafter'] for r in b.values()) == sorted(g.drafters)
  assert all(r['c'] > 0 and r['fwd1_ms'] > 0 for r in b.values())
  c = cells(files, 'c')
  trees = {k: r for k, r in c.items() if k.startswith('c/tree/')}
  assert len(trees) == len(g.tree_nodes) * len(g.cost_batches[:2])
  assert all(
    r['v_tree'] > 0 and r['v_chain'] > 0 and r['tree_over_chain'] > 0 for r in trees.values()
  )
  chains = [r for k, r in c.items() if k not in trees]
  assert chains and all(r[f'v{k}'] > 0 for r in chains for k in g.verify_ks)
  (d,) = cells(files, 'd').values()
  assert d['results']['static']['time_s'] > 0
  e = cells(files, 'e')
  assert {r['kernel'] for r in e.values()} == {'general', 'tokens'}
  assert all(r['match'] is True and r['kernel_ms'] > 0 for r in e.values())


@pytest.fixture
def fake(monkeypatch):
  """Every cell a stub that takes 10 (fake) seconds; the suite's clock is that fake one."""
  now, calls = [0.0], []

  def stub(name):
    def cell(ctx, *args):
      calls.append((name,) + args[: 3 if name == 'a' else 2])
      now[0] += 10.0
      if name == 'e' and args[0] == 'tokens':
        raise RuntimeError('boom\nsecond line')
      return {'stub': name}

    return cell

  monkeypatch.setattr(ds, 'clock', lambda: now[0])
  for name, fn in (
    ('a', 'decode_cell'),
    ('b', 'drafter_cell'),
    ('c', 'verify_cost_cell'),
    ('c', 'tree_verify_cell'),
  ):
    monkeypatch.setattr(ds, fn, stub(name))
  monkeypatch.setattr(ds, 'long_tail_cell', stub('d'))
  monkeypatch.setattr(ds, 'kernel_cell', stub('e'))
  monkeypatch.setattr(ds, 'attention_cell', stub('f'))
  return calls


def test_budgets_skip_later_cells_and_sections_cleanly(fake, tmp_path):
  # Every cell takes 10 s; a cell starts only if a cell as long as the section's last one
  # ends inside both budgets. Global 45 s, b's own 5 s: a runs both cells (0-20 s); b its
  # first (its budget ends at 25 s); c its first (30-40 s: a second would end past 45 s);
  # d its only one (its first: no estimate yet); then the global budget is gone: e, f skip.
  argv = ['--cpu_smoke', '--out', str(tmp_path), '--budget_s', '45', '--section_budgets', 'b=5']
  assert ds.main(argv) == 0
  assert [c[0] for c in fake] == ['a', 'a', 'b', 'c', 'd']
  files = load(tmp_path)
  assert sorted(files) == sorted(ds.RESULT_FILES)
  for letter in 'abcdef':
    sec = files[ds.SECTIONS[letter][1]]['sections'][letter]
    ran = [r for r in sec['cells'].values() if 'stub' in r]
    assert sec['counts']['ran'] == len(ran) == {'a': 2, 'e': 0, 'f': 0}.get(letter, 1)
    assert all(r['skipped'] == 'budget' for r in sec['cells'].values() if r not in ran)
  assert list(cells(files, 'b').values())[1:] == [{'skipped': 'budget'}] * 3
  assert files['suite_costs.json']['sections']['b']['budget_s'] == 5


def test_a_failing_cell_is_one_line_and_the_suite_goes_on(fake, tmp_path):
  assert ds.main(['--cpu_smoke', '--sections', 'e', '--out', str(tmp_path)]) == 0
  e = cells(load(tmp_path), 'e')
  errs = [r['error'] for r in e.values() if 'error' in r]
  assert errs == ['RuntimeError: boom second line']
  assert sum('stub' in r for r in e.values()) == len(e) - 1


def test_resume_runs_only_the_cells_without_a_result(smoke, fake, tmp_path):
  prev = tmp_path / 'prev'
  shutil.copytree(smoke, prev)
  dec = json.load(open(prev / 'suite_decode.json'))
  keys = list(dec['sections']['a']['cells'])
  dec['sections']['a']['cells'][keys[-1]] = {'skipped': 'budget'}
  json.dump(dec, open(prev / 'suite_decode.json', 'w'))
  out = tmp_path / 'out'
  argv = ['--cpu_smoke', '--sections', 'a', '--out', str(out), '--resume_from', str(prev)]
  assert ds.main(argv) == 0
  assert fake == [('a', 'tiny', ds.SMOKE.batches[-1], ds.SMOKE.new_tokens[-1])]
  files = load(out)
  a = cells(files, 'a')
  assert a[keys[-1]] == {'stub': 'a', 'seconds': 10.0}
  assert all(a[k]['resumed'] is True and a[k]['ms'] > 0 for k in keys[:-1])
  assert files['suite_decode.json']['sections']['a']['counts'] == dict(
    ran=1, resumed=len(keys) - 1, skipped=0, error=0
  )
  # the sections not run now are carried over whole: the merged files stay complete
  old = load(smoke)
  for letter in 'bcde':
    assert cells(files, letter) == cells(old, letter)


def test_device_wrapper_runs_the_driver_and_keeps_its_log(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable, JAX_PLATFORMS='cpu')
  env['SPECRL_JAX_CACHE'] = ''  # no compile cache written into the checkout
  r = subprocess.run(
    ['bash', 'bench/device_suite.sh', '--cpu_smoke', '--sections', 'c', '--section_budgets', 'c=0'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 0, r.stdout + r.stderr
  assert 'device_suite.py exit: 0' in r.stdout
  assert sorted(os.listdir(tmp_path)) == ['gpu.txt', 'suite.log', 'suite_costs.json']
  last = open(tmp_path / 'suite.log').read().strip().splitlines()[-1]
  assert json.loads(last)['sections']['c']['skipped'] == len(ds.SMOKE.new_tokens) * len(
    ds.SMOKE.cost_batches
  ) + len(ds.SMOKE.tree_nodes)

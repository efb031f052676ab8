"""bench/tree_round_parts.py on the tiny model: every unit timed (the proposal alone and
after a cache flush included), the table and the JSON
line (the real model's run is a benchmark, not a test)."""

import json

from bench import tree_round_parts


def test_tiny_run_times_every_unit_and_leaves_the_patched_module_as_it_was(capsys):
  from specrl.decoding import tree as tree_lib

  before = {n: getattr(tree_lib, n) for n in ('propose_tree', 'move_accepted_kv', 'hooks')}
  tree_round_parts.main(['--model', 'tiny', '--quick', '--compile_cache', ''])
  out = capsys.readouterr().out.strip().splitlines()
  res = json.loads(out[-1])
  assert res['bench'] == 'tree_round_parts' and res['device']['cpu_model']
  units = tree_round_parts.UNITS
  assert sorted(res['ms']) == sorted(units) and all(v > 0 for v in res['ms'].values())
  assert res['plain_steps']['plain'] == 1.0
  assert sorted(res['propose_ms']) == ['after_flush', 'alone', 'in_round']
  assert res['propose_ms']['alone'] > 0
  assert res['parents'][0] == -1 and len(res['parents']) == res['nodes'] == 8
  assert all(any(line.startswith(f'| {u} |') for line in out) for u in units)
  for name, fn in before.items():  # the stubs were only there while tracing
    assert getattr(tree_lib, name) is fn, name

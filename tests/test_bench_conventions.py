"""Every benchmark script keeps the house conventions (README, "Benchmarks"): a ``--quick``
mode (minutes), and one JSON object as its last line (``common.emit_json`` or
``json.dumps``). A static check of the scripts' text: running each would cost minutes."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'bench')
# runnable, but not benchmarks: the device lease's packer and runner (their modes are
# subcommands / --cpu_smoke), and a worker process another bench starts
NOT_BENCHMARKS = {'device_pack.py', 'device_suite.py', 'hf_peer_worker.py'}


def scripts():
  for name in sorted(os.listdir(BENCH)):
    path = os.path.join(BENCH, name)
    if name.endswith('.py') and name not in NOT_BENCHMARKS:
      with open(path) as f:
        text = f.read()
      if "if __name__ == '__main__':" in text:
        yield name, text


def test_every_benchmark_has_a_quick_mode_and_a_json_last_line():
  found = dict(scripts())
  assert len(found) >= 20, sorted(found)  # the scan itself works
  quick = re.compile(r"""add_argument\(\s*['"]--quick['"]|DEFINE_bool(ean)?\(\s*['"]quick['"]""")
  missing = [n for n, t in found.items() if not quick.search(t)]
  assert not missing, f'no --quick flag: {missing}'
  no_json = [n for n, t in found.items() if 'emit_json(' not in t and 'json.dumps(' not in t]
  assert not no_json, f'no JSON line: {no_json}'

"""Config sweeps: big_vision-style hyper helpers, and a resumable run killed mid-sweep."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import default
from specrl import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hyper_helpers_build_points():
  h = sweep.hyper
  pts = h.product([h.sweep('a', [1, 2]), h.sweep('b', ['x', 'y'])])
  assert pts == [{'a': 1, 'b': 'x'}, {'a': 1, 'b': 'y'}, {'a': 2, 'b': 'x'}, {'a': 2, 'b': 'y'}]
  assert h.zip([h.sweep('a', [1, 2]), h.fixed('b', 0, 2)]) == [{'a': 1, 'b': 0}, {'a': 2, 'b': 0}]
  assert h.chain(h.sweep('a', [1]), h.sweep('b', [2])) == [{'a': 1}, {'b': 2}]
  with pytest.raises(ValueError, match='equal length'):
    h.zip([h.sweep('a', [1, 2]), h.sweep('b', [1])])


def test_default_sweep_points_are_valid_configs():
  from specrl import train

  base = default.get_config('smoke')
  points = default.get_hyper(sweep.hyper)
  assert len(points) == 5 and len({sweep.point_name(p) for p in points}) == 5
  for p in points:
    train.build_experiment(sweep.apply_overrides(base, p))  # e.g. no num_draft without drafter
  assert sweep.point_name(points[1]) == 'rollout.drafter=self+rollout.num_draft=2'
  with pytest.raises(ValueError, match=r'unknown key config\.rollout\.k; valid keys'):
    sweep.apply_overrides(base, {'config.rollout.k': 2})


def _sweep_cmd(workdir):
  return [
    sys.executable,
    '-m',
    'specrl.sweep',
    '--config=tests/sweep_config.py',
    f'--workdir={workdir}',
  ]


def test_sweep_is_resumable_after_a_kill(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  first = tmp_path / 'seed=0' / sweep.DONE
  second = tmp_path / 'seed=1' / sweep.DONE
  proc = subprocess.Popen(
    _sweep_cmd(tmp_path), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  deadline = time.time() + 300
  while not first.exists():
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.time() < deadline, 'first point never finished'
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  assert not (tmp_path / 'summary.csv').exists()
  done_mtime = first.stat().st_mtime_ns
  metrics_first = (tmp_path / 'seed=0' / 'metrics.jsonl').read_text()

  r = subprocess.run(
    _sweep_cmd(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert first.stat().st_mtime_ns == done_mtime  # the finished point was skipped...
  assert (tmp_path / 'seed=0' / 'metrics.jsonl').read_text() == metrics_first  # ...not rerun
  assert second.exists()
  with open(tmp_path / 'summary.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['name'] for r in rows] == ['seed=0', 'seed=1']
  assert [r['config.seed'] for r in rows] == ['0', '1']
  for row in rows:
    assert 0.0 <= float(row['final_reward']) <= 1.0 and float(row['tokens_per_s']) > 0
    assert int(row['steps']) == 2
  assert (tmp_path / 'summary.png').stat().st_size > 0

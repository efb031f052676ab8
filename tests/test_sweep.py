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


def _flag_values(argv):
  """A fresh set of the entry points' flags (``--workdir``, ``--config``; its overrides are
  registered from ``argv``, as ``config_flags`` does from ``sys.argv``)."""
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  flags.DEFINE_string('workdir', None, 'dir', flag_values=fv)
  config_flags.DEFINE_config_file(
    'config', None, 'cfg', flag_values=fv, lock_config=True, sys_argv=argv
  )
  flags.mark_flag_as_required('workdir', flag_values=fv)
  return fv


@pytest.mark.parametrize(
  'flag,message',
  [
    ('--config.rl.nokey=1', 'error: unknown key config.rl.nokey; valid keys: aggregation, '),
    ('--config.rl.steps=abc', 'error: flag --config.rl.steps=abc: invalid literal for int()'),
    ('--config.adaptive.enabled=maybe', 'error: flag --config.adaptive.enabled=maybe: '),
    ('--wrkdir=/tmp', "error: Unknown command line flag 'wrkdir'"),
  ],
)
def test_flag_mistakes_of_both_entry_points_are_one_line(flag, message):
  """``cli.parse_flags`` (main.py and ``python -m specrl.sweep``): a user mistake in the flags
  exits with one line naming it, not a traceback (absl's errors escaped a custom parser)."""
  from specrl import cli

  argv = ['prog', f'--config={ROOT}/configs/default.py:smoke', flag]
  argv += [] if flag.startswith('--wrkdir') else ['--workdir=/tmp/x']
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(argv, _flag_values(argv))
  assert str(e.value.code).startswith(message), e.value.code
  good = argv[:2] + ['--workdir=/tmp/x', '--config.rl.steps=3']
  fv = _flag_values(good)
  assert cli.parse_flags(good, fv) == ['prog'] and fv.config.rl.steps == 3


def test_a_bad_point_is_refused_naming_it(tmp_path):
  """An unknown key in any point is refused before the first point runs; a bad value in a
  point is a one-line ``FatalError`` naming the point, before its run starts."""
  from specrl import faults

  base = default.get_config('smoke')
  points = [{'config.seed': 0}, {'config.rl.nokey': 1}]
  with pytest.raises(ValueError, match=r'^sweep point rl\.nokey=1: unknown key config\.rl\.nokey'):
    sweep.run_sweep(base, points, str(tmp_path))
  assert not (tmp_path / 'seed=0').exists()  # nothing ran
  # a product that gives the 'none' drafter an eagle mode: a point no different from another
  points = [
    {'config.rollout.drafter': d, 'config.drafter.eagle.mode': m}
    for d in ('none', 'eagle')
    for m in ('cotrain', 'spot')
  ]
  msg = (
    r'^sweep point rollout\.drafter=none\+drafter\.eagle\.mode=cotrain: --config\.drafter\.eagle'
  )
  with pytest.raises(sweep.SweepError, match=msg + r'.*\(build the points with hyper\.chain\)$'):
    sweep.run_sweep(base, points, str(tmp_path))
  assert sweep.check_points(base, points[2:]) == [sweep.point_name(p) for p in points[2:]]
  with pytest.raises(faults.FatalError, match=r'^sweep point rl\.num_prompts=0: config\.rl\.'):
    sweep.run_point(base, {'config.rl.num_prompts': 0}, str(tmp_path / 'bad'))
  assert not (tmp_path / 'bad' / sweep.DONE).exists()

"""bench/verify_width.py on the tiny model: v(T) per batch and width, in this process and
in a subprocess per XLA flag set (the benchmark's numbers are a benchmark's, not a test's)."""

import json

import pytest

from bench import verify_width


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_tiny_run_reports_v_of_every_width_and_batch(capsys):
  verify_width.main(['--model', 'tiny', '--quick', '--widths', '1,2,8', '--batches', '1,2',
                     '--compile_cache', ''])  # fmt: skip
  res = _last_json(capsys)
  assert res['bench'] == 'verify_width' and res['device']['cpu_model']
  run = res['runs']['this process']
  for b in ('1', '2'):
    assert sorted(run['ms'][b], key=int) == ['1', '2', '8'] and min(run['ms'][b].values()) > 0
    assert run['v'][b]['1'] == 1.0
    assert run['v'][b]['8'] == pytest.approx(run['ms'][b]['8'] / run['ms'][b]['1'], rel=1e-3)


def test_xla_variants_run_in_their_own_processes_and_bad_flags_are_refused(capsys):
  verify_width.main(['--model', 'tiny', '--quick', '--widths', '1,2', '--batches', '1',
                     '--xla_variants', 'no_ynn_dots', '--compile_cache', ''])  # fmt: skip
  res = _last_json(capsys)
  assert list(res['runs']) == ['no_ynn_dots'] and res['runs']['no_ynn_dots']['v']['1']['1'] == 1.0
  with pytest.raises(SystemExit, match='unknown'):
    verify_width.main(['--model', 'tiny', '--xla_variants', 'fast'])
  with pytest.raises(SystemExit, match='must start at 1'):
    verify_width.main(['--model', 'tiny', '--widths', '2,4'])

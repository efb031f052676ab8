"""bench/eagle_alpha.py: its tiny path end to end at smoke size (SFT, the head's warm-up on
the policy's generations, acceptance before / after, draft cost c); the real-model runs are
benchmarks, not tests."""

import json

from bench import eagle_alpha


def test_tiny_path_runs_and_reports_its_figures(capsys):
  eagle_alpha.main(['--sft_steps', '2', '--warmup_updates', '3', '--heldout_tiny', '4'])
  res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  t = res['tiny']
  assert t['warmup_updates'] == 3 and t['warmup_s'] > 0
  for a in (t['alpha_untrained'], t['alpha_warm']):
    assert 0.0 <= a <= 1.0
  assert t['head_loss'] > 0 and t['c_b32'] > 0

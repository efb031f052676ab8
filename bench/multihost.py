"""The smoke run's step time on 1 process x 8 CPU devices vs 2 processes x 4 (issue 31).

  python bench/multihost.py [--quick] [--rl_steps=N]

Runs ``main.py --config=configs/default.py:smoke`` (validation off, ``rl.steps`` GRPO steps)
once alone with 8 fake CPU devices and once as 2 x 4 through ``python -m specrl.launch``,
and reads both ``metrics.jsonl`` files: median step time of the warm-up and of the GRPO
steps after the first (which compiles), and the GRPO rollout / train parts. On one machine
this measures what several processes cost (gloo collectives over localhost, the host-side
all-gathers, two processes sharing the cores), not a speed-up. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('step_time_s', 'rollout/time_s', 'train/time_s')


def run(layout: str, workdir: str, rl_steps: int) -> float:
  args = [
    'main.py',
    '--config=configs/default.py:smoke',
    f'--workdir={workdir}',
    '--config.eval.prompts=0',
    f'--config.rl.steps={rl_steps}',
    f'--config.checkpoint_every={rl_steps + 100}',
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  if layout == '1x8':
    env['XLA_FLAGS'] = env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
    cmd = [sys.executable, *args]
  else:
    cmd = [sys.executable, '-m', 'specrl.launch', '--num_processes=2',
           '--devices_per_process=4', '--', *args]  # fmt: skip
  t0 = time.perf_counter()
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if r.returncode:
    sys.exit(f'{layout} failed: {r.stderr[-2000:]}')
  return time.perf_counter() - t0


def summary(workdir: str) -> dict:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [json.loads(line) for line in f if line.strip()]
  sft = [m for m in steps if m['phase'] == 0.0][1:]  # the first step compiles
  grpo = [m for m in steps if m['phase'] == 1.0][1:]
  out = {'sft_step_s': statistics.median(m['step_time_s'] for m in sft)}
  for k in KEYS:
    out[f'grpo_{k.replace("/", "_")}'] = statistics.median(m[k] for m in grpo)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--quick', action='store_true', help='5 GRPO steps (default 10)')
  ap.add_argument('--rl_steps', type=int, default=None)
  a = ap.parse_args()
  rl_steps = a.rl_steps or (5 if a.quick else 10)
  res = {}
  with tempfile.TemporaryDirectory() as tmp:
    for layout in ('1x8', '2x4'):
      wd = os.path.join(tmp, layout)
      wall = run(layout, wd, rl_steps)
      res[layout] = dict(summary(wd), wall_s=wall)
  load = os.getloadavg()[0]
  print(f'smoke run, {rl_steps} GRPO steps, medians after the first step; load {load:.1f}')
  cols = ['sft_step_s', 'grpo_step_time_s', 'grpo_rollout_time_s', 'grpo_train_time_s', 'wall_s']
  print('| layout | ' + ' | '.join(cols) + ' |')
  print('|' + '---|' * (len(cols) + 1))
  for layout, r in res.items():
    print(f'| {layout} | ' + ' | '.join(f'{r[c]:.3f}' for c in cols) + ' |')
  ratio = res['2x4']['grpo_step_time_s'] / res['1x8']['grpo_step_time_s']
  print(json.dumps({'layouts': res, 'grpo_step_ratio_2x4_vs_1x8': ratio, 'load1': load}))


if __name__ == '__main__':
  main()

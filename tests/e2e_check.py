"""Default config: warm-up, then GRPO, validated on the task's held-out split; prints JSON.

The loop itself validates (:mod:`specrl.evaluation`) at the start of GRPO and at the end,
on 128 distinct prompts of the fixed held-out pool (prompts training can never draw), 8
samples each, with the eval RNG stream: the same prompts and keys before and after, so the
comparison is paired. Besides, the same params are scored on 12 fixed batches of unseen
*training-distribution* prompts (data steps no run reaches), to tell "the loop learns the
training task" apart from "what it learns generalises to the held-out split".

Run in a subprocess by test_end_to_end.py so it gets XLA's normal (optimising) CPU
compiler rather than the fast-compile flags the rest of the suite uses: this test is
dominated by compute, not compilation.
"""

import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from specrl import train  # noqa: E402

UNSEEN_STEP = 10**6  # training-distribution prompts of data steps no run reaches


TRAIN_DIST_BATCHES = 12  # 4 gave +0.018 for the default seed against the asserted +0.015


def train_distribution_rewards(c, params) -> list[float]:
  """Mean reward of each of the fixed unseen batches (the same prompts and keys for any
  params: a paired comparison)."""
  exp = train.build_experiment(c)
  ms = [
    train.rollout_batch(exp, params, UNSEEN_STEP + i, exp.rngs.eval)[3]
    for i in range(TRAIN_DIST_BATCHES)
  ]
  return [float(m['reward']) for m in ms]


def main():
  c = default.get_config()
  c.sft.steps, c.rl.steps = 150, 30
  c.log_every, c.checkpoint_every = 10, 1000
  c.eval.every, c.eval.prompts, c.eval.generations = 0, 128, 8  # start and end of GRPO
  workdir = tempfile.mkdtemp()
  state, hist = train.train_and_evaluate(c, workdir, max_steps=c.sft.steps)
  train_before = train_distribution_rewards(c, state.params)
  state, hist2 = train.train_and_evaluate(c, workdir)
  train_after = train_distribution_rewards(c, state.params)
  hist = hist + hist2
  evals = [m for m in hist if 'eval/step' in m]
  before, after = (
    {k.removeprefix('eval/'): v for k, v in m.items() if k.startswith('eval/')} for m in evals
  )
  print(
    json.dumps(
      {
        'before': before,
        'after': after,
        'train_distribution': {
          'before': float(np.mean(train_before)),
          'after': float(np.mean(train_after)),
          'before_batches': train_before,
          'after_batches': train_after,
        },
        'phases': [m['phase'] for m in hist],
        'report': os.path.isfile(os.path.join(workdir, 'report.md')),
      }
    )
  )


if __name__ == '__main__':
  main()

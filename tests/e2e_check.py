"""Default config: warm-up, held-out evaluation, GRPO, evaluation again; prints JSON.

Run in a subprocess by test_end_to_end.py so it gets XLA's normal (optimising) CPU
compiler rather than the fast-compile flags the rest of the suite uses: this test is
dominated by compute, not compilation.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from specrl import train  # noqa: E402


def evaluate(exp, params):
  """Mean reward / accuracy over 4 fixed held-out prompt batches (fixed rollout RNG)."""
  ms = [train.rollout_batch(exp, params, 10**6 + i, jax.random.key(123))[3] for i in range(4)]
  return float(np.mean([m['reward'] for m in ms])), float(np.mean([m['accuracy'] for m in ms]))


def main():
  c = default.get_config()
  c.sft.steps, c.rl.steps = 150, 30
  c.log_every, c.checkpoint_every = 10, 1000
  workdir = tempfile.mkdtemp()
  state, _ = train.train_and_evaluate(c, workdir, max_steps=c.sft.steps)
  exp = train.build_experiment(c)
  before = evaluate(exp, state.params)
  state, hist = train.train_and_evaluate(c, workdir)  # resumes into GRPO
  after = evaluate(exp, state.params)
  print(json.dumps({'before': before, 'after': after, 'phases': [m['phase'] for m in hist]}))


if __name__ == '__main__':
  main()

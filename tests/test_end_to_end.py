"""End to end: the default config's warm-up + GRPO raises reward on held-out prompts.

Slow (a few minutes on a 2-core CPU) but run in CI: it is the test that the whole loop --
rollout, rewards, advantages, train_step, the shared param pytree -- actually learns.
"""

import jax
import numpy as np
import pytest

from configs import default
from specrl import train


def _evaluate(exp, params):
  """Mean reward / accuracy over 4 fixed held-out prompt batches (fixed rollout RNG)."""
  ms = [train.rollout_batch(exp, params, 10**6 + i, jax.random.key(123))[3] for i in range(4)]
  return float(np.mean([m['reward'] for m in ms])), float(np.mean([m['accuracy'] for m in ms]))


@pytest.mark.slow
def test_default_config_grpo_raises_reward(tmp_path):
  c = default.get_config()
  c.sft.steps, c.rl.steps = 150, 30
  c.log_every = 10
  c.checkpoint_every = 1000
  state, hist = train.train_and_evaluate(c, str(tmp_path), max_steps=c.sft.steps)
  exp = train.build_experiment(c)
  before = _evaluate(exp, state.params)
  state, hist = train.train_and_evaluate(c, str(tmp_path))  # resumes into GRPO
  after = _evaluate(exp, state.params)
  assert [m['phase'] for m in hist] == [1.0] * 30
  assert before[1] > 0.05, f'warm-up did not teach the format: {before}'
  assert after[0] > before[0] + 0.015, f'GRPO did not raise reward: {before} -> {after}'

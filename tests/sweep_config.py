"""A two-point sweep of a tiny config, for tests/test_sweep.py (seconds per point)."""

from configs import default


def get_config(arg=None):
  c = default.get_config('smoke')
  c.model.update(d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
  c.task.max_terms = 3
  c.sft.steps, c.sft.batch_size = 1, 4
  c.rl.steps, c.rl.num_prompts, c.rl.num_generations = 1, 2, 2
  c.checkpoint_every = 1
  return c


def get_hyper(hyper):
  return hyper.sweep('config.seed', [0, 1])

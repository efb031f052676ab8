"""Run rollout and train_step on a (2, 2, 2) mesh of 8 fake CPU devices and on 1 device;
print max differences as JSON. Executed in a subprocess by test_sharding.py because the
device count is fixed when JAX starts."""

import json
import os
import sys

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from specrl import sharding as shd  # noqa: E402
from specrl import train  # noqa: E402


def run(mesh, drafter):
  c = default.get_config('smoke')
  c.model.update(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, n_layers=1)
  c.rl.num_prompts, c.rl.num_generations = 2, 4  # 8 sequences: divisible by data*fsdp
  c.rollout.temperature = 0.0  # greedy: identical tokens expected
  c.rollout.drafter, c.rollout.num_draft = drafter, 2
  c.sft.batch_size = 8
  exp = train.build_experiment(c, mesh)
  state = train.init_state(exp)
  fns = train._jitted_steps(exp, jax.tree.map(lambda x: x.sharding, state))
  state, _, _ = train.run_step(exp, state, 0, fns)  # one warm-up step
  batch, rewards, out, _ = train.rollout_batch(exp, state.params, 10, state.rng)
  state, m, _ = fns[1](state, batch)
  shardings = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
  return jax.device_get((state.params, out.tokens, out.logprobs)), shardings


def main():
  assert jax.device_count() == 8, jax.devices()
  res = {}
  for drafter in ('none', 'self'):
    (p8, t8, l8), sh8 = run(shd.make_mesh((2, 2, 2)), drafter)
    (p1, t1, l1), _ = run(shd.make_mesh((1, 1, 1), jax.devices()[:1]), drafter)
    res[drafter] = {
      'tokens_equal': bool(np.array_equal(t8, t1)),
      'logprob_maxdiff': float(np.max(np.abs(l8 - l1))),
      'param_maxdiff': max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True)
      ),
      'sharded_specs': sorted(sh8),
    }
  print(json.dumps(res))


if __name__ == '__main__':
  main()

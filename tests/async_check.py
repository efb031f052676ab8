"""Asynchronous RL on a (rollout 4, train 4) split of 8 fake CPU devices; prints JSON.

Executed in a subprocess by test_async_rl.py (the device count is fixed when JAX starts):
s = 1 run twice (determinism), a run killed after step 5 and resumed (a rollout in
flight at the checkpoint), the behaviour version of a stored rollout checked by
regenerating it, and greedy speculative rollouts on the rollout mesh.
"""

import json
import os
import sys
import tempfile

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from specrl import checkpointing, train  # noqa: E402


def config(**rollout):
  c = default.get_config('smoke')  # 4 warm-up steps, GRPO steps 4, 5, 6
  c.model.update(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, n_layers=1)
  c.rl.num_prompts, c.rl.num_generations = 2, 4  # 8 sequences: 4-way data parallel
  c.sft.batch_size = 8
  c.rollout_mesh_shape, c.train_mesh_shape = (4, 1, 1), (4, 1, 1)
  c.rl.async_staleness, c.rl.offpolicy = 1, 'tis'
  # An untrained policy scores 0 (zero advantages, zero gradient): weight decay makes
  # every update with lr > 0 change the params, so versions are distinguishable.
  c.rl.weight_decay, c.rl.warmup_steps = 0.5, 1
  c.eval.prompts, c.log_every = 0, 100
  c.checkpoint_every, c.keep_checkpoints = 1, 10
  c.rollout.update(rollout)
  return c


def leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


class Keep:
  """A HostState that keeps what a checkpoint hands back."""

  def __init__(self):
    self.d = None

  def host_state(self):
    return {}

  def load_host_state(self, d):
    self.d = d


def restore(exp, workdir, step):
  ck = checkpointing.Checkpointer(workdir, 10)
  keep = Keep()
  ck.register('rollouts', keep)
  state = ck.restore(train.init_state(exp), step)
  ck.close()
  return state, keep.d


def behaviour_version_check(c, workdir, step):
  """The rollout stored for ``step`` (in checkpoint ``step``) regenerated with the params
  of version step - 1 and of version step: which one reproduces it?"""
  exp = train.build_experiment(c)
  _, host = restore(exp, workdir, step)
  stored = host['queue'][str(step)]
  pipe = train.make_pipeline(exp)
  out = {'stored_version': int(stored['version'])}
  for name, version in (('prev', step - 1), ('same', step)):
    params, _ = pipe.current(restore(exp, workdir, version)[0].params, version)
    batch, _ = pipe.rollout_fn(params, step, None)
    out[f'{name}_tokens_equal'] = bool(np.array_equal(batch['tokens'], stored['batch']['tokens']))
    out[f'{name}_logprobs_equal'] = bool(
      np.array_equal(batch['old_logprobs'], stored['batch']['old_logprobs'])
    )
  return out


def lossless_on_rollout_mesh():
  """Greedy speculative (quantized drafter derived on the rollout mesh from the copied
  params) == greedy plain tokens, both on the rollout mesh."""
  spec = train.build_experiment(config(temperature=0.0, drafter='quantized', num_draft=2))
  plain = train.build_experiment(config(temperature=0.0))
  state = train.init_state(spec)  # on the train devices
  pipe = train.make_pipeline(spec)
  params, draft = pipe.current(state.params, 0)
  rollout_devices = set(spec.rollout_mesh.devices.flat)
  b_spec, m = pipe.rollout_fn(params, 10, draft)
  b_plain, _ = train.make_pipeline(plain).rollout_fn(params, 10, None)
  return {
    'train_devices_disjoint': not (set(spec.mesh.devices.flat) & rollout_devices),
    'params_on_rollout_mesh': all(
      x.sharding.device_set == rollout_devices for x in jax.tree.leaves((params, draft))
    ),
    'tokens_equal': bool(np.array_equal(b_spec['tokens'], b_plain['tokens'])),
    'alpha': m['spec/alpha'],
  }


def main():
  assert jax.device_count() == 8, jax.devices()
  c = config()
  a, b = tempfile.mkdtemp(), tempfile.mkdtemp()
  state_a, hist_a = train.train_and_evaluate(c, a)
  state_b, _ = train.train_and_evaluate(c, b)
  part = tempfile.mkdtemp()
  train.train_and_evaluate(c, part, max_steps=6)  # checkpoint 6 holds the rollout for 6
  state_r, hist_r = train.train_and_evaluate(c, part)
  grpo = [m for m in hist_a if m['phase'] == 1]
  res = {
    'deterministic': same(leaves(state_a), leaves(state_b)),
    'resume_exact': same(leaves(state_a), leaves(state_r)),
    'resumed_steps': [m['step'] for m in hist_r],
    'resumed_metrics_equal': hist_r[-1]['train/loss'] == hist_a[-1]['train/loss']
    and hist_r[-1]['async/staleness'] == hist_a[-1]['async/staleness'],
    'staleness': [m['async/staleness'] for m in grpo],
    'behaviour_version': [m['async/behaviour_version'] for m in grpo],
    'is_weight_mean': [m['train/is_weight_mean'] for m in grpo],
    'version_check': behaviour_version_check(c, a, 6),
    'lossless': lossless_on_rollout_mesh(),
  }
  print(json.dumps(res))


if __name__ == '__main__':
  main()

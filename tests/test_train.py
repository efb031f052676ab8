"""The loop: config validation, exact resume, checkpoint validation, main.py errors."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from specrl import checkpointing, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke():
  c = default.get_config('smoke')
  c.log_every = 100
  return c


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_resume_continues_exactly(tmp_path):
  c = smoke()  # 4 warm-up steps + 3 GRPO steps
  full, hist = train.train_and_evaluate(c, str(tmp_path / 'a'))
  assert int(full.step) == 7 and len(hist) == 7
  part, _ = train.train_and_evaluate(c, str(tmp_path / 'b'), max_steps=5)  # stops mid-GRPO
  assert int(part.step) == 5
  resumed, hist_b = train.train_and_evaluate(c, str(tmp_path / 'b'))
  assert int(resumed.step) == 7 and [m['step'] for m in hist_b] == [5, 6]
  for a, b in zip(_leaves(full), _leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  # the metrics of the resumed steps match the uninterrupted run's
  assert hist_b[-1]['reward'] == hist[-1]['reward']
  assert hist_b[-1]['train/loss'] == pytest.approx(hist[-1]['train/loss'], abs=0)


def test_checkpoint_of_wrong_shape_is_refused(tmp_path):
  c = smoke()
  c.rl.steps = 0
  train.train_and_evaluate(c, str(tmp_path))
  c2 = smoke()
  c2.model.d_ff = 96
  msg = r'tensor params/layers/w_down has shape \(1, 128, 64\).*expects \(1, 96, 64\)'
  with pytest.raises(ValueError, match=msg):
    train.train_and_evaluate(c2, str(tmp_path))
  # the refused checkpoint is still there, untouched
  assert checkpointing.Checkpointer(str(tmp_path)).latest_step() == 4


@pytest.mark.parametrize(
  'field,value,match',
  [
    ('rollout.drafter', 'magic', 'rollout.drafter'),
    ('rl.num_generations', 1, 'num_generations'),
    ('rl.aggregation', 'avg', 'aggregation'),
    ('rollout.top_p', 1.5, 'top_p'),
    ('model.n_kv_heads', 3, 'n_kv_heads'),
    ('rollout.verify_impl', 'cuda', 'verify_impl'),
    ('task.name', 'chess', 'task.name'),
    ('rl.num_prompts', 0, 'num_prompts'),
  ],
)
def test_bad_config_values_fail_naming_the_field(field, value, match):
  c = smoke()
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(ValueError, match=match):
    train.build_experiment(c)


def test_main_rejects_unknown_config_key(tmp_path):
  r = subprocess.run(
    [
      sys.executable,
      'main.py',
      '--config=configs/default.py:smoke',
      f'--workdir={tmp_path}',
      '--config.rl.learning_rate=3',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert r.returncode != 0
  assert 'learning_rate' in r.stderr


def test_quantized_drafter_is_derived_from_the_new_params_inside_the_step():
  from specrl import quant
  from specrl.drafters import quantized

  c = smoke()
  c.rollout.drafter = 'quantized'
  c.rollout.num_draft = 2
  exp = train.build_experiment(c)
  state = train.init_state(exp)
  fns = train._jitted_steps(exp, jax.tree.map(lambda x: x.sharding, state))
  old = jax.device_get(state.params)
  batch, _, _, m = train.rollout_batch(exp, state.params, 5, state.rng)
  assert 'spec/acceptance' in m
  # an untrained policy scores 0 everywhere (zero advantages): force a real update
  batch['advantages'] = np.random.default_rng(0).normal(size=batch['advantages'].shape)
  for _ in range(2):  # the first step has learning rate 0 (warm-up)
    state, _, draft = fns[1](state, batch)
  expected = quant.quantize_params(state.params, quantized.quant_config(c.drafter.quantized))
  leaves = jax.tree.leaves(draft)
  assert any(x.dtype == np.int8 for x in leaves)  # stored as int8
  for a, b in zip(leaves, jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  stale = quant.quantize_params(old, quantized.quant_config(c.drafter.quantized))
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(leaves, jax.tree.leaves(stale), strict=True)
  )

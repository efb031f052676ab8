"""The drafter registry and the train-time protocol: a drafter defined only in this file
(no edit under ``specrl/``) runs through both engines and the GRPO loop, its trainer is
called every step, and its trainer state survives a save and restore in
``TrainState.drafter``; the config's sections and the README's table come from the
registry; capabilities are asked of the drafter, never recognised by name."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from specrl import drafters, train
from specrl import model as model_lib
from specrl.drafters import eagle_train, hooks, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK_LOG = []  # every trainer hook call, in order, across trainers


class RepeatDrafter:
  """Proposes the last committed token ``repeat`` times (deterministic: token-only
  verification), and trains a toy "model": a running count of the GRPO batches' tokens."""

  name = 'repeat'
  derived = False
  one_hot = True

  def __init__(self, repeat: int):
    self.repeat = repeat
    self.trainer = None

  def params_from_policy(self, policy_params):
    return None

  def state_logical_axes(self):
    return None

  def prefill(self, draft_params, prompt_tokens, prompt_len, buffer_len, mesh=None):
    return None

  def propose(
    self, draft_params, state, seq_tokens, pos, k, seeds, sp, mesh=None, policy_cache=None
  ):
    last = jnp.take_along_axis(seq_tokens, pos[:, None], axis=1)  # [B, 1]
    draft = jnp.where(jnp.arange(k)[None, :] < self.repeat, last, -1)
    return draft.astype(jnp.int32), None, state, policy_cache

  def make_trainer(self, exp):
    if self.trainer is None:
      self.trainer = CountingTrainer()
    return self.trainer


class CountingTrainer:
  """A DrafterTrainer: device state ``{'updates', 'tokens'}`` updated by a jitted function
  fused after the GRPO step; host state: how often each hook ran."""

  name = 'repeat_counts'

  def __init__(self):
    self.calls = {'before_step': 0, 'after_step': 0, 'grpo': 0}
    self.last = None

  def init_state(self, mesh):
    state = {'updates': jnp.zeros((), jnp.int32), 'tokens': jnp.zeros((), jnp.float32)}
    return jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def before_step(self, exp, state, step):
    self.calls['before_step'] += 1
    HOOK_LOG.append(('before_step', step))
    return state

  def wrap_grpo(self, exp, step_fn, grpo, state_sh, batch_sh):
    @jax.jit
    def update(d, batch):
      n = jnp.sum(batch['response_mask'])
      return {'updates': d['updates'] + 1, 'tokens': d['tokens'] + n}

    def fn(state, batch):
      state, metrics, draft_params = grpo(state, batch)
      self.calls['grpo'] += 1
      HOOK_LOG.append(('grpo', int(state.step)))
      return state.replace(drafter=update(state.drafter, batch)), metrics, draft_params

    return fn

  def after_step(self, state):
    self.calls['after_step'] += 1
    HOOK_LOG.append(('after_step', int(state.step)))
    self.last = jax.device_get(state.drafter)

  def host_state(self):
    return {'calls': dict(self.calls)}

  def load_host_state(self, d):
    self.calls = {k: int(v) for k, v in d['calls'].items()}


def _build(config, model_cfg, rng):
  return RepeatDrafter(int(config.drafter.repeat.times))


@pytest.fixture
def repeat_registered():
  import ml_collections

  registry.register(
    registry.DrafterEntry(
      'repeat',
      _build,
      lambda: ml_collections.ConfigDict(dict(times=2)),
      'test drafter',
      'tests/test_drafter_registry.py',
    )
  )
  yield
  registry.unregister('repeat')


def _config(engine):
  c = default.get_config('smoke')  # the registry's sections: 'repeat' included
  c.log_every, c.sft.steps, c.rl.steps, c.checkpoint_every = 100, 0, 2, 1
  c.rollout.drafter = 'repeat'
  if engine == 'adaptive':
    c.adaptive.enabled, c.adaptive.policy, c.adaptive.arms = True, 'always', (2,)
  return c


def test_a_drafter_defined_in_a_test_file_runs_the_loop_and_resumes(tmp_path, repeat_registered):
  c = _config('static')
  assert 'repeat' in c.drafter and 'repeat' in drafters.names()
  HOOK_LOG.clear()
  state, hist = train.train_and_evaluate(c, str(tmp_path))
  assert [m['step'] for m in hist] == [0, 1]
  # the loop's order: before_step, the wrapped GRPO step, after_step (with the new state)
  assert HOOK_LOG == [('before_step', 0), ('grpo', 1), ('after_step', 1)] + [
    ('before_step', 1),
    ('grpo', 2),
    ('after_step', 2),
  ]
  assert hist[-1]['spec/drafted'] > 0  # its drafts reached the verifier
  d = jax.device_get(state.drafter)
  assert int(d['updates']) == 2 and float(d['tokens']) > 0
  # resume in a fresh experiment: the trainer state comes back from the checkpoint
  c.rl.steps = 3
  resumed, hist_b = train.train_and_evaluate(c, str(tmp_path))
  assert [m['step'] for m in hist_b] == [2]
  d_b = jax.device_get(resumed.drafter)
  assert int(d_b['updates']) == 3 and float(d_b['tokens']) > float(d['tokens'])


def test_it_runs_in_the_adaptive_engine_and_its_trainer_hooks_by_hand(repeat_registered):
  c = _config('adaptive')
  exp2 = train.build_experiment(c)
  state = train.init_state(exp2)
  fns = train.jitted_steps(exp2, jax.tree.map(lambda x: x.sharding, state))
  tr = exp2.drafter_trainer
  assert isinstance(tr, hooks.DrafterTrainer) and isinstance(exp2.drafter, hooks.TrainsOnline)
  assert exp2.drafter.make_trainer(exp2) is tr  # one trainer per drafter
  state = state.replace(drafter=tr.init_state(exp2.mesh))
  state = tr.before_step(exp2, state, 0)
  state, m = train.run_step(exp2, state, 0, fns)
  tr.after_step(state)
  assert m['spec/drafted'] > 0 and m['adaptive/spec_time_frac'] > 0
  assert tr.calls == {'before_step': 1, 'after_step': 1, 'grpo': 1}
  assert int(tr.last['updates']) == 1
  fresh = CountingTrainer()
  fresh.load_host_state(tr.host_state())
  assert fresh.calls == tr.calls


def test_capabilities_are_asked_of_the_drafter_not_its_name(repeat_registered):
  c = _config('static')
  model_cfg = model_lib.ModelConfig.from_config(c.model)
  made = {}
  for name in registry.names()[1:]:
    if name == 'eagle':
      continue  # built in tests/test_eagle.py (a head init); its capabilities below
    c.rollout.drafter = name
    made[name] = drafters.make_drafter(c, model_cfg)
  assert hooks.derives_in_train_step(made['quantized'])
  assert not hooks.derives_in_train_step(made['self'])  # derived, but by the engines
  assert made['self'].derived
  assert isinstance(made['suffix'], hooks.PromptHistory)
  assert not isinstance(made['ngram'], hooks.PromptHistory)
  assert isinstance(made['repeat'], hooks.TrainsOnline)
  assert issubclass(eagle_train.OnlineEagleDrafter, hooks.TrainsOnline)  # the run's eagle
  assert not any(isinstance(made[n], hooks.TrainsOnline) for n in ('self', 'ngram', 'suffix'))
  c.drafter.suffix.fallback = 'quantized'
  c.rollout.drafter = 'suffix'
  assert hooks.derives_in_train_step(drafters.make_drafter(c, model_cfg))  # the hybrid
  # a renamed quantized drafter keeps its capability: nothing compares names
  q = made['quantized']
  q.name = 'renamed'
  assert hooks.derives_in_train_step(q)


def test_unknown_names_and_sections_are_refused_listing_the_registered_ones():
  c = default.get_config('smoke')
  c.rollout.drafter = 'magic'
  with pytest.raises(ValueError, match=r"rollout.drafter must be one of \('none', 'self'"):
    drafters.make_drafter(c, None)
  c = default.get_config('smoke')
  c.drafter.magic = {'x': 1}
  with pytest.raises(ValueError, match='drafter.magic'):
    drafters.make_drafter(c, None)
  with pytest.raises(ValueError, match='already registered'):
    registry.register(registry.DrafterEntry('ngram', _build, None, '', ''))


def test_config_sections_and_readme_table_come_from_the_registry():
  c = default.get_config()
  with_sections = [n for n in registry.names()[1:] if registry.entry(n).section is not None]
  assert sorted(c.drafter.keys()) == sorted(with_sections)
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  assert registry.docs_table() in readme, 'README drafter table: paste registry.docs_table()'
  np.testing.assert_equal(sorted(registry.names()), sorted(['none', *with_sections, 'self']))

"""One config path: dataclass defaults == configs/default.py, unknown keys refused in one
line, every field settable, the draft length's one source per engine, int4 group sizes."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import default
from specrl import adaptive, evaluation, quant, run_config, sampling, train
from specrl import config as config_lib
from specrl import model as model_lib
from specrl import rl as rl_lib
from specrl import rollout as rollout_lib
from specrl.drafters import quantized


def _defaults(cls):
  return {f.name: f.default for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(
  'cls,section,skip',
  [
    (model_lib.ModelConfig, 'model', ()),
    (rl_lib.RLConfig, 'rl', ('temperature',)),
    (sampling.SamplingParams, 'rollout', ()),
    # max_new_tokens: 0 in the config means the task's longest answer (resolved by train)
    (rollout_lib.RolloutConfig, 'rollout', (*run_config.ROLLOUT_DERIVED, 'max_new_tokens')),
    (adaptive.AdaptiveConfig, 'adaptive', run_config.ADAPTIVE_NOT_IN_SECTION),
    (evaluation.EvalConfig, 'eval', ()),
  ],
)
def test_dataclass_defaults_equal_the_config_file(cls, section, skip):
  c = default.get_config()
  sec = c[section].to_dict()
  for name, value in _defaults(cls).items():
    if name in skip:
      continue
    assert name in sec, f'config.{section}.{name} is missing from configs/default.py'
    assert config_lib._tuples(sec[name]) == value, f'config.{section}.{name}'


def test_quant_defaults_equal_the_config_file():
  assert quantized.quant_config(default.get_config().drafter.quantized) == quant.QuantConfig()
  names = set(config_lib.init_field_names(quant.QuantConfig))
  assert names | {'share_kv'} == set(default.get_config().drafter.quantized)


def test_from_config_rejects_unknown_keys_in_one_line_and_makes_tuples():
  c = default.get_config()
  c.adaptive.foo = 1
  with pytest.raises(ValueError) as e:
    train.build_experiment(c)
  msg = str(e.value)
  assert msg.startswith('unknown key config.adaptive.foo; valid keys: alpha_memory, ')
  assert '\n' not in msg and 'always_k' not in msg and 'seed' not in msg
  acfg = config_lib.from_config(
    adaptive.AdaptiveConfig, {'arms': [1, 2], 'buckets': [4, 2, 1]}, 'adaptive'
  )
  assert acfg.arms == (1, 2) and acfg.buckets == (4, 2, 1)
  hash(acfg)


@pytest.mark.parametrize(
  'section,key',
  [
    ('rl', 'learning_rate'),
    ('rollout', 'k'),
    ('drafter.quantized', 'bit'),
    ('sft', 'epochs'),
    ('eval', 'eval_every'),
  ],
)
def test_unknown_keys_are_refused_in_every_section(section, key):
  c = default.get_config('smoke')
  c.rollout.drafter = 'quantized'
  node = c
  for part in section.split('.'):
    node = node[part]
  node[key] = 1
  with pytest.raises(ValueError, match=rf'^unknown key config\.{section}\.{key}; valid keys: '):
    train.build_experiment(c)


def test_unknown_command_line_override_is_one_line():
  c = default.get_config('smoke')
  assert config_lib.unknown_override(c, 'rl.lr') is None
  assert config_lib.unknown_override(c, 'drafter.quantized.fp8') is None
  msg = config_lib.unknown_override(c, 'rl.learning_rate')
  assert msg.startswith('unknown key config.rl.learning_rate; valid keys: aggregation, ')
  assert config_lib.unknown_override(c, 'drafter.bits').startswith(
    'unknown key config.drafter.bits; valid keys: eagle, ngram, quantized, small_model'
  )
  argv = ['main.py', '--config=x.py', '--config.rl.lr=3', '--workdir=/tmp']
  assert config_lib.config_overrides(argv) == ['rl.lr']


def test_eval_section_is_complete_and_bad_values_name_the_field():
  c = default.get_config('smoke')
  assert set(c.eval) == set(config_lib.init_field_names(evaluation.EvalConfig))
  c.eval.greedy, c.eval.generations = False, 0  # nothing would be validated
  with pytest.raises(ValueError, match=r'config\.eval\.generations must be >= 1'):
    train.build_experiment(c)
  c.eval.greedy, c.eval.generations = True, -1
  with pytest.raises(ValueError, match=r'config\.eval\.generations must be >= 1 \(or 0'):
    train.build_experiment(c)


def test_every_adaptive_and_quant_field_reaches_the_dataclass():
  c = default.get_config('smoke')
  c.rollout.drafter = 'quantized'
  c.adaptive.enabled = True
  c.adaptive.tlt_patience, c.adaptive.roofline_min_speedup = 3, 1.5
  c.drafter.quantized.update(fp8='e4m3', quantize_lm_head=True, scale_dtype='bfloat16')
  exp = train.build_experiment(c)
  assert exp.engine.acfg.tlt_patience == 3 and exp.engine.acfg.roofline_min_speedup == 1.5
  assert exp.engine.acfg.seed == c.seed
  q = quantized.quant_config(c.drafter.quantized)
  assert (q.fp8, q.quantize_lm_head, q.scale_dtype) == ('e4m3', True, 'bfloat16')


# ----------------------------------------------------------------------------- k


@pytest.mark.parametrize(
  'drafter,adaptive_on,num_draft,expect',
  [
    ('none', False, 0, 0),
    ('ngram', False, 0, run_config.DEFAULT_NUM_DRAFT),
    ('ngram', False, 2, 2),
    ('ngram', True, 0, 0),  # the adaptive engine's k comes from adaptive.arms
    ('none', False, 3, 'rollout.drafter'),
    ('ngram', True, 3, 'adaptive.arms'),
    ('none', True, 2, 'adaptive.arms'),
  ],
)
def test_num_draft_has_one_meaning_per_mode(drafter, adaptive_on, num_draft, expect):
  c = default.get_config('smoke')
  c.rollout.drafter, c.rollout.num_draft, c.adaptive.enabled = drafter, num_draft, adaptive_on
  if isinstance(expect, str):
    with pytest.raises(ValueError, match=expect.replace('.', r'\.')):
      train.build_experiment(c)
  else:
    assert train.build_experiment(c).rollout_cfg.num_draft == expect


# ----------------------------------------------------------------------------- defect g


def _smollm_shaped(group_size, bits=4):
  """d_model 576 (SmolLM2-135M's), everything else tiny."""
  c = default.get_config('smoke')
  c.model.update(d_model=576, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=64)
  c.rollout.drafter = 'quantized'
  c.drafter.quantized.update(bits=bits, group_size=group_size)
  return c


def test_int4_default_group_fits_d_model_576():
  exp = train.build_experiment(_smollm_shaped(0))
  params = model_lib.init_params(exp.model_cfg, jax.random.key(0))
  qp = jax.eval_shape(exp.drafter.params_from_policy, params)
  layers = qp['layers']
  assert layers['wq'].group_size == 96  # largest divisor of 576 <= 128
  assert layers['w_down'].group_size == 64  # d_ff 64 <= 128: one group
  assert np.dtype(layers['wq'].qvalue.dtype).name == 'int4'


def test_bad_int4_group_size_is_a_config_error_naming_the_field():
  msg = r'drafter\.quantized\.group_size=128 does not divide .*576.*valid choices: 0 \(auto'
  with pytest.raises(ValueError, match=msg):
    train.build_experiment(_smollm_shaped(128))
  train.build_experiment(_smollm_shaped(64))  # divides 16, 64 and 576


def test_every_real_model_config_argument_is_a_valid_run_config():
  """``configs/smollm2_arith.py``'s arguments pass the loop's checks and every section's
  dataclass (no model is loaded); ``:learn_long`` is ``:learn`` at a 1024-token budget with
  validation off, and an unknown argument names the known ones."""
  from configs import smollm2_arith

  for arg in (None, 'learn', 'learn_long', 'smoke'):
    c = smollm2_arith.get_config(arg)
    run_config.check_run_config(c)
    run_config.rl_config(c, run_config.sampling_params(c))
    run_config.adaptive_config(c, has_drafter=True)
  learn, long = smollm2_arith.get_config('learn'), smollm2_arith.get_config('learn_long')
  assert long.rollout.max_new_tokens == long.task.max_response_len == 1024
  assert learn.rollout.max_new_tokens == 64 and not evaluation.eval_config(long).enabled
  assert long.task.to_dict() == dict(learn.task.to_dict(), max_response_len=1024)
  assert long.rl.to_dict() == learn.rl.to_dict()
  with pytest.raises(ValueError, match='known: learn, learn_long, smoke'):
    smollm2_arith.get_config('lern')


def test_an_override_the_run_never_reads_is_named():
  """``run_config.ineffective_override`` (main.py refuses these command-line overrides): a
  task field the chosen task does not read, another drafter's section, an adaptive field
  with the adaptive engine off. The task section's keys are configs/default.py's, each read
  by some task; an unknown task key is refused by the build."""
  from specrl import run_config, tasks

  full = default.get_config(None)
  assert sorted(full.task) == sorted(tasks.TASK_KEYS)
  c = default.get_config('smoke')
  assert set(tasks.TASK_FIELDS) == {'running_sum', 'math_jsonl', 'arith'}
  off = run_config.ineffective_override
  # running_sum's prompts are always 2 * max_terms wide
  assert off(c, 'task.max_prompt_len') == (
    "--config.task.max_prompt_len has no effect on task 'running_sum' (it reads min_terms, "
    'max_terms, tail_exponent)'
  )
  assert off(c, 'task.max_terms') is None and off(c, 'task.name') is None
  assert off(c, 'drafter.eagle.mode') == (
    "--config.drafter.eagle.mode has no effect: rollout.drafter='none' reads no drafter "
    'section (set --config.rollout.drafter)'
  )
  assert off(c, 'adaptive.policy').endswith('(set --config.adaptive.enabled=True)')
  assert off(c, 'adaptive.enabled') is None and off(c, 'rl.lr') is None
  c.task.name, c.rollout.drafter, c.adaptive.enabled = 'arith', 'suffix', True
  assert off(c, 'task.max_prompt_len') is None and off(c, 'adaptive.policy') is None
  assert "no effect on task 'arith'" in off(c, 'task.max_terms')
  assert off(c, 'drafter.suffix.history') is None
  assert "rollout.drafter='suffix' reads drafter.suffix (" in off(c, 'drafter.quantized.bits')
  c.drafter.suffix.fallback = 'quantized'  # the hybrid reads its fallback's section
  assert off(c, 'drafter.quantized.bits') is None
  assert 'reads drafter.suffix, drafter.quantized' in off(c, 'drafter.eagle.lr')
  # fields one mode reads (run_config.MODE_FIELDS), in another mode
  c = default.get_config('smoke')
  assert off(c, 'rollout.verify_impl') == (
    "--config.rollout.verify_impl has no effect: rollout.drafter='none' runs no verify pass "
    '(set --config.rollout.drafter)'
  )
  c.eval.prompts, c.sft.steps, c.train.nonfinite = 0, 0, 'halt'
  for field in ('eval.generations', 'sft.lr', 'rl.is_cap', 'rl.attention_block'):
    assert off(c, field).startswith(f'--config.{field} has no effect: '), field
  assert 'train.nonfinite' in off(c, 'train.max_skips')
  c.rollout.drafter, c.adaptive.enabled = 'ngram', True
  assert off(c, 'rollout.verify_impl') is None and 'static engine' in off(
    c, 'rollout.estimate_costs'
  )
  assert "policy='tlt'" in off(c, 'adaptive.tlt_patience')
  c.adaptive.policy, c.eval.prompts, c.sft.steps, c.train.nonfinite = 'tlt', 4, 2, 'skip'
  c.rl.offpolicy, c.rl.attention_impl = 'tis', 'blocked'
  for field in ('adaptive.tlt_patience', 'eval.generations', 'sft.lr', 'train.max_skips'):
    assert off(c, field) is None, field
  assert off(c, 'rl.is_cap') is None and off(c, 'rl.attention_block') is None
  assert "policy='roofline'" in off(c, 'adaptive.roofline_up')
  c = default.get_config('smoke')
  c.task.foo = 1
  with pytest.raises(ValueError, match=r'^unknown key config\.task\.foo; valid keys: add_max, '):
    train.build_experiment(c)

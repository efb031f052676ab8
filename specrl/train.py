"""The train loop: supervised warm-up, then GRPO with (optionally speculative) rollouts.

``train_and_evaluate(config, workdir)`` is everything ``main.py`` does, importable from a
notebook. One readable loop:

  for step in range(start, sft.steps + rl.steps):
    warm-up: sft_step on generated worked solutions
    GRPO:    prompts(step) -> rollout(params) -> rewards -> advantages -> train_step

With ``rl.async_staleness`` = s >= 1 the same loop trains step t on a rollout generated
with the params of step t - s while the rollout for t + s runs on its own devices
(:mod:`specrl.async_rl`; s = 0 is the synchronous loop, bit for bit).

Determinism: prompts for step t come from ``np.random.default_rng([seed, t])`` and device
randomness from independent streams derived once from the seed (:class:`RngStreams`: the
rollout at step t uses ``fold_in(rollout, t)``, the GRPO shuffle ``fold_in(state.rng, t)``
with ``state.rng`` the train stream), so a run resumed from a checkpoint continues
exactly as the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding

from specrl import adaptive, async_rl, drafters, evaluation, faults, metrics_io, sampling
from specrl import checkpointing as ckpt_lib
from specrl import config as config_lib
from specrl import model as model_lib
from specrl import progress as progress_lib
from specrl import report as report_lib
from specrl import rl as rl_lib
from specrl import rollout as rollout_lib
from specrl import sharding as shd
from specrl import tasks as tasks_lib
from specrl.checkpoints import pretrained as pretrained_lib
from specrl.drafters import eagle_train
from specrl.metrics_io import METRICS_FILE, read_metrics  # noqa: F401 - re-exported

# stream -> fold_in constant of the root key jax.random.key(config.seed). params and train
# keep the constants they always had, so initialisation and warm-up are unchanged.
STREAMS = {'params': 1, 'train': 2, 'rollout': 3, 'drafter': 4, 'eval': 5}


@dataclasses.dataclass(frozen=True)
class RngStreams:
  """Independent device-randomness streams, derived ONCE from ``config.seed``.

  Step ``t`` of a stream uses ``fold_in(stream, t)``; no stream's keys are derived from
  another's, so e.g. the GRPO minibatch shuffle (``train``: ``fold_in(fold_in(train, t),
  epoch)`` in :func:`specrl.rl.train_step`) never reuses a key the rollout derives from
  ``fold_in(rollout, t)`` (its prefill ``split`` and per-round ``fold_in``).

  - params: policy initialisation;  train: ``TrainState.rng`` (minibatch shuffles);
  - rollout: GRPO rollouts;  drafter: drafter init (small_model without a checkpoint);
  - eval: held-out evaluation rollouts (:func:`evaluate`), never shared with training.
  """

  params: jax.Array
  train: jax.Array
  rollout: jax.Array
  drafter: jax.Array
  eval: jax.Array


def rng_streams(seed) -> RngStreams:
  """The streams of :class:`RngStreams`: ``fold_in(key(seed), STREAMS[name])`` (pure;
  jittable). Distinct constants give distinct, independent keys."""
  root = jax.random.key(seed)
  return RngStreams(**{name: jax.random.fold_in(root, c) for name, c in STREAMS.items()})


@dataclasses.dataclass
class Experiment:
  """Everything static that the loop needs, built (and validated) from a config."""

  config: ml_collections.ConfigDict
  model_cfg: model_lib.ModelConfig
  rl_cfg: rl_lib.RLConfig
  rollout_cfg: rollout_lib.RolloutConfig
  task: object
  mesh: jax.sharding.Mesh
  optimizer: optax.GradientTransformation
  drafter: object
  engine: object  # rollout.RolloutEngine or adaptive.AdaptiveRolloutEngine
  rngs: RngStreams  # independent rollout / train / drafter / eval key streams
  pretrained: object = None  # host params from config.model.checkpoint, or None
  async_cfg: async_rl.AsyncConfig = async_rl.AsyncConfig()
  rollout_mesh: jax.sharding.Mesh | None = None  # the engine's mesh (= mesh without a split)


def _check_positive(config, names):
  for name in names:
    section, field = name.split('.')
    v = config[section][field]
    if v <= 0:
      raise ValueError(f'config.{name} must be > 0, got {v}')


TOP_LEVEL_KEYS = (
  'seed', 'model', 'task', 'rollout', 'drafter', 'adaptive', 'sft', 'rl', 'mesh_shape',
  'log_every', 'checkpoint_every', 'keep_checkpoints', 'train', 'eval',
  *async_rl.ASYNC_KEYS,
)  # fmt: skip
SFT_KEYS = ('steps', 'batch_size', 'lr', 'warmup_steps')
# rl section keys read by the loop / optimizer rather than RLConfig
RL_LOOP_KEYS = (
  'steps', 'num_prompts', 'lr', 'warmup_steps', 'weight_decay', 'grad_clip', 'async_staleness',
)  # fmt: skip
# rollout section keys that are not RolloutConfig fields
ROLLOUT_OTHER_KEYS = ('drafter', 'temperature', 'top_k', 'top_p')
DEFAULT_NUM_DRAFT = 4  # the static engine's k with a drafter when rollout.num_draft = 0
# AdaptiveConfig fields the adaptive section does not set: seed comes from config.seed.
ADAPTIVE_NOT_IN_SECTION = ('seed',)
# adaptive section keys that are not AdaptiveConfig fields: the engine switch
ADAPTIVE_OTHER_KEYS = ('enabled',)
# RolloutConfig fields derived from the task and the sampling keys, not set in the section
ROLLOUT_DERIVED = ('sampling', 'eos_id', 'extra_eos_ids', 'pad_id', 'max_prompt_len', 'max_draft')


def resolve_num_draft(config: ml_collections.ConfigDict, has_drafter: bool) -> int:
  """The static engine's k: ``rollout.num_draft``, 0 meaning the mode's default (4 with a
  drafter, 0 without). A value the chosen mode would ignore is refused naming the knob
  that applies (the adaptive engine's draft lengths are ``adaptive.arms``)."""
  k = config.rollout.num_draft
  if k < 0:
    raise ValueError(f'config.rollout.num_draft must be >= 0 (0 = default), got {k}')
  if config.adaptive.enabled:
    if k:
      raise ValueError(
        f'config.rollout.num_draft={k} is ignored by the adaptive engine: set its draft '
        'lengths with config.adaptive.arms (and leave rollout.num_draft=0)'
      )
    return 0
  if not has_drafter:
    if k:
      raise ValueError(
        f"config.rollout.num_draft={k} needs a drafter: set config.rollout.drafter (it is 'none')"
      )
    return 0
  return k or DEFAULT_NUM_DRAFT


def build_experiment(config: ml_collections.ConfigDict, mesh=None) -> Experiment:
  """Validates the whole config up front: a bad value fails here, naming the field."""
  config_lib.check_keys(config, '', TOP_LEVEL_KEYS)
  config_lib.check_keys(config.sft, 'sft', SFT_KEYS)
  _check_positive(config, ['rl.num_prompts', 'rl.lr', 'sft.batch_size', 'rl.grad_clip'])
  if config.sft.steps < 0 or config.rl.steps < 0:
    raise ValueError('config.sft.steps and config.rl.steps must be >= 0')
  if config.log_every <= 0 or config.checkpoint_every <= 0:
    raise ValueError('config.log_every and config.checkpoint_every must be > 0')
  faults.fault_config(config)  # train.nonfinite / max_skips, validated up front
  evaluation.eval_config(config)  # validates the eval section (the loop builds the Evaluator)
  streams = rng_streams(config.seed)
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  pretrained = None
  if config.model.checkpoint:  # the architecture is the checkpoint's; dtypes are the config's
    model_cfg, pretrained = pretrained_lib.load_pretrained(
      config.model.checkpoint, model_cfg.param_dtype, model_cfg.compute_dtype
    )
  task = tasks_lib.make_task(config.task)
  if config.sft.steps > 0 and not hasattr(task, 'sample_sft'):
    raise ValueError(
      f'task {config.task.name} has no SFT data: set --config.sft.steps=0 '
      f'(it is {config.sft.steps})'
    )
  if task.tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(
      f'config.model.vocab_size={model_cfg.vocab_size} is smaller than the '
      f"task tokenizer's {task.tokenizer.vocab_size}"
    )
  rollout_fields = config_lib.init_field_names(rollout_lib.RolloutConfig)
  sp = config_lib.from_config(
    sampling.SamplingParams,
    config.rollout,
    'rollout',
    ignore=[*(set(rollout_fields) - set(ROLLOUT_DERIVED)), 'drafter'],
  )
  rl_cfg = config_lib.from_config(
    rl_lib.RLConfig,
    config.rl,
    'rl',
    ignore=RL_LOOP_KEYS,
    exclude=('temperature',),
    temperature=sp.logprob_temperature,
  )
  drafter = drafters.make_drafter(config, model_cfg, streams.drafter)
  rollout_cfg = config_lib.from_config(
    rollout_lib.RolloutConfig,
    config.rollout,
    'rollout',
    ignore=ROLLOUT_OTHER_KEYS,
    exclude=ROLLOUT_DERIVED,
    max_new_tokens=config.rollout.max_new_tokens or task.max_response_len,
    max_prompt_len=task.max_prompt_len,
    sampling=sp,
    **tasks_lib.rollout_eos(task.tokenizer),
    pad_id=task.tokenizer.pad_id,
    num_draft=resolve_num_draft(config, drafter is not None),
  )
  async_cfg = async_rl.async_config(config)
  mesh, rollout_mesh = async_rl.make_meshes(async_cfg, config.mesh_shape, mesh)
  sft_steps = config.sft.steps
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, config.sft.lr, max(config.sft.warmup_steps, 1)),
      optax.linear_schedule(0.0, config.rl.lr, max(config.rl.warmup_steps, 1)),
    ],
    boundaries=[sft_steps],
  )
  optimizer = rl_lib.make_optimizer(schedule, config.rl.weight_decay, config.rl.grad_clip)
  acfg = adaptive_config(config, drafter is not None)
  if config.adaptive.enabled:
    engine = adaptive.AdaptiveRolloutEngine(model_cfg, rollout_cfg, acfg, drafter, rollout_mesh)
  else:
    engine = rollout_lib.RolloutEngine(model_cfg, rollout_cfg, rollout_mesh, drafter)
  return Experiment(
    config,
    model_cfg,
    rl_cfg,
    rollout_cfg,
    task,
    mesh,
    optimizer,
    drafter,
    engine,
    streams,
    pretrained,
    async_cfg,
    rollout_mesh,
  )


def adaptive_config(config: ml_collections.ConfigDict, has_drafter: bool):
  """AdaptiveConfig from the ``adaptive`` section (validated even when the static engine
  runs, so a typo never waits for the day adaptive is switched on). Without a drafter the
  policy is 'never' (compaction only)."""
  a = config.adaptive
  return config_lib.from_config(
    adaptive.AdaptiveConfig,
    a,
    'adaptive',
    ignore=ADAPTIVE_OTHER_KEYS,
    exclude=ADAPTIVE_NOT_IN_SECTION,
    policy=a.policy if has_drafter else 'never',
    seed=config.seed,
  )


# ----------------------------------------------------------------------------- state


def state_shardings(exp: Experiment, abstract_state: rl_lib.TrainState):
  """Params (and param-shaped optimizer leaves) by PARAM_RULES; everything else replicated."""
  axes = model_lib.param_logical_axes(exp.model_cfg)
  psh = shd.tree_shardings(axes, abstract_state.params, exp.mesh, shd.PARAM_RULES)
  rep = shd.replicated(exp.mesh)
  opt_sh = optax.tree_map_params(
    exp.optimizer, lambda _, s: s, abstract_state.opt_state, psh, transform_non_params=lambda _: rep
  )
  return rl_lib.TrainState(
    step=rep,
    params=psh,
    opt_state=opt_sh,
    ref_params=psh if abstract_state.ref_params is not None else None,
    rng=rep,
  )


def init_state(exp: Experiment) -> rl_lib.TrainState:
  """The initial train state: params from ``config.model.checkpoint`` if set (placed with
  the train shardings), else initialised from the params RNG stream."""
  keep_ref = exp.rl_cfg.kl_coef > 0

  def init_fn(seed, pretrained):
    streams = rng_streams(seed)
    params = pretrained
    if params is None:
      params = model_lib.init_params(exp.model_cfg, streams.params)
    return rl_lib.init_train_state(params, exp.optimizer, streams.train, keep_ref)

  abstract = jax.eval_shape(init_fn, 0, exp.pretrained)
  return jax.jit(init_fn, static_argnums=0, out_shardings=state_shardings(exp, abstract))(
    exp.config.seed, exp.pretrained
  )


def _batch_sharding(exp: Experiment, ndim: int) -> NamedSharding:
  spec = shd.logical_to_spec(
    ('batch',) + (None,) * (ndim - 1), (0,) * ndim, exp.mesh, shd.TRAIN_RULES
  )
  return NamedSharding(exp.mesh, spec)


def _jitted_steps(exp: Experiment, state_sh):
  cfg, mesh = exp.model_cfg, exp.mesh
  b2, b1 = _batch_sharding(exp, 2), _batch_sharding(exp, 1)
  sft = jax.jit(
    functools.partial(rl_lib.sft_step, cfg=cfg, optimizer=exp.optimizer, mesh=mesh),
    in_shardings=(state_sh, b2, b2),
    out_shardings=(state_sh, None),
    donate_argnums=(0,),
  )
  batch_sh = {'tokens': b2, 'response_mask': b2, 'old_logprobs': b2, 'advantages': b1}
  step_fn = functools.partial(
    rl_lib.train_step, cfg=cfg, rl=exp.rl_cfg, optimizer=exp.optimizer, mesh=mesh
  )
  if derives_draft_params(exp) and exp.async_cfg.rollout_reads_train_params:
    # The next rollout's drafter is derived from the new params inside the same jitted
    # step: no separate drafter state to save, load or keep in sync. (When the rollout
    # reads a copy, async_rl derives it from the copy on the rollout mesh instead.)
    def grpo_fn(state, batch):
      state, metrics = step_fn(state, batch)
      return state, metrics, exp.drafter.params_from_policy(state.params)

    grpo = jax.jit(
      grpo_fn,
      in_shardings=(state_sh, batch_sh),
      donate_argnums=(0,),
      out_shardings=(state_sh, None, None),
    )
  else:
    grpo = jax.jit(
      lambda st, b: (*step_fn(st, b), None),
      in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, None, None),
      donate_argnums=(0,),
    )
  return sft, eagle_train.wrap_grpo(exp, step_fn, grpo, state_sh, batch_sh)  # eagle cotrain


def derives_draft_params(exp: Experiment) -> bool:
  """True for drafters computed from the live policy params (the quantized self-drafter,
  also as the hybrid suffix drafter's fallback)."""
  fallback = getattr(exp.drafter, 'fallback', None)
  return 'quantized' in (getattr(exp.drafter, 'name', None), getattr(fallback, 'name', None))


# ----------------------------------------------------------------------------- one step


def data_rng(seed: int, step: int) -> np.random.Generator:
  return np.random.default_rng([seed, step])


def rollout_key(exp: Experiment, step: int) -> jax.Array:
  """The key of the GRPO rollout at ``step``: step ``step`` of the rollout stream."""
  return jax.random.fold_in(exp.rngs.rollout, step)


def rollout_batch(exp: Experiment, params, step: int, rng, draft_params=None):
  """Sample prompts for ``step``, roll out G generations each, score them.

  ``rng``: a stream key (``exp.rngs.rollout`` in training, ``exp.rngs.eval`` for held-out
  evaluation); the rollout uses ``fold_in(rng, step)``.

  Returns (training batch dict of numpy arrays, rewards [N*G], rollout output, metrics).
  """
  c = exp.config
  g = exp.rl_cfg.num_generations
  prompts = exp.task.prompts_for_step(c.seed, step, c.rl.num_prompts)
  toks = np.repeat(prompts.tokens, g, axis=0)
  lens = np.repeat(prompts.lengths, g, axis=0)
  answers = [a for a in prompts.answers for _ in range(g)]
  extra = {'estimate_costs': True} if isinstance(exp.engine, rollout_lib.RolloutEngine) else {}
  row_prompt_ids = np.repeat(tasks_lib.prompt_ids(prompts), g)
  history = hasattr(exp.drafter, 'history_params')  # drafts from earlier answers (suffix)
  if history:
    if draft_params is None and derives_draft_params(exp):  # the hybrid's first rollout
      draft_params = jax.jit(exp.drafter.params_from_policy)(params)
    width = exp.rollout_cfg.max_new_tokens
    draft_params = exp.drafter.history_params(row_prompt_ids, width, draft_params)
  out, metrics = exp.engine.generate(
    params,
    toks,
    lens,
    jax.random.fold_in(rng, step),
    draft_params=draft_params,
    group_ids=np.repeat(np.arange(len(prompts.lengths), dtype=np.int32), g),
    prompt_ids=row_prompt_ids,
    **extra,
  )
  resp = np.asarray(out.response)
  length = np.asarray(out.length)
  if history:
    exp.drafter.record(row_prompt_ids, resp, length)
    metrics['spec/history_bytes'] = exp.drafter.memory_bytes()
  rewards = np.array(
    [exp.task.reward(resp[i, : length[i]], answers[i]) for i in range(len(answers))], np.float32
  )
  faults.check_rewards(exp.task.name, rewards, answers)
  s = exp.rollout_cfg.seq_len
  pos = np.arange(s)[None, :]
  plen = np.asarray(out.prompt_len)[:, None]
  mask = ((pos >= plen) & (pos < plen + length[:, None])).astype(np.float32)
  adv = np.asarray(rl_lib.grpo_advantages(jnp.asarray(rewards), g, exp.rl_cfg.scale_advantages))
  batch = {
    'tokens': np.asarray(out.tokens)[:, :s],
    'response_mask': mask,
    'old_logprobs': np.asarray(out.logprobs)[:, :s] * mask,
    'advantages': adv,
  }
  correct = [exp.task.is_correct(resp[i, : length[i]], answers[i]) for i in range(len(answers))]
  metrics.update(
    {
      'reward': float(rewards.mean()),
      'accuracy': float(np.mean(correct)),
      'response_len_mean': float(length.mean()),
      'response_len_max': int(length.max()),
      'finish_eos_frac': float((np.asarray(out.finish) == rollout_lib.FINISH_EOS).mean()),
    }
  )
  return batch, rewards, out, metrics


def make_pipeline(exp: Experiment, timeline=None) -> async_rl.RolloutPipeline:
  """The rollout side of the loop (:mod:`specrl.async_rl`) for ``exp``: GRPO rollouts on
  the engine's mesh, params copied there (``PARAM_RULES`` on the rollout mesh), a derived
  drafter's params computed there by one jitted call."""
  total = exp.config.sft.steps + exp.config.rl.steps

  def rollout_fn(params, step, draft_params):
    batch, _, _, m = rollout_batch(exp, params, step, exp.rngs.rollout, draft_params)
    return batch, m

  def to_rollout(params):  # a copy even on the same devices: the next train step donates
    axes = model_lib.param_logical_axes(exp.model_cfg)
    sh = shd.tree_shardings(axes, params, exp.rollout_mesh, shd.PARAM_RULES)
    return jax.device_put(params, sh, may_alias=False)

  derive = jax.jit(exp.drafter.params_from_policy) if derives_draft_params(exp) else None
  return async_rl.RolloutPipeline(exp.async_cfg, rollout_fn, to_rollout, derive, total, timeline)


def run_step(
  exp: Experiment, state: rl_lib.TrainState, step: int, steps_fns, pipeline=None
) -> tuple[rl_lib.TrainState, dict]:
  """One step of the loop (warm-up or GRPO). Returns (state, metrics dict of floats).

  ``pipeline``: the loop's :class:`specrl.async_rl.RolloutPipeline` (rollout-side params,
  queued rollouts; a fresh one if None). A GRPO step trains on the rollout for ``step``
  (generated now, or s steps ago), dispatches the train step, generates the rollout for
  ``step + s`` while it runs, then publishes the new params to the rollout side.
  """
  sft_fn, grpo_fn = steps_fns
  c = exp.config
  t0 = time.perf_counter()
  if step < c.sft.steps:
    toks, mask = exp.task.sample_sft(
      data_rng(c.seed, step), c.sft.batch_size, exp.rollout_cfg.seq_len
    )
    state, m = sft_fn(state, toks, mask)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    m['phase'] = 0.0
  else:
    pipeline = pipeline or make_pipeline(exp)
    timeline = pipeline.timeline
    pipeline.current(state.params, step)  # published already, except at the first step
    batch, m = pipeline.take(step)
    faults.fault_point('step', step, 'after_rollout')
    t1 = time.perf_counter()
    state, tm, draft_params = grpo_fn(state, batch)  # dispatched: runs while we roll out
    if timeline is not None:
      timeline.watch('train', step, t1, tm)
    m.update(pipeline.prefetch(step))
    tm = jax.device_get(tm)
    m.update({f'train/{k}': float(v) for k, v in tm.items()})
    m['train/time_s'] = time.perf_counter() - t1  # dispatch -> metrics (overlap included)
    m.update(pipeline.publish(state.params, step + 1, draft_params))
    pipeline.done(step)
    m['phase'] = 1.0
  m['step_time_s'] = time.perf_counter() - t0
  return state, m


# ----------------------------------------------------------------------------- loop


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  mesh=None,
  max_steps: int | None = None,
  timeline: async_rl.Timeline | None = None,
):
  """Run (or resume) the experiment in ``workdir``. Returns (final state, metric history).

  ``max_steps`` stops early after that global step (used by tests and notebooks);
  ``timeline`` records rollout / train / transfer spans (benchmarks).
  Validation (:mod:`specrl.evaluation`, config section ``eval``) runs at the start of
  GRPO, every ``eval.every`` GRPO steps and at the end; its ``eval/...`` metrics join the
  dict of the step after which they were taken (``eval/step``: the optimizer steps the
  evaluated params had). A run that reaches the last step writes ``report.md`` and
  ``report.png`` (:mod:`specrl.report`).
  """
  exp = build_experiment(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  total = config.sft.steps + config.rl.steps
  state = init_state(exp)
  head = eagle_train.trainer(exp.drafter, exp)  # the eagle head (spot: + its buffer) or None
  if head is not None:  # head params + optimizer state: in the orbax-saved train state
    state = state.replace(drafter=head.placed(exp.mesh))
  sh = jax.tree.map(lambda x: x.sharding, state)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
  if getattr(exp.engine, 'host_state', None) is not None:  # engine memory, host RNGs
    checkpointer.register('engine', exp.engine)
  if getattr(exp.drafter, 'host_state', None) is not None:  # e.g. the suffix history
    checkpointer.register('drafter', exp.drafter)
  guard = faults.NonFiniteGuard(faults.fault_config(config), checkpointer)
  checkpointer.register('nonfinite', guard, required=False)
  if head is not None:  # token counts / reduced vocabulary / warmed flag
    checkpointer.register('eagle_head', head)
  pipeline = make_pipeline(exp, timeline)
  checkpointer.register('rollouts', pipeline, required=False)  # rollouts still in flight
  async_rl.warn_if_nothing_overlaps(exp.async_cfg)
  start = 0
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(state)
    start = int(state.step)
    logging.info('resumed from %s at step %d', checkpointer.directory, start)
    if config.model.checkpoint:
      logging.info('model.checkpoint %s not used: resuming the run', config.model.checkpoint)
  elif config.model.checkpoint:
    logging.info('policy initialised from model.checkpoint %s', config.model.checkpoint)
  logging.info(
    'model: %d params; devices: %s; mesh %s; rollout mesh %s; rl.async_staleness %d',
    model_lib.count_params(state.params),
    jax.device_count(),
    dict(exp.mesh.shape),
    dict(exp.rollout_mesh.shape),
    exp.async_cfg.staleness,
  )
  fns = _jitted_steps(exp, sh)
  eval_cfg = evaluation.eval_config(config)
  evaluator = evaluation.Evaluator.from_experiment(exp) if eval_cfg.enabled else None
  progress = progress_lib.Progress(total, config.sft.steps, config.log_every)
  writer = metrics_io.tensorboard_writer(workdir)
  metrics_file = open(os.path.join(workdir, METRICS_FILE), 'a')  # noqa: SIM115
  history = []
  end = total if max_steps is None else min(total, max_steps)
  # validation reads the rollout side's params (the rollout mesh), published if not yet
  due = functools.partial(evaluation.validate_if_due, evaluator, sft_steps=config.sft.steps,
                          total=total)  # fmt: skip
  pending_eval = due(functools.partial(pipeline.current, state.params, 0), 0) if start == 0 else {}
  try:
    for step in range(start, end):
      if head is not None:  # the head's warm-up, once, before the first GRPO step
        state = head.before_step(exp, state, step)
      state, m = run_step(exp, state, step, fns, pipeline)
      if head is not None:  # the step donated the old head arrays: follow the new ones
        head.set_state(state.drafter)
      faults.fault_point('step', step, 'after_update')
      m['step'] = step
      published = functools.partial(pipeline.current, state.params, step + 1)
      m.update(pending_eval or due(published, step + 1))
      pending_eval = {}
      history.append(m)
      if writer is not None:
        for k, v in m.items():
          writer.add_scalar(k, v, m['eval/step'] if k.startswith('eval/') else step)
      metrics_file.write(json.dumps(m, default=metrics_io.json_number) + '\n')
      metrics_file.flush()
      progress.update(step, m['step_time_s'], progress_lib.step_line(step, total, m))
      if 'eval/step' in m:
        progress.message(evaluation.format_line(m))
      guard.after_step(step, m, logging.warning)  # raises faults.TrainingHalted
      faults.fault_point('step', step, 'after_metrics')
      if (step + 1) % config.checkpoint_every == 0 or step + 1 == end:
        checkpointer.save(step + 1, state)
  except KeyboardInterrupt:
    # The last completed step's state is intact unless the interrupt hit inside a
    # donated call; save it if we can, else the last periodic checkpoint stands.
    try:
      checkpointer.save(int(state.step), state)
      logging.warning('interrupted: saved state at step %d', int(state.step))
    except Exception:  # noqa: BLE001
      logging.warning('interrupted mid-step: resume from the last periodic checkpoint')
    raise
  finally:
    progress.close()
    if writer is not None:
      writer.close()
    metrics_file.close()
    checkpointer.close()
  if end == total and end > start:
    progress.message(report_lib.write_report(workdir))
  return state, history

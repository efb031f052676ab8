"""The train loop: supervised warm-up, then GRPO with (optionally speculative) rollouts.

``train_and_evaluate(config, workdir)`` is everything ``main.py`` does, importable from a
notebook. One readable loop:

  for step in range(start, sft.steps + rl.steps):
    warm-up: sft_step on generated worked solutions
    GRPO:    prompts(step) -> rollout(params) -> rewards -> advantages -> train_step

Determinism: prompts for step t come from ``np.random.default_rng([seed, t])`` and device
randomness from ``fold_in(state.rng, t)``, so a run resumed from a checkpoint continues
exactly as the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding

from specrl import checkpointing as ckpt_lib
from specrl import drafters, sampling
from specrl import model as model_lib
from specrl import rl as rl_lib
from specrl import rollout as rollout_lib
from specrl import sharding as shd
from specrl import tasks as tasks_lib


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


def _check_positive(config, names):
  for name in names:
    section, field = name.split('.')
    v = config[section][field]
    if v <= 0:
      raise ValueError(f'config.{name} must be > 0, got {v}')


def build_experiment(config: ml_collections.ConfigDict, mesh=None) -> Experiment:
  """Validates the whole config up front: a bad value fails here, naming the field."""
  _check_positive(config, ['rl.num_prompts', 'rl.lr', 'sft.batch_size', 'rl.grad_clip'])
  if config.sft.steps < 0 or config.rl.steps < 0:
    raise ValueError('config.sft.steps and config.rl.steps must be >= 0')
  if config.log_every <= 0 or config.checkpoint_every <= 0:
    raise ValueError('config.log_every and config.checkpoint_every must be > 0')
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  task = tasks_lib.make_task(config.task)
  if task.tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(
      f'config.model.vocab_size={model_cfg.vocab_size} is smaller than the '
      f"task tokenizer's {task.tokenizer.vocab_size}"
    )
  sp = sampling.SamplingParams(
    config.rollout.temperature, config.rollout.top_k, config.rollout.top_p
  )
  rl_cfg = rl_lib.RLConfig(
    num_generations=config.rl.num_generations,
    clip_eps=config.rl.clip_eps,
    clip_eps_high=config.rl.clip_eps_high,
    kl_coef=config.rl.kl_coef,
    aggregation=config.rl.aggregation,
    scale_advantages=config.rl.scale_advantages,
    temperature=sp.logprob_temperature,
    num_minibatches=config.rl.num_minibatches,
    num_epochs=config.rl.num_epochs,
  )
  drafter = drafters.make_drafter(config, model_cfg)
  # one source of k per engine: the static engine's num_draft, the adaptive engine's arms
  num_draft = config.rollout.num_draft if drafter is not None and not config.adaptive.enabled else 0
  if drafter is not None and not config.adaptive.enabled and num_draft < 1:
    raise ValueError(f'config.rollout.num_draft must be >= 1 with a drafter, got {num_draft}')
  rollout_cfg = rollout_lib.RolloutConfig(
    max_new_tokens=config.rollout.max_new_tokens or task.max_response_len,
    max_prompt_len=task.max_prompt_len,
    cache_len=config.rollout.cache_len,
    sampling=sp,
    eos_id=task.tokenizer.eos_id,
    pad_id=task.tokenizer.pad_id,
    num_draft=num_draft,
    verify_impl=config.rollout.verify_impl,
  )
  if mesh is None:
    mesh = shd.make_mesh(tuple(config.mesh_shape))
  sft_steps = config.sft.steps
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, config.sft.lr, max(config.sft.warmup_steps, 1)),
      optax.linear_schedule(0.0, config.rl.lr, max(config.rl.warmup_steps, 1)),
    ],
    boundaries=[sft_steps],
  )
  optimizer = rl_lib.make_optimizer(schedule, config.rl.weight_decay, config.rl.grad_clip)
  if config.adaptive.enabled:
    from specrl import adaptive

    policy = config.adaptive.policy if drafter is not None else 'never'
    a = config.adaptive
    acfg = adaptive.AdaptiveConfig(
      policy=policy,
      buckets=tuple(a.buckets),
      compaction=a.compaction,
      arms=tuple(a.arms),
      chunk_steps=a.chunk_steps,
      hysteresis=a.hysteresis,
      tlt_threshold=a.tlt_threshold,
      seed=config.seed,
    )
    engine = adaptive.AdaptiveRolloutEngine(model_cfg, rollout_cfg, acfg, drafter, mesh)
  else:
    engine = rollout_lib.RolloutEngine(model_cfg, rollout_cfg, mesh, drafter)
  return Experiment(config, model_cfg, rl_cfg, rollout_cfg, task, mesh, optimizer, drafter, engine)


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
  keep_ref = exp.rl_cfg.kl_coef > 0

  def init_fn(seed):
    rng = jax.random.key(seed)
    params = model_lib.init_params(exp.model_cfg, jax.random.fold_in(rng, 1))
    return rl_lib.init_train_state(params, exp.optimizer, jax.random.fold_in(rng, 2), keep_ref)

  abstract = jax.eval_shape(init_fn, 0)
  return jax.jit(init_fn, static_argnums=0, out_shardings=state_shardings(exp, abstract))(
    exp.config.seed
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
  if derives_draft_params(exp):
    # The next rollout's drafter is derived from the new params inside the same jitted
    # step: no separate drafter state to save, load or keep in sync.
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
  return sft, grpo


def derives_draft_params(exp: Experiment) -> bool:
  """True for drafters computed from the live policy params (the quantized self-drafter)."""
  return getattr(exp.drafter, 'name', None) == 'quantized'


# ----------------------------------------------------------------------------- one step


def data_rng(seed: int, step: int) -> np.random.Generator:
  return np.random.default_rng([seed, step])


def rollout_batch(exp: Experiment, params, step: int, rng, draft_params=None):
  """Sample prompts for ``step``, roll out G generations each, score them.

  Returns (training batch dict of numpy arrays, rewards [N*G], rollout output, metrics).
  """
  c = exp.config
  g = exp.rl_cfg.num_generations
  prompts = exp.task.sample_prompts(data_rng(c.seed, step), c.rl.num_prompts)
  toks = np.repeat(prompts.tokens, g, axis=0)
  lens = np.repeat(prompts.lengths, g, axis=0)
  answers = [a for a in prompts.answers for _ in range(g)]
  extra = {'estimate_costs': True} if isinstance(exp.engine, rollout_lib.RolloutEngine) else {}
  out, metrics = exp.engine.generate(
    params, toks, lens, jax.random.fold_in(rng, step), draft_params=draft_params, **extra
  )
  resp = np.asarray(out.response)
  length = np.asarray(out.length)
  rewards = np.array(
    [exp.task.reward(resp[i, : length[i]], answers[i]) for i in range(len(answers))], np.float32
  )
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


def run_step(exp: Experiment, state: rl_lib.TrainState, step: int, steps_fns, draft_params=None):
  """One step of the loop (warm-up or GRPO).

  ``draft_params``: drafter params derived from ``state.params`` by the previous GRPO step
  (None: derive them here). Returns (state, metrics dict of floats, next draft params).
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
    draft_params = None
  else:
    batch, _, _, m = rollout_batch(exp, state.params, step, state.rng, draft_params)
    t1 = time.perf_counter()
    state, tm, draft_params = grpo_fn(state, batch)
    tm = jax.device_get(tm)
    m.update({f'train/{k}': float(v) for k, v in tm.items()})
    m['train/time_s'] = time.perf_counter() - t1
    m['phase'] = 1.0
  m['step_time_s'] = time.perf_counter() - t0
  return state, m, draft_params


# ----------------------------------------------------------------------------- loop


def _writer(workdir):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # pragma: no cover - tensorboardX is in requirements.txt
    logging.warning('tensorboardX not installed: no TensorBoard events')
    return None
  return SummaryWriter(os.path.join(workdir, 'tb'))


def _log_line(step, total, m) -> str:
  if m.get('phase', 0) == 0:
    return f'[{step + 1}/{total}] sft loss {m["sft_loss"]:.4f}  {m["step_time_s"]:.2f}s'
  line = (
    f'[{step + 1}/{total}] reward {m["reward"]:.3f} acc {m["accuracy"]:.3f} '
    f'len {m["response_len_mean"]:.1f}/{m["response_len_max"]} '
    f'rollout {m["rollout/time_s"]:.2f}s ({m["rollout/tokens_per_s"]:.0f} tok/s) '
    f'train {m["train/time_s"]:.2f}s'
  )
  if 'spec/alpha' in m:
    line += f' | accept {m["spec/alpha"]:.2f} tok/pass {m["spec/tokens_per_pass"]:.2f}'
  if 'spec/draft_time_est_s' in m:
    line += f' draft/verify {m["spec/draft_time_est_s"]:.2f}/{m["spec/verify_time_est_s"]:.2f}s'
  if 'adaptive/chunks' in m:
    ks = ' '.join(
      f'{k.split("/")[-1]}:{"plain" if v == 0 else f"k{v}"}'
      for k, v in m.items()
      if k.startswith('adaptive/k/')
    )
    line += (
      f' | adaptive {m["adaptive/compactions"]} compactions, spec '
      f'{100 * m["adaptive/spec_time_frac"]:.0f}% of decode, {ks}'
    )
    if m.get('adaptive/compile_s', 0) > 0:
      line += f' (compiled {m["adaptive/compile_s"]:.1f}s)'
  return line


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, mesh=None, max_steps: int | None = None
):
  """Run (or resume) the experiment in ``workdir``. Returns (final state, metric history).

  ``max_steps`` stops early after that global step (used by tests and notebooks).
  """
  exp = build_experiment(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  total = config.sft.steps + config.rl.steps
  state = init_state(exp)
  sh = jax.tree.map(lambda x: x.sharding, state)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
  start = 0
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(state)
    start = int(state.step)
    logging.info('resumed from %s at step %d', checkpointer.directory, start)
  logging.info(
    'model: %d params; devices: %s; mesh %s',
    model_lib.count_params(state.params),
    jax.device_count(),
    dict(exp.mesh.shape),
  )
  fns = _jitted_steps(exp, sh)
  writer = _writer(workdir)
  history = []
  end = total if max_steps is None else min(total, max_steps)
  draft_params = None
  try:
    for step in range(start, end):
      state, m, draft_params = run_step(exp, state, step, fns, draft_params)
      m['step'] = step
      history.append(m)
      if writer is not None:
        for k, v in m.items():
          writer.add_scalar(k, v, step)
      if step % config.log_every == 0 or step == end - 1:
        logging.info(_log_line(step, total, m))
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
    if writer is not None:
      writer.close()
    checkpointer.close()
  return state, history

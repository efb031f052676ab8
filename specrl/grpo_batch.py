"""One GRPO batch: prompts -> rollout -> rewards -> the train batch; and the loop's
rollout pipeline that produces them (synchronously or ``rl.async_staleness`` steps ahead).

One job: the rollout side of a GRPO step. A drafter that drafts from earlier answers
(:class:`specrl.drafters.hooks.PromptHistory`) gets its history arrays here and records
the new answers; a drafter whose params are derived in the train step
(``hooks.derives_in_train_step``) has them derived on the rollout mesh by the pipeline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from specrl import async_rl, faults
from specrl import model as model_lib
from specrl import rl as rl_lib
from specrl import rollout as rollout_lib
from specrl import sharding as shd
from specrl import tasks as tasks_lib
from specrl.drafters import hooks


def rollout_batch(exp, params, step: int, rng, draft_params=None):
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
  history = isinstance(exp.drafter, hooks.PromptHistory)  # drafts from earlier answers
  if history:
    if draft_params is None and hooks.derives_in_train_step(exp.drafter):  # the first rollout
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
  if exp.rl_cfg.trim_length:  # the longest answer's (bucketed) length, not the buffer's
    batch = rl_lib.trim_batch(batch)
  correct = [exp.task.is_correct(resp[i, : length[i]], answers[i]) for i in range(len(answers))]
  metrics.update(
    {
      'reward': float(rewards.mean()),
      'accuracy': float(np.mean(correct)),
      'response_len_mean': float(length.mean()),
      'response_len_max': int(length.max()),
      'train_seq_len': int(batch['tokens'].shape[1]),
      'finish_eos_frac': float((np.asarray(out.finish) == rollout_lib.FINISH_EOS).mean()),
    }
  )
  return batch, rewards, out, metrics


def make_pipeline(exp, timeline=None) -> async_rl.RolloutPipeline:
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

  derives = hooks.derives_in_train_step(exp.drafter)
  derive = jax.jit(exp.drafter.params_from_policy) if derives else None
  return async_rl.RolloutPipeline(exp.async_cfg, rollout_fn, to_rollout, derive, total, timeline)

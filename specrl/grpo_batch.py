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
from specrl import multihost as mh
from specrl import rl as rl_lib
from specrl import rollout as rollout_lib
from specrl import sharding as shd
from specrl import tasks as tasks_lib
from specrl.drafters import hooks


def rollout_batch(exp, params, step: int, rng, draft_params=None):
  """Sample prompts for ``step``, roll out G generations each, score them.

  ``rng``: a stream key (``exp.rngs.rollout`` in training, ``exp.rngs.eval`` for held-out
  evaluation); the rollout uses ``fold_in(rng, step)``.

  Several processes (:mod:`specrl.multihost`): every process draws the same prompts and
  takes its block of them (``rl.num_prompts / process_count`` prompts, so its rows are a
  multiple of G and GRPO groups stay on it); it rolls out, scores and builds the batch of
  its own rows; the metrics are over all rows (the per-row numbers all-gathered, so every
  process logs the same values a single process would).

  Returns (training batch dict of numpy arrays: this process's rows, rewards [rows], rollout
  output (global arrays), metrics).
  """
  c = exp.config
  g = exp.rl_cfg.num_generations
  prompts = exp.task.prompts_for_step(c.seed, step, c.rl.num_prompts)
  mine = np.arange(len(prompts.lengths))[mh.process_rows(len(prompts.lengths))]
  toks = np.repeat(prompts.tokens[mine], g, axis=0)
  lens = np.repeat(prompts.lengths[mine], g, axis=0)
  answers = [prompts.answers[i] for i in mine for _ in range(g)]
  extra = {}
  if isinstance(exp.engine, rollout_lib.RolloutEngine):  # static engine: its cost profile
    extra['estimate_costs'] = bool(c.rollout.get('estimate_costs', True))
  all_prompt_ids = np.repeat(tasks_lib.prompt_ids(prompts), g)  # every process's rows
  row_prompt_ids = np.repeat(tasks_lib.prompt_ids(prompts)[mine], g)
  history = isinstance(exp.drafter, hooks.PromptHistory)  # drafts from earlier answers
  if history:
    if draft_params is None and hooks.derives_in_train_step(exp.drafter):  # the first rollout
      draft_params = jax.jit(exp.drafter.params_from_policy)(params)
    width = exp.rollout_cfg.max_new_tokens
    # the history of the global batch's rows (the store is the same on every process)
    draft_params = exp.drafter.history_params(all_prompt_ids, width, draft_params)
  out, metrics = exp.engine.generate(
    params,
    toks,
    lens,
    jax.random.fold_in(rng, step),
    draft_params=draft_params,
    group_ids=np.repeat(mine.astype(np.int32), g),
    prompt_ids=row_prompt_ids,
    **extra,
  )
  resp = mh.local_rows(out.response)
  length = mh.local_rows(out.length)
  if history:  # every process records every row: the stores stay equal (all-gathered)
    exp.drafter.record(all_prompt_ids, mh.allgather_rows(resp), mh.allgather_rows(length))
    metrics['spec/history_bytes'] = exp.drafter.memory_bytes()
  rewards = np.array(
    [exp.task.reward(resp[i, : length[i]], answers[i]) for i in range(len(answers))], np.float32
  )
  faults.check_rewards(exp.task.name, rewards, answers)
  s = exp.rollout_cfg.seq_len
  pos = np.arange(s)[None, :]
  plen = mh.local_rows(out.prompt_len)[:, None]
  mask = ((pos >= plen) & (pos < plen + length[:, None])).astype(np.float32)
  adv = np.asarray(rl_lib.grpo_advantages(jnp.asarray(rewards), g, exp.rl_cfg.scale_advantages))
  batch = {
    'tokens': mh.local_rows(out.tokens)[:, :s],
    'response_mask': mask,
    'old_logprobs': mh.local_rows(out.logprobs)[:, :s] * mask,
    'advantages': adv,
  }
  if exp.rl_cfg.trim_length:  # the longest answer's (bucketed) length, not the buffer's
    # (over every process's rows: the train step's shape is global)
    n = rl_lib.trimmed_length(mask, s)
    n = int(mh.allgather_rows(np.asarray([n])).max())
    batch = {k: v[:, :n] if v.ndim == 2 else v for k, v in batch.items()}
  correct = [exp.task.is_correct(resp[i, : length[i]], answers[i]) for i in range(len(answers))]
  finish = mh.local_rows(out.finish) == rollout_lib.FINISH_EOS
  # per-row numbers of every process (one process: its own), so the means are the batch's
  all_rewards, all_correct, all_len, all_eos = (
    mh.allgather_rows(x) for x in (rewards, np.asarray(correct), length, finish)
  )
  metrics.update(
    {
      'reward': float(all_rewards.mean()),
      'accuracy': float(np.mean(all_correct)),
      'response_len_mean': float(all_len.mean()),
      'response_len_max': int(all_len.max()),
      'train_seq_len': int(batch['tokens'].shape[1]),
      'finish_eos_frac': float(all_eos.mean()),
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
    if mh.is_multiprocess() and exp.async_cfg.split:  # each process copies its own shards
      return mh.copy_to_devices(params, sh)
    return jax.device_put(params, sh, may_alias=False)

  derives = hooks.derives_in_train_step(exp.drafter)
  derive = jax.jit(exp.drafter.params_from_policy) if derives else None
  return async_rl.RolloutPipeline(exp.async_cfg, rollout_fn, to_rollout, derive, total, timeline)

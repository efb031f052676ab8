"""The train state's shardings and the run's jitted steps.

One job: place the :class:`specrl.rl.TrainState` on the train mesh (params by
``PARAM_RULES``, optimizer leaves like their params, the rest replicated) and compile the
supervised and GRPO steps of an :class:`specrl.experiment.Experiment` over it, with the
state donated. What the drafter needs from the step is asked through the protocol: draft
params re-derived from the new params (``hooks.derives_in_train_step``) and a drafter
trainer's update fused in (``DrafterTrainer.wrap_grpo``).
"""

from __future__ import annotations

import functools

import jax
import optax
from jax.sharding import NamedSharding

from specrl import model as model_lib
from specrl import multihost as mh
from specrl import rl as rl_lib
from specrl import sharding as shd
from specrl import train_fit
from specrl.drafters import hooks
from specrl.rng_streams import rng_streams


def state_shardings(exp, abstract_state: rl_lib.TrainState):
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


def init_state(exp) -> rl_lib.TrainState:
  """The initial train state: params from ``config.model.checkpoint`` if set (placed with
  the train shardings), else initialised from the params RNG stream. A drafter trainer's
  initial state (``TrainState.drafter``) is added by the loop."""
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


def batch_sharding(exp, ndim: int) -> NamedSharding:
  """A train batch array of ``ndim`` dims: rows over the mesh's batch axes."""
  spec = shd.logical_to_spec(
    ('batch',) + (None,) * (ndim - 1), (0,) * ndim, exp.mesh, shd.TRAIN_RULES
  )
  return NamedSharding(exp.mesh, spec)


def global_batch(exp, batch):
  """A train batch of this process's rows (numpy) -> global arrays laid out by
  :func:`batch_sharding` (:func:`specrl.multihost.global_rows`); one process: as is (the
  jitted step places it)."""
  if not mh.is_multiprocess():
    return batch
  if isinstance(batch, dict):
    return {k: mh.global_rows(v, batch_sharding(exp, v.ndim)) for k, v in batch.items()}
  return tuple(mh.global_rows(v, batch_sharding(exp, v.ndim)) for v in batch)


def jitted_steps(exp, state_sh):
  """``(sft_fn, grpo_fn)``: ``sft_fn(state, tokens, mask) -> (state, metrics)`` and
  ``grpo_fn(state, batch) -> (state, metrics, draft_params)`` (``draft_params``: the next
  rollout's, computed from the new params in the same call for a drafter that derives them
  in the train step; else None). Both donate ``state``."""
  cfg, mesh = exp.model_cfg, exp.mesh
  # A configuration that cannot fit is refused now, naming the knob, not at the first step.
  train_fit.check_train_fits(
    cfg,
    exp.rl_cfg,
    exp.config.rl.num_prompts * exp.rl_cfg.num_generations,
    exp.rollout_cfg.seq_len,
    model_lib.count_params(jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))),
    train_fit.device_memory_bytes(mesh.devices.flat[0]) * mesh.size,  # the mesh's memory
  )
  b2, b1 = batch_sharding(exp, 2), batch_sharding(exp, 1)
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
  if hooks.derives_in_train_step(exp.drafter) and exp.async_cfg.rollout_reads_train_params:
    # The next rollout's drafter is derived from the new params inside the same jitted
    # step: no separate drafter state to save, load or keep in sync. (When the rollout
    # reads a copy, async_rl derives it from the copy on the rollout mesh instead.)
    def grpo_fn(state, batch):
      state, metrics = step_fn(state, batch)
      return state, metrics, exp.drafter.params_from_policy(state.params)

  else:

    def grpo_fn(state, batch):
      return (*step_fn(state, batch), None)

  grpo = jax.jit(
    grpo_fn,
    in_shardings=(state_sh, batch_sh),
    out_shardings=(state_sh, None, None),
    donate_argnums=(0,),
  )
  trainer = exp.drafter_trainer
  if trainer is not None:  # the drafter's update fused into (or around) the GRPO step
    grpo = trainer.wrap_grpo(exp, step_fn, grpo, state_sh, batch_sh)
  return sft, grpo

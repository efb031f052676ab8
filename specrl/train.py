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
randomness from independent streams derived once from the seed
(:class:`specrl.rng_streams.RngStreams`: the
rollout at step t uses ``fold_in(rollout, t)``, the GRPO shuffle ``fold_in(state.rng, t)``
with ``state.rng`` the train stream), so a run resumed from a checkpoint continues
exactly as the uninterrupted run would.

This module is the loop and nothing else. What it runs is built elsewhere:
:mod:`specrl.run_config` (config checks), :mod:`specrl.experiment` (the static parts),
:mod:`specrl.train_steps` (shardings, jitted steps), :mod:`specrl.grpo_batch` (a GRPO
rollout and its batch; the rollout pipeline). A drafter that trains online takes part
through :class:`specrl.drafters.hooks.DrafterTrainer`, never by name.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import ml_collections
from absl import logging

from specrl import async_rl, evaluation, faults, metrics_io, multihost
from specrl import checkpointing as ckpt_lib
from specrl import model as model_lib
from specrl import progress as progress_lib
from specrl import report as report_lib
from specrl import rl as rl_lib

# The names below are the library API a notebook or benchmark uses next to the loop; each
# lives in the module whose one job it is (re-exported so ``train.<name>`` keeps working).
from specrl.experiment import Experiment, build_experiment  # noqa: F401
from specrl.grpo_batch import make_pipeline, rollout_batch  # noqa: F401
from specrl.metrics_io import METRICS_FILE, read_metrics  # noqa: F401
from specrl.rng_streams import data_rng
from specrl.train_steps import global_batch, init_state, jitted_steps  # noqa: F401


def sft_len(exp: Experiment) -> int:
  """Positions of a warm-up (SFT) batch: the task's longest prompt + worked solution, at
  most the rollout buffer -- one static shape, and a 32k token budget does not make every
  warm-up step a 32k-position forward (with the task's default budget: the buffer)."""
  task = exp.task
  return min(exp.rollout_cfg.seq_len, task.max_prompt_len + task.max_response_len)


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
    toks, mask = exp.task.sample_sft(data_rng(c.seed, step), c.sft.batch_size, sft_len(exp))
    own = multihost.process_rows(c.sft.batch_size)  # this process's rows (all, with one)
    state, m = sft_fn(state, *global_batch(exp, (toks[own], mask[own])))
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    m['phase'] = 0.0
  else:
    pipeline = pipeline or make_pipeline(exp)
    timeline = pipeline.timeline
    pipeline.current(state.params, step)  # published already, except at the first step
    batch, m = pipeline.take(step)
    faults.fault_point('step', step, 'after_rollout')
    t1 = time.perf_counter()
    batch = global_batch(exp, batch)  # this process's rows -> the global batch
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
  exp: Experiment | None = None,
):
  """Run (or resume) the experiment in ``workdir``. Returns (final state, metric history).

  ``max_steps`` stops early after that global step (used by tests and notebooks);
  ``timeline`` records rollout / train / transfer spans (benchmarks); ``exp``: the
  experiment already built from ``config`` (``main.py`` builds it first, to report a bad
  config in one line), else built here.
  Validation (:mod:`specrl.evaluation`, config section ``eval``) runs at the start of
  GRPO, every ``eval.every`` GRPO steps and at the end; its ``eval/...`` metrics join the
  dict of the step after which they were taken (``eval/step``: the optimizer steps the
  evaluated params had). A run that reaches the last step writes ``report.md`` and
  ``report.png`` (:mod:`specrl.report`).
  """
  exp = exp if exp is not None else build_experiment(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  total = config.sft.steps + config.rl.steps
  state = init_state(exp)
  trainer = exp.drafter_trainer  # a drafter trained online (the eagle head), or None
  if trainer is not None:  # its device state: in the orbax-saved train state
    state = state.replace(drafter=trainer.init_state(exp.mesh))
  sh = jax.tree.map(lambda x: x.sharding, state)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
  if isinstance(exp.engine, ckpt_lib.HostState):  # engine memory, host RNGs
    checkpointer.register('engine', exp.engine)
  if isinstance(exp.drafter, ckpt_lib.HostState):  # e.g. the suffix history
    checkpointer.register('drafter', exp.drafter)
  guard = faults.NonFiniteGuard(faults.fault_config(config), checkpointer)
  checkpointer.register('nonfinite', guard, required=False)
  if isinstance(trainer, ckpt_lib.HostState):  # e.g. the head's token counts
    checkpointer.register(trainer.name, trainer)
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
  fns = jitted_steps(exp, sh)
  eval_cfg = evaluation.eval_config(config)
  evaluator = evaluation.Evaluator.from_experiment(exp) if eval_cfg.enabled else None
  # Several processes: process 0 alone writes TensorBoard, metrics.jsonl, the progress line,
  # the per-prompt validation rows and the report (every process computes the same
  # metrics); all of them checkpoint.
  primary = multihost.is_primary()
  progress = progress_lib.Progress(
    total, config.sft.steps, config.log_every, stream=None if primary else open(os.devnull, 'w')
  )
  writer = metrics_io.tensorboard_writer(workdir) if primary else None
  metrics_file = open(os.path.join(workdir, METRICS_FILE), 'a') if primary else None  # noqa: SIM115
  # per-prompt validation scores (paired before / after intervals in the report)
  eval_rows_file = (
    open(os.path.join(workdir, report_lib.EVAL_ROWS_FILE), 'a') if primary else None  # noqa: SIM115
  )
  history = []
  end = total if max_steps is None else min(total, max_steps)
  # validation reads the rollout side's params (the rollout mesh), published if not yet
  due = functools.partial(evaluation.validate_if_due, evaluator, sft_steps=config.sft.steps,
                          total=total)  # fmt: skip
  pending_eval = due(functools.partial(pipeline.current, state.params, 0), 0) if start == 0 else {}
  try:
    for step in range(start, end):
      if trainer is not None:  # e.g. the head's warm-up, once, before the first GRPO step
        state = trainer.before_step(exp, state, step)
      state, m = run_step(exp, state, step, fns, pipeline)
      if trainer is not None:  # the step donated the old drafter arrays: follow the new ones
        trainer.after_step(state)
      faults.fault_point('step', step, 'after_update')
      m['step'] = step
      published = functools.partial(pipeline.current, state.params, step + 1)
      m.update(pending_eval or due(published, step + 1))
      pending_eval = {}
      if 'eval/step' in m and evaluator is not None and evaluator.last_rows and primary:
        eval_rows_file.write(json.dumps({'step': m['eval/step'], **evaluator.last_rows}) + '\n')
        eval_rows_file.flush()
      history.append(m)
      if writer is not None:
        for k, v in m.items():
          writer.add_scalar(k, v, m['eval/step'] if k.startswith('eval/') else step)
      if metrics_file is not None:
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
    for f in (metrics_file, eval_rows_file):
      if f is not None:
        f.close()
    checkpointer.close()
  if end == total and end > start and primary:
    progress.message(report_lib.write_report(workdir))
  return state, history

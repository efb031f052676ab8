"""Validation on the task's held-out split: one function for the loop, tests, benchmarks
and the notebook.

:class:`Evaluator` scores a policy on the first ``eval.prompts`` prompts of
``task.heldout_prompts`` (a fixed pool that training never draws, see :mod:`specrl.tasks`):

- ``eval.generations`` samples per prompt at the rollout temperature, through the training
  rollout engine (so with a drafter it also measures acceptance): mean reward, accuracy
  (exact answer, per sample), pass@1 and pass@G, response length, 95% confidence
  intervals over prompts;
- with ``eval.greedy``, one greedy (temperature 0) decode per prompt: greedy accuracy;
- for a task with a format-agnostic check (``task.final_line_correct``: the right number
  anywhere in the response's last line), that accuracy beside the reward's
  (``eval/final_line_accuracy``, ``eval/greedy_final_line_accuracy``), so a gain in answer
  format alone shows as such.

Per-prompt scores of the last call stay in ``Evaluator.last_rows`` (the train loop writes
them to ``eval_rows.jsonl``) for paired intervals between evaluations (:func:`paired_diff`).

Deterministic for fixed params: sampled chunk ``i`` uses ``fold_in(rng, i)`` of the eval
stream (:class:`specrl.rng_streams.RngStreams`), never a training key, and the adaptive engine's
learned state is restored afterwards, so evaluating changes nothing in training. Timing
keys (``eval/time_s``, ``eval/tokens_per_s``) are the only ones that vary between calls.

Prompts are rolled out ``chunk_prompts`` at a time (the GRPO batch's prompt count, so with
``eval.generations == rl.num_generations`` the rollout reuses the training compile); the
last chunk is filled by repeating prompts, whose rows are dropped. Chunks are rounded up so
their rows divide the devices the mesh shards the batch over and the processes
(:func:`chunk_sizes`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import types

import jax
import numpy as np

from specrl import config as config_lib
from specrl import multihost as mh
from specrl import rollout as rollout_lib
from specrl import sampling
from specrl import sharding as shd
from specrl import tasks as tasks_lib

PREFIX = 'eval/'
TIMING_KEYS = ('eval/time_s', 'eval/tokens_per_s')  # the only keys that vary between calls
Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The ``eval`` config section.

  every: GRPO steps between validations (0 = only at the start and end of GRPO).
  prompts: held-out prompts scored (0 = no validation).
  generations: samples per prompt at the rollout temperature (pass@1, reward, ...); 0 with
    ``greedy``: the greedy decode only (half the cost when one sample per prompt is noise).
  greedy: also decode each prompt once greedily (``eval/greedy_accuracy``).
  """

  every: int = 20
  prompts: int = 64
  generations: int = 8
  greedy: bool = True

  def __post_init__(self):
    if self.every < 0 or self.prompts < 0:
      raise ValueError(
        f'config.eval.every and config.eval.prompts must be >= 0, got {self.every}, {self.prompts}'
      )
    if self.generations < (0 if self.greedy else 1):
      raise ValueError(
        'config.eval.generations must be >= 1 (or 0 with eval.greedy: greedy only), got '
        f'{self.generations}'
      )

  @property
  def enabled(self) -> bool:
    return self.prompts > 0


def eval_config(config) -> EvalConfig:
  """EvalConfig from ``config.eval`` (unknown keys refused by ``from_config``)."""
  return config_lib.from_config(EvalConfig, config.eval, 'eval')


def due_after(updates: int, sft_steps: int, total: int, every: int) -> bool:
  """Whether to validate params that have had ``updates`` optimizer steps: at the start of
  GRPO (``updates == sft_steps``), every ``every`` GRPO steps, and at the end (``total``)."""
  if updates < sft_steps or updates > total or sft_steps == total:
    return False
  rl_done = updates - sft_steps
  return rl_done == 0 or updates == total or (every > 0 and rl_done % every == 0)


def mean_ci(x) -> tuple[float, float]:
  """Mean of ``x`` [n] and the half-width of its 95% normal confidence interval
  (``1.96 * sd / sqrt(n)``; 0 for n < 2)."""
  x = np.asarray(x, np.float64)
  if x.size < 2:
    return float(x.mean()), 0.0
  return float(x.mean()), float(Z95 * x.std(ddof=1) / np.sqrt(x.size))


def paired_diff(before, after) -> tuple[float, float]:
  """Mean of ``after - before`` over the same prompts and the half-width of its 95%
  interval (paired: the per-prompt differences' spread, not the two runs' added)."""
  d = np.asarray(after, np.float64) - np.asarray(before, np.float64)
  return mean_ci(d)


def batch_devices(mesh) -> int:
  """Devices a rollout batch is split over (``sharding.DECODE_RULES``' batch axes)."""
  spec = shd.logical_to_spec(('batch',), (0,), mesh, shd.DECODE_RULES)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
  return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def round_chunk(prompts: int, g: int, devices: int) -> int:
  """The smallest chunk ``>= prompts`` whose ``chunk * g`` rows ``devices`` divides."""
  return next(
    p for p in range(max(prompts, 1), max(prompts, 1) + devices + 1) if p * g % devices == 0
  )


def chunk_sizes(
  cfg: EvalConfig, n_prompts: int, rl_num_prompts: int, devices: int, processes: int = 1
) -> tuple[int, int]:
  """(prompts per sampled chunk, prompts per greedy chunk) for ``n_prompts`` held-out
  prompts: the GRPO batch's prompt count at most (reusing its compile), rounded up so a
  chunk's rows split evenly over the ``devices`` the batch is sharded over *and* over the
  ``processes`` (each process rolls out an equal block, :func:`specrl.multihost.process_rows`):
  to a multiple of their lcm. So any eval config splits over any process count (filler
  prompts repeat real ones, their rows dropped); never a failure mid-run."""
  split = math.lcm(max(devices, 1), max(processes, 1))
  sampled = round_chunk(min(rl_num_prompts, n_prompts), max(cfg.generations, 1), split)
  return sampled, round_chunk(n_prompts, 1, split)


def _take(prompts: tasks_lib.PromptBatch, idx) -> tasks_lib.PromptBatch:
  return tasks_lib.PromptBatch(
    prompts.tokens[idx], prompts.lengths[idx], [prompts.answers[i] for i in idx]
  )


def _rollout_rows(engine, params, prompts, g, chunk_prompts, rng, draft_params):
  """Roll out ``g`` samples of each prompt, ``chunk_prompts`` prompts per call.

  Returns (per-row responses [list of int arrays], row prompt index [R], the count fields
  of the outputs concatenated over real rows, seconds)."""
  n = len(prompts.lengths)
  responses, owner, counts, seconds = [], [], [], 0.0
  fields = ('length', 'num_rounds', 'num_accepted', 'num_drafted', 'reached', 'accepted_at')
  ids = tasks_lib.prompt_ids(prompts)
  for c, lo in enumerate(range(0, n, chunk_prompts)):
    idx = np.arange(lo, lo + chunk_prompts) % n  # the last chunk repeats prompts
    real = np.repeat(np.arange(lo, lo + chunk_prompts) < n, g)
    chunk = _take(prompts, idx)
    # several processes: each rolls out its block of the chunk's rows, every process then
    # reads all of them (one all-gather; the same scores everywhere)
    own = mh.process_rows(chunk_prompts * g)
    t0 = time.perf_counter()
    out, _ = engine.generate(
      params,
      np.repeat(chunk.tokens, g, axis=0)[own],
      np.repeat(chunk.lengths, g, axis=0)[own],
      jax.random.fold_in(rng, c),
      draft_params=draft_params,
      group_ids=np.repeat(np.arange(chunk_prompts, dtype=np.int32), g)[own],
      prompt_ids=np.repeat(ids[idx], g)[own],
    )
    out = mh.to_host(out)
    seconds += time.perf_counter() - t0
    resp, length = np.asarray(out.response), np.asarray(out.length)
    for r in np.flatnonzero(real):
      responses.append(resp[r, : length[r]])
    owner.append(np.repeat(idx, g)[real])
    counts.append({f: np.asarray(getattr(out, f))[real] for f in fields})
  merged = {f: np.concatenate([c[f] for c in counts]) for f in fields}
  return responses, np.concatenate(owner), merged, seconds


class Evaluator:
  """Scores params on the held-out prompts; ``__call__(params, draft_params=None) -> dict``
  of ``eval/...`` floats (see the module doc). Holds the greedy engine, so build one per
  experiment and reuse it (its rollouts compile once)."""

  def __init__(
    self,
    cfg: EvalConfig,
    task,
    engine,
    rng,
    chunk_prompts: int,
    greedy_engine=None,
    devices=1,
    processes=1,
  ):
    if not cfg.enabled:
      raise ValueError('config.eval.prompts = 0: validation is off')
    self.cfg, self.task, self.engine, self.rng = cfg, task, engine, rng
    self.prompts = task.heldout_prompts(cfg.prompts)
    n = len(self.prompts.lengths)
    self.chunk_prompts, self.greedy_chunk = chunk_sizes(cfg, n, chunk_prompts, devices, processes)
    self.greedy_engine = greedy_engine
    self.last_rows: dict[str, list[float]] = {}  # per-prompt scores of the last call

  @classmethod
  def from_experiment(cls, exp) -> Evaluator:
    """From a :class:`specrl.experiment.Experiment`: its task, rollout engine, eval RNG stream
    and ``config.eval``; the greedy engine is a plain engine at temperature 0."""
    cfg = eval_config(exp.config)
    greedy = None
    if cfg.greedy:
      rcfg = dataclasses.replace(
        exp.rollout_cfg, sampling=sampling.SamplingParams(temperature=0.0), num_draft=0
      )
      greedy = rollout_lib.RolloutEngine(exp.model_cfg, rcfg, exp.engine.mesh)
    devices = batch_devices(exp.engine.mesh)
    return cls(
      cfg,
      exp.task,
      exp.engine,
      exp.rngs.eval,
      exp.config.rl.num_prompts,
      greedy,
      devices,
      mh.process_count(),
    )

  def _correct_and_reward(self, responses, owner):
    """Per row: reward, correct (the reward's check) and, for a task with the
    format-agnostic check (``final_line_correct``), that check (else None)."""
    answers = self.prompts.answers
    rows = list(zip(responses, owner, strict=True))
    reward = np.array([self.task.reward(r, answers[i]) for r, i in rows])
    correct = np.array([self.task.is_correct(r, answers[i]) for r, i in rows], np.float64)
    loose = getattr(self.task, 'final_line_correct', None)
    final = None if loose is None else np.array([loose(r, answers[i]) for r, i in rows], np.float64)
    return reward, correct, final

  def _sampled(self, params, draft_params, m, rows):
    """The ``eval.generations`` samples per prompt: their metrics into ``m``, per-prompt
    scores into ``rows``."""
    g, n = self.cfg.generations, len(self.prompts.lengths)
    # The adaptive engine learns from every rollout: evaluation must not teach it.
    saved = self.engine.host_state() if hasattr(self.engine, 'host_state') else None
    try:
      responses, owner, counts, secs = _rollout_rows(
        self.engine, params, self.prompts, g, self.chunk_prompts, self.rng, draft_params
      )
    finally:
      if saved is not None:
        self.engine.load_host_state(saved)
    reward, correct, final = self._correct_and_reward(responses, owner)
    per_prompt = lambda x: np.bincount(owner, x, minlength=n) / g  # noqa: E731
    c = np.bincount(owner, correct, minlength=n)
    rows['accuracy'] = per_prompt(correct)
    (m['reward'], m['reward_ci95']) = mean_ci(per_prompt(reward))
    (m['accuracy'], m['accuracy_ci95']) = mean_ci(rows['accuracy'])
    if final is not None:
      rows['final_line_accuracy'] = per_prompt(final)
      (m['final_line_accuracy'], m['final_line_accuracy_ci95']) = mean_ci(
        rows['final_line_accuracy']
      )
    m['pass_at_1'] = float(np.mean(c / g))  # unbiased pass@1 (= accuracy: G samples per prompt)
    m[f'pass_at_{g}'] = float(np.mean(c > 0))
    m['response_len_mean'] = float(counts['length'].mean())
    m['response_len_max'] = int(counts['length'].max())
    rm = rollout_lib.rollout_metrics(types.SimpleNamespace(**counts), secs)
    m['tokens_per_s'], m['time_s'] = rm['rollout/tokens_per_s'], secs
    m.update({k: v for k, v in rm.items() if k.startswith('spec/')})

  def __call__(self, params, draft_params=None) -> dict[str, float]:
    g, n = self.cfg.generations, len(self.prompts.lengths)
    m = {'prompts': n, 'generations': g, 'time_s': 0.0}
    rows = {}
    if g > 0:
      self._sampled(params, draft_params, m, rows)
    if self.greedy_engine is not None:
      t0 = time.perf_counter()
      gr, gowner, gcounts, _ = _rollout_rows(
        self.greedy_engine, params, self.prompts, 1, self.greedy_chunk, self.rng, None
      )
      m['greedy_response_len_mean'] = float(gcounts['length'].mean())
      if g == 0:  # greedy only: its lengths are the response lengths
        m['response_len_mean'] = m['greedy_response_len_mean']
        m['response_len_max'] = int(gcounts['length'].max())
      greward, gcorrect, gfinal = self._correct_and_reward(gr, gowner)
      order = np.argsort(gowner, kind='stable')  # rows in prompt order
      rows['greedy_accuracy'] = gcorrect[order]
      (m['greedy_accuracy'], m['greedy_accuracy_ci95']) = mean_ci(gcorrect)
      if gfinal is not None:
        rows['greedy_final_line_accuracy'] = gfinal[order]
        (m['greedy_final_line_accuracy'], m['greedy_final_line_accuracy_ci95']) = mean_ci(gfinal)
      m['greedy_reward'] = float(greward.mean())
      m['time_s'] += time.perf_counter() - t0
    # per-prompt scores of this call (held-out prompt order), for paired intervals between
    # two evaluations of the same prompts (:func:`paired_diff`, the run's eval_rows.jsonl)
    self.last_rows = {k: v.tolist() for k, v in rows.items()}
    return {PREFIX + k: v for k, v in m.items()}


def validate_if_due(
  evaluator: Evaluator | None, params_fn, updates: int, *, sft_steps: int, total: int
) -> dict[str, float]:
  """The loop's hook: ``evaluator(*params_fn())`` plus ``eval/step = updates`` when
  :func:`due_after` says so (``{}`` otherwise, or without an evaluator). ``params_fn() ->
  (params, draft_params)`` on the engine's mesh, called only when validation is due."""
  if evaluator is None or not due_after(updates, sft_steps, total, evaluator.cfg.every):
    return {}
  m = evaluator(*params_fn())
  m['eval/step'] = updates
  return m


def format_line(m: dict) -> str:
  """One log line of validation results (``eval/...`` keys of ``m``)."""
  g = int(m['eval/generations'])
  line = f'validation after {int(m["eval/step"])} steps ({int(m["eval/prompts"])} held-out prompts'
  if g > 0:
    line += (
      f' x {g}): reward {m["eval/reward"]:.3f}±{m["eval/reward_ci95"]:.3f} '
      f'acc {m["eval/accuracy"]:.3f}±{m["eval/accuracy_ci95"]:.3f} '
      f'pass@{g} {m[f"eval/pass_at_{g}"]:.3f}'
    )
  else:
    line += ', greedy only):'
  line += f' len {m["eval/response_len_mean"]:.1f}'
  if 'eval/final_line_accuracy' in m:
    line += f' final-line acc {m["eval/final_line_accuracy"]:.3f}'
  if 'eval/greedy_accuracy' in m:
    line += f' greedy acc {m["eval/greedy_accuracy"]:.3f}'
  if 'eval/greedy_final_line_accuracy' in m:
    line += f' (final line {m["eval/greedy_final_line_accuracy"]:.3f})'
  if 'eval/spec/alpha' in m:
    pos = [
      m[f'eval/spec/per_position/{i}'] for i in range(1, 64) if f'eval/spec/per_position/{i}' in m
    ]
    line += f' | alpha {m["eval/spec/alpha"]:.2f} per position ' + ' '.join(f'{a:.2f}' for a in pos)
  return line + f' ({m["eval/time_s"]:.1f}s)'

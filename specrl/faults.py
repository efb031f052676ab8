"""Training that survives faults: non-finite guards, deterministic fault points, user errors.

Why this is its own module: everything here is about what happens when something goes wrong
(a blow-up, a crash, bad input), and the loop only calls small hooks from it.

- :class:`FaultConfig` (the ``train`` config section): what a non-finite loss / gradient
  norm does. The jitted steps (:mod:`specrl.rl`) always skip such an update (params and
  optimizer state unchanged, ``skipped_updates`` in their metrics); :class:`NonFiniteGuard`
  is the host side that counts consecutive skips, keeps the last checkpoint written before
  a run of skips out of rotation, and stops the run (:class:`TrainingHalted`) at the first
  skip under ``'halt'`` or after ``max_skips`` consecutive ones under ``'skip'``.
- :func:`fault_point`: deterministic kill points for resume tests. With
  ``SPECRL_FAULT=<kind>:<step>:<phase>`` (e.g. ``step:5:after_update``,
  ``save:6:after_arrays``) the process prints one marker line to stderr and SIGKILLs itself
  when it reaches that phase; every other call is a no-op (one env lookup). A malformed value
  fails at start-up (:func:`check_fault_env`, a one-line :class:`BadFaultSpec`).
- Errors meant for the user, not a traceback: :class:`FatalError` (``main.py`` prints its
  one-line message and exits non-zero), with :class:`DataError` for bad input files / task
  outputs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specrl import config as config_lib

FAULT_ENV = 'SPECRL_FAULT'
FAULT_PROCESS_ENV = 'SPECRL_FAULT_PROCESS'  # several processes: only this one (default: all)
FAULT_MARKER = 'SPECRL_FAULT reached'  # printed (stderr) just before the SIGKILL
# Where the loop and the checkpointer call fault_point(kind, step, phase). ``step`` is the
# global step index for 'step' points and the checkpoint's step for 'save' points.
FAULT_PHASES = {
  'step': ('after_rollout', 'after_update', 'after_metrics'),
  'save': ('before', 'after_arrays', 'after_commit'),
}


class FatalError(RuntimeError):
  """An error whose message is the whole story (one line): ``main.py`` prints it and exits
  non-zero without a traceback."""


class DataError(FatalError, ValueError):
  """Bad input: a malformed task file, a missing tokenizer, a truncated weights file, a
  non-finite reward. A ValueError too, so existing ``except ValueError`` still works."""


class TrainingHalted(FatalError):
  """The non-finite guard stopped the run (the message says where and how to resume)."""


class BadFaultSpec(FatalError, ValueError):
  """A malformed ``$SPECRL_FAULT``; :func:`check_fault_env` raises it at start-up."""


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class FaultConfig:
  """The ``train`` config section.

  nonfinite: 'skip' -- a non-finite loss, gradient norm or update skips the update and the
    run goes on, stopping after ``max_skips`` consecutive skips; 'halt' -- stop at the first.
  max_skips: consecutive skipped updates tolerated under 'skip'.
  """

  nonfinite: str = 'skip'
  max_skips: int = 3

  def __post_init__(self):
    if self.nonfinite not in ('skip', 'halt'):
      raise ValueError(f"train.nonfinite must be 'skip' or 'halt', got {self.nonfinite!r}")
    if self.max_skips < 1:
      raise ValueError(f'train.max_skips must be >= 1, got {self.max_skips}')


def fault_config(config) -> FaultConfig:
  """:class:`FaultConfig` from ``config.train`` (via :func:`specrl.config.from_config`)."""
  return config_lib.from_config(FaultConfig, config.train, 'train')


# ----------------------------------------------------------------------------- device side


def all_finite(*xs) -> jax.Array:
  """bool []: every leaf of every pytree in ``xs`` is finite (jittable)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(xs)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# ----------------------------------------------------------------------------- host side

SKIP_KEY = 'skipped_updates'  # jitted-step metric; 'train/skipped_updates' for GRPO
# metrics checked, in order, to say which one went non-finite
_WATCHED = ('loss', 'sft_loss', 'pg_loss', 'grad_norm')


def _nonfinite_metric(metrics: Mapping[str, float]) -> str:
  for key, v in metrics.items():
    if key.split('/')[-1] in _WATCHED and not math.isfinite(v):
      return key
  return 'update (non-finite params after the optimizer step)'


class NonFiniteGuard:
  """Host-side bookkeeping of skipped updates (see the module docstring).

  ``checkpointer`` needs ``latest_step()``, ``keep(step)`` and ``directory``. Registered
  as (optional) host state so a resumed run keeps its consecutive count.
  """

  def __init__(self, cfg: FaultConfig, checkpointer):
    self.cfg = cfg
    self.checkpointer = checkpointer
    self.consecutive = 0
    self.total = 0
    self.resume_step: int | None = None  # checkpoint before the current run of skips

  def host_state(self) -> dict[str, Any]:
    return {'consecutive': self.consecutive, 'total': self.total, 'resume_step': self.resume_step}

  def load_host_state(self, d: Mapping[str, Any]) -> None:
    self.consecutive, self.total = int(d['consecutive']), int(d['total'])
    self.resume_step = d['resume_step']

  def after_step(self, step: int, metrics: Mapping[str, float], log=None) -> None:
    """Call after each step's metrics are known (before its checkpoint). Raises
    :class:`TrainingHalted` when the run must stop."""
    skipped = sum(v for k, v in metrics.items() if k.split('/')[-1] == SKIP_KEY)
    if not skipped:
      self.consecutive = 0
      return
    if self.consecutive == 0:
      self.resume_step = self.checkpointer.latest_step()
      if self.resume_step is not None:
        self.checkpointer.keep(self.resume_step)
    self.consecutive += 1
    self.total += 1
    metric = _nonfinite_metric(metrics)
    if log is not None:
      log(
        f'step {step}: non-finite {metric}: update skipped, params and optimizer state '
        f'unchanged ({self.consecutive} consecutive, train.max_skips={self.cfg.max_skips})'
      )
    if self.cfg.nonfinite == 'halt' or self.consecutive >= self.cfg.max_skips:
      raise TrainingHalted(self.halt_message(step, metric))

  def halt_message(self, step: int, metric: str) -> str:
    why = (
      'train.nonfinite=halt'
      if self.cfg.nonfinite == 'halt'
      else f'{self.consecutive} consecutive skipped updates, train.max_skips={self.cfg.max_skips}'
    )
    if self.resume_step is None:
      where = 'no checkpoint was written before it: start again with a lower learning rate'
    else:
      where = (
        f'resume from checkpoint {self.checkpointer.directory}/{self.resume_step} (the last '
        'one written before the first skip; kept out of rotation)'
      )
    return f'stopped at step {step}: non-finite {metric} ({why}); {where}'


def check_rewards(task_name: str, rewards: np.ndarray, answers) -> None:
  """A non-finite reward is a bug in the task: a :class:`DataError` naming the sample."""
  bad = np.flatnonzero(~np.isfinite(rewards))
  if bad.size:
    i = int(bad[0])
    raise DataError(
      f'task {task_name} returned a non-finite reward {rewards[i]} for sample {i} '
      f'(answer {answers[i]!r}; {bad.size} such samples in the batch)'
    )


def tree_is_finite(tree) -> bool:
  """True when every floating leaf of ``tree`` is finite (host check before a save)."""
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(x))):
      return False
  return True


# ----------------------------------------------------------------------------- fault points


def parse_fault(spec: str) -> tuple[str, int, str]:
  """``'save:6:after_arrays'`` -> ('save', 6, 'after_arrays'), validated (a
  :class:`BadFaultSpec` naming the variable and the value otherwise)."""
  parts = spec.split(':')
  if len(parts) != 3 or parts[0] not in FAULT_PHASES or not parts[1].lstrip('-').isdigit():
    raise BadFaultSpec(f'{FAULT_ENV}={spec!r}: expected <step|save>:<int>:<phase>')
  kind, step, phase = parts[0], int(parts[1]), parts[2]
  if phase not in FAULT_PHASES[kind]:
    raise BadFaultSpec(f'{FAULT_ENV}={spec!r}: {kind} phases are {", ".join(FAULT_PHASES[kind])}')
  return kind, step, phase


def check_fault_env() -> None:
  """Validate ``$SPECRL_FAULT`` at start-up (:func:`specrl.train.build_experiment`), so a
  typo fails before the first rollout instead of at the first fault point."""
  spec = os.environ.get(FAULT_ENV)
  if spec:
    parse_fault(spec)


def fault_point(kind: str, step: int, phase: str) -> None:
  """SIGKILL this process if ``$SPECRL_FAULT`` names ``kind:step:phase`` (see module doc).

  The marker line goes to stderr first so a test can tell where the process died; SIGKILL
  (not an exception) so no ``finally``, atexit or orbax cleanup runs, like a real crash.
  ``$SPECRL_FAULT_PROCESS=<i>``: under several processes only process i is killed.
  """
  spec = os.environ.get(FAULT_ENV)
  if not spec or parse_fault(spec) != (kind, step, phase):
    return
  only = os.environ.get(FAULT_PROCESS_ENV)
  if only and int(only) != jax.process_index():
    return
  sys.stdout.flush()
  sys.stderr.write(f'{FAULT_MARKER}: {spec}\n')
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)

"""Asynchronous RL: the rollout for step t + s is generated while step t trains.

``rl.async_staleness`` = s. The rollout of GRPO step t is generated with the params of
version ``v(t) = max(t - s, first step the pipeline saw)`` (version = optimizer steps
taken), i.e. exactly s updates old in steady state; s = 0 is the synchronous loop.

One loop (:func:`specrl.train.run_step`) serves every s. GRPO step t:

  1. ``take(t)``: the rollout for t from the queue, or generated now with the current
     params (always so for s = 0; for s >= 1 at the first GRPO step and after a resume
     into a pipeline that is still filling);
  2. the train step on it is *dispatched* (JAX async dispatch: it runs on the train mesh
     while the host continues);
  3. ``prefetch(t)``: the rollout for t + s, with the rollout-side params (version t), on
     the rollout mesh -- this is what overlaps step 2;
  4. the train metrics are fetched (waits for step 2), then ``publish``: the new params
     (version t + 1) are copied to the rollout mesh with ``jax.device_put`` to the rollout
     shardings and the drafter's params are derived from *that* copy on the rollout mesh.

No threads: the overlap is the train step running on the train devices while the host
drives the rollout on the rollout devices. Devices are split by ``rollout_mesh_shape`` and
``train_mesh_shape`` (the first devices roll out, the rest train). Without a split, s >= 1
is still allowed -- the rollouts are s updates stale -- but nothing overlaps (a warning
says so).

Rollout-side params. Without a split and with s = 0 the rollout reads the train step's
own output (no copy; a derived drafter -- the quantized one -- is computed inside the
jitted train step as before). Otherwise the rollout reads a copy (``may_alias=False``: the
next train step donates its input) and a derived drafter is computed from that copy by
one jitted call on the rollout mesh, so the drafter always follows the params that
produce the rollout. A drafter with params of its own (small_model) is placed on the
rollout mesh by the engine.

Checkpoints. The queue of finished rollouts that a checkpoint at step N still needs
(steps N .. N + s - 1: their batches, metrics and behaviour versions) is *stored* in the
checkpoint's host state (``rollouts``), not regenerated: the params that generated them
are no longer in the train state, and the adaptive engine's memory has already learnt from
them. A resumed run therefore continues exactly as the uninterrupted one (tested).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from specrl import config as config_lib
from specrl import multihost as mh
from specrl import sharding as shd

ASYNC_KEYS = ('rollout_mesh_shape', 'train_mesh_shape')  # top-level config keys


@dataclasses.dataclass(frozen=True)
class AsyncConfig:
  """``staleness`` = ``rl.async_staleness``; the mesh shapes are top-level config keys
  (``()`` = no split: rollout and train share ``mesh_shape``)."""

  staleness: int = 0
  rollout_mesh_shape: tuple = ()
  train_mesh_shape: tuple = ()

  def __post_init__(self):
    s = self.staleness
    if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0:
      raise ValueError(f'config.rl.async_staleness must be an integer >= 0, got {s!r}')
    r, t = tuple(self.rollout_mesh_shape), tuple(self.train_mesh_shape)
    if bool(r) != bool(t):
      raise ValueError(
        'set both config.rollout_mesh_shape and config.train_mesh_shape (or neither), got '
        f'{r} and {t}'
      )
    for name, shape in (('rollout_mesh_shape', r), ('train_mesh_shape', t)):
      if shape and (len(shape) != 3 or any(int(d) < 1 for d in shape)):
        raise ValueError(
          f'config.{name} must be 3 positive sizes (data, fsdp, tensor), got {shape}'
        )

  @property
  def split(self) -> bool:
    return bool(self.rollout_mesh_shape)

  @property
  def rollout_reads_train_params(self) -> bool:
    """True when the rollout can read the train step's output itself (no copy)."""
    return not self.split and self.staleness == 0


def async_config(config) -> AsyncConfig:
  return AsyncConfig(
    staleness=config.rl.async_staleness,
    rollout_mesh_shape=config_lib._tuples(config.rollout_mesh_shape),
    train_mesh_shape=config_lib._tuples(config.train_mesh_shape),
  )


def make_meshes(acfg: AsyncConfig, mesh_shape, mesh=None, devices=None):
  """(train mesh, rollout mesh): the same mesh without a split; else the first
  prod(rollout_mesh_shape) devices roll out and the next prod(train_mesh_shape) train,
  together exactly all devices."""
  if not acfg.split:
    m = mesh if mesh is not None else shd.make_mesh(tuple(mesh_shape), devices)
    return m, m
  if mesh is not None:
    raise ValueError(
      'a mesh passed in cannot be combined with config.rollout_mesh_shape / train_mesh_shape'
    )
  devices = list(jax.devices() if devices is None else devices)
  nr, nt = int(np.prod(acfg.rollout_mesh_shape)), int(np.prod(acfg.train_mesh_shape))
  if nr + nt != len(devices):
    raise ValueError(
      f'config.rollout_mesh_shape {tuple(acfg.rollout_mesh_shape)} ({nr} devices) + '
      f'config.train_mesh_shape {tuple(acfg.train_mesh_shape)} ({nt} devices) must use exactly '
      f'the {len(devices)} devices there are'
    )
  if mh.is_multiprocess():
    # Several processes: params cannot be device_put from one process's devices to
    # another's (no cross-host transfer on CPU; docs in README "Several processes"), so
    # each process gives its first nr / P devices to the rollout and the rest to training.
    p = jax.process_count()
    if nr % p or nt % p:
      raise ValueError(
        f'config.rollout_mesh_shape {tuple(acfg.rollout_mesh_shape)} ({nr} devices) and '
        f'config.train_mesh_shape {tuple(acfg.train_mesh_shape)} ({nt} devices) must each be '
        f'a multiple of the {p} processes: every process gives devices to both meshes'
      )
    local = [[d for d in devices if d.process_index == i] for i in range(p)]
    rollout = shd.make_mesh(acfg.rollout_mesh_shape, [d for ds in local for d in ds[: nr // p]])
    train = shd.make_mesh(acfg.train_mesh_shape, [d for ds in local for d in ds[nr // p :]])
    return train, rollout
  rollout = shd.make_mesh(acfg.rollout_mesh_shape, devices[:nr])
  train = shd.make_mesh(acfg.train_mesh_shape, devices[nr:])
  return train, rollout


def warn_if_nothing_overlaps(acfg: AsyncConfig, log=logging.warning) -> bool:
  """s >= 1 without a device split: allowed (off-policy by s steps), but said once."""
  if acfg.staleness and not acfg.split:
    s = acfg.staleness
    log(
      f'rl.async_staleness={s} without a rollout/train device split (rollout_mesh_shape, '
      f'train_mesh_shape): rollouts are {s} update(s) stale but nothing overlaps'
    )
    return True
  return False


@dataclasses.dataclass
class Rollout:
  """A finished rollout waiting for its train step: the training batch (numpy), its
  rollout metrics and the version (optimizer steps) of the params that generated it."""

  step: int
  version: int
  batch: dict[str, np.ndarray]
  metrics: dict[str, Any]


class Timeline:
  """Host wall-clock spans ``(kind, step, t0, t1)`` for benchmarks (off in training).

  ``watch`` records when device work finishes without blocking the loop: a helper thread
  blocks on the arrays. Instrumentation only -- the loop itself starts no threads.
  """

  def __init__(self):
    self.events: list[tuple[str, int, float, float]] = []
    self._threads: list[threading.Thread] = []
    self.t0 = time.perf_counter()

  def record(self, kind: str, step: int, t0: float, t1: float) -> None:
    self.events.append((kind, step, t0 - self.t0, t1 - self.t0))

  def watch(self, kind: str, step: int, t0: float, tree) -> None:
    def wait():
      jax.block_until_ready(tree)
      self.record(kind, step, t0, time.perf_counter())

    th = threading.Thread(target=wait, daemon=True)
    th.start()
    self._threads.append(th)

  def join(self) -> list[tuple[str, int, float, float]]:
    for th in self._threads:
      th.join()
    self._threads = []
    return sorted(self.events, key=lambda e: e[2])


class RolloutPipeline:
  """The rollout side of the loop: rollout-side params, the queue of finished rollouts,
  and their checkpointing (a :class:`specrl.checkpointing.HostState`).

  ``rollout_fn(params, step, draft_params) -> (batch, metrics)``: one GRPO rollout on the
  rollout mesh; ``to_rollout(params)``: the train params copied to the rollout shardings;
  ``derive_draft(rollout_params)``: the drafter's params from them (None: the drafter has
  no derived params); ``last_step``: no rollout is generated for steps >= it.
  """

  def __init__(
    self,
    acfg: AsyncConfig,
    rollout_fn: Callable,
    to_rollout: Callable,
    derive_draft: Callable | None,
    last_step: int,
    timeline: Timeline | None = None,
  ):
    self.acfg, self.rollout_fn = acfg, rollout_fn
    self.to_rollout, self.derive_draft = to_rollout, derive_draft
    self.last_step, self.timeline = last_step, timeline
    self.params = self.draft_params = None
    self.version = -1
    self.queue: dict[int, Rollout] = {}

  @property
  def staleness(self) -> int:
    return self.acfg.staleness

  # -- rollout-side params
  def publish(self, params, version: int, draft_params=None) -> dict[str, float]:
    """Make ``params`` (train mesh, ``version`` optimizer steps) the rollout's params.

    ``draft_params``: the drafter's params derived inside the train step, used only when
    the rollout reads the train params directly. Returns ``{'async/transfer_s': ...}``
    (copy + derivation, blocked on; 0 without a copy)."""
    self.version = version
    if self.acfg.rollout_reads_train_params:
      self.params, self.draft_params = params, draft_params
      return {}
    t0 = time.perf_counter()
    self.params = self.to_rollout(params)
    self.draft_params = None if self.derive_draft is None else self.derive_draft(self.params)
    jax.block_until_ready((self.params, self.draft_params))
    t1 = time.perf_counter()
    if self.timeline is not None:
      self.timeline.record('transfer', version, t0, t1)
    return {'async/transfer_s': t1 - t0}

  def current(self, params, version: int):
    """(rollout params, draft params) of ``version``, published from ``params`` if the
    rollout side holds another version."""
    if self.version != version:
      self.publish(params, version)
    return self.params, self.draft_params

  # -- rollouts
  def _generate(self, step: int) -> Rollout:
    t0 = time.perf_counter()
    batch, metrics = self.rollout_fn(self.params, step, self.draft_params)
    if self.timeline is not None:
      self.timeline.record('rollout', step, t0, time.perf_counter())
    r = Rollout(step, self.version, batch, metrics)
    self.queue[step] = r
    return r

  def take(self, step: int) -> tuple[dict, dict]:
    """The batch for GRPO step ``step`` and its metrics (rollout metrics plus
    ``async/staleness`` and ``async/behaviour_version``); generated now with the current
    rollout params when it is not queued. Needs :meth:`current` for ``step`` first."""
    for u in [u for u in self.queue if u < step]:  # stale entries (a resumed run)
      del self.queue[u]
    r = self.queue.get(step) or self._generate(step)
    m = dict(r.metrics)
    m['async/staleness'] = step - r.version
    m['async/behaviour_version'] = r.version
    return r.batch, m

  def prefetch(self, step: int) -> dict[str, float]:
    """Generate the rollout for ``step + s`` now (while step ``step`` trains). No-op for
    s = 0, past the last step, or when it is queued already."""
    u = step + self.staleness
    if not self.staleness or u >= self.last_step or u in self.queue:
      return {}
    t0 = time.perf_counter()
    self._generate(u)
    return {'async/prefetch_s': time.perf_counter() - t0}

  def done(self, step: int) -> None:
    """Step ``step`` has trained: its rollout is no longer needed (nor checkpointed)."""
    self.queue.pop(step, None)

  # -- checkpointing (HostState)
  def host_state(self) -> dict[str, Any]:
    # Several processes: a queued batch holds this process's rows; the checkpoint (written
    # by process 0) holds every process's, all-gathered, and each takes its block back.
    return {
      'staleness': self.staleness,
      'queue': {
        str(u): {
          'version': r.version,
          'batch': {k: mh.allgather_rows(v) for k, v in r.batch.items()},
          'metrics': r.metrics,
        }
        for u, r in sorted(self.queue.items())
      },
    }

  def load_host_state(self, d: dict[str, Any]) -> None:
    self.queue = {}
    if int(d.get('staleness', 0)) != self.staleness:
      logging.warning(
        'checkpoint was written with rl.async_staleness=%s, now %d: its %d queued '
        'rollout(s) are dropped and regenerated',
        d.get('staleness'), self.staleness, len(d.get('queue', {})),
      )  # fmt: skip
      return
    for u, e in d.get('queue', {}).items():
      batch = {k: np.asarray(v) for k, v in e['batch'].items()}
      batch = {k: v[mh.process_rows(v.shape[0])] for k, v in batch.items()}  # own rows
      self.queue[int(u)] = Rollout(int(u), int(e['version']), batch, dict(e['metrics']))

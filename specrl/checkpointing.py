"""Orbax checkpoints of the full train state (params, optimizer state, RNG, step).

The data position is the step itself (prompts for step t are drawn from
``np.random.default_rng([seed, t])``), so restoring the state restores the stream.
Drafter params are never stored: they are derived from the policy params.

Restoring validates every tensor's shape and dtype against the state the config
describes, and refuses a mismatch with a message naming the tensor.

Host state (the contract for state that lives outside the jitted train state: the adaptive
engine's online memory, host policy RNGs, later drafter buffers) goes into the same orbax
checkpoint through one interface, :class:`HostState`: an object registered under a name
with ``Checkpointer.register(name, obj)`` provides ``host_state() -> dict`` (JSON values and
numpy arrays) and ``load_host_state(d)``; every save stores all registered objects' dicts as
the checkpoint's ``host`` item and every restore hands each object its dict back.

Faults (see :mod:`specrl.faults`): a checkpoint is never written from non-finite params;
steps passed to ``keep`` (the last good checkpoint before a run of skipped updates) are
never rotated out; if the latest checkpoint cannot be restored (truncated, corrupted,
partial) it is moved to ``checkpoints/quarantine/<step>`` with one warning line and the
newest one that restores is used; saves pass the fault points ``save:<step>:before``,
``:after_arrays`` (array files written, checkpoint not committed) and ``:after_commit``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp

from specrl import faults
from specrl import multihost as mh
from specrl.rl import TrainState

QUARANTINE = 'quarantine'  # checkpoints/quarantine/<step>: checkpoints that did not restore
_SELF = '_checkpointer'  # the checkpointer's own entry in the host item (kept steps)


class CheckpointMismatch(faults.FatalError, ValueError):
  """The checkpoint is readable but does not fit the config (shape, dtype, host state):
  refused as is, never quarantined."""


class NoRestorableCheckpoint(faults.FatalError):
  """Every checkpoint in the directory failed to restore (each moved to quarantine)."""


@dataclasses.dataclass
class _KeptSteps(pp.PreservationPolicy):
  """Preserves the steps in a live set (``Checkpointer.keep``), whatever their age."""

  steps: set

  def should_preserve(self, checkpoints: Sequence, *, context) -> Sequence[bool]:
    return [c.step in self.steps for c in checkpoints]


class _StateHandler(ocp.StandardCheckpointHandler):
  """The train-state handler with the ``after_arrays`` fault point: ``finalize`` runs once
  every array file is written and before the checkpoint is committed (renamed)."""

  saving_step: int | None = None

  def finalize(self, directory) -> None:
    if self.saving_step is not None:
      faults.fault_point('save', self.saving_step, 'after_arrays')
    super().finalize(directory)


@ocp.args.register_with_handler(_StateHandler, for_save=True)
@dataclasses.dataclass
class _StateSave(ocp.args.StandardSave):
  """StandardSave, routed to :class:`_StateHandler`."""


@ocp.args.register_with_handler(_StateHandler, for_restore=True)
@dataclasses.dataclass
class _StateRestore(ocp.args.StandardRestore):
  """StandardRestore, routed to :class:`_StateHandler`."""


def _one_line(e: BaseException, limit: int = 240) -> str:
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  msg = f'{type(e).__name__}: {lines[0] if lines else ""}'
  return msg if len(msg) <= limit else msg[: limit - 3] + '...'


def _to_saveable(state: TrainState):
  return state.replace(rng=jax.random.key_data(state.rng))


def _from_saveable(state: TrainState) -> TrainState:
  return state.replace(rng=jax.random.wrap_key_data(state.rng))


@runtime_checkable
class HostState(Protocol):
  """Host-side state that must survive a restart (see the module docstring)."""

  def host_state(self) -> dict[str, Any]: ...

  def load_host_state(self, state: dict[str, Any]) -> None: ...


_ARRAY_TAG = '__ndarray__'


def _to_json(x):
  """numpy arrays / scalars -> JSON-able values (arrays tagged with dtype and shape)."""
  if isinstance(x, dict):
    return {str(k): _to_json(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_to_json(v) for v in x]
  if isinstance(x, np.ndarray | jax.Array):
    a = np.asarray(x)
    return {_ARRAY_TAG: a.ravel().tolist(), 'dtype': str(a.dtype), 'shape': list(a.shape)}
  if isinstance(x, np.generic):
    return x.item()
  return x


def _from_json(x):
  if isinstance(x, dict):
    if _ARRAY_TAG in x:
      return np.asarray(x[_ARRAY_TAG], dtype=x['dtype']).reshape(x['shape'])
    return {k: _from_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_json(v) for v in x]
  return x


class Checkpointer:
  """Orbax checkpoints of the train state (item ``state``) and registered host state
  (item ``host``: ``{name: obj.host_state()}``) in ``<workdir>/checkpoints/<step>``."""

  def __init__(self, workdir: str, keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.kept: set[int] = set()
    self._state_handler = _StateHandler()
    policy = pp.AnyPreservationPolicy([pp.LatestN(n=keep), _KeptSteps(self.kept)])
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        create=True, preservation_policy=policy, enable_async_checkpointing=False
      ),
      item_names=('state', 'host'),
      item_handlers={'state': self._state_handler, 'host': ocp.JsonCheckpointHandler()},
    )
    self.host_objects: dict[str, HostState] = {}
    self.optional: set[str] = set()

  def register(self, name: str, obj: HostState, required: bool = True) -> None:
    """Save ``obj.host_state()`` with every checkpoint under ``name``; restore hands it back.
    ``required=False``: a checkpoint without it (older code) leaves ``obj`` as it is."""
    if name in self.host_objects or name == _SELF:
      raise ValueError(f'host state {name!r} is already registered')
    self.host_objects[name] = obj
    if not required:
      self.optional.add(name)

  def keep(self, step: int) -> None:
    """Never rotate checkpoint ``step`` out (remembered in later checkpoints)."""
    self.kept.add(int(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, wait: bool = True):
    """Save (synchronously: ``wait`` is kept for callers). Refuses non-finite params."""
    del wait
    if not faults.tree_is_finite(state.params):
      raise faults.FatalError(
        f'refusing to write checkpoint {self.directory}/{step}: the params are not finite'
      )
    faults.fault_point('save', step, 'before')
    host = {name: _to_json(obj.host_state()) for name, obj in self.host_objects.items()}
    host[_SELF] = {'kept': sorted(self.kept)}
    self._state_handler.saving_step = step
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=_StateSave(_to_saveable(state)), host=ocp.args.JsonSave(host)
        ),
      )
      self.manager.wait_until_finished()
    finally:
      self._state_handler.saving_step = None
    faults.fault_point('save', step, 'after_commit')

  def restore(self, target: TrainState, step: int | None = None) -> TrainState:
    """Restore into the structure/shardings of ``target`` after validating shapes.

    Without ``step``: the newest checkpoint that restores. One that fails to read is
    moved to ``quarantine/<step>`` with one warning line; a config mismatch
    (:class:`CheckpointMismatch`) is raised as is; if none restores,
    :class:`NoRestorableCheckpoint` names the directory and every failure.
    """
    if step is not None:
      return self._restore_step(target, step)
    failures = []
    while (step := self.latest_step()) is not None:
      try:
        return self._restore_step(target, step)
      except CheckpointMismatch:
        raise
      except Exception as e:  # noqa: BLE001 - any read failure means a bad checkpoint
        reason = _one_line(e)
        dest = self._quarantine(step)
        logging.warning(
          'checkpoint %s/%d cannot be restored (%s): moved to %s, trying the previous one',
          self.directory, step, reason, dest,
        )  # fmt: skip
        failures.append(f'step {step}: {reason}')
    if failures:
      raise NoRestorableCheckpoint(
        f'no checkpoint in {self.directory} could be restored (each moved to '
        f'{QUARANTINE}/): ' + '; '.join(failures)
      )
    raise FileNotFoundError(f'no checkpoint in {self.directory}')

  def _quarantine(self, step: int) -> str:
    """Move ``<dir>/<step>`` to ``<dir>/quarantine/<step>`` (never deleted) and forget it,
    so the step can be saved again and rotation never counts it."""
    # Several processes (a shared directory): every process failed to restore it; process
    # 0 alone moves it, the others wait for the move, then all forget it.
    mh.sync(f'quarantine {step} found')
    qdir = os.path.join(self.directory, QUARANTINE)
    dest, n = os.path.join(qdir, str(step)), 1
    while os.path.exists(dest):
      dest, n = os.path.join(qdir, f'{step}.{n}'), n + 1
    if mh.is_primary():
      os.makedirs(qdir, exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), dest)
    mh.sync(f'quarantine {step} moved')
    self.manager.reload()
    return dest

  def _restore_step(self, target: TrainState, step: int) -> TrainState:
    target = _to_saveable(target)
    meta = self.manager.item_metadata(step)['state']
    if meta is None:
      raise FileNotFoundError(f'checkpoint {self.directory}/{step} has no state item')
    _validate(getattr(meta, 'tree', meta), target, f'{self.directory}/{step}')

    def abstract(x):
      sh = getattr(x, 'sharding', None)
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=_StateRestore(jax.tree.map(abstract, target)), host=ocp.args.JsonRestore()
      ),
    )
    host = restored['host'] or {}
    self.kept.update(int(s) for s in host.get(_SELF, {}).get('kept', []))
    for name, obj in self.host_objects.items():
      if name not in host and name in self.optional:
        continue
      if name not in host:
        raise CheckpointMismatch(
          f'checkpoint {self.directory}/{step} has no host state {name!r} (saved: {sorted(host)})'
        )
      obj.load_host_state(_from_json(host[name]))
    return _from_saveable(restored['state'])

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _path_name(path) -> str:
  """'params/layers/wq' whatever the container types (orbax saves tuples as lists, ...)."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def _validate(meta, target, where: str):
  """Compare the saved tree's shapes/dtypes to the target's, naming the first mismatch."""
  meta_flat = {
    _path_name(p): m
    for p, m in jax.tree_util.tree_flatten_with_path(meta, is_leaf=lambda m: hasattr(m, 'shape'))[0]
  }
  tgt_flat = {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  missing = sorted(set(tgt_flat) - set(meta_flat))
  extra = sorted(set(meta_flat) - set(tgt_flat))
  if missing or extra:
    raise CheckpointMismatch(
      f'checkpoint {where} does not match the configured model: '
      f'missing tensors {missing[:5]}, unexpected tensors {extra[:5]}'
    )
  for name, x in tgt_flat.items():
    m = meta_flat[name]
    shape = tuple(getattr(m, 'shape', ()) or ())
    if shape != tuple(np.shape(x)):
      raise CheckpointMismatch(
        f'checkpoint {where}: tensor {name} has shape {shape}, but the config expects '
        f'{tuple(np.shape(x))}'
      )
    dtype = getattr(m, 'dtype', None)
    if dtype is not None and jnp.dtype(dtype) != jnp.dtype(x.dtype):
      raise CheckpointMismatch(
        f'checkpoint {where}: tensor {name} has dtype {dtype}, but the config expects {x.dtype}'
      )

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

Host arrays are stored as arrays, not JSON text: every non-empty numeric numpy array (any
integer, float, complex or bool dtype, bfloat16 included) in a host dict goes into a third
orbax item, ``host_arrays`` (a flat dict ``{'a<i>': array}`` written like the train state,
by process 0 only, as orbax writes numpy arrays), and the JSON keeps a reference
``{'__host_array__': 'a<i>', 'dtype': ..., 'shape': [...]}`` in its place. All three items
are committed together (one orbax step directory), so a checkpoint has both or is not
committed. Empty arrays and non-numeric ones (strings, objects) stay inline as tagged JSON
lists (``{'__ndarray__': [...], 'dtype', 'shape'}``), the format every host array had
before; checkpoints written that way still restore. A reference whose array is missing,
unreadable, or of another dtype / shape than the JSON records is a broken checkpoint
(:class:`HostArrayError`, naming the host object and key): :meth:`Checkpointer.restore`
quarantines it like a truncated state item.

Faults (see :mod:`specrl.faults`): a checkpoint is never written from non-finite params;
steps passed to ``keep`` (the last good checkpoint before a run of skipped updates) are
never rotated out; if the latest checkpoint cannot be restored (truncated, corrupted,
partial) it is moved to ``checkpoints/quarantine/<step>`` with one warning line and the
newest one that restores is used; saves pass the fault points ``save:<step>:before``,
``:after_arrays`` (array files written, checkpoint not committed) and ``:after_commit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import re
import sys
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


class HostArrayError(ValueError):
  """A host-state array referenced by the checkpoint's JSON is missing, unreadable or not
  what the JSON records (a broken checkpoint: quarantined, see :meth:`Checkpointer.restore`)."""


class NoRestorableCheckpoint(faults.FatalError):
  """Every checkpoint in the directory failed to restore (each moved to quarantine)."""


@dataclasses.dataclass
class _KeptSteps(pp.PreservationPolicy):
  """Preserves the steps in a live set (``Checkpointer.keep``), whatever their age."""

  steps: set

  def should_preserve(self, checkpoints: Sequence, *, context) -> Sequence[bool]:
    return [c.step in self.steps for c in checkpoints]


@dataclasses.dataclass
class _Saving:
  """The save in progress: its step and how many array items are still to be finalized."""

  step: int
  left: int


class _StateHandler(ocp.StandardCheckpointHandler):
  """The array-item handler (train state, host arrays) with the ``after_arrays`` fault
  point: it passes once the last array item of the save is finalized (every array file
  written) and before the checkpoint is committed (renamed)."""

  saving: _Saving | None = None

  def finalize(self, directory) -> None:
    if self.saving is not None:
      self.saving.left -= 1
      if self.saving.left == 0:
        faults.fault_point('save', self.saving.step, 'after_arrays')
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


def _is_orbax_coroutine(obj) -> bool:
  code = getattr(obj, 'cr_code', None)
  return code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename


def _is_failed_read_leftover(unraisable) -> bool:
  """An unraisable exception left behind by orbax after a checkpoint read failed: one of its
  abandoned read coroutines collected (it turns the GeneratorExit into its read error), or
  a TensorStore callback thread scheduling onto orbax's already closed event loop."""
  if _is_orbax_coroutine(unraisable.object):
    return True
  return (
    unraisable.object is None
    and unraisable.exc_type is RuntimeError
    and str(unraisable.exc_value) == 'Event loop is closed'
  )


_LEFTOVERS = {'hook': None}  # the filter installed by the last restore that kept it


@contextlib.contextmanager
def _failed_read_leftovers_filtered():
  """While restoring, drop orbax's leftovers of a failed read (:func:`_is_failed_read_leftover`)
  from ``sys.unraisablehook``; yields ``keep()``, which leaves the filter installed for the
  rest of the process (a read failed: its leftovers may surface later) and collects the
  ones already unreachable. Without ``keep()`` the previous hook is put back.

  Why: when one array of a checkpoint cannot be read, orbax raises that error and leaves its
  other reads behind; each prints ~70 lines ("Exception ignored in: <coroutine ...>" with a
  TensorStore spec, or "Event loop is closed" from a callback thread) whenever it is
  collected or its thread wakes, in the middle of a run that has already quarantined the
  checkpoint and said so in one line. Any other unraisable exception still goes to the
  hook that was there before."""
  previous = sys.unraisablehook
  ours = previous is _LEFTOVERS['hook']
  if not ours:

    def hook(unraisable):
      if not _is_failed_read_leftover(unraisable):
        previous(unraisable)

    _LEFTOVERS['hook'] = sys.unraisablehook = hook
  kept = []

  def keep():
    kept.append(True)
    gc.collect()

  try:
    yield keep
  finally:
    if not ours and not kept and sys.unraisablehook is _LEFTOVERS['hook']:
      sys.unraisablehook = previous


def _to_saveable(state: TrainState):
  return state.replace(rng=jax.random.key_data(state.rng))


def _from_saveable(state: TrainState) -> TrainState:
  return state.replace(rng=jax.random.wrap_key_data(state.rng))


@runtime_checkable
class HostState(Protocol):
  """Host-side state that must survive a restart (see the module docstring)."""

  def host_state(self) -> dict[str, Any]: ...

  def load_host_state(self, state: dict[str, Any]) -> None: ...


_ARRAY_TAG = '__ndarray__'  # an array inline as a JSON list (empty / non-numeric; old format)
_ARRAY_REF = '__host_array__'  # an array stored in the host_arrays item under this key
HOST = 'host'  # the JSON item
HOST_ARRAYS = 'host_arrays'  # the array item (absent when no host array is stored)


def _stored_as_array(a: np.ndarray) -> bool:
  """Arrays stored in the array item: numeric / bool (ml_dtypes such as bfloat16 too), not
  empty (orbax does not save empty arrays)."""
  numeric = a.dtype.kind in 'biufc' or a.dtype.type.__module__.split('.')[0] == 'ml_dtypes'
  return numeric and a.size > 0


def _to_json(x, arrays: dict[str, np.ndarray] | None = None):
  """numpy arrays / scalars -> JSON-able values. With ``arrays``: each array orbax can store
  is added to it under a new key ``a<i>`` and replaced by a reference (dtype and shape
  recorded); without, and for the rest, arrays are tagged JSON lists."""
  if isinstance(x, dict):
    return {str(k): _to_json(v, arrays) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_to_json(v, arrays) for v in x]
  if isinstance(x, np.ndarray | jax.Array):
    a = np.asarray(x)
    meta = {'dtype': str(a.dtype), 'shape': list(a.shape)}
    if arrays is not None and _stored_as_array(a):
      key = f'a{len(arrays)}'
      arrays[key] = a
      return {_ARRAY_REF: key, **meta}
    return {_ARRAY_TAG: a.ravel().tolist(), **meta}
  if isinstance(x, np.generic):
    return x.item()
  return x


def _from_json(x, arrays: dict[str, np.ndarray] | None = None, where: str = '', path=()):
  """Inverse of :func:`_to_json`: tagged lists and references (looked up in ``arrays``, the
  restored ``host_arrays`` item; None: the checkpoint has none) become numpy arrays.
  ``where`` / ``path`` name the host object and key in errors."""
  if isinstance(x, dict):
    if _ARRAY_TAG in x:
      return np.asarray(x[_ARRAY_TAG], dtype=x['dtype']).reshape(x['shape'])
    if _ARRAY_REF in x:
      return _host_array(x, arrays, f'{where} key {"/".join(path)!r}')
    return {k: _from_json(v, arrays, where, (*path, k)) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_json(v, arrays, where, (*path, str(i))) for i, v in enumerate(x)]
  return x


def _host_array(ref: dict, arrays: dict | None, what: str) -> np.ndarray:
  key = ref[_ARRAY_REF]
  if arrays is None:
    raise HostArrayError(
      f'{what} refers to array {key}, but the checkpoint has no {HOST_ARRAYS} item'
    )
  if key not in arrays:
    raise HostArrayError(f'{what}: array {key} is missing from the {HOST_ARRAYS} item')
  a = np.asarray(arrays[key])
  want_dtype, want_shape = np.dtype(ref['dtype']), tuple(ref['shape'])
  if a.dtype != want_dtype or a.shape != want_shape:
    raise HostArrayError(
      f'{what}: array {key} is {a.dtype}{list(a.shape)}, the host JSON records '
      f'{want_dtype}{list(want_shape)}'
    )
  return a


def _array_refs(x, where: str, path=(), out=None) -> dict[str, str]:
  """{array key: 'host state <name> key <path>'} of every reference in ``x``."""
  out = {} if out is None else out
  if isinstance(x, dict):
    if _ARRAY_REF in x:
      out[x[_ARRAY_REF]] = f'{where} key {"/".join(path)!r}'
      return out
    for k, v in x.items():
      _array_refs(v, where, (*path, k), out)
  elif isinstance(x, list):
    for i, v in enumerate(x):
      _array_refs(v, where, (*path, str(i)), out)
  return out


class Checkpointer:
  """Orbax checkpoints of the train state (item ``state``) and registered host state
  (item ``host``: ``{name: obj.host_state()}`` as JSON, its arrays in item ``host_arrays``)
  in ``<workdir>/checkpoints/<step>``."""

  def __init__(self, workdir: str, keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.kept: set[int] = set()
    self._state_handler, self._arrays_handler = _StateHandler(), _StateHandler()
    policy = pp.AnyPreservationPolicy([pp.LatestN(n=keep), _KeptSteps(self.kept)])
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        create=True, preservation_policy=policy, enable_async_checkpointing=False
      ),
      item_names=('state', HOST_ARRAYS, HOST),
      item_handlers={
        'state': self._state_handler,
        HOST_ARRAYS: self._arrays_handler,
        HOST: ocp.JsonCheckpointHandler(),
      },
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
    arrays: dict[str, np.ndarray] = {}
    host = {name: _to_json(obj.host_state(), arrays) for name, obj in self.host_objects.items()}
    host[_SELF] = {'kept': sorted(self.kept)}
    # Several processes: process 0 writes the host item and arrays, but every process saves
    # the same items (one orbax save): a different array count is an error, never a hang
    mh.check_agree('the number of host state arrays to checkpoint', [len(arrays)])
    items = {'state': _StateSave(_to_saveable(state)), HOST: ocp.args.JsonSave(host)}
    if arrays:  # one commit: the step directory holds all items or is not renamed into place
      items[HOST_ARRAYS] = _StateSave(arrays)
    saving = _Saving(step, left=1 + bool(arrays))
    self._state_handler.saving = self._arrays_handler.saving = saving
    try:
      self.manager.save(step, args=ocp.args.Composite(**items))
      self.manager.wait_until_finished()
    finally:
      self._state_handler.saving = self._arrays_handler.saving = None
    faults.fault_point('save', step, 'after_commit')

  def restore(self, target: TrainState, step: int | None = None) -> TrainState:
    """Restore into the structure/shardings of ``target`` after validating shapes.

    Without ``step``: the newest checkpoint that restores. One that fails to read is
    moved to ``quarantine/<step>`` with one warning line; a config mismatch
    (:class:`CheckpointMismatch`) is raised as is; if none restores,
    :class:`NoRestorableCheckpoint` names the directory and every failure.
    """
    failures = []
    with _failed_read_leftovers_filtered() as keep_filter:
      if step is not None:  # the error as is, to the caller that asked for this step
        try:
          return self._restore_step(target, step)
        except Exception:
          keep_filter()  # its leftovers surface once the caller drops the error
          raise
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
        keep_filter()  # after the except block: the failure's objects are freed
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
    try:
      metas = self.manager.item_metadata(step)
    except Exception as e:  # noqa: BLE001 - an unreadable item; named if it is host_arrays
      if f'{os.sep}{step}{os.sep}{HOST_ARRAYS}{os.sep}' in str(e):
        raise self._unreadable_host_arrays(step, e, self._refs_on_disk(step)) from e
      raise
    meta = metas['state']
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
    host = restored[HOST] or {}
    self.kept.update(int(s) for s in host.get(_SELF, {}).get('kept', []))
    for name in self.host_objects:
      if name not in host and name not in self.optional:
        raise CheckpointMismatch(
          f'checkpoint {self.directory}/{step} has no host state {name!r} (saved: {sorted(host)})'
        )
    loads = {name: host[name] for name in self.host_objects if name in host}
    arrays = self._restore_host_arrays(step, loads)
    where = f'checkpoint {self.directory}/{step}: host state'
    for name, d in loads.items():  # every array is read and checked before any object loads
      loads[name] = _from_json(d, arrays, f'{where} {name!r}')
    for name, d in loads.items():
      self.host_objects[name].load_host_state(d)
    return _from_saveable(restored['state'])

  def _restore_host_arrays(self, step: int, loads: dict[str, Any]) -> dict | None:
    """The ``host_arrays`` item of checkpoint ``step`` (None when it has none), read only
    when a host state to load refers to an array; a read failure names the host objects
    and keys (the arrays of one checkpoint are read together)."""
    refs: dict[str, str] = {}
    for name, d in loads.items():
      _array_refs(d, f'host state {name!r}', out=refs)
    if not refs:
      return None
    if HOST_ARRAYS not in self.manager.item_metadata(step).keys():
      return None  # _from_json names the first reference that has no array
    try:
      got = self.manager.restore(step, args=ocp.args.Composite(host_arrays=_StateRestore()))
    except Exception as e:  # noqa: BLE001 - unreadable: a broken checkpoint (quarantined)
      raise self._unreadable_host_arrays(step, e, refs) from e
    return dict(got[HOST_ARRAYS] or {})

  def _refs_on_disk(self, step: int) -> dict[str, str]:
    """The array references of checkpoint ``step``'s host JSON, read from its file (for
    naming an unreadable array item; {} if the JSON cannot be read either)."""
    path = os.path.join(self.directory, str(step), HOST, 'metadata')
    try:
      with open(path) as f:
        host = json.load(f)
    except (OSError, ValueError):
      return {}
    refs: dict[str, str] = {}
    for name, d in host.items():
      if name in self.host_objects:
        _array_refs(d, f'host state {name!r}', out=refs)
    return refs

  def _unreadable_host_arrays(self, step: int, e: Exception, refs: dict) -> HostArrayError:
    """The error for an unreadable ``host_arrays`` item, naming the host objects (and the
    keys of the arrays the read error names)."""
    named = [what for key, what in refs.items() if re.search(rf'\b{key}\b', str(e))]
    objs = sorted({what.split(' key ')[0] for what in refs.values()})
    what = '; '.join(named[:3]) if named else f'arrays of {", ".join(objs) or "the host state"}'
    return HostArrayError(
      f'checkpoint {self.directory}/{step}: the {HOST_ARRAYS} item cannot be read ({what}): '
      f'{_one_line(e)}'
    )

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

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
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from specrl.rl import TrainState


def _to_saveable(state: TrainState):
  return state.replace(rng=jax.random.key_data(state.rng))


def _from_saveable(state: TrainState) -> TrainState:
  return state.replace(rng=jax.random.wrap_key_data(state.rng))


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
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=('state', 'host'),
      item_handlers={
        'state': ocp.StandardCheckpointHandler(),
        'host': ocp.JsonCheckpointHandler(),
      },
    )
    self.host_objects: dict[str, HostState] = {}

  def register(self, name: str, obj: HostState) -> None:
    """Save ``obj.host_state()`` with every checkpoint under ``name``; restore hands it back."""
    if name in self.host_objects:
      raise ValueError(f'host state {name!r} is already registered')
    self.host_objects[name] = obj

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, wait: bool = True):
    host = {name: _to_json(obj.host_state()) for name, obj in self.host_objects.items()}
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_saveable(state)), host=ocp.args.JsonSave(host)
      ),
    )
    if wait:
      self.manager.wait_until_finished()

  def restore(self, target: TrainState, step: int | None = None) -> TrainState:
    """Restore into the structure/shardings of ``target`` after validating shapes."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    target = _to_saveable(target)
    meta = self.manager.item_metadata(step)['state']
    _validate(getattr(meta, 'tree', meta), target, f'{self.directory}/{step}')

    def abstract(x):
      sh = getattr(x, 'sharding', None)
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree.map(abstract, target)), host=ocp.args.JsonRestore()
      ),
    )
    host = restored['host'] or {}
    for name, obj in self.host_objects.items():
      if name not in host:
        raise ValueError(
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
    raise ValueError(
      f'checkpoint {where} does not match the configured model: '
      f'missing tensors {missing[:5]}, unexpected tensors {extra[:5]}'
    )
  for name, x in tgt_flat.items():
    m = meta_flat[name]
    shape = tuple(getattr(m, 'shape', ()) or ())
    if shape != tuple(np.shape(x)):
      raise ValueError(
        f'checkpoint {where}: tensor {name} has shape {shape}, but the config expects '
        f'{tuple(np.shape(x))}'
      )
    dtype = getattr(m, 'dtype', None)
    if dtype is not None and jnp.dtype(dtype) != jnp.dtype(x.dtype):
      raise ValueError(
        f'checkpoint {where}: tensor {name} has dtype {dtype}, but the config expects {x.dtype}'
      )

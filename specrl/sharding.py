"""Logical axis names -> mesh axes, in one place.

Model code names every array dimension with a *logical* axis (``batch``, ``embed``,
``heads``, ...). Two rule tables map them onto the physical mesh (``data``, ``fsdp``,
``tensor``):

- ``PARAM_RULES``: where parameters (and optimizer state) live. Embedding-like dims
  are FSDP-sharded, head/MLP dims tensor-parallel.
- ``DECODE_RULES``: how rollout work is laid out. The batch is spread over
  ``data`` x ``fsdp``; heads over ``tensor``; the KV cache follows the batch.

Training and decoding take the *same* params sharding (``PARAM_RULES``): the rollout
reads the exact pytree that ``train_step`` returns, no resharding copies.

A rule maps to a mesh axis only if that axis divides the dimension; otherwise the
dimension is replicated (tiny test models on 8 fake devices must still run).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

PARAM_RULES: dict[str, tuple[str, ...] | str | None] = {
  'layers': None,
  'vocab': 'tensor',
  'embed': 'fsdp',
  'heads': 'tensor',
  'kv_heads': 'tensor',
  'head_dim': None,
  'mlp': 'tensor',
  'norm': None,
}

DECODE_RULES: dict[str, tuple[str, ...] | str | None] = {
  'batch': ('data', 'fsdp'),
  'seq': None,
  'cache_seq': None,
  'layers': None,
  'kv_heads': 'tensor',
  'heads': 'tensor',
  'head_dim': None,
  'embed': None,
  'vocab': 'tensor',
  'draft': None,
}

TRAIN_RULES: dict[str, tuple[str, ...] | str | None] = {
  **DECODE_RULES,
  'batch': ('data', 'fsdp'),
}


def make_mesh(shape: Sequence[int] | None = None, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh. ``shape=None``: all devices on ``data``.

  A shape entry of -1 absorbs the remaining devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if shape is None:
    shape = (n, 1, 1)
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f'mesh shape must have 3 entries (data, fsdp, tensor), got {shape}')
  if shape.count(-1) > 1:
    raise ValueError(f'at most one -1 in mesh shape, got {shape}')
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if n % rest:
      raise ValueError(f'mesh shape {shape} does not divide {n} devices')
    shape[shape.index(-1)] = n // rest
  if int(np.prod(shape)) != n:
    raise ValueError(f'mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {n}')
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_spec(
  logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict
) -> PartitionSpec:
  """PartitionSpec for one array; a mesh axis is used at most once and only if it divides."""
  used: set[str] = set()
  out = []
  for name, dim in zip(logical, shape, strict=True):
    axes = rules.get(name) if name is not None else None
    if axes is not None:
      tup = (axes,) if isinstance(axes, str) else tuple(axes)
      tup = tuple(a for a in tup if a not in used and mesh.shape[a] > 1)
      if not tup or dim % _axis_size(mesh, tup):
        tup = ()
      used.update(tup)
      axes = None if not tup else (tup[0] if len(tup) == 1 else tup)
    out.append(axes)
  return PartitionSpec(*out)


def tree_shardings(logical_tree, shape_tree, mesh: Mesh, rules: dict):
  """NamedShardings for a pytree given a matching pytree of logical-axis tuples."""

  def one(logical, x):
    return NamedSharding(mesh, logical_to_spec(logical, x.shape, mesh, rules))

  return jax.tree.map(one, logical_tree, shape_tree, is_leaf=lambda t: isinstance(t, tuple))


def constrain(x: jax.Array, logical: Sequence[str | None], mesh: Mesh | None, rules: dict):
  """with_sharding_constraint by logical names; a no-op without a mesh."""
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(
    x, NamedSharding(mesh, logical_to_spec(logical, x.shape, mesh, rules))
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())

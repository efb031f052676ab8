"""safetensors file IO: headers, a dependency-free raw reader, shard indexes, sharded writes.

Why this is its own module: everything here is about the file format (headers are read
without touching tensor data, so a checkpoint can be validated in milliseconds), and nothing
here knows about the model layout; :mod:`specrl.checkpoints.hf_params` maps names and shapes.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from specrl.faults import DataError

# safetensors header dtype codes -> numpy dtypes (for the raw fallback reader).
_ST_DTYPES = {
  'F64': np.float64,
  'F32': np.float32,
  'F16': np.float16,
  'BF16': ml_dtypes.bfloat16,
  'I64': np.int64,
  'I32': np.int32,
  'I16': np.int16,
  'I8': np.int8,
  'U8': np.uint8,
  'BOOL': np.bool_,
}
INDEX_NAME = 'model.safetensors.index.json'


def _read_header(path: str) -> tuple[dict, int]:
  """(header dict, byte offset of the tensor data). A truncated or malformed file is a
  one-line :class:`~specrl.faults.DataError` naming it: the file must hold the 8-byte
  length, the JSON header and every tensor's bytes (checked against its size, no data read).
  """
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    if size < 8:
      raise DataError(f'{path}: truncated safetensors file ({size} bytes, no header)')
    (n,) = struct.unpack('<Q', f.read(8))
    if 8 + n > size:
      raise DataError(
        f'{path}: truncated safetensors file (header of {n} bytes, file has {size} bytes)'
      )
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError(f'{path}: corrupted safetensors header ({e})') from e
  ends = [v['data_offsets'][1] for k, v in header.items() if k != '__metadata__']
  need = 8 + n + max(ends, default=0)
  if need > size:
    raise DataError(
      f'{path}: truncated safetensors file (its header needs {need} bytes, file has {size})'
    )
  return header, 8 + n


def read_safetensors_raw(path: str, names=None) -> dict[str, np.ndarray]:
  """Read tensors from a safetensors file without the safetensors library.

  Fallback for safetensors releases whose numpy frontend rejects bf16: the format is an
  8-byte little-endian header length, a JSON header of ``{name: {dtype, shape,
  data_offsets}}``, then raw little-endian bytes. Returns ``{name: np.ndarray}`` (bf16 as
  ``ml_dtypes.bfloat16``) for ``names`` (default: all tensors).
  """
  header, base = _read_header(path)
  header.pop('__metadata__', None)
  names = list(header) if names is None else list(names)
  out = {}
  with open(path, 'rb') as f:
    for name in names:
      info = header[name]
      if info['dtype'] not in _ST_DTYPES:
        raise ValueError(f'{path}: tensor {name} has unsupported dtype {info["dtype"]}')
      start, end = info['data_offsets']
      f.seek(base + start)
      buf = f.read(end - start)
      dt = np.dtype(_ST_DTYPES[info['dtype']]).newbyteorder('<')
      out[name] = np.frombuffer(buf, dtype=dt).reshape(info['shape']).copy()
  return out


def tensor_index(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """``{hf_name: (file, shape)}`` over the checkpoint dir, from headers only."""
  index_path = os.path.join(path, INDEX_NAME)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)['weight_map']
    files = sorted(set(weight_map.values()))
  else:
    weight_map = None
    files = sorted(n for n in os.listdir(path) if n.endswith('.safetensors'))
  if not files:
    raise FileNotFoundError(f'no *.safetensors files in {path}')
  where: dict[str, tuple[str, tuple[int, ...]]] = {}
  for fname in files:
    fpath = os.path.join(path, fname)
    if not os.path.exists(fpath):
      raise FileNotFoundError(f'{INDEX_NAME} references missing shard {fname}')
    header, _ = _read_header(fpath)
    header.pop('__metadata__', None)
    for name, info in header.items():
      if name in where:
        raise ValueError(f'tensor {name} appears in both {where[name][0]} and {fname}')
      where[name] = (fname, tuple(int(s) for s in info['shape']))
  if weight_map is not None:
    for name, fname in weight_map.items():
      if name in where and where[name][0] != fname:
        raise ValueError(f'{INDEX_NAME} maps {name} to {fname} but it is in {where[name][0]}')
  return where


def read_tensors(fpath: str, names: list[str]) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  _read_header(fpath)  # a truncated file fails here in one line, not inside safetensors
  try:
    with safe_open(fpath, framework='np') as f:
      return {n: f.get_tensor(n) for n in names}
  except (TypeError, ValueError):  # old safetensors: no bf16 in its numpy frontend
    return read_safetensors_raw(fpath, names)


def write_safetensors(
  path: str, tensors: dict[str, np.ndarray], *, max_shard_bytes: int | None = None
) -> None:
  """Write ``tensors`` into directory ``path`` the way HF transformers expects.

  Without ``max_shard_bytes``: one ``model.safetensors``. With it, tensors are split greedily
  (in the dict's order) into ``model-0000i-of-0000n.safetensors`` plus
  ``model.safetensors.index.json`` (``weight_map`` name -> shard file, ``total_size`` bytes).
  """
  from safetensors.numpy import save_file  # optional dependency, only needed to write

  meta = {'format': 'pt'}
  if max_shard_bytes is None:
    save_file(tensors, os.path.join(path, 'model.safetensors'), metadata=meta)
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors.items():
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  n = len(shards)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f'model-{i + 1:05d}-of-{n:05d}.safetensors'
    save_file(shard, os.path.join(path, fname), metadata=meta)
    weight_map.update({name: fname for name in shard})
  index = {
    'metadata': {'total_size': int(sum(a.nbytes for a in tensors.values()))},
    'weight_map': weight_map,
  }
  with open(os.path.join(path, INDEX_NAME), 'w') as f:
    json.dump(index, f, indent=2)

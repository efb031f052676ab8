"""GGUF file structure: the header and every tensor's byte range, checked before any reading.

Why this is its own module: gguf-py's ``GGUFReader`` trusts the file -- it memory-maps it and
slices -- so a truncated or corrupted file fails deep inside with a numpy error that names
neither the file nor the tensor ("cannot reshape array of size 66784 into shape (576,360)",
"index 0 is out of bounds"). :func:`check_gguf_file` walks the layout first with ``struct``
against the file size (no tensor data is read), and :func:`open_gguf` hands the file to the
reader only after that, so every such file is one line, :class:`GGUFFileError`, naming the
file (and the tensor or metadata key where there is one). ``main.py`` prints it and exits
non-zero without a traceback.

The layout (GGUF v2 / v3, little- or big-endian): ``b'GGUF'``, uint32 version, uint64 tensor
count, uint64 metadata count; metadata entries (string key, uint32 value type, value); tensor
infos (string name, uint32 n_dims, uint64 dims[n_dims], uint32 ggml type, uint64 offset);
padding to ``general.alignment`` (default 32); tensor data at those offsets. A string is a
uint64 length and that many bytes; an array is a uint32 element type, a uint64 length and the
elements.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import NamedTuple

import gguf

from specrl.faults import DataError

GGUF_MAGIC = b'GGUF'
GGUF_VERSIONS = (2, 3)  # the versions gguf-py reads (v1 used 32-bit counts)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
_FIXED_HEADER = 24  # magic, version, tensor count, metadata count
_PATH_ATTR = '_specrl_path'  # set on readers made by open_gguf

_T = gguf.GGUFValueType
_SCALAR_SIZES = {
  _T.UINT8: 1, _T.INT8: 1, _T.BOOL: 1, _T.UINT16: 2, _T.INT16: 2, _T.UINT32: 4, _T.INT32: 4,
  _T.FLOAT32: 4, _T.UINT64: 8, _T.INT64: 8, _T.FLOAT64: 8,
}  # fmt: skip
# The smallest encodings: a metadata entry (empty key, a 1-byte value), a tensor info (empty
# name, no dims), an element of a string or array array (its 8-byte length).
_MIN_ENTRY, _MIN_TENSOR, _MIN_ELEMENT = 8 + 4 + 1, 8 + 4 + 4 + 8, 8


class GGUFFileError(DataError):
  """A file that cannot be read as GGUF: empty, not GGUF, truncated or corrupted. The
  message is one line and starts with the file's path."""


class TensorRange(NamedTuple):
  name: str
  start: int  # absolute byte offset of the tensor's data
  end: int  # one past its last byte


class GGUFLayout(NamedTuple):
  version: int
  n_kv: int
  alignment: int
  data_offset: int  # where the tensor data section starts
  tensors: tuple[TensorRange, ...]


class _PastEnd(Exception):
  """A read that would go past the end of the file; ``args[0]`` says what was being read."""


class _Cursor:
  def __init__(self, buf, pos: int, order: str):
    self.buf, self.pos, self.order, self.size = buf, pos, order, len(buf)

  def skip(self, n: int, what: str) -> None:
    if n > self.size - self.pos:
      raise _PastEnd(what)
    self.pos += n

  def unpack(self, fmt: str, what: str) -> tuple:
    fmt = self.order + fmt
    n = struct.calcsize(fmt)
    if n > self.size - self.pos:
      raise _PastEnd(what)
    out = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += n
    return out

  def string(self, what: str) -> bytes:
    (n,) = self.unpack('Q', what)
    start = self.pos
    self.skip(n, what)
    return self.buf[start : self.pos]

  def skip_strings(self, count: int, what: str) -> None:
    """``count`` strings, not read (a tokenizer's vocabulary and merges)."""
    buf, pos, size, fmt = self.buf, self.pos, self.size, self.order + 'Q'
    for _ in range(count):
      if pos + 8 > size:
        raise _PastEnd(what)
      pos += 8 + struct.unpack_from(fmt, buf, pos)[0]
      if pos > size:
        raise _PastEnd(what)
    self.pos = pos


def _decode(raw: bytes, what: str, path: str) -> str:
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise GGUFFileError(f'{path}: corrupted GGUF file: {what} is not UTF-8 ({e})') from None


def _skip_value(cur: _Cursor, vtype: int, what: str, path: str):
  """Step over one metadata value; returns a scalar's raw bytes (None for others)."""
  size = _SCALAR_SIZES.get(vtype)
  if size is not None:
    start = cur.pos
    cur.skip(size, what)
    return cur.buf[start : cur.pos]
  if vtype == _T.STRING:
    cur.skip_strings(1, what)
    return None
  if vtype != _T.ARRAY:
    raise GGUFFileError(f'{path}: corrupted GGUF file: {what} has unknown value type {vtype}')
  itype, count = cur.unpack('IQ', what)
  size = _SCALAR_SIZES.get(itype)
  if size is not None:
    cur.skip(count * size, what)
  elif itype not in (_T.STRING, _T.ARRAY):
    raise GGUFFileError(
      f'{path}: corrupted GGUF file: {what} is an array of unknown value type {itype}'
    )
  elif count * _MIN_ELEMENT > cur.size - cur.pos:
    raise _PastEnd(what)
  elif itype == _T.STRING:
    cur.skip_strings(count, what)
  else:
    for _ in range(count):
      _skip_value(cur, itype, what, path)
  return None


def _tensor_info(cur: _Cursor, index: int, path: str) -> tuple[str, int, int]:
  """(name, offset in the data section, bytes) of the next tensor info."""
  name = _decode(cur.string(f'tensor info {index}'), f'the name of tensor {index}', path)
  what = f'tensor {name}'
  (n_dims,) = cur.unpack('I', what)
  if n_dims > MAX_DIMS:
    raise GGUFFileError(
      f'{path}: corrupted GGUF file: tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})'
    )
  dims = cur.unpack(f'{n_dims}Q', what)
  raw_type, offset = cur.unpack('IQ', what)
  try:
    qtype = gguf.GGMLQuantizationType(raw_type)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  except (ValueError, KeyError):
    raise GGUFFileError(
      f'{path}: corrupted GGUF file: tensor {name} has unknown ggml type {raw_type}'
    ) from None
  if dims and dims[0] % block:
    raise GGUFFileError(
      f'{path}: corrupted GGUF file: tensor {name} has rows of {dims[0]} values, not a '
      f'multiple of the {qtype.name} block size {block}'
    )
  return name, offset, math.prod(dims) // block * type_size


def _layout(buf, path: str) -> GGUFLayout:
  size = len(buf)
  if bytes(buf[:4]) != GGUF_MAGIC:
    raise GGUFFileError(
      f'{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected {GGUF_MAGIC!r})'
    )
  if size < _FIXED_HEADER:
    raise GGUFFileError(
      f'{path}: truncated GGUF file ({size} bytes, the header alone is {_FIXED_HEADER})'
    )
  order = '<'
  (version,) = struct.unpack_from('<I', buf, 4)
  if version & 0xFFFF == 0:  # written on a big-endian machine (as gguf-py decides it)
    order = '>'
    (version,) = struct.unpack_from('>I', buf, 4)
  if version not in GGUF_VERSIONS:
    raise GGUFFileError(
      f'{path}: GGUF version {version} is not supported (supported: {GGUF_VERSIONS})'
    )
  n_tensors, n_kv = struct.unpack_from(order + 'QQ', buf, 8)
  room = size - _FIXED_HEADER
  if n_kv > room // _MIN_ENTRY or n_tensors > (room - n_kv * _MIN_ENTRY) // _MIN_TENSOR:
    raise GGUFFileError(
      f'{path}: corrupted GGUF header: {n_tensors} tensors and {n_kv} metadata entries '
      f'cannot fit in a file of {size} bytes'
    )
  cur = _Cursor(buf, _FIXED_HEADER, order)
  alignment = DEFAULT_ALIGNMENT
  try:
    for i in range(n_kv):
      key = _decode(cur.string(f'metadata entry {i}'), f'metadata key {i}', path)
      what = f'metadata {key!r}'
      (vtype,) = cur.unpack('I', what)
      raw = _skip_value(cur, vtype, what, path)
      if key == 'general.alignment':
        alignment = struct.unpack(order + 'I', raw)[0] if vtype == _T.UINT32 else 0
        if alignment <= 0 or alignment & (alignment - 1):
          raise GGUFFileError(
            f'{path}: corrupted GGUF file: general.alignment must be a power of two (uint32)'
          )
    infos = [_tensor_info(cur, i, path) for i in range(n_tensors)]
  except _PastEnd as e:
    raise GGUFFileError(
      f'{path}: truncated or corrupted GGUF file: {e.args[0]} runs past the end of the file '
      f'({size} bytes)'
    ) from None
  data_offset = -(-cur.pos // alignment) * alignment
  tensors = tuple(TensorRange(n, data_offset + off, data_offset + off + nb) for n, off, nb in infos)
  outside = [t for t in tensors if t.end > size]
  if outside:
    t = outside[0]
    raise GGUFFileError(
      f'{path}: truncated GGUF file: tensor {t.name} needs bytes {t.start}..{t.end} but the '
      f'file has {size} ({len(outside)} of {len(tensors)} tensors end past it)'
    )
  return GGUFLayout(version, n_kv, alignment, data_offset, tensors)


def check_gguf_file(path: str) -> GGUFLayout:
  """Walk ``path``'s header and check every tensor's byte range against the file size.

  Reads the header only (memory-mapped; tens of milliseconds for a 49k-token vocabulary).

  Raises:
    GGUFFileError (one line, starting with ``path``) for an empty, non-GGUF, truncated or
    corrupted file; FileNotFoundError for a missing one.
  """
  size = os.path.getsize(path)
  if size == 0:
    raise GGUFFileError(f'{path}: empty file, not a GGUF file')
  with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
    return _layout(buf, path)


def reader_path(reader: gguf.GGUFReader) -> str:
  """The file a reader has open, for error messages (what :func:`open_gguf` was given)."""
  return getattr(reader, _PATH_ATTR, None) or str(getattr(reader.data, 'filename', '<gguf>'))


def open_gguf(path: str) -> gguf.GGUFReader:
  """A ``gguf.GGUFReader`` for ``path`` after :func:`check_gguf_file`; anything the reader
  still refuses (a duplicated key or tensor name, ...) becomes a :class:`GGUFFileError`."""
  path = os.fspath(path)
  check_gguf_file(path)
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # after the checks above, any reader failure means a malformed file
    msg = ' '.join(str(e).split())
    raise GGUFFileError(f'{path}: corrupted GGUF file ({type(e).__name__}: {msg})') from e
  setattr(reader, _PATH_ATTR, path)
  return reader

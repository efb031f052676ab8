"""Quantized weights for the self-drafter: an int8 / int4 / fp8 copy of the live policy.

The quantized drafter is re-derived from the current policy params at every RL step, inside
the jitted train step, so quantization here is a pure, shape-static function of the param
pytree (:func:`quantize_params`) and the result runs through :func:`specrl.model.forward`
unchanged: every matmul weight becomes a :class:`QWeight`, which the model calls through
``w.qeinsum(eq, x)`` (and ``table.qtake(ids)`` for the embedding lookup).

Numerics (symmetric, round-to-nearest, no zero point):

- int8 / int4: ``q = clip(round(w / s), -qmax, qmax)`` with ``qmax = 127 | 7`` and
  ``s = absmax(group) / qmax``, so ``|w - q * s| <= s / 2`` elementwise.
- fp8 (``fp8='e4m3'``): ``q = float8_e4m3fn(w / s)`` with ``s = absmax / 448``: relative
  error <= 2**-4 (3 mantissa bits) down to the subnormal floor.
- Scales are per output channel (``group_size=None``) or per group of ``group_size``
  consecutive elements of the *flattened contracting dim* (e.g. ``D`` for wq, ``H * Dh`` for
  wo) and output channel. int4 defaults to groups of 128.
- Optional int8 activations (``act_bits=8``): per-token (per-group) absmax, computed on the
  fly; the matmul is then int8 x int{8,4} with an int32 accumulator, rescaled on the output.

Storage: ``QWeight.qvalue`` keeps the weight's original shape (so logical sharding axes still
apply) in int8, ``jnp.int4`` or ``float8_e4m3fn``. XLA packs ``int4`` two per byte in device
buffers (verified with ``compiled.memory_analysis()`` on CPU), so :func:`param_bytes` counts
it at half a byte; note that ``jax.Array.nbytes`` reports one byte per int4 element.

Backends (static, per :class:`QuantConfig.backend`), all consuming the *same* stored weight:

- ``'jnp'``: plain reference -- ``x @ dequant(w)``, or with ``act_bits=8`` an explicit
  ``int8 x int8`` ``lax.dot_general`` with per-token and per-channel/group scales.
- ``'aqt'``: ``aqt.jax.v2`` ``DotGeneral.dg_core`` in serving mode: the stored weight is
  passed as a complete ``rhs_qt`` :class:`aqt_tensor.QTensor` (``qvalue`` + ``scale``), so AQT
  does *not* re-quantize it; a zeros dummy ``rhs`` is passed only because the API requires
  one (AQT's flax ``AqtEinsum`` does the same) and XLA removes it and its calibration as dead
  code. Groups are passed as a batch axis (``[M, G, gs] x [G, gs, N] -> [G, M, N]``, scales
  ``[G, 1, N]``) and summed afterwards -- the reshaping AQT's own ``tiled_dot_general`` does,
  without its tiling-state bookkeeping on the stored QTensor. With ``act_bits=8`` AQT
  quantizes the lhs with its own int numerics (absmax / 127.5), not exactly the reference's
  absmax / 127, so w8a8 results agree with 'jnp' to ~1e-2 relative, not bitwise.
- ``'qwix'``: ``qwix.dot_general`` on a ``qwix.QArray`` built from the stored values (qwix's
  native sub-channel layout: qvalue ``[K, N]``, scale ``[K / gs, N]``). For a float lhs
  qwix always dequantizes the weight first ("slow path"); with ``act_bits=8`` it runs the
  int8 x int8 "fast path" when groups are >= 128 wide (or per-channel).
- ``'pallas'``: weight-only int8 through the Pallas (Triton) kernel
  :func:`specrl.kernels.weight_only_matmul.weight_only_matmul`, which reads the int8 bytes
  and dequantizes on chip (scale applied to each group's partial sum in f32, so results
  match 'jnp' to bf16 rounding, not bitwise). Anything the kernel does not cover (int4,
  fp8, ``act_bits=8``, shapes it cannot tile, more than ``PALLAS_MAX_ROWS`` rows, where
  it measured slower, a TPU backend) runs the 'jnp' path. On CPU
  it runs in Pallas interpret mode (slow: for tests).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from specrl.kernels import weight_only_matmul as wom

BACKENDS = ('aqt', 'qwix', 'jnp', 'pallas')
_SCALE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_FP8 = {'e4m3': (jnp.float8_e4m3fn, 448.0)}
_INT_DTYPES = {8: jnp.int8, 4: jnp.int4}
_QMAX = {8: 127.0, 4: 7.0}

# param name -> (per-layer rank, number of contracting axes, contracting axes come first).
# Contracting axes are the ones the model's einsum sums over, e.g. 'btd,dhk->bthk' for wq.
_MATMULS = {
  'wq': (3, 1, True),
  'wk': (3, 1, True),
  'wv': (3, 1, True),
  'wo': (3, 2, True),
  'w_gate': (2, 1, True),
  'w_up': (2, 1, True),
  'w_down': (2, 1, True),
  'lm_head': (2, 1, True),
  'embed': (2, 1, False),  # [V, D]: 'btd,vd->btv' contracts D, the lookup takes rows
}


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How the drafter copy of the policy is quantized (hashable: a jit static argument).

  Attributes:
    bits: 8 or 4 (storage bits of the weights; 8 with ``fp8`` set means fp8).
    group_size: scales per ``group_size`` elements of the contracting dim; ``None`` (or 0)
      means one scale per output channel; ``'auto'`` (the default) picks, per weight, the
      largest divisor of its contracting dim that is <= 128 for int4 (e.g. 96 for
      d_model 576), and per-channel scales for int8 / fp8. An explicit size must divide
      every contracting dim it is smaller than (:func:`check_group_size` says which fit).
    backend: 'aqt' | 'qwix' | 'jnp' | 'pallas' (see the module docstring).
    quantize_embeddings: quantize the ``[V, D]`` embedding table. A *tied* table is also
      the output head, so it is quantized only if ``quantize_lm_head`` is also True.
    quantize_lm_head: quantize an untied ``lm_head`` ``[D, V]``.
    act_bits: None (weight-only) or 8 (dynamic per-token int8 activations).
    fp8: None or 'e4m3' (weights stored as float8_e4m3fn, per-channel/group scales).
    scale_dtype: 'float32' | 'bfloat16' storage dtype of the scales.
  """

  bits: int = 8
  group_size: int | None | str = 'auto'
  backend: str = 'jnp'
  quantize_embeddings: bool = False
  quantize_lm_head: bool = False
  act_bits: int | None = None
  fp8: str | None = None
  scale_dtype: str = 'float32'

  def __post_init__(self):
    def bad(field, msg):
      raise ValueError(f'quant.{field} {msg}, got {getattr(self, field)!r}')

    if isinstance(self.bits, bool) or self.bits not in (8, 4):
      bad('bits', 'must be 8 or 4')
    gs = self.group_size
    if gs == 'auto':
      pass  # resolved per weight by _group_size
    elif gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 0):
      bad('group_size', "must be None, 0 (per-channel), 'auto' or a positive int")
    elif gs == 0:
      object.__setattr__(self, 'group_size', None)
    if self.backend not in BACKENDS:
      bad('backend', f'must be one of {BACKENDS}')
    for f in ('quantize_embeddings', 'quantize_lm_head'):
      if not isinstance(getattr(self, f), bool):
        bad(f, 'must be a bool')
    if self.act_bits is not None and (isinstance(self.act_bits, bool) or self.act_bits != 8):
      bad('act_bits', 'must be None (weight-only) or 8')
    if self.fp8 is not None:
      if self.fp8 not in _FP8:
        bad('fp8', f'must be None or one of {sorted(_FP8)}')
      if self.bits != 8:
        bad('fp8', 'needs quant.bits=8 (fp8 replaces the int8 format)')
      if self.act_bits is not None:
        bad('fp8', 'is weight-only here; set quant.act_bits=None')
    if self.scale_dtype not in _SCALE_DTYPES:
      bad('scale_dtype', f'must be one of {sorted(_SCALE_DTYPES)}')
    needed = {'aqt': 'aqt', 'qwix': 'qwix'}.get(self.backend)
    if needed and importlib.util.find_spec(needed) is None:
      pkg = {'aqt': 'aqtp', 'qwix': 'qwix'}[self.backend]
      bad('backend', f'needs the {pkg!r} package (pip install {pkg})')


# ----------------------------------------------------------------------------- QWeight


def _prod(xs) -> int:
  return int(math.prod(xs))


@functools.cache
def _parse_eq(eq: str, rank: int, n_contract: int, contract_first: bool) -> bool:
  """True iff ``eq`` is 'x..c, w -> x..free' with w's contracting axes where we stored them.

  That is: the lhs ends with the contracting labels in the same order as the weight, the
  weight's contracting labels are its first (or last) ``n_contract`` ones, and the output is
  the lhs batch labels followed by the weight's free labels. Anything else falls back to a
  dequantized ``jnp.einsum`` (correct, just not the quantized kernel).
  """
  ins, out = eq.replace(' ', '').split('->')
  lhs, rhs = ins.split(',')
  if len(rhs) != rank or '.' in eq:
    return False
  c = rhs[:n_contract] if contract_first else rhs[rank - n_contract :]
  free = rhs[n_contract:] if contract_first else rhs[: rank - n_contract]
  return lhs.endswith(c) and out == lhs[: len(lhs) - n_contract] + free


@flax.struct.dataclass
class QWeight:
  """A quantized matmul weight (a pytree: arrays are children, the layout is static).

  Shapes, with ``lead`` = any stacked leading axes (e.g. ``[L]`` for layer weights, sliced
  away by ``lax.scan``), ``K`` = product of the contracting dims, ``N`` = product of the
  free dims, ``G = K / group_size``:

  - ``qvalue``: ``[*lead, *shape]`` int8 | int4 | float8_e4m3fn, the weight's own layout.
  - ``scale``: ``[*lead, G, N]`` if the contracting axes come first (``wq [D, H, Dh]``:
    K = D, N = H * Dh), else ``[*lead, N, G]`` (embedding ``[V, D]``: N = V, K = D).
  """

  qvalue: jax.Array
  scale: jax.Array
  logical_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # per-slice shape
  n_contract: int = flax.struct.field(pytree_node=False)
  contract_first: bool = flax.struct.field(pytree_node=False)
  group_size: int = flax.struct.field(pytree_node=False)
  bits: int = flax.struct.field(pytree_node=False)
  fmt: str = flax.struct.field(pytree_node=False)  # 'int' | 'e4m3'
  backend: str = flax.struct.field(pytree_node=False)
  act_bits: int | None = flax.struct.field(pytree_node=False)
  float_dtype: Any = flax.struct.field(pytree_node=False)  # dtype of the weight replaced

  # ------------------------------------------------------------------- layout helpers

  @property
  def contract_dims(self) -> tuple[int, ...]:
    nc, shp = self.n_contract, self.logical_shape
    return shp[:nc] if self.contract_first else shp[len(shp) - nc :]

  @property
  def free_dims(self) -> tuple[int, ...]:
    nc, shp = self.n_contract, self.logical_shape
    return shp[nc:] if self.contract_first else shp[: len(shp) - nc]

  @property
  def k(self) -> int:
    return _prod(self.contract_dims)

  @property
  def n(self) -> int:
    return _prod(self.logical_shape) // self.k

  @property
  def groups(self) -> int:
    return self.k // self.group_size

  @property
  def lead(self) -> tuple[int, ...]:
    return tuple(self.qvalue.shape[: self.qvalue.ndim - len(self.logical_shape)])

  def _grouped(self):
    """(values, scales) as ``[*lead, G, gs, N], [*lead, G, 1, N]`` (or ``[.., N, G, gs]``,
    ``[.., N, G, 1]``): free reshapes of the stored arrays."""
    g, gs, n = self.groups, self.group_size, self.n
    if self.contract_first:
      return self.qvalue.reshape(self.lead + (g, gs, n)), self.scale[..., :, None, :]
    return self.qvalue.reshape(self.lead + (n, g, gs)), self.scale[..., None]

  def dequantize(self, dtype=None) -> jax.Array:
    """The float weight ``[*lead, *shape]`` (computed in f32, returned in ``dtype``)."""
    q, s = self._grouped()
    w = q.astype(jnp.float32) * s.astype(jnp.float32)
    dtype = self.float_dtype if dtype is None else dtype
    return w.reshape(self.lead + self.logical_shape).astype(dtype)

  # ------------------------------------------------------------------- model hooks

  def qeinsum(self, eq: str, x: jax.Array) -> jax.Array:
    """``jnp.einsum(eq, x, w)`` through the configured backend; result in ``x.dtype``.

    x: ``[*batch, *contracting]`` (e.g. ``[B, T, D]`` for wq, ``[B, T, H, Dh]`` for wo).
    Returns ``[*batch, *free]``.
    """
    if self.lead:
      raise ValueError(f'qeinsum on a stacked QWeight (leading axes {self.lead}); slice it')
    nc = self.n_contract
    if not _parse_eq(eq, len(self.logical_shape), nc, self.contract_first):
      return jnp.einsum(eq, x, self.dequantize(x.dtype))
    batch = x.shape[: x.ndim - nc]
    x2 = x.reshape(_prod(batch), self.k)
    out = _MATMUL_IMPLS[self.backend](self, x2)  # [M, N]
    return out.reshape(batch + self.free_dims).astype(x.dtype)

  def qtake(self, ids: jax.Array) -> jax.Array:
    """Embedding lookup: rows ``ids [...]`` of a ``[V, D]`` table -> ``[..., D]`` float."""
    if self.contract_first or self.lead or len(self.logical_shape) != 2:
      raise ValueError('qtake needs an unstacked [V, D] embedding table')
    g, gs = self.groups, self.group_size
    rows = jnp.take(self.qvalue, ids, axis=0).reshape(ids.shape + (g, gs))
    s = jnp.take(self.scale, ids, axis=0)[..., None]
    w = rows.astype(jnp.float32) * s.astype(jnp.float32)
    return w.reshape(ids.shape + (self.logical_shape[1],)).astype(self.float_dtype)


# ----------------------------------------------------------------------------- backends


def _quant_rows(x3: jax.Array):
  """Dynamic symmetric int8 per (row, group): x3 [M, G, gs] -> (int8 [M, G, gs], f32 [M, G, 1])."""
  xf = x3.astype(jnp.float32)
  s = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0
  s = jnp.where(s > 0, s, 1.0)
  return jnp.clip(jnp.round(xf / s), -127, 127).astype(jnp.int8), s


def _grouped_dims(w: QWeight):
  """dot_general dims for lhs [M, G, gs] x grouped rhs -> [G, M, N] (G = batch axis)."""
  if w.contract_first:  # rhs [G, gs, N]
    return (((2,), (1,)), ((1,), (0,)))
  return (((2,), (2,)), ((1,), (1,)))  # rhs [N, G, gs]


def _matmul_jnp(w: QWeight, x2: jax.Array) -> jax.Array:
  """Reference: ``x2 [M, K] @ dequant(w) [K, N]`` (or the explicit int8 x int8 dot)."""
  if w.act_bits is None:
    wd = w.dequantize(x2.dtype).reshape((w.k, w.n) if w.contract_first else (w.n, w.k))
    dims = (((1,), (0,) if w.contract_first else (1,)), ((), ()))
    return jax.lax.dot_general(x2, wd, dims, preferred_element_type=jnp.float32)
  m = x2.shape[0]
  xq, xs = _quant_rows(x2.reshape(m, w.groups, w.group_size))
  q, s = w._grouped()
  acc = jax.lax.dot_general(xq, q, _grouped_dims(w), preferred_element_type=jnp.int32)
  ws = s if w.contract_first else jnp.moveaxis(s, 0, 2)  # -> [G, 1, N]
  out = acc.astype(jnp.float32) * jnp.swapaxes(xs, 0, 1) * ws.astype(jnp.float32)
  return out.sum(0)


@functools.cache
def _aqt_config(act_bits, wbits):
  from aqt.jax.v2 import config as aqt_config  # optional dependency

  return aqt_config.dot_general_make(lhs_bits=act_bits, rhs_bits=wbits)


def _matmul_aqt(w: QWeight, x2: jax.Array) -> jax.Array:
  """AQT v2 serving: the stored weight goes in as a complete ``rhs_qt`` QTensor."""
  from aqt.jax.v2 import aqt_tensor  # optional dependency

  cfg = _aqt_config(w.act_bits, w.fmt if w.fmt != 'int' else w.bits)
  m = x2.shape[0]
  if w.groups == 1:  # per-channel: a plain 2-D dot, scale [1, N] / [N, 1]
    lhs = x2
    rhs_q = w.qvalue.reshape((w.k, w.n) if w.contract_first else (w.n, w.k))
    scale = w.scale.reshape((1, w.n) if w.contract_first else (w.n, 1))
    dims = (((1,), (0,) if w.contract_first else (1,)), ((), ()))
  else:  # groups as a batch axis: [M, G, gs] x [G, gs, N] -> [G, M, N]
    lhs = x2.reshape(m, w.groups, w.group_size)
    rhs_q, scale = w._grouped()
    dims = _grouped_dims(w)
  qt = aqt_tensor.QTensor(
    qvalue=rhs_q, scale=[scale], scale_t=None, bias=[], dequant_dtype=lhs.dtype
  )
  dummy = jnp.zeros(rhs_q.shape, lhs.dtype)  # required by the API; dead code after jit
  out, _ = cfg.dg_core(lhs, dummy, None, qt, dims)
  out = out.astype(jnp.float32)
  return out if w.groups == 1 else out.sum(0)


def _matmul_qwix(w: QWeight, x2: jax.Array) -> jax.Array:
  """qwix: ``qwix.dot_general`` on a ``qwix.QArray`` in qwix's sub-channel layout."""
  import qwix  # optional dependency

  kn = (w.k, w.n) if w.contract_first else (w.n, w.k)
  rhs = qwix.QArray(
    qvalue=w.qvalue.reshape(kn),
    scale=w.scale.astype(x2.dtype),
    zero_point=None,
    qtype=w.qvalue.dtype,
  )
  lhs = x2
  if w.act_bits is not None:
    tiles = {1: w.group_size} if w.groups > 1 else None
    lhs = qwix.quantize(
      x2, jnp.int8, channelwise_axes=[0], tiled_axes=tiles, scale_dtype=jnp.float32
    )
  dims = (((1,), (0,) if w.contract_first else (1,)), ((), ()))
  return qwix.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)


# Rows (tokens) above which 'pallas' takes the 'jnp' path: measured on an H200 (jax 0.11.2,
# Qwen2.5-1.5B shapes, docs/benchmarks.md), the kernel's drafter step cost c was 1.05 / 0.99
# at B = 1 / 16 (jnp int8: 1.19 / 1.16) but 1.35 / 1.68 at B = 64 / 256 (jnp: 1.14 / 1.16).
PALLAS_MAX_ROWS = 32


def _matmul_pallas(w: QWeight, x2: jax.Array) -> jax.Array:
  """Weight-only int8 through the Pallas kernel for decode-sized ``x2 [M <= 32, K]``; the
  'jnp' path where the kernel does not apply or was measured slower."""
  covered = (
    x2.shape[0] <= PALLAS_MAX_ROWS
    and w.fmt == 'int'
    and w.act_bits is None
    and jax.default_backend() != 'tpu'
    and wom.supported(w.k, w.n, w.groups, w.qvalue.dtype)
  )
  if not covered:
    return _matmul_jnp(w, x2)
  q = w.qvalue.reshape((w.k, w.n) if w.contract_first else (w.n, w.k))
  scale = w.scale if w.contract_first else w.scale.T  # -> [G, N]
  return wom.weight_only_matmul(x2, q, scale, transposed=not w.contract_first)


_MATMUL_IMPLS = {
  'jnp': _matmul_jnp,
  'aqt': _matmul_aqt,
  'qwix': _matmul_qwix,
  'pallas': _matmul_pallas,
}


# ----------------------------------------------------------------------------- quantize


def _store_scale(absmax: jax.Array, qmax: float, dtype) -> jax.Array:
  """``absmax / qmax`` in ``dtype``, never rounded *below* that (so nothing clips)."""
  s = absmax / qmax
  s = jnp.where(s > 0, s, 1.0)
  sd = s.astype(dtype)
  if dtype != jnp.float32:
    too_small = sd.astype(jnp.float32) * qmax < absmax
    sd = jnp.where(too_small, jnp.nextafter(sd, jnp.asarray(jnp.inf, dtype)), sd)
  return sd


AUTO_GROUP_LIMIT = 128  # 'auto' int4 groups: the largest divisor of K up to this size


def largest_divisor_at_most(k: int, limit: int) -> int:
  """Largest ``g <= limit`` dividing ``k`` (1 always qualifies)."""
  return max(g for g in range(1, min(k, limit) + 1) if k % g == 0)


def fits_group_size(k: int, group_size: int) -> bool:
  """A group size works for contracting dim ``k`` if it divides it or covers all of it."""
  return k <= group_size or k % group_size == 0


def check_group_size(qcfg: QuantConfig, contracting_dims, field: str = 'quant.group_size'):
  """Refuse (at config time) an explicit group size that does not fit every contracting
  dim of the model, naming ``field`` and the sizes that do fit (divisors of the dims' gcd,
  up to the largest dim)."""
  gs = qcfg.group_size
  dims = sorted({int(k) for k in contracting_dims})
  if not isinstance(gs, int) or all(fits_group_size(k, gs) for k in dims):
    return
  g = math.gcd(*dims)
  valid = [d for d in range(1, g + 1) if g % d == 0 and d >= 8] or [g]
  raise ValueError(
    f'{field}={gs} does not divide the contracting dims {dims} of the model; valid choices: '
    f'0 (auto: largest divisor <= {AUTO_GROUP_LIMIT} per weight), '
    f'{", ".join(map(str, valid))}, or >= {dims[-1]} (one group)'
  )


def _group_size(k: int, qcfg: QuantConfig, name: str) -> int:
  """Elements per scale group along contracting dim ``k`` for ``qcfg``."""
  gs = qcfg.group_size
  if gs == 'auto':
    if qcfg.bits == 4 and not qcfg.fp8:
      return largest_divisor_at_most(k, AUTO_GROUP_LIMIT)
    return k
  if gs is None or k <= gs:
    return k
  if k % gs:
    raise ValueError(
      f'quant.group_size={gs} does not divide the contracting dim {k} of param '
      f"{name!r}; use a divisor of {k}, 'auto' or None (per-channel)"
    )
  return gs


def quantize_weight(
  w: jax.Array,
  qcfg: QuantConfig,
  *,
  rank: int,
  n_contract: int,
  contract_first: bool,
  name: str = 'weight',
) -> QWeight:
  """Quantize one float weight ``[*lead, *shape]`` (``len(shape) == rank``) -> QWeight."""
  nlead = w.ndim - rank
  if nlead < 0:
    raise ValueError(f'param {name!r} has shape {w.shape}, expected rank >= {rank}')
  lead, shape = tuple(w.shape[:nlead]), tuple(w.shape[nlead:])
  nc = n_contract
  k = _prod(shape[:nc] if contract_first else shape[rank - nc :])
  n = _prod(shape) // k
  gs = _group_size(k, qcfg, name)
  g = k // gs
  wf = w.astype(jnp.float32)
  wg = wf.reshape(lead + ((g, gs, n) if contract_first else (n, g, gs)))
  axis = -2 if contract_first else -1
  absmax = jnp.max(jnp.abs(wg), axis=axis, keepdims=True)
  if qcfg.fp8:
    qdtype, qmax = _FP8[qcfg.fp8]
  else:
    qdtype, qmax = _INT_DTYPES[qcfg.bits], _QMAX[qcfg.bits]
  scale = _store_scale(absmax, qmax, _SCALE_DTYPES[qcfg.scale_dtype])
  r = wg / scale.astype(jnp.float32)
  if qcfg.fp8:
    q = jnp.clip(r, -qmax, qmax).astype(qdtype)
  else:
    q = jnp.clip(jnp.round(r), -qmax, qmax).astype(qdtype)
  return QWeight(
    qvalue=q.reshape(w.shape),
    scale=jnp.squeeze(scale, axis),
    logical_shape=shape,
    n_contract=nc,
    contract_first=contract_first,
    group_size=gs,
    bits=qcfg.bits,
    fmt=qcfg.fp8 or 'int',
    backend=qcfg.backend,
    act_bits=qcfg.act_bits,
    float_dtype=jnp.dtype(w.dtype),
  )


def _is_qweight(x) -> bool:
  return isinstance(x, QWeight)


def _name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def quantize_params(params: dict, qcfg: QuantConfig) -> dict:
  """Policy params -> the same tree with matmul weights replaced by :class:`QWeight`.

  Pure and shape-static (jittable; called inside the jitted train step every RL step).
  Layer matmuls (wq, wk, wv, wo, w_gate, w_up, w_down) are always quantized; norms and
  biases stay float; ``embed`` / ``lm_head`` follow ``quantize_embeddings`` /
  ``quantize_lm_head`` (a tied table needs both, since it is also the output head).
  """
  tied = 'lm_head' not in params

  def want(key: str) -> bool:
    if key == 'embed':
      return qcfg.quantize_embeddings and (qcfg.quantize_lm_head or not tied)
    if key == 'lm_head':
      return qcfg.quantize_lm_head
    return key in _MATMULS

  def visit(path, leaf):
    if isinstance(leaf, QWeight):
      raise TypeError(f'param {_name(path)!r} is already quantized')
    key = getattr(path[-1], 'key', None) if path else None
    if key not in _MATMULS or not want(key):
      return leaf
    rank, nc, first = _MATMULS[key]
    return quantize_weight(
      leaf, qcfg, rank=rank, n_contract=nc, contract_first=first, name=_name(path)
    )

  return jax.tree_util.tree_map_with_path(visit, params, is_leaf=_is_qweight)


def dequantize_params(qparams: dict) -> dict:
  """Inverse of :func:`quantize_params` up to rounding: every QWeight -> float weight."""
  return jax.tree.map(
    lambda x: x.dequantize() if isinstance(x, QWeight) else x, qparams, is_leaf=_is_qweight
  )


def with_backend(qparams: dict, backend: str) -> dict:
  """The same stored weights, run through another backend (no re-quantization)."""
  if backend not in BACKENDS:
    raise ValueError(f'quant.backend must be one of {BACKENDS}, got {backend!r}')
  return jax.tree.map(
    lambda x: x.replace(backend=backend) if isinstance(x, QWeight) else x,
    qparams,
    is_leaf=_is_qweight,
  )


def param_bytes(tree) -> int:
  """Storage bytes of every array leaf (QWeight counts values + scales; int4 = 0.5 B/elem)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    total += -(-leaf.size * jax.dtypes.itemsize_bits(leaf.dtype) // 8)
  return int(total)

"""Pallas kernel for speculative verification (contract: :mod:`.verify_reference`).

:func:`verify_pallas` returns what :func:`.verify_reference.verify_reference` returns on
the same seeds (identical ``num_accepted`` / ``tokens``; ``logprobs`` equal up to f32
rounding of the normalisers) without materialising probabilities or ``[B, k+1, V]``
noise: logits are streamed through on-chip memory in vocabulary blocks with
flash-softmax-style running statistics. Both compute every decision with the same
formulas (:func:`.verify_reference.residual_score` etc.); only the normalisers are summed
in a different order (and, compiled for a GPU/TPU, exp/log may round differently by an
ulp), so a decision can differ only if ``u * q(x)`` and ``p(x)`` (or the two best Gumbel
scores) coincide to within that rounding - probability of order 1e-7 per decision,
never seen in the tests. Greedy decisions (argmax, first index) are exact.

Design: two passes, the second over two rows only
-------------------------------------------------
The residual ``max(0, p_n - q_n)`` needs *both* final normalisers
(``exp(a - lse_p) - exp(b - lse_q)`` is not a monotone function of either running max,
so it cannot be rescaled online like a softmax sum), and which row ``n`` needs it is
only known after every ``p_i(x_i) / q_i(x_i)`` is known, i.e. after the normalisers of
all rows. Tracking residual candidates for every row and every possible normaliser is
not exact, so we do it honestly in two passes:

* **pass 1** (``_stats_kernel``, grid ``(B, chunks, k+1)``): one program per
  (sequence, vocab chunk, position ``j``) streams target row ``j`` and draft row ``j``
  block by block and emits running ``(max, sum)`` pairs for the raw scaled target
  (reported logprobs), the filtered target (``p``) and the filtered draft (``q``) -
  plus the first-index argmax for greedy. Chunks are merged in jnp
  (``lse = M + log sum_c s_c e^{m_c - M}``). The ``2k`` scalars ``a_i(x_i), b_i(x_i)``
  are gathered in jnp, so ``p_i(x_i), q_i(x_i)``, the acceptances and ``n`` are a few
  ``[B, k]`` element-wise ops.
* **pass 2** (``_sample_kernel``, grid ``(B, chunks)``): streams only target row
  ``n_b`` and draft row ``n_b`` and keeps two Gumbel-max candidates (residual, and
  ``p`` for the bonus row / zero-residual fallback) per chunk, merged by an ``argmax``
  over chunks (first chunk wins ties, so the first-index rule of ``jnp.argmax`` holds).

Logit reads per sequence: ``(2k + 1) V`` in pass 1 and ``2 V`` in pass 2 (``V`` when
``n == k`` on GPU, where the draft loads are masked off), i.e. ``(2k + 3) / (2k + 1)``
of the unavoidable single read (1.12x at k = 8). Greedy skips the draft and pass 2:
``(k + 1) V``. Everything else (chunk merge, gathers, acceptance) touches ``O(B k)``
numbers. With top-k / top-p, the jnp pre-pass below adds a sort and a masked min over
every row.

Top-k / top-p split: the per-row keep threshold needs a sort, which is not a streaming
operation, so it stays a jnp pre-pass (:func:`specrl.sampling.filter_threshold` on the
scaled logits, the very function the reference uses). It is handed to the kernel in the
*raw* logit domain, ``rthr = min{raw_v : raw_v / T >= thr}``, so the in-kernel test
``raw_v >= rthr`` selects exactly the reference's set even if the kernel's division
rounds differently from XLA's (division by ``T > 0`` is monotone, so the two tests are
equivalent). Without top-k/top-p there is no pre-pass. The temperature itself is
applied in the kernel.

Randomness is :mod:`specrl.kernels.verify_reference`'s counter-based hash: the Gumbel noise of token
``v`` in row ``n`` is recomputed from ``(seed_b, n, v)`` inside the kernel.

GPU / TPU split (one kernel body, a small layout switch)
--------------------------------------------------------
* ``layout='gpu'`` (Triton lowering, the ``pl.pallas_call`` default on GPU): logits
  stay ``[B, R, V]``; blocks are 1-D ``[block_v]`` power-of-two tiles loaded with
  ``plgpu.load(..., mask=v < V)`` so the vocabulary tail is never read out of bounds
  (masked-off draft loads for ``j == k`` / ``n == k`` cost no memory traffic).
  Vocabulary chunks (whole numbers of blocks) are sized so that ``B (k+1) chunks``
  programs fill the GPU even at ``B = 1``. Pass 2 takes whole-array refs and indexes
  row ``n_b`` dynamically (pointer offsets are int32: ``B (k+1) V < 2^31``).
* ``layout='tpu'`` (Mosaic): logits are viewed as ``[B, R, V/128, 128]`` (free when
  ``V % 128 == 0``, as for real vocabularies; otherwise padded, a copy) so a block is
  ``(rows, 128)``-tiled and (8, 128)-aligned while the row axis is squeezed; pass 2
  picks row ``n_b`` through a scalar-prefetch index map. Grid steps run in order on a
  core, ``j`` is the innermost grid axis and the draft index map clamps ``j`` to
  ``k - 1``, so row ``k`` reuses the previous draft block instead of fetching it.
  Partial blocks at the vocabulary end hold garbage and are masked by ``v < V``.

Both layouts run on CPU in interpret mode (``interpret=True``, and the TPU
interpreter ``pltpu.InterpretParams``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from specrl.kernels import verify_reference as ref_lib
from specrl.sampling import NEG_INF, SamplingParams, filter_threshold, scale_logits

_NSTAT = 8  # statistics lanes per program output
_BIG_IDX = 2**30
_GPU_TARGET_PROGRAMS = 1024  # enough CTAs to saturate HBM on a big GPU at B = 1

# pass-1 output lanes
_M_RAW, _S_RAW, _M_P, _S_P, _M_Q, _S_Q, _AMAX, _AIDX = range(8)
# pass-2 output lanes
_RES, _RES_IDX, _BON, _BON_IDX = range(4)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static tiling: how a row of V logits is split into chunks (programs) and blocks.

  kind: 'gpu' (1-D [block_v] tiles) or 'tpu' ([block_v / 128, 128] tiles).
  vocab: V. block_v: elements per inner-loop step. chunk_v: elements per program.
  """

  kind: str
  vocab: int
  block_v: int
  chunk_v: int

  @property
  def nchunks(self) -> int:
    return pl.cdiv(self.vocab, self.chunk_v)

  @property
  def nblocks(self) -> int:
    return self.chunk_v // self.block_v

  @property
  def tile(self) -> tuple[int, ...]:
    return (self.block_v,) if self.kind == 'gpu' else (self.block_v // 128, 128)

  @property
  def stat_tile(self) -> tuple[int, ...]:
    return (_NSTAT,) if self.kind == 'gpu' else (8, 128)

  @property
  def red_shape(self) -> tuple[int, ...]:
    return (1,) * len(self.tile)

  def view(self, x: jax.Array) -> jax.Array:
    """[B, R, V] -> the layout's HBM view ([B, R, V] or [B, R, V'/128, 128])."""
    if self.kind == 'gpu':
      return x
    pad = -x.shape[-1] % 128
    if pad:
      x = jnp.pad(x, ((0, 0), (0, 0), (0, pad)))
    return x.reshape(x.shape[:-1] + (x.shape[-1] // 128, 128))

  def row_block(self, index_map) -> pl.BlockSpec:
    """BlockSpec of one chunk of one row; index_map(*grid) -> (b, row, chunk)."""
    if self.kind == 'gpu':
      return pl.BlockSpec((None, None, self.chunk_v), index_map)
    return pl.BlockSpec((None, None, self.chunk_v // 128, 128), lambda *a: (*index_map(*a), 0))

  def cols(self, chunk, i) -> jax.Array:
    """Global vocabulary index of every element of block i of chunk. int32 tile."""
    base = chunk * self.chunk_v + i * self.block_v
    if self.kind == 'gpu':
      return base + lax.broadcasted_iota(jnp.int32, self.tile, 0)
    rows = lax.broadcasted_iota(jnp.int32, self.tile, 0)
    return base + rows * 128 + lax.broadcasted_iota(jnp.int32, self.tile, 1)

  def load(self, ref, i, valid, *, prefix=(), offset=0, mask=None) -> jax.Array:
    """Block i of a chunk as f32, NEG_INF where not valid (tail / garbage).

    GPU: ``ref.at[*prefix, offset + i*block_v : +block_v]`` via a masked load (``mask``
    defaults to ``valid``; masked lanes are not read). TPU: rows of the VMEM block.
    """
    if self.kind == 'gpu':
      idx = (*prefix, pl.ds(offset + i * self.block_v, self.block_v))
      x = plgpu.load(ref.at[idx], mask=valid if mask is None else mask, other=0)
    else:
      r = self.block_v // 128
      x = ref[pl.ds(pl.multiple_of(i * r, r), r), :]
    return jnp.where(valid, x.astype(jnp.float32), NEG_INF)

  # -- scalar <-> lane-tile packing (portable: no scalar memory needed) --------------

  def _lane(self):
    lane = lax.broadcasted_iota(jnp.int32, self.stat_tile, len(self.stat_tile) - 1)
    if self.kind == 'gpu':
      return lane, None
    return lane, lax.broadcasted_iota(jnp.int32, self.stat_tile, 0) == 0

  def get(self, tile, s):
    """Lane s of a packed tile, as a red_shape value."""
    lane, first = self._lane()
    sel = lane == s if first is None else (lane == s) & first
    return _reduce(jnp.sum, jnp.where(sel, tile, jnp.zeros((), tile.dtype)))

  def put(self, vals) -> jax.Array:
    """Pack red_shape f32 values into lanes 0..len-1 of a stat tile."""
    lane, _ = self._lane()
    out = jnp.zeros(self.stat_tile, jnp.float32)
    for s, v in enumerate(vals):
      out = jnp.where(lane == s, v.astype(jnp.float32), out)
    return out

  def pack(self, cols: list[jax.Array], dtype) -> jax.Array:
    """jnp side: [...] arrays -> [..., *stat_tile] packed tiles (lane s = cols[s])."""
    x = jnp.stack([c.astype(dtype) for c in cols], axis=-1)
    if self.kind == 'gpu':
      return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, _NSTAT - len(cols))])
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 128 - len(cols))])
    return jnp.broadcast_to(x[..., None, :], x.shape[:-1] + (8, 128))

  def unpack(self, x: jax.Array, s: int) -> jax.Array:
    """jnp side: lane s of [..., *stat_tile] -> [...]."""
    return x[..., s] if self.kind == 'gpu' else x[..., 0, s]

  def stat_block(self, lead: int, index_map) -> pl.BlockSpec:
    """BlockSpec of one packed stat tile of a [*lead dims, *stat_tile] array."""
    zeros = (0,) * len(self.stat_tile)
    return pl.BlockSpec((None,) * lead + self.stat_tile, lambda *a: (*index_map(*a), *zeros))


def _reduce(fn, x):
  """Full reduction keeping every axis (size-1 shapes lower on Triton and Mosaic)."""
  for ax in reversed(range(x.ndim)):
    x = fn(x, axis=ax, keepdims=True)
  return x


def _online(m, s, a, mask):
  """Flash-softmax update of a running (max, sum exp) with the masked block a."""
  m_new = jnp.maximum(m, _reduce(jnp.max, jnp.where(mask, a, NEG_INF)))
  s_new = s * jnp.exp(m - m_new) + _reduce(jnp.sum, jnp.where(mask, jnp.exp(a - m_new), 0.0))
  return m_new, s_new


def _best(best, idx, score, cols):
  """Running first-index argmax: a later block only wins with a strictly larger max."""
  blk = _reduce(jnp.max, score)
  blk_idx = _reduce(jnp.min, jnp.where(score == blk, cols, _BIG_IDX))
  win = blk > best
  return jnp.where(win, blk, best), jnp.where(win, blk_idx, idx)


# ----------------------------------------------------------------------------------
# Pass 1: normalisers (and greedy argmax) of every row, per vocab chunk.
# ----------------------------------------------------------------------------------


def _stats_kernel(*refs, lay: _Layout, k: int, sp: SamplingParams):
  """Program (b, chunk c, position j): running stats of target row j, draft row j.

  refs: target block, [draft block], [threshold tile (lanes: rthr_p, rthr_q)], out tile
  (lanes: m_raw, s_raw, m_p, s_p, m_q, s_q, argmax value, argmax index).
  """
  it = iter(refs)
  t_ref = next(it)
  d_ref = None if sp.greedy else next(it)
  thr = next(it)[...] if sp.filtered else None
  o_ref = next(it)
  c, j = pl.program_id(1), pl.program_id(2)
  red = lay.red_shape
  ninf = jnp.full(red, NEG_INF, jnp.float32)
  zero = jnp.zeros(red, jnp.float32)
  if thr is not None:
    thr_p, thr_q = lay.get(thr, 0), lay.get(thr, 1)
  temp = jnp.float32(sp.logprob_temperature)

  def body(i, st):
    m_raw, s_raw, m_p, s_p, m_q, s_q, amax, aidx = st
    cols = lay.cols(c, i)
    valid = cols < lay.vocab
    x = lay.load(t_ref, i, valid)
    if sp.greedy:
      m_raw, s_raw = _online(m_raw, s_raw, x, valid)  # T = 1: x / 1 == x
      amax, aidx = _best(amax, aidx, jnp.where(valid, x, -jnp.inf), cols)
      return m_raw, s_raw, m_p, s_p, m_q, s_q, amax, aidx
    a = x / temp
    m_raw, s_raw = _online(m_raw, s_raw, a, valid)
    if thr is not None:
      m_p, s_p = _online(m_p, s_p, a, valid & (x >= thr_p))
    y = lay.load(d_ref, i, valid, mask=valid & (j < k))
    kq = valid if thr is None else valid & (y >= thr_q)
    m_q, s_q = _online(m_q, s_q, y / temp, kq)
    return m_raw, s_raw, m_p, s_p, m_q, s_q, amax, aidx

  init = (
    ninf,
    zero,
    ninf,
    zero,
    ninf,
    zero,
    jnp.full(red, -jnp.inf, jnp.float32),
    jnp.zeros(red, jnp.int32),
  )
  m_raw, s_raw, m_p, s_p, m_q, s_q, amax, aidx = lax.fori_loop(0, lay.nblocks, body, init)
  if thr is None:  # unfiltered: p's normaliser is the raw one
    m_p, s_p = m_raw, s_raw
  o_ref[...] = lay.put([m_raw, s_raw, m_p, s_p, m_q, s_q, amax, aidx])


def _stats_call(tv, dv, thr, lay: _Layout, k: int, sp: SamplingParams, interpret):
  bsz = tv.shape[0]
  grid = (bsz, lay.nchunks, k + 1)
  in_specs = [lay.row_block(lambda b, c, j: (b, j, c))]
  args = [tv]
  if not sp.greedy:
    in_specs.append(lay.row_block(lambda b, c, j: (b, jnp.minimum(j, k - 1), c)))
    args.append(dv)
  if sp.filtered:
    in_specs.append(lay.stat_block(2, lambda b, c, j: (b, j)))
    args.append(thr)
  return pl.pallas_call(
    functools.partial(_stats_kernel, lay=lay, k=k, sp=sp),
    out_shape=jax.ShapeDtypeStruct((bsz, lay.nchunks, k + 1, *lay.stat_tile), jnp.float32),
    grid=grid,
    in_specs=in_specs,
    out_specs=lay.stat_block(3, lambda b, c, j: (b, c, j)),
    interpret=interpret,
    compiler_params=_compiler_params(lay, 3),
    name='verify_stats',
  )(*args)


# ----------------------------------------------------------------------------------
# Pass 2: Gumbel-max over the residual (and p) of row n_b only.
# ----------------------------------------------------------------------------------


def _sample_kernel(*refs, lay: _Layout, k: int, sp: SamplingParams):
  """Program (b, chunk c): best residual / p candidates of row n_b within chunk c.

  refs: [n (TPU scalar prefetch)], target, draft, f32 params tile (lanes: lse_p, lse_q,
  rthr_p, rthr_q, has_draft), int32 params tile (lanes: row key, n), out tile (lanes:
  residual score, index, p score, index).
  """
  if lay.kind == 'tpu':
    refs = refs[1:]  # n already used by the index maps
  t_ref, d_ref, fp_ref, ip_ref, o_ref = refs
  b, c = pl.program_id(0), pl.program_id(1)
  fp, ip = fp_ref[...], ip_ref[...]
  lse_p, lse_q = lay.get(fp, 0), lay.get(fp, 1)
  thr_p, thr_q = lay.get(fp, 2), lay.get(fp, 3)
  has_draft = lay.get(fp, 4) > 0.5
  key = lay.get(ip, 0)
  temp = jnp.float32(sp.temperature)
  if lay.kind == 'gpu':  # whole-array refs: pick row n_b here
    n = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, ip.shape, 0) == 1, ip, 0))
    t_kw = dict(prefix=(b, n), offset=c * lay.chunk_v)
    d_kw = dict(prefix=(b, jnp.minimum(n, k - 1)), offset=c * lay.chunk_v)
  else:
    t_kw, d_kw = {}, {}

  def body(i, st):
    res, res_i, bon, bon_i = st
    cols = lay.cols(c, i)
    valid = cols < lay.vocab
    x = lay.load(t_ref, i, valid, **t_kw)
    a = x / temp
    kp = valid & ((x >= thr_p) if sp.filtered else (a >= NEG_INF))
    g = ref_lib.gumbel_from_bits(ref_lib.element_bits(key, cols))
    bon, bon_i = _best(bon, bon_i, ref_lib.bonus_score(a, kp, g), cols)
    dmask = valid & has_draft
    y = lay.load(d_ref, i, valid, mask=dmask, **d_kw)
    bq = y / temp
    kq = valid & ((y >= thr_q) if sp.filtered else (bq >= NEG_INF))
    score = ref_lib.residual_score(a, kp, lse_p, bq, kq, lse_q, g)
    res, res_i = _best(res, res_i, jnp.where(dmask, score, -jnp.inf), cols)
    return res, res_i, bon, bon_i

  red = lay.red_shape
  ninf = jnp.full(red, -jnp.inf, jnp.float32)
  zero = jnp.zeros(red, jnp.int32)
  res, res_i, bon, bon_i = lax.fori_loop(0, lay.nblocks, body, (ninf, zero, ninf, zero))
  o_ref[...] = lay.put([res, res_i, bon, bon_i])


def _sample_call(tv, dv, n, fparams, iparams, lay: _Layout, k: int, sp: SamplingParams, interpret):
  bsz = tv.shape[0]
  kernel = functools.partial(_sample_kernel, lay=lay, k=k, sp=sp)
  out_shape = jax.ShapeDtypeStruct((bsz, lay.nchunks, *lay.stat_tile), jnp.float32)
  if lay.kind == 'gpu':
    return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(bsz, lay.nchunks),
      in_specs=[
        pl.BlockSpec(),
        pl.BlockSpec(),
        lay.stat_block(1, lambda b, c: (b,)),
        lay.stat_block(1, lambda b, c: (b,)),
      ],
      out_specs=lay.stat_block(2, lambda b, c: (b, c)),
      interpret=interpret,
      compiler_params=_compiler_params(lay, 2),
      name='verify_sample',
    )(tv, dv, fparams, iparams)
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=1,
    grid=(bsz, lay.nchunks),
    in_specs=[
      lay.row_block(lambda b, c, n_ref: (b, n_ref[b], c)),
      lay.row_block(lambda b, c, n_ref: (b, jnp.minimum(n_ref[b], k - 1), c)),
      lay.stat_block(1, lambda b, c, n_ref: (b,)),
      lay.stat_block(1, lambda b, c, n_ref: (b,)),
    ],
    out_specs=lay.stat_block(2, lambda b, c, n_ref: (b, c)),
  )
  return pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid_spec=grid_spec,
    interpret=interpret,
    compiler_params=_compiler_params(lay, 2),
    name='verify_sample',
  )(n, tv, dv, fparams, iparams)


# ----------------------------------------------------------------------------------
# Wrapper.
# ----------------------------------------------------------------------------------


def _compiler_params(lay: _Layout, ndim: int):
  if lay.kind == 'tpu':
    return pltpu.CompilerParams(dimension_semantics=('parallel',) * ndim)
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def make_layout(
  kind: str, vocab: int, rows: int, dtype, block_v: int | None = None, chunk_v: int | None = None
) -> _Layout:
  """Pick block / chunk sizes. rows = programs per chunk (B (k+1) in pass 1, B in pass 2).

  GPU: power-of-two blocks (Triton), chunks (whole numbers of blocks) sized so that
  rows * chunks >= ~1024 programs.
  TPU: (rows, 128) blocks with rows a multiple of the dtype's sublane packing; one chunk
  per row (grid steps run sequentially on a core; a chunk of 152k f32 logits is 0.6 MB of
  VMEM per buffer).
  """
  if kind == 'gpu':
    block_v = block_v or 1024
    if block_v & (block_v - 1):
      raise ValueError(f'gpu block_v must be a power of two, got {block_v}')
    if chunk_v is None:
      chunk_v = pl.cdiv(vocab, pl.cdiv(_GPU_TARGET_PROGRAMS, rows))
    # A chunk is a whole number of blocks (only the ref's pointer block; loads stay
    # power-of-two) and never spans more blocks than the row needs.
    chunk_v = max(block_v, min(chunk_v, vocab))
  elif kind == 'tpu':
    sub = 8 * (4 // jnp.dtype(dtype).itemsize)  # f32: 8 rows, bf16: 16 rows
    block_v = block_v or 2048
    if block_v % (sub * 128):
      raise ValueError(f'tpu block_v must be a multiple of {sub * 128} for {dtype}')
    chunk_v = chunk_v or vocab
  else:
    raise ValueError(f"layout must be 'gpu' or 'tpu', got {kind!r}")
  chunk_v = pl.cdiv(chunk_v, block_v) * block_v
  return _Layout(kind=kind, vocab=vocab, block_v=block_v, chunk_v=chunk_v)


def _merge_lse(m, s):
  """Merge per-chunk (max, sum) pairs along axis 1 into a log-sum-exp."""
  mm = jnp.max(m, axis=1)
  return mm + jnp.log(jnp.sum(s * jnp.exp(m - mm[:, None]), axis=1))


def _merge_best(score, idx):
  """Merge per-chunk (score, index) along axis 1: first chunk with the max wins."""
  c = jnp.argmax(score, axis=1)
  best = jnp.take_along_axis(score, c[:, None], axis=1)[:, 0]
  return best, jnp.take_along_axis(idx, c[:, None], axis=1)[:, 0].astype(jnp.int32)


def _raw_threshold(raw: jax.Array, sp: SamplingParams) -> jax.Array:
  """Top-k/top-p keep threshold moved to the raw-logit domain. [B, R, V] -> [B, R].

  keep_v <=> raw_v / T >= thr <=> raw_v >= min{raw_w : raw_w / T >= thr}, because f32
  division by T > 0 is monotone; the kernel's test is then exact whatever its division.
  """
  scaled = scale_logits(raw, sp)
  thr = filter_threshold(scaled, sp)
  return jnp.min(jnp.where(scaled >= thr[..., None], raw.astype(jnp.float32), jnp.inf), -1)


def default_layout() -> str:
  return 'tpu' if jax.default_backend() == 'tpu' else 'gpu'


@functools.partial(jax.jit, static_argnames=('sp', 'interpret', 'layout', 'block_v', 'chunk_v'))
def verify_pallas(
  target_logits: jax.Array,
  draft_logits: jax.Array,
  draft_tokens: jax.Array,
  seeds: jax.Array,
  sp: SamplingParams,
  interpret=None,
  layout: str | None = None,
  block_v: int | None = None,
  chunk_v: int | None = None,
) -> ref_lib.VerifyResult:
  """Speculative verification with the Pallas kernels (contract: verify_reference).

  Args:
    target_logits: f32/bf16 [B, k+1, V]; draft_logits: [B, k, V]; draft_tokens: int32
      [B, k]; seeds: uint32 [B]; sp: static sampling settings.
    interpret: None -> interpret mode iff the default backend is CPU. True uses the
      generic interpreter for 'gpu' and ``pltpu.InterpretParams()`` for 'tpu'; an
      ``InterpretParams`` instance is passed through.
    layout: 'gpu' (Triton) or 'tpu' (Mosaic); None -> from the default backend.
    block_v / chunk_v: vocabulary elements per inner step / per program (None: auto).
  Returns:
    VerifyResult, identical to verify_reference up to f32 rounding of normalisers.
  """
  bsz, k1, vocab = target_logits.shape
  k = k1 - 1
  if k < 1 or draft_logits.shape != (bsz, k, vocab) or draft_tokens.shape != (bsz, k):
    raise ValueError(
      f'bad shapes: target {target_logits.shape}, draft {draft_logits.shape}, '
      f'tokens {draft_tokens.shape}'
    )
  layout = layout or default_layout()
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  if interpret is True and layout == 'tpu':
    interpret = pltpu.InterpretParams()
  x = draft_tokens.astype(jnp.int32)
  dtype = target_logits.dtype
  lay1 = make_layout(layout, vocab, bsz * k1, dtype, block_v, chunk_v)
  tv = lay1.view(target_logits)
  dv = lay1.view(draft_logits)

  thr_t = thr_d = None
  thr = None
  if sp.filtered:  # jnp pre-pass: the sort-based thresholds
    thr_t = _raw_threshold(target_logits, sp)  # [B, k+1]
    thr_d = _raw_threshold(draft_logits, sp)  # [B, k]
    thr_dp = jnp.concatenate([thr_d, jnp.zeros((bsz, 1), jnp.float32)], axis=1)
    thr = lay1.pack([thr_t, thr_dp], jnp.float32)

  st = _stats_call(tv, dv, thr, lay1, k, sp, interpret)  # [B, C, k+1, *tile]

  def stat(s):
    return lay1.unpack(st, s)  # [B, C, k+1]

  lse_raw = _merge_lse(stat(_M_RAW), stat(_S_RAW))  # [B, k+1]

  def gather(v, toks):  # [B, R, V], [B, R] -> [B, R] raw f32
    return jnp.take_along_axis(v, toks[..., None], axis=-1)[..., 0].astype(jnp.float32)

  if sp.greedy:
    _, am = _merge_best(
      jnp.swapaxes(stat(_AMAX), 1, 2).reshape(bsz * k1, -1),
      jnp.swapaxes(stat(_AIDX), 1, 2).reshape(bsz * k1, -1),
    )
    am = am.reshape(bsz, k1)
    n = ref_lib.leading_accepts(x == am[:, :k])
    token_n = jnp.take_along_axis(am, n[:, None], axis=1)[:, 0]
  else:
    temp = jnp.float32(sp.temperature)
    lse_p = _merge_lse(stat(_M_P), stat(_S_P))  # [B, k+1]
    lse_q = _merge_lse(stat(_M_Q), stat(_S_Q))[:, :k]  # [B, k]
    raw_tx = gather(target_logits[:, :k], x)
    raw_dx = gather(draft_logits, x)
    a_x, b_x = raw_tx / temp, raw_dx / temp
    if sp.filtered:
      kp_x, kq_x = raw_tx >= thr_t[:, :k], raw_dx >= thr_d
    else:
      kp_x, kq_x = a_x >= NEG_INF, b_x >= NEG_INF
    p_x = jnp.where(kp_x, jnp.exp(a_x - lse_p[:, :k]), 0.0)
    q_x = jnp.where(kq_x, jnp.exp(b_x - lse_q), 0.0)
    n = ref_lib.leading_accepts(ref_lib.accept_uniforms(seeds, k) * q_x < p_x)

    m = jnp.minimum(n, k - 1)
    row = functools.partial(jnp.take_along_axis, axis=1)
    has_draft = (n < k).astype(jnp.float32)
    zeros = jnp.zeros((bsz,), jnp.float32)
    fcols = [row(lse_p, n[:, None])[:, 0], row(lse_q, m[:, None])[:, 0]]
    if sp.filtered:
      fcols += [row(thr_t, n[:, None])[:, 0], row(thr_d, m[:, None])[:, 0]]
    else:
      fcols += [zeros, zeros]
    key = ref_lib.row_key(ref_lib.seeds_to_i32(seeds), n, ref_lib.STREAM_SAMPLE)
    lay2 = make_layout(layout, vocab, bsz, dtype, block_v, chunk_v)
    out = _sample_call(
      tv,
      dv,
      n,
      lay2.pack(fcols + [has_draft], jnp.float32),
      lay2.pack([key, n], jnp.int32),
      lay2,
      k,
      sp,
      interpret,
    )
    res, res_i = _merge_best(lay2.unpack(out, _RES), lay2.unpack(out, _RES_IDX))
    _, bon_i = _merge_best(lay2.unpack(out, _BON), lay2.unpack(out, _BON_IDX))
    token_n = jnp.where((n < k) & (res > -jnp.inf), res_i, bon_i)

  tokens = ref_lib.assemble(n, x, token_n)
  lp = gather(target_logits, tokens) / jnp.float32(sp.logprob_temperature) - lse_raw
  j = jnp.arange(k1)[None, :]
  logprobs = jnp.where(j <= n[:, None], lp, 0.0)
  return ref_lib.VerifyResult(num_accepted=n, tokens=tokens, logprobs=logprobs)

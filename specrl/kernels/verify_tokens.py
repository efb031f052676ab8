"""Pallas kernel for token-only verification of deterministic (one-hot) drafts.

Contract: :func:`specrl.kernels.verify_reference.verify_tokens_reference` (identical
``num_accepted`` / ``tokens`` on the same seeds; ``logprobs`` up to f32 rounding of the
normaliser). The general kernel (:mod:`specrl.kernels.verify`) streams ``[B, k, V]`` draft
logits and sorts them for top-k / top-p; a one-hot draft needs neither: ``q(x) = 1`` and
the residual of ``p`` after rejecting ``x`` is ``p`` with ``x`` removed. So this kernel
reads only the target logits, with the general kernel's layouts, blocks and two passes:

* pass 1 (grid ``(B, chunks, k+1)``): running ``(max, sum)`` of the raw scaled target
  (reported logprobs) and of the filtered target (``p``), plus the first-index argmax for
  greedy; chunks merged in jnp. ``p_i(x_i)`` is one gather per draft, ``n`` a few
  ``[B, k]`` ops (drafts < 0 were not proposed).
* pass 2 (grid ``(B, chunks)``, not run greedily): target row ``n_b`` only; two Gumbel-max
  candidates per chunk, ``p`` itself (bonus / no draft at ``n``) and ``p`` without ``x_n``
  (the residual). No normaliser is needed for either.

Logit reads per sequence: ``(k + 1) V + V`` (half the general kernel's ``(2k + 3) V``).
Top-k / top-p: the target's sort-based threshold is the same jnp pre-pass as the general
kernel's (there is no draft to sort).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from specrl.kernels import verify as general
from specrl.kernels import verify_reference as ref_lib
from specrl.sampling import NEG_INF, SamplingParams

# pass-1 lanes: m_raw, s_raw, m_p, s_p, argmax value, argmax index
_M_RAW, _S_RAW, _M_P, _S_P, _AMAX, _AIDX = range(6)
# pass-2 lanes: residual score, index, p score, index
_RES, _RES_IDX, _BON, _BON_IDX = range(4)


def _stats_kernel(*refs, lay, sp: SamplingParams):
  """Program (b, chunk c, position j): running stats of target row j."""
  it = iter(refs)
  t_ref = next(it)
  thr = next(it)[...] if sp.filtered else None
  o_ref = next(it)
  c = pl.program_id(1)
  red = lay.red_shape
  ninf = jnp.full(red, NEG_INF, jnp.float32)
  zero = jnp.zeros(red, jnp.float32)
  thr_p = lay.get(thr, 0) if thr is not None else None
  temp = jnp.float32(sp.logprob_temperature)

  def body(i, st):
    m_raw, s_raw, m_p, s_p, amax, aidx = st
    cols = lay.cols(c, i)
    valid = cols < lay.vocab
    x = lay.load(t_ref, i, valid)
    if sp.greedy:
      m_raw, s_raw = general._online(m_raw, s_raw, x, valid)
      amax, aidx = general._best(amax, aidx, jnp.where(valid, x, -jnp.inf), cols)
      return m_raw, s_raw, m_p, s_p, amax, aidx
    a = x / temp
    m_raw, s_raw = general._online(m_raw, s_raw, a, valid)
    if thr_p is not None:
      m_p, s_p = general._online(m_p, s_p, a, valid & (x >= thr_p))
    return m_raw, s_raw, m_p, s_p, amax, aidx

  init = (ninf, zero, ninf, zero, jnp.full(red, -jnp.inf, jnp.float32), jnp.zeros(red, jnp.int32))
  m_raw, s_raw, m_p, s_p, amax, aidx = lax.fori_loop(0, lay.nblocks, body, init)
  if thr_p is None:
    m_p, s_p = m_raw, s_raw
  o_ref[...] = lay.put([m_raw, s_raw, m_p, s_p, amax, aidx])


def _stats_call(tv, thr, lay, k: int, sp: SamplingParams, interpret):
  bsz = tv.shape[0]
  in_specs = [lay.row_block(lambda b, c, j: (b, j, c))]
  args = [tv]
  if sp.filtered:
    in_specs.append(lay.stat_block(2, lambda b, c, j: (b, j)))
    args.append(thr)
  return pl.pallas_call(
    functools.partial(_stats_kernel, lay=lay, sp=sp),
    out_shape=jax.ShapeDtypeStruct((bsz, lay.nchunks, k + 1, *lay.stat_tile), jnp.float32),
    grid=(bsz, lay.nchunks, k + 1),
    in_specs=in_specs,
    out_specs=lay.stat_block(3, lambda b, c, j: (b, c, j)),
    interpret=interpret,
    compiler_params=general._compiler_params(lay, 3),
    name='verify_tokens_stats',
  )(*args)


def _sample_kernel(*refs, lay, sp: SamplingParams):
  """Program (b, chunk c): best ``p`` and ``p``-without-``x_n`` candidates of row n_b.

  refs: [n (TPU scalar prefetch)], target, f32 tile (lanes: rthr_p), int32 tile (lanes:
  row key, n, x_n), out tile.
  """
  if lay.kind == 'tpu':
    refs = refs[1:]
  t_ref, fp_ref, ip_ref, o_ref = refs
  b, c = pl.program_id(0), pl.program_id(1)
  fp, ip = fp_ref[...], ip_ref[...]
  thr_p = lay.get(fp, 0)
  key, x_n = lay.get(ip, 0), lay.get(ip, 2)
  temp = jnp.float32(sp.temperature)
  if lay.kind == 'gpu':
    n = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, ip.shape, 0) == 1, ip, 0))
    t_kw = dict(prefix=(b, n), offset=c * lay.chunk_v)
  else:
    t_kw = {}

  def body(i, st):
    res, res_i, bon, bon_i = st
    cols = lay.cols(c, i)
    valid = cols < lay.vocab
    x = lay.load(t_ref, i, valid, **t_kw)
    a = x / temp
    kp = valid & ((x >= thr_p) if sp.filtered else (a >= NEG_INF))
    g = ref_lib.gumbel_from_bits(ref_lib.element_bits(key, cols))
    score = ref_lib.bonus_score(a, kp, g)
    bon, bon_i = general._best(bon, bon_i, score, cols)
    res, res_i = general._best(res, res_i, ref_lib.onehot_residual_score(score, cols, x_n), cols)
    return res, res_i, bon, bon_i

  red = lay.red_shape
  ninf = jnp.full(red, -jnp.inf, jnp.float32)
  zero = jnp.zeros(red, jnp.int32)
  res, res_i, bon, bon_i = lax.fori_loop(0, lay.nblocks, body, (ninf, zero, ninf, zero))
  o_ref[...] = lay.put([res, res_i, bon, bon_i])


def _sample_call(tv, n, fparams, iparams, lay, sp: SamplingParams, interpret):
  bsz = tv.shape[0]
  kernel = functools.partial(_sample_kernel, lay=lay, sp=sp)
  out_shape = jax.ShapeDtypeStruct((bsz, lay.nchunks, *lay.stat_tile), jnp.float32)
  params = dict(
    interpret=interpret,
    compiler_params=general._compiler_params(lay, 2),
    name='verify_tokens_sample',
  )
  if lay.kind == 'gpu':
    return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(bsz, lay.nchunks),
      in_specs=[
        pl.BlockSpec(),
        lay.stat_block(1, lambda b, c: (b,)),
        lay.stat_block(1, lambda b, c: (b,)),
      ],
      out_specs=lay.stat_block(2, lambda b, c: (b, c)),
      **params,
    )(tv, fparams, iparams)
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=1,
    grid=(bsz, lay.nchunks),
    in_specs=[
      lay.row_block(lambda b, c, n_ref: (b, n_ref[b], c)),
      lay.stat_block(1, lambda b, c, n_ref: (b,)),
      lay.stat_block(1, lambda b, c, n_ref: (b,)),
    ],
    out_specs=lay.stat_block(2, lambda b, c, n_ref: (b, c)),
  )
  return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, **params)(
    n, tv, fparams, iparams
  )


@functools.partial(jax.jit, static_argnames=('sp', 'interpret', 'layout', 'block_v', 'chunk_v'))
def verify_tokens_pallas(
  target_logits: jax.Array,
  draft_tokens: jax.Array,
  seeds: jax.Array,
  sp: SamplingParams,
  interpret=None,
  layout: str | None = None,
  block_v: int | None = None,
  chunk_v: int | None = None,
) -> ref_lib.VerifyResult:
  """Token-only verification with the Pallas kernels (contract: verify_tokens_reference).

  Args:
    target_logits: f32/bf16 [B, k+1, V]; draft_tokens: int32 [B, k] (< 0: not proposed);
    seeds: uint32 [B]; sp: static sampling settings; interpret / layout / block_v /
    chunk_v: as :func:`specrl.kernels.verify.verify_pallas`.
  """
  bsz, k1, vocab = target_logits.shape
  k = k1 - 1
  if k < 1 or draft_tokens.shape != (bsz, k):
    raise ValueError(f'bad shapes: target {target_logits.shape}, tokens {draft_tokens.shape}')
  layout = layout or general.default_layout()
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  if interpret is True and layout == 'tpu':
    interpret = pltpu.InterpretParams()
  proposed = ref_lib.leading_accepts(draft_tokens >= 0)[:, None] > jnp.arange(k)[None, :]
  x = jnp.where(proposed, draft_tokens, 0).astype(jnp.int32)
  dtype = target_logits.dtype
  lay1 = general.make_layout(layout, vocab, bsz * k1, dtype, block_v, chunk_v)
  tv = lay1.view(target_logits)
  thr_t = thr = None
  if sp.filtered:  # jnp pre-pass: the sort-based threshold of the target only
    thr_t = general._raw_threshold(target_logits, sp)  # [B, k+1]
    thr = lay1.pack([thr_t], jnp.float32)
  st = _stats_call(tv, thr, lay1, k, sp, interpret)

  def stat(s):
    return lay1.unpack(st, s)  # [B, C, k+1]

  lse_raw = general._merge_lse(stat(_M_RAW), stat(_S_RAW))

  def gather(v, toks):
    return jnp.take_along_axis(v, toks[..., None], axis=-1)[..., 0].astype(jnp.float32)

  row = functools.partial(jnp.take_along_axis, axis=1)
  if sp.greedy:
    _, am = general._merge_best(
      jnp.swapaxes(stat(_AMAX), 1, 2).reshape(bsz * k1, -1),
      jnp.swapaxes(stat(_AIDX), 1, 2).reshape(bsz * k1, -1),
    )
    am = am.reshape(bsz, k1)
    n = ref_lib.leading_accepts(proposed & (x == am[:, :k]))
    token_n = row(am, n[:, None])[:, 0]
  else:
    temp = jnp.float32(sp.temperature)
    lse_p = general._merge_lse(stat(_M_P), stat(_S_P))  # [B, k+1]
    raw_tx = gather(target_logits[:, :k], x)
    a_x = raw_tx / temp
    kp_x = raw_tx >= thr_t[:, :k] if sp.filtered else a_x >= NEG_INF
    p_x = jnp.where(kp_x, jnp.exp(a_x - lse_p[:, :k]), 0.0)
    n = ref_lib.leading_accepts(proposed & (ref_lib.accept_uniforms(seeds, k) < p_x))
    m = jnp.minimum(n, k - 1)
    rejected = row(proposed, m[:, None])[:, 0] & (n < k)
    thr_n = row(thr_t, n[:, None])[:, 0] if sp.filtered else jnp.zeros((bsz,), jnp.float32)
    key = ref_lib.row_key(ref_lib.seeds_to_i32(seeds), n, ref_lib.STREAM_SAMPLE)
    lay2 = general.make_layout(layout, vocab, bsz, dtype, block_v, chunk_v)
    out = _sample_call(
      tv,
      n,
      lay2.pack([thr_n], jnp.float32),
      lay2.pack([key, n, row(x, m[:, None])[:, 0]], jnp.int32),
      lay2,
      sp,
      interpret,
    )
    res, res_i = general._merge_best(lay2.unpack(out, _RES), lay2.unpack(out, _RES_IDX))
    _, bon_i = general._merge_best(lay2.unpack(out, _BON), lay2.unpack(out, _BON_IDX))
    token_n = jnp.where(rejected & (res > -jnp.inf), res_i, bon_i)
  tokens = ref_lib.assemble(n, x, token_n)
  lp = gather(target_logits, tokens) / jnp.float32(sp.logprob_temperature) - lse_raw
  j = jnp.arange(k1)[None, :]
  return ref_lib.VerifyResult(
    num_accepted=n, tokens=tokens, logprobs=jnp.where(j <= n[:, None], lp, 0.0)
  )

"""Pallas kernel for tree verification by sample-and-compare (keyed like plain decoding).

Contract: :func:`specrl.kernels.verify_tree_reference.verify_tree_reference` (identical
``num_accepted`` / ``tokens`` / ``path`` on the same seeds; ``logprobs`` up to f32 rounding
of the normaliser). One pass over the target logits, with the general kernel's layouts
and blocks (:mod:`specrl.kernels.verify`): program ``(b, chunk c, node u)`` streams its
chunk of row u once and keeps

* the running ``(max, sum)`` of the scaled raw logits (reported logprobs);
* the running first-index best of the Gumbel-max score ``a + G`` over the tokens that
  top-k / top-p keep (``G`` from the node's plain-step key, :func:`node_keys`, recomputed
  per element), or of the raw logits when greedy.

Chunks merge in jnp (:func:`specrl.kernels.verify._merge_best`: the first chunk with the
max wins, as the reference's argmax). The walk down the tree is the reference's
:func:`~specrl.kernels.verify_tree_reference.walk` on the ``[B, N]`` draws. Logit reads per
row: ``N V``, no draft logits, no second pass. Top-k / top-p: the same sort-based jnp
threshold pre-pass as the other kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from specrl.kernels import verify as general
from specrl.kernels import verify_tree_reference as ref_lib
from specrl.prng import element_bits, gumbel_from_bits
from specrl.sampling import NEG_INF, SamplingParams

_M_RAW, _S_RAW, _BEST, _BEST_IDX = range(4)  # output lanes


def _node_kernel(*refs, lay, sp: SamplingParams):
  """Program (b, chunk c, node u): lse stats and the best draw candidate of row u."""
  it = iter(refs)
  t_ref = next(it)
  thr = next(it)[...] if sp.filtered else None
  key = None if sp.greedy else lay.get(next(it)[...], 0)
  o_ref = next(it)
  c = pl.program_id(1)
  red = lay.red_shape
  thr_p = lay.get(thr, 0) if thr is not None else None
  temp = jnp.float32(sp.logprob_temperature)

  def body(i, st):
    m_raw, s_raw, best, best_i = st
    cols = lay.cols(c, i)
    valid = cols < lay.vocab
    x = lay.load(t_ref, i, valid)
    if sp.greedy:
      m_raw, s_raw = general._online(m_raw, s_raw, x, valid)
      best, best_i = general._best(best, best_i, jnp.where(valid, x, -jnp.inf), cols)
      return m_raw, s_raw, best, best_i
    a = x / temp
    m_raw, s_raw = general._online(m_raw, s_raw, a, valid)
    kp = valid & ((x >= thr_p) if thr_p is not None else (a >= NEG_INF))
    g = gumbel_from_bits(element_bits(key, cols))
    best, best_i = general._best(best, best_i, jnp.where(kp, a + g, -jnp.inf), cols)
    return m_raw, s_raw, best, best_i

  init = (
    jnp.full(red, NEG_INF, jnp.float32),
    jnp.zeros(red, jnp.float32),
    jnp.full(red, -jnp.inf, jnp.float32),
    jnp.zeros(red, jnp.int32),
  )
  m_raw, s_raw, best, best_i = lax.fori_loop(0, lay.nblocks, body, init)
  o_ref[...] = lay.put([m_raw, s_raw, best, best_i])


@functools.partial(jax.jit, static_argnames=('sp', 'interpret', 'layout', 'block_v', 'chunk_v'))
def verify_tree_pallas(
  target_logits: jax.Array,
  tokens: jax.Array,
  parents: jax.Array,
  seeds: jax.Array,
  sp: SamplingParams,
  interpret=None,
  layout: str | None = None,
  block_v: int | None = None,
  chunk_v: int | None = None,
) -> ref_lib.TreeVerifyResult:
  """Tree verification with the Pallas kernel (contract: ``verify_tree_reference``).

  Args: as the reference (target_logits [B, N, V], tokens / parents / seeds int32 [B, N]),
  plus interpret / layout / block_v / chunk_v as :func:`specrl.kernels.verify.verify_pallas`.
  """
  bsz, n_nodes, vocab = target_logits.shape
  if tokens.shape != (bsz, n_nodes) or parents.shape != tokens.shape:
    raise ValueError(f'bad shapes: target {target_logits.shape}, tokens {tokens.shape}')
  layout = layout or general.default_layout()
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  if interpret is True and layout == 'tpu':
    interpret = pltpu.InterpretParams()
  lay = general.make_layout(layout, vocab, bsz * n_nodes, target_logits.dtype, block_v, chunk_v)
  tv = lay.view(target_logits)
  in_specs = [lay.row_block(lambda b, c, j: (b, j, c))]
  args = [tv]
  if sp.filtered:
    in_specs.append(lay.stat_block(2, lambda b, c, j: (b, j)))
    args.append(lay.pack([general._raw_threshold(target_logits, sp)], jnp.float32))
  if not sp.greedy:
    in_specs.append(lay.stat_block(2, lambda b, c, j: (b, j)))
    args.append(lay.pack([ref_lib.node_keys(seeds)], jnp.int32))
  out = pl.pallas_call(
    functools.partial(_node_kernel, lay=lay, sp=sp),
    out_shape=jax.ShapeDtypeStruct((bsz, lay.nchunks, n_nodes, *lay.stat_tile), jnp.float32),
    grid=(bsz, lay.nchunks, n_nodes),
    in_specs=in_specs,
    out_specs=lay.stat_block(3, lambda b, c, j: (b, c, j)),
    interpret=interpret,
    compiler_params=general._compiler_params(lay, 3),
    name='verify_tree_nodes',
  )(*args)

  def stat(s):
    return lay.unpack(out, s)  # [B, C, N]

  lse_raw = general._merge_lse(stat(_M_RAW), stat(_S_RAW))  # [B, N]
  flat = lambda s: jnp.swapaxes(stat(s), 1, 2).reshape(bsz * n_nodes, -1)  # noqa: E731
  _, y = general._merge_best(flat(_BEST), flat(_BEST_IDX).astype(jnp.int32))
  y = y.reshape(bsz, n_nodes).astype(jnp.int32)
  n, path, non_first, leaf = ref_lib.walk(y, tokens, parents)
  d = jnp.arange(n_nodes)[None, :]
  toks = jnp.where(d <= n[:, None], jnp.take_along_axis(y, path, axis=1), 0).astype(jnp.int32)
  raw = jnp.take_along_axis(target_logits, y[..., None], axis=-1)[..., 0].astype(jnp.float32)
  lp_nodes = raw / jnp.float32(sp.logprob_temperature) - lse_raw  # [B, N]
  lp = jnp.take_along_axis(lp_nodes, path, axis=1)
  return ref_lib.TreeVerifyResult(
    num_accepted=n,
    tokens=toks,
    logprobs=jnp.where(d <= n[:, None], lp, 0.0),
    path=path,
    non_first=non_first,
    leaf=leaf,
  )

"""Batched speculative rejection sampling: the pure-jnp reference (the contract).

Given the target (policy) logits at the ``k + 1`` verify positions and the drafter's
logits and tokens at the first ``k`` of them, :func:`verify_reference` accepts a prefix
of ``n`` drafts and emits ``n + 1`` tokens whose joint distribution is exactly the
target's (Leviathan et al. 2023; Chen et al. 2023), with processed distributions

  p_j = softmax(processed_logits(target_logits[:, j], sp))   j = 0..k
  q_j = softmax(processed_logits(draft_logits[:, j], sp))    j = 0..k-1

(same temperature / top-k / top-p on both, :mod:`specrl.sampling`).

* Draft ``x_i`` is accepted iff ``u_i * q_i(x_i) < p_i(x_i)`` (``u < p/q`` without a
  division, so ``q_i(x_i) = 0`` is well defined), ``n`` = number of leading accepts.
* ``n < k``: ``tokens[n] ~ normalize(max(0, p_n - q_n))``; if that residual has no
  mass (only possible through rounding when ``p_n == q_n``) fall back to ``p_n``.
* ``n == k``: ``tokens[k] ~ p_k`` (the bonus token).
* ``tokens[j] = x_j`` for ``j < n`` and ``0`` for ``j > n``; ``logprobs[j]`` is
  :func:`specrl.sampling.token_logprobs` (unfiltered ``log_softmax(logits / T)``) for
  ``j <= n`` and ``0`` beyond.
* Greedy (``T == 0``): accept while ``x_i == argmax target_i`` (first index on ties),
  ``tokens[n] = argmax target_n``, logprobs at ``T = 1``.

A deterministic (model-free, e.g. n-gram or suffix) proposal is a one-hot ``q``: pass
``draft_logits = where(v == x, 0, NEG_INF)``; then ``x`` is accepted with probability
``p(x)`` and the residual is ``p`` without ``x``, renormalised. The *token-only* path
(:func:`verify_tokens_reference`) computes exactly that without any ``[B, k, V]`` draft
logits (and without their top-k / top-p sort); it also takes drafts of per-row length
(``draft_tokens < 0``: not proposed), the row then samples ``p`` where its drafts end.

Randomness: a counter-based integer hash, no ``jax.random`` state
------------------------------------------------------------------
The Pallas kernel (:mod:`specrl.kernels.verify`; :mod:`specrl.decoding.verify` dispatches)
must reproduce this reference bit for bit without materialising ``[B, k+1, V]`` noise,
and it visits the vocabulary in blocks whose size and order are kernel choices. So every
random number is a pure function of ``(seed_b, row j, column v, stream)``: a murmur3
``fmix32`` finaliser chain (:func:`row_key`, :func:`element_bits`), computed with int32
two's-complement arithmetic (wrapping multiply + logical shifts), which lowers
identically in XLA, Triton and Mosaic TPU without unsigned-type support. Bits map to uniforms in the
*open* interval ``(0, 1)`` (:func:`uniform_from_bits`), so ``log(u)`` and
``log(-log(u))`` are always finite.

* acceptance: ``u_i = U(row_key(seed_b, i, ACCEPT))``;
* sampling row ``j``: Gumbel-max, ``token = argmax_v [log w_v + G_v]`` with
  ``G_v = -log(-log(U(element_bits(row_key(seed_b, j, SAMPLE), v))))``, ``w`` the
  residual (or ``p``) and zero-weight tokens excluded (score ``-inf``).

Why Gumbel-max rather than inverse-CDF: inverse-CDF needs the total mass before the
first block is searched and a prefix sum that crosses blocks (a sequential
dependency, or a materialised ``[V]`` cumsum); Gumbel-max is a plain max-reduction.
Each vocabulary block keeps only its running best ``(score, index)``, blocks combine in
any order (so vocab chunks can even run in parallel programs and be merged by a tiny
``argmax``), and the noise of token ``v`` is recomputed where it is needed. For the
bonus distribution ``p`` it needs no normaliser at all (``argmax`` is invariant to
the ``-lse`` shift, so the score is ``scaled_logit + G``).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from specrl.prng import (  # noqa: F401 (re-exported: the kernel uses them from here)
  STREAM_ACCEPT,
  STREAM_SAMPLE,
  element_bits,
  fmix32,
  gumbel_from_bits,
  row_key,
  seeds_to_i32,
  uniform_from_bits,
)
from specrl.sampling import (
  NEG_INF,
  SamplingParams,
  filter_threshold,
  scale_logits,
  token_logprobs,
)


@flax.struct.dataclass
class VerifyResult:
  """Outcome of one verify pass for a batch of B sequences with k drafts each.

  num_accepted: int32 [B], n in 0..k.
  tokens: int32 [B, k+1], the n + 1 emitted tokens then zeros.
  logprobs: f32 [B, k+1], reported logprob of each emitted token then zeros.
  """

  num_accepted: jax.Array
  tokens: jax.Array
  logprobs: jax.Array


def accept_uniforms(seeds: jax.Array, k: int) -> jax.Array:
  """Acceptance uniforms u_i. seeds [B] (uint32/int32) -> f32 [B, k]."""
  s = seeds_to_i32(seeds)[:, None]
  return uniform_from_bits(row_key(s, jnp.arange(k, dtype=jnp.int32)[None, :], STREAM_ACCEPT))


# ----------------------------------------------------------------------------------
# Elementwise pieces shared with the kernel (same formula -> same rounding).
# ----------------------------------------------------------------------------------


def residual_score(a, keep_p, lse_p, b, keep_q, lse_q, g):
  """Gumbel-max score of the residual max(0, p - q); -inf where its weight is 0.

  a, b: temperature-scaled target / draft logits; keep_*: filter masks; lse_*: log
  normalisers of the processed distributions (broadcastable); g: Gumbel noise.
  """
  p = jnp.where(keep_p, jnp.exp(a - lse_p), 0.0)
  q = jnp.where(keep_q, jnp.exp(b - lse_q), 0.0)
  w = p - q
  return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)) + g, -jnp.inf)


def bonus_score(a, keep_p, g):
  """Gumbel-max score of p itself (no normaliser needed); -inf for filtered tokens."""
  return jnp.where(keep_p, a + g, -jnp.inf)


def keep_mask(scaled: jax.Array, sp: SamplingParams) -> jax.Array:
  """Tokens kept by top-k / top-p (exactly where processed_logits is not replaced)."""
  return scaled >= filter_threshold(scaled, sp)[..., None]


def leading_accepts(accept: jax.Array) -> jax.Array:
  """Number of leading True values. bool [B, k] -> int32 [B]."""
  return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def assemble(n: jax.Array, draft_tokens: jax.Array, token_n: jax.Array):
  """tokens [B, k+1]: drafts before n, token_n at n, zeros after."""
  b, k = draft_tokens.shape
  j = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
  drafts = jnp.concatenate([draft_tokens.astype(jnp.int32), jnp.zeros((b, 1), jnp.int32)], 1)
  return jnp.where(j < n[:, None], drafts, jnp.where(j == n[:, None], token_n[:, None], 0))


def _take_row(x: jax.Array, n: jax.Array) -> jax.Array:
  """x [B, R, ...] , n [B] -> x[b, n_b] [B, ...]."""
  return jnp.take_along_axis(x, n.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]


def verify_reference(
  target_logits: jax.Array,
  draft_logits: jax.Array,
  draft_tokens: jax.Array,
  seeds: jax.Array,
  sp: SamplingParams,
) -> VerifyResult:
  """Reference speculative verification (materialises everything; the contract).

  Args:
    target_logits: f32/bf16 [B, k+1, V] policy logits at the k+1 verify positions.
    draft_logits: [B, k, V] drafter logits the drafts were sampled from (one-hot
      ``where(v == x, 0, NEG_INF)`` for a deterministic proposal).
    draft_tokens: int32 [B, k].
    seeds: uint32 [B] per-sequence seeds of the hash PRNG.
    sp: sampling settings (static).
  Returns:
    VerifyResult (num_accepted [B], tokens [B, k+1], logprobs [B, k+1]).
  """
  _, k1, vocab = target_logits.shape
  k = k1 - 1
  if k < 1 or draft_tokens.shape[1] != k:
    raise ValueError(
      f'need k >= 1 drafts: target {target_logits.shape}, drafts {draft_tokens.shape}'
    )
  x = draft_tokens.astype(jnp.int32)
  if sp.greedy:
    am = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, k+1]
    n = leading_accepts(x == am[:, :k])
    token_n = _take_row(am, n)
  else:
    at = scale_logits(target_logits, sp)  # [B, k+1, V]
    keep_t = keep_mask(at, sp)
    lse_p = jax.nn.logsumexp(jnp.where(keep_t, at, NEG_INF), axis=-1)  # [B, k+1]
    bd = scale_logits(draft_logits, sp)  # [B, k, V]
    keep_d = keep_mask(bd, sp)
    lse_q = jax.nn.logsumexp(jnp.where(keep_d, bd, NEG_INF), axis=-1)  # [B, k]

    def at_x(v):
      return jnp.take_along_axis(v[:, :k], x[..., None], axis=-1)[..., 0]

    p_x = jnp.where(at_x(keep_t), jnp.exp(at_x(at) - lse_p[:, :k]), 0.0)
    q_x = jnp.where(at_x(keep_d), jnp.exp(at_x(bd) - lse_q), 0.0)
    n = leading_accepts(accept_uniforms(seeds, k) * q_x < p_x)

    # Sample row n: residual if a draft was rejected there, else the bonus p_k.
    m = jnp.minimum(n, k - 1)
    a_n, keep_pn, lse_pn = _take_row(at, n), _take_row(keep_t, n), _take_row(lse_p, n)
    b_n, keep_qn, lse_qn = _take_row(bd, m), _take_row(keep_d, m), _take_row(lse_q, m)
    key = row_key(seeds_to_i32(seeds), n, STREAM_SAMPLE)[:, None]
    g = gumbel_from_bits(element_bits(key, jnp.arange(vocab, dtype=jnp.int32)[None, :]))
    res = residual_score(a_n, keep_pn, lse_pn[:, None], b_n, keep_qn, lse_qn[:, None], g)
    bon = bonus_score(a_n, keep_pn, g)
    use_res = (n < k) & (jnp.max(res, axis=-1) > -jnp.inf)
    token_n = jnp.where(use_res, jnp.argmax(res, axis=-1), jnp.argmax(bon, axis=-1))
    token_n = token_n.astype(jnp.int32)
  tokens = assemble(n, x, token_n)
  j = jnp.arange(k1)[None, :]
  logprobs = jnp.where(j <= n[:, None], token_logprobs(target_logits, tokens, sp), 0.0)
  return VerifyResult(num_accepted=n, tokens=tokens, logprobs=logprobs.astype(jnp.float32))


def onehot_residual_score(bonus: jax.Array, cols: jax.Array, x: jax.Array) -> jax.Array:
  """Gumbel-max score of the residual of a one-hot draft at token ``x``: ``p`` without
  ``x`` (``max(0, p - q) = p`` off ``x``, ``0`` at ``x``), from ``bonus_score``'s score of
  ``p`` (argmax needs no normaliser). ``cols``, ``x`` broadcast against ``bonus``."""
  return jnp.where(cols == x, -jnp.inf, bonus)


def verify_tokens_reference(
  target_logits: jax.Array, draft_tokens: jax.Array, seeds: jax.Array, sp: SamplingParams
) -> VerifyResult:
  """Token-only verification of a deterministic (one-hot) proposal: the contract of
  :func:`verify_reference` with ``draft_logits = where(v == x, 0, NEG_INF)``, without them.

  Draft ``x_i`` is accepted iff ``u_i < p_i(x_i)`` (``q_i(x_i) = 1``; the same uniforms, so
  the same decisions as the general path). ``n < m``: ``tokens[n] ~ p_n`` without ``x_n``,
  renormalised; ``n == m``: ``tokens[n] ~ p_n``, where ``m`` [B] is the number of drafts
  the row was proposed (``draft_tokens[b, i] < 0`` marks draft i and all after it as not
  proposed; ``m = k`` when all are >= 0). A row with ``m = 0`` samples ``p_0``, as a plain
  step does (same distribution; the stream differs from the plain step's).

  Args:
    target_logits: [B, k+1, V]; draft_tokens: int32 [B, k] (< 0: not proposed);
    seeds: uint32 [B]; sp: sampling settings (static).
  """
  _, k1, vocab = target_logits.shape
  k = k1 - 1
  if k < 1 or draft_tokens.shape[1] != k:
    raise ValueError(
      f'need k >= 1 drafts: target {target_logits.shape}, drafts {draft_tokens.shape}'
    )
  proposed = leading_accepts(draft_tokens >= 0)[:, None] > jnp.arange(k)[None, :]  # [B, k]
  x = jnp.where(proposed, draft_tokens, 0).astype(jnp.int32)
  if sp.greedy:
    am = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, k+1]
    n = leading_accepts(proposed & (x == am[:, :k]))
    token_n = _take_row(am, n)
  else:
    at = scale_logits(target_logits, sp)  # [B, k+1, V]
    keep_t = keep_mask(at, sp)
    lse_p = jax.nn.logsumexp(jnp.where(keep_t, at, NEG_INF), axis=-1)  # [B, k+1]

    def at_x(v):
      return jnp.take_along_axis(v[:, :k], x[..., None], axis=-1)[..., 0]

    p_x = jnp.where(at_x(keep_t), jnp.exp(at_x(at) - lse_p[:, :k]), 0.0)
    n = leading_accepts(proposed & (accept_uniforms(seeds, k) < p_x))
    m = jnp.minimum(n, k - 1)
    rejected = _take_row(proposed, m) & (n < k)  # a proposed draft was rejected at n
    key = row_key(seeds_to_i32(seeds), n, STREAM_SAMPLE)[:, None]
    cols = jnp.arange(vocab, dtype=jnp.int32)[None, :]
    g = gumbel_from_bits(element_bits(key, cols))
    bon = bonus_score(_take_row(at, n), _take_row(keep_t, n), g)
    res = onehot_residual_score(bon, cols, _take_row(x, m)[:, None])
    use_res = rejected & (jnp.max(res, axis=-1) > -jnp.inf)
    token_n = jnp.where(use_res, jnp.argmax(res, axis=-1), jnp.argmax(bon, axis=-1))
    token_n = token_n.astype(jnp.int32)
  tokens = assemble(n, x, token_n)
  j = jnp.arange(k1)[None, :]
  logprobs = jnp.where(j <= n[:, None], token_logprobs(target_logits, tokens, sp), 0.0)
  return VerifyResult(num_accepted=n, tokens=tokens, logprobs=logprobs.astype(jnp.float32))

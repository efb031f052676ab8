"""Sampling settings and logit processing shared by plain and speculative decoding.

Why one module: losslessness is only meaningful if plain sampling and speculative
verification process logits *identically*. Every filter here is expressed as a
per-row logit *threshold* (keep token v iff ``scaled_logit[v] >= threshold``), so the
Pallas verify kernel can apply top-k / top-p from a [B, T] threshold array while
streaming the vocabulary once, and plain sampling uses the very same rule.

Conventions
- ``temperature == 0`` means greedy (argmax of the raw logits).
- The *reported* logprob of a token (rollout output, PPO behaviour logprob) is
  ``log_softmax(logits / T)[token]`` over the *unfiltered* vocabulary (T = 1 when
  greedy). Top-k/top-p change what is sampled, not what is reported; train-time
  logprobs use the same definition (see ``specrl.rl``).
- Ties at a top-k threshold keep every tied token (the threshold is a value, not an
  index); plain and speculative decoding agree on this.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from specrl import prng

NEG_INF = -1e30  # finite stand-in for -inf: keeps max/exp free of NaNs.


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Static sampling settings (hashable: they are jit static arguments)."""

  temperature: float = 1.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1.0 = off

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'sampling.temperature must be >= 0, got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'sampling.top_k must be >= 0 (0 = off), got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'sampling.top_p must be in (0, 1], got {self.top_p}')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  @property
  def filtered(self) -> bool:
    return (self.top_k > 0 or self.top_p < 1.0) and not self.greedy

  @property
  def logprob_temperature(self) -> float:
    """Temperature used for reported logprobs (1 for greedy)."""
    return 1.0 if self.greedy else self.temperature


def argmax(x: jax.Array) -> jax.Array:
  """``jnp.argmax(x, axis=-1)`` as int32, exactly (first index of the max; a NaN counts as
  the max, so the first NaN wins), written as two plain reductions.

  Why: XLA:CPU lowers ``argmax`` to a variadic (value, index) reduce that it does not
  vectorize; over a [B, V = 49152] row that is ~8x slower than a max followed by a
  first-hit index min (measured at B = 16 on a 2-core CPU: 3.6 vs 0.5 ms per call), and
  every decode step takes one (greedy, and the Gumbel-max draw when sampling).
  """
  m = jnp.max(x, axis=-1, keepdims=True)  # NaN if any NaN: then only NaNs hit
  hit = (x == m) | jnp.isnan(x)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(hit, iota, x.shape[-1]), axis=-1).astype(jnp.int32)


def scale_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
  """logits / T in f32 (T = 1 for greedy). Shape preserved."""
  return logits.astype(jnp.float32) / jnp.float32(sp.logprob_temperature)


def filter_threshold(scaled: jax.Array, sp: SamplingParams) -> jax.Array:
  """Per-row keep-threshold for top-k / top-p on already temperature-scaled logits.

  Args:
    scaled: [..., V] f32 logits divided by temperature.
  Returns:
    [...] f32: keep v iff ``scaled[..., v] >= threshold``. ``NEG_INF`` when no filter.
  """
  thresh = jnp.full(scaled.shape[:-1], NEG_INF, jnp.float32)
  if not sp.filtered:
    return thresh
  vocab = scaled.shape[-1]
  srt = jnp.sort(scaled, axis=-1)[..., ::-1]  # descending
  if sp.top_k > 0:
    kth = srt[..., min(sp.top_k, vocab) - 1]
    thresh = jnp.maximum(thresh, kth)
  if sp.top_p < 1.0:
    # Nucleus: the smallest prefix of the sorted distribution with mass >= top_p.
    # Computed after top-k, on the top-k-renormalised distribution (HF/vLLM order).
    masked = jnp.where(srt >= thresh[..., None], srt, NEG_INF)
    probs = jax.nn.softmax(masked, axis=-1)
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep = cum_before < sp.top_p  # the first token is always kept
    last_kept = jnp.sum(keep, axis=-1) - 1
    pth = jnp.take_along_axis(srt, last_kept[..., None], axis=-1)[..., 0]
    thresh = jnp.maximum(thresh, pth)
  return thresh


def processed_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
  """Temperature-scaled logits with filtered-out tokens set to NEG_INF. [..., V] f32.

  ``softmax`` of this is the distribution that is actually sampled (for T > 0).
  """
  scaled = scale_logits(logits, sp)
  thresh = filter_threshold(scaled, sp)
  return jnp.where(scaled >= thresh[..., None], scaled, NEG_INF)


def token_logprobs(logits: jax.Array, tokens: jax.Array, sp: SamplingParams) -> jax.Array:
  """Reported logprob: log_softmax(logits / T)[token]. logits [..., V], tokens [...]."""
  logp = jax.nn.log_softmax(scale_logits(logits, sp), axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sample(logits: jax.Array, rng: jax.Array, sp: SamplingParams) -> jax.Array:
  """Draw one token per row. logits [..., V] -> int32 [...]."""
  if sp.greedy:
    return argmax(logits)
  return jax.random.categorical(rng, processed_logits(logits, sp), axis=-1).astype(jnp.int32)


def sample_seeded(logits: jax.Array, seeds: jax.Array, sp: SamplingParams, row: int = 0):
  """Draw one token per sequence from per-sequence seeds: Gumbel-max over the processed
  logits with :func:`specrl.prng.row_gumbels` noise, so a row's draw depends on its seed
  only, never on its place in the batch. logits [B, V], seeds int32 [B] -> int32 [B]."""
  if sp.greedy:
    return argmax(logits)
  g = prng.row_gumbels(seeds, row, logits.shape[-1])
  return argmax(processed_logits(logits, sp) + g)


def draft_distribution(logits: jax.Array, sp: SamplingParams) -> jax.Array:
  """Processed probabilities q used for drafting and for verification. [..., V] f32."""
  if sp.greedy:
    return jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(processed_logits(logits, sp), axis=-1)

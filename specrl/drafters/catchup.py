"""Catching a drafter's own state up on committed positions it has not fed.

A drafter with its own position-indexed state (its KV cache; the eagle head's cache) is fed
only inside speculative rounds, so it can miss committed tokens: the tokens of a plain
phase of the adaptive engine (plain steps never pay for the drafter), tokens it did not
draft (the hybrid suffix drafter's one-hot rounds), tokens a shorter window than the last
round's no longer covers (k shrinking between chunks). Such a drafter keeps a per-row
counter ``fed`` int32 [B] -- its state holds every committed position ``< fed`` -- and
before drafting feeds positions ``fed .. upto - 1`` with :func:`catch_up`, then its usual
fixed window up to the current token.

Static bound: how far a row is behind varies per row and per round (nothing right after a
speculative round, the whole plain phase after one), but a pass inside jit has a static
width. :func:`catch_up` therefore feeds ``chunk`` positions per pass, from each row's
``fed`` on (positions past a row's ``upto`` are not written: the caller sends their writes
out of range, where they are dropped), under a ``lax.while_loop`` that stops once every row
is at most ``slack`` positions behind ``upto``. The steady state of speculative decoding
runs no pass at all (the drafter's own window covers what one round leaves behind); a plain
phase of ``g`` tokens costs ``ceil(g / chunk)`` passes, paid at the next speculative round,
not in the plain steps. The passes are exact: each position is fed its committed token, at
its position, after every earlier one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 32  # positions per catch-up pass (a drafter's default)


def catch_up(feed, cache, fed, upto, chunk: int, slack: int = 0):
  """Feed positions ``fed[b] .. upto[b] - 1`` (int32 [B] each) in passes of ``chunk``.

  ``feed(cache, first [B], valid bool [B, chunk]) -> cache`` feeds positions
  ``first[b] + j`` where ``valid[b, j]`` (the committed tokens there) and must not write the
  others. Passes run while some row has more than ``slack`` positions left below ``upto``
  (a caller whose next pass covers ``slack`` positions anyway leaves them to it). Returns
  (cache, fed) with every row's ``fed >= upto - slack`` (and never lowered)."""

  def behind(carry):
    return jnp.max(upto - carry[1]) > slack

  def body(carry):
    cache, fed = carry
    valid = fed[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :] < upto[:, None]
    cache = feed(cache, fed, valid)
    return cache, jnp.maximum(fed, jnp.minimum(fed + chunk, upto))

  return jax.lax.while_loop(behind, body, (cache, fed.astype(jnp.int32)))

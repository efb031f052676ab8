"""Deliberately broken speculative verifiers, to show that the losslessness tests have power.

Each mutant is one plausible defect of a real verifier, installed with pytest's
``monkeypatch`` into the jnp verify reference module (:data:`VERIFY_MOD`, the module that
holds ``verify_reference`` and the pieces it calls). Both the unit tests
(``tests/test_verify.py``: one verify call over many seeds) and the end-to-end tests
(``tests/test_speculative.py``: whole speculative rollouts with ``verify_impl='jnp'``) must
reject every mutant with a tiny chi-square p-value; a mutant that is not rejected means the
test could not see that defect.

Mutants (``install(name, monkeypatch, k)``; ``k`` = drafts per verify pass):

- ``no_residual``: on rejection, sample ``p_n`` instead of ``normalize(max(p_n - q_n, 0))``.
- ``unfiltered_draft``: the draft distribution ``q`` is taken from the raw temperature-scaled
  draft logits, ignoring top-k / top-p, although the drafter sampled from the filtered
  ``q`` (so ``q(x)`` is underestimated and drafts are accepted too often). Only differs
  from the reference when a filter is on.
- ``wrong_temperature``: ``p`` and ``q`` are computed at temperature 1 whatever
  ``sp.temperature`` is (reported logprobs stay right). Only differs when ``T != 1``.
- ``onehot_keeps_draft``: the token-only path (one-hot drafts) samples the residual from
  ``p_n`` itself instead of ``p_n`` without the rejected draft ``x_n``.
- ``target_off_by_one``: draft ``i`` is judged (and the residual built) against the target
  distribution one position later, ``p_{i+1}`` instead of ``p_i``.
"""

from __future__ import annotations

import jax.numpy as jnp

# The one place that names the jnp verify reference module: every mutant patches it.
from specrl.kernels import verify_reference as VERIFY_MOD  # noqa: N812


def _no_residual(monkeypatch, k):
  bonus_score = VERIFY_MOD.bonus_score

  def residual_is_p(a, keep_p, lse_p, b, keep_q, lse_q, g):
    del lse_p, b, keep_q, lse_q
    return bonus_score(a, keep_p, g)  # Gumbel-max score of p itself

  monkeypatch.setattr(VERIFY_MOD, 'residual_score', residual_is_p)


def _unfiltered_draft(monkeypatch, k):
  keep_mask = VERIFY_MOD.keep_mask

  def keep_all_draft_tokens(scaled, sp):
    kept = keep_mask(scaled, sp)
    # The reference masks the target rows [B, k+1, V] and the draft rows [B, k, V].
    return jnp.ones_like(kept) if scaled.shape[-2] == k else kept

  monkeypatch.setattr(VERIFY_MOD, 'keep_mask', keep_all_draft_tokens)


def _wrong_temperature(monkeypatch, k):
  def scale_at_temperature_one(logits, sp):
    del sp
    return logits.astype(jnp.float32)

  monkeypatch.setattr(VERIFY_MOD, 'scale_logits', scale_at_temperature_one)


def _target_off_by_one(monkeypatch, k):
  verify_reference = VERIFY_MOD.verify_reference

  def shifted(target_logits, draft_logits, draft_tokens, seeds, sp):
    # p_{i+1} where p_i belongs; the last (bonus) row is kept so shapes stay [B, k+1, V].
    later = jnp.concatenate([target_logits[:, 1:], target_logits[:, -1:]], axis=1)
    return verify_reference(later, draft_logits, draft_tokens, seeds, sp)

  monkeypatch.setattr(VERIFY_MOD, 'verify_reference', shifted)


def _onehot_keeps_draft(monkeypatch, k):
  def residual_keeps_x(bonus, cols, x):
    del cols, x
    return bonus

  monkeypatch.setattr(VERIFY_MOD, 'onehot_residual_score', residual_keeps_x)


MUTANTS = {
  'onehot_keeps_draft': _onehot_keeps_draft,
  'no_residual': _no_residual,
  'unfiltered_draft': _unfiltered_draft,
  'wrong_temperature': _wrong_temperature,
  'target_off_by_one': _target_off_by_one,
}


def install(name: str, monkeypatch, k: int) -> None:
  """Break :data:`VERIFY_MOD` in the way ``name`` says, for the rest of the test."""
  MUTANTS[name](monkeypatch, k)

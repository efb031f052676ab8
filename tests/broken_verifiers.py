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

Tree mutants (``install_tree(name, monkeypatch)``; draft trees, :mod:`specrl.decoding.tree`
and the sample-and-compare reference :data:`VERIFY_TREE_MOD`), caught by
``tests/test_tree.py``'s token equality with plain decoding:

- ``tree_sibling_visible``: the tree mask lets a node see its siblings (and their
  subtrees' roots), not only its ancestors.
- ``tree_position_off_by_one``: a non-root node sits at ``pos + depth + 1``.
- ``tree_no_compare``: the walk descends into the first child without comparing its token
  with the draw.
- ``tree_no_stop``: the walk does not stop at the first miss: it goes on into the first
  child (counting it accepted) wherever no child matches.
"""

from __future__ import annotations

import jax.numpy as jnp

from specrl.decoding import tree as TREE_MOD  # noqa: N812

# The one place that names the jnp verify reference module: every mutant patches it.
from specrl.kernels import verify_reference as VERIFY_MOD  # noqa: N812
from specrl.kernels import verify_tree_reference as VERIFY_TREE_MOD  # noqa: N812


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


def _tree_sibling_visible(monkeypatch):
  ancestors = TREE_MOD.ancestors

  def with_siblings(parents):
    sib = (parents[:, :, None] == parents[:, None, :]) & (parents[:, :, None] >= 0)
    return ancestors(parents) | sib

  monkeypatch.setattr(TREE_MOD, 'ancestors', with_siblings)


def _tree_position_off_by_one(monkeypatch):
  def off_by_one(pos, depth):
    return pos[:, None] + depth + (depth > 0)

  monkeypatch.setattr(TREE_MOD, 'node_positions', off_by_one)


def _tree_no_compare(monkeypatch):
  first_child = VERIFY_TREE_MOD.first_child

  def any_child(cur, y_cur, tokens, parents):
    del y_cur
    return first_child(cur, tokens, parents)

  monkeypatch.setattr(VERIFY_TREE_MOD, 'child_of', any_child)


def _tree_no_stop(monkeypatch):
  mod = VERIFY_TREE_MOD

  def walk_through_misses(y, tokens, parents):
    b, n_nodes = tokens.shape
    take = lambda a, i: jnp.take_along_axis(a, i[:, None], axis=1)[:, 0]  # noqa: E731
    cur = jnp.zeros((b,), jnp.int32)
    n = jnp.zeros((b,), jnp.int32)
    path = [cur]
    for d in range(1, n_nodes):
      c = mod.child_of(cur, take(y, cur), tokens, parents)
      c = jnp.where(c >= 0, c, mod.first_child(cur, tokens, parents))  # a miss: go on
      go = c >= 0
      n += go.astype(jnp.int32)
      cur = jnp.where(go, c, cur)
      path.append(jnp.where(go, c, d).astype(jnp.int32))
    leaf = mod.first_child(cur, tokens, parents) < 0
    return n, jnp.stack(path, axis=1), jnp.zeros((b,), jnp.int32), leaf

  monkeypatch.setattr(mod, 'walk', walk_through_misses)


TREE_MUTANTS = {
  'tree_sibling_visible': _tree_sibling_visible,
  'tree_position_off_by_one': _tree_position_off_by_one,
  'tree_no_compare': _tree_no_compare,
  'tree_no_stop': _tree_no_stop,
}


def install_tree(name: str, monkeypatch) -> None:
  """Break tree decoding in the way ``name`` says, for the rest of the test."""
  TREE_MUTANTS[name](monkeypatch)

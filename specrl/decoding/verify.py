"""Verify dispatcher: the jnp reference or the Pallas kernel, one contract.

The contract (and its readable spec) is :mod:`specrl.kernels.verify_reference`; the kernel
(:mod:`specrl.kernels.verify`) reproduces it bit for bit from the same seeds. This module
only chooses between them (``rollout.verify_impl``) and, in CPU interpret mode, chunks
the batch for speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from specrl.kernels import verify as kernel_lib
from specrl.kernels import verify_reference as reference_lib
from specrl.kernels import verify_sampled_tree_reference as sampled_tree_lib
from specrl.kernels import verify_tokens as tokens_kernel_lib
from specrl.kernels import verify_tree as tree_kernel_lib
from specrl.kernels import verify_tree_reference as tree_reference_lib
from specrl.kernels.verify_reference import VerifyResult
from specrl.sampling import SamplingParams

INTERPRET_BATCH_CHUNK = 32  # rows per kernel call in CPU interpret mode (speed only)
IMPLS = ('jnp', 'pallas')

__all__ = [
  'IMPLS', 'VerifyResult', 'verify', 'verify_mixed', 'verify_sampled_tree', 'verify_tokens',
  'verify_tree',
]  # fmt: skip


def verify(
  target_logits: jax.Array,
  draft_logits: jax.Array,
  draft_tokens: jax.Array,
  seeds: jax.Array,
  sp: SamplingParams,
  impl: str = 'jnp',
  interpret=None,
  **kernel_options,
) -> VerifyResult:
  """Dispatch to the jnp reference or the Pallas kernel (same contract, same seeds).

  ``interpret`` / ``kernel_options`` (block sizes, layout) only apply to
  ``impl='pallas'``; see :func:`specrl.kernels.verify.verify_pallas`.
  """
  if impl == 'jnp':
    return reference_lib.verify_reference(target_logits, draft_logits, draft_tokens, seeds, sp)
  if impl == 'pallas':

    def run(t, d, x, s):
      return kernel_lib.verify_pallas(t, d, x, s, sp, interpret=interpret, **kernel_options)

    return _chunked(run, (target_logits, draft_logits, draft_tokens, seeds), interpret)
  raise ValueError(f"verify impl must be 'jnp' or 'pallas', got {impl!r}")


def verify_tokens(
  target_logits: jax.Array,
  draft_tokens: jax.Array,
  seeds: jax.Array,
  sp: SamplingParams,
  impl: str = 'jnp',
  interpret=None,
  **kernel_options,
) -> VerifyResult:
  """Token-only verification of deterministic (one-hot) drafts, ``draft_tokens < 0`` = not
  proposed (:func:`specrl.kernels.verify_reference.verify_tokens_reference`: the contract;
  :func:`specrl.kernels.verify_tokens.verify_tokens_pallas`: the kernel)."""
  if impl == 'jnp':
    return reference_lib.verify_tokens_reference(target_logits, draft_tokens, seeds, sp)
  if impl == 'pallas':

    def run(t, x, s):
      return tokens_kernel_lib.verify_tokens_pallas(
        t, x, s, sp, interpret=interpret, **kernel_options
      )

    return _chunked(run, (target_logits, draft_tokens, seeds), interpret)
  raise ValueError(f"verify impl must be 'jnp' or 'pallas', got {impl!r}")


def verify_mixed(
  target_logits: jax.Array,
  draft_logits: jax.Array,
  draft_tokens: jax.Array,
  one_hot: jax.Array,
  seeds: jax.Array,
  sp: SamplingParams,
  impl: str = 'jnp',
  interpret=None,
  **kernel_options,
) -> VerifyResult:
  """Per-row dispatch: rows with ``one_hot [B]`` by :func:`verify_tokens` (their
  ``draft_tokens < 0`` = not proposed), the others by :func:`verify` with ``draft_logits``.

  Every row's result is exactly its own path's contract (same seeds, same uniforms), so
  the round is lossless row by row. Why not the general path with one-hot logits for the
  deterministic rows: those may propose fewer than k drafts, which only the token-only
  path expresses. Cost: when every row is one-hot only the token-only path runs (a
  ``lax.cond``); otherwise both run on the whole batch and each row takes its own result
  -- measured no dearer than the general path alone (XLA shares the target's softmax and
  top-k / top-p work; V = 49152, B = 16, k = 4 on CPU: general 256 ms, both 252 ms, token-
  only 152 ms at T = 0.6), so a three-way switch would save nothing.
  """

  def tokens_only():
    return verify_tokens(
      target_logits, draft_tokens, seeds, sp, impl=impl, interpret=interpret, **kernel_options
    )

  def both():
    t = tokens_only()
    g = verify(
      target_logits, draft_logits, jnp.maximum(draft_tokens, 0), seeds, sp, impl=impl,
      interpret=interpret, **kernel_options,
    )  # fmt: skip
    return jax.tree.map(
      lambda a, b: jnp.where(one_hot.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), t, g
    )

  return lax.cond(jnp.all(one_hot), tokens_only, both)


def verify_tree(
  target_logits: jax.Array,
  tokens: jax.Array,
  parents: jax.Array,
  seeds: jax.Array,
  sp: SamplingParams,
  impl: str = 'jnp',
  interpret=None,
  **kernel_options,
):
  """Sample-and-compare verification of draft trees (and deterministic chains), keyed like
  plain decoding (:func:`specrl.kernels.verify_tree_reference.verify_tree_reference`: the
  contract; :func:`specrl.kernels.verify_tree.verify_tree_pallas`: the kernel)."""
  if impl == 'jnp':
    return tree_reference_lib.verify_tree_reference(target_logits, tokens, parents, seeds, sp)
  if impl == 'pallas':

    def run(t, x, p, s):
      return tree_kernel_lib.verify_tree_pallas(
        t, x, p, s, sp, interpret=interpret, **kernel_options
      )

    return _chunked(run, (target_logits, tokens, parents, seeds), interpret)
  raise ValueError(f"verify impl must be 'jnp' or 'pallas', got {impl!r}")


def verify_sampled_tree(
  target_logits: jax.Array,
  tokens: jax.Array,
  parents: jax.Array,
  draft_logits: jax.Array,
  draft_ids,
  seeds: jax.Array,
  sp: SamplingParams,
  impl: str = 'jnp',
):
  """Recursive rejection sampling over sampled draft trees
  (:func:`specrl.kernels.verify_sampled_tree_reference.verify_sampled_tree_reference`).
  jnp only: :func:`specrl.decoding.tree.check_drafter` refuses ``'pallas'`` up front."""
  if impl != 'jnp':
    raise ValueError(f"sampled draft trees have no {impl!r} verify kernel: use verify_impl='jnp'")
  return sampled_tree_lib.verify_sampled_tree_reference(
    target_logits, tokens, parents, draft_logits, draft_ids, seeds, sp
  )


def _chunked(run, args, interpret) -> VerifyResult:
  """``run(*args)``; in CPU interpret mode, whose cost grows faster than linearly with the
  grid, over fixed-size chunks of the batch (results are per row: only speed changes)."""
  b = args[0].shape[0]
  interpreting = interpret if interpret is not None else jax.default_backend() == 'cpu'
  if not interpreting or b <= INTERPRET_BATCH_CHUNK:
    return run(*args)
  c = INTERPRET_BATCH_CHUNK
  pad = -b % c
  args = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in args]
  args = [a.reshape((-1, c) + a.shape[1:]) for a in args]
  out = lax.map(lambda a: run(*a), args)
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:b], out)

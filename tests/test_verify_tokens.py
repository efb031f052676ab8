"""Token-only verification of one-hot drafts (``verify_tokens_reference`` and its Pallas
kernel): the same decisions and tokens as the general path with one-hot draft logits,
per-row draft lengths (drafts < 0 not proposed), and losslessness by chi-square, which a
broken residual fails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from specrl.kernels import verify_reference as ref
from specrl.kernels import verify_tokens as kernel
from specrl.sampling import NEG_INF, SamplingParams, processed_logits
from tests import broken_verifiers

SETTINGS = [
  SamplingParams(1.0),
  SamplingParams(0.7, top_k=3),
  SamplingParams(1.0, top_p=0.8),
  SamplingParams(0.0),
]
B, K, V = 300, 3, 7


def _inputs(seed=0, skip=0.15):
  t = 2.0 * jax.random.normal(jax.random.key(seed), (B, K + 1, V))
  x = jax.random.randint(jax.random.key(seed + 1), (B, K), 0, V)
  x = jnp.where(jax.random.uniform(jax.random.key(seed + 2), (B, K)) < skip, -1, x)
  return t, x, jnp.arange(B, dtype=jnp.uint32) * 7919


@pytest.mark.parametrize('sp', SETTINGS, ids=str)
def test_same_as_the_general_path_with_one_hot_logits_and_the_kernel(sp):
  t, x, seeds = _inputs()
  r = jax.device_get(ref.verify_tokens_reference(t, x, seeds, sp))
  full = np.asarray((x >= 0).all(axis=1))
  onehot = jnp.where(jnp.arange(V) == jnp.maximum(x, 0)[..., None], 0.0, NEG_INF)
  g = jax.device_get(ref.verify_reference(t[full], onehot[full], x[full], seeds[full], sp))
  np.testing.assert_array_equal(g.num_accepted, r.num_accepted[full])
  np.testing.assert_array_equal(g.tokens, r.tokens[full])
  # a row is never accepted past its proposals
  proposed = np.cumprod(np.asarray(x) >= 0, axis=1).sum(axis=1)
  assert (r.num_accepted <= proposed).all() and (proposed < K).any()
  c = 24  # the kernel in interpret mode on a slice (its run time grows with the grid)
  for layout, block in (('gpu', 128), ('tpu', None)):
    p = jax.device_get(
      kernel.verify_tokens_pallas(
        t[:c], x[:c], seeds[:c], sp, interpret=True, layout=layout, block_v=block
      )
    )
    np.testing.assert_array_equal(p.num_accepted, r.num_accepted[:c])
    np.testing.assert_array_equal(p.tokens, r.tokens[:c])
    np.testing.assert_allclose(p.logprobs, r.logprobs[:c], atol=1e-5)


def _first_token_pvalue(sp, x0, n=20000):
  """p-value of tokens[:, 0] ~ p_0 for a fixed one-hot draft x0 (or none, x0 = -1)."""
  logits = jnp.log(jnp.array([0.4, 0.3, 0.15, 0.1, 0.05]))
  t = jnp.broadcast_to(logits, (n, 2, 5))
  x = jnp.full((n, 1), x0, jnp.int32)
  seeds = jnp.asarray(np.random.default_rng(0).integers(0, 2**32, n, dtype=np.uint32))
  toks = np.asarray(ref.verify_tokens_reference(t, x, seeds, sp).tokens[:, 0])
  p = np.asarray(jax.nn.softmax(processed_logits(logits, sp)), np.float64)
  counts = np.bincount(toks, minlength=5).astype(np.float64)
  assert counts[p == 0].sum() == 0
  keep = p > 0
  return scipy.stats.chisquare(counts[keep], p[keep] / p[keep].sum() * n).pvalue


@pytest.mark.parametrize('x0', [0, 3, -1], ids=['likely', 'unlikely', 'none'])
def test_first_token_follows_the_policy(x0):
  assert _first_token_pvalue(SamplingParams(1.0, top_k=4), x0) > 1e-3


def test_a_residual_that_keeps_the_draft_is_caught(monkeypatch):
  broken_verifiers.install('onehot_keeps_draft', monkeypatch, 1)
  assert _first_token_pvalue(SamplingParams(1.0, top_k=4), 0) < 1e-6

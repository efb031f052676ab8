"""Statistical helpers for losslessness tests: exact policy distributions and chi-square.

The exact joint probability of every m-token continuation is computed by running the
policy on all V^m continuations at once; samples are then compared to it with a
chi-square goodness-of-fit test (cells with small expected counts are pooled).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from specrl import model as model_lib
from specrl import sampling


def exact_joint(params, cfg, prompt, m, sp: sampling.SamplingParams):
  """Probabilities of all V^m continuations of ``prompt`` (list of ids) under the processed
  policy distribution. Returns (continuations int [V^m, m], probs [V^m])."""
  v = cfg.vocab_size
  conts = np.array(list(itertools.product(range(v), repeat=m)), np.int32)
  n = len(conts)
  seq = np.concatenate([np.tile(np.asarray(prompt, np.int32), (n, 1)), conts], axis=1)
  s = seq.shape[1]
  pos = np.broadcast_to(np.arange(s), seq.shape)
  logits, _ = jax.jit(model_lib.forward, static_argnums=1)(params, cfg, seq, pos)
  logp = jax.nn.log_softmax(sampling.processed_logits(logits, sp), axis=-1)
  lp = 0.0
  p0 = len(prompt)
  for j in range(m):
    lp = lp + jnp.take_along_axis(logp[:, p0 - 1 + j], conts[:, j : j + 1], axis=1)[:, 0]
  probs = np.asarray(jnp.exp(lp), np.float64)
  return conts, probs / probs.sum()


def chi2_pvalue(samples, conts, probs, min_expected=5.0):
  """Chi-square p-value of ``samples [N, m]`` against the exact ``probs`` over ``conts``."""
  v = int(conts.max()) + 1
  m = conts.shape[1]
  base = v ** np.arange(m)[::-1]
  idx_of = {int(c @ base): i for i, c in enumerate(conts)}
  counts = np.zeros(len(conts))
  for code in np.asarray(samples, np.int64) @ base:
    counts[idx_of[int(code)]] += 1
  n = counts.sum()
  expected = probs * n
  big = expected >= min_expected
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return float(stats.chisquare(obs, exp).pvalue)

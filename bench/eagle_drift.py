"""Acceptance vs GRPO step: the eagle head co-trained with the policy, the same head frozen
after its warm-up, the head trained in ``spot`` mode, and the int8 self-drafter
re-quantized from the live params.

On the default tiny task (after SFT): the head is warmed up on the policy's own generations,
then GRPO runs with ``drafter.eagle.mode=cotrain`` (the head update fused into the GRPO step
on the loss's own hidden states). Before the first GRPO step and after every one, the same
held-out prompts are rolled out with the same RNG by three engines on the *live* policy
params: (a) the co-trained head, (b) a copy of the head taken right after warm-up and kept,
(c) the int8 quantized self-drafter derived from the current params, (d) a copy of the
warmed head trained as ``mode=spot`` would (the static engine's schedule: right after
rollout r, ``--spot_updates`` updates on random minibatches of the last 4 GRPO steps' hidden
states, which the bench computes with one extra forward since the cotrain step does not
return them; same policy trajectory as (a)). k = 4, T = 1.

  python bench/eagle_drift.py --quick            # a few minutes on a 2-core CPU
  python bench/eagle_drift.py --sft_steps=200 --rl_steps=30 --plot=docs/eagle_drift_T1.png

Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from configs import default  # noqa: E402
from specrl import drafters, train  # noqa: E402
from specrl import rollout as rollout_lib  # noqa: E402
from specrl import sharding as shd  # noqa: E402
from specrl.drafters import eagle  # noqa: E402
from specrl.drafters import eagle_spot as es  # noqa: E402
from specrl.drafters import eagle_train as et  # noqa: E402


def alpha(engine, params, held, draft_params=None):
  """Acceptance of ``engine`` on the held-out prompts (fixed RNG: same samples' prompts)."""
  return common.engine_alpha(engine, params, held.tokens, held.lengths, 7, draft_params)[0]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--sft_steps', type=int, default=200)
  ap.add_argument('--rl_steps', type=int, default=30)
  ap.add_argument('--warmup_steps', type=int, default=150)
  ap.add_argument('--heldout', type=int, default=32)
  ap.add_argument('--spot_updates', type=int, default=4, help='spot head updates per RL step')
  ap.add_argument('--plot', default='')
  ap.add_argument(
    '--real_head',
    default='',
    help='SmolLM2-135M (configs/smollm2_arith.py, GRPO from the instruct model) with this '
    'warmed head (.npz of bench/eagle_alpha.py --real-alpha --save_head) instead of the tiny '
    'task and its warm-up',
  )
  args = ap.parse_args()
  if args.quick:
    args.sft_steps, args.rl_steps, args.warmup_steps, args.heldout = 40, 4, 30, 16

  if args.real_head:
    from configs import smollm2_arith

    c = smollm2_arith.get_config()
    args.sft_steps, args.warmup_steps = 0, 0
    c.drafter.eagle.update(reduced_vocab=eagle.saved_vocab_size(args.real_head))
    c.drafter.eagle.head_path = args.real_head
    lr = 2e-3  # bench/eagle_alpha.py's warm-up lr
  else:
    c = default.get_config()
    lr = 3e-3
  c.sft.steps, c.rl.steps = args.sft_steps, args.rl_steps
  c.rollout.drafter, c.rollout.num_draft = 'eagle', 4
  c.drafter.eagle.update(mode='cotrain', lr=lr, warmup_steps=args.warmup_steps)
  c.drafter.eagle.warmup_budget_s = 600
  exp = train.build_experiment(c)
  head = et.trainer(exp.drafter)
  state = train.init_state(exp)
  state = state.replace(drafter=jax.device_put(head.hstate, shd.replicated(exp.mesh)))
  fns = train.jitted_steps(exp, jax.tree.map(lambda x: x.sharding, state))

  qc = copy.deepcopy(c)
  qc.rollout.drafter = 'quantized'
  qd = drafters.make_drafter(qc, exp.model_cfg)
  q_engine = rollout_lib.RolloutEngine(exp.model_cfg, exp.rollout_cfg, exp.mesh, qd)
  derive_int8 = jax.jit(qd.params_from_policy)

  t0 = time.perf_counter()
  for step in range(c.sft.steps):
    state, _ = train.run_step(exp, state, step, fns)
    head.set_state(state.drafter)
  sft_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state = head.before_step(exp, state, c.sft.steps)  # the warm-up
  warm_s = time.perf_counter() - t0
  vocab = exp.drafter.vocab_ids  # the warmed head's reduced vocabulary (None: all)
  frozen = eagle.EagleDrafter(
    exp.model_cfg, exp.drafter.ecfg, jax.tree.map(jnp.copy, state.drafter.params), vocab
  )
  f_engine = rollout_lib.RolloutEngine(exp.model_cfg, exp.rollout_cfg, exp.mesh, frozen)
  sp_cfg = dataclasses.replace(
    exp.drafter.ecfg, mode='spot', spot_max_updates=args.spot_updates, spot_budget_s=1e9
  )
  warmed = jax.tree.map(jnp.copy, state.drafter)
  sp_tr = et.HeadTrainer(eagle.EagleDrafter(exp.model_cfg, sp_cfg, warmed.params, vocab))
  sp_tr.hstate = warmed
  sp_tr.attach_spot(exp)  # the static engine: no tail hook; updates run below
  s_engine = rollout_lib.RolloutEngine(exp.model_cfg, exp.rollout_cfg, exp.mesh, sp_tr.drafter)
  hid = jax.jit(functools.partial(et.policy_hidden, cfg=exp.model_cfg, mesh=exp.mesh))
  push = jax.jit(es.push)
  spot_log, cotrain_grpo = [], fns[1]

  def grpo_with_spot(st, batch):  # mode spot's schedule next to the cotrain run
    sp_tr.spot.run(st.params)  # right after rollout r: the buffer holds steps < r
    core, sm = sp_tr.spot.consume()
    buf = sp_tr.hstate.buffer
    if core is not None:
      sp_tr.set_state(core.replace(buffer=buf))
    h = hid(st.params, tokens=jnp.asarray(batch['tokens']))
    sp_tr.hstate = sp_tr.hstate.replace(
      buffer=push(buf, h, batch['tokens'], batch['response_mask'])
    )
    spot_log.append(sm)
    return cotrain_grpo(st, batch)

  fns = (fns[0], grpo_with_spot)
  held = exp.task.heldout_prompts(args.heldout)

  rows = []
  model = 'SmolLM2-135M-Instruct arith' if args.real_head else 'tiny default task'
  print(
    f'{model} (d_model {exp.model_cfg.d_model}, {exp.model_cfg.n_layers} layers, '
    f'V {exp.model_cfg.vocab_size}); SFT {c.sft.steps} steps ({sft_s:.0f}s), head warm-up '
    f'{args.warmup_steps} updates ({warm_s:.0f}s); k=4, T=1, {args.heldout} held-out prompts'
  )
  print(f'{"GRPO step":>9} | {"cotrain":>7} | {"frozen":>7} | {"spot":>7} | {"int8":>7} | reward')
  for step in range(c.sft.steps, c.sft.steps + c.rl.steps + 1):
    r = {
      'step': step - c.sft.steps,
      'cotrain': alpha(exp.engine, state.params, held),
      'frozen': alpha(f_engine, state.params, held),
      'spot': alpha(s_engine, state.params, held),
      'int8': alpha(q_engine, state.params, held, derive_int8(state.params)),
    }
    if step < c.sft.steps + c.rl.steps:
      state, m = train.run_step(exp, state, step, fns)
      head.set_state(state.drafter)
      r['reward'] = m['reward']
    rows.append(r)
    print(
      f'{r["step"]:9d} | {r["cotrain"]:7.3f} | {r["frozen"]:7.3f} | {r["spot"]:7.3f} | '
      f'{r["int8"]:7.3f} | '
      f'{r.get("reward", float("nan")):.3f}',
      flush=True,
    )
  arr = {k: np.array([r[k] for r in rows]) for k in ('cotrain', 'frozen', 'spot', 'int8')}
  spot_s = [m['time/head_spot_s'] for m in spot_log]
  per_step = float(np.mean(spot_s[1:])) if len(spot_s) > 1 else 0.0  # the first compiles
  buf_bytes = spot_log[-1]['head/spot_buffer_bytes']
  print(
    f'spot: {args.spot_updates} head updates per RL step (none at the first: empty buffer), '
    f'{per_step:.2f}s/step added, {np.sum(spot_s):.1f}s in all; buffer {buf_bytes:.0f} B'
  )
  tail = max(1, len(rows) // 4)
  if args.plot:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, label in (
      ('cotrain', 'eagle head, co-trained'),
      ('frozen', 'eagle head, frozen after warm-up'),
      ('spot', f'eagle head, spot ({args.spot_updates} updates/step)'),
      ('int8', 'int8 self-drafter (re-quantized)'),
    ):
      ax.plot(arr[k], label=label)
    ax.set_xlabel('GRPO step')
    ax.set_ylabel('acceptance (held-out)')
    ax.set_title(f'{model}, k=4, T=1')
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f'plot saved to {args.plot}')
  print(
    json.dumps(
      {
        'bench': 'eagle_drift',
        'model': model,
        'device': jax.devices()[0].device_kind,
        'sft_steps': c.sft.steps,
        'rl_steps': c.rl.steps,
        'warmup_steps': args.warmup_steps,
        'spot_updates': args.spot_updates,
        'spot_s_per_step': per_step,
        'spot_buffer_bytes': buf_bytes,
        **{f'{k}_mean': float(v.mean()) for k, v in arr.items()},
        **{f'{k}_last_quarter': float(v[-tail:].mean()) for k, v in arr.items()},
        **{f'{k}_step0': float(v[0]) for k, v in arr.items()},
      }
    )
  )


if __name__ == '__main__':
  main()

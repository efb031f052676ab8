"""Drift experiment: acceptance of a fresh vs a stale quantized drafter during GRPO.

The self-speculative paper's claim: a drafter re-derived from the live policy at every
RL step keeps its acceptance, while a drafter quantized once (at the start of RL) and
kept drifts out of step as the policy trains. This runs the default config's GRPO
phase and, at every step, rolls out the *same* prompts with the same RNG twice:

  (a) fresh: int-quantized from the current params (what ``rollout.drafter=quantized``
      does inside the train step);
  (b) stale: quantized once at the first GRPO step and kept.

Prints a table of acceptance per step, saves a PNG plot, and prints one JSON line.

  python bench/drift.py --quick            # ~1 minute on a 2-core CPU
  python bench/drift.py --rl_steps=60 --plot=/tmp/drift.png
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import default  # noqa: E402
from specrl import train  # noqa: E402

flags.DEFINE_bool('quick', False, 'tiny run (under a minute)')
flags.DEFINE_integer('sft_steps', 200, 'supervised warm-up steps before GRPO')
flags.DEFINE_integer('rl_steps', 40, 'GRPO steps')
flags.DEFINE_integer('bits', 8, 'drafter bits (8 or 4)')
flags.DEFINE_float('temperature', 1.0, 'sampling temperature')
flags.DEFINE_float('rl_lr', 1e-3, 'GRPO learning rate (larger = faster drift)')
flags.DEFINE_string('plot', '/tmp/drift.png', 'where to save the plot')
FLAGS = flags.FLAGS


def main(_):
  c = default.get_config('smoke' if FLAGS.quick else None)
  if not FLAGS.quick:
    c.sft.steps, c.rl.steps = FLAGS.sft_steps, FLAGS.rl_steps
  else:
    c.sft.steps, c.rl.steps = 30, 6
  c.rl.lr = FLAGS.rl_lr
  c.rollout.drafter, c.rollout.num_draft = 'quantized', 4
  c.rollout.temperature = FLAGS.temperature
  c.drafter.quantized.bits = FLAGS.bits
  exp = train.build_experiment(c)
  rows = []
  state = train.init_state(exp)
  fns = train.jitted_steps(exp, jax.tree.map(lambda x: x.sharding, state))
  for step in range(c.sft.steps):
    state, _ = train.run_step(exp, state, step, fns)
  derive = jax.jit(exp.drafter.params_from_policy)
  stale = derive(state.params)
  fresh = stale
  for step in range(c.sft.steps, c.sft.steps + c.rl.steps):
    t0 = time.perf_counter()
    batch, _, _, m_fresh = train.rollout_batch(exp, state.params, step, state.rng, fresh)
    _, _, _, m_stale = train.rollout_batch(exp, state.params, step, state.rng, stale)
    state, _, fresh = fns[1](state, batch)
    rows.append(
      {
        'step': step - c.sft.steps,
        'fresh': m_fresh['spec/alpha'],
        'stale': m_stale['spec/alpha'],
        'reward': m_fresh['reward'],
      }
    )
    r = rows[-1]
    print(
      f'step {r["step"]:3d}  acceptance fresh {r["fresh"]:.3f}  stale {r["stale"]:.3f}'
      f'  reward {r["reward"]:.3f}  ({time.perf_counter() - t0:.1f}s)',
      flush=True,
    )
  fresh_acc = np.array([r['fresh'] for r in rows])
  stale_acc = np.array([r['stale'] for r in rows])
  tail = max(1, len(rows) // 4)
  try:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(fresh_acc, label='fresh (re-quantized every step)')
    ax.plot(stale_acc, label='stale (quantized at RL step 0)')
    ax.set_xlabel('GRPO step')
    ax.set_ylabel('acceptance')
    ax.set_title(f'int{FLAGS.bits} self-drafter, T={FLAGS.temperature}')
    ax.legend()
    fig.tight_layout()
    fig.savefig(FLAGS.plot, dpi=120)
    print(f'plot saved to {FLAGS.plot}')
  except ImportError:
    print('matplotlib missing: no plot')
  print(
    json.dumps(
      {
        'bench': 'drift',
        'device': jax.devices()[0].device_kind,
        'bits': FLAGS.bits,
        'steps': len(rows),
        'fresh_mean': float(fresh_acc.mean()),
        'stale_mean': float(stale_acc.mean()),
        'fresh_last_quarter': float(fresh_acc[-tail:].mean()),
        'stale_last_quarter': float(stale_acc[-tail:].mean()),
      }
    )
  )


if __name__ == '__main__':
  app.run(main)

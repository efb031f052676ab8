"""Asynchronous vs synchronous RL on two fake CPU devices, one single-threaded device per core.

The overlap of issue 18 made visible without an accelerator: XLA:CPU with two host
devices (``--xla_force_host_platform_device_count=2``) and single-threaded intra-op
execution (``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``), so each
device keeps about one core busy. Device 0 rolls out (``rollout_mesh_shape=(1,1,1)``),
device 1 trains (``train_mesh_shape=(1,1,1)``), params move after every update with
``jax.device_put``.

Variants (same split, same seeds, same warm-up checkpoint):

- ``s0``: ``rl.async_staleness=0`` -- rollout, then train, then transfer, nothing overlaps;
- ``s1``: ``rl.async_staleness=1`` -- the rollout for step t+1 runs while step t trains;
- ``s1_tis`` (not with --quick): s = 1 with ``rl.offpolicy='tis'``.

One warm-up (``--sft_steps`` supervised steps) is shared; then the variants' GRPO steps are
interleaved (step i of every variant back to back, order rotated) so background load hits
them alike; the first GRPO step of each compiles and is not timed. Reported: median step
time and its s0/s1 ratio, the component times from a host timeline (rollout: host span of
the rollout generated in the step; train: dispatch until the step's metrics are ready,
observed by a benchmark-only watcher thread; transfer: device_put + drafter derivation),
the reward curves, a timeline plot and a reward plot (``--plot_dir``).

  python bench/async_rl.py --quick     # ~3 minutes on a 2-core CPU
  python bench/async_rl.py             # 150 warm-up steps, 30 GRPO steps (~14 min, loaded CPU)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
  ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from configs import default  # noqa: E402
from specrl import async_rl, train  # noqa: E402

VARIANTS = {
  's0': {'async_staleness': 0},
  's1': {'async_staleness': 1},
  's1_tis': {'async_staleness': 1, 'offpolicy': 'tis'},
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_config(args):
  c = default.get_config()
  c.sft.steps, c.rl.steps = args.sft_steps, args.rl_steps + 5  # + the timeline stretch
  c.rl.num_prompts = args.num_prompts
  c.rollout_mesh_shape, c.train_mesh_shape = (1, 1, 1), (1, 1, 1)
  c.eval.prompts, c.log_every = 0, 1000
  return c


def components(events, steps):
  """Per timed step: rollout / train / transfer host spans (seconds) from a timeline."""
  out = {k: [] for k in ('rollout', 'train', 'transfer')}
  for kind, step, t0, t1 in events:
    # the rollout generated in iteration t is for t (s = 0) or t + 1 (s = 1); transfer
    # events carry the published version t + 1; train events carry t
    owner = {'train': step, 'transfer': step - 1}.get(kind)
    if owner is None:  # rollout: attribute to the iteration in which it ran
      owner = step
    if owner in steps:
      out[kind].append(t1 - t0)
  return out


def plot(timelines, rewards, plot_dir, steps_shown):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(timelines), 1, figsize=(10, 1.6 * len(timelines) + 0.8))
  axes = np.atleast_1d(axes)
  colors = {'rollout': 'tab:blue', 'train': 'tab:orange', 'transfer': 'tab:green'}
  lanes = {'rollout': 2, 'train': 1, 'transfer': 0}
  for ax, (name, (events, first)) in zip(axes, timelines.items(), strict=True):
    sel = [e for e in events if first <= e[1] <= first + steps_shown]
    t_start = min(e[2] for e in sel)
    for kind, step, t0, t1 in sel:
      ax.barh(lanes[kind], t1 - t0, left=t0 - t_start, color=colors[kind], edgecolor='k', lw=0.3)
      if kind != 'transfer':
        ax.text(t0 - t_start, lanes[kind], f' {step}', va='center', fontsize=7)
    ax.set_yticks(list(lanes.values()), [f'{k} ({"dev 0" if k == "rollout" else "dev 1"})'
                                         if k != 'transfer' else k for k in lanes])  # fmt: skip
    ax.set_title(f'{name}: {steps_shown} GRPO steps (labels: the step a rollout / update is for)',
                 fontsize=9)  # fmt: skip
    ax.set_xlabel('seconds')
  fig.tight_layout()
  tl = os.path.join(plot_dir, 'async_rl_timeline.png')
  fig.savefig(tl, dpi=110)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 3.2))
  for name, (steps, r) in rewards.items():
    ax.plot(steps, r, marker='.', label=name)
  ax.set_xlabel('GRPO step')
  ax.set_ylabel('mean reward of the step batch')
  ax.legend()
  fig.tight_layout()
  rp = os.path.join(plot_dir, 'async_rl_reward.png')
  fig.savefig(rp, dpi=110)
  plt.close(fig)
  return tl, rp


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--sft_steps', type=int, default=150)
  ap.add_argument('--rl_steps', type=int, default=30)  # + 4 more per variant for the timeline
  ap.add_argument('--num_prompts', type=int, default=32)
  ap.add_argument('--plot_dir', default=os.path.join(ROOT, 'docs'))
  args = ap.parse_args()
  variants = ['s0', 's1', 's1_tis']
  if args.quick:
    args.sft_steps, args.rl_steps, args.num_prompts = 100, 10, 16
    variants = ['s0', 's1']
  assert jax.device_count() == 2, jax.devices()
  base = base_config(args)
  exps, states, fns, pipes, tls = {}, {}, {}, {}, {}
  for v in variants:
    c = base.copy_and_resolve_references()
    c.rl.update(VARIANTS[v])
    exps[v] = train.build_experiment(c)
    tls[v] = async_rl.Timeline()
    pipes[v] = train.make_pipeline(exps[v], tls[v])
  v0 = variants[0]
  state = train.init_state(exps[v0])
  sh = jax.tree.map(lambda x: x.sharding, state)
  for v in variants:
    fns[v] = train.jitted_steps(exps[v], sh)
  for step in range(args.sft_steps):  # the shared warm-up
    state, _ = train.run_step(exps[v0], state, step, fns[v0])
  for v in variants:
    states[v] = jax.tree.map(jnp.copy, state)
  print(
    f'# async RL: {common.device_info()} (fake devices), single-threaded intra-op; '
    f'default config, {base.rl.num_prompts} prompts x {base.rl.num_generations}, warm-up '
    f'{args.sft_steps} steps, {args.rl_steps} GRPO steps interleaved (shared machine)',
    flush=True,
  )
  hist = {v: [] for v in variants}
  load0 = os.getloadavg()[0]
  for i in range(args.rl_steps):
    step = args.sft_steps + i
    for v in variants[i % len(variants) :] + variants[: i % len(variants)]:
      states[v], m = train.run_step(exps[v], states[v], step, fns[v], pipes[v])
      hist[v].append(m)
  # A short consecutive stretch per variant for the timeline plot (the interleaved steps
  # above have the other variants' steps between them).
  shown, segment = min(4, args.rl_steps), {}
  for v in ('s0', 's1'):
    pipes[v].timeline = seg = async_rl.Timeline()
    for step in range(args.sft_steps + args.rl_steps, args.sft_steps + args.rl_steps + shown):
      states[v], _ = train.run_step(exps[v], states[v], step, fns[v], pipes[v])
    segment[v] = (seg.join(), args.sft_steps + args.rl_steps)
  timed = set(range(args.sft_steps + 1, args.sft_steps + args.rl_steps))
  rows, res = [], {'variants': {}}
  for v in variants:
    events = tls[v].join()
    comp = components(events, timed)
    steps_t = [m['step_time_s'] for i, m in enumerate(hist[v]) if i > 0]
    r = {
      'step_s': statistics.median(steps_t),
      'rollout_s': statistics.median(comp['rollout']),
      'train_s': statistics.median(comp['train']),
      'transfer_s': statistics.median(comp['transfer']),
      'reward_first': hist[v][0]['reward'],
      'reward_last3': float(np.mean([m['reward'] for m in hist[v][-3:]])),
      'reward_mean': float(np.mean([m['reward'] for m in hist[v]])),
      'rewards': [round(m['reward'], 4) for m in hist[v]],
      'staleness': [int(m['async/staleness']) for m in hist[v]],
    }
    if 'train/is_weight_mean' in hist[v][-1]:
      r['is_weight_mean'] = float(np.mean([m['train/is_weight_mean'] for m in hist[v][1:]]))
    res['variants'][v] = r
    rows.append({'variant': v, **r})
    tls[v].events = events
  common.print_table(
    [('variant', ''), ('step_s', '.3f'), ('rollout_s', '.3f'), ('train_s', '.3f'),
     ('transfer_s', '.4f'), ('reward_first', '.3f'), ('reward_last3', '.3f'),
     ('reward_mean', '.3f')],
    rows,
  )  # fmt: skip
  s0, s1 = res['variants']['s0'], res['variants']['s1']
  res['speedup_s1_over_s0'] = s0['step_s'] / s1['step_s']
  res['ideal_speedup'] = (s0['rollout_s'] + s0['train_s'] + s0['transfer_s']) / (
    max(s0['rollout_s'], s0['train_s']) + s0['transfer_s']
  )
  print(
    f'step time s0/s1 = {res["speedup_s1_over_s0"]:.2f}x (perfect overlap of the s0 '
    f'components would give {res["ideal_speedup"]:.2f}x)'
  )
  tl, rp = plot(
    segment,
    {v: (list(range(args.rl_steps)), [m['reward'] for m in hist[v]]) for v in variants},
    args.plot_dir,
    shown,
  )
  res['load_average'] = [load0, os.getloadavg()[0]]  # the machine is shared
  res['plots'] = [os.path.relpath(tl, ROOT), os.path.relpath(rp, ROOT)]
  res['sft_steps'], res['rl_steps'], res['num_prompts'] = (
    args.sft_steps, args.rl_steps, args.num_prompts,
  )  # fmt: skip
  common.emit_json(res)


if __name__ == '__main__':
  main()

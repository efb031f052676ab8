"""End-to-end GRPO step time (rollout + train) with and without the adaptive rollout.

The number the issue asks for besides rollout speed: what one RL step of the default
config costs, side by side in one run. Every variant starts from the same warm-up
checkpoint (``--sft_steps`` supervised steps, trained once into ``--workdir`` and then
restored) and runs its own GRPO trajectory for ``--rl_steps`` steps; the variants' steps
are interleaved (step i of every variant back to back, order rotated), the first step of
each is a compile warm-up and is not timed.

Variants (config overrides of ``configs/default.py``):

- ``static``: plain decoding, static batch (the default config);
- ``compact``: ``adaptive.enabled`` without a drafter: compaction only;
- ``adaptive``: ``adaptive.enabled`` + int8 quantized self-drafter (derived inside the
  train step) + the cost-model chooser;
- ``spec``: static batch, int8 quantized drafter always on (k = 4);
- ``eagle``: static batch, the eagle head always on (k = 4), ``mode=cotrain`` (its update
  fused into the GRPO step), warmed up with ``--eagle_warmup`` updates on the policy's own
  generations in its first (untimed) step; the warm-up time is reported (``warmup_s``);
- ``adaptive_eagle``: ``adaptive.enabled`` + that head (the chooser may also pick plain).
  ``eagle`` / ``adaptive_eagle`` are opt-in (``--variants``): their warm-up adds minutes.

Reported per variant: median step / rollout / train time (an adaptive engine's
first-time compiles of a (bucket, strategy) inside a timed step are excluded and summed
in ``late_compile_s``), the median of the paired
per-step ratios ``static_i / variant_i``, and the mean reward and accuracy over the
timed steps (lossless rollouts: the same distribution, so learning is unaffected up to
sampling noise), and each variant's final policy validated on the task's held-out prompts
(``specrl.evaluation``: ``val_acc`` with its 95% interval ``val_ci``, ``val_alpha`` with a
drafter); the JSON line also has the warm-up policy's validation (``warmup_eval``).

  python bench/rl_step.py --quick       # ~1 minute on a 2-core CPU
  python bench/rl_step.py               # 200 warm-up steps, 8 timed GRPO steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from configs import default  # noqa: E402
from specrl import evaluation, train  # noqa: E402
from specrl.drafters import eagle_train  # noqa: E402

VARIANTS = ('static', 'compact', 'adaptive', 'spec', 'eagle', 'adaptive_eagle')
DEFAULT_VARIANTS = 'static,compact,adaptive,spec'


def variant_config(name: str, base, eagle_warmup: int = 100):
  c = base.copy_and_resolve_references()
  if name in ('compact', 'adaptive', 'adaptive_eagle'):
    c.adaptive.enabled = True
  if name in ('adaptive', 'spec'):
    c.rollout.drafter = 'quantized'
  if name in ('eagle', 'adaptive_eagle'):
    c.rollout.drafter = 'eagle'
    c.drafter.eagle.update(mode='cotrain', lr=3e-3, warmup_steps=eagle_warmup)
  if c.rollout.drafter != 'none':
    # k = 4 for the static engine; the adaptive engine picks k from adaptive.arms
    c.rollout.num_draft = 0 if c.adaptive.enabled else 4
  return c


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='smoke-sized run (~1 minute)')
  ap.add_argument('--sft_steps', type=int, default=200)
  ap.add_argument('--rl_steps', type=int, default=8, help='timed GRPO steps per variant')
  ap.add_argument('--variants', default=DEFAULT_VARIANTS, help=f'comma list of {VARIANTS}')
  ap.add_argument('--eagle_warmup', type=int, default=100, help='eagle head warm-up updates')
  ap.add_argument('--workdir', default='/tmp/specrl_bench_warm')
  common.add_compile_cache_flag(ap)
  args = ap.parse_args(argv)
  common.enable_compile_cache(args.compile_cache)
  variants = [v for v in args.variants.split(',') if v]
  unknown = set(variants) - set(VARIANTS)
  if unknown:
    raise SystemExit(f'--variants: unknown {sorted(unknown)} (known: {", ".join(VARIANTS)})')
  base = default.get_config()
  if args.quick:
    args.sft_steps, args.rl_steps = 30, 3
    base.rl.num_prompts = 8
    base.eval.prompts = 16
    args.workdir += '_quick'
  base.sft.steps = args.sft_steps
  base.rl.steps = args.rl_steps + 1
  # validates the warm-up policy at its last step (the start of GRPO), unless restored
  warm, warm_hist = train.train_and_evaluate(base, args.workdir, max_steps=args.sft_steps)
  warmup_eval = next((m for m in warm_hist if 'eval/step' in m), None)

  exps, states, fns, pipes, heads, warmup_s = {}, {}, {}, {}, {}, {}
  for v in variants:
    exps[v] = train.build_experiment(variant_config(v, base, args.eagle_warmup))
    init = train.init_state(exps[v])
    # the eagle head's state rides in the train state, as in train.train_and_evaluate
    heads[v] = eagle_train.trainer(exps[v].drafter, exps[v])
    start = warm
    if heads[v] is not None:
      init = init.replace(drafter=heads[v].placed(exps[v].mesh))
      start = warm.replace(drafter=init.drafter)
    sh = jax.tree.map(lambda x: x.sharding, init)
    states[v] = jax.device_put(jax.tree.map(jnp.copy, start), sh)  # steps donate theirs
    fns[v] = train.jitted_steps(exps[v], sh)
    pipes[v] = train.make_pipeline(exps[v])
  info = common.device_info()
  print(
    f'# GRPO step time: {info}, default config ({base.rl.num_prompts} prompts x '
    f'{base.rl.num_generations}), warm-up {args.sft_steps} steps, {args.rl_steps} timed steps',
    flush=True,
  )
  hist = {v: [] for v in variants}
  for i in range(args.rl_steps + 1):
    step = args.sft_steps + i
    for v in variants[i % len(variants) :] + variants[: i % len(variants)]:
      if heads[v] is not None:  # the head's warm-up (first step only), as the train loop does
        t0 = time.perf_counter()
        states[v] = heads[v].before_step(exps[v], states[v], step)
        if i == 0:
          warmup_s[v] = time.perf_counter() - t0
      states[v], m = train.run_step(exps[v], states[v], step, fns[v], pipes[v])
      if heads[v] is not None:  # the step donated the old head arrays: follow the new ones
        heads[v].set_state(states[v].drafter)
      # One-off costs inside a timed step: an adaptive engine compiles (and profiles) each
      # (bucket, strategy) the first time a rollout reaches it. Reported, then excluded.
      once = m.get('adaptive/compile_s', 0.0) + m.get('adaptive/profile_s', 0.0)
      m['once_s'] = once
      m['step_time_s'] -= once
      m['rollout/time_s'] -= once
      if i > 0:  # step 0 compiles everything else
        hist[v].append(m)

  val = {}
  for v in variants:  # the same held-out prompts and keys for every variant
    params, dparams = pipes[v].current(states[v].params, int(states[v].step))
    val[v] = evaluation.Evaluator.from_experiment(exps[v])(params, dparams)

  def med(v, key):
    return statistics.median(m[key] for m in hist[v])

  rows = []
  for v in variants:
    ref = hist['static'] if 'static' in variants else hist[variants[0]]
    pairs = [a['step_time_s'] / b['step_time_s'] for a, b in zip(ref, hist[v], strict=True)]
    rows.append(
      dict(
        variant=v,
        step_s=med(v, 'step_time_s'),
        rollout_s=med(v, 'rollout/time_s'),
        train_s=med(v, 'train/time_s'),
        speedup=statistics.median(pairs),
        speedup_lo=min(pairs),
        speedup_hi=max(pairs),
        reward=float(np.mean([m['reward'] for m in hist[v]])),
        accuracy=float(np.mean([m['accuracy'] for m in hist[v]])),
        len_mean=float(np.mean([m['response_len_mean'] for m in hist[v]])),
        spec_frac=float(np.mean([m.get('adaptive/spec_time_frac', 0.0) for m in hist[v]])),
        late_compile_s=float(sum(m['once_s'] for m in hist[v])),
        val_acc=val[v]['eval/accuracy'],
        val_ci=val[v]['eval/accuracy_ci95'],
        val_alpha=val[v].get('eval/spec/alpha', float('nan')),
        warmup_s=warmup_s.get(v, 0.0),
      )
    )
  common.print_table(
    [
      ('variant', ''),
      ('step_s', '.3f'),
      ('rollout_s', '.3f'),
      ('train_s', '.3f'),
      ('speedup', '.2f'),
      ('speedup_lo', '.2f'),
      ('speedup_hi', '.2f'),
      ('reward', '.3f'),
      ('accuracy', '.3f'),
      ('len_mean', '.1f'),
      ('spec_frac', '.2f'),
      ('late_compile_s', '.1f'),
      ('val_acc', '.3f'),
      ('val_ci', '.3f'),
      ('val_alpha', '.2f'),
      ('warmup_s', '.1f'),
    ],
    rows,
  )
  common.emit_json(
    dict(
      bench='rl_step',
      quick=args.quick,
      **info,
      sft_steps=args.sft_steps,
      rl_steps=args.rl_steps,
      warmup_eval=warmup_eval
      and {k: v for k, v in warmup_eval.items() if k.startswith('eval/') and '/spec/' not in k},
      results={r['variant']: {k: x for k, x in r.items() if k != 'variant'} for r in rows},
    )
  )


if __name__ == '__main__':
  main()

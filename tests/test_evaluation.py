"""Validation, progress and the run report: the held-out split is disjoint from training,
evaluation is deterministic, the loop validates on schedule, the report lists the metrics,
progress is plain lines off a terminal, and no backend-probe noise."""

import io
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from configs import default
from specrl import evaluation, metrics_io, progress, report, rng_streams, tasks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prompt_texts(task, tokens, lengths):
  return {task.tokenizer.decode(t[:n]) for t, n in zip(tokens, lengths, strict=True)}


def test_heldout_prompts_never_occur_in_the_training_stream():
  c = default.get_config()  # 2..16 terms: 2-term prompts (100 of them) recur constantly
  task = tasks.make_task(c.task)
  held = task.heldout_prompts(256)
  held_text = _prompt_texts(task, held.tokens, held.lengths)
  assert held_text and all(tasks.is_heldout_text(t) for t in held_text)
  assert np.array_equal(task.heldout_prompts(256).tokens, held.tokens)  # a fixed pool
  seen, unsplit = set(), set()
  for step in range(400):  # RL prompts and warm-up prompts of 400 steps
    pb = task.prompts_for_step(c.seed, step, 32)
    seen |= _prompt_texts(task, pb.tokens, pb.lengths)
    toks, mask = task.sample_sft(rng_streams.data_rng(c.seed, step), 16, 40)
    plen = np.argmax(mask > 0, axis=1)
    seen |= _prompt_texts(task, toks, plen)
    rng = rng_streams.data_rng(c.seed, step)  # the same draws without the split
    unsplit |= {task._prompt_text(task._problem(rng)) for _ in range(32)}
  assert not seen & held_text
  assert unsplit & held_text, 'the check has no power: held-out prompts never come up'
  # and as prompt ids (the hashes the drafters see)
  assert not set(tasks.prompt_ids(held)) & {
    zlib.crc32(np.asarray(task.tokenizer.encode(t), np.int32).tobytes()) & 0x7FFFFFFF for t in seen
  }


def test_math_jsonl_split_by_question_hash_or_eval_file(tmp_path):
  class Tok:
    eos_id, pad_id = 2, 0

    def encode(self, s):
      return [3 + ord(ch) % 20 for ch in s]

  path = tmp_path / 'p.jsonl'
  qs = [f'what is {i}?' for i in range(200)]
  path.write_text(''.join(json.dumps({'question': q, 'answer': '1'}) + '\n' for q in qs))
  t = tasks.MathJsonlTask(str(path), Tok(), 64, 8)
  held = {q for q, _ in t.heldout}
  assert 0 < len(held) < 40 and not held & {q for q, _ in t.problems}
  assert len(held) + len(t.problems) == 200
  ev = tmp_path / 'e.jsonl'
  ev.write_text(json.dumps({'question': qs[0], 'answer': '1'}) + '\n')
  t2 = tasks.MathJsonlTask(str(path), Tok(), 64, 8, eval_path=str(ev))
  assert [q for q, _ in t2.heldout] == [qs[0]] and len(t2.problems) == 199
  assert len(t2.heldout_prompts(10).lengths) == 1


def test_validation_schedule():
  due = [n for n in range(0, 40) if evaluation.due_after(n, 10, 30, 8)]
  assert due == [10, 18, 26, 30]  # start of GRPO, every 8 GRPO steps, the end
  assert [n for n in range(40) if evaluation.due_after(n, 10, 30, 0)] == [10, 30]
  assert [n for n in range(5) if evaluation.due_after(n, 0, 3, 0)] == [0, 3]
  assert not any(evaluation.due_after(n, 5, 5, 1) for n in range(8))  # no GRPO: none
  # eval chunks: rows divisible by the batch devices (e.g. 4 greedy prompts on 8 devices)
  assert evaluation.round_chunk(4, 1, 8) == 8 and evaluation.round_chunk(3, 2, 4) == 4
  assert evaluation.round_chunk(32, 8, 8) == 32
  m, ci = evaluation.mean_ci([0.0, 1.0, 0.0, 1.0])
  assert m == 0.5 and ci == pytest.approx(1.96 * np.std([0, 1, 0, 1], ddof=1) / 2, rel=1e-3)


def test_evaluation_is_deterministic_and_reports_speculation():
  c = default.get_config('smoke')
  c.rollout.drafter, c.rollout.num_draft = 'ngram', 2
  exp = train.build_experiment(c)
  state = train.init_state(exp)
  ev = evaluation.Evaluator.from_experiment(exp)
  first = ev(state.params)
  second = ev(state.params)
  for k in evaluation.TIMING_KEYS:
    first.pop(k), second.pop(k)
  assert first == second  # same params, same numbers
  for key in ('reward', 'accuracy', 'pass_at_1', 'pass_at_4', 'response_len_mean'):
    assert f'eval/{key}' in first
  assert {'eval/reward_ci95', 'eval/greedy_accuracy', 'eval/spec/alpha'} <= set(first)
  assert 'eval/spec/per_position/1' in first and 0 <= first['eval/spec/alpha'] <= 1
  assert first['eval/prompts'] == c.eval.prompts
  # greedy decoding is the same on every call, and independent of the sampled rollouts
  other = evaluation.Evaluator(
    ev.cfg, exp.task, exp.engine, exp.rngs.train, c.rl.num_prompts, ev.greedy_engine
  )(state.params)
  assert other['eval/greedy_accuracy'] == first['eval/greedy_accuracy']


def test_loop_validates_writes_the_report_and_prints_plain_lines(tmp_path, capsys):
  c = default.get_config('smoke')
  c.sft.steps, c.rl.steps, c.eval.every, c.log_every = 2, 3, 2, 2
  _, hist = train.train_and_evaluate(c, str(tmp_path))
  assert [m.get('eval/step') for m in hist] == [None, 2, None, 4, 5]
  lines = train.read_metrics(str(tmp_path))
  assert lines[1]['eval/reward'] == hist[1]['eval/reward']
  out = capsys.readouterr().out
  assert '\r' not in out and '\x1b' not in out  # not a terminal: plain lines only
  step_lines = [ln for ln in out.splitlines() if ln.startswith('[')]
  assert [ln.split(']')[0] for ln in step_lines] == ['[1/5', '[3/5', '[5/5']  # log_every, last
  assert sum(ln.startswith('validation after') for ln in out.splitlines()) == 3
  md = (tmp_path / report.REPORT_MD).read_text()
  assert md in out  # printed at the end
  for word in ('reward', 'accuracy', 'greedy accuracy', 'pass@4', 'tokens/s', 'after 2 steps'):
    assert word in md, word
  assert (tmp_path / report.REPORT_PNG).read_bytes()[:4] == b'\x89PNG'


def _fake_run(workdir):
  """metrics.jsonl of a 2-step warm-up + 4-step GRPO run with a drafter, validated twice."""
  rows = [{'step': s, 'phase': 0.0, 'sft_loss': 1.0, 'step_time_s': 0.5} for s in range(2)]
  for s in range(2, 6):
    rows.append(
      {
        'step': s, 'phase': 1.0, 'step_time_s': 1.0, 'reward': 0.5, 'accuracy': 0.2,
        'response_len_mean': 10.0 + s, 'rollout/time_s': 0.6, 'rollout/tokens': 600,
        'rollout/tokens_per_s': 1000.0, 'train/time_s': 0.3, 'spec/alpha': 0.7,
        'spec/accepted': 70, 'spec/drafted': 100, 'spec/verify_passes': 40,
      }
    )  # fmt: skip
  for row, n, acc in ((rows[1], 2, 0.25), (rows[5], 6, 0.5)):
    row.update(
      {
        'eval/step': n, 'eval/prompts': 64, 'eval/generations': 8, 'eval/reward': acc + 0.1,
        'eval/reward_ci95': 0.05, 'eval/accuracy': acc, 'eval/accuracy_ci95': 0.04,
        'eval/pass_at_1': acc, 'eval/pass_at_8': 0.9, 'eval/greedy_accuracy': acc,
        'eval/greedy_accuracy_ci95': 0.1, 'eval/response_len_mean': 12.0, 'eval/time_s': 1.0,
        'eval/spec/alpha': 0.75, 'eval/spec/per_position/1': 0.8, 'eval/spec/per_position/2': 0.7,
      }
    )  # fmt: skip
  with open(os.path.join(workdir, report.METRICS_FILE), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)


def test_report_lists_the_metrics_and_runs_from_the_command_line(tmp_path):
  assert report.METRICS_FILE == train.METRICS_FILE == metrics_io.METRICS_FILE
  _fake_run(tmp_path)
  r = subprocess.run(
    [sys.executable, '-m', 'specrl.report', str(tmp_path)],
    cwd=ROOT, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert r.returncode == 0, r.stderr
  md = (tmp_path / 'report.md').read_text()
  assert md in r.stdout
  assert '| accuracy | 0.250 ± 0.040 | 0.500 ± 0.040 | +0.250 ± 0.057 |' in md
  assert '| pass@8 | 0.900 | 0.900 | +0.000 |' in md
  assert 'rollout tokens/s: 1000 (2400 tokens)' in md
  assert 'GRPO rollout: 2.4s (67% of GRPO step time); train: 1.2s' in md
  assert 'acceptance alpha: 0.700' in md and 'tokens per verify pass: 2.75' in md
  assert 'per position: 1: 0.80, 2: 0.70' in md
  assert (tmp_path / 'report.png').stat().st_size > 1000


def test_progress_off_a_terminal_is_plain_lines_at_log_every():
  out = io.StringIO()  # isatty() is False
  p = progress.Progress(total=25, sft_steps=10, log_every=10, stream=out)
  for step in range(25):
    p.update(step, 10.0, f'[{step + 1}/25] metrics')
    if step == 9:
      p.message('validation after 10 steps')
  p.close()
  lines = out.getvalue().splitlines()
  assert [ln.split(' ')[0] for ln in lines] == [
    '[1/25]',
    'validation',
    '[11/25]',
    '[21/25]',
    '[25/25]',
  ]
  assert '\r' not in out.getvalue() and '\x1b' not in out.getvalue()
  assert lines[2].endswith('(GRPO 11/25 ETA ?)')  # its first step compiled: not timed
  assert lines[3].endswith('(GRPO 21/25 ETA 40s)')  # median step 10s x 4 steps left
  assert lines[-1].endswith('(GRPO 25/25 done)')
  tty = io.StringIO()
  q = progress.Progress(total=25, sft_steps=10, log_every=10, stream=tty, interactive=True)
  for step in range(3):
    q.update(step, 0.1, f'[{step + 1}/25] metrics')
  assert tty.getvalue().count('\r') >= 3  # the status line is redrawn every step
  assert progress.format_duration(75.2) == '1m15s' and progress.format_duration(None) == '?'


def test_no_backend_probe_line_on_cpu():
  code = (
    'import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n'
    'from specrl import progress\n'
    'if sys.argv[1] == "quiet": progress.quiet_backend_probe()\n'
    'import jax; jax.devices()\n'
  )
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}  # let JAX probe
  run = lambda mode: subprocess.run(  # noqa: E731
    [sys.executable, '-c', code, mode], cwd=ROOT, env=env, capture_output=True, text=True,
    timeout=120,
  ).stderr  # fmt: skip
  loud = run('loud')
  if 'Unable to initialize backend' not in loud:
    pytest.skip('this JAX probes no missing backend here')
  assert 'Unable to initialize backend' not in run('quiet')


def test_greedy_only_validation_scores_both_checks_per_prompt():
  c = default.get_config('smoke')  # the tiny model on the arith task (character tokenizer)
  c.model.vocab_size = 96
  c.task.update(name='arith', pool_size=200, max_response_len=8, min_steps=1, max_steps=1)
  c.sft.steps = 0
  c.eval.update(prompts=4, generations=0, greedy=True)
  exp = train.build_experiment(c)
  ev = evaluation.Evaluator.from_experiment(exp)
  m = ev(train.init_state(exp).params)
  assert m['eval/generations'] == 0 and 'eval/reward' not in m and 'eval/accuracy' not in m
  for k in ('greedy_accuracy', 'greedy_final_line_accuracy', 'response_len_mean'):
    assert f'eval/{k}' in m and f'eval/{k}_ci95' in m or k == 'response_len_mean'
  assert set(ev.last_rows) == {'greedy_accuracy', 'greedy_final_line_accuracy'}
  assert all(len(v) == 4 for v in ev.last_rows.values())
  assert np.mean(ev.last_rows['greedy_accuracy']) == m['eval/greedy_accuracy']
  m['eval/step'] = 0
  assert 'greedy only' in evaluation.format_line(m)
  with pytest.raises(ValueError, match='generations'):
    evaluation.EvalConfig(generations=0, greedy=False)


def test_report_pairs_the_change_over_prompts_and_shows_the_final_line_check(tmp_path):
  rows = []
  for s, (acc, fl) in enumerate(((0.25, 0.5), (0.5, 0.5), (0.75, 0.75))):
    rows.append(
      {
        'step': s, 'phase': 1.0, 'step_time_s': 1.0, 'reward': 0.5, 'response_len_mean': 9.0,
        'rollout/time_s': 0.6, 'rollout/tokens': 60, 'rollout/tokens_per_s': 100.0,
        'train/time_s': 0.3, 'eval/step': 2 * s, 'eval/prompts': 4, 'eval/generations': 0,
        'eval/greedy_accuracy': acc, 'eval/greedy_accuracy_ci95': 0.5,
        'eval/greedy_final_line_accuracy': fl, 'eval/greedy_final_line_accuracy_ci95': 0.5,
        'eval/response_len_mean': 9.0, 'eval/time_s': 1.0,
      }
    )  # fmt: skip
  with open(tmp_path / report.METRICS_FILE, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  before = {'greedy_accuracy': [1, 0, 0, 0], 'greedy_final_line_accuracy': [1, 1, 0, 0]}
  after = {'greedy_accuracy': [1, 1, 1, 0], 'greedy_final_line_accuracy': [1, 1, 1, 0]}
  mid = {'greedy_accuracy': [1, 1, 0, 0], 'greedy_final_line_accuracy': [1, 1, 0, 0]}
  with open(tmp_path / report.EVAL_ROWS_FILE, 'w') as f:
    for step, r in ((0, before), (2, mid), (4, after)):
      f.write(json.dumps({'step': step, **r}) + '\n')
  md = report.write_report(str(tmp_path))
  d, ci = evaluation.paired_diff(before['greedy_accuracy'], after['greedy_accuracy'])
  assert d == 0.5 and ci == pytest.approx(evaluation.Z95 * np.std([0, 1, 1, 0], ddof=1) / 2)
  assert f'| greedy accuracy | 0.250 ± 0.500 | 0.750 ± 0.500 | +0.500 ± {ci:.3f} |' in md
  assert '| greedy final-line accuracy (any format) | 0.500 ± 0.500 | 0.750 ± 0.500 |' in md
  assert 'paired over the same held-out prompts' in md and 'one greedy decode each' in md
  assert '| 2 | 0.500 ± 0.500 | +0.250 ± 0.490 | 0.500 ± 0.500 | +0.000 ± 0.000 |' in md
  assert (tmp_path / report.REPORT_PNG).stat().st_size > 1000

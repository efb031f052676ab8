import json
import re

import numpy as np
import pytest

from specrl import answers, tasks


def test_running_sum_solution_reward_and_long_tail():
  t = tasks.RunningSumTask(2, 16)
  rng = np.random.default_rng(0)
  pb = t.sample_prompts(rng, 2000)
  assert pb.tokens.shape == (2000, t.max_prompt_len)
  n_terms = np.array([len(a) for a in pb.answers])
  resp_len = 2 * n_terms + 2  # worked steps, '#', answer, EOS
  assert resp_len.max() >= 3 * np.median(resp_len)  # long tail
  terms = [3, 5, 2, 7]
  sol = t.solution(terms)
  assert sol == '3 8 0 7#7'
  ids = t.tokenizer.encode(sol) + [tasks.EOS_ID]
  assert t.reward(ids, '3527') == 1.0 and t.is_correct(ids, '3527')
  assert t.reward(t.tokenizer.encode(sol), '3527') < 1.0  # no EOS: not finished
  partial = t.tokenizer.encode('3 8 1 8#8') + [tasks.EOS_ID]
  assert t.reward(partial, '3527') == pytest.approx(0.5 * 2 / 4)
  assert not t.is_correct(partial, '3527')


def test_sft_batch_masks_the_response():
  t = tasks.RunningSumTask(2, 4)
  toks, mask = t.sample_sft(np.random.default_rng(1), 3, 20)
  for row, m in zip(toks, mask, strict=True):
    text = t.tokenizer.decode(row[m > 0])
    assert '#' in text and tasks.EOS_ID in row[m > 0]
    assert t.tokenizer.decode(row[: int(np.argmax(m))]).endswith('.') or '=' in t.tokenizer.decode(
      row[: int(np.argmax(m))]
    )


@pytest.mark.parametrize(
  'text,ans',
  [
    ('so the answer is \\boxed{42}.', '42'),
    ('work ... #### 1,234', '1,234'),
    ('\\boxed{\\frac{1}{2}} then \\boxed{7}', '7'),
    ('no answer here', None),
  ],
)
def test_extract_answer(text, ans):
  assert answers.extract_answer(text) == ans


def test_answers_match_numeric():
  assert answers.answers_match('1,234', '1234')
  assert answers.answers_match('$5.00', '5')
  assert answers.answers_match('3/4', '0.75')
  assert not answers.answers_match('5', '6')
  assert not answers.answers_match(None, '6')


def test_read_math_jsonl(tmp_path):
  p = tmp_path / 'math.jsonl'
  p.write_text(
    json.dumps({'question': 'What is 2+3?', 'answer': 'She adds.\n#### 5'})
    + '\n'
    + json.dumps({'question': 'Q2', 'answer': 7})
    + '\n'
  )
  probs = tasks.read_math_jsonl(str(p))
  assert probs == [('What is 2+3?', '5'), ('Q2', '7')]
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"question": "x"}\n')
  with pytest.raises(ValueError, match="missing key 'answer'"):
    tasks.read_math_jsonl(str(bad))


def test_prompt_too_long_is_refused_naming_the_field_and_the_prompt(tmp_path):
  tok = tasks.CharTokenizer('ab')
  want = "config.task.max_prompt_len=4 is shorter than the prompt 'abababab' (8 tokens): set it"
  with pytest.raises(ValueError, match='^' + re.escape(want)):
    tasks._pack(tok, ['ab', 'abababab'], ['1', '2'], 4)
  p = tmp_path / 'p.jsonl'
  p.write_text(''.join(json.dumps({'question': 'a' * n, 'answer': 1}) + '\n' for n in range(1, 40)))
  # the question is quoted, not the prompt rendered from it (template: question + newline)
  want = r'^config\.task\.max_prompt_len=8 is shorter than the math_jsonl (held-out )?question '
  with pytest.raises(ValueError, match=want + r"'a{39}' \(40 tokens\): set it >= 40, or 0"):
    tasks.MathJsonlTask(str(p), tasks.CharTokenizer('a\n'), max_prompt_len=8, max_response_len=4)

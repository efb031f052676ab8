"""The arith task and the pooled tasks' behaviour: reward extraction, a disjoint held-out
split, epochs that revisit every training prompt id, a walk that is a pure function of
(seed, step), prompts through the chat template."""

import json

import numpy as np
import pytest

from configs import default
from specrl import arith_task, tasks
from specrl.checkpoints import hf_tokenizer

CHATML = (
  '{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}'
  '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}'
)


def _char_tokenizer_dir(path, chat_template=None):
  """A character-level HF tokenizer over the arith alphabet (BPE, no merges) with <pad>,
  <s>, </s> and, with a chat template, ChatML's <|im_start|> / <|im_end|> (end of turn)."""
  tokenizers = pytest.importorskip('tokenizers')
  from tokenizers import decoders, models

  special = ['<pad>', '<s>', '</s>', '<|im_start|>', '<|im_end|>']
  vocab = {t: i for i, t in enumerate(special)}
  vocab.update({ch: i + len(special) for i, ch in enumerate(tasks.ARITH_ALPHABET)})
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges=[], unk_token=None))
  tok.add_special_tokens(special)
  tok.decoder = decoders.Fuse()
  tok.save(str(path / 'tokenizer.json'))
  cfg = {'eos_token': '</s>', 'pad_token': '<pad>', 'bos_token': '<s>'}
  if chat_template:
    cfg['chat_template'] = chat_template
  (path / 'tokenizer_config.json').write_text(json.dumps(cfg))
  if chat_template:  # the chat model stops at the end of its turn
    (path / 'generation_config.json').write_text(json.dumps({'eos_token_id': [2, 4]}))
  return hf_tokenizer.load_tokenizer(str(path))


@pytest.fixture(scope='module')
def small():
  return tasks.ArithTask(pool_size=320)


def _ids(task, text, end=True):
  return task.tokenizer.encode(text) + ([tasks.EOS_ID] if end else [])


def test_pool_is_fixed_distinct_and_has_a_step_tail():
  a = arith_task.generate_pool(400)
  assert [p.question for p in a] == [p.question for p in arith_task.generate_pool(400)]
  assert len({p.question for p in a}) == 400
  assert [p.question for p in arith_task.generate_pool(50, seed=1)] != [p.question for p in a[:50]]
  steps = np.bincount([p.num_steps for p in a], minlength=5)
  assert steps[0] == 0 and (steps[1:] > 0).all() and steps[1] > steps[4]  # 1..4, a tail
  for p in a:  # the worked solution ends with the answer, one line per operation
    lines = p.solution.split('\n')
    assert len(lines) == p.num_steps + 1 and lines[-1] == f'#### {p.answer}'
    assert lines[-2].endswith(f'= {p.answer}') and int(p.answer) >= 0
    assert "'#### <number>'" in p.question


def test_reward_on_hand_written_responses():
  t = tasks.ArithTask(pool_size=64, format_reward=0.1)
  right = 'She has 12 + 5 = 17, then 17 - 3 = 14.\n#### 14'
  assert t.reward(_ids(t, right), '14') == 1.0 and t.is_correct(_ids(t, right), '14')
  assert t.reward(_ids(t, 'so \\boxed{14}'), '14') == 1.0
  assert t.reward(_ids(t, '#### 1,014'), '1014') == 1.0
  assert t.reward(_ids(t, right, end=False), '14') == 1.0  # ends without EOS: still parsed
  wrong = '12 + 5 = 17\n#### 15'
  assert t.reward(_ids(t, wrong), '14') == pytest.approx(0.1)  # format reward only
  assert not t.is_correct(_ids(t, wrong), '14')
  for malformed in ('the answer is 14', '#### ', '#### fourteen', '\\boxed{}', ''):
    assert t.reward(_ids(t, malformed), '14') == 0.0
  # text after the end of the response does not count
  assert t.reward(_ids(t, '#### 15') + _ids(t, '#### 14'), '14') == pytest.approx(0.1)
  plain = tasks.ArithTask(pool_size=64)  # no format reward: 1 / 0
  assert plain.reward(_ids(plain, wrong), '14') == 0.0
  with pytest.raises(ValueError, match='format_reward'):
    tasks.ArithTask(pool_size=64, format_reward=1.0)


def test_split_is_disjoint_and_fixed(small):
  train_q = {q for q, _ in small.problems}
  held_q = {q for q, _ in small.heldout}
  assert held_q and not train_q & held_q and len(train_q) + len(held_q) == 320
  assert all(tasks.is_heldout_text(q) for q in held_q)
  held = small.heldout_prompts(len(held_q))
  train_ids = set(tasks.prompt_ids(small.prompts_for_step(0, 0, 600)))
  assert not train_ids & set(tasks.prompt_ids(held))
  again = tasks.ArithTask(pool_size=320).heldout_prompts(5)
  np.testing.assert_array_equal(again.tokens, small.heldout_prompts(5).tokens)


def test_epochs_revisit_every_train_prompt_id_once(small):
  n, pool = 7, len(small.problems)
  per_epoch = [[] for _ in range(4)]
  step = 0
  while (step + 1) * n <= 3 * pool:
    ids = tasks.prompt_ids(small.prompts_for_step(5, step, n))
    for k, i in enumerate(ids):
      per_epoch[(step * n + k) // pool].append(int(i))
    step += 1
  all_ids = set(tasks.prompt_ids(small._train))
  assert len(all_ids) == pool
  for epoch in per_epoch[:2]:  # complete epochs: each id exactly once
    assert sorted(epoch) == sorted(all_ids)
  assert per_epoch[0] != per_epoch[1]  # a new order each epoch
  # the walk itself: indices of one epoch are a permutation
  walk = tasks.epoch_walk(10, seed=3, step=0, n=30)
  for e in range(3):
    assert sorted(walk[10 * e : 10 * e + 10]) == list(range(10))


def test_sample_prompts_is_a_pure_function_of_seed_and_step(small):
  def draw(seed, step):
    return small.prompts_for_step(seed, step, 5)

  a, b = draw(0, 17), draw(0, 17)  # a resumed run draws the same prompts
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert a.answers == b.answers
  assert not np.array_equal(draw(0, 18).tokens, a.tokens)
  assert not np.array_equal(draw(1, 17).tokens, a.tokens)  # the run seed orders the walk
  # step s of the walk is positions s*n .. s*n+n-1 of one endless walk (crossing epochs)
  whole = tasks.epoch_walk(100, 4, 0, 8 * 40)
  for s in (0, 12, 13, 39):
    np.testing.assert_array_equal(tasks.epoch_walk(100, 4, s, 8), whole[8 * s : 8 * s + 8])


def test_prompts_go_through_the_chat_template(tmp_path):
  (tmp_path / 'chat').mkdir()
  (tmp_path / 'plain').mkdir()
  chat_tok = _char_tokenizer_dir(tmp_path / 'chat', CHATML)
  t = tasks.ArithTask(chat_tok, pool_size=64)
  pb = t.prompts_for_step(0, 0, 3)
  for row, n in zip(pb.tokens, pb.lengths, strict=True):
    text = chat_tok.decode(row[:n])
    assert text.startswith('<|im_start|>user\n') and text.endswith('<|im_start|>assistant\n')
    assert 'How many' in text and '<|im_end|>' in text
  assert (
    pb.tokens.shape[1]
    == t.max_prompt_len
    == max(
      len(chat_tok.encode(tasks.render_question(chat_tok, q))) for q, _ in t.problems + t.heldout
    )
  )
  # the chat end-of-turn token ends the response
  resp = chat_tok.encode('#### 3') + [chat_tok.token_to_id('<|im_end|>')] + chat_tok.encode('9')
  assert t.reward(resp, '3') == 1.0

  plain_tok = _char_tokenizer_dir(tmp_path / 'plain')
  tp = tasks.ArithTask(plain_tok, pool_size=64)
  text = plain_tok.decode(tp.heldout_prompts(1).tokens[0, : tp.heldout_prompts(1).lengths[0]])
  assert text == tp.heldout[0][0] + '\n' and '<|im_start|>' not in text


def test_make_task_reads_every_arith_key(tmp_path):
  c = default.get_config()
  c.task.update(name='arith', pool_size=96, pool_seed=7, min_steps=2, max_steps=3)
  c.task.update(format_reward=0.25, max_response_len=40)
  t = tasks.make_task(c.task)
  assert isinstance(t, tasks.ArithTask) and len(t.pool) == 96
  assert {p.num_steps for p in t.pool} == {2, 3} and t.max_response_len == 40
  assert [p.question for p in t.pool] == [p.question for p in arith_task.generate_pool(96, 7, 2, 3)]
  assert t.reward(_ids(t, '#### 99999'), '1') == 0.25
  _char_tokenizer_dir(tmp_path, CHATML)
  c.task.tokenizer_path = str(tmp_path)
  assert tasks.make_task(c.task).tokenizer.chat_template == CHATML


def test_math_jsonl_walks_its_problems_in_epochs(tmp_path):
  path = tmp_path / 'p.jsonl'
  qs = [f'what is {i}+1?' for i in range(40)]
  path.write_text(''.join(json.dumps({'question': q, 'answer': '#### 1'}) + '\n' for q in qs))
  t = tasks.MathJsonlTask(str(path), tasks.CharTokenizer(tasks.ARITH_ALPHABET), 0, 8)
  pool = len(t.problems)
  seen = []
  for step in range(pool):  # one prompt per step: one epoch
    pb = t.prompts_for_step(2, step, 1)
    seen.append(int(tasks.prompt_ids(pb)[0]))
  assert sorted(seen) == sorted(tasks.prompt_ids(t._train).tolist())
  assert t.max_prompt_len == max(len(q) + 1 for q in qs)  # 0 = the longest prompt


def test_sft_batch_is_the_worked_solution_of_a_training_problem(small):
  toks, mask = small.sample_sft(np.random.default_rng([0, 1]), 4, 400)
  train_q = [q for q, _ in small.problems]
  for row, m in zip(toks, mask, strict=True):
    start = int(np.argmax(m))
    question = small.tokenizer.decode(row[:start])[:-1]  # plain template: question + newline
    assert question in train_q
    i = train_q.index(question)
    assert small.tokenizer.decode(row[m > 0]) == small.solutions[i]
    assert row[m > 0][-1] == small.tokenizer.eos_id  # decode stops at EOS; it is a target
    assert small.reward(row[m > 0], small.problems[i][1]) == 1.0


# ------------------------------------------------------------- task options (issue 30)

EASY = arith_task.ProblemOptions(
  start_max=12, add_max=6, operations=('add', 'sub'), wording='equation', instruction='brief'
)


def test_default_options_keep_the_original_pool():
  # the digest of the first 4096 questions before the options existed (issue 30)
  import hashlib

  digest = hashlib.md5(''.join(p.question for p in arith_task.generate_pool(4096)).encode())
  assert digest.hexdigest() == 'd055d829870d0096fb0caceae4934700'


def test_options_shape_the_problems():
  pool = arith_task.generate_pool(200, 3, 1, 3, 1.0, EASY)
  for p in pool:
    assert p.question.startswith('What is ') and 'Answer briefly.' in p.question
    ops = [ln.split()[1] for ln in p.solution.split('\n')[:-1]]
    assert set(ops) <= {'+', '-'} and len(ops) == p.num_steps
    assert 2 <= int(p.solution.split()[0]) < 12
    expr = p.question[len('What is ') : p.question.index('?')]
    assert eval(expr) == int(p.answer)  # noqa: S307 -- the equation wording is the sum itself
  story = arith_task.generate_pool(
    100, 3, 1, 1, 1.0, arith_task.ProblemOptions(operations=('add',))
  )
  assert all(' + ' in p.solution and 'How many' in p.question for p in story)
  for bad in (
    dict(operations=('add', 'pow')),
    dict(operations=('sub',)),
    dict(wording='poem'),
    dict(instruction='loud'),
    dict(start_max=2),
  ):
    with pytest.raises(ValueError, match='task.'):
      arith_task.ProblemOptions(**bad)


def test_both_checks_on_hand_written_responses():
  c = default.get_config()
  c.task.update(name='arith', pool_size=64, format_reward=0.1, min_steps=1, max_steps=2)
  c.task.update(operations='add,sub', wording='equation', start_max=12, add_max=6)
  t = tasks.make_task(c.task)
  assert all(q.startswith('What is ') for q, _ in t.problems)
  cases = [  # (response, reward's check, format-agnostic check)
    ('7 + 5 = 12\n#### 12', True, True),
    ('So the answer is \\boxed{12}.', True, True),
    ('7 + 5 = 12', False, True),  # right number, no '####': only the agnostic check
    ('The answer is 12 apples.', False, True),
    ('#### 12\nHope that helps!', True, False),  # the last line has no number
    ('12\nSo the answer is 13.', False, False),  # right number only on an earlier line
    ('7 + 5 = 11\n#### 11', False, False),
    ('#### 1,012', False, False),
    ('', False, False),
  ]
  for text, strict, loose in cases:
    ids = _ids(t, text)
    assert t.is_correct(ids, '12') == strict, text
    assert t.final_line_correct(ids, '12') == loose, text
    assert (t.reward(ids, '12') == 1.0) == strict, text
  assert t.final_line_correct(_ids(t, '= 1,012 coins'), '1012')
  # what follows the end of the response does not count for either check
  assert not t.final_line_correct(_ids(t, 'hmm') + _ids(t, '12'), '12')


def test_options_keep_the_split_disjoint_and_the_walk_pure():
  c = default.get_config()
  c.task.update(name='arith', pool_size=300, min_steps=1, max_steps=2, operations='add,sub')
  c.task.update(wording='equation', start_max=20, add_max=10)
  t, again = tasks.make_task(c.task), tasks.make_task(c.task)
  train_q, held_q = {q for q, _ in t.problems}, {q for q, _ in t.heldout}
  assert held_q and not train_q & held_q and len(train_q) + len(held_q) == 300
  walked = set(tasks.prompt_ids(t.prompts_for_step(0, 0, 2 * len(t.problems))))
  assert not walked & set(tasks.prompt_ids(t.heldout_prompts(len(held_q))))
  np.testing.assert_array_equal(t.heldout_prompts(9).tokens, again.heldout_prompts(9).tokens)
  for seed, step in ((0, 0), (0, 41), (3, 41)):
    a, b = t.prompts_for_step(seed, step, 6), again.prompts_for_step(seed, step, 6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.answers == b.answers
  assert t.prompts_for_step(0, 41, 6).answers != t.prompts_for_step(3, 41, 6).answers or not (
    np.array_equal(t.prompts_for_step(0, 41, 6).tokens, t.prompts_for_step(3, 41, 6).tokens)
  )

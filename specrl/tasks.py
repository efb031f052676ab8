"""Tasks with verifiable rewards, and their tokenizers.

The embedded default, ``running_sum``, is built so a few-million-parameter model learns
it on a CPU in minutes *and* its answers have long-tailed lengths (the regime
speculative decoding attacks):

  prompt   ``3+5+2+7=........`` (terms, '=', then '.' filler to a fixed width W)
  response ``3 8 0 7#7`` + EOS  (the running sum mod 10 after each term, then the answer)

The fixed-width prompt puts term i at position 2i and worked step i at W + 2i: a constant
relative offset, which rotary attention picks up quickly; only the running sum has to
be carried. Prompts are still right-padded like any other task's.

The number of terms follows a truncated power law, so the longest responses are several
times the median. Each worked step only needs the previous partial sum and the next
term, which small transformers learn quickly; the final answer is checked exactly.

Also here: a reader for jsonl math problems (``question``, numeric ``answer``) and answer
extraction (``#### 42``, ``\\boxed{42}``) for use with real models and tokenizers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence

import numpy as np

from specrl.faults import DataError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class CharTokenizer:
  """Character-level tokenizer for the synthetic tasks. ids 0..2 are PAD, BOS, EOS."""

  def __init__(self, chars: str, vocab_size: int | None = None):
    self.chars = chars
    self._id = {c: i + 3 for i, c in enumerate(chars)}
    self.vocab_size = vocab_size or (len(chars) + 3)
    if self.vocab_size < len(chars) + 3:
      raise ValueError(f'vocab_size {self.vocab_size} < {len(chars) + 3} needed')
    self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID

  def encode(self, text: str) -> list[int]:
    try:
      return [self._id[c] for c in text]
    except KeyError as e:
      raise ValueError(f'character {e.args[0]!r} not in tokenizer alphabet {self.chars!r}') from e

  def decode(self, ids: Sequence[int]) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i >= 3 and i - 3 < len(self.chars):
        out.append(self.chars[i - 3])
    return ''.join(out)


@dataclasses.dataclass
class PromptBatch:
  """A batch of prompts with their verifiable ground truth.

  tokens: int32 [N, P] right-padded with PAD; lengths: int32 [N]; answers: list of str.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  answers: list


class RunningSumTask:
  """Synthetic verifiable task with long-tailed response lengths (see module doc)."""

  name = 'running_sum'

  def __init__(self, min_terms: int = 2, max_terms: int = 16, tail_exponent: float = 1.3):
    if not 1 <= min_terms <= max_terms:
      raise ValueError(f'task needs 1 <= min_terms <= max_terms, got {min_terms}, {max_terms}')
    if tail_exponent <= 0:
      raise ValueError(f'task.tail_exponent must be > 0, got {tail_exponent}')
    self.min_terms, self.max_terms = min_terms, max_terms
    n = np.arange(min_terms, max_terms + 1)
    w = n.astype(np.float64) ** (-tail_exponent)
    self._term_counts, self._term_probs = n, w / w.sum()
    self.tokenizer = CharTokenizer('0123456789+= #.', vocab_size=32)

  @property
  def max_prompt_len(self) -> int:
    return 2 * self.max_terms  # 'a+b+...=' : 2 chars per term, then filler

  def _prompt_text(self, terms) -> str:
    return ('+'.join(str(t) for t in terms) + '=').ljust(self.max_prompt_len, '.')

  @property
  def max_response_len(self) -> int:
    return 2 * self.max_terms + 2  # 'd d ... d#d' + EOS

  def _problem(self, rng: np.random.Generator):
    n = int(rng.choice(self._term_counts, p=self._term_probs))
    terms = rng.integers(0, 10, size=n)
    return terms

  @staticmethod
  def solution(terms) -> str:
    sums = np.cumsum(terms) % 10
    return ' '.join(str(s) for s in sums) + f'#{sums[-1]}'

  def sample_prompts(self, rng: np.random.Generator, n: int) -> PromptBatch:
    problems = [self._problem(rng) for _ in range(n)]
    texts = [self._prompt_text(p) for p in problems]
    answers = [''.join(str(t) for t in p) for p in problems]  # the terms: verifiable truth
    return _pack(self.tokenizer, texts, answers, self.max_prompt_len)

  def sample_sft(self, rng: np.random.Generator, n: int, seq_len: int):
    """Teacher-forcing batch of worked solutions: (tokens [n, S], loss_mask [n, S]).

    loss_mask[t] = 1 where token t is a response token (predicted from t-1).
    """
    toks = np.full((n, seq_len), PAD_ID, np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    tok = self.tokenizer
    for i in range(n):
      terms = self._problem(rng)
      prompt = tok.encode(self._prompt_text(terms))
      resp = tok.encode(self.solution(terms)) + [EOS_ID]
      seq = (prompt + resp)[:seq_len]
      toks[i, : len(seq)] = seq
      mask[i, len(prompt) : len(seq)] = 1.0
    return toks, mask

  def reward(self, response_ids: Sequence[int], answer: str) -> float:
    """``answer`` is the problem's terms as digits ('3527').

    1.0 for a correct final answer (after EOS-terminated, well-formed work); otherwise
    partial credit 0.5 x (fraction of worked steps correct before the first mistake).

    The partial credit is still verifiable (the ground-truth steps are recomputed from
    the prompt) and gives GRPO a denser signal than exact match alone. ``accuracy``
    (exact final answer) is reported separately by :meth:`is_correct`.
    """
    ids = [int(i) for i in response_ids]
    if self.is_correct(ids, answer):
      return 1.0
    terms = [int(c) for c in answer]
    steps = self.tokenizer.decode(ids).split('#')[0].split(' ')
    truth = [str(s) for s in np.cumsum(terms) % 10]
    good = 0
    for got, want in zip(steps, truth, strict=False):
      if got != want:
        break
      good += 1
    return 0.5 * good / len(truth)

  def is_correct(self, response_ids: Sequence[int], answer: str) -> bool:
    ids = [int(i) for i in response_ids]
    if EOS_ID not in ids:
      return False
    m = re.fullmatch(r'[0-9 ]*#(\d+)', self.tokenizer.decode(ids))
    return m is not None and m.group(1) == str(sum(int(c) for c in answer) % 10)


def _pack(tokenizer, texts, answers, max_len) -> PromptBatch:
  ids = [tokenizer.encode(t) for t in texts]
  longest = max(len(x) for x in ids)
  if longest > max_len:
    raise ValueError(f'prompt of {longest} tokens exceeds max prompt length {max_len}')
  toks = np.full((len(ids), max_len), tokenizer.pad_id, np.int32)
  for i, x in enumerate(ids):
    toks[i, : len(x)] = x
  return PromptBatch(toks, np.array([len(x) for x in ids], np.int32), list(answers))


# ----------------------------------------------------------------------------- jsonl math

_BOXED = re.compile(r'\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}')
_HASHES = re.compile(r'####\s*([^\n]+)')
_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?(?:/\d+)?')


def extract_answer(text: str) -> str | None:
  """Final answer from a model response: last ``\\boxed{..}``, else ``#### ..``, else None."""
  boxed = _BOXED.findall(text)
  if boxed:
    return boxed[-1].strip()
  m = _HASHES.findall(text)
  if m:
    return m[-1].strip()
  return None


def _to_number(s: str) -> float | None:
  s = s.strip().replace('$', '').replace(',', '').rstrip('.')
  m = _NUMBER.fullmatch(s) or _NUMBER.search(s)
  if m is None:
    return None
  v = m.group(0).replace(',', '')
  try:
    if '/' in v:
      a, b = v.split('/')
      return float(a) / float(b)
    return float(v)
  except (ValueError, ZeroDivisionError):
    return None


def answers_match(predicted: str | None, reference: str) -> bool:
  """Numeric comparison (commas, $ and fractions tolerated); exact string otherwise."""
  if predicted is None:
    return False
  a, b = _to_number(predicted), _to_number(reference)
  if a is not None and b is not None:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
  return predicted.strip() == reference.strip()


def read_math_jsonl(path: str, question_key: str = 'question', answer_key: str = 'answer'):
  """Reads ``{"question": ..., "answer": ...}`` lines. GSM8K-style answers ('... #### 42')
  are reduced to their final value. Returns a list of (question, answer) string pairs.

  Bad input is a one-line :class:`~specrl.faults.DataError` naming the file (and line):
  a missing or empty file, a malformed line, a line without the keys.
  """
  if not path or not os.path.isfile(path):
    raise DataError(f'task file {path!r} not found (config.task.path)')
  out = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{path}:{lineno}: not valid JSON ({e.msg})') from e
      if not isinstance(rec, dict):
        raise DataError(f'{path}:{lineno}: expected a JSON object, got {type(rec).__name__}')
      for key in (question_key, answer_key):
        if key not in rec:
          raise DataError(f'{path}:{lineno}: missing key {key!r}')
      ans = str(rec[answer_key])
      ex = extract_answer(ans)
      out.append((str(rec[question_key]), ex if ex is not None else ans.strip()))
  if not out:
    raise DataError(f'{path}: empty task file (no problems found)')
  return out


class MathJsonlTask:
  """Problems from a jsonl file, rewarded by answer extraction; any tokenizer with
  encode/decode/eos_id/pad_id (e.g. ``specrl.checkpoints.hf.load_tokenizer``)."""

  name = 'math_jsonl'

  def __init__(
    self,
    path: str,
    tokenizer,
    max_prompt_len: int,
    max_response_len: int,
    prompt_template: str = '{question}\n',
  ):
    self.problems = read_math_jsonl(path)
    self.tokenizer = tokenizer
    self.max_prompt_len, self.max_response_len = max_prompt_len, max_response_len
    self.template = prompt_template

  def sample_prompts(self, rng: np.random.Generator, n: int) -> PromptBatch:
    idx = rng.integers(0, len(self.problems), size=n)
    texts = [self.template.format(question=self.problems[i][0]) for i in idx]
    answers = [self.problems[i][1] for i in idx]
    return _pack(self.tokenizer, texts, answers, self.max_prompt_len)

  def reward(self, response_ids: Sequence[int], answer: str) -> float:
    ids = [int(i) for i in response_ids]
    if self.tokenizer.eos_id in ids:
      ids = ids[: ids.index(self.tokenizer.eos_id)]
    return 1.0 if answers_match(extract_answer(self.tokenizer.decode(ids)), answer) else 0.0

  def is_correct(self, response_ids: Sequence[int], answer: str) -> bool:
    return self.reward(response_ids, answer) >= 1.0


def make_task(cfg):
  """Task from the ``task`` config section."""
  if cfg.name == 'running_sum':
    return RunningSumTask(cfg.min_terms, cfg.max_terms, cfg.tail_exponent)
  if cfg.name == 'math_jsonl':
    from specrl.checkpoints import hf

    return MathJsonlTask(
      cfg.path, hf.load_tokenizer(cfg.tokenizer_path), cfg.max_prompt_len, cfg.max_response_len
    )
  raise ValueError(f"task.name must be 'running_sum' or 'math_jsonl', got {cfg.name!r}")

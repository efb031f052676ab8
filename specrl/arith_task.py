"""Arithmetic word problems from templates: a verifiable task a small instruct model can learn.

A problem is a short story about one person's collection of things, changed by one to four
operations (buy / find / receive more, give away / lose / use some, give away half, double
or triple), then a question about the final count::

  Mia has 12 marbles. She finds 5 more. Then she gives away 3.
  How many marbles does Mia have now? End your answer with '#### <number>'.

Answer ``14``; worked solution ``12 + 5 = 17\\n17 - 3 = 14\\n#### 14``. The number of
operations follows a truncated power law (``tail_exponent``), so most problems are short
and a tail needs four steps: answer lengths vary and have a tail, the regime speculative
decoding attacks.

:func:`generate_pool` draws a **fixed pool** of distinct problems from its own seed (the same
pool in every run, whatever the run's seed). The held-out split and the epoch walk over the
training problems live in :class:`specrl.tasks.ArithTask`. Pure Python + NumPy; no tokenizer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

POOL_SEED = 20260101  # default seed of the fixed pool (task.pool_seed)
INSTRUCTION = "End your answer with '#### <number>'."

NAMES = (
  ('Mia', 'She', 'her'),
  ('Noah', 'He', 'his'),
  ('Ava', 'She', 'her'),
  ('Liam', 'He', 'his'),
  ('Zoe', 'She', 'her'),
  ('Omar', 'He', 'his'),
  ('Lena', 'She', 'her'),
  ('Ravi', 'He', 'his'),
)
ITEMS = ('apples', 'marbles', 'stickers', 'coins', 'books', 'pencils', 'cookies', 'cards')
ADD = ('{p} buys {x} more.', '{p} finds {x} more.', 'A friend gives {o} {x} more.')
SUB = ('{p} gives away {x}.', '{p} loses {x}.', '{p} uses {x}.')
HALF = '{p} gives half of them to a friend.'
MUL = {2: '{p} doubles {poss} {item}.', 3: '{p} triples {poss} {item}.'}


@dataclasses.dataclass(frozen=True)
class ArithProblem:
  """One word problem: ``question`` (with the answer-format instruction), ``answer`` (the
  final count as a decimal string) and ``solution`` (one worked line per operation, then
  ``#### answer``; a teacher-forcing target)."""

  question: str
  answer: str
  solution: str
  num_steps: int


def _object_pronoun(subject: str) -> str:
  return 'her' if subject == 'She' else 'him'


OPERATIONS = ('add', 'sub', 'half', 'mul')
WORDINGS = ('story', 'equation')
# task.instruction: the answer-format sentence that ends every question
INSTRUCTIONS = {
  'hashes': INSTRUCTION,
  'brief': "Answer briefly. End your answer with '#### <number>'.",
}


@dataclasses.dataclass(frozen=True)
class ProblemOptions:
  """What a problem may contain (the ``task`` config's arith fields).

  start_max: the first count is drawn from ``2 .. start_max - 1``; add_max: an added amount
  from ``1 .. add_max - 1``; mul_max: the largest count that may be doubled / tripled;
  operations: the allowed operations (a subset of :data:`OPERATIONS`; 'add' is always
  possible, the others only where they keep the count a non-negative integer); wording:
  'story' (a person's collection, the default) or 'equation' (``What is (12 + 5) - 3?``);
  instruction: a key of :data:`INSTRUCTIONS`. The defaults reproduce the original pool
  exactly."""

  start_max: int = 30
  add_max: int = 20
  mul_max: int = 20
  operations: tuple[str, ...] = OPERATIONS
  wording: str = 'story'
  instruction: str = 'hashes'

  def __post_init__(self):
    ops = tuple(self.operations)
    if not ops or any(o not in OPERATIONS for o in ops):
      raise ValueError(f'task.operations must be a non-empty subset of {OPERATIONS}, got {ops}')
    if 'add' not in ops:
      raise ValueError(f"task.operations must include 'add' (always possible), got {ops}")
    if self.wording not in WORDINGS:
      raise ValueError(f'task.wording must be one of {WORDINGS}, got {self.wording!r}')
    if self.instruction not in INSTRUCTIONS:
      raise ValueError(
        f'task.instruction must be one of {tuple(INSTRUCTIONS)}, got {self.instruction!r}'
      )
    if self.start_max < 3 or self.add_max < 2 or self.mul_max < 0:
      raise ValueError(
        'task.start_max >= 3, task.add_max >= 2 and task.mul_max >= 0 needed, got '
        f'{self.start_max}, {self.add_max}, {self.mul_max}'
      )


DEFAULT_OPTIONS = ProblemOptions()


def parse_operations(spec) -> tuple[str, ...]:
  """``'add,sub'`` (or a sequence) -> ``('add', 'sub')``."""
  if isinstance(spec, str):
    return tuple(o.strip() for o in spec.split(',') if o.strip())
  return tuple(spec)


def make_problem(
  rng: np.random.Generator, num_steps: int, opts: ProblemOptions = ProblemOptions()
) -> ArithProblem:
  """A random problem with ``num_steps`` operations; the count stays a non-negative
  integer (subtract at most what is there, halve only even counts, multiply small ones)."""
  name, subj, poss = NAMES[int(rng.integers(len(NAMES)))]
  item = ITEMS[int(rng.integers(len(ITEMS)))]
  count = int(rng.integers(2, opts.start_max))
  sentences = [f'{name} has {count} {item}.']
  expr = str(count)
  work = []
  for i in range(num_steps):
    options = ['add']
    if count >= 2 and 'sub' in opts.operations:
      options.append('sub')
    if count % 2 == 0 and count >= 4 and 'half' in opts.operations:
      options.append('half')
    if count <= opts.mul_max and 'mul' in opts.operations:
      options.append('mul')
    op = options[int(rng.integers(len(options)))]
    if op == 'add':
      x = int(rng.integers(1, opts.add_max))
      text = ADD[int(rng.integers(len(ADD)))].format(p=subj, o=_object_pronoun(subj), x=x)
      work.append(f'{count} + {x} = {count + x}')
      expr_op = f'{expr} + {x}'
      count += x
    elif op == 'sub':
      x = int(rng.integers(1, count))
      text = SUB[int(rng.integers(len(SUB)))].format(p=subj, x=x)
      work.append(f'{count} - {x} = {count - x}')
      expr_op = f'{expr} - {x}'
      count -= x
    elif op == 'half':
      text = HALF.format(p=subj)
      work.append(f'{count} / 2 = {count // 2}')
      expr_op = f'{expr} / 2'
      count //= 2
    else:
      m = 2 + int(rng.integers(2))
      text = MUL[m].format(p=subj, poss=poss, item=item)
      work.append(f'{count} * {m} = {count * m}')
      expr_op = f'{expr} * {m}'
      count *= m
    expr = expr_op if i == num_steps - 1 else f'({expr_op})'
    sentences.append(text if i == 0 else 'Then ' + text[0].lower() + text[1:])
  instruction = INSTRUCTIONS[opts.instruction]
  if opts.wording == 'equation':
    question = f'What is {expr}? {instruction}'
  else:
    question = ' '.join(sentences) + f' How many {item} does {name} have now? {instruction}'
  solution = '\n'.join(work) + f'\n#### {count}'
  return ArithProblem(question, str(count), solution, num_steps)


def step_probabilities(min_steps: int, max_steps: int, tail_exponent: float) -> np.ndarray:
  """P(num_steps = min_steps + i) proportional to ``(min_steps + i) ** -tail_exponent``.
  [max_steps - min_steps + 1]"""
  if not 1 <= min_steps <= max_steps:
    raise ValueError(f'arith needs 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}')
  if tail_exponent < 0:
    raise ValueError(f'task.tail_exponent must be >= 0, got {tail_exponent}')
  w = np.arange(min_steps, max_steps + 1, dtype=np.float64) ** (-tail_exponent)
  return w / w.sum()


def generate_pool(
  size: int,
  seed: int = POOL_SEED,
  min_steps: int = 1,
  max_steps: int = 4,
  tail_exponent: float = 1.3,
  opts: ProblemOptions = ProblemOptions(),
) -> list[ArithProblem]:
  """``size`` distinct problems (by question text), a pure function of the arguments."""
  if size <= 0:
    raise ValueError(f'task.pool_size must be > 0, got {size}')
  probs = step_probabilities(min_steps, max_steps, tail_exponent)
  rng = np.random.default_rng(seed)
  seen, pool = set(), []
  for _ in range(20 * size):
    steps = min_steps + int(rng.choice(len(probs), p=probs))
    problem = make_problem(rng, steps, opts)
    if problem.question not in seen:
      seen.add(problem.question)
      pool.append(problem)
      if len(pool) == size:
        return pool
  raise ValueError(f'arith cannot make {size} distinct problems: lower task.pool_size')

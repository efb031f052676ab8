"""Answer scoring for the math tasks: the final answer a response states (``#### 42``,
``\\boxed{42}``), numeric comparison with a reference, and the format-agnostic check (the
right number anywhere in the response's final line) that tells a format-only gain apart
from a real one (:mod:`specrl.tasks`, :mod:`specrl.evaluation`). Pure Python."""

from __future__ import annotations

import math
import re

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


def final_line(text: str) -> str:
  """The last non-empty line of ``text`` (stripped; '' when there is none)."""
  lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
  return lines[-1] if lines else ''


def answer_in_final_line(text: str, reference: str) -> bool:
  """The format-agnostic check: some number in the last non-empty line of ``text`` equals
  ``reference`` (numerically; ``#### 14``, ``The answer is 14.``, ``= 14 apples`` and
  ``\\boxed{14}`` all pass, a right number only in an earlier line does not)."""
  ref = to_number(reference)
  if ref is None:
    return False
  for m in _NUMBER.finditer(final_line(text)):
    v = to_number(m.group(0))
    if v is not None and math.isclose(v, ref, rel_tol=1e-6, abs_tol=1e-9):
      return True
  return False


def to_number(s: str) -> float | None:
  """The number in ``s`` (``$``, commas and a trailing period dropped; ``a/b`` a
  fraction), or None."""
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
  a, b = to_number(predicted), to_number(reference)
  if a is not None and b is not None:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
  return predicted.strip() == reference.strip()

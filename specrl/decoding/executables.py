"""A process-wide bound on the compiled executables the rollout engines keep.

Why: every engine compiles per shape -- the static engine per batch size, the adaptive
engine per (bucket, strategy, k, width, batch) and its compaction / widening steps -- and
kept every executable for the life of the process, plus JAX's own caches behind them. A
long benchmark that builds many engines (or a sweep) grew without bound until XLA ran out
of memory. Here one LRU, shared by every engine in the process, holds them all: at most
``limit`` executables live (an entry made of several jitted functions counts each), the
least recently used go first, and the number evicted is reported in the engines' metrics
(``compile/evictions``; ``compile/live`` and ``compile/limit`` beside it). A limit that
fits a run's distinct shapes evicts nothing; one that does not costs recompiles, never a
wrong result (an evicted executable is rebuilt from the same function and shapes).

Keys are tuples that start with the owning engine family's token (engines made by
``AdaptiveRolloutEngine.with_config`` share one), so engines never see each other's
entries. The limit comes from ``config.rollout.max_executables`` (set by
:func:`specrl.experiment.build_experiment`); :data:`CACHE` is the process's cache.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Any

DEFAULT_LIMIT = 64
MIN_LIMIT = 3  # the static engine's prefill and finalize with one decode loop (a length bucket)


def check_limit(limit) -> int:
  """``rollout.max_executables``: an integer >= :data:`MIN_LIMIT`."""
  if not isinstance(limit, int) or isinstance(limit, bool) or limit < MIN_LIMIT:
    raise ValueError(f'rollout.max_executables must be an integer >= {MIN_LIMIT}, got {limit!r}')
  return limit


class ExecutableCache:
  """LRU of compiled executables (or tuples of jitted functions) by key, bounded by the
  total ``weight`` (executables per entry)."""

  def __init__(self, limit: int = DEFAULT_LIMIT):
    self._entries: collections.OrderedDict[Hashable, tuple[Any, int]] = collections.OrderedDict()
    self._lock = threading.Lock()  # async RL's rollout thread and the main thread share it
    self.limit = check_limit(limit)
    self.evictions = 0
    self.hits = 0
    self.misses = 0
    self.peak = 0  # the most executables ever live at once

  def set_limit(self, limit: int) -> None:
    with self._lock:
      self.limit = check_limit(limit)
      self._evict()

  @property
  def live(self) -> int:
    """Executables held now."""
    with self._lock:
      return sum(w for _, w in self._entries.values())

  def __contains__(self, key) -> bool:
    with self._lock:
      return key in self._entries

  def get(self, key: Hashable, build: Callable[[], Any], weight: int = 1):
    """The entry under ``key``, built by ``build()`` on a miss (outside the lock: builds
    compile) and made the most recent; the least recent entries go while over the limit."""
    with self._lock:
      if key in self._entries:
        self._entries.move_to_end(key)
        self.hits += 1
        return self._entries[key][0]
    value = build()
    with self._lock:
      self.misses += 1
      self._entries[key] = (value, weight)
      self._entries.move_to_end(key)
      self._evict()
    return value

  def _evict(self) -> None:
    total = sum(w for _, w in self._entries.values())
    while total > self.limit and len(self._entries) > 1:  # never the entry just built
      _, (_, w) = self._entries.popitem(last=False)
      total -= w
      self.evictions += 1
    self.peak = max(self.peak, total)

  def clear(self) -> None:
    with self._lock:
      self._entries.clear()

  def metrics(self) -> dict[str, float]:
    return {
      'compile/live': float(self.live),
      'compile/limit': float(self.limit),
      'compile/evictions': float(self.evictions),
    }


CACHE = ExecutableCache()

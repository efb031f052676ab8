"""Small helpers shared by the benchmarks: timing, argument lists, tables, the JSON line.

Conventions every benchmark here follows:

- time jitted work only after a warm-up call (the first call compiles), and block on the
  outputs (``jax.block_until_ready``) inside the timed region; report the median;
- print a human-readable table, then, as the very last line of stdout, exactly one JSON
  object with the headline figures (:func:`emit_json`), so drivers can ``tail -n 1``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from specrl import adaptive


def ints(s: str) -> list[int]:
  """``'1,4,16'`` -> ``[1, 4, 16]``."""
  return [int(x) for x in s.split(',') if x.strip()]


def floats(s: str) -> list[float]:
  """``'0.5,1'`` -> ``[0.5, 1.0]``."""
  return [float(x) for x in s.split(',') if x.strip()]


def time_call(fn: Callable, *args, **kwargs) -> float:
  """Wall seconds of one ``fn(*args, **kwargs)``, outputs blocked on."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args, **kwargs))
  return time.perf_counter() - t0


def time_calls(fn: Callable, *args, warmup: int = 1, iters: int = 5, **kwargs) -> list[float]:
  """Wall seconds of ``iters`` calls after ``warmup`` untimed ones (compilation)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args, **kwargs))
  return [time_call(fn, *args, **kwargs) for _ in range(iters)]


def median_time(fn: Callable, *args, warmup: int = 1, iters: int = 5, **kwargs) -> float:
  """Median wall seconds of ``fn(*args, **kwargs)`` (see :func:`time_calls`)."""
  return statistics.median(time_calls(fn, *args, warmup=warmup, iters=iters, **kwargs))


def interleaved_medians(
  fns: dict[Any, Callable[[], Any]], warmup: int = 1, iters: int | dict[Any, int] = 5
) -> dict[Any, float]:
  """Median wall seconds of each no-argument callable, timed round-robin.

  Calling ``a, b, c, a, b, c, ...`` rather than ``a, a, a, b, b, b, ...`` exposes every
  callable to the same background load, so ratios between them stay meaningful on a
  shared or throttling machine. ``warmup`` untimed rounds come first (compilation).
  ``iters`` may be a per-name dict: a callable with fewer calls than the longest is
  called in evenly spread rounds.
  """
  counts = {name: iters[name] if isinstance(iters, dict) else iters for name in fns}
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  rounds = max(counts.values(), default=0)
  times: dict[Any, list[float]] = {name: [] for name in fns}
  for r in range(rounds):
    for name, fn in fns.items():
      n = counts[name]
      if (r + 1) * n // rounds > r * n // rounds:
        times[name].append(time_call(fn))
  return {name: statistics.median(t) for name, t in times.items()}


def add_compile_cache_flag(ap) -> None:
  """``--compile_cache DIR`` on an argparse parser (env SPECRL_JAX_CACHE; "" = off)."""
  import tempfile

  ap.add_argument(
    '--compile_cache',
    default=os.environ.get(
      'SPECRL_JAX_CACHE', os.path.join(tempfile.gettempdir(), 'specrl_jax_cache')
    ),
    help='persistent compilation cache dir (re-runs skip compiling; "" = off)',
  )


def enable_compile_cache(path: str) -> None:
  """Persist compiled executables under ``path`` (re-runs skip compilation); '' = off."""
  if path:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def device_info() -> dict:
  """Backend, device kind and count of the default JAX backend."""
  devs = jax.devices()
  return dict(backend=jax.default_backend(), device=devs[0].device_kind, num_devices=len(devs))


def format_table(columns: Sequence[tuple[str, str]], rows: Sequence[dict]) -> str:
  """Right-aligned text table.

  ``columns``: ``(key, format)`` pairs, the key doubling as the header; the format is a
  ``format()`` spec (``'.2f'``, ``'d'``, ``''``) applied to ``row[key]``; missing or None
  values print as ``-``.
  """

  def cell(row, key, fmt):
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
      return '-'
    return format(v, fmt)

  body = [[cell(r, k, f) for k, f in columns] for r in rows]
  widths = [max([len(k)] + [len(b[i]) for b in body]) for i, (k, _) in enumerate(columns)]
  line = lambda cells: ' '.join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
  out = [line([k for k, _ in columns]), '-' * (sum(widths) + len(widths) - 1)]
  out += [line(b) for b in body]
  return '\n'.join(out)


def print_table(columns: Sequence[tuple[str, str]], rows: Sequence[dict]) -> None:
  print(format_table(columns, rows), flush=True)


def rounded(obj: Any, digits: int = 4) -> Any:
  """Round floats (to ``digits`` significant digits) throughout a JSON-like tree."""
  if isinstance(obj, float):
    if not math.isfinite(obj):
      return None
    return float(f'{obj:.{digits}g}')
  if isinstance(obj, dict):
    return {k: rounded(v, digits) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [rounded(v, digits) for v in obj]
  return obj


def emit_json(summary: dict, digits: int = 4) -> None:
  """Print ``summary`` as one compact JSON line: call it last."""
  sys.stdout.flush()
  print(json.dumps(rounded(summary, digits), separators=(',', ':')), flush=True)


def timed_generate(engine, params, toks, plen, seed: int, **kwargs) -> dict:
  """One ``engine.generate`` (static or adaptive engine; ``kwargs``: ``draft_params``,
  ``group_ids``, ``prompt_ids``) with its time and outputs.

  ``time_s`` is the engine's ``rollout/time_s`` less the compile and profiling time an
  adaptive engine reports for work done inside the call (``late``; a static engine's first
  call compiles too, so callers time only calls after a warm-up); ``wall_s`` includes it.
  Returns dict(time_s, wall_s, late, tokens, metrics, report (the adaptive engine's
  ``last_report``, else None), length [B], out (the :class:`RolloutOutput`)).
  """
  out, m = engine.generate(params, toks, plen, jax.random.key(seed), **kwargs)
  report = getattr(engine, 'last_report', None)
  extra = m.get('adaptive/compile_s', 0.0) + m.get('adaptive/profile_s', 0.0)
  return dict(
    time_s=m['rollout/time_s'] - extra,
    wall_s=m['rollout/time_s'],
    late=extra,
    tokens=m['rollout/tokens'],
    metrics=m,
    report=report,
    length=np.asarray(out.length),
    out=out,
  )


def k_summary(report) -> str:
  """'b32:plain b16:plain>k3 ...' from an adaptive report (strategies per bucket, in order
  of use); '-' without one (static engine)."""
  if report is None:
    return '-'
  return ' '.join(
    f'b{b}:' + '>'.join(adaptive.strategy_name(s) for s in ks) for b, ks in report.chosen.items()
  )


def rotated(names: Sequence, i: int) -> list:
  """``names`` rotated left by ``i``: round ``i`` of a round-robin timing calls them in
  this order, so no variant always runs first (caches warm, load drifts)."""
  names = list(names)
  if not names:
    return names
  i %= len(names)
  return names[i:] + names[:i]

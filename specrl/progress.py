"""What the user sees while the loop runs: a progress display for the warm-up and GRPO
phases (step, ETA, last metrics), and quiet startup.

On a terminal, :class:`Progress` keeps one status line up to date (rewritten with ``\\r``
every step) and prints the full log line every ``log_every`` steps above it. When the
stream is not a terminal (CI logs, notebooks, ``| tee``), it prints only plain lines, one
every ``log_every`` steps and one at the last step, never a ``\\r`` or an escape code.

ETA: the remaining steps of the current phase times the median step time of that phase,
leaving out its first step in this process (it includes compilation).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time

JAX_PROBE_LOGGERS = ('jax._src.xla_bridge',)  # logs 'Unable to initialize backend tpu' at INFO


def quiet_backend_probe() -> None:
  """Hide JAX's INFO lines about backends it probed and did not find (e.g. ``Unable to
  initialize backend 'tpu': ... libtpu.so``, printed on every CPU run once absl sets INFO).
  Warnings and errors from the same loggers still show. Call before the first
  ``jax.devices()``."""
  for name in JAX_PROBE_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)


def format_duration(seconds: float | None) -> str:
  """``75.2 -> '1m15s'``, ``4000 -> '1h06m'``, None -> '?'."""
  if seconds is None:
    return '?'
  s = int(round(max(seconds, 0.0)))
  if s < 60:
    return f'{s}s'
  if s < 3600:
    return f'{s // 60}m{s % 60:02d}s'
  return f'{s // 3600}h{(s % 3600) // 60:02d}m'


class Progress:
  """Progress of a run of ``total`` steps, the first ``sft_steps`` of them warm-up.

  ``update(step, step_time_s, line)`` after each step (``line``: the step's full log line);
  ``message(text)`` for a permanent line (e.g. validation results); ``close()`` at the end.
  ``interactive``: None = ``stream.isatty()``.
  """

  def __init__(
    self,
    total: int,
    sft_steps: int,
    log_every: int,
    stream=None,
    interactive: bool | None = None,
  ):
    self.total, self.sft_steps, self.log_every = total, sft_steps, max(1, log_every)
    self.stream = stream if stream is not None else sys.stdout
    if interactive is None:
      isatty = getattr(self.stream, 'isatty', None)
      interactive = bool(isatty and isatty())
    self.interactive = interactive
    self._times: dict[str, list[float]] = {'warm-up': [], 'GRPO': []}
    self._status_shown = False
    self._last_status = ''
    self._t0 = time.perf_counter()

  def phase(self, step: int) -> str:
    return 'warm-up' if step < self.sft_steps else 'GRPO'

  def eta(self, step: int) -> float | None:
    """Seconds left in the phase of ``step`` (after ``step`` is done); None until a
    post-compile step of the phase was timed."""
    times = self._times[self.phase(step)][1:]  # the first one compiled
    if not times:
      return None
    end = self.sft_steps if step < self.sft_steps else self.total
    return float(sorted(times)[len(times) // 2]) * (end - step - 1)

  def _prefix(self, step: int) -> str:
    phase = self.phase(step)
    eta = self.eta(step)
    done = step + 1 in (self.sft_steps, self.total)
    return f'{phase} {step + 1}/{self.total} ' + ('done' if done else f'ETA {format_duration(eta)}')

  def _write(self, text: str) -> None:
    self.stream.write(text)
    self.stream.flush()

  def _clear_status(self) -> None:
    if self._status_shown:
      self._write('\r\x1b[K')
      self._status_shown = False

  def _show_status(self, text: str) -> None:
    width = shutil.get_terminal_size((100, 20)).columns - 1
    self._last_status = text[:width]
    self._write('\r\x1b[K' + self._last_status)
    self._status_shown = True

  def update(self, step: int, step_time_s: float, line: str) -> None:
    self._times[self.phase(step)].append(step_time_s)
    periodic = step % self.log_every == 0 or step == self.total - 1
    if self.interactive:
      if periodic:
        self._clear_status()
        self._write(f'{line}  ({self._prefix(step)})\n')
      frac = (step + 1) / max(self.total, 1)
      bar = '#' * int(20 * frac) + '-' * (20 - int(20 * frac))
      self._show_status(f'[{bar}] {self._prefix(step)} | {line}')
    elif periodic:
      self._write(f'{line}  ({self._prefix(step)})\n')

  def message(self, text: str) -> None:
    self._clear_status()
    self._write(text + '\n')
    if self.interactive and self._last_status:
      self._show_status(self._last_status)

  def close(self) -> None:
    if self._status_shown:
      self._write('\n')
      self._status_shown = False


def step_line(step: int, total: int, m: dict) -> str:
  """The progress line of one loop step (metrics dict ``m`` of :func:`specrl.train.run_step`)."""
  if m.get('phase', 0) == 0:
    return f'[{step + 1}/{total}] sft loss {m["sft_loss"]:.4f}  {m["step_time_s"]:.2f}s'
  line = (
    f'[{step + 1}/{total}] reward {m["reward"]:.3f} acc {m["accuracy"]:.3f} '
    f'len {m["response_len_mean"]:.1f}/{m["response_len_max"]} '
    f'rollout {m["rollout/time_s"]:.2f}s ({m["rollout/tokens_per_s"]:.0f} tok/s) '
    f'train {m["train/time_s"]:.2f}s'
  )
  if m.get('async/staleness'):
    line += f' (rollout {int(m["async/staleness"])} update(s) old)'
  if 'spec/alpha' in m:
    line += f' | alpha {m["spec/alpha"]:.2f} tok/pass {m["spec/tokens_per_pass"]:.2f}'
  if 'spec/draft_time_est_s' in m:
    line += f' draft/verify {m["spec/draft_time_est_s"]:.2f}/{m["spec/verify_time_est_s"]:.2f}s'
  if 'adaptive/chunks' in m:
    ks = ' '.join(
      f'{k.split("/")[-1]}:{"plain" if v == 0 else f"k{v}"}'
      for k, v in m.items()
      if k.startswith('adaptive/k/')
    )
    line += (
      f' | adaptive {m["adaptive/compactions"]} compactions, spec '
      f'{100 * m["adaptive/spec_time_frac"]:.0f}% of decode, {ks}'
    )
    if m.get('adaptive/compile_s', 0) > 0:
      line += f' (compiled {m["adaptive/compile_s"]:.1f}s)'
  return line

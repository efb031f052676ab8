"""The eagle head's ``spot`` mode (TLT's scheme): head updates in the rollout's long tail.

TLT trains its drafter while the rollout decodes its last stragglers (when a large batch
has shrunk to a few rows and the accelerator is mostly idle) and hands the new drafter over
at the next weight sync. Here:

- *Data, no extra forward*: the GRPO step already runs the policy's forward for its loss;
  :func:`spot_step` asks it for the final-norm hidden states (``return_hidden``) and pushes
  (hidden [B, S-1, D], tokens [B, S], response mask [B, S]) into :class:`SpotBuffer`, a
  ring of the last ``spot_buffer_steps`` = N GRPO steps on device.
- *Where the buffer lives*: in ``HeadState.buffer``, i.e. ``TrainState.drafter``, so the
  orbax checkpoint writes it as arrays and the donated GRPO step writes a step in place.
  Not in the JSON host state: it is ``N * B * (W-1) * D`` activations (e.g. 4 x 256 x 1024
  x 576 bf16 = 1.2 GB for SmolLM2-135M), which JSON would hold as lists of floats. Its size
  is reported as ``head/spot_buffer_bytes``. W = ``min(seq_len,
  drafter.eagle.spot_max_len)`` (default 2048): a row keeps its first W positions, so a 32k
  token budget does not make the ring 16x larger (the longer answers' ends are not trained
  on: the head learns from the starts of the step's answers).
- *When*: :class:`SpotScheduler`. The adaptive engine calls ``tail_hook(params, bucket)``
  before every chunk; once the batch is compacted to ``bucket <= spot_bucket`` the hook runs
  :func:`spot_update` (one head step on a random minibatch of the buffer) until this RL
  step's ``spot_budget_s`` seconds or ``spot_max_updates`` updates (0 = budget only) are
  used up. The static engine has no buckets: the updates run right after the rollout.
  Several processes: whether the budget allows one more update is process 0's call
  (:func:`specrl.multihost.decide`), so every process runs the same updates.
- *Hand-over*: updates go to a pending head; the rollout in flight keeps the head it
  started with. The GRPO step's wrapper (:func:`specrl.drafters.eagle_train.wrap_grpo`)
  puts the pending head into ``TrainState.drafter`` and the drafter: the rollout of step
  r uses the head after the updates made during (or right after) rollout r - 1, on the
  hidden states of GRPO steps <= r - 2 (r - 1's are pushed by the step that follows).
- *RNG*: update u draws its minibatch from ``fold_in(key, u)``, u = ``HeadState.step``
  (checkpointed), so there is no RNG state to save and a resumed run draws the same
  minibatches: with ``spot_max_updates`` > 0 and a budget it never reaches, resume is exact.
- *Cost*: on one device the updates run serially with decoding: their time is ADDED to the
  RL step (``time/head_spot_s``, logged by the train loop as ``train/time/head_spot_s``),
  never hidden; the adaptive engine keeps it out of its own timings
  (``adaptive/tail_hook_s``). TLT hides it on devices the tail leaves idle; not done here.

This module knows nothing of how one head update is computed: :class:`SpotScheduler` gets
``update_fn`` (:func:`specrl.drafters.eagle_train.head_update`, partially applied).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from specrl import multihost as mh


@flax.struct.dataclass
class SpotBuffer:
  """The last N GRPO steps' head-training data (a ring: step i in slot ``i % N``)."""

  hidden: jax.Array  # [N, B, S-1, D] the policy's final-norm hidden states (stop-gradient)
  tokens: jax.Array  # int32 [N, B, S]
  mask: jax.Array  # f32 [N, B, S] 1 at response tokens
  pushes: jax.Array  # int32 [] GRPO steps pushed so far


def init_buffer(steps: int, batch: int, seq_len: int, d_model: int, dtype) -> SpotBuffer:
  """An empty ring of ``steps`` GRPO batches of ``batch`` rows (zeros; ``pushes`` = 0)."""
  return SpotBuffer(
    hidden=jnp.zeros((steps, batch, seq_len - 1, d_model), dtype),
    tokens=jnp.zeros((steps, batch, seq_len), jnp.int32),
    mask=jnp.zeros((steps, batch, seq_len), jnp.float32),
    pushes=jnp.zeros((), jnp.int32),
  )


def buffer_bytes(buf: SpotBuffer) -> int:
  """Device memory the buffer holds (all N slots: allocated up front)."""
  return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(buf)))


def buffer_len(seq_len: int, max_len: int) -> int:
  """Positions per buffered row: ``min(seq_len, max_len)`` (``max_len`` 0: ``seq_len``).
  ``drafter.eagle.spot_max_len`` keeps the ring's size independent of the token budget."""
  return min(seq_len, max_len) if max_len else seq_len


def push(buf: SpotBuffer, hidden, tokens, mask) -> SpotBuffer:
  """Write one GRPO step (hidden [B, S-1, D], tokens [B, S], mask [B, S]) into the ring's
  next slot, overwriting the oldest once full. Pure (in place under donation). A batch
  trimmed to fewer positions than the buffer's (``rl.trim_length``) is zero-padded (mask 0
  there, so the padding is never a training target); a longer one keeps its first
  positions (``drafter.eagle.spot_max_len``: the head trains on the answers' starts)."""
  slot = buf.pushes % buf.tokens.shape[0]

  def put(a, x):
    x = x[tuple(slice(0, n) for n in a.shape[1:])]  # longer than the buffer: its start
    pad = [(0, n - m) for n, m in zip(a.shape[1:], x.shape, strict=True)]
    x = jnp.pad(x, pad) if any(p for _, p in pad) else x
    return jax.lax.dynamic_update_index_in_dim(a, x.astype(a.dtype), slot, 0)

  return SpotBuffer(
    put(buf.hidden, hidden), put(buf.tokens, tokens), put(buf.mask, mask), buf.pushes + 1
  )


def sample(buf: SpotBuffer, key, rows: int):
  """A random minibatch: ``rows`` distinct rows of one random filled slot (slots fill in
  order, so the filled ones are ``0 .. min(pushes, N) - 1``; needs ``pushes`` >= 1).
  Returns (tokens [rows, S], hidden [rows, S-1, D], mask [rows, S])."""
  k_slot, k_rows = jax.random.split(key)
  filled = jnp.minimum(buf.pushes, buf.tokens.shape[0])
  slot = jax.random.randint(k_slot, (), 0, filled)
  idx = jax.random.permutation(k_rows, buf.tokens.shape[1])[:rows]

  def take(a):
    return jnp.take(jax.lax.dynamic_index_in_dim(a, slot, 0, keepdims=False), idx, axis=0)

  return take(buf.tokens), take(buf.hidden), take(buf.mask)


def spot_update(core, policy_params, vocab_ids, buf: SpotBuffer, key, *, rows, update_fn):
  """One head update on the minibatch of update ``core.step`` (``fold_in(key, step)``).
  ``core``: the ``HeadState`` without its buffer; ``update_fn(core, policy_params,
  vocab_ids, tokens, hidden, mask) -> (core, metrics)``. Pure."""
  tokens, hidden, mask = sample(buf, jax.random.fold_in(key, core.step), rows)
  return update_fn(core, policy_params, vocab_ids, tokens, hidden, mask)


def spot_step(state, batch: dict, *, step_fn):
  """The GRPO step of mode ``spot``: ``step_fn(state, batch, return_hidden=True)``
  (:func:`specrl.rl.train_step`; the policy's update is the plain step's computation, to
  float rounding: :func:`specrl.drafters.eagle_train.cotrain_step`),
  then the loss forward's hidden states, the batch's tokens and response mask are pushed
  into ``state.drafter.buffer``. The head itself is not touched. Returns (state, metrics)."""
  new_state, metrics, hidden = step_fn(state, batch, return_hidden=True)
  hs = new_state.drafter
  buf = push(hs.buffer, hidden, batch['tokens'], batch['response_mask'])
  return new_state.replace(drafter=hs.replace(buffer=buf)), metrics


def _head_inputs(policy_params, like: jax.Array):
  """The policy params the head update reads (all but the layers), on ``like``'s devices
  (a rollout on other devices than the train state: replicated copies)."""
  pp = {k: v for k, v in policy_params.items() if k != 'layers'}
  devices = like.sharding.device_set
  on = lambda x: not isinstance(x, jax.Array) or x.sharding.device_set == devices  # noqa: E731
  if all(on(x) for x in jax.tree.leaves(pp)):  # host arrays: jit places them
    return pp
  mesh = getattr(like.sharding, 'mesh', None)
  sh = (
    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if mesh is not None
    else like.sharding
  )
  return jax.device_put(pp, sh)


class SpotScheduler:
  """Runs a run's ``spot`` head updates and hands them over (see the module docstring).

  ``trainer``: the :class:`specrl.drafters.eagle_train.HeadTrainer` (``trainer.hstate`` is
  the mirror of ``TrainState.drafter``: head + buffer; ``trainer.drafter.vocab_ids``).
  ``update_fn``: one head step (see :func:`spot_update`); ``key``: the minibatch key;
  ``rows``: minibatch rows. Per RL step (a *window*, closed by :meth:`consume`): at most
  ``spot_max_updates`` updates (if > 0) while under ``spot_budget_s`` seconds (checked
  before each update, so the last one may run over; the first call's compile counts)."""

  def __init__(self, trainer, update_fn, key, rows: int):
    self.trainer, self.ecfg, self.key, self.rows = trainer, trainer.drafter.ecfg, key, rows
    self._update = jax.jit(functools.partial(spot_update, rows=rows, update_fn=update_fn))
    self.pending = None  # HeadState (no buffer) after this window's updates, or None
    self.armed = False  # whether tail_hook may update (set per GRPO rollout)
    self.updates, self.seconds, self.last = 0, 0.0, {}

  def arm(self) -> None:
    """The next rollout is a GRPO rollout: its tail may run head updates (evaluation
    rollouts through the same engine never do)."""
    self.armed = True

  def tail_hook(self, params, bucket: int) -> None:
    """The adaptive engine's hook (before every chunk; ``params``: the rollout's)."""
    if self.armed and bucket <= self.ecfg.spot_bucket:
      self.run(params)

  def _left(self, t0: float) -> bool:
    e = self.ecfg
    if e.spot_max_updates and self.updates >= e.spot_max_updates:
      return False
    # wall-clock: process 0 decides, every process follows (no-op with one process)
    return mh.decide(
      'the eagle spot budget', self.seconds + (time.perf_counter() - t0) < e.spot_budget_s
    )

  def run(self, params) -> int:
    """Head updates on the buffer until this window's budget or cap is used up; the result
    stays pending (the rollout in flight keeps its head). ``params``: the policy params
    whose embedding / LM head the loss reads (the rollout's). Returns updates done now."""
    t0, done = time.perf_counter(), 0
    buf = self.trainer.hstate.buffer
    if not self._left(t0) or int(buf.pushes) == 0:  # nothing to learn from before GRPO
      return 0
    core = self.pending if self.pending is not None else self.trainer.hstate.replace(buffer=None)
    pp = _head_inputs(params, buf.tokens)
    vocab_ids = self.trainer.drafter.vocab_ids
    while self._left(t0):
      core, m = self._update(core, pp, vocab_ids, buf, self.key)
      self.last = jax.device_get(m)  # waits: the budget is wall-clock
      self.updates, done = self.updates + 1, done + 1
    self.pending = core
    self.seconds += time.perf_counter() - t0
    return done

  def consume(self) -> tuple[Any, dict]:
    """Close the window: (pending head or None, its metrics); disarms. The GRPO step's
    wrapper calls it, so what rollout r's tail learned is the head of rollout r + 1."""
    buf = self.trainer.hstate.buffer
    m = {
      'head/spot_updates': float(self.updates),
      'time/head_spot_s': float(self.seconds),
      'head/spot_buffer_bytes': float(buffer_bytes(buf)),
      'head/loss': float('nan'),
    }
    m.update({k: float(v) for k, v in self.last.items()})
    core, self.pending, self.armed = self.pending, None, False
    self.updates, self.seconds, self.last = 0, 0.0, {}
    return core, m

"""Will a GRPO train step fit: its bytes estimated from shapes against device memory.

One job: refuse, before anything compiles, a configuration that cannot fit, naming the
knob that cuts the largest part (``rl.attention_impl``, ``rl.remat``, ``rl.micro_batch``,
``rollout.max_new_tokens``). An estimate, not a measurement: ``bench/train_memory.py``
compares it with XLA's compiled memory analysis.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from specrl import faults
from specrl import model as model_lib
from specrl.rl import RLConfig, logprob_chunk, micro_batches


class TrainDoesNotFit(faults.FatalError, ValueError):
  """A GRPO step that cannot fit the device: a configuration mistake, so one line from
  ``main.py`` (a ValueError too, for callers that catch config errors)."""


def estimate_train_bytes(
  cfg: model_lib.ModelConfig, rl: RLConfig, batch: int, seq_len: int, n_params: int
) -> dict:
  """Estimated peak bytes of one :func:`specrl.rl.train_step` on ``batch`` rows of ``seq_len``
  tokens, by part (an estimate from shapes, not a measurement: ``bench/train_memory.py``
  compares it with XLA's compiled memory analysis):

  'state': params, gradients, Adam's two moments, the guarded update's new params and
  moments (+ the reference params with a KL term, + an f32 gradient sum with micro-batches);
  'layers': the activations the backward pass keeps per layer for one micro-batch (one
  [rows, S, D] residual per layer with ``rl.remat``, every intermediate without); 'attention':
  the attention's scores and probabilities ([rows, H, S, S] f32 per layer for 'full' and
  'xla' -- the cuDNN kernel on GPU needs none, which this does not model -- one query block's
  [rows, H, block, S] at a time for 'blocked', per-row statistics and the q / k / v
  copies of the head-repeated layout for 'pallas'); 'logits': the chunked LM head's working set.
  """
  rows = batch // rl.num_minibatches
  m = rows // micro_batches(rows, rl)
  c = jnp.dtype(cfg.cdtype).itemsize
  s, d, f, h, kh, dh = seq_len, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  p = n_params * jnp.dtype(cfg.pdtype).itemsize
  state = p * 6 + (p if rl.kl_coef > 0 else 0) + (n_params * 4 if m < rows else 0)
  per_layer = m * s * (5 * d + 2 * h * dh + 2 * kh * dh + 3 * f) * c
  if rl.attention_impl == 'blocked':
    attn_saved, attn_work = 0, 3 * m * h * min(rl.attention_block, s) * s * 4
  elif rl.attention_impl == 'pallas':  # fused kernels: per-row softmax statistics only
    attn_saved, attn_work = 2 * m * h * s * 4, 3 * m * h * s * dh * c
  else:
    attn_saved, attn_work = 2 * m * h * s * s * 4 + m * s * s, 0
  if rl.remat:  # one residual per layer kept; one layer's intermediates live at a time
    layers = cfg.n_layers * m * s * d * c + per_layer
    attention = attn_saved + attn_work
  else:
    layers = cfg.n_layers * per_layer
    attention = cfg.n_layers * attn_saved + attn_work
  chunk = logprob_chunk(m, s - 1, cfg.vocab_size)
  logits = 4 * m * chunk * cfg.vocab_size * 4 + 2 * m * s * d * 4  # + hidden, its gradient
  return {'state': state, 'layers': layers, 'attention': attention, 'logits': logits}


def device_memory_bytes(device=None) -> int:
  """The memory one train step may use: the accelerator's ``bytes_limit``, or on CPU the
  machine's physical memory."""
  device = device or jax.devices()[0]
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def check_train_fits(
  cfg: model_lib.ModelConfig,
  rl: RLConfig,
  batch: int,
  seq_len: int,
  n_params: int,
  memory_bytes: int | None = None,
) -> dict:
  """Refuse, before anything compiles, a GRPO step whose :func:`estimate_train_bytes` at
  the rollout budget ``seq_len`` (a batch trimmed shorter needs less) exceeds
  ``memory_bytes`` (default :func:`device_memory_bytes`); the message names the knob that
  cuts the largest part. Returns the estimate."""
  est = estimate_train_bytes(cfg, rl, batch, seq_len, n_params)
  limit = device_memory_bytes() if memory_bytes is None else memory_bytes
  total = sum(est.values())
  if total <= limit:
    return est
  gb = lambda x: f'{x / 2**30:.1f} GB'  # noqa: E731
  parts = ', '.join(f'{k} {gb(v)}' for k, v in est.items())
  rows = batch // rl.num_minibatches
  m = rows // micro_batches(rows, rl)
  bounded_attention = rl.attention_impl in ('blocked', 'pallas')
  if est['attention'] >= max(est['layers'], est['logits']) and not bounded_attention:
    fix = f"set rl.attention_impl='blocked' (now {rl.attention_impl!r})"
  elif est['layers'] >= est['logits'] and not rl.remat:
    fix = 'set rl.remat=True'
  elif m > 1:
    now = f'now {m}' if rl.micro_batch else f'now 0: the whole minibatch of {m}'
    fix = f'set a smaller rl.micro_batch (rows per forward/backward, {now})'
  else:
    fix = 'lower rollout.max_new_tokens (the sequence budget) or use a larger device'
  raise TrainDoesNotFit(
    f'the GRPO train step at {seq_len} tokens x {m} rows per forward needs an estimated '
    f'{gb(total)} ({parts}), more than the {gb(limit)} of device memory: {fix}'
  )

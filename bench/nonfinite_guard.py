"""Overhead of the non-finite guard on one GRPO train step (CPU or accelerator).

The guard (:func:`specrl.rl.guarded_update`) adds, per optimizer update, a finiteness check
of the loss, the gradient norm and the new params, and an elementwise select of params and
optimizer state. This times the jitted ``rl.train_step`` with and without it
(``guard=False``) on random rollout batches, interleaved so both see the same load, and
reports the medians and the relative overhead (expected: within noise).

  python bench/nonfinite_guard.py --quick    # ~1 minute on a 2-core CPU
  python bench/nonfinite_guard.py
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from bench import common  # noqa: E402
from specrl import model as model_lib  # noqa: E402
from specrl import rl as rl_lib  # noqa: E402

# (name, ModelConfig overrides, sequences per batch): the default config's policy at its
# GRPO batch (32 prompts x 8), and a wider model at a small batch, where the optimizer
# (and so the guard's select) is the largest share of the step.
SHAPES = {
  'default': (dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384), 256),
  'wide_small_batch': (
    dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64, d_ff=1536),
    16,
  ),
}


def make_batch(key, b: int, s: int, vocab: int) -> dict:
  k1, k2, k3 = jax.random.split(key, 3)
  mask = (jnp.arange(s)[None, :] >= s // 2).astype(jnp.float32) * jnp.ones((b, 1))
  return {
    'tokens': jax.random.randint(k1, (b, s), 3, vocab, jnp.int32),
    'response_mask': mask,
    'old_logprobs': -jax.random.uniform(k2, (b, s)) * 3 * mask,
    'advantages': jax.random.normal(k3, (b,)),
  }


def bench_shape(name: str, overrides: dict, batch: int, seq_len: int, iters: int) -> dict:
  cfg = model_lib.ModelConfig(vocab_size=32, **overrides)
  rl = rl_lib.RLConfig(num_generations=8)
  opt = rl_lib.make_optimizer(optax.constant_schedule(3e-4), 0.0, 1.0)
  params = model_lib.init_params(cfg, jax.random.key(0))
  batch_data = make_batch(jax.random.key(1), batch, seq_len, cfg.vocab_size)
  steps, states = {}, {}
  for guard in (False, True):
    fn = jax.jit(
      functools.partial(rl_lib.train_step, cfg=cfg, rl=rl, optimizer=opt, guard=guard),
      donate_argnums=(0,),
    )
    own = jax.tree.map(jnp.copy, params)  # donated: each variant needs its own buffers
    states[guard] = rl_lib.init_train_state(own, opt, jax.random.key(2), False)

    def call(fn=fn, guard=guard):
      states[guard], m = fn(states[guard], batch_data)
      return states[guard].params, m

    steps['guarded' if guard else 'unguarded'] = call
  med = common.interleaved_medians(steps, warmup=2, iters=iters)
  return dict(
    shape=name,
    params=model_lib.count_params(params),
    batch=batch,
    seq_len=seq_len,
    unguarded_ms=1e3 * med['unguarded'],
    guarded_ms=1e3 * med['guarded'],
    overhead_pct=100 * (med['guarded'] / med['unguarded'] - 1),
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true', help='fewer iterations (~1 min on CPU)')
  ap.add_argument('--iters', type=int, default=0, help='timed calls per variant (0 = auto)')
  ap.add_argument('--seq_len', type=int, default=66, help='rollout buffer length')
  args = ap.parse_args(argv)
  iters = args.iters or (7 if args.quick else 25)
  rows = [bench_shape(n, o, b, args.seq_len, iters) for n, (o, b) in SHAPES.items()]
  common.print_table(
    [
      ('shape', ''), ('params', 'd'), ('batch', 'd'), ('unguarded_ms', '.2f'),
      ('guarded_ms', '.2f'), ('overhead_pct', '+.1f'),
    ],
    rows,
  )  # fmt: skip
  common.emit_json(dict(device=common.device_info(), iters=iters, rows=rows))


if __name__ == '__main__':
  main()

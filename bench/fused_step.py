"""Fused vs separate q/k/v and gate/up matmuls in a decode step (issue 32 item 4).

:func:`specrl.decoding.steps.loop_params` with ``fuse`` concatenates each layer's
``wq``/``wk``/``wv`` into one ``wqkv`` and ``w_gate``/``w_up`` into one ``w_gate_up``
(:func:`specrl.model.fuse_layers`), so a layer runs 2 matmuls where it ran 5 before its
attention and MLP down projection. Times, on the loop's layer layout (unstacked on CPU),
a plain decode step (T = 1) and a chain verify pass (T = k + 1) against a KV cache of
``--slots`` slots, each ``--reps`` calls in a jitted ``fori_loop`` with the cache as donated
carry (as a decode loop runs it), fused and unfused **interleaved** (``--iters`` rounds of
unfused, fused loops; the medians), at SmolLM2-135M's shapes (random weights) and the tiny
test model. Every row records the 1-minute load average before and after (the machine may be
shared).

  python bench/fused_step.py            # smollm2 + tiny, B = 1 and 16
  python bench/fused_step.py --quick    # tiny only, B = 4: a smoke run

``--rope_bound``: a third variant, the fused step with RoPE removed (wrong math): what
fusing RoPE into the cache write could save at most (``rope_share`` of the fused step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from specrl import model as model_lib  # noqa: E402
from specrl.decoding import steps as steps_lib  # noqa: E402

PRESETS = {
  'smollm2': dict(
    vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536
  ),
  'tiny': dict(vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64),
}


def loop_fn(cfg, params, t: int, pos0: int, reps: int):
  """A jitted ``fori_loop`` of ``reps`` cache-extending forwards of ``t`` tokens (the cache
  donated: updated in place), each writing at ``pos0`` (same work every call)."""

  def run(params, cache, toks):
    b = toks.shape[0]
    pos = jnp.full((b, t), pos0, jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None]

    def body(i, carry):
      c, acc = carry
      logits, c = model_lib.forward(params, cfg, toks, pos, c)
      return c, acc + jnp.sum(logits[:, :, :8])  # the head's output is used

    return jax.lax.fori_loop(0, reps, body, (cache, jnp.float32(0)))

  return jax.jit(run, donate_argnums=1)


def measure(
  preset: str, b: int, t: int, slots: int, reps: int, iters: int, rope_bound: bool = False
) -> dict:
  cfg = model_lib.ModelConfig(**PRESETS[preset])
  stored = model_lib.init_params(cfg, jax.random.key(0))
  variants = {'unfused': False, 'fused': True}
  if rope_bound:
    variants['norope'] = True  # fused, RoPE removed (wrong math): a bound, see --rope_bound
  lp = {f: jax.block_until_ready(steps_lib.loop_params_jit(stored, None, f)) for f in (0, 1)}
  toks = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
  fns, caches, weights = {}, {}, {}
  for name, f in variants.items():
    weights[name] = lp[int(f)]
    rope = model_lib.rope
    if name == 'norope':
      model_lib.rope = lambda x, positions, theta: x  # traced now, restored below
    try:
      fns[name] = loop_fn(cfg, weights[name], t, slots // 2, reps)
      caches[name] = model_lib.init_cache(cfg, b, slots)
      caches[name], _ = jax.block_until_ready(fns[name](weights[name], caches[name], toks))
    finally:
      model_lib.rope = rope
  load0 = os.getloadavg()[0]
  ts = {name: [] for name in variants}
  for _ in range(iters):  # interleaved: unfused, fused, unfused, ...
    for name in variants:
      t0 = time.perf_counter()
      caches[name], _ = jax.block_until_ready(fns[name](weights[name], caches[name], toks))
      ts[name].append((time.perf_counter() - t0) / reps)
  load1 = os.getloadavg()[0]
  med = {name: statistics.median(x) for name, x in ts.items()}
  row = dict(
    preset=preset,
    B=b,
    T=t,
    unfused_ms=1e3 * med['unfused'],
    fused_ms=1e3 * med['fused'],
    speedup=med['unfused'] / med['fused'],
    unfused_all_ms=[round(1e3 * x, 3) for x in ts['unfused']],
    fused_all_ms=[round(1e3 * x, 3) for x in ts['fused']],
    load=f'{load0:.2f}->{load1:.2f}',
  )
  if rope_bound:
    row['norope_ms'] = 1e3 * med['norope']
    row['rope_share'] = 1 - med['norope'] / med['fused']
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--presets', default='smollm2,tiny')
  ap.add_argument('--batches', default='1,16')
  ap.add_argument('--tokens', default='1,5', help='tokens per pass: 1 = plain step, k + 1')
  ap.add_argument('--slots', type=int, default=256)
  ap.add_argument('--reps', type=int, default=8, help='calls per timed loop')
  ap.add_argument('--iters', type=int, default=5, help='timed loops per variant (interleaved)')
  ap.add_argument('--quick', action='store_true', help='tiny model, B = 4, 3 timed loops')
  ap.add_argument(
    '--rope_bound',
    action='store_true',
    help='also time the fused step with RoPE removed (wrong math): the most that fusing '
    'RoPE into the cache write could save',
  )
  args = ap.parse_args(argv)
  if args.quick:
    args.presets, args.batches, args.iters, args.reps = 'tiny', '4', 3, 4
  rows = []
  for preset in args.presets.split(','):
    for b in common.ints(args.batches):
      for t in common.ints(args.tokens):
        rows.append(measure(preset, b, t, args.slots, args.reps, args.iters, args.rope_bound))
  common.print_table(
    [
      ('preset', ''),
      ('B', 'd'),
      ('T', 'd'),
      ('unfused_ms', '.3f'),
      ('fused_ms', '.3f'),
      ('speedup', '.3f'),
      ('norope_ms', '.3f'),
      ('rope_share', '.3f'),
      ('load', ''),
    ],
    rows,
  )
  common.emit_json(
    dict(
      bench='fused_step',
      slots=args.slots,
      reps=args.reps,
      iters=args.iters,
      rows=rows,
      geomean_speedup=statistics.geometric_mean([r['speedup'] for r in rows]),
      **common.device_info(),
    )
  )


if __name__ == '__main__':
  main()

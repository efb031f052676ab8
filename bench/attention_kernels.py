"""The GRPO loss forward's attention implementations side by side (issue 27): forward +
backward time of one layer's causal attention at the SmolLM2-135M shape (9 query heads over
3 kv heads, head dim 64) vs sequence length.

  full          the [B, H, S, S] reference (``specrl.attention.attention``)
  blocked       flash-style jnp (``specrl.attention.blocked_attention``), masked key blocks skipped
  blocked_all   the same computing every key block (``skip_masked=False``): the skip's gain
  xla           ``jax.nn.dot_product_attention(is_causal=True)`` (cuDNN's kernel on GPU)
  pallas        jax's Pallas flash kernels (``specrl.kernels.flash_attention``; GPU / TPU only)

Timed round-robin (``common.interleaved_medians``), >= 3 calls each after a warm-up; the
ratio columns are each implementation's time over ``full``'s and ``blocked_all``'s, taken in
the same run. ``full`` is skipped above ``--full_max`` tokens (its scores do not fit).

  python bench/attention_kernels.py --quick     # S = 512, 2048; a few minutes on 2 cores
  python bench/attention_kernels.py             # S = 512, 2048, 8192
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from specrl import attention as attention_lib  # noqa: E402
from specrl.kernels import flash_attention as flash_lib  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M


def implementations(s: int, block: int, full_max: int) -> dict:
  """name -> attention(q, k, v) for sequences of ``s`` positions (0..s-1)."""

  def with_pos(fn):
    def run(q, k, v):
      p = jnp.broadcast_to(jnp.arange(s), q.shape[:2])
      return fn(q, k, v, p, p)

    return run

  impls = {
    'blocked': with_pos(functools.partial(attention_lib.blocked_attention, block=block)),
    'blocked_all': with_pos(
      functools.partial(attention_lib.blocked_attention, block=block, skip_masked=False)
    ),
    'xla': attention_lib.xla_causal_attention,
  }
  if s <= full_max:
    mask = jnp.tril(jnp.ones((s, s), bool))[None]
    impls = {'full': lambda q, k, v: attention_lib.attention(q, k, v, mask), **impls}
  if jax.default_backend() in flash_lib.PLATFORMS:
    impls['pallas'] = flash_lib.causal_flash_attention
  return impls


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true')
  ap.add_argument('--seqs', type=common.ints, default=None)
  ap.add_argument('--rows', type=int, default=1)
  ap.add_argument('--block', type=int, default=512, help='rl.attention_block of blocked')
  ap.add_argument('--full_max', type=int, default=4096, help='longest S of the reference')
  ap.add_argument('--iters', type=int, default=3)
  args = ap.parse_args(argv)
  seqs = args.seqs or ([512, 2048] if args.quick else [512, 2048, 8192])
  dtype = jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  print(common.device_info(), f'cpu={os.cpu_count()} cores', f'rows={args.rows}', flush=True)
  rows = []
  for s in seqs:
    ks = jax.random.split(jax.random.key(s), 3)
    q = jax.random.normal(ks[0], (args.rows, s, HEADS, HEAD_DIM), dtype)
    k = jax.random.normal(ks[1], (args.rows, s, KV_HEADS, HEAD_DIM), dtype)
    v = jax.random.normal(ks[2], (args.rows, s, KV_HEADS, HEAD_DIM), dtype)
    fns = {}
    for name, attn in implementations(s, args.block, args.full_max).items():
      loss = lambda q, k, v, attn=attn: jnp.sum(attn(q, k, v).astype(jnp.float32) ** 2)  # noqa: E731
      step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      fns[name] = functools.partial(lambda f, a: jax.block_until_ready(f(*a)), step, (q, k, v))
    med = common.interleaved_medians(fns, warmup=1, iters=args.iters)
    for name, sec in med.items():
      rows.append(
        {
          'seq': s,
          'impl': name,
          'fwd_bwd_ms': 1e3 * sec,
          'x_full': sec / med['full'] if 'full' in med else None,
          'x_blocked_all': sec / med['blocked_all'],
        }
      )
    common.print_table(
      [('seq', 'd'), ('impl', ''), ('fwd_bwd_ms', '.1f'), ('x_full', '.2f'),
       ('x_blocked_all', '.2f')],
      [r for r in rows if r['seq'] == s],
    )  # fmt: skip
  common.emit_json(
    {
      'bench': 'attention_kernels',
      'shape': {'heads': HEADS, 'kv_heads': KV_HEADS, 'head_dim': HEAD_DIM, 'rows': args.rows},
      'block': args.block,
      'iters': args.iters,
      **common.device_info(),
      'results': rows,
    }
  )


if __name__ == '__main__':
  main()

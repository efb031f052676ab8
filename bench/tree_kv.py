"""Draft trees: move the accepted path's K/V into place, or re-feed it? And v(N).

After a tree verify pass the accepted path's K/V sit in scratch slots ``pos + path[d]``;
plain decoding's cache has them at ``pos + d``. Two ways to get there:

- move (what :func:`specrl.decoding.tree.move_accepted_kv` does): scatter the accepted
  nodes' k/v, kept from the pass, into N slots per layer (``2 L N K Dh`` values per row);
- re-feed: run the policy again over the accepted tokens (a cache-extending forward of N
  tokens at positions ``pos .. pos + N - 1``, writing their K/V in place; no LM head).

Times both (``--reps`` calls in a jitted loop with the cache as donated carry, as in decoding;
median of ``--iters`` loops) at SmolLM2-135M's shapes with random weights
(``--preset smollm2``) or the tiny test model, next to one plain decode step (T = 1), a
chain verify forward over N tokens and a tree verify forward over N nodes (ancestor mask):
``v(N)`` = tree forward / plain step.

  python bench/tree_kv.py --batch 16 --nodes 8
  python bench/tree_kv.py --quick               # the tiny model, seconds

Prints a table of the timed units and, as the last line, one JSON object.
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
from specrl.decoding import tree as tree_lib  # noqa: E402

SMOLLM2 = dict(
  vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536
)
TINY = dict(vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def timeit(step, cache, *, reps: int, iters: int) -> float:
  """Seconds per call of ``step(cache) -> (cache, scalar)``, run ``reps`` times in a
  ``fori_loop`` with the cache as the (donated, updated in place) carry: as a decode loop
  runs it, no copy of the cache per call. Median over ``iters`` loops."""

  def loop(c):
    def body(i, carry):
      c, acc = carry
      c, x = step(c)
      return c, acc + x

    return jax.lax.fori_loop(0, reps, body, (c, jnp.float32(0)))

  loop_j = jax.jit(loop, donate_argnums=0)
  cache = jax.tree.map(jnp.copy, cache)  # ours to donate
  cache, _ = jax.block_until_ready(loop_j(cache))  # compile
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    cache, _ = jax.block_until_ready(loop_j(cache))
    ts.append((time.perf_counter() - t0) / reps)
  return statistics.median(ts)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--preset', default='smollm2', choices=('smollm2', 'tiny'))
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--nodes', type=int, default=8)
  ap.add_argument('--slots', type=int, default=384)
  ap.add_argument('--iters', type=int, default=3)
  ap.add_argument('--reps', type=int, default=5, help='calls per timed loop')
  ap.add_argument('--quick', action='store_true', help='the tiny model, B = 4: seconds')
  args = ap.parse_args(argv)
  if args.quick:
    args.preset, args.batch, args.slots = 'tiny', 4, 64
  if args.iters < 3:
    raise SystemExit(f'--iters {args.iters}: at least 3 timed loops (one is noise)')
  cfg = model_lib.ModelConfig(**(SMOLLM2 if args.preset == 'smollm2' else TINY))
  params = model_lib.unstack_layers(model_lib.init_params(cfg, jax.random.key(0)))
  b, n, s = args.batch, args.nodes, args.slots
  cache = model_lib.init_cache(cfg, b, s)
  pos = jnp.full((b,), s // 2, jnp.int32)
  toks = jax.random.randint(jax.random.key(1), (b, n), 0, cfg.vocab_size)
  # a binary-ish tree: node u's parent (u - 1) // 2
  parents = jnp.broadcast_to(jnp.asarray([-1] + [(u - 1) // 2 for u in range(1, n)]), (b, n))
  depth = jnp.zeros((b, n), jnp.int32)
  for u in range(1, n):
    depth = depth.at[:, u].set(depth[:, (u - 1) // 2] + 1)
  path = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  path = path.at[:, 1:4].set(jnp.asarray([2, 5, 11 % n]))  # a non-trivial accepted path

  chain_pos = pos[:, None] + jnp.arange(n)[None, :]
  anc = tree_lib.ancestors(parents)
  tree_pos = tree_lib.node_positions(pos, depth)

  def fwd(t, p, a=None):
    def step(c):
      logits, c = model_lib.forward(params, cfg, t, p, c, tree_anc=a)
      return c, jnp.sum(logits[:, :, :8])  # the head's output is used: not removed

    return step

  def refeed(c):  # K/V only: no logits needed
    c = model_lib.forward(params, cfg, toks, chain_pos, c, head=False)[1]
    return c, jnp.float32(0)

  # the pass's new k/v of the N nodes, [L, B, N, K, Dh] (what a tree round moves from)
  kv_shape = (cfg.n_layers, b, n, cfg.n_kv_heads, cfg.head_dim)
  new_kv = {x: jax.random.normal(jax.random.key(2), kv_shape, cache[x].dtype) for x in 'kv'}

  def move(c):
    return tree_lib.move_accepted_kv(c, pos, path, new_kv), jnp.float32(0)

  kw = dict(reps=args.reps, iters=args.iters)
  res = dict(
    bench='tree_kv',
    preset=args.preset,
    B=b,
    N=n,
    slots=s,
    plain_step_s=timeit(fwd(toks[:, :1], pos[:, None]), cache, **kw),
    chain_fwd_s=timeit(fwd(toks, chain_pos), cache, **kw),
    tree_fwd_s=timeit(fwd(toks, tree_pos, anc), cache, **kw),
    move_s=timeit(move, cache, **kw),
    refeed_s=timeit(refeed, cache, **kw),
  )
  res['v_tree'] = res['tree_fwd_s'] / res['plain_step_s']
  res['v_chain'] = res['chain_fwd_s'] / res['plain_step_s']
  res['refeed_over_move'] = res['refeed_s'] / res['move_s']
  res.update(common.device_info())
  plain = res['plain_step_s']
  units = ('plain_step', 'chain_fwd', 'tree_fwd', 'move', 'refeed')
  print(
    f'# tree K/V: {args.preset} shapes, B = {b}, N = {n}, {s} slots, {res["cpu_model"]} '
    f'({res["cpu_cores"]} cores), {res["backend"]}; median of {args.iters} loops of '
    f'{args.reps} calls'
  )
  common.print_table(
    [('unit', ''), ('ms', '.3f'), ('plain steps', '.2f')],
    [dict(unit=u, ms=1e3 * res[f'{u}_s'], **{'plain steps': res[f'{u}_s'] / plain}) for u in units],
  )
  common.emit_json(res, digits=6)
  return res


if __name__ == '__main__':
  main()

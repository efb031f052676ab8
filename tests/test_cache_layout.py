"""The KV cache layout ``[L, B, K, S, Dh]``: the compiled decode step reads it in place.

With the slots before the kv heads (``[L, B, S, K, Dh]``) XLA:CPU transposed every
layer's K and V slice to ``[B, K, S, Dh]`` / ``[B, K, Dh, S]`` before the attention einsums
in every step (a ``transpose`` / ``copy`` fusion of cache size: a full extra read and
write of the cache). These tests compile the plain step, a speculative chain round and a
draft-tree round of a tiny model over a few hundred slots and assert that the optimized
HLO holds no transpose or copy of a K/V-sized array (one holding the slot count S).
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from specrl import model as model_lib
from specrl.decoding import steps as steps_lib
from specrl.decoding.state import RolloutConfig
from specrl.drafters import NgramDrafter

B, PROMPT, NEW = 2, 8, 307  # S = the buffer: 8 + 307 + scratch (a count no other dim has)
# head_dim 16: no product of query groups and fed tokens (<= 2 * 5) takes it
CFG = model_lib.ModelConfig(
  vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64
)
PARAMS = model_lib.init_params(CFG, jax.random.key(0))

_SHAPE = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]')


def _cache_copies(hlo: str, s: int, dh: int, kv_slice: int, ops=('transpose', 'copy')):
  """Instructions of ``hlo`` that transpose or copy (``ops``) a K/V-like array: ``s`` and
  ``dh`` among its dims and at least ``kv_slice`` elements (one layer's K or V)."""
  bad = []
  for line in hlo.splitlines():
    m = _SHAPE.match(line)
    if not m or not m.group(2):
      continue
    name, dims = m.group(1), [int(d) for d in m.group(2).split(',')]
    op = line.split('=', 1)[1]
    alt = '|'.join(ops)
    is_move = re.search(rf'\b({alt})\(', op) or re.search(alt, name)
    size = 1
    for d in dims:
      size *= d
    if is_move and s in dims and dh in dims and size >= kv_slice:
      bad.append(line.strip()[:200])
  return bad


@functools.cache
def _compiled_step(k: int, tree: int, attend_bucket: int):
  cfg, params = CFG, PARAMS
  rcfg = RolloutConfig(
    max_new_tokens=NEW,
    max_prompt_len=PROMPT,
    num_draft=max(k, 1),
    tree_nodes=tree,
    attend_bucket=attend_bucket,
    grow_kv=False,
  )
  drafter = NgramDrafter(cfg.vocab_size)
  prompt = jnp.ones((B, PROMPT), jnp.int32)
  plen = jnp.full((B,), PROMPT, jnp.int32)
  state = jax.eval_shape(
    lambda p: steps_lib.prefill(
      p, prompt, plen, jax.random.key(0), cfg=cfg, rcfg=rcfg, drafter=drafter
    ),
    params,
  )
  s = model_lib.cache_slots(state.cache)
  attend = None if not attend_bucket else s  # the window path over the whole buffer
  loop_params = steps_lib.loop_params(params)  # the decode loop's unrolled layers

  def step(p, st):
    return steps_lib.decode_step(
      p, None, st, k, cfg=cfg, rcfg=rcfg, drafter=drafter, attend_len=attend
    )

  # the state donated, as the decode loop carries it (else XLA copies the input cache once)
  hlo = jax.jit(step, donate_argnums=1).lower(loop_params, state).compile().as_text()
  return hlo, s


def _bad(k, tree, bucket, ops=('transpose', 'copy')):
  hlo, s = _compiled_step(k, tree, bucket)
  assert s > 300
  return _cache_copies(hlo, s, CFG.head_dim, B * s * CFG.n_kv_heads * CFG.head_dim, ops)


@pytest.mark.parametrize(
  'k,bucket', [(0, 256), (0, 0), (3, 256)], ids=['plain', 'plain_dense', 'chain']
)
def test_decode_step_reads_the_cache_in_place(k, bucket):
  bad = _bad(k, 0, bucket)
  assert not bad, '\n'.join(bad)


def test_a_tree_round_transposes_no_cache():
  bad = _bad(3, 4, 256, ops=('transpose',))
  assert not bad, '\n'.join(bad)


def test_a_tree_round_copies_no_cache():
  """A tree round moves its accepted path from the pass's new k/v
  (:func:`specrl.decoding.tree.move_accepted_kv`). It used to gather the scratch slots back
  out of the cache: XLA fused the verify pass's last window update into that gather, which
  then read the previous layer's buffer, so that update copied the whole cache (K and V,
  both layouts; this test failed, a strict xfail, until the move changed)."""
  bad = _bad(3, 4, 256)
  assert not bad, '\n'.join(bad)


def test_the_check_sees_a_cache_transpose():
  """The detector itself: a transposed K slice is flagged, the einsum in place is not."""
  hlo = '\n'.join(
    [
      '  %transpose_copy_fusion = f32[2,2,320,8]{3,2,1,0} fusion(f32[2,320,2,8]{3,2,1,0} %p)',
      '  %copy.3 = f32[2,320,2,8]{3,2,1,0} copy(f32[2,320,2,8]{2,3,1,0} %p)',
      '  %copy.4 = s32[2,320]{1,0} copy(s32[2,320]{0,1} %t)',
      '  %dot = f32[2,2,2,1,320]{4,3,2,1,0} dot(f32[2,2,320,8] %k, f32[2,1,2,2,8] %q)',
    ]
  )
  bad = _cache_copies(hlo, 320, 8, 2 * 320 * 2 * 8)
  assert len(bad) == 2 and 'transpose_copy_fusion' in bad[0] and 'copy.3' in bad[1]

"""Fused decode matmuls (``rollout.fuse_matmuls``; :func:`specrl.model.fuse_layers` through
:func:`specrl.decoding.steps.loop_params`): one ``wqkv`` and one ``w_gate_up`` per layer in
the decode loops, never in the stored params.

- the fused forward's logits and cache equal the separate weights' (f32, qkv biases, GQA
  with 2 query heads per kv head) for a plain step, a chain verify pass and a tree verify
  pass, over stacked and unstacked layers;
- greedy rollouts emit the same tokens fused and unfused on the static engine (chain
  speculation) and the adaptive engine;
- ``loop_params`` is idempotent, leaves the stored params' pytree as it was, keeps
  quantized weights apart, and places the fused arrays by their parts' logical axes;
- a bad ``rollout.fuse_matmuls`` is refused.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import adaptive, quant
from specrl import model as model_lib
from specrl import rollout as rollout_lib
from specrl import sharding as shd
from specrl.decoding import steps, tree
from specrl.decoding.state import RolloutConfig
from specrl.drafters import NgramDrafter
from specrl.sampling import SamplingParams

# Qwen-like: qkv biases; 2 query heads per kv head, 2 kv heads (a wrong split or head
# order changes the logits)
CFG = model_lib.ModelConfig(
  vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
  qkv_bias=True,
)  # fmt: skip


def _params():
  """Random weights with non-zero biases (init's are zero: a bias bug would not show)."""
  p = model_lib.init_params(CFG, jax.random.key(0))
  keys = iter(jax.random.split(jax.random.key(1), 8))
  layers = {
    n: a + 0.3 * jax.random.normal(next(keys), a.shape) if n in ('bq', 'bk', 'bv') else a
    for n, a in p['layers'].items()
  }
  return {**p, 'layers': layers}


PARAMS = _params()


def test_fused_forward_equals_separate_matmuls():
  """Logits and cache of the fused layers (unstacked: the CPU loop's layout; stacked: the
  accelerators') equal the separate weights' for a plain step, a chain verify pass and a
  tree verify pass (one compile for all)."""
  sep = steps.loop_params(PARAMS, True, fuse=False)
  fused = {u: steps.loop_params(PARAMS, u, fuse=True) for u in (True, False)}
  assert not model_lib.is_fused(sep) and all(map(model_lib.is_fused, fused.values()))
  b, k, s = 3, 4, 24
  cache = model_lib.init_cache(CFG, b, s)
  cache = jax.tree.map(lambda c: c + jax.random.normal(jax.random.key(4), c.shape), cache)
  pos = jnp.asarray([5, 9, 13], jnp.int32)
  toks = jax.random.randint(jax.random.key(3), (b, k + 1), 0, CFG.vocab_size)
  parents = jnp.broadcast_to(jnp.asarray([-1, 0, 0, 1, 1]), (b, k + 1))  # a branching tree
  depth = jnp.broadcast_to(jnp.asarray([0, 1, 1, 2, 2]), (b, k + 1))
  anc = tree.ancestors(parents)

  @jax.jit
  def run(weights, cache):
    fwd = functools.partial(model_lib.forward, weights, CFG, cache=cache)
    return {
      'plain_step': fwd(toks[:, :1], pos[:, None], attend_len=16),
      'chain_verify': fwd(toks, pos[:, None] + jnp.arange(k + 1)[None], attend_len=24),
      'tree_verify': fwd(toks, tree.node_positions(pos, depth), tree_anc=anc),
    }

  ref = run(sep, cache)
  for unroll, weights in fused.items():
    got = run(weights, cache)
    for name, (la, ca) in ref.items():
      lb, cb = got[name]
      msg = f'{name} unstacked={unroll}'
      assert float(jnp.max(jnp.abs(la))) > 0.5, msg  # logits that can tell a difference
      np.testing.assert_allclose(lb, la, atol=1e-5, rtol=1e-5, err_msg=msg)
      for x in ('k', 'v'):
        np.testing.assert_allclose(cb[x], ca[x], atol=1e-5, rtol=1e-5, err_msg=f'{msg} {x}')


def test_loop_params_idempotent_and_stored_params_unchanged():
  stored_def = jax.tree.structure(PARAMS)
  before = jax.tree.map(np.asarray, PARAMS)
  shapes = model_lib.param_shapes(CFG)
  for unroll in (True, False):
    once = steps.loop_params_jit(PARAMS, unroll, True)
    twice = steps.loop_params(once, unroll, fuse=True)
    assert jax.tree.structure(twice) == jax.tree.structure(once)
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice), strict=True):
      assert a is b  # nothing recomputed
    lp = once['layers'][0] if unroll else once['layers']
    assert not {'wq', 'wk', 'wv', 'bq', 'bk', 'bv', 'w_gate', 'w_up'} & set(lp)
    lead = () if unroll else (CFG.n_layers,)
    assert lp['wqkv'].shape == (*lead, 32, 2, 4, 8)  # [D, K, G + 2, Dh]
    assert lp['bqkv'].shape == (*lead, 2, 4, 8)
    assert lp['w_gate_up'].shape == (*lead, 32, 2, 64)  # [D, 2, F]
    # fuse=False keeps fused params as they are (idempotent either way)
    assert steps.loop_params(once, unroll, fuse=False) is once
  # the stored params: same pytree, same values (loop_params derives a copy)
  assert jax.tree.structure(PARAMS) == stored_def
  assert jax.tree.map(lambda x: x.shape, PARAMS) == jax.tree.map(
    tuple, shapes, is_leaf=lambda s: isinstance(s, tuple)
  )
  for a, b in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)
  # quantized weights (the int8/int4 self-drafter's) are not fused: kept apart, as loaded
  qp = jax.eval_shape(lambda p: quant.quantize_params(p, quant.QuantConfig(bits=8)), PARAMS)
  assert model_lib.fuse_layers(qp)['layers'] is qp['layers']


def test_fused_weights_shard_by_their_parts_axes():
  """On a (data 2, fsdp 2, tensor 2) mesh the fused arrays shard like their parts: d_model
  over fsdp, kv heads (q/k/v) and MLP columns (gate/up) over tensor; never the q|k|v or
  gate|up axis (a flat [D, (H + 2K) Dh] split there would cut across the parts)."""
  mesh = jax.sharding.AbstractMesh((2, 2, 2), shd.MESH_AXES)
  fused = jax.eval_shape(lambda p: steps.loop_params(p, False, fuse=True), PARAMS)['layers']
  spec = {
    n: tuple(shd.logical_to_spec(model_lib.layer_logical_axes(n), a.shape, mesh, shd.PARAM_RULES))
    for n, a in fused.items()
  }
  assert spec['wqkv'] == (None, 'fsdp', 'tensor', None, None)
  assert spec['bqkv'] == (None, 'tensor', None, None)
  assert spec['w_gate_up'] == (None, 'fsdp', None, 'tensor')
  assert len(model_lib.layer_logical_axes('wqkv', stacked=False)) == 4


def test_greedy_rollouts_fused_equal_unfused_on_both_engines():
  """Greedy, chain speculation (ngram, k = 2): the static engine fused and unfused, and the
  adaptive engine fused (one batch bucket, CI time: compaction with fused weights runs on
  8 devices in tests/sharded_check.py; unfused the adaptive engine equals the static one:
  tests/test_decoding.py), emit the same tokens."""
  sp = SamplingParams(temperature=0.0)
  lens = np.asarray([6, 3, 5, 2], np.int32)
  toks = np.tile(np.asarray([[3, 4, 5, 3, 4, 5]], np.int32), (4, 1)) + np.arange(4)[:, None]
  toks[np.arange(6)[None] >= lens[:, None]] = 0
  base = dict(max_new_tokens=10, max_prompt_len=6, sampling=sp, eos_id=-1)
  drafter = NgramDrafter(CFG.vocab_size, 2)
  outs = {}
  for fuse in ('off', 'on'):
    rcfg = RolloutConfig(**base, num_draft=2, fuse_matmuls=fuse)
    eng = rollout_lib.RolloutEngine(CFG, rcfg, drafter=drafter)
    outs[f'static_{fuse}'] = eng.generate(PARAMS, toks, lens, jax.random.key(1))[0]
  acfg = adaptive.AdaptiveConfig(
    policy='always', arms=(2,), buckets=(4,), chunk_steps=4, learn_online=False
  )
  rcfg = RolloutConfig(**base, max_draft=2, fuse_matmuls='on')
  eng = adaptive.AdaptiveRolloutEngine(CFG, rcfg, acfg, drafter=drafter)
  outs['adaptive_on'] = eng.generate(PARAMS, toks, lens, jax.random.key(1))[0]
  ref = jax.device_get(outs.pop('static_off'))
  assert int(np.sum(ref.num_accepted)) > 0  # verify rounds accepted drafts
  w = 6 + 10
  for name, out in jax.device_get(outs).items():
    np.testing.assert_array_equal(out.tokens[:, :w], ref.tokens[:, :w], err_msg=name)
    np.testing.assert_allclose(out.logprobs[:, :w], ref.logprobs[:, :w], atol=1e-5, err_msg=name)


def test_bad_fuse_matmuls_is_refused():
  with pytest.raises(ValueError, match='rollout.fuse_matmuls'):
    RolloutConfig(fuse_matmuls='yes')
  assert dataclasses.replace(RolloutConfig(), fuse_matmuls='off').fuse_matmuls == 'off'
  assert steps.fuse_setting(RolloutConfig()) is None
  with pytest.raises(ValueError, match='fuse'):
    steps.loop_params(PARAMS, True, 'off')  # a string is not a setting here (truthy)

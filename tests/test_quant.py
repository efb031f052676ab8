"""Tests for specrl.quant: the int8 / int4 / fp8 drafter weights and their three backends."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import model as model_lib
from specrl import quant

BACKENDS = ('jnp', 'aqt', 'qwix')


def _cfg(**kw):
  base = dict(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
              d_ff=384, tie_embeddings=False)
  base.update(kw)
  return model_lib.ModelConfig(**base)


def _inputs(cfg, b=2, t=5):
  toks = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
  return toks, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _full_scale(qw: quant.QWeight) -> np.ndarray:
  """The scale of every element, broadcast to the stored weight's shape."""
  q, s = qw._grouped()
  return np.broadcast_to(np.asarray(s, np.float32), q.shape).reshape(qw.qvalue.shape)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize('bits,group_size', [(8, None), (8, 128), (4, None), (4, 128), (4, 64)])
@pytest.mark.parametrize('name', ['wq', 'wo', 'w_down', 'embed'])
@pytest.mark.parametrize('scale_dtype', ['float32', 'bfloat16'])
def test_round_to_nearest_bound(bits, group_size, name, scale_dtype):
  """|w - dq(w)| <= s / 2 elementwise, with s the element's own channel / group scale."""
  shapes = {'wq': (2, 256, 4, 32), 'wo': (2, 4, 64, 96), 'w_down': (2, 384, 128),
            'embed': (64, 256)}
  w = jax.random.normal(jax.random.key(0), shapes[name]) * 0.05
  w = w.at[..., 0].multiply(20.0)  # an outlier channel / group
  rank, nc, first = quant._MATMULS[name]
  qcfg = quant.QuantConfig(bits=bits, group_size=group_size, scale_dtype=scale_dtype)
  qw = quant.quantize_weight(w, qcfg, rank=rank, n_contract=nc, contract_first=first)
  expect_gs = qw.k if group_size is None else min(group_size, qw.k)
  assert qw.group_size == expect_gs
  err = np.abs(np.asarray(w) - np.asarray(qw.dequantize()))
  s = _full_scale(qw)
  assert np.all(err <= s / 2 * (1 + 1e-6) + 1e-12), float(np.max(err / s))
  qmax = 127 if bits == 8 else 7
  q = np.asarray(qw.qvalue).astype(np.int32)
  assert q.min() >= -qmax and q.max() <= qmax
  assert q.max() == qmax or q.min() == -qmax  # the absmax element uses the full range


def test_fp8_relative_bound():
  w = jax.random.normal(jax.random.key(0), (3, 256, 96))
  qw = quant.quantize_weight(w, quant.QuantConfig(fp8='e4m3'), rank=2, n_contract=1,
                             contract_first=True)
  assert qw.qvalue.dtype == jnp.float8_e4m3fn
  err = np.abs(np.asarray(w) - np.asarray(qw.dequantize()))
  s = _full_scale(qw)
  # 3 mantissa bits: half-ulp relative error 2**-4; subnormal spacing 2**-9 (times s).
  assert np.all(err <= np.abs(np.asarray(w)) * 2.0**-4 + s * 2.0**-10 + 1e-12)


def test_zero_weight_is_exact():
  w = jnp.zeros((2, 128, 64)).at[0, :, :3].set(1.0)
  qw = quant.quantize_weight(w, quant.QuantConfig(bits=4), rank=2, n_contract=1,
                             contract_first=True)
  np.testing.assert_array_equal(np.asarray(qw.dequantize()), np.asarray(w))


# ----------------------------------------------------------------------------- storage


@pytest.mark.parametrize('bits,fp8,dtype', [(8, None, jnp.int8), (4, None, jnp.int4),
                                            (8, 'e4m3', jnp.float8_e4m3fn)])
def test_storage_dtypes(bits, fp8, dtype):
  cfg = _cfg()
  params = model_lib.init_params(cfg, jax.random.key(0))
  qp = quant.quantize_params(params, quant.QuantConfig(bits=bits, fp8=fp8))
  for name in ('wq', 'wk', 'wv', 'wo', 'w_gate', 'w_up', 'w_down'):
    qw = qp['layers'][name]
    assert isinstance(qw, quant.QWeight), name
    assert qw.qvalue.dtype == dtype and qw.scale.dtype == jnp.float32
    assert qw.qvalue.shape == params['layers'][name].shape  # original layout kept
    assert qw.scale.shape[0] == cfg.n_layers  # scan slices the layer axis of every leaf
  assert isinstance(qp['embed'], quant.QWeight) and isinstance(qp['lm_head'], quant.QWeight)
  for name in ('attn_norm', 'mlp_norm'):
    assert qp['layers'][name].dtype == jnp.float32
  assert qp['final_norm'].dtype == jnp.float32
  leaves = jax.tree.leaves(qp)
  assert {x.dtype for x in leaves} == {jnp.dtype(dtype), jnp.dtype(jnp.float32)}


def test_int4_is_packed_by_xla():
  """XLA buffers hold int4 two per byte (jax's .nbytes says one): param_bytes says 0.5."""
  q = jnp.zeros((4, 256, 128), jnp.int4)
  compiled = jax.jit(lambda a: a).lower(q).compile()
  assert compiled.memory_analysis().argument_size_in_bytes == q.size // 2
  assert quant.param_bytes(q) == q.size // 2


def test_param_bytes_ratios():
  cfg = _cfg(vocab_size=512, d_model=256, d_ff=512, head_dim=64, tie_embeddings=True,
             param_dtype='bfloat16', compute_dtype='bfloat16')
  params = model_lib.init_params(cfg, jax.random.key(0))
  pb = quant.param_bytes(params)
  assert pb == 2 * model_lib.count_params(params)
  b8 = quant.param_bytes(quant.quantize_params(params, quant.QuantConfig(bits=8)))
  b4 = quant.param_bytes(quant.quantize_params(params, quant.QuantConfig(bits=4)))
  b4c = quant.param_bytes(quant.quantize_params(params, quant.QuantConfig(bits=4, group_size=None)))
  assert b8 <= 0.55 * pb, b8 / pb
  assert b4c < b4 < b8
  assert b4 <= 0.30 * pb, b4 / pb


def test_embedding_flags():
  tied = model_lib.init_params(_cfg(tie_embeddings=True), jax.random.key(0))
  untied = model_lib.init_params(_cfg(), jax.random.key(0))
  q = quant.quantize_params
  assert not isinstance(q(tied, quant.QuantConfig(quantize_lm_head=False))['embed'],
                        quant.QWeight)  # tied table is also the head
  assert isinstance(q(tied, quant.QuantConfig())['embed'], quant.QWeight)
  qp = q(untied, quant.QuantConfig(quantize_embeddings=False))
  assert not isinstance(qp['embed'], quant.QWeight) and isinstance(qp['lm_head'], quant.QWeight)
  qp = q(untied, quant.QuantConfig(quantize_lm_head=False))
  assert isinstance(qp['embed'], quant.QWeight) and not isinstance(qp['lm_head'], quant.QWeight)
  with pytest.raises(TypeError, match='already quantized'):
    q(qp, quant.QuantConfig())


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('bits,act_bits,bound', [(8, None, 0.05), (8, 8, 0.08), (4, None, 0.5)])
def test_forward_close_to_policy(backend, bits, act_bits, bound):
  cfg = _cfg(tie_embeddings=True)
  params = model_lib.init_params(cfg, jax.random.key(0))
  toks, pos = _inputs(cfg)
  fwd = jax.jit(model_lib.forward, static_argnums=1)
  ref, _ = fwd(params, cfg, toks, pos)
  qcfg = quant.QuantConfig(bits=bits, backend=backend, act_bits=act_bits)
  qp = jax.jit(quant.quantize_params, static_argnums=1)(params, qcfg)
  logits, _ = fwd(qp, cfg, toks, pos)
  assert logits.shape == ref.shape and logits.dtype == jnp.float32
  assert _rel(logits, ref) < bound
  if act_bits is None:  # weight-only == the float model with dequantized weights
    dq, _ = fwd(quant.dequantize_params(qp), cfg, toks, pos)
    assert _rel(logits, dq) < 1e-5


def test_forward_int8_more_accurate_than_int4():
  cfg = _cfg()
  params = model_lib.init_params(cfg, jax.random.key(0))
  toks, pos = _inputs(cfg)
  ref, _ = model_lib.forward(params, cfg, toks, pos)
  errs = {}
  for bits in (8, 4):
    qp = quant.quantize_params(params, quant.QuantConfig(bits=bits))
    errs[bits] = _rel(model_lib.forward(qp, cfg, toks, pos)[0], ref)
  assert errs[8] < errs[4] / 5, errs


@pytest.mark.parametrize('backend', BACKENDS)
def test_decode_with_cache_bf16(backend):
  """The drafter path: prefill + T=1 decode with a KV cache, bf16 compute."""
  cfg = _cfg(param_dtype='bfloat16', compute_dtype='bfloat16', tie_embeddings=True)
  params = model_lib.init_params(cfg, jax.random.key(0))
  qp = quant.quantize_params(params, quant.QuantConfig(bits=8, backend=backend))
  toks, pos = _inputs(cfg, b=2, t=4)
  fwd = jax.jit(model_lib.forward, static_argnums=1)
  outs = {}
  for name, p in (('policy', params), ('drafter', qp)):
    _, cache = fwd(p, cfg, toks, pos, model_lib.init_cache(cfg, 2, 8))
    lg, _ = fwd(p, cfg, toks[:, :1], jnp.full((2, 1), 4, jnp.int32), cache)
    outs[name] = lg
  assert outs['drafter'].shape == (2, 1, cfg.vocab_size)
  assert _rel(outs['drafter'], outs['policy']) < 0.1


def test_quantize_params_jit_equals_eager():
  cfg = _cfg()
  params = model_lib.init_params(cfg, jax.random.key(0))
  for qcfg in (quant.QuantConfig(bits=8), quant.QuantConfig(bits=4, scale_dtype='bfloat16')):
    eager = quant.quantize_params(params, qcfg)
    jitted = jax.jit(quant.quantize_params, static_argnums=1)(params, qcfg)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
      assert a.dtype == b.dtype and a.shape == b.shape
      np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                    np.asarray(b.astype(jnp.float32)))


# ----------------------------------------------------------------------------- backends

_EINSUMS = [  # (eq, x shape, param name, weight shape)
  ('btd,dhk->bthk', (2, 3, 256), 'wq', (256, 4, 32)),
  ('bthk,hkd->btd', (2, 3, 4, 64), 'wo', (4, 64, 128)),
  ('btd,df->btf', (2, 3, 256), 'w_gate', (256, 384)),
  ('btf,fd->btd', (2, 3, 384), 'w_down', (384, 128)),
  ('btd,vd->btv', (2, 3, 256), 'embed', (96, 256)),
  ('btd,dv->btv', (2, 3, 256), 'lm_head', (256, 96)),
]


@pytest.mark.parametrize('eq,xs,name,ws', _EINSUMS)
@pytest.mark.parametrize('bits,act_bits,fp8', [(8, None, None), (4, None, None), (8, 8, None),
                                               (4, 8, None), (8, None, 'e4m3')])
def test_qeinsum_backends_agree(eq, xs, name, ws, bits, act_bits, fp8):
  x = jax.random.normal(jax.random.key(1), xs)
  w = jax.random.normal(jax.random.key(2), ws) / np.sqrt(xs[-1])
  rank, nc, first = quant._MATMULS[name]
  qcfg = quant.QuantConfig(bits=bits, act_bits=act_bits, fp8=fp8)
  qw = quant.quantize_weight(w, qcfg, rank=rank, n_contract=nc, contract_first=first)
  ref = jax.jit(lambda x, w: w.qeinsum(eq, x))(x, qw)
  exact = jnp.einsum(eq, x, qw.dequantize())
  assert ref.shape == exact.shape
  tol = 1e-5 if act_bits is None else 2e-2  # int8 activations: a few 1/127 roundings
  assert _rel(ref, exact) < tol
  for backend in ('aqt', 'qwix'):
    out = jax.jit(lambda x, w: w.qeinsum(eq, x))(x, qw.replace(backend=backend))
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert _rel(out, ref) < (1e-5 if act_bits is None else 2e-2), backend


def test_qeinsum_fallback_and_qtake():
  w = jax.random.normal(jax.random.key(2), (96, 256))
  qw = quant.quantize_weight(w, quant.QuantConfig(bits=4), rank=2, n_contract=1,
                             contract_first=False)
  x = jax.random.normal(jax.random.key(1), (3, 96))
  np.testing.assert_allclose(qw.qeinsum('sv,vd->sd', x), x @ qw.dequantize(), rtol=1e-5,
                             atol=1e-5)  # not the stored contraction: dequantized fallback
  ids = jnp.array([[0, 5, 95], [7, 7, 1]])
  np.testing.assert_array_equal(qw.qtake(ids), jnp.take(qw.dequantize(), ids, axis=0))


def test_with_backend_keeps_weights():
  params = model_lib.init_params(_cfg(), jax.random.key(0))
  qp = quant.quantize_params(params, quant.QuantConfig(backend='jnp'))
  qa = quant.with_backend(qp, 'aqt')
  assert qa['layers']['wq'].backend == 'aqt'
  np.testing.assert_array_equal(qa['layers']['wq'].qvalue, qp['layers']['wq'].qvalue)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize('field,value', [
  ('bits', 3), ('bits', True), ('bits', '8'), ('group_size', -1), ('group_size', 1.5),
  ('backend', 'tflite'), ('quantize_embeddings', 1), ('quantize_lm_head', 'yes'),
  ('act_bits', 4), ('fp8', 'e5m3'), ('scale_dtype', 'float16'),
])
def test_bad_config_names_field(field, value):
  with pytest.raises(ValueError, match=rf'quant\.{field}'):
    quant.QuantConfig(**{field: value})


def test_config_combinations_and_defaults():
  with pytest.raises(ValueError, match=r'quant\.fp8'):
    quant.QuantConfig(bits=4, fp8='e4m3')
  with pytest.raises(ValueError, match=r'quant\.fp8'):
    quant.QuantConfig(fp8='e4m3', act_bits=8)
  assert quant.QuantConfig(bits=4).group_size == 128
  assert quant.QuantConfig(bits=8).group_size is None
  assert quant.QuantConfig(bits=4, group_size=0).group_size is None
  c = quant.QuantConfig.from_config({'bits': 4, 'group_size': 64, 'ngram': 2})
  assert (c.bits, c.group_size) == (4, 64)
  assert dataclasses.replace(c, bits=8).group_size == 64
  with pytest.raises(ValueError, match=r'quant\.group_size'):
    quant.quantize_weight(jnp.ones((192, 8)), quant.QuantConfig(bits=4), rank=2, n_contract=1,
                          contract_first=True, name='w_down')

"""Tests for specrl.quant: the int8 / int4 / fp8 drafter weights and their three backends."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import model as model_lib
from specrl import quant

# Optional backends are tested where their package is installed ('jnp' always is).
_PKG = {'jnp': 'jax', 'aqt': 'aqt', 'qwix': 'qwix'}
BACKENDS = tuple(b for b in ('jnp', 'aqt', 'qwix') if importlib.util.find_spec(_PKG[b]))


def _cfg(**kw):
  base = dict(
    vocab_size=256,
    d_model=128,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=32,
    d_ff=384,
    tie_embeddings=False,
  )
  base.update(kw)
  return model_lib.ModelConfig(**base)


def _inputs(cfg, b=2, t=5):
  toks = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
  return toks, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


_quantize_params = jax.jit(quant.quantize_params, static_argnums=1)
_forward = jax.jit(model_lib.forward, static_argnums=1)
_init = jax.jit(model_lib.init_params, static_argnums=0)


def _qweight(w, qcfg, name):
  """quantize_weight for a param kind of specrl.model (jitted: tests stay fast)."""
  rank, nc, first = quant._MATMULS[name]

  def fn(w):
    return quant.quantize_weight(w, qcfg, rank=rank, n_contract=nc, contract_first=first)

  return jax.jit(fn)(w)


def _abstract_params(cfg):
  return jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))


@pytest.fixture(scope='module')
def tiny():
  """(cfg, params, tokens, positions, reference logits) of a small tied-embedding model."""
  cfg = _cfg(tie_embeddings=True)
  params = _init(cfg, jax.random.key(0))
  toks, pos = _inputs(cfg)
  return cfg, params, toks, pos, _forward(params, cfg, toks, pos)[0]


def _full_scale(qw: quant.QWeight) -> np.ndarray:
  """The scale of every element, broadcast to the stored weight's shape."""
  q, s = qw._grouped()
  return np.broadcast_to(np.asarray(s, np.float32), q.shape).reshape(qw.qvalue.shape)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize('name', ['wq', 'wo', 'w_down', 'embed'])
@pytest.mark.parametrize(
  'bits,group_size,scale_dtype',
  [
    (8, None, 'float32'),
    (8, 128, 'float32'),
    (4, None, 'float32'),
    (4, 128, 'float32'),
    (4, 64, 'bfloat16'),
    (8, None, 'bfloat16'),
  ],
)
def test_round_to_nearest_bound(bits, group_size, name, scale_dtype):
  """|w - dq(w)| <= s / 2 elementwise, with s the element's own channel / group scale."""
  shapes = {
    'wq': (2, 256, 4, 32),
    'wo': (2, 4, 64, 96),
    'w_down': (2, 384, 128),
    'embed': (64, 256),
  }
  w = jax.random.normal(jax.random.key(0), shapes[name]) * 0.05
  w = w.at[..., 0].multiply(20.0)  # an outlier channel / group
  qw = _qweight(
    w, quant.QuantConfig(bits=bits, group_size=group_size, scale_dtype=scale_dtype), name
  )
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
  qw = _qweight(w, quant.QuantConfig(fp8='e4m3'), 'w_down')
  assert qw.qvalue.dtype == jnp.float8_e4m3fn
  err = np.abs(np.asarray(w) - np.asarray(qw.dequantize()))
  s = _full_scale(qw)
  # 3 mantissa bits: half-ulp relative error 2**-4; subnormal spacing 2**-9 (times s).
  assert np.all(err <= np.abs(np.asarray(w)) * 2.0**-4 + s * 2.0**-10 + 1e-12)


def test_zero_weight_is_exact():
  w = jnp.zeros((2, 128, 64)).at[0, :, :3].set(1.0)
  qw = _qweight(w, quant.QuantConfig(bits=4), 'w_down')
  np.testing.assert_array_equal(np.asarray(qw.dequantize()), np.asarray(w))


# ----------------------------------------------------------------------------- storage


@pytest.mark.parametrize(
  'bits,fp8,dtype', [(8, None, jnp.int8), (4, None, jnp.int4), (8, 'e4m3', jnp.float8_e4m3fn)]
)
def test_storage_dtypes(bits, fp8, dtype):
  cfg = _cfg()
  params = _abstract_params(cfg)  # shapes and dtypes only: nothing is computed
  qp = jax.eval_shape(
    lambda p: quant.quantize_params(
      p, quant.QuantConfig(bits=bits, fp8=fp8, quantize_embeddings=True, quantize_lm_head=True)
    ),
    params,
  )
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
  cfg = _cfg(
    vocab_size=512,
    d_model=256,
    d_ff=512,
    head_dim=64,
    tie_embeddings=True,
    param_dtype='bfloat16',
    compute_dtype='bfloat16',
  )
  params = _abstract_params(cfg)
  pb = quant.param_bytes(params)
  assert pb == 2 * model_lib.count_params(params)

  def qbytes(**kw):
    qcfg = quant.QuantConfig(quantize_embeddings=True, quantize_lm_head=True, **kw)
    return quant.param_bytes(jax.eval_shape(lambda p: quant.quantize_params(p, qcfg), params))

  b8, b4, b4c = qbytes(bits=8), qbytes(bits=4), qbytes(bits=4, group_size=None)
  assert b8 <= 0.55 * pb, b8 / pb
  assert b4c < b4 < b8
  assert b4 <= 0.30 * pb, b4 / pb


def test_embedding_flags():
  tied = _abstract_params(_cfg(tie_embeddings=True))
  untied = _abstract_params(_cfg())

  def q(p, qcfg):
    return jax.eval_shape(lambda p: quant.quantize_params(p, qcfg), p)

  assert not isinstance(
    q(tied, quant.QuantConfig(quantize_lm_head=False))['embed'], quant.QWeight
  )  # tied table is also the head
  both = dict(quantize_embeddings=True, quantize_lm_head=True)
  assert not isinstance(q(tied, quant.QuantConfig())['embed'], quant.QWeight)  # default: float
  assert isinstance(q(tied, quant.QuantConfig(**both))['embed'], quant.QWeight)
  qp = q(untied, quant.QuantConfig(quantize_embeddings=False, quantize_lm_head=True))
  assert not isinstance(qp['embed'], quant.QWeight) and isinstance(qp['lm_head'], quant.QWeight)
  qp = q(untied, quant.QuantConfig(quantize_embeddings=True, quantize_lm_head=False))
  assert isinstance(qp['embed'], quant.QWeight) and not isinstance(qp['lm_head'], quant.QWeight)
  with pytest.raises(TypeError, match='already quantized'):
    quant.quantize_params(qp, quant.QuantConfig())


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize(
  'backend,bits,act_bits,bound',
  [(b, bits, None, bound) for b in BACKENDS for bits, bound in ((8, 0.05), (4, 0.5))]
  + [('jnp', 8, 8, 0.08)],
)
def test_forward_close_to_policy(tiny, backend, bits, act_bits, bound):
  cfg, params, toks, pos, ref = tiny
  qp = _quantize_params(params, quant.QuantConfig(bits=bits, backend=backend, act_bits=act_bits))
  logits, _ = _forward(qp, cfg, toks, pos)
  assert logits.shape == ref.shape and logits.dtype == jnp.float32
  assert _rel(logits, ref) < bound
  if act_bits is None:  # weight-only == the float model with dequantized weights
    dq, _ = _forward(quant.dequantize_params(qp), cfg, toks, pos)
    assert _rel(logits, dq) < 1e-5


def test_forward_int8_more_accurate_than_int4(tiny):
  cfg, params, toks, pos, ref = tiny
  errs = {}
  for bits in (8, 4):
    qp = _quantize_params(params, quant.QuantConfig(bits=bits))
    errs[bits] = _rel(_forward(qp, cfg, toks, pos)[0], ref)
  assert errs[8] < errs[4] / 5, errs


def test_decode_step_bf16():
  """The drafter's hot path: a T=1 step into a KV cache, bf16 compute, every backend."""
  cfg = _cfg(param_dtype='bfloat16', compute_dtype='bfloat16', tie_embeddings=True, n_layers=1)
  params = _init(cfg, jax.random.key(0))
  cache = model_lib.init_cache(cfg, 2, 8)
  tok, pos = jnp.array([[3], [7]]), jnp.array([[0], [0]])
  ref, _ = _forward(params, cfg, tok, pos, cache)
  qp = _quantize_params(params, quant.QuantConfig(bits=8))
  for backend in BACKENDS:
    logits, new_cache = _forward(quant.with_backend(qp, backend), cfg, tok, pos, cache)
    assert logits.shape == (2, 1, cfg.vocab_size) and new_cache['k'].dtype == jnp.bfloat16
    assert _rel(logits, ref) < 0.1, backend


def test_quantize_params_jit_equals_eager(tiny):
  params = tiny[1]
  for qcfg in (quant.QuantConfig(bits=4, scale_dtype='bfloat16'),):
    eager = quant.quantize_params(params, qcfg)
    jitted = _quantize_params(params, qcfg)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
      assert a.dtype == b.dtype and a.shape == b.shape
      np.testing.assert_array_equal(
        np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
      )


# ----------------------------------------------------------------------------- backends

_EINSUMS = [  # (eq, x shape, param name, weight shape)
  ('btd,dhk->bthk', (2, 3, 256), 'wq', (256, 4, 32)),
  ('bthk,hkd->btd', (2, 3, 4, 64), 'wo', (4, 64, 128)),
  ('btd,df->btf', (2, 3, 256), 'w_gate', (256, 384)),
  ('btf,fd->btd', (2, 3, 384), 'w_down', (384, 128)),
  ('btd,vd->btv', (2, 3, 256), 'embed', (96, 256)),
  ('btd,dv->btv', (2, 3, 256), 'lm_head', (256, 96)),
]


_QCFGS = {
  'int8': dict(bits=8),
  'int4': dict(bits=4),
  'w8a8': dict(bits=8, act_bits=8),
  'w4a8': dict(bits=4, act_bits=8),
  'fp8': dict(fp8='e4m3'),
}


@pytest.mark.parametrize(
  'eq,xs,name,ws,kind',
  [e + ('int8',) for e in _EINSUMS[:2]]
  + [e + (k,) for k in ('int4', 'w8a8', 'w4a8', 'fp8') for e in (_EINSUMS[1], _EINSUMS[4])]
  + [e + ('int8',) for e in _EINSUMS[2:]],
)
def test_qeinsum_backends_agree(eq, xs, name, ws, kind):
  x = jax.random.normal(jax.random.key(1), xs)
  w = jax.random.normal(jax.random.key(2), ws) / np.sqrt(xs[-1])
  qcfg = quant.QuantConfig(**_QCFGS[kind])
  act_bits = qcfg.act_bits
  qw = _qweight(w, qcfg, name)
  ref = jax.jit(lambda x, w: w.qeinsum(eq, x))(x, qw)
  exact = jnp.einsum(eq, x, qw.dequantize())
  assert ref.shape == exact.shape
  tol = 1e-5 if act_bits is None else 2e-2  # int8 activations: a few 1/127 roundings
  assert _rel(ref, exact) < tol
  for backend in BACKENDS[1:]:
    out = jax.jit(lambda x, w: w.qeinsum(eq, x))(x, qw.replace(backend=backend))
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert _rel(out, ref) < (1e-5 if act_bits is None else 2e-2), backend


def test_qeinsum_fallback_and_qtake():
  w = jax.random.normal(jax.random.key(2), (96, 256))
  qw = _qweight(w, quant.QuantConfig(bits=4), 'embed')
  x = jax.random.normal(jax.random.key(1), (3, 96))
  np.testing.assert_allclose(
    qw.qeinsum('sv,vd->sd', x), x @ qw.dequantize(), rtol=1e-5, atol=1e-5
  )  # not the stored contraction: dequantized fallback
  ids = jnp.array([[0, 5, 95], [7, 7, 1]])
  np.testing.assert_array_equal(qw.qtake(ids), jnp.take(qw.dequantize(), ids, axis=0))


def test_with_backend_keeps_weights(tiny):
  qp = _quantize_params(tiny[1], quant.QuantConfig(backend='jnp'))
  qa = quant.with_backend(qp, 'aqt')
  assert qa['layers']['wq'].backend == 'aqt'
  np.testing.assert_array_equal(qa['layers']['wq'].qvalue, qp['layers']['wq'].qvalue)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
  'field,value',
  [
    ('bits', 3),
    ('bits', True),
    ('bits', '8'),
    ('group_size', -1),
    ('group_size', 1.5),
    ('backend', 'tflite'),
    ('quantize_embeddings', 1),
    ('quantize_lm_head', 'yes'),
    ('act_bits', 4),
    ('fp8', 'e5m3'),
    ('scale_dtype', 'float16'),
  ],
)
def test_bad_config_names_field(field, value):
  with pytest.raises(ValueError, match=rf'quant\.{field}'):
    quant.QuantConfig(**{field: value})


def test_config_combinations_and_defaults():
  with pytest.raises(ValueError, match=r'quant\.fp8'):
    quant.QuantConfig(bits=4, fp8='e4m3')
  with pytest.raises(ValueError, match=r'quant\.fp8'):
    quant.QuantConfig(fp8='e4m3', act_bits=8)

  # 'auto': int4 takes the largest divisor of K <= 128 per weight (96 for K = 576, 128 for
  # 1536), int8 one scale per channel
  def gs(k, **kw):
    w = jnp.ones((k, 8))
    qcfg = quant.QuantConfig(**kw)
    return quant.quantize_weight(w, qcfg, rank=2, n_contract=1, contract_first=True).group_size

  assert (gs(576, bits=4), gs(1536, bits=4), gs(576, bits=8)) == (96, 128, 576)
  assert quant.QuantConfig(bits=4, group_size=0).group_size is None
  c = quant.QuantConfig(bits=4, group_size=64)
  assert dataclasses.replace(c, bits=8).group_size == 64
  with pytest.raises(ValueError, match=r'quant\.group_size'):
    quant.quantize_weight(
      jnp.ones((192, 8)),
      quant.QuantConfig(bits=4, group_size=128),
      rank=2,
      n_contract=1,
      contract_first=True,
      name='w_down',
    )

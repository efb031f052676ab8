"""GGUF loading, dequantization, RoPE un-permutation, tokenizer and export.

Tiny GGUF files are written here with ``gguf.GGUFWriter``. Quantized tensors are raw ggml
blocks built in numpy (random bytes, finite f16 scales); the expected weights come from an
independent numpy dequantizer written below from the ggml block layouts (ggml-quants.c
``dequantize_row_*``), not from ``gguf.quants``. Logits are compared against an independent
numpy Llama forward on HF-ordered weights, so a missing q/k un-permutation fails.
"""

from __future__ import annotations

import json
import re
import struct

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from specrl import faults
from specrl import model as model_lib
from specrl.checkpoints import hf, pretrained
from specrl.checkpoints.gguf import (
  config_json_from_gguf,
  export_gguf_to_hf,
  load_gguf_checkpoint,
)
from specrl.checkpoints.gguf_tokenizer import tokenizer_from_gguf

Q = gguf.GGMLQuantizationType
V, D, L, H, K, DH, F = 64, 256, 2, 4, 2, 64, 512
EPS, THETA = 1e-5, 10000.0


# ----------------------------------------------------------------- independent dequantizer


def _f16(b: np.ndarray) -> np.ndarray:
  """[nb, 2] uint8 -> [nb, 1] float32."""
  return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _scale_min_k4(scales: np.ndarray, j: int):
  """ggml get_scale_min_k4 on [nb, 12] uint8 -> ([nb, 1], [nb, 1])."""
  s = scales.astype(np.int32)
  if j < 4:
    sc, m = s[:, j] & 63, s[:, j + 4] & 63
  else:
    sc = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
    m = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
  return sc[:, None].astype(np.float32), m[:, None].astype(np.float32)


def ref_dequant(blocks: np.ndarray, qtype) -> np.ndarray:
  """[nb, bytes] uint8 blocks -> [nb, block_size] float32, straight from the C loops."""
  b = blocks
  if qtype == Q.Q8_0:
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)
  if qtype in (Q.Q4_0, Q.Q4_1):
    off = 2 if qtype == Q.Q4_0 else 4
    qs = b[:, off:].astype(np.int32)
    lo, hi = qs & 0xF, qs >> 4
    d = _f16(b[:, :2])
    if qtype == Q.Q4_0:
      return np.concatenate([d * (lo - 8), d * (hi - 8)], axis=1)
    m = _f16(b[:, 2:4])
    return np.concatenate([d * lo + m, d * hi + m], axis=1)
  if qtype in (Q.Q4_K, Q.Q5_K):
    d, dmin, scales = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:16]
    qh = b[:, 16:48].astype(np.int32) if qtype == Q.Q5_K else None
    qs = b[:, 48:] if qtype == Q.Q5_K else b[:, 16:]
    out = []
    for c in range(4):
      q = qs[:, 32 * c : 32 * c + 32].astype(np.int32)
      for half, (vals, bit) in enumerate(((q & 0xF, 1 << (2 * c)), (q >> 4, 2 << (2 * c)))):
        if qh is not None:
          vals = vals + np.where(qh & bit, 16, 0)
        sc, m = _scale_min_k4(scales, 2 * c + half)
        out.append(d * sc * vals - dmin * m)
    return np.concatenate(out, axis=1)
  if qtype == Q.Q6_K:
    ql, qh = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    y = np.zeros((b.shape[0], 256), np.float32)
    for n in range(2):
      lq, hq, s = ql[:, 64 * n :], qh[:, 32 * n :], sc[:, 8 * n :]
      for l in range(32):
        i = l // 16
        q1 = ((lq[:, l] & 0xF) | (((hq[:, l] >> 0) & 3) << 4)) - 32
        q2 = ((lq[:, l + 32] & 0xF) | (((hq[:, l] >> 2) & 3) << 4)) - 32
        q3 = ((lq[:, l] >> 4) | (((hq[:, l] >> 4) & 3) << 4)) - 32
        q4 = ((lq[:, l + 32] >> 4) | (((hq[:, l] >> 6) & 3) << 4)) - 32
        base = 128 * n + l
        y[:, base] = d[:, 0] * s[:, i] * q1
        y[:, base + 32] = d[:, 0] * s[:, i + 2] * q2
        y[:, base + 64] = d[:, 0] * s[:, i + 4] * q3
        y[:, base + 96] = d[:, 0] * s[:, i + 6] * q4
    return y
  raise NotImplementedError(qtype)


# (block size, bytes per block, byte ranges holding f16 scales)
_LAYOUT = {
  Q.Q8_0: (32, 34, [(0, 2)]),
  Q.Q4_0: (32, 18, [(0, 2)]),
  Q.Q4_1: (32, 20, [(0, 2), (2, 4)]),
  Q.Q4_K: (256, 144, [(0, 2), (2, 4)]),
  Q.Q5_K: (256, 176, [(0, 2), (2, 4)]),
  Q.Q6_K: (256, 210, [(208, 210)]),
}


def random_tensor(rng, shape, qtype):
  """-> (array to write, raw_dtype or None, expected float32 values of ``shape``)."""
  rows, cols = shape if len(shape) == 2 else (1, shape[0])
  if qtype == Q.F32:
    w = rng.normal(0, 0.05, shape).astype(np.float32)
    return w, None, w
  if qtype == Q.F16:
    w = rng.normal(0, 0.05, shape).astype(np.float16)
    return w, None, w.astype(np.float32)
  if qtype == Q.BF16:
    w = rng.normal(0, 0.05, shape).astype(ml_dtypes.bfloat16)
    return w.view(np.uint8).reshape(rows, -1), Q.BF16, w.astype(np.float32)
  bs, nbytes, f16_at = _LAYOUT[qtype]
  nb = rows * cols // bs
  blocks = rng.integers(0, 256, (nb, nbytes), dtype=np.uint8)
  magnitude = {Q.Q8_0: 4e-4, Q.Q4_0: 5e-3, Q.Q4_1: 5e-3, Q.Q6_K: 2e-4}.get(qtype, 6e-5)
  for a, b in f16_at:
    scale = rng.uniform(0.5, 1.0, nb) * magnitude
    blocks[:, a:b] = scale.astype(np.float16).view(np.uint8).reshape(nb, 2)
  if qtype == Q.Q4_1:  # min: centre the weights around zero
    blocks[:, 2:4] = (
      (-7.5 * _f16(blocks[:, :2])[:, 0]).astype(np.float16).view(np.uint8).reshape(nb, 2)
    )
  expected = ref_dequant(blocks, qtype).reshape(shape)
  return blocks.reshape(rows, -1), qtype, expected


# ------------------------------------------------------------------- tiny GGUF and forward


def _hf_rows(w_gguf: np.ndarray, n_heads: int) -> np.ndarray:
  """GGUF (interleaved pairs) -> HF (rotate-half) row order, via explicit row indices."""
  half = DH // 2
  idx = np.empty(n_heads * DH, np.int64)
  for h in range(n_heads):
    for i in range(half):
      idx[h * DH + i] = h * DH + 2 * i
      idx[h * DH + half + i] = h * DH + 2 * i + 1
  return w_gguf[idx]


LAYER_QTYPES = [
  {
    'attn_q': Q.Q4_K,
    'attn_k': Q.Q5_K,
    'attn_v': Q.Q6_K,
    'attn_output': Q.Q4_0,
    'ffn_gate': Q.Q4_1,
    'ffn_up': Q.F16,
    'ffn_down': Q.BF16,
  },
  {
    'attn_q': Q.Q6_K,
    'attn_k': Q.Q8_0,
    'attn_v': Q.Q4_1,
    'attn_output': Q.Q5_K,
    'ffn_gate': Q.Q4_0,
    'ffn_up': Q.Q4_K,
    'ffn_down': Q.F32,
  },
]


def write_tiny_gguf(path, *, skip=(), bad_shape=None, arch='llama', tokenizer=None):
  """Write a 2-layer Llama GGUF with mixed quant types; return expected HF-layout weights."""
  rng = np.random.default_rng(0)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(L)
  w.add_context_length(128)
  w.add_embedding_length(D)
  w.add_feed_forward_length(F)
  w.add_head_count(H)
  w.add_head_count_kv(K)
  w.add_rope_freq_base(THETA)
  w.add_layer_norm_rms_eps(EPS)
  w.add_rope_dimension_count(DH)
  if tokenizer:
    tokenizer(w)
  hf_w = {}

  def add(name, shape, qtype, hf_key, n_heads=None):
    if name in skip:
      return
    if name == bad_shape:
      shape = (shape[0] - 32, *shape[1:])
    data, raw, expected = random_tensor(rng, shape, qtype)
    w.add_tensor(name, data, raw_dtype=raw)
    if name != bad_shape:
      hf_w[hf_key] = _hf_rows(expected, n_heads) if n_heads else expected

  add('token_embd.weight', (V, D), Q.Q8_0, 'embed')
  add('output_norm.weight', (D,), Q.F32, 'final_norm')
  add('output.weight', (V, D), Q.Q6_K, 'lm_head')
  for i, qt in enumerate(LAYER_QTYPES):
    p = f'blk.{i}.'
    add(p + 'attn_norm.weight', (D,), Q.F32, (i, 'attn_norm'))
    add(p + 'ffn_norm.weight', (D,), Q.F32, (i, 'mlp_norm'))
    permuted = arch == 'llama'  # llama.cpp permutes q/k rows for Llama only
    add(p + 'attn_q.weight', (H * DH, D), qt['attn_q'], (i, 'q'), H if permuted else None)
    add(p + 'attn_k.weight', (K * DH, D), qt['attn_k'], (i, 'k'), K if permuted else None)
    if arch == 'qwen2':
      add(p + 'attn_q.bias', (H * DH,), Q.F32, (i, 'bq'))
      add(p + 'attn_k.bias', (K * DH,), Q.F32, (i, 'bk'))
      add(p + 'attn_v.bias', (K * DH,), Q.F32, (i, 'bv'))
    if arch == 'qwen3':
      add(p + 'attn_q_norm.weight', (DH,), Q.F32, (i, 'q_norm'))
      add(p + 'attn_k_norm.weight', (DH,), Q.F32, (i, 'k_norm'))
    add(p + 'attn_v.weight', (K * DH, D), qt['attn_v'], (i, 'v'))
    add(p + 'attn_output.weight', (D, H * DH), qt['attn_output'], (i, 'o'))
    add(p + 'ffn_gate.weight', (F, D), qt['ffn_gate'], (i, 'gate'))
    add(p + 'ffn_up.weight', (F, D), qt['ffn_up'], (i, 'up'))
    add(p + 'ffn_down.weight', (D, F), qt['ffn_down'], (i, 'down'))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return hf_w


def numpy_llama_forward(w: dict, tokens: np.ndarray) -> np.ndarray:
  """Independent HF-Llama forward (rotate-half RoPE, GQA, RMSNorm, SwiGLU) in float64."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}

  def norm(x, g):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * g

  t = len(tokens)
  inv = THETA ** (-np.arange(0, DH, 2) / DH)
  ang = np.arange(t)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rope(x):  # [T, n, DH]
    rot = np.concatenate([-x[..., DH // 2 :], x[..., : DH // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]

  x = w['embed'][tokens]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(L):
    h = norm(x, w[(i, 'attn_norm')])
    q, k, v = (h @ w[(i, n)].T + w.get((i, 'b' + n), 0.0) for n in 'qkv')
    q, k, v = q.reshape(t, H, DH), k.reshape(t, K, DH), v.reshape(t, K, DH)
    if (i, 'q_norm') in w:
      q, k = norm(q, w[(i, 'q_norm')]), norm(k, w[(i, 'k_norm')])
    q, k = rope(q), rope(k)
    k, v = np.repeat(k, H // K, 1), np.repeat(v, H // K, 1)
    s = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(DH)
    s = np.where(causal, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    x = x + np.einsum('hqk,khd->qhd', p, v).reshape(t, H * DH) @ w[(i, 'o')].T
    h = norm(x, w[(i, 'mlp_norm')])
    g = h @ w[(i, 'gate')].T
    x = x + ((g / (1 + np.exp(-g))) * (h @ w[(i, 'up')].T)) @ w[(i, 'down')].T
  return norm(x, w['final_norm']) @ w['lm_head'].T


@pytest.mark.parametrize('arch', ['llama', 'qwen2', 'qwen3'])
def test_mixed_quant_gguf_matches_numpy_forward(tmp_path, arch):
  path = tmp_path / 'tiny.gguf'
  expected = write_tiny_gguf(path, arch=arch)
  cfg, params = load_gguf_checkpoint(str(path))
  assert (cfg.qkv_bias, cfg.qk_norm) == (arch == 'qwen2', arch == 'qwen3')
  assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (V, D, L, H, K)
  assert (cfg.d_ff, cfg.rope_theta, cfg.tie_embeddings) == (F, THETA, False)
  # Dequantized values per type, tensor by tensor, against the independent dequantizer.
  np.testing.assert_allclose(np.asarray(params['embed']), expected['embed'], rtol=0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(params['lm_head']), expected['lm_head'].T, atol=1e-7)
  for i in range(L):
    lay = {k: np.asarray(v[i]) for k, v in params['layers'].items()}
    np.testing.assert_allclose(lay['wv'], expected[(i, 'v')].T.reshape(D, K, DH), atol=1e-7)
    np.testing.assert_allclose(lay['wo'], expected[(i, 'o')].T.reshape(H, DH, D), atol=1e-7)
    np.testing.assert_allclose(lay['w_gate'], expected[(i, 'gate')].T, atol=1e-7)
    np.testing.assert_allclose(lay['w_up'], expected[(i, 'up')].T, atol=1e-7)
    np.testing.assert_allclose(lay['w_down'], expected[(i, 'down')].T, atol=1e-7)
    np.testing.assert_allclose(lay['wq'], expected[(i, 'q')].T.reshape(D, H, DH), atol=1e-7)
    np.testing.assert_allclose(lay['wk'], expected[(i, 'k')].T.reshape(D, K, DH), atol=1e-7)
  tokens = np.array([3, 17, 5, 60, 1, 42, 9, 33], np.int32)
  want = numpy_llama_forward(expected, tokens)
  got, _ = model_lib.forward(
    params, cfg, jnp.asarray(tokens)[None], jnp.arange(len(tokens), dtype=jnp.int32)[None]
  )
  got = np.asarray(got[0], np.float64)
  assert np.std(want) > 1e-2  # the comparison is not between two near-zero tensors
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_export_to_hf_round_trips(tmp_path):
  path = tmp_path / 'tiny.gguf'
  write_tiny_gguf(path)
  cfg, params = load_gguf_checkpoint(str(path))
  export_gguf_to_hf(str(path), str(tmp_path / 'hf'))
  with open(tmp_path / 'hf' / 'config.json') as f:
    assert json.load(f)['model_type'] == 'llama'
  cfg2, params2 = hf.load_hf_checkpoint(str(tmp_path / 'hf'))
  assert cfg2 == cfg
  for a, b in zip(
    np.asarray(params['layers']['wq']), np.asarray(params2['layers']['wq']), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(np.asarray(params['embed']), np.asarray(params2['embed']))


@pytest.mark.parametrize(
  'kwargs,match',
  [
    ({'bad_shape': 'blk.1.attn_k.weight'}, 'blk.1.attn_k.weight'),
    ({'skip': ('blk.0.ffn_up.weight',)}, 'blk.0.ffn_up.weight'),
    ({'skip': ('output_norm.weight',)}, 'output_norm.weight'),
  ],
)
def test_wrong_or_missing_tensor_is_named(tmp_path, kwargs, match):
  path = tmp_path / 'bad.gguf'
  write_tiny_gguf(path, **kwargs)
  with pytest.raises(ValueError, match=match.replace('.', r'\.')):
    load_gguf_checkpoint(str(path))


def test_unsupported_architecture_is_refused(tmp_path):
  path = tmp_path / 'gemma.gguf'
  write_tiny_gguf(path, arch='gemma')
  with pytest.raises(ValueError, match='general.architecture'):
    load_gguf_checkpoint(str(path))


@pytest.mark.parametrize(
  'meta,match',
  [
    ({'llama.attention.head_count': 0}, r'llama\.attention\.head_count=0 must be > 0'),
    ({'llama.attention.head_count_kv': 3}, r'head_count_kv=3 must be a positive divisor'),
    ({'llama.attention.head_count_kv': 0}, r'head_count_kv=0 must be a positive divisor'),
  ],
)
def test_bad_head_counts_are_named_not_a_division_error(meta, match):
  """A GGUF whose head counts are 0 or do not divide (a corrupt or hand-edited header)
  fails naming the metadata key, not with ZeroDivisionError or a reshape error later."""
  base = {
    'general.architecture': 'llama',
    'llama.embedding_length': 32,
    'llama.attention.head_count': 4,
    'llama.attention.head_count_kv': 2,
    'llama.block_count': 2,
    'llama.feed_forward_length': 64,
  }
  with pytest.raises(ValueError, match=match):
    config_json_from_gguf({**base, **meta}, set(), 16)


# ------------------------------------------------------------------------------ tokenizer


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table."""
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
MERGES = ['h e', 'l l', 'he ll', 'hell o', 'Ġ w', 'o r', 'Ġw or', 'l d', 'Ġwor ld', '1 2']
CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
  " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer_metadata(pre='smollm'):
  byte_chars = list(_bytes_to_unicode().values())
  merged = [m.replace(' ', '') for m in MERGES]
  tokens = SPECIALS + byte_chars + merged
  types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))

  def add(w):
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    w.add_chat_template(CHATML)

  return add, tokens


def _write_tokenizer_gguf(path, pre='smollm'):
  add, tokens = _tokenizer_metadata(pre)
  w = gguf.GGUFWriter(str(path), 'llama')
  add(w)
  w.add_tensor('token_embd.weight', np.zeros((len(tokens), 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return tokens


def test_gguf_tokenizer_bpe_digits_specials_and_chat(tmp_path):
  path = tmp_path / 'tok.gguf'
  tokens = _write_tokenizer_gguf(path)
  tok = tokenizer_from_gguf(str(path))
  ids = tok.encode('hello world')
  assert [tokens[i] for i in ids] == ['hello', 'Ġworld']
  # smollm splits digits individually, so the '1 2' merge never applies...
  assert [tokens[i] for i in tok.encode('12')] == ['1', '2']
  # ...while gpt-2's rule keeps digit runs together.
  _write_tokenizer_gguf(tmp_path / 'gpt2.gguf', pre='gpt-2')
  assert [tokens[i] for i in tokenizer_from_gguf(str(tmp_path / 'gpt2.gguf')).encode('12')] == [
    '12'
  ]
  assert tok.encode('<|im_start|>hello<|im_end|>') == [1, tokens.index('hello'), 2]
  for s in ['héllo wörld 😀', '  spaced\n\ttabs 007', 'ümlaut — dash', '']:
    assert tok.decode(tok.encode(s)) == s
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 0, 0)
  assert tok.eos_ids == (0, 2)  # eos plus the chat template's <|im_end|>
  chat = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}])
  assert chat == '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
  # The HF-directory interface reads back the same tokenizer and template.
  tok.save_pretrained(str(tmp_path / 'hf'))
  back = hf.load_tokenizer(str(tmp_path / 'hf'))
  assert back.encode('hello world 12') == tok.encode('hello world 12')
  assert (back.eos_ids, back.bos_id, back.pad_id) == (tok.eos_ids, 1, 0)
  assert back.apply_chat_template([{'role': 'user', 'content': 'hi'}]) == chat


def test_unknown_pre_tokenizer_is_refused(tmp_path):
  path = tmp_path / 'tok.gguf'
  _write_tokenizer_gguf(path, pre='mystery-bpe')
  with pytest.raises(ValueError, match="tokenizer.ggml.pre='mystery-bpe'"):
    tokenizer_from_gguf(str(path))


def test_tokenizer_vocab_and_embedding_mismatch_is_named(tmp_path):
  add, _ = _tokenizer_metadata()
  path = tmp_path / 'tiny.gguf'
  # Tokenizer vocab (3 + 256 + 10) != V: the metadata's token count sets the vocab, so the
  # embedding shape mismatch must be reported by name.
  write_tiny_gguf(path, tokenizer=add)
  with pytest.raises(ValueError, match=r'token_embd\.weight'):
    load_gguf_checkpoint(str(path))


# ------------------------------------------------------------------------ malformed files


def write_broken_ggufs(directory) -> dict[str, str]:
  """Broken copies of a tiny Llama GGUF (with a tokenizer in its metadata): case -> path.

  The cases of issue 24: empty, bad magic, header only (up to the tensor data; and just the
  24 fixed bytes), half the file, the last 1000 bytes cut, random bytes, an absurd tensor
  count; plus random bytes after a valid fixed header (garbage metadata).
  """
  good = directory / 'good.gguf'
  add, _ = _tokenizer_metadata()
  write_tiny_gguf(good, tokenizer=add)
  data = good.read_bytes()
  data_offset = gguf.GGUFReader(str(good)).data_offset
  rng = np.random.default_rng(0)
  cases = {
    'empty': b'',
    'bad_magic': b'GGML' + data[4:],
    'header_only': data[:data_offset],
    'fixed_header_only': data[:24],
    'half': data[: len(data) // 2],
    'last_1000_cut': data[:-1000],
    'random': rng.bytes(4096),
    'absurd_tensor_count': data[:8] + struct.pack('<Q', 2**40) + data[16:],
    'garbage_metadata': data[:24] + rng.bytes(4096),
  }
  paths = {}
  for case, blob in cases.items():
    paths[case] = str(directory / f'{case}.gguf')
    with open(paths[case], 'wb') as f:
      f.write(blob)
  return paths


# case -> what the one-line message must say after '<path>: '
BROKEN_GGUF_MESSAGES = {
  'empty': r'empty file, not a GGUF file',
  'bad_magic': r"not a GGUF file \(starts with b'GGML'",
  'header_only': r'truncated GGUF file: tensor token_embd\.weight needs bytes \d+\.\.\d+ but '
  r'the file has \d+ \(21 of 21 tensors end past it\)',
  'fixed_header_only': r'corrupted GGUF header: 21 tensors and \d+ metadata entries cannot fit',
  'half': r'truncated GGUF file: tensor blk\.\d\.\S+ needs bytes',
  'last_1000_cut': r'truncated GGUF file: tensor blk\.1\.ffn_down\.weight needs bytes .* '
  r'\(1 of 21 tensors',
  'random': r'not a GGUF file',
  'absurd_tensor_count': r'corrupted GGUF header: 1099511627776 tensors',
  'garbage_metadata': r'(truncated or )?corrupted GGUF file: metadata',
}


@pytest.fixture(scope='module')
def broken_ggufs(tmp_path_factory):
  return write_broken_ggufs(tmp_path_factory.mktemp('broken'))


@pytest.mark.parametrize('case', sorted(BROKEN_GGUF_MESSAGES))
def test_broken_gguf_is_one_line_naming_the_file_for_weights_and_tokenizer(broken_ggufs, case):
  path = broken_ggufs[case]
  messages = []
  for load in (
    load_gguf_checkpoint,
    tokenizer_from_gguf,
    pretrained.load_pretrained,
    pretrained.load_tokenizer,
  ):
    with pytest.raises(faults.DataError) as e:  # a FatalError: main.py prints one line
      load(path)
    messages.append(str(e.value))
  assert len(set(messages)) == 1, messages  # the same message whichever loads it
  msg = messages[0]
  assert msg.startswith(f'{path}: ') and '\n' not in msg, msg
  assert re.match(BROKEN_GGUF_MESSAGES[case], msg[len(path) + 2 :]), msg


def test_corrupted_tokenizer_strings_and_merges_name_the_file_and_key(tmp_path):
  good = tmp_path / 'tok.gguf'
  _write_tokenizer_gguf(good)
  data = good.read_bytes()
  cases = [  # (file, bytes replaced, by, message): a token that is not UTF-8; a merge whose
    # result is not in the vocabulary
    ('not_utf8.gguf', b'hello', b'\xffello', r"metadata 'tokenizer\.ggml\.tokens' is not UTF-8"),
    ('bad_merge.gguf', b'hell o', b'hell x', r'do not form a BPE vocabulary'),
  ]
  for name, old, new, match in cases:
    blob = data.replace(old, new, 1)
    assert blob != data
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(faults.DataError, match=match) as e:
      tokenizer_from_gguf(str(path))
    assert str(e.value).startswith(f'{path}: corrupted GGUF') and '\n' not in str(e.value)

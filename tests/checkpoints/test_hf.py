"""HF checkpoint import/export: layout mapping, round trips, validation and tokenizer.

Tiny checkpoints are built in ``tmp_path``; nothing is downloaded. The key test compares the
loaded model against an independent numpy re-implementation of the HF Llama/Qwen forward
written directly on the raw HF tensors (``x @ W.T``, rotate_half RoPE, repeat_kv), which
proves the name/transpose/reshape mapping rather than mere save/load self-consistency.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from specrl import model as M
from specrl.checkpoints import hf

TINY = {
  'vocab_size': 48,
  'd_model': 32,
  'n_layers': 2,
  'n_heads': 4,
  'n_kv_heads': 2,
  'head_dim': 8,
  'd_ff': 40,
}


def _random_params(cfg: M.ModelConfig, seed: int = 0) -> M.Params:
  """Random params in ``cfg.param_dtype`` (numpy; init_params is slow eagerly on CPU).

  Norms and biases are random too, so a swapped or dropped norm/bias cannot go unnoticed.
  """
  rng = np.random.default_rng(seed)
  dt = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}[cfg.param_dtype]

  def leaf(shape):
    scale = 1.0 if len(shape) < 2 else 1.0 / np.sqrt(shape[-2] if len(shape) > 2 else 32)
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(dt))

  return jax.tree.map(leaf, M.param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))


_jit_forward = jax.jit(M.forward, static_argnums=1)


def _logits(cfg, params, tokens):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits, _ = _jit_forward(params, cfg, jnp.asarray(tokens), positions)
  return np.asarray(logits)


def _tokens(cfg, b=2, t=7, seed=0):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)


def _assert_same_params(a, b):
  ja, jb = jax.tree.structure(a), jax.tree.structure(b)
  assert ja == jb, (ja, jb)
  for (path, x), y in zip(jax.tree.flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype, (path, x.dtype, y.dtype)
    assert x.shape == y.shape, (path, x.shape, y.shape)
    np.testing.assert_array_equal(
      np.asarray(x).astype(np.float32), np.asarray(y).astype(np.float32), err_msg=str(path)
    )


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
  'overrides',
  [
    pytest.param({'tie_embeddings': True}, id='llama_tied_f32'),
    pytest.param({'tie_embeddings': False, 'qkv_bias': True}, id='qwen2_bias_untied'),
    pytest.param({'tie_embeddings': True, 'qk_norm': True}, id='qwen3_qk_norm'),
    pytest.param({'tie_embeddings': False, 'param_dtype': 'bfloat16'}, id='llama_bf16'),
  ],
)
def test_round_trip(tmp_path, overrides):
  cfg = M.ModelConfig(**TINY, **overrides)
  params = _random_params(cfg)
  hf.save_hf_checkpoint(str(tmp_path), cfg, params)
  with open(tmp_path / 'config.json') as f:
    cj = json.load(f)
  want_type = 'qwen3' if cfg.qk_norm else 'qwen2' if cfg.qkv_bias else 'llama'
  assert cj['model_type'] == want_type

  cfg2, params2 = hf.load_hf_checkpoint(str(tmp_path))
  assert cfg2 == cfg
  _assert_same_params(params, params2)
  tokens = _tokens(cfg)
  np.testing.assert_array_equal(_logits(cfg, params, tokens), _logits(cfg2, params2, tokens))


def test_bf16_checkpoint(tmp_path):
  cfg = M.ModelConfig(**TINY, param_dtype='bfloat16')
  params = _random_params(cfg, seed=3)
  hf.save_hf_checkpoint(str(tmp_path), cfg, params)
  fpath = str(tmp_path / 'model.safetensors')
  with safe_open(fpath, framework='np') as f:
    assert f.get_slice('model.embed_tokens.weight').get_dtype() == 'BF16'
    names = list(f.keys())  # safe_open is not iterable
    via_lib = {k: f.get_tensor(k) for k in names}
  # The raw fallback reader (for safetensors versions without numpy bf16) agrees bit-exactly.
  via_raw = hf.read_safetensors_raw(fpath)
  assert set(via_raw) == set(via_lib)
  for k, v in via_raw.items():
    assert v.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(v.view(np.uint16), via_lib[k].view(np.uint16), err_msg=k)

  cfg_bf, p_bf = hf.load_hf_checkpoint(str(tmp_path))
  assert cfg_bf.param_dtype == 'bfloat16'
  assert p_bf['embed'].dtype == jnp.bfloat16
  _assert_same_params(params, p_bf)
  # dtype override upcasts exactly; host (numpy) loading for sharded device_put.
  cfg32, p32 = hf.load_hf_checkpoint(str(tmp_path), dtype=jnp.float32, to_device=False)
  assert cfg32.param_dtype == 'float32'
  assert isinstance(p32['layers']['wq'], np.ndarray) and p32['layers']['wq'].dtype == np.float32
  np.testing.assert_array_equal(p32['layers']['wq'], np.asarray(p_bf['layers']['wq'], np.float32))


def test_sharded_round_trip(tmp_path):
  cfg = M.ModelConfig(**TINY, tie_embeddings=False, qkv_bias=True)
  params = _random_params(cfg, seed=5)
  hf.save_hf_checkpoint(str(tmp_path), cfg, params, max_shard_bytes=12_000)
  shards = sorted(n for n in os.listdir(tmp_path) if n.endswith('.safetensors'))
  assert len(shards) > 2 and 'model.safetensors' not in shards
  with open(tmp_path / 'model.safetensors.index.json') as f:
    index = json.load(f)
  assert set(index['weight_map'].values()) == set(shards)
  cfg2, params2 = hf.load_hf_checkpoint(str(tmp_path))
  assert cfg2 == cfg
  _assert_same_params(params, params2)
  tokens = _tokens(cfg)
  np.testing.assert_array_equal(_logits(cfg, params, tokens), _logits(cfg2, params2, tokens))

  # An index that points at a shard that is not there fails loudly.
  os.remove(tmp_path / shards[-1])
  with pytest.raises(FileNotFoundError, match=shards[-1]):
    hf.load_hf_checkpoint(str(tmp_path))


# ----------------------------------------------------------------------------- HF reference


def _np_rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x):
  h = x.shape[-1] // 2
  return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _hf_reference_logits(t: dict, c: dict, tokens: np.ndarray) -> np.ndarray:
  """HF LlamaForCausalLM / Qwen2 / Qwen3 forward in float64 numpy on raw HF tensors.

  t: ``{hf_name: array}``; c: config.json dict; tokens [T]. Returns logits [T, V].
  """
  D, H = c['hidden_size'], c['num_attention_heads']
  K, Dh, eps = c['num_key_value_heads'], c['head_dim'], c['rms_norm_eps']
  T = tokens.shape[0]
  g = {k: np.asarray(v, np.float64) for k, v in t.items()}
  x = g['model.embed_tokens.weight'][tokens]  # [T, D]
  inv_freq = 1.0 / (c['rope_theta'] ** (np.arange(0, Dh, 2) / Dh))
  freqs = np.arange(T)[:, None] * inv_freq[None]
  emb = np.concatenate([freqs, freqs], axis=-1)  # [T, Dh]
  cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]
  causal = np.tril(np.ones((T, T), bool))
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}.'
    h = _np_rms(x, g[p + 'input_layernorm.weight'], eps)
    q = h @ g[p + 'self_attn.q_proj.weight'].T
    k = h @ g[p + 'self_attn.k_proj.weight'].T
    v = h @ g[p + 'self_attn.v_proj.weight'].T
    if p + 'self_attn.q_proj.bias' in g:
      q = q + g[p + 'self_attn.q_proj.bias']
      k = k + g[p + 'self_attn.k_proj.bias']
      v = v + g[p + 'self_attn.v_proj.bias']
    q, k, v = q.reshape(T, H, Dh), k.reshape(T, K, Dh), v.reshape(T, K, Dh)
    if p + 'self_attn.q_norm.weight' in g:
      q = _np_rms(q, g[p + 'self_attn.q_norm.weight'], eps)
      k = _np_rms(k, g[p + 'self_attn.k_norm.weight'], eps)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)  # HF repeat_kv
    s = np.einsum('thd,shd->hts', q, k) / np.sqrt(Dh)
    s = np.where(causal[None], s, -np.inf)
    prob = np.exp(s - s.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    o = np.einsum('hts,shd->thd', prob, v).reshape(T, H * Dh)
    x = x + o @ g[p + 'self_attn.o_proj.weight'].T
    h = _np_rms(x, g[p + 'post_attention_layernorm.weight'], eps)
    gate = h @ g[p + 'mlp.gate_proj.weight'].T
    up = h @ g[p + 'mlp.up_proj.weight'].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ g[p + 'mlp.down_proj.weight'].T
  x = _np_rms(x, g['model.norm.weight'], eps)
  head = g.get('lm_head.weight', g['model.embed_tokens.weight'])
  assert head.shape == (c['vocab_size'], D)
  return x @ head.T


def _random_hf_tensors(c: dict, seed: int) -> dict[str, np.ndarray]:
  """Raw HF-layout tensors for config dict ``c``, built by hand (not via save_hf_checkpoint)."""
  rng = np.random.default_rng(seed)
  D, H, K = c['hidden_size'], c['num_attention_heads'], c['num_key_value_heads']
  Dh, F, V = c['head_dim'], c['intermediate_size'], c['vocab_size']

  def w(*shape, scale=None):
    scale = 1.0 / np.sqrt(shape[-1]) if scale is None else scale
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  def norm(n):
    return (1.0 + 0.3 * rng.standard_normal(n)).astype(np.float32)

  t = {'model.embed_tokens.weight': w(V, D, scale=1.0), 'model.norm.weight': norm(D)}
  if not c['tie_word_embeddings']:
    t['lm_head.weight'] = w(V, D)
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}.'
    t[p + 'input_layernorm.weight'] = norm(D)
    t[p + 'self_attn.q_proj.weight'] = w(H * Dh, D)
    t[p + 'self_attn.k_proj.weight'] = w(K * Dh, D)
    t[p + 'self_attn.v_proj.weight'] = w(K * Dh, D)
    t[p + 'self_attn.o_proj.weight'] = w(D, H * Dh)
    if c['model_type'] == 'qwen2':
      t[p + 'self_attn.q_proj.bias'] = w(H * Dh, scale=0.5)
      t[p + 'self_attn.k_proj.bias'] = w(K * Dh, scale=0.5)
      t[p + 'self_attn.v_proj.bias'] = w(K * Dh, scale=0.5)
    if c['model_type'] == 'qwen3':
      t[p + 'self_attn.q_norm.weight'] = norm(Dh)
      t[p + 'self_attn.k_norm.weight'] = norm(Dh)
    t[p + 'post_attention_layernorm.weight'] = norm(D)
    t[p + 'mlp.gate_proj.weight'] = w(F, D)
    t[p + 'mlp.up_proj.weight'] = w(F, D)
    t[p + 'mlp.down_proj.weight'] = w(D, F)
  return t


def _hf_config(model_type: str, tied: bool) -> dict:
  return {
    'model_type': model_type,
    'vocab_size': 40,
    'hidden_size': 24,
    'num_hidden_layers': 2,
    'num_attention_heads': 6,
    'num_key_value_heads': 2,
    'head_dim': 8,  # != hidden_size / heads: exercises the explicit head_dim path
    'intermediate_size': 36,
    'hidden_act': 'silu',
    'rope_theta': 500.0,
    'rms_norm_eps': 1e-5,
    'tie_word_embeddings': tied,
    'torch_dtype': 'float32',
    'max_position_embeddings': 64,
  }


@pytest.mark.parametrize(
  'model_type,tied', [('llama', False), ('qwen2', True), ('qwen3', False), ('mistral', True)]
)
def test_matches_independent_hf_reference(tmp_path, model_type, tied):
  c = _hf_config(model_type, tied)
  t = _random_hf_tensors(c, seed=7)
  t['model.layers.0.self_attn.rotary_emb.inv_freq'] = np.ones(4, np.float32)  # ignored buffer
  save_file(t, str(tmp_path / 'model.safetensors'))
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(c, f)
  cfg, params = hf.load_hf_checkpoint(str(tmp_path))
  assert (cfg.qkv_bias, cfg.qk_norm, cfg.tie_embeddings) == (
    model_type == 'qwen2',
    model_type == 'qwen3',
    tied,
  )
  tokens = np.random.default_rng(1).integers(0, c['vocab_size'], 11).astype(np.int32)
  want = _hf_reference_logits(t, c, tokens)
  got = _logits(cfg, params, tokens[None])[0]
  assert np.abs(want).max() > 1.0  # not a degenerate all-zero comparison
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  # Export is the exact inverse on the HF side too.
  exported = hf.hf_state_dict(cfg, params)
  assert set(exported) == set(t) - {'model.layers.0.self_attn.rotary_emb.inv_freq'}
  for k, v in exported.items():
    np.testing.assert_array_equal(v, t[k], err_msg=k)


# ----------------------------------------------------------------------------- validation


def _rewrite(tmp_path, fn):
  fpath = str(tmp_path / 'model.safetensors')
  with safe_open(fpath, framework='np') as f:
    names = list(f.keys())  # safe_open is not iterable
    t = {k: f.get_tensor(k) for k in names}
  fn(t)
  save_file(t, fpath)


@pytest.fixture
def saved(tmp_path):
  cfg = M.ModelConfig(**TINY, tie_embeddings=False)
  params = _random_params(cfg, seed=9)
  hf.save_hf_checkpoint(str(tmp_path), cfg, params)
  return tmp_path, cfg, params


def test_wrong_shape_names_tensor(saved):
  tmp_path, _, _ = saved
  name = 'model.layers.1.self_attn.k_proj.weight'

  def bad(t):
    t[name] = np.zeros((8, 32), np.float32)

  _rewrite(tmp_path, bad)
  with pytest.raises(ValueError, match=r'model\.layers\.1\.self_attn\.k_proj\.weight') as e:
    hf.load_hf_checkpoint(str(tmp_path))
  assert '(8, 32)' in str(e.value) and '(16, 32)' in str(e.value)


def test_missing_tensor_names_it(saved):
  tmp_path, _, _ = saved
  _rewrite(tmp_path, lambda t: t.pop('model.layers.0.mlp.up_proj.weight'))
  with pytest.raises(ValueError, match=r'missing.*model\.layers\.0\.mlp\.up_proj\.weight'):
    hf.load_hf_checkpoint(str(tmp_path))


def test_unexpected_tensor_raises_but_inv_freq_is_ignored(saved):
  tmp_path, _cfg, params = saved

  def add_inv_freq(t):
    t['model.layers.1.self_attn.rotary_emb.inv_freq'] = np.ones(4, np.float32)

  _rewrite(tmp_path, add_inv_freq)
  _, loaded = hf.load_hf_checkpoint(str(tmp_path))
  _assert_same_params(params, loaded)

  def add_extra(t):
    t['model.layers.0.self_attn.o_proj.bias'] = np.zeros(32, np.float32)

  _rewrite(tmp_path, add_extra)
  with pytest.raises(ValueError, match=r'unexpected.*o_proj\.bias'):
    hf.load_hf_checkpoint(str(tmp_path))


def test_tied_checkpoint_with_redundant_lm_head(tmp_path):
  cfg = M.ModelConfig(**TINY, tie_embeddings=True)
  params = _random_params(cfg, seed=11)
  hf.save_hf_checkpoint(str(tmp_path), cfg, params)
  _rewrite(tmp_path, lambda t: t.update({'lm_head.weight': t['model.embed_tokens.weight']}))
  _, loaded = hf.load_hf_checkpoint(str(tmp_path))  # identical copy: accepted
  _assert_same_params(params, loaded)
  _rewrite(tmp_path, lambda t: t.update({'lm_head.weight': t['lm_head.weight'] + 1}))
  with pytest.raises(ValueError, match='lm_head.weight'):
    hf.load_hf_checkpoint(str(tmp_path))


def test_save_rejects_wrong_param_shape(tmp_path):
  cfg = M.ModelConfig(**TINY)
  params = _random_params(cfg)
  params['layers']['wo'] = params['layers']['wo'][:, :2]
  with pytest.raises(ValueError, match='layers/wo'):
    hf.save_hf_checkpoint(str(tmp_path), cfg, params)


# ----------------------------------------------------------------------------- config


def test_config_from_hf_qwen2_style():
  # Shape of a real Qwen2.5 config: no head_dim, sliding window declared but disabled.
  c = {
    'model_type': 'qwen2',
    'vocab_size': 151936,
    'hidden_size': 896,
    'num_hidden_layers': 24,
    'num_attention_heads': 14,
    'num_key_value_heads': 2,
    'intermediate_size': 4864,
    'hidden_act': 'silu',
    'rope_theta': 1000000.0,
    'rms_norm_eps': 1e-06,
    'tie_word_embeddings': True,
    'torch_dtype': 'bfloat16',
    'use_sliding_window': False,
    'sliding_window': 32768,
    'max_window_layers': 21,
    'max_position_embeddings': 32768,
    'rope_scaling': None,
  }
  cfg = hf.config_from_hf(c)
  assert cfg.head_dim == 64 and cfg.qkv_bias and not cfg.qk_norm and cfg.tie_embeddings
  assert cfg.param_dtype == 'bfloat16' and cfg.compute_dtype == 'float32'
  assert cfg.rope_theta == 1e6 and cfg.n_kv_heads == 2
  assert hf.config_from_hf(c, compute_dtype='bfloat16').compute_dtype == 'bfloat16'
  assert hf.config_from_hf({**c, 'rope_scaling': {'rope_type': 'default'}}) == cfg


@pytest.mark.parametrize(
  'change,field',
  [
    ({'model_type': 'gemma'}, 'model_type'),
    ({'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}}, 'rope_scaling'),
    ({'rope_scaling': {'type': 'linear', 'factor': 2.0}}, 'rope_scaling'),
    ({'model_type': 'mistral', 'sliding_window': 16}, 'sliding_window'),
    (
      {
        'model_type': 'qwen2',
        'use_sliding_window': True,
        'sliding_window': 16,
        'max_window_layers': 1,
      },
      'sliding_window',
    ),
    ({'hidden_act': 'gelu'}, 'hidden_act'),
    ({'attention_bias': True}, 'attention_bias'),
    ({'torch_dtype': 'float8_e4m3fn'}, 'torch_dtype'),
    ({'intermediate_size': None}, 'intermediate_size'),
  ],
)
def test_config_from_hf_rejects_unsupported(change, field):
  c = {**_hf_config('llama', False), **change}
  with pytest.raises(ValueError, match=field):
    hf.config_from_hf(c)


def test_config_inactive_sliding_window_is_accepted():
  # Mistral v0.3-style: sliding_window null; qwen2 with window >= max positions.
  hf.config_from_hf({**_hf_config('mistral', False), 'sliding_window': None})
  hf.config_from_hf(
    {**_hf_config('qwen2', False), 'use_sliding_window': True, 'sliding_window': 64}
  )


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=['<|pad|>', '<|bos|>', '<|eos|>', '<|eot|>'],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  corpus = ['the quick brown fox jumps over the lazy dog', 'speculative decoding is lossless']
  tok.train_from_iterator(corpus * 20, trainer=trainer)
  tok.save(str(tmp_path / 'tokenizer.json'))
  with open(tmp_path / 'tokenizer_config.json', 'w') as f:
    json.dump(
      {
        'bos_token': {'__type': 'AddedToken', 'content': '<|bos|>'},
        'eos_token': '<|eos|>',
        'pad_token': '<|pad|>',
      },
      f,
    )
  eot = tok.token_to_id('<|eot|>')
  with open(tmp_path / 'generation_config.json', 'w') as f:
    json.dump({'eos_token_id': [tok.token_to_id('<|eos|>'), eot]}, f)

  t = hf.load_tokenizer(str(tmp_path))
  assert (t.pad_id, t.bos_id, t.eos_id) == (0, 1, 2)
  assert t.eos_ids == (2, eot)
  assert t.vocab_size == tok.get_vocab_size(with_added_tokens=True)
  for text in ['the lazy fox', 'Speculative: 42 ünïcode!\n  spaces']:
    ids = t.encode(text)
    assert all(isinstance(i, int) for i in ids) and ids
    assert t.decode(ids) == text
  ids = [t.bos_id, *t.encode('the dog'), t.eos_id]
  assert t.decode(ids) == '<|bos|>the dog<|eos|>'
  assert t.decode(ids, skip_special_tokens=True) == 'the dog'


def test_tokenizer_without_special_token_files(tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  from tokenizers import models, pre_tokenizers

  vocab = {'[UNK]': 0, 'hello': 1, 'world': 2, '</s>': 3}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / 'tokenizer.json'))
  t = hf.load_tokenizer(str(tmp_path))
  assert (t.eos_id, t.pad_id, t.bos_id, t.eos_ids) == (None, None, None, ())
  assert t.encode('hello world') == [1, 2]
  assert t.decode([1, 2]) == 'hello world'
  with open(tmp_path / 'tokenizer_config.json', 'w') as f:
    json.dump({'eos_token': '<missing>'}, f)
  with pytest.raises(ValueError, match='eos_token'):
    hf.load_tokenizer(str(tmp_path))


def test_tokenizer_missing_library_says_how_to_install(tmp_path, monkeypatch):
  import sys

  monkeypatch.setitem(sys.modules, 'tokenizers', None)  # makes `import tokenizers` fail
  with pytest.raises(ImportError, match='pip install tokenizers'):
    hf.load_tokenizer(str(tmp_path))

"""GGUF checkpoints (llama.cpp's format) -> :mod:`specrl.model` params, and export to HF.

Why this exists: many small instruct models ship only as GGUF files (one file: metadata,
tokenizer, quantized tensors). Loading one means three translations, each a place where a
silent mistake gives plausible-looking garbage, so each is checked loudly:

1. **Config from metadata.** ``{arch}.block_count`` etc. are mapped to an HF ``config.json``
   dict and passed through :func:`specrl.checkpoints.hf_config.config_from_hf`, so every
   refusal there (unsupported RoPE scaling, biases we lack, ...) applies to GGUF too. GGUF-only
   features we cannot run (partial rotary, sliding windows, MoE, ``rope_freqs``) are refused here.
2. **Tensors.** Each GGUF tensor is renamed to its HF name, its shape checked against the
   config (error names the GGUF tensor), dequantized to float32 with ``gguf.quants`` (F32, F16,
   BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, ...) and cast to the param dtype.
3. **RoPE layout.** llama.cpp's converter permutes the rows of Llama's q/k projections from HF's
   rotate-half order to interleaved pairs; :func:`unpermute_rope_rows` undoes that (Qwen2/3
   GGUFs use the NeoX layout and are not permuted).

The HF-layout tensors then go through the same name -> params mapping as
:mod:`specrl.checkpoints.hf_params`, so a GGUF and the HF directory it was converted from give
the same params. GGUF shapes are listed innermost first (``ne0`` = input features); numpy shapes
here are the reverse, i.e. HF's ``[out, in]``.
"""

from __future__ import annotations

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from specrl.checkpoints.gguf_file import open_gguf
from specrl.checkpoints.gguf_tokenizer import reader_field_value, tokenizer_from_gguf
from specrl.checkpoints.hf_config import PARAM_NP_DTYPES, config_from_hf
from specrl.checkpoints.hf_params import hf_specs, put_tensor, save_hf_checkpoint
from specrl.model import ModelConfig, Params, param_shapes

# GGUF architectures we can run, as HF model_type.
GGUF_ARCHITECTURES = {'llama': 'llama', 'qwen2': 'qwen2', 'qwen3': 'qwen3'}

# Per-layer GGUF tensor name suffix -> HF name suffix (under ``model.layers.{i}.``).
_LAYER_NAMES = {
  'attn_norm.weight': 'input_layernorm.weight',
  'attn_q.weight': 'self_attn.q_proj.weight',
  'attn_k.weight': 'self_attn.k_proj.weight',
  'attn_v.weight': 'self_attn.v_proj.weight',
  'attn_output.weight': 'self_attn.o_proj.weight',
  'attn_q.bias': 'self_attn.q_proj.bias',
  'attn_k.bias': 'self_attn.k_proj.bias',
  'attn_v.bias': 'self_attn.v_proj.bias',
  'attn_q_norm.weight': 'self_attn.q_norm.weight',
  'attn_k_norm.weight': 'self_attn.k_norm.weight',
  'ffn_norm.weight': 'post_attention_layernorm.weight',
  'ffn_gate.weight': 'mlp.gate_proj.weight',
  'ffn_up.weight': 'mlp.up_proj.weight',
  'ffn_down.weight': 'mlp.down_proj.weight',
}
_GLOBAL_NAMES = {
  'token_embd.weight': 'model.embed_tokens.weight',
  'output_norm.weight': 'model.norm.weight',
  'output.weight': 'lm_head.weight',
}


def hf_name(gguf_name: str) -> str | None:
  """GGUF tensor name -> HF tensor name, or None if it is not one we know."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  parts = gguf_name.split('.', 2)
  if len(parts) == 3 and parts[0] == 'blk' and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
    return f'model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}'
  return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation (``convert_hf_to_gguf.LlamaModel.permute``).

  Per head, HF stores the rotary halves ``[x_0..x_{h-1}, y_0..y_{h-1}]`` (rotate-half); the
  converter interleaves them to ``[x_0, y_0, x_1, y_1, ...]`` for llama.cpp's normal RoPE.

  Args:
    w: ``[n_heads * head_dim, ...]`` weight (or bias) rows in GGUF order.
    n_heads: heads in this projection (KV heads for k).
  Returns:
    the same array with rows in HF order.
  """
  rows = w.shape[0]
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF -> GGUF row order; the inverse of :func:`unpermute_rope_rows` (for writing tests)."""
  rows = w.shape[0]
  half = rows // n_heads // 2
  return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_metadata(reader: gguf.GGUFReader) -> dict:
  """Every metadata field except the big tokenizer arrays, as plain Python values."""
  skip = ('tokenizer.ggml.tokens', 'tokenizer.ggml.merges', 'tokenizer.ggml.token_type')
  skip += ('tokenizer.ggml.scores',)
  return {k: reader_field_value(reader, k) for k in reader.fields if k not in skip}


def config_json_from_gguf(meta: dict, tensor_names: set[str], vocab_size: int) -> dict:
  """GGUF metadata -> an HF ``config.json`` dict (for :func:`config_from_hf`).

  Raises:
    ValueError naming the metadata key of any feature :mod:`specrl.model` cannot run.
  """
  arch = meta.get('general.architecture')
  if arch not in GGUF_ARCHITECTURES:
    raise ValueError(
      f'GGUF general.architecture={arch!r} is not supported; supported: '
      f'{sorted(GGUF_ARCHITECTURES)}'
    )

  def need(key):
    full = f'{arch}.{key}'
    if meta.get(full) is None:
      raise ValueError(f'GGUF metadata is missing required key {full!r}')
    return meta[full]

  d_model = int(need('embedding_length'))
  n_heads = int(need('attention.head_count'))
  n_kv = meta.get(f'{arch}.attention.head_count_kv', n_heads)
  for key, val in (('embedding_length', d_model), ('attention.head_count', n_heads)):
    if val <= 0:
      raise ValueError(f'GGUF metadata {arch}.{key}={val} must be > 0')
  if isinstance(n_kv, (list, tuple)) or int(n_kv) <= 0 or n_heads % int(n_kv):
    raise ValueError(
      f'GGUF metadata {arch}.attention.head_count_kv={n_kv} must be a positive divisor of '
      f'head_count={n_heads} (one value for every layer)'
    )
  head_dim = int(meta.get(f'{arch}.attention.key_length', d_model // n_heads))
  value_dim = meta.get(f'{arch}.attention.value_length')
  if value_dim is not None and int(value_dim) != head_dim:
    raise ValueError(
      f'GGUF {arch}.attention.value_length={value_dim} != key_length {head_dim} is not supported'
    )
  rope_dims = meta.get(f'{arch}.rope.dimension_count')
  if rope_dims is not None and int(rope_dims) != head_dim:
    raise ValueError(
      f'GGUF {arch}.rope.dimension_count={rope_dims} != head_dim {head_dim}: partial rotary '
      'embeddings are not supported'
    )
  scaling = meta.get(f'{arch}.rope.scaling.type')
  if scaling not in (None, 'none'):
    raise ValueError(f'GGUF {arch}.rope.scaling.type={scaling!r} is not supported')
  if 'rope_freqs.weight' in tensor_names:
    raise ValueError('GGUF tensor rope_freqs.weight (scaled RoPE frequencies) is not supported')
  if int(meta.get(f'{arch}.expert_count', 0) or 0) > 0:
    raise ValueError(f'GGUF {arch}.expert_count > 0 (mixture of experts) is not supported')
  window = meta.get(f'{arch}.attention.sliding_window')
  context = meta.get(f'{arch}.context_length')
  if window is not None and (context is None or int(window) < int(context)):
    raise ValueError(f'GGUF {arch}.attention.sliding_window={window} is not supported')
  return {
    'model_type': GGUF_ARCHITECTURES[arch],
    'vocab_size': int(meta.get(f'{arch}.vocab_size', vocab_size)),
    'hidden_size': d_model,
    'num_hidden_layers': int(need('block_count')),
    'num_attention_heads': n_heads,
    'num_key_value_heads': int(n_kv),
    'head_dim': head_dim,
    'intermediate_size': int(need('feed_forward_length')),
    'rope_theta': float(meta.get(f'{arch}.rope.freq_base', 10000.0)),
    'rms_norm_eps': float(meta.get(f'{arch}.attention.layer_norm_rms_epsilon', 1e-6)),
    'tie_word_embeddings': 'output.weight' not in tensor_names,
    'max_position_embeddings': int(context or 32768),
  }


def numpy_shape(tensor) -> tuple[int, ...]:
  """A GGUF tensor's logical shape in numpy order (GGUF lists ``ne0`` = innermost first)."""
  return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def dequantize_tensor(tensor) -> np.ndarray:
  """One ``gguf.ReaderTensor`` -> float32 numpy array of :func:`numpy_shape`.

  Raises:
    ValueError naming the tensor for a quantization type ``gguf.quants`` cannot dequantize.
  """
  qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
  try:
    out = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
  except NotImplementedError as e:
    raise ValueError(
      f'GGUF tensor {tensor.name}: quantization type {qtype.name} cannot be dequantized by '
      f'gguf {getattr(gguf, "__version__", "")}: {e}'
    ) from e
  return np.asarray(out, np.float32).reshape(numpy_shape(tensor))


def _hf_tensors(reader: gguf.GGUFReader, cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
  """Validate names and shapes of every tensor (before dequantizing any), then dequantize."""
  specs = hf_specs(cfg)
  by_hf = {}
  unexpected = []
  for t in reader.tensors:
    name = hf_name(t.name)
    if name is None or (name not in specs and name != 'lm_head.weight'):
      unexpected.append(t.name)
    else:
      by_hf[name] = t
  if unexpected:
    raise ValueError(f'GGUF: unexpected tensor(s) for {cfg}: {unexpected[:8]}')
  gguf_of = {h: g for g, h in _GLOBAL_NAMES.items()}
  for i in range(cfg.n_layers):
    gguf_of.update({f'model.layers.{i}.{h}': f'blk.{i}.{g}' for g, h in _LAYER_NAMES.items()})
  missing = sorted(gguf_of.get(n, n) for n in specs if n not in by_hf)
  if missing:
    raise ValueError(f'GGUF: missing tensor(s): {missing[:8]}')
  for name, t in by_hf.items():
    expected = specs[name].hf_shape if name in specs else (cfg.vocab_size, cfg.d_model)
    if numpy_shape(t) != expected:
      raise ValueError(
        f'GGUF tensor {t.name} has shape {numpy_shape(t)} (numpy order), expected {expected} '
        'from the metadata'
      )
  out = {}
  for name, t in by_hf.items():
    w = dequantize_tensor(t)
    if arch == 'llama' and name.endswith(('q_proj.weight', 'q_proj.bias')):
      w = unpermute_rope_rows(w, cfg.n_heads)
    elif arch == 'llama' and name.endswith(('k_proj.weight', 'k_proj.bias')):
      w = unpermute_rope_rows(w, cfg.n_kv_heads)
    out[name] = w
  return out


def load_gguf_checkpoint(
  path: str, dtype='float32', *, compute_dtype: str | None = None, to_device: bool = True
) -> tuple[ModelConfig, Params]:
  """Load a GGUF file (Llama / Qwen2 / Qwen3 architecture) as ``(cfg, params)``.

  Args:
    path: the ``.gguf`` file.
    dtype: parameter dtype; quantized tensors are dequantized to float32 then cast.
    compute_dtype: see :func:`specrl.checkpoints.hf_config.config_from_hf`.
    to_device: ``False`` keeps host numpy leaves (e.g. to ``device_put`` them sharded).

  Returns:
    params shaped as :func:`specrl.model.param_shapes`. With tied embeddings (no
    ``output.weight``) there is no ``lm_head`` leaf.

  Raises:
    ValueError naming the GGUF tensor or metadata key that is missing, mis-shaped or
    unsupported; :class:`~specrl.checkpoints.gguf_file.GGUFFileError` (a one-line
    :class:`~specrl.faults.DataError` naming the file) for an empty, truncated or corrupted
    file; FileNotFoundError for a missing one.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'GGUF file {path!r} not found')
  reader = open_gguf(path)
  meta = gguf_metadata(reader)
  names = {t.name for t in reader.tensors}
  embed = next((t for t in reader.tensors if t.name == 'token_embd.weight'), None)
  tokens_field = reader.fields.get('tokenizer.ggml.tokens')
  # The tokenizer's size sets the vocab (as llama.cpp does), so a mismatched embedding is named.
  vocab = len(tokens_field.data) if tokens_field else numpy_shape(embed)[0] if embed else 0
  cfg = config_from_hf(
    config_json_from_gguf(meta, names, vocab), dtype=dtype, compute_dtype=compute_dtype
  )
  hf = _hf_tensors(reader, cfg, meta['general.architecture'])
  np_dtype = PARAM_NP_DTYPES[cfg.param_dtype]
  params = jax.tree.map(
    lambda s: np.empty(s, np_dtype), param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple)
  )
  for name, spec in hf_specs(cfg).items():
    put_tensor(params, spec, hf[name], np_dtype)
  if to_device:
    params = jax.tree.map(jnp.asarray, params)
  return cfg, params


def export_gguf_to_hf(gguf_path: str, out_dir: str, dtype='float32') -> ModelConfig:
  """Convert a GGUF file to an HF directory: ``config.json`` + ``model.safetensors`` +
  ``tokenizer.json`` / ``tokenizer_config.json`` (with the chat template) /
  ``generation_config.json``, loadable by :mod:`specrl.checkpoints.hf` and transformers.
  The tokenizer files are skipped when the GGUF carries no tokenizer.
  """
  cfg, params = load_gguf_checkpoint(gguf_path, dtype, to_device=False)
  reader = open_gguf(gguf_path)
  meta = gguf_metadata(reader)
  context = meta.get(f'{meta["general.architecture"]}.context_length')
  save_hf_checkpoint(out_dir, cfg, params, max_position_embeddings=int(context or 32768))
  if 'tokenizer.ggml.model' in reader.fields:
    tokenizer_from_gguf(reader).save_pretrained(out_dir)
  return cfg

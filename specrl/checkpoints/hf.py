"""Hugging Face checkpoints (Llama / Mistral / Qwen2 / Qwen3) <-> :mod:`specrl.model` params.

Why this exists: policies start from public HF checkpoints and trained policies are exported
back to HF layout, so the mapping must be exact and loud when it is not. Every tensor is
validated against the config before any data is read (headers only), so a mismatched
checkpoint fails in milliseconds with the HF tensor name and both shapes, not after loading
gigabytes or, worse, silently producing garbage logits.

Layout mapping (HF ``nn.Linear.weight`` is ``[out, in]``; ours is ``x @ w`` i.e. ``[in, out]``)::

  model.embed_tokens.weight            [V, D]        -> embed              [V, D]
  layers.{i}.input_layernorm.weight    [D]           -> layers.attn_norm   [L, D]
  layers.{i}.self_attn.q_proj.weight   [H*Dh, D]     -> layers.wq          [L, D, H, Dh]
  layers.{i}.self_attn.k_proj.weight   [K*Dh, D]     -> layers.wk          [L, D, K, Dh]
  layers.{i}.self_attn.v_proj.weight   [K*Dh, D]     -> layers.wv          [L, D, K, Dh]
  layers.{i}.self_attn.o_proj.weight   [D, H*Dh]     -> layers.wo          [L, H, Dh, D]
  layers.{i}.self_attn.{q,k,v}_proj.bias             -> layers.b{q,k,v}    [L, H|K, Dh]
  layers.{i}.self_attn.{q,k}_norm.weight [Dh]        -> layers.{q,k}_norm  [L, Dh]
  layers.{i}.post_attention_layernorm.weight [D]     -> layers.mlp_norm    [L, D]
  layers.{i}.mlp.{gate,up}_proj.weight [F, D]        -> layers.w_{gate,up} [L, D, F]
  layers.{i}.mlp.down_proj.weight      [D, F]        -> layers.w_down      [L, F, D]
  model.norm.weight                    [D]           -> final_norm         [D]
  lm_head.weight                       [V, D]        -> lm_head            [D, V] (untied only)

RoPE in :mod:`specrl.model` uses HF's rotate-half convention, so q/k need no permutation.

Tensors are read with ``safetensors.safe_open(..., framework='np')``; bf16 arrives as an
``ml_dtypes.bfloat16`` numpy array. Older safetensors releases cannot express bf16 in numpy,
so a tiny raw reader (:func:`read_safetensors_raw`) is the fallback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from specrl.model import ModelConfig, Params, param_shapes

SUPPORTED_MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3')

_NP_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}
# safetensors header dtype codes -> numpy dtypes (for the raw fallback reader).
_ST_DTYPES = {
  'F64': np.float64,
  'F32': np.float32,
  'F16': np.float16,
  'BF16': ml_dtypes.bfloat16,
  'I64': np.int64,
  'I32': np.int32,
  'I16': np.int16,
  'I8': np.int8,
  'U8': np.uint8,
  'BOOL': np.bool_,
}
_INDEX_NAME = 'model.safetensors.index.json'


# ----------------------------------------------------------------------------- config


def _dtype_name(dtype) -> str:
  """Normalize ``'bfloat16'`` / ``jnp.bfloat16`` / ``np.float32`` to a ModelConfig dtype name."""
  name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if name not in _NP_DTYPES:
    raise ValueError(f'dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}')
  return name


def _rope_type(d: dict | None) -> str:
  if not d:
    return 'default'
  return str(d.get('rope_type', d.get('type', 'default')))


def _sliding_window_active(c: dict, n_layers: int) -> bool:
  """Whether HF would actually restrict attention to a window for some layer.

  Mistral applies ``sliding_window`` whenever it is set; Qwen2/3 only when
  ``use_sliding_window`` and for layers ``>= max_window_layers`` (or as listed in
  ``layer_types``). A window at least ``max_position_embeddings`` long never bites.
  """
  window = c.get('sliding_window')
  if window is None:
    return False
  max_pos = c.get('max_position_embeddings')
  if max_pos is not None and int(window) >= int(max_pos):
    return False
  layer_types = c.get('layer_types')
  if layer_types is not None:
    return any(t == 'sliding_attention' for t in layer_types)
  model_type = c.get('model_type')
  if model_type == 'mistral':
    return True
  if model_type in ('qwen2', 'qwen3'):
    return (
      bool(c.get('use_sliding_window', False))
      and int(c.get('max_window_layers', n_layers)) < n_layers
    )
  return False


def config_from_hf(
  config_json: dict, *, dtype=None, compute_dtype: str | None = None
) -> ModelConfig:
  """Map an HF ``config.json`` dict to :class:`ModelConfig`.

  Args:
    config_json: the parsed ``config.json``.
    dtype: parameter dtype override; default is the checkpoint's ``torch_dtype`` (or
      ``dtype``, transformers >= 4.56), else float32.
    compute_dtype: activation dtype; default float32 (numerically safest for RL logprobs;
      pass ``'bfloat16'`` for speed).

  Raises:
    ValueError naming the offending field for any model type or feature that
    :mod:`specrl.model` does not implement (so it can never silently diverge from HF).
  """
  c = dict(config_json)
  model_type = c.get('model_type')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f'config.json model_type={model_type!r} is not supported; supported: '
      f'{list(SUPPORTED_MODEL_TYPES)}'
    )
  for f in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads'):
    if c.get(f) is None:
      raise ValueError(f'config.json is missing required field {f!r}')
  if c.get('intermediate_size') is None:
    raise ValueError("config.json is missing required field 'intermediate_size'")

  act = c.get('hidden_act', c.get('hidden_activation', 'silu'))
  if act != 'silu':
    raise ValueError(f'config.json hidden_act={act!r} is not supported (only silu)')
  if c.get('mlp_bias'):
    raise ValueError('config.json mlp_bias=True is not supported')
  if model_type != 'qwen2' and c.get('attention_bias'):
    # Llama/Mistral/Qwen3 attention_bias also puts a bias on o_proj, which we lack.
    raise ValueError(f'config.json attention_bias=True is not supported for {model_type}')
  prf = c.get('partial_rotary_factor')
  if prf is not None and float(prf) != 1.0:
    raise ValueError(f'config.json partial_rotary_factor={prf} is not supported')

  rope_theta = c.get('rope_theta')
  for field in ('rope_scaling', 'rope_parameters'):
    rp = c.get(field)
    rt = _rope_type(rp)
    if rt != 'default':
      raise ValueError(
        f'config.json {field} with rope_type={rt!r} is not supported (only default RoPE)'
      )
    if rp and rope_theta is None and rp.get('rope_theta') is not None:
      rope_theta = rp['rope_theta']
  rope_theta = 10000.0 if rope_theta is None else float(rope_theta)

  n_layers = int(c['num_hidden_layers'])
  if _sliding_window_active(c, n_layers):
    raise ValueError(
      f'config.json sliding_window={c.get("sliding_window")} is active '
      f'(use_sliding_window={c.get("use_sliding_window")}, '
      f'max_position_embeddings={c.get("max_position_embeddings")}); sliding-window '
      'attention is not supported'
    )

  n_heads = int(c['num_attention_heads'])
  d_model = int(c['hidden_size'])
  head_dim = c.get('head_dim')
  if head_dim is None:
    if d_model % n_heads:
      raise ValueError(
        f'config.json hidden_size ({d_model}) is not divisible by num_attention_heads '
        f'({n_heads}) and head_dim is not given'
      )
    head_dim = d_model // n_heads
  n_kv = c.get('num_key_value_heads')
  n_kv = n_heads if n_kv is None else int(n_kv)

  if dtype is None:
    ckpt_dtype = c.get('torch_dtype', c.get('dtype')) or 'float32'
    if ckpt_dtype not in _NP_DTYPES:
      raise ValueError(
        f'config.json torch_dtype={ckpt_dtype!r} is not supported; pass dtype= explicitly'
      )
    param_dtype = ckpt_dtype
  else:
    param_dtype = _dtype_name(dtype)

  return ModelConfig(
    vocab_size=int(c['vocab_size']),
    d_model=d_model,
    n_layers=n_layers,
    n_heads=n_heads,
    n_kv_heads=n_kv,
    head_dim=int(head_dim),
    d_ff=int(c['intermediate_size']),
    rope_theta=rope_theta,
    norm_eps=float(c.get('rms_norm_eps', 1e-6)),
    qkv_bias=model_type == 'qwen2',
    tie_embeddings=bool(c.get('tie_word_embeddings', False)),
    qk_norm=model_type == 'qwen3',
    param_dtype=param_dtype,
    compute_dtype='float32' if compute_dtype is None else _dtype_name(compute_dtype),
  )


def config_to_hf(cfg: ModelConfig, *, max_position_embeddings: int = 32768) -> dict:
  """Inverse of :func:`config_from_hf`: the ``config.json`` dict HF transformers would load.

  model_type is ``qwen3`` if ``qk_norm``, ``qwen2`` if ``qkv_bias``, else ``llama``.
  """
  if cfg.qk_norm and cfg.qkv_bias:
    raise ValueError('no HF model_type has both qkv_bias (qwen2) and qk_norm (qwen3)')
  model_type = 'qwen3' if cfg.qk_norm else 'qwen2' if cfg.qkv_bias else 'llama'
  arch = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
  out = {
    'architectures': [arch[model_type]],
    'model_type': model_type,
    'vocab_size': cfg.vocab_size,
    'hidden_size': cfg.d_model,
    'num_hidden_layers': cfg.n_layers,
    'num_attention_heads': cfg.n_heads,
    'num_key_value_heads': cfg.n_kv_heads,
    'head_dim': cfg.head_dim,
    'intermediate_size': cfg.d_ff,
    'hidden_act': 'silu',
    'rope_theta': cfg.rope_theta,
    'rope_scaling': None,
    'rms_norm_eps': cfg.norm_eps,
    'tie_word_embeddings': cfg.tie_embeddings,
    'max_position_embeddings': max_position_embeddings,
    'torch_dtype': cfg.param_dtype,
  }
  if model_type == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
  if model_type == 'qwen3':
    out['attention_bias'] = False
  return out


# ----------------------------------------------------------------------------- name mapping


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One HF tensor: where it goes in our tree and how to convert each way."""

  key: tuple[str, ...]  # path in our params tree
  layer: int | None  # index on the stacked layer axis, or None
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(a: np.ndarray) -> np.ndarray:
  return a


def _transpose(a: np.ndarray) -> np.ndarray:
  return a.T


def _hf_specs(cfg: ModelConfig) -> dict[str, _Spec]:
  """HF tensor name -> :class:`_Spec`, for exactly the tensors this config requires."""
  D, H, K, Dh, F, V = (
    cfg.d_model,
    cfg.n_heads,
    cfg.n_kv_heads,
    cfg.head_dim,
    cfg.d_ff,
    cfg.vocab_size,
  )

  def in_heads(n):  # [n*Dh, D] <-> [D, n, Dh]
    return (lambda a: a.T.reshape(D, n, Dh)), (lambda a: a.reshape(D, n * Dh).T)

  def bias(n):  # [n*Dh] <-> [n, Dh]
    return (lambda a: a.reshape(n, Dh)), (lambda a: a.reshape(n * Dh))

  q_in, q_out = in_heads(H)
  kv_in, kv_out = in_heads(K)
  specs = {
    'model.embed_tokens.weight': _Spec(('embed',), None, (V, D), _identity, _identity),
    'model.norm.weight': _Spec(('final_norm',), None, (D,), _identity, _identity),
  }
  if not cfg.tie_embeddings:
    specs['lm_head.weight'] = _Spec(('lm_head',), None, (V, D), _transpose, _transpose)
  for i in range(cfg.n_layers):
    p = f'model.layers.{i}.'

    def add(name, key, shape, to_ours=_identity, to_hf=_identity, p=p, i=i):
      specs[p + name] = _Spec(('layers', key), i, shape, to_ours, to_hf)

    add('input_layernorm.weight', 'attn_norm', (D,))
    add('self_attn.q_proj.weight', 'wq', (H * Dh, D), q_in, q_out)
    add('self_attn.k_proj.weight', 'wk', (K * Dh, D), kv_in, kv_out)
    add('self_attn.v_proj.weight', 'wv', (K * Dh, D), kv_in, kv_out)
    add(
      'self_attn.o_proj.weight',
      'wo',
      (D, H * Dh),
      lambda a: a.T.reshape(H, Dh, D),
      lambda a: a.reshape(H * Dh, D).T,
    )
    if cfg.qkv_bias:
      add('self_attn.q_proj.bias', 'bq', (H * Dh,), *bias(H))
      add('self_attn.k_proj.bias', 'bk', (K * Dh,), *bias(K))
      add('self_attn.v_proj.bias', 'bv', (K * Dh,), *bias(K))
    if cfg.qk_norm:
      add('self_attn.q_norm.weight', 'q_norm', (Dh,))
      add('self_attn.k_norm.weight', 'k_norm', (Dh,))
    add('post_attention_layernorm.weight', 'mlp_norm', (D,))
    add('mlp.gate_proj.weight', 'w_gate', (F, D), _transpose, _transpose)
    add('mlp.up_proj.weight', 'w_up', (F, D), _transpose, _transpose)
    add('mlp.down_proj.weight', 'w_down', (D, F), _transpose, _transpose)
  return specs


def _ignorable(name: str) -> bool:
  """Buffers some exporters write that carry no learned state."""
  return name.endswith('rotary_emb.inv_freq')


# ----------------------------------------------------------------------------- safetensors io


def _read_header(path: str) -> tuple[dict, int]:
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(n))
  return header, 8 + n


def read_safetensors_raw(path: str, names=None) -> dict[str, np.ndarray]:
  """Read tensors from a safetensors file without the safetensors library.

  Fallback for safetensors releases whose numpy frontend rejects bf16: the format is an
  8-byte little-endian header length, a JSON header of ``{name: {dtype, shape,
  data_offsets}}``, then raw little-endian bytes. Returns ``{name: np.ndarray}`` (bf16 as
  ``ml_dtypes.bfloat16``) for ``names`` (default: all tensors).
  """
  header, base = _read_header(path)
  header.pop('__metadata__', None)
  names = list(header) if names is None else list(names)
  out = {}
  with open(path, 'rb') as f:
    for name in names:
      info = header[name]
      if info['dtype'] not in _ST_DTYPES:
        raise ValueError(f'{path}: tensor {name} has unsupported dtype {info["dtype"]}')
      start, end = info['data_offsets']
      f.seek(base + start)
      buf = f.read(end - start)
      dt = np.dtype(_ST_DTYPES[info['dtype']]).newbyteorder('<')
      out[name] = np.frombuffer(buf, dtype=dt).reshape(info['shape']).copy()
  return out


def _tensor_index(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """``{hf_name: (file, shape)}`` over the checkpoint dir, from headers only."""
  index_path = os.path.join(path, _INDEX_NAME)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)['weight_map']
    files = sorted(set(weight_map.values()))
  else:
    weight_map = None
    files = sorted(n for n in os.listdir(path) if n.endswith('.safetensors'))
  if not files:
    raise FileNotFoundError(f'no *.safetensors files in {path}')
  where: dict[str, tuple[str, tuple[int, ...]]] = {}
  for fname in files:
    fpath = os.path.join(path, fname)
    if not os.path.exists(fpath):
      raise FileNotFoundError(f'{_INDEX_NAME} references missing shard {fname}')
    header, _ = _read_header(fpath)
    header.pop('__metadata__', None)
    for name, info in header.items():
      if name in where:
        raise ValueError(f'tensor {name} appears in both {where[name][0]} and {fname}')
      where[name] = (fname, tuple(int(s) for s in info['shape']))
  if weight_map is not None:
    for name, fname in weight_map.items():
      if name in where and where[name][0] != fname:
        raise ValueError(f'{_INDEX_NAME} maps {name} to {fname} but it is in {where[name][0]}')
  return where


def _read_file(fpath: str, names: list[str]) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  try:
    with safe_open(fpath, framework='np') as f:
      return {n: f.get_tensor(n) for n in names}
  except (TypeError, ValueError):  # old safetensors: no bf16 in its numpy frontend
    return read_safetensors_raw(fpath, names)


# ----------------------------------------------------------------------------- load / save


def load_hf_checkpoint(
  path: str, dtype=None, *, compute_dtype: str | None = None, to_device: bool = True
) -> tuple[ModelConfig, Params]:
  """Load an HF Llama/Mistral/Qwen2/Qwen3 checkpoint directory.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or shards listed in
      ``model.safetensors.index.json``, or several ``*.safetensors``).
    dtype: parameter dtype (default: the checkpoint's ``torch_dtype``).
    compute_dtype: see :func:`config_from_hf`.
    to_device: return ``jax.Array`` leaves; ``False`` keeps host numpy arrays so the caller
      can ``jax.device_put`` them straight into a sharded layout.

  Returns:
    ``(cfg, params)`` with params shaped as :func:`specrl.model.param_shapes` (layers
    stacked on a leading ``L`` axis).

  Raises:
    ValueError naming the HF tensor for a wrong shape, a missing tensor, or an unexpected
    one (rotary ``inv_freq`` buffers excepted); all checked from headers before reading data.
  """
  with open(os.path.join(path, 'config.json')) as f:
    cfg = config_from_hf(json.load(f), dtype=dtype, compute_dtype=compute_dtype)
  specs = _hf_specs(cfg)
  where = _tensor_index(path)

  extra_lm_head = cfg.tie_embeddings and 'lm_head.weight' in where
  unexpected = sorted(
    n for n in where if n not in specs and not _ignorable(n) and n != 'lm_head.weight'
  )
  if unexpected:
    raise ValueError(
      f'{path}: unexpected tensor(s) for {cfg}: {unexpected[:8]}'
      + (f' (+{len(unexpected) - 8} more)' if len(unexpected) > 8 else '')
    )
  missing = sorted(n for n in specs if n not in where)
  if missing:
    raise ValueError(
      f'{path}: missing tensor(s): {missing[:8]}'
      + (f' (+{len(missing) - 8} more)' if len(missing) > 8 else '')
    )
  for name, spec in specs.items():
    got = where[name][1]
    if got != spec.hf_shape:
      raise ValueError(
        f'{path}: tensor {name} has shape {got}, expected {spec.hf_shape} from config.json'
      )
  if extra_lm_head and where['lm_head.weight'][1] != (cfg.vocab_size, cfg.d_model):
    raise ValueError(
      f'{path}: tensor lm_head.weight has shape {where["lm_head.weight"][1]}, '
      f'expected {(cfg.vocab_size, cfg.d_model)} (tie_word_embeddings=True)'
    )

  np_dtype = _NP_DTYPES[cfg.param_dtype]
  shapes = param_shapes(cfg)
  params = jax.tree.map(
    lambda s: np.empty(s, np_dtype), shapes, is_leaf=lambda s: isinstance(s, tuple)
  )
  by_file: dict[str, list[str]] = {}
  for name in specs:
    by_file.setdefault(where[name][0], []).append(name)
  if extra_lm_head:
    by_file.setdefault(where['lm_head.weight'][0], []).append('lm_head.weight')
  lm_head = None
  for fname, names in by_file.items():
    tensors = _read_file(os.path.join(path, fname), names)
    for name in names:
      if name == 'lm_head.weight' and extra_lm_head:
        lm_head = tensors.pop(name)
        continue
      spec = specs[name]
      value = spec.to_ours(tensors.pop(name)).astype(np_dtype)
      node = params
      for k in spec.key[:-1]:
        node = node[k]
      if spec.layer is None:
        node[spec.key[-1]] = value
      else:
        node[spec.key[-1]][spec.layer] = value
  if lm_head is not None and not np.array_equal(lm_head.astype(np_dtype), params['embed']):
    raise ValueError(
      f'{path}: tie_word_embeddings=True but tensor lm_head.weight differs from '
      'model.embed_tokens.weight'
    )
  if to_device:
    params = jax.tree.map(jnp.asarray, params)
  return cfg, params


def _is_quantized(x) -> bool:
  return hasattr(x, 'qeinsum')


def hf_state_dict(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
  """Our params -> ``{hf_name: np.ndarray}`` in HF layout and ``cfg.param_dtype``.

  Validates every leaf's shape against :func:`specrl.model.param_shapes` first.
  """
  shapes = param_shapes(cfg)
  flat_shapes = {
    tuple(k.key for k in path): s
    for path, s in jax.tree.flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))[0]
  }
  flat = {}
  for path, leaf in jax.tree.flatten_with_path(params, is_leaf=_is_quantized)[0]:
    key = tuple(getattr(k, 'key', k) for k in path)
    if hasattr(leaf, 'qeinsum'):
      raise ValueError(f'param {"/".join(key)} is quantized; dequantize before exporting')
    flat[key] = leaf
  if set(flat) != set(flat_shapes):
    raise ValueError(f'params keys {sorted(flat)} do not match config keys {sorted(flat_shapes)}')
  np_dtype = _NP_DTYPES[cfg.param_dtype]
  host = {}
  for key, leaf in flat.items():
    arr = np.asarray(jax.device_get(leaf))
    if arr.shape != flat_shapes[key]:
      raise ValueError(f'param {"/".join(key)} has shape {arr.shape}, expected {flat_shapes[key]}')
    host[key] = arr.astype(np_dtype)
  out = {}
  for name, spec in _hf_specs(cfg).items():
    a = host[spec.key]
    if spec.layer is not None:
      a = a[spec.layer]
    out[name] = np.ascontiguousarray(spec.to_hf(a))
  return out


def save_hf_checkpoint(
  path: str,
  cfg: ModelConfig,
  params: Params,
  *,
  max_shard_bytes: int | None = None,
  max_position_embeddings: int = 32768,
) -> None:
  """Write ``config.json`` + ``model.safetensors`` that HF transformers (and
  :func:`load_hf_checkpoint`) can load; the exact inverse of loading.

  With ``max_shard_bytes``, tensors are split greedily (in name order) into
  ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
  """
  from safetensors.numpy import save_file

  os.makedirs(path, exist_ok=True)
  tensors = hf_state_dict(cfg, params)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config_to_hf(cfg, max_position_embeddings=max_position_embeddings), f, indent=2)
  meta = {'format': 'pt'}
  if max_shard_bytes is None:
    save_file(tensors, os.path.join(path, 'model.safetensors'), metadata=meta)
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors.items():
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  n = len(shards)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f'model-{i + 1:05d}-of-{n:05d}.safetensors'
    save_file(shard, os.path.join(path, fname), metadata=meta)
    weight_map.update({name: fname for name in shard})
  index = {
    'metadata': {'total_size': int(sum(a.nbytes for a in tensors.values()))},
    'weight_map': weight_map,
  }
  with open(os.path.join(path, _INDEX_NAME), 'w') as f:
    json.dump(index, f, indent=2)


# ----------------------------------------------------------------------------- tokenizer


@dataclasses.dataclass(frozen=True)
class HFTokenizer:
  """Thin wrapper over a ``tokenizers.Tokenizer`` with the special ids RL rollouts need.

  ``encode`` does *not* add special tokens by default: prompts are usually rendered from a
  chat template that already contains BOS, and a double BOS silently shifts the
  distribution. Prepend ``bos_id`` yourself when a raw-text prompt needs it.

  ``eos_ids`` is every id that ends generation (tokenizer_config eos plus all of
  generation_config's ``eos_token_id``, e.g. Llama-3-Instruct's ``<|eot_id|>``);
  ``eos_id`` is the primary one. ``pad_id``/``bos_id`` are None when the checkpoint does not
  define them.
  """

  tokenizer: Any
  eos_id: int | None
  pad_id: int | None
  bos_id: int | None
  eos_ids: tuple[int, ...]

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _token_content(v) -> str | None:
  """tokenizer_config stores special tokens as a string or an AddedToken dict."""
  if isinstance(v, dict):
    return v.get('content')
  return v


def load_tokenizer(path: str) -> HFTokenizer:
  """Load ``tokenizer.json`` (+ special tokens from ``tokenizer_config.json``,
  ``special_tokens_map.json`` and ``generation_config.json``) from a checkpoint directory.

  Requires the HF ``tokenizers`` package (imported lazily so the rest of specrl does not).
  """
  try:
    from tokenizers import Tokenizer
  except ImportError as e:
    raise ImportError(
      'load_tokenizer needs the Hugging Face tokenizers package: pip install tokenizers'
    ) from e
  tok = Tokenizer.from_file(os.path.join(path, 'tokenizer.json'))
  tcfg = _read_json(os.path.join(path, 'tokenizer_config.json'))
  smap = _read_json(os.path.join(path, 'special_tokens_map.json'))
  gcfg = _read_json(os.path.join(path, 'generation_config.json'))

  def special(field: str) -> int | None:
    for src, fname in ((tcfg, 'tokenizer_config.json'), (smap, 'special_tokens_map.json')):
      content = _token_content(src.get(field))
      if content is not None:
        tid = tok.token_to_id(content)
        if tid is None:
          raise ValueError(f'{fname} {field}={content!r} is not in tokenizer.json')
        return int(tid)
    gid = gcfg.get(f'{field}_id')
    if isinstance(gid, list):
      gid = gid[0] if gid else None
    return None if gid is None else int(gid)

  eos_id = special('eos_token')
  gen_eos = gcfg.get('eos_token_id')
  gen_eos = [] if gen_eos is None else gen_eos if isinstance(gen_eos, list) else [gen_eos]
  eos_ids = tuple(dict.fromkeys([i for i in [eos_id, *gen_eos] if i is not None]))
  return HFTokenizer(
    tokenizer=tok,
    eos_id=eos_id,
    pad_id=special('pad_token'),
    bos_id=special('bos_token'),
    eos_ids=tuple(int(i) for i in eos_ids),
  )

"""HF tensor names and layouts <-> :mod:`specrl.model` params: load, export, save.

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
so a tiny raw reader
(:func:`specrl.checkpoints.safetensors_io.read_safetensors_raw`) is the fallback.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from specrl.checkpoints.hf_config import PARAM_NP_DTYPES, config_from_hf, config_to_hf
from specrl.checkpoints.safetensors_io import read_tensors, tensor_index, write_safetensors
from specrl.model import ModelConfig, Params, param_shapes


@dataclasses.dataclass(frozen=True)
class TensorSpec:
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


def put_tensor(params: dict, spec: TensorSpec, hf_value: np.ndarray, np_dtype) -> None:
  """Convert one HF-layout tensor to ours and write it into the host param tree in place
  (a stacked layer tensor's ``spec.layer`` slice, or the whole leaf)."""
  value = spec.to_ours(hf_value).astype(np_dtype)
  node = params
  for k in spec.key[:-1]:
    node = node[k]
  if spec.layer is None:
    node[spec.key[-1]] = value
  else:
    node[spec.key[-1]][spec.layer] = value


def hf_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
  """HF tensor name -> :class:`TensorSpec`, for exactly the tensors this config requires."""
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
    'model.embed_tokens.weight': TensorSpec(('embed',), None, (V, D), _identity, _identity),
    'model.norm.weight': TensorSpec(('final_norm',), None, (D,), _identity, _identity),
  }
  if not cfg.tie_embeddings:
    specs['lm_head.weight'] = TensorSpec(('lm_head',), None, (V, D), _transpose, _transpose)
  for i in range(cfg.n_layers):
    p = f'model.layers.{i}.'

    def add(name, key, shape, to_ours=_identity, to_hf=_identity, p=p, i=i):
      specs[p + name] = TensorSpec(('layers', key), i, shape, to_ours, to_hf)

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
  specs = hf_specs(cfg)
  where = tensor_index(path)

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

  np_dtype = PARAM_NP_DTYPES[cfg.param_dtype]
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
    tensors = read_tensors(os.path.join(path, fname), names)
    for name in names:
      if name == 'lm_head.weight' and extra_lm_head:
        lm_head = tensors.pop(name)
        continue
      put_tensor(params, specs[name], tensors.pop(name), np_dtype)
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
  np_dtype = PARAM_NP_DTYPES[cfg.param_dtype]
  host = {}
  for key, leaf in flat.items():
    arr = np.asarray(jax.device_get(leaf))
    if arr.shape != flat_shapes[key]:
      raise ValueError(f'param {"/".join(key)} has shape {arr.shape}, expected {flat_shapes[key]}')
    host[key] = arr.astype(np_dtype)
  out = {}
  for name, spec in hf_specs(cfg).items():
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
  os.makedirs(path, exist_ok=True)
  tensors = hf_state_dict(cfg, params)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config_to_hf(cfg, max_position_embeddings=max_position_embeddings), f, indent=2)
  write_safetensors(path, tensors, max_shard_bytes=max_shard_bytes)

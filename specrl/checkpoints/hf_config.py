"""HF ``config.json`` <-> :class:`specrl.model.ModelConfig` (Llama / Mistral / Qwen2 / Qwen3).

Why this is its own module: the config mapping is where an unsupported architecture feature
(sliding windows, RoPE scaling, biases we lack) must be refused loudly, before any tensor is
read; it needs neither safetensors nor the tensor layout.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from specrl.model import ModelConfig

SUPPORTED_MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3')

# ModelConfig dtype names -> numpy dtypes (bf16 as ``ml_dtypes.bfloat16``).
PARAM_NP_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}


def _dtype_name(dtype) -> str:
  """Normalize ``'bfloat16'`` / ``jnp.bfloat16`` / ``np.float32`` to a ModelConfig dtype name."""
  name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  if name not in PARAM_NP_DTYPES:
    raise ValueError(f'dtype must be one of {sorted(PARAM_NP_DTYPES)}, got {dtype!r}')
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
    if ckpt_dtype not in PARAM_NP_DTYPES:
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

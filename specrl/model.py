"""Decoder-only transformer of the Llama / Qwen2 family, as pure functions over a pytree.

One set of weights, three ways to call it (all through :func:`forward`):

- full sequence (training logprobs): ``forward(params, cfg, tokens, positions)``;
- prefill a right-padded prompt batch into a KV cache: ``forward(..., cache=cache)``
  with ``positions = arange(P)``;
- extend the cache by ``T >= 1`` tokens at *per-sequence* positions: ``T = 1`` for
  decoding, ``T = k + 1`` for the speculative verify pass.

The KV cache is a plain dict pytree ``{'k', 'v'}`` of shape ``[L, B, K, S, Dh]`` indexed
by *position*: a token at position ``p`` lives in slot ``p``. A query at position ``p``
sees slots ``<= p``. Slots beyond a sequence's current position hold stale data (prompt
padding, rejected draft tokens) that the mask hides and later writes overwrite, so a
speculative rollback is just "continue from an earlier position" -- nothing is copied.

Parameters are a plain nested dict with layers stacked on a leading axis (``lax.scan``
over layers keeps compile time flat in depth). Layout follows Hugging Face names closely
so safetensors checkpoints map one-to-one (see ``specrl.checkpoints``). RoPE uses the
HF "rotate half" convention, so HF q/k weights need no permutation.

Any weight leaf may be a quantized array object exposing ``qeinsum(eq, x)`` (and
``qtake(ids)`` for embeddings); the quantized self-drafter runs through this same code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from specrl import config as config_lib
from specrl import sharding as shd
from specrl.attention import ATTENTION_IMPLS, attention, blocked_attention, xla_causal_attention

Params = dict[str, Any]
KVCache = dict[str, jax.Array]

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static architecture description (hashable: a jit static argument)."""

  vocab_size: int = 32
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 32
  d_ff: int = 384
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  tie_embeddings: bool = True
  qk_norm: bool = False
  param_dtype: str = 'float32'
  compute_dtype: str = 'float32'

  def __post_init__(self):
    for f in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff'):
      if int(getattr(self, f)) <= 0:
        raise ValueError(f'model.{f} must be positive, got {getattr(self, f)}')
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
        f'model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads '
        f'({self.n_kv_heads}) for grouped-query attention'
      )
    if self.head_dim % 2:
      raise ValueError(f'model.head_dim must be even for RoPE, got {self.head_dim}')
    for f in ('param_dtype', 'compute_dtype'):
      if getattr(self, f) not in _DTYPES:
        raise ValueError(f'model.{f} must be one of {sorted(_DTYPES)}, got {getattr(self, f)!r}')

  @property
  def pdtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def cdtype(self):
    return _DTYPES[self.compute_dtype]

  @classmethod
  def from_config(cls, cfg) -> ModelConfig:
    """From the ``model`` config section (see :func:`specrl.config.from_config`; its
    ``checkpoint`` key is read by :mod:`specrl.checkpoints.pretrained`)."""
    return config_lib.from_config(cls, cfg, 'model', ignore=('checkpoint',))


# ----------------------------------------------------------------------------- params


# Logical axes of every per-layer leaf there can be (stacked: with the leading 'layers').
_LAYER_AXES = {
  'attn_norm': ('layers', 'norm'),
  'wq': ('layers', 'embed', 'heads', 'head_dim'),
  'wk': ('layers', 'embed', 'kv_heads', 'head_dim'),
  'wv': ('layers', 'embed', 'kv_heads', 'head_dim'),
  'wo': ('layers', 'heads', 'head_dim', 'embed'),
  'mlp_norm': ('layers', 'norm'),
  'w_gate': ('layers', 'embed', 'mlp'),
  'w_up': ('layers', 'embed', 'mlp'),
  'w_down': ('layers', 'mlp', 'embed'),
  'bq': ('layers', 'heads', 'head_dim'),
  'bk': ('layers', 'kv_heads', 'head_dim'),
  'bv': ('layers', 'kv_heads', 'head_dim'),
  'q_norm': ('layers', 'norm'),
  'k_norm': ('layers', 'norm'),
  # the decode loop's fused weights (:func:`fuse_layers`; never stored): the q/k/v and the
  # gate/up axes carry no rule, so a mesh shards them by kv head / MLP column as the parts
  'wqkv': ('layers', 'embed', 'kv_heads', 'qkv', 'head_dim'),
  'bqkv': ('layers', 'kv_heads', 'qkv', 'head_dim'),
  'w_gate_up': ('layers', 'embed', 'gate_up', 'mlp'),
}


def param_logical_axes(cfg: ModelConfig) -> dict:
  """Pytree of logical-axis tuples matching :func:`init_params`."""
  names = ['attn_norm', 'wq', 'wk', 'wv', 'wo', 'mlp_norm', 'w_gate', 'w_up', 'w_down']
  if cfg.qkv_bias:
    names += ['bq', 'bk', 'bv']
  if cfg.qk_norm:
    names += ['q_norm', 'k_norm']
  layers = {n: _LAYER_AXES[n] for n in names}
  tree = {'embed': ('vocab', 'embed'), 'layers': layers, 'final_norm': ('norm',)}
  if not cfg.tie_embeddings:
    tree['lm_head'] = ('embed', 'vocab')
  return tree


def layer_logical_axes(name: str, stacked: bool = True) -> tuple:
  """Logical axes of the per-layer leaf ``name`` (fused ones included: :func:`fuse_layers`),
  stacked ``[L, ...]`` or one layer's slice (``stacked=False``)."""
  axes = _LAYER_AXES[name]
  return axes if stacked else axes[1:]


def param_shapes(cfg: ModelConfig) -> dict:
  """Pytree of shape tuples matching :func:`init_params` (used to validate checkpoints)."""
  L, D, H, K, Dh, F, V = (
    cfg.n_layers,
    cfg.d_model,
    cfg.n_heads,
    cfg.n_kv_heads,
    cfg.head_dim,
    cfg.d_ff,
    cfg.vocab_size,
  )
  layers = {
    'attn_norm': (L, D),
    'wq': (L, D, H, Dh),
    'wk': (L, D, K, Dh),
    'wv': (L, D, K, Dh),
    'wo': (L, H, Dh, D),
    'mlp_norm': (L, D),
    'w_gate': (L, D, F),
    'w_up': (L, D, F),
    'w_down': (L, F, D),
  }
  if cfg.qkv_bias:
    layers.update(bq=(L, H, Dh), bk=(L, K, Dh), bv=(L, K, Dh))
  if cfg.qk_norm:
    layers.update(q_norm=(L, Dh), k_norm=(L, Dh))
  tree = {'embed': (V, D), 'layers': layers, 'final_norm': (D,)}
  if not cfg.tie_embeddings:
    tree['lm_head'] = (D, V)
  return tree


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Truncated-normal fan-in init; norms at 1, biases at 0. Leaves in ``cfg.param_dtype``."""
  return _init_params_jit(cfg, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_params_jit(cfg: ModelConfig, rng: jax.Array) -> Params:
  shapes = param_shapes(cfg)
  flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
  keys = jax.random.split(rng, len(flat))
  leaves = []
  for (path, shape), key in zip(flat, keys, strict=True):
    name = jax.tree_util.keystr(path[-1:]).strip("[]'")
    if name.endswith('norm'):
      leaves.append(jnp.ones(shape, cfg.pdtype))
    elif name in ('bq', 'bk', 'bv'):
      leaves.append(jnp.zeros(shape, cfg.pdtype))
    else:
      if name == 'embed':
        fan_in = shape[1]  # unit-scale logits through the (possibly tied) head
      elif name in ('wo',):
        fan_in = shape[1] * shape[2]
      else:
        fan_in = shape[-3] if name in ('wq', 'wk', 'wv') else shape[-2]
      std = 1.0 / max(fan_in, 1) ** 0.5
      w = std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
      leaves.append(w.astype(cfg.pdtype))
  return jax.tree.unflatten(treedef, leaves)


def count_params(params: Params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- cache


# The cache is kv-head major, ``[L, B, K, S, Dh]``: a layer's slice ``[B, K, S, Dh]`` is
# what the attention einsums contract over (``'btkgd,bksd->bkgts'``), so a decode step
# reads it in place. With the slots before the heads (``[L, B, S, K, Dh]``) XLA:CPU
# transposed every layer's K and V (a copy of the whole live window) every step.
CACHE_SLOT_AXIS = 3  # the slot axis of a KV cache leaf


def cache_logical_axes() -> KVCache:
  ax = ('layers', 'batch', 'kv_heads', 'cache_seq', 'head_dim')
  return {'k': ax, 'v': ax}


def cache_slots(cache: KVCache) -> int:
  """Slots ``S`` of a KV cache ``[L, B, K, S, Dh]``."""
  return cache['k'].shape[CACHE_SLOT_AXIS]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
  """Zeroed KV cache ``{'k','v'}: [L, B, K, S, Dh]`` in the compute dtype."""
  shape = (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim)
  dtype = cfg.cdtype if dtype is None else dtype
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


# ----------------------------------------------------------------------------- layers


def _einsum(eq: str, x: jax.Array, w) -> jax.Array:
  """x @ w for a plain array or a quantized weight object (``w.qeinsum``)."""
  if hasattr(w, 'qeinsum'):
    return w.qeinsum(eq, x)
  return jnp.einsum(eq, x, w.astype(x.dtype))


def _embed(table, tokens: jax.Array, dtype) -> jax.Array:
  if hasattr(table, 'qtake'):
    return table.qtake(tokens).astype(dtype)
  return jnp.take(table, tokens, axis=0).astype(dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF 'rotate_half' layout. x [B, T, N, Dh], positions [B, T]."""
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : dh // 2], xf[..., dh // 2 :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _layer(cfg: ModelConfig, lp, x, positions, kv_fn, mesh, rules, attn_fn=None):
  """One pre-norm block.

  ``kv_fn(k, v) -> (k_all, v_all, mask, aux)`` decides cache vs no cache; returns (x, aux).
  ``attn_fn(q, k_all, v_all)``: the attention instead of :func:`attention` with the mask.
  """
  h = rms_norm(x, lp['attn_norm'], cfg.norm_eps)
  if 'wqkv' in lp:  # fused (:func:`fuse_layers`): one matmul, then split
    qkv = _einsum('btd,dkgh->btkgh', h, lp['wqkv'])  # [B, T, K, G + 2, Dh]
    if cfg.qkv_bias:
      qkv = qkv + lp['bqkv'].astype(qkv.dtype)
    b, t, kh, g2, dh = qkv.shape
    q = qkv[:, :, :, : g2 - 2].reshape(b, t, kh * (g2 - 2), dh)  # head k * G + g
    k, v = qkv[:, :, :, g2 - 2], qkv[:, :, :, g2 - 1]
  else:
    q = _einsum('btd,dhk->bthk', h, lp['wq'])
    k = _einsum('btd,dhk->bthk', h, lp['wk'])
    v = _einsum('btd,dhk->bthk', h, lp['wv'])
    if cfg.qkv_bias:
      q = q + lp['bq'].astype(q.dtype)
      k = k + lp['bk'].astype(k.dtype)
      v = v + lp['bv'].astype(v.dtype)
  if cfg.qk_norm:
    q = rms_norm(q, lp['q_norm'], cfg.norm_eps)
    k = rms_norm(k, lp['k_norm'], cfg.norm_eps)
  q = rope(q, positions, cfg.rope_theta)
  k = rope(k, positions, cfg.rope_theta)
  q = shd.constrain(q, ('batch', 'seq', 'heads', 'head_dim'), mesh, rules)
  k_all, v_all, mask, aux = kv_fn(k, v)
  o = attention(q, k_all, v_all, mask) if attn_fn is None else attn_fn(q, k_all, v_all)
  x = x + _einsum('bthk,hkd->btd', o, lp['wo'])
  h = rms_norm(x, lp['mlp_norm'], cfg.norm_eps)
  if 'w_gate_up' in lp:  # fused: [B, T, 2, F], gate then up
    gu = _einsum('btd,dcf->btcf', h, lp['w_gate_up'])
    g, u = gu[:, :, 0], gu[:, :, 1]
  else:
    g = _einsum('btd,df->btf', h, lp['w_gate'])
    u = _einsum('btd,df->btf', h, lp['w_up'])
  x = x + _einsum('btf,fd->btd', jax.nn.silu(g) * u, lp['w_down'])
  return shd.constrain(x, ('batch', 'seq', 'embed'), mesh, rules), aux


def unstack_layers(params: Params) -> Params:
  """``params`` with ``'layers'`` as a tuple of per-layer dicts (slices of the stacked
  leaves) instead of one dict of ``[L, ...]`` leaves; :func:`forward` accepts either.

  Why: over stacked layers :func:`forward` runs a ``lax.scan``, and XLA:CPU feeds each
  layer's matmuls a *copy* of that layer's weight slice (a dynamic-slice it cannot fuse
  into the dot), so every decode step reads and writes every weight once more before the
  matmul reads it. Slicing once, outside a decode loop, and unrolling the layers inside it
  removes that copy from every step (at the price of one copy of the layer weights per
  call and a longer compile). Training keeps the stacked layout.
  """
  layers = params['layers']
  if isinstance(layers, tuple | list):  # already per layer
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  return {**params, 'layers': tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))}


_UNFUSED = ('wq', 'wk', 'wv', 'bq', 'bk', 'bv', 'w_gate', 'w_up')


def _fuse_layer(lp: dict) -> dict:
  """One layer's dict (stacked ``[L, ...]`` leaves or one layer's) with ``wq``/``wk``/``wv``
  as ``wqkv`` and ``w_gate``/``w_up`` as ``w_gate_up`` (see :func:`fuse_layers`)."""
  if 'wqkv' in lp or any(hasattr(lp[n], 'qeinsum') for n in _UNFUSED if n in lp):
    return lp  # already fused, or quantized (a QWeight's scales are per part: kept apart)
  wq, wk, wv = lp['wq'], lp['wk'], lp['wv']
  kh, h = wk.shape[-2], wq.shape[-2]

  def qkv(q, k, v):  # [..., H, Dh], [..., K, Dh] x2 -> [..., K, G + 2, Dh]
    q = q.reshape(*q.shape[:-2], kh, h // kh, q.shape[-1])
    return jnp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)

  out = {n: a for n, a in lp.items() if n not in _UNFUSED}
  out['wqkv'] = qkv(wq, wk, wv)
  if 'bq' in lp:
    out['bqkv'] = qkv(lp['bq'], lp['bk'], lp['bv'])
  out['w_gate_up'] = jnp.stack([lp['w_gate'], lp['w_up']], axis=-2)  # [..., D, 2, F]
  return out


def fuse_layers(params: Params) -> Params:
  """``params`` with each layer's q/k/v projections as one ``wqkv`` ``[D, K, G + 2, Dh]``
  (``G = H / K`` query heads per kv head: kv head ``k``'s G query heads, then its key, then
  its value; biases likewise as ``bqkv`` ``[K, G + 2, Dh]``) and its MLP gate / up as one
  ``w_gate_up`` ``[D, 2, F]`` (gate, up); stacked or unstacked layers, a leading layer axis
  kept. :func:`forward` then runs one matmul where it ran three (two), and splits. Same
  math; a decode loop's layout (:func:`specrl.decoding.steps.loop_params`), never stored.

  Why this layout and not ``[D, (H + 2K) Dh]``: the fused axes stay the parts' sharded axes
  (``kv_heads``, ``mlp``: :func:`layer_logical_axes`), so a tensor-parallel mesh gives each
  device its kv heads' q, k and v (its MLP columns' gate and up) and the split is local;
  a flat concatenation split across devices would cut through q | k | v. Query head
  ``k * G + g`` is the head :func:`attention` groups with kv head ``k``.

  Quantized weights (``qeinsum``) stay separate. Idempotent."""
  layers = params['layers']
  if isinstance(layers, tuple | list):
    fused = tuple(_fuse_layer(lp) for lp in layers)
  else:
    fused = _fuse_layer(layers)
  return {**params, 'layers': fused}


def is_fused(params: Params) -> bool:
  """Whether ``params``' layers carry fused weights (:func:`fuse_layers`)."""
  layers = params['layers']
  lp = layers[0] if isinstance(layers, tuple | list) else layers
  return 'wqkv' in lp


def _over_layers(body, carry, layers, with_index: bool = False):
  """``lax.scan(body, carry, layers)`` over stacked layers, or a Python loop over a tuple
  of per-layer dicts (:func:`unstack_layers`); ``with_index`` passes ``(lp, layer index)``.
  Per-layer outputs of ``body`` come back stacked on a leading layer axis (None: none)."""
  if isinstance(layers, tuple | list):
    ys = []
    for i, lp in enumerate(layers):
      carry, y = body(carry, (lp, i) if with_index else lp)
      ys.append(y)
    if all(y is None for y in ys):
      return carry, None
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
  n = jax.tree.leaves(layers)[0].shape[0]
  return jax.lax.scan(body, carry, (layers, jnp.arange(n)) if with_index else layers)


def _write_window(win, new, positions):
  """``win`` [B, K, A, Dh] (cache slots ``0..A-1``) with ``new`` [B, T, K, Dh] written at
  ``positions`` [B, T]; positions ``>= A`` are dropped. A scatter into the window, not the
  buffer: what a step reads and writes grows with A, not the budget."""
  bidx = jnp.arange(win.shape[0])[:, None]
  # advanced indices split by the head slice: the update is indexed [B, T, K, Dh]
  return win.at[bidx, :, positions].set(new.astype(win.dtype), mode='drop')


def tree_slots_mask(base, anc, s: int):
  """Slots ``[B, T]`` (``base + u``) and attention mask ``[B, T, s]`` of a tree pass whose
  root sits at ``base`` [B]: query t sees slot j iff ``j < base`` or ``j = base + u`` with
  ``anc[b, t, u]`` (:func:`run_layers`' ``tree_anc``).

  Up to 32 nodes each query's ancestors are an int32 bit set and the mask is elementwise
  (shifts and compares XLA fuses into the attention); a gather of ``anc`` instead cost
  SmolLM2-135M's 8-node pass ~2x a chain pass on CPU (``bench/tree_kv.py``)."""
  t = anc.shape[-1]
  rel = jnp.arange(s)[None, :] - base[:, None]  # [B, s]: node index of slot j
  in_tree = (rel >= 0) & (rel < t)
  if t <= 32:
    bits = jnp.sum(
      jnp.where(anc, jnp.left_shift(jnp.int32(1), jnp.arange(t, dtype=jnp.int32)), 0),
      axis=-1,
      dtype=jnp.int32,
    )  # [B, T]
    sh = jnp.clip(rel, 0, 31).astype(jnp.int32)[:, None, :]
    vis = (jax.lax.shift_right_logical(bits[:, :, None], sh) & 1) == 1
  else:
    idx = jnp.broadcast_to(jnp.clip(rel, 0, t - 1)[:, None, :], anc.shape[:2] + (s,))
    vis = jnp.take_along_axis(anc, idx, axis=2)
  mask = (rel < 0)[:, None, :] | (vis & in_tree[:, None, :])
  return base[:, None] + jnp.arange(t, dtype=base.dtype)[None, :], mask


def run_layers(
  layers,
  cfg: ModelConfig,
  x,
  positions,
  cache=None,
  *,
  mesh=None,
  rules=None,
  attention_impl: str = 'full',
  attention_block: int = 512,
  remat: bool = False,
  attend_len=None,
  tree_anc=None,
  return_new_kv: bool = False,
):
  """The decoder stack over x [B, T, D] at ``positions`` [B, T] (no embedding, no final
  norm): the policy's :func:`forward` and the eagle head's layers share it. ``layers``
  stacked or unstacked (:func:`unstack_layers`). With ``cache`` ``[L, B, K, S, Dh]`` the
  new k/v are written at ``positions`` (``>= S``: dropped) and queries attend to slots
  ``<= position``; without, key j is visible to query i iff ``positions[j] <=
  positions[i]``. Returns (x [B, T, D], new cache or None).

  Without a cache (the training forward) only, ``attention_impl`` (:mod:`specrl.attention`):
  'full' (:func:`attention` over a [B, T, T] mask: the reference), 'blocked'
  (:func:`blocked_attention` in blocks of ``attention_block``: memory linear in T), 'xla'
  (:func:`xla_causal_attention`: cuDNN's fused kernel on GPU; positions must increase by
  one) or 'pallas' (jax's Pallas flash kernels, :mod:`specrl.kernels.flash_attention`:
  TPU / GPU, the GPU one interpreted on CPU for tests; positions must increase by one);
  ``remat``: each layer under ``jax.checkpoint`` (its activations recomputed in the
  backward pass: the forward keeps one [B, T, D] residual per layer).

  With a cache (decoding) only: ``attend_len`` (static int): the step touches only the
  window of slots ``[0, attend_len)`` (capped at S): attention reads it and the new k/v
  are written into it (positions outside it are dropped) and the window goes back into
  the buffer in place
  (a dynamic-update-slice), so a step costs the live length, not the budget. The caller
  keeps every query it cares about at a position ``< attend_len``. None: the dense
  reference (attention over every slot, k/v scattered into the whole buffer).

  With a cache, ``tree_anc`` (bool [B, T, T], optional): the T fed tokens are the nodes of
  a draft tree (:mod:`specrl.decoding.tree`), node 0 the root at ``positions[:, 0]``.
  Siblings share a position, so slot and position are decoupled: node u's k/v go to slot
  ``positions[:, 0] + u`` (T scratch slots) and query t sees the slots ``<
  positions[:, 0]`` (the committed prefix) and the slots of the nodes u with
  ``tree_anc[b, t, u]`` (its ancestors and itself); RoPE still uses ``positions``. A chain
  (``tree_anc`` lower-triangular, positions ``base + t``) is exactly the causal case.

  ``return_new_kv`` (with a cache): also return the fed tokens' new k/v, ``{'k', 'v'}``
  each ``[L, B, T, K, Dh]`` in the cache's dtype, as a third value. A draft-tree round
  moves its accepted path into place from these (:func:`specrl.decoding.tree.move_accepted_kv`)
  rather than gathering it back out of the cache, which made XLA copy the whole cache."""
  rules = shd.DECODE_RULES if rules is None else rules
  if cache is None:
    if attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}')
    mask, attn_fn = None, None
    if attention_impl == 'full':
      mask = positions[:, None, :] <= positions[:, :, None]  # [B, T(q), T(k)]
    elif attention_impl == 'blocked':
      attn_fn = functools.partial(
        blocked_attention, q_pos=positions, k_pos=positions, block=attention_block
      )
    elif attention_impl == 'xla':
      attn_fn = xla_causal_attention
    else:  # jax's Pallas flash kernels; on CPU in Pallas's interpreter (tests: a run refuses)
      from specrl.kernels import flash_attention as flash_lib

      attn_fn = functools.partial(
        flash_lib.causal_flash_attention,
        platform='gpu' if jax.default_backend() == 'cpu' else None,
        interpret=jax.default_backend() == 'cpu',
      )

    def body(x, lp):
      kv_fn = lambda k, v: (k, v, mask, None)  # noqa: E731
      y, _ = _layer(cfg, lp, x, positions, kv_fn, mesh, rules, attn_fn)
      return y, None

    x, _ = _over_layers(jax.checkpoint(body) if remat else body, x, layers)
    return x, None
  s = cache_slots(cache)
  if attend_len is not None:
    s = min(int(attend_len), s)
  if tree_anc is None:
    slots = positions
    mask = jnp.arange(s)[None, None, :] <= positions[:, :, None]  # [B, T, S]
  else:
    slots, mask = tree_slots_mask(positions[:, 0], tree_anc, s)
  bidx = jnp.arange(x.shape[0])[:, None]
  attn_fn = functools.partial(attention, mask=mask, heads_major=True)

  def body(carry, xs):
    x, ck, cv = carry
    lp, li = xs

    def kv_fn(k, v):
      if attend_len is None:  # the dense reference: scatter into, attend to, every slot
        # advanced indices split by the head slice: the update is indexed [B, T, K, Dh]
        nk = ck.at[li, bidx, :, slots].set(k.astype(ck.dtype), mode='drop')
        nv = cv.at[li, bidx, :, slots].set(v.astype(cv.dtype), mode='drop')
        return nk[li].astype(x.dtype), nv[li].astype(x.dtype), mask, (nk, nv, k, v)
      wk = _write_window(ck[li, :, :, :s], k, slots)  # [B, K, s, Dh]: the live slots only
      wv = _write_window(cv[li, :, :, :s], v, slots)
      # The window goes back into the buffer in place (a dynamic-update-slice). Not a
      # select over the window: XLA fuses that into its readers, which then read the old
      # buffer after this update, so it copies the whole buffer every step; a scatter is
      # not duplicated into its readers.
      nk = jax.lax.dynamic_update_slice(ck, wk[None], (li, 0, 0, 0, 0))
      nv = jax.lax.dynamic_update_slice(cv, wv[None], (li, 0, 0, 0, 0))
      return wk.astype(x.dtype), wv.astype(x.dtype), mask, (nk, nv, k, v)

    y, (nk, nv, k, v) = _layer(cfg, lp, x, positions, kv_fn, mesh, rules, attn_fn)
    new = (k.astype(ck.dtype), v.astype(cv.dtype)) if return_new_kv else None
    return (y, nk, nv), new

  (x, ck, cv), new = _over_layers(body, (x, cache['k'], cache['v']), layers, True)
  if return_new_kv:
    return x, {'k': ck, 'v': cv}, {'k': new[0], 'v': new[1]}
  return x, {'k': ck, 'v': cv}


def forward(
  params: Params,
  cfg: ModelConfig,
  tokens: jax.Array,
  positions: jax.Array,
  cache: KVCache | None = None,
  *,
  mesh: Mesh | None = None,
  rules: dict | None = None,
  return_hidden: bool = False,
  logits_at: jax.Array | None = None,
  head: bool = True,
  attention_impl: str = 'full',
  attention_block: int = 512,
  remat: bool = False,
  attend_len: int | None = None,
  tree_anc: jax.Array | None = None,
  return_new_kv: bool = False,
):
  """Run the transformer.

  ``params['layers']`` is stacked (``lax.scan`` over layers) or a tuple of per-layer dicts
  (:func:`unstack_layers`: unrolled, for decode loops on CPU).

  Args:
    tokens: int32 [B, T].
    positions: int32 [B, T] absolute positions (per sequence).
    cache: optional KV cache ``[L, B, K, S, Dh]``; new k/v are written at ``positions``
      (positions >= S are dropped) and queries attend to slots ``<= position``.
      Without a cache, key j is visible to query i iff ``positions[j] <= positions[i]``.
    logits_at: optional int32 [B]: compute the logits of token ``logits_at[b]`` of each row
      only (logits [B, 1, V]). A prefill needs the last prompt token's logits alone; the
      [B, T, D] x [D, V] head over every prompt token would cost T times more (at
      SmolLM2's V = 49152 more than the whole prefill trunk).
    attend_len: static; with a cache, attend to slots ``< attend_len`` only
      (:func:`run_layers`): a decode step at live length ``<= attend_len``.
    tree_anc: optional bool [B, T, T]: the tokens are a draft tree's nodes (ancestor-or-self
      matrix; slots ``positions[:, 0] + u``, :func:`run_layers`).
  Returns:
    ``(logits f32 [B, T, V], new_cache)`` (``new_cache`` is None without a cache);
    with ``return_hidden`` also the final normed hidden state [B, T, D] (every token);
    ``head=False``: ``(None, new_cache, hidden)`` without computing any logits.
    ``return_new_kv`` (with a cache): ``new_cache`` is ``(new_cache, new_kv)``, new_kv the
    fed tokens' k/v ``{'k', 'v'}: [L, B, T, K, Dh]`` (:func:`run_layers`).
  Other keywords (:func:`run_layers`): ``attention_impl``, ``attention_block``, ``remat``:
  the no-cache forward's attention and per-layer rematerialisation.
  """
  rules = shd.DECODE_RULES if rules is None else rules
  x = _embed(params['embed'], tokens, cfg.cdtype)
  x = shd.constrain(x, ('batch', 'seq', 'embed'), mesh, rules)
  x, *new_cache = run_layers(
    params['layers'],
    cfg,
    x,
    positions,
    cache,
    mesh=mesh,
    rules=rules,
    attention_impl=attention_impl,
    attention_block=attention_block,
    remat=remat,
    attend_len=attend_len,
    tree_anc=tree_anc,
    return_new_kv=return_new_kv and cache is not None,
  )
  new_cache = tuple(new_cache) if len(new_cache) > 1 else new_cache[0]
  x = rms_norm(x, params['final_norm'], cfg.norm_eps)
  if not head:
    return None, new_cache, x
  xh = x if logits_at is None else jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
  logits = lm_head(params, cfg, xh, mesh=mesh, rules=rules)
  if return_hidden:
    return logits, new_cache, x
  return logits, new_cache


def lm_head(params: Params, cfg: ModelConfig, x: jax.Array, *, mesh=None, rules=None):
  """Logits f32 [B, T, V] of final-normed hidden states ``x`` [B, T, D] (the tied
  embedding or ``lm_head``). Separate so a caller can apply it to chunks of the sequence
  (training's logprobs never hold [B, S, V] at once: :func:`specrl.rl.sequence_logprobs`)."""
  rules = shd.DECODE_RULES if rules is None else rules
  w = params['embed'] if cfg.tie_embeddings else params['lm_head']
  eq = 'btd,vd->btv' if cfg.tie_embeddings else 'btd,dv->btv'
  logits = _einsum(eq, x, w).astype(jnp.float32)
  return shd.constrain(logits, ('batch', 'seq', 'vocab'), mesh, rules)


# ----------------------------------------------------------------------------- presets

_BF16 = dict(param_dtype='bfloat16', compute_dtype='bfloat16')

# Architecture shapes for benchmarks (random weights; no checkpoint is implied). The Qwen2.5
# entries copy the Hugging Face configs' shapes: tied embeddings, qkv bias, RoPE theta 1e6.
PRESETS: dict[str, dict] = {
  'gpu': dict(  # ~215M params
    vocab_size=32000, d_model=1024, n_layers=12, n_heads=16, n_kv_heads=4, head_dim=64, d_ff=4096
  )
  | _BF16,
  'qwen2.5-0.5b': dict(  # 494M params, 0.99 GB in bf16
    vocab_size=151936,
    d_model=896,
    n_layers=24,
    n_heads=14,
    n_kv_heads=2,
    head_dim=64,
    d_ff=4864,
    rope_theta=1e6,
    qkv_bias=True,
  )
  | _BF16,
  'qwen2.5-1.5b': dict(  # 1.54B params, 3.09 GB in bf16
    vocab_size=151936,
    d_model=1536,
    n_layers=28,
    n_heads=12,
    n_kv_heads=2,
    head_dim=128,
    d_ff=8960,
    rope_theta=1e6,
    qkv_bias=True,
  )
  | _BF16,
}


def preset_config(name: str, **overrides) -> ModelConfig:
  """The :data:`PRESETS` entry ``name`` as a ModelConfig (fields overridable)."""
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; known: {sorted(PRESETS)}')
  return ModelConfig(**(PRESETS[name] | overrides))

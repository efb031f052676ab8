"""The eagle head's math: its params, input, layers and output (:mod:`specrl.drafters.eagle`).

The head reads the live policy's embedding, final-norm weight and LM head (``draft_params``:
references, never copies) and owns ``fc`` and its decoder layers. Shared by the drafter,
its trees (:mod:`specrl.drafters.eagle_tree`) and its training
(:mod:`specrl.drafters.eagle_train`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from specrl import model as model_lib
from specrl import sampling

FEATURE_EPS = 1e-6  # in 1 / g: the unit-scale feature of a final-norm weight g near 0 is 0


def head_config(cfg: model_lib.ModelConfig, n_layers: int) -> model_lib.ModelConfig:
  """The head's layer shapes: the policy's, with ``n_layers`` layers."""
  return dataclasses.replace(cfg, n_layers=n_layers)


def init_head(cfg: model_lib.ModelConfig, n_layers: int, rng: jax.Array) -> dict:
  """Head params: ``embed_norm [D]``, ``fc [2D, D]``, ``layers`` (stacked like the policy's).

  Initialised so the untrained head predicts ``ĥ_{t+1} = h_t`` exactly: the ``h`` half of
  ``fc`` is the identity (on the unit-scale feature :func:`head_input` makes of ``h_t``),
  its token half zero (it has a gradient from the first update on: its input ``e(x)`` is
  not zero) and each layer's output projections (``wo``, ``w_down``) zero, so every layer
  starts as the identity. Why: with a random ``fc`` / layers the head's output is far from
  the policy's feature manifold, and through a real model's LM head (SmolLM2: ``|h|`` ~45,
  logits of tens of nats) the first updates' soft CE is ~20 nats and Adam diverges; from
  ``h_t`` the logits start at the policy's own scale and training only has to learn
  the step ``h_t -> h_{t+1}``."""
  layers = model_lib.init_params(dataclasses.replace(head_config(cfg, n_layers), vocab_size=1), rng)
  layers = dict(layers['layers'])
  layers['wo'] = jnp.zeros_like(layers['wo'])
  layers['w_down'] = jnp.zeros_like(layers['w_down'])
  d = cfg.d_model
  fc = jnp.concatenate([jnp.zeros((d, d), jnp.float32), jnp.eye(d, dtype=jnp.float32)], axis=0)
  return {
    'embed_norm': jnp.ones((d,), cfg.pdtype),
    'fc': fc.astype(cfg.pdtype),
    'layers': layers,
  }


def head_logical_axes(cfg: model_lib.ModelConfig) -> dict:
  return {
    'embed_norm': ('norm',),
    'fc': (None, 'embed'),
    'layers': model_lib.param_logical_axes(cfg)['layers'],
  }


def draft_params(policy_params, head_params, vocab_ids=None) -> dict:
  """What ``propose`` reads: the head's params and the live policy's embedding / LM head /
  final-norm weight (references to the policy's arrays, not copies); ``vocab_ids`` int32
  [N] if reduced."""
  dp = {
    'head': head_params,
    'embed': policy_params['embed'],
    'final_norm': policy_params['final_norm'],
  }
  if 'lm_head' in policy_params:
    dp['lm_head'] = policy_params['lm_head']
  if vocab_ids is not None:
    dp['vocab_ids'] = jnp.asarray(vocab_ids, jnp.int32)
  return dp


def head_input(dp, cfg, feats, next_tokens):
  """``fc([rms_norm(e(x_{t+1})); h_t / g])`` [B, T, D] of feats [B, T, D] and next_tokens
  int32 [B, T].

  ``g`` is the policy's final-norm weight: ``h_t / g`` is the unit-RMS direction of the
  policy's residual stream (``h_t = g * x_t / rms(x_t)``), the scale the head's layers work
  at; :func:`head_output` multiplies ``g`` back in."""
  e = model_lib._embed(dp['embed'], next_tokens, cfg.cdtype)
  e = model_lib.rms_norm(e, dp['head']['embed_norm'], cfg.norm_eps)
  g = dp['final_norm'].astype(jnp.float32)
  u = (feats.astype(jnp.float32) * (g / (g * g + FEATURE_EPS))).astype(cfg.cdtype)
  z = jnp.concatenate([e, u], axis=-1)
  return jnp.einsum('btc,cd->btd', z, dp['head']['fc'].astype(cfg.cdtype))


def head_output(dp, cfg, y):
  """The head's predicted feature ``ĥ = rms_norm(y, g)`` [..., D] of its last layer's
  output ``y``: the policy's own final norm, so ``ĥ`` lies where the policy's final-norm
  hidden states lie (same RMS, same per-channel scale) and its logits have the policy's
  scale whatever the head's weights."""
  return model_lib.rms_norm(y, dp['final_norm'], cfg.norm_eps)


def head_layers(layers, hcfg, x, positions, cache=None, *, mesh=None, rules=None, **forward_opts):
  """The head's decoder layers: the policy's own stack (:func:`specrl.model.run_layers`)
  with the head's weights and ``hcfg`` (its layer count). Returns (x [B, T, D], cache).
  ``forward_opts``: ``run_layers``'s no-cache options (attention_impl, attention_block,
  remat)."""
  return model_lib.run_layers(
    layers, hcfg, x, positions, cache, mesh=mesh, rules=rules, **forward_opts
  )


def head_logits_compact(dp, cfg, feat):
  """Draft logits over the head's vocabulary only: (f32 [..., N], ``dp['vocab_ids']`` [N])
  when it is reduced, else (f32 [..., V], None). Training's loss needs no [..., V] array."""
  tied = 'lm_head' not in dp
  head = dp['embed'] if tied else dp['lm_head']
  feat = feat.astype(cfg.cdtype)
  if 'vocab_ids' not in dp:
    eq = '...d,vd->...v' if tied else '...d,dv->...v'
    return model_lib._einsum(eq, feat, head).astype(jnp.float32), None
  ids = dp['vocab_ids']
  rows = jnp.take(head, ids, axis=0) if tied else jnp.take(head, ids, axis=1).T  # [N, D]
  return jnp.einsum('...d,nd->...n', feat, rows.astype(feat.dtype)).astype(jnp.float32), ids


def head_logits(dp, cfg, feat):
  """Draft logits f32 [..., V] of predicted features [..., D] through the policy's LM head;
  ``NEG_INF`` outside ``dp['vocab_ids']`` when the vocabulary is reduced."""
  small, ids = head_logits_compact(dp, cfg, feat)
  if ids is None:
    return small
  full = jnp.full(feat.shape[:-1] + (cfg.vocab_size,), sampling.NEG_INF, jnp.float32)
  return full.at[..., ids].set(small)


def predict_features(
  dp, cfg, hcfg, feats, next_tokens, positions, *, mesh=None, rules=None, **forward_opts
):
  """Teacher-forced head over a whole sequence (training, tests): ĥ_{t+1} [B, T, D] from
  the true features ``feats`` [B, T, D] at ``positions`` and the tokens ``x_{t+1}``.
  ``forward_opts``: the attention / remat of the policy's loss forward
  (``specrl.rl.forward_options``), so the head's layers stay memory-bounded at long T."""
  x = head_input(dp, cfg, feats, next_tokens)
  out, _ = head_layers(
    dp['head']['layers'], hcfg, x, positions, mesh=mesh, rules=rules, **forward_opts
  )
  return head_output(dp, cfg, out)

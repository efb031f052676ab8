"""EAGLE-style draft head on the live policy's hidden states (TLT's online drafter).

The head is ``n_layers`` decoder layers of the policy's architecture (the layer function of
:mod:`specrl.model`, with the head's own weights) on the input

  ``z_t = fc([rms_norm(e(x_{t+1})); h_t / g])``  (``[2D] -> [D]``)

where ``h_t`` is the policy's *final-norm* hidden state at position ``t`` (the vector its LM
head reads: :func:`specrl.model.forward` with ``return_hidden``), ``g`` the policy's
final-norm weight (so ``h_t / g`` is the unit-RMS residual direction) and ``e`` the policy's
embedding. The head's output at head position ``t`` is ``ĥ_{t+1} = rms_norm(y_t, g)`` (``y``:
its last layer's output, through the policy's own final norm), a prediction of ``h_{t+1}``;
the draft logits for ``x_{t+2}`` are the policy's LM head applied to it. The embedding,
final-norm weight and LM head are read from the *live* policy params on every call (never
copied, never trained here); the head's own params are small (``fc`` + its layers). Working
at the policy's feature scale matters on a real model (issue 16: SmolLM2-135M's ``|h|`` ~45
gives logits of tens of nats; a head off that manifold started at a soft CE of ~19 nats and
its training diverged); :func:`init_head` starts it at ``ĥ_{t+1} = h_t``.

Proposing at state ``pos`` (last committed token ``x_pos``; the policy's hidden states are
known for every position ``< pos``, :mod:`specrl.drafters.hooks` ``hidden_history``):

1. catch up: head positions ``fed .. pos - 1`` are fed with *true* features (``fed`` [B] is
   the head's own counter: its KV cache holds true features below it). After a verify
   pass ``pos - fed = n + 1 <= k + 1``: one window pass of ``T = k + 1``. After the prompt
   or a plain phase of the adaptive engine a ``while_loop`` first feeds chunks of
   ``catchup_chunk`` positions (:mod:`specrl.drafters.catchup`, shared with the model
   drafters). The window's output at head position ``pos - 1`` is
   ``ĥ_pos``, whose logits give draft 1.
2. draft ``i + 1`` comes from head position ``pos - 1 + i`` on ``fc([e(x̂_i); ĥ_{pos-1+i}])``
   -- the head's own predicted feature, ``T = 1`` each. Those cache slots hold predicted
   features until the next catch-up rewrites them with true ones (rollback by position,
   like the policy's cache).

So the head needs no extra policy forward: the prefill, plain steps and verify passes
already return the hidden states, and the rollout state keeps every committed position's.

Trees (``rollout.tree_nodes = N >= 2``; :meth:`EagleDrafter.propose_tree`): instead of one
sampled chain the head proposes EAGLE-2's dynamic tree from its *top* candidates. Depth 1
is the head's top ``b`` (``tree_branch``) tokens after ``ĥ_pos``, scored by their log q (q:
the head's temperature-scaled softmax, over its reduced vocabulary if any; ties to the
lower index). For each depth ``d < D`` (the ``tree_depth`` cap, else N - 1) the ``b`` best
candidates of depth d by cumulative score are expanded: one head pass over those b nodes at
head position ``pos - 1 + d``, each fed ``(ĥ of its parent, its token)`` and attending to
the committed head positions ``< pos`` plus its ancestors' and its own K/V (a mask over the
head cache; the b nodes' K/V go to scratch slots ``pos + (d - 1) b + j``, dropped past the
buffer), giving its top b children, scored parent + log q. The N - 1 best candidates of
all depths (a stable sort of the scores: a child's score is at most its parent's and it
comes later, so they form a subtree, parents first) are the tree. ``D - 1`` head passes of
b nodes, no draw from any random stream: the tree is a deterministic function of the
head's inputs, so sample-and-compare verification emits plain decoding's tokens. The head's
committed state is untouched: slots ``< pos`` are not written, ``fed`` becomes ``pos``, and
the next round's catch-up feeds the accepted path's true features over the scratch.

Sampled trees (``tree_children = 'sampled'``, T > 0; :meth:`EagleDrafter.
propose_sampled_tree`): the same growth, but each expanded node's b children are *drawn*
from the head's processed q (temperature, top-k, top-p) without replacement (Gumbel-top-b,
row keys of the round's draft seed), and slot j is scored by the j-th largest log q -- not
by the drawn token's own, so that whether a slot is kept never depends on what was drawn
into it. The tree carries each node's q (compact logits [B, N, R]) and is verified by
recursive rejection sampling (:mod:`specrl.kernels.verify_sampled_tree_reference`): each
child is accepted with probability ``min(1, P/Q)``, a rejection moves to the residual, and
the output follows the policy's distribution exactly, but not plain decoding's very
tokens. Why: a top-candidate tree accepts a child with the policy's own mass on it,
``p(c)``; a sampled child is accepted with ``Σ min(p, q)``, which a calibrated head makes
larger (the sampled chain's depth-1 acceptance exceeds the head's top-1 hit rate), and the
later siblings then try the residual. At T = 0 the trees are the top candidates.

Reduced vocabulary (``reduced_vocab = N > 0``): the head's logits are computed only for
``vocab_ids`` (N ids, e.g. the most frequent tokens of the policy's generations); every other
token gets ``NEG_INF``, so the draft distribution is exactly zero there. Still lossless:
rejection sampling only needs the drafts to be sampled from the q it is given.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from specrl import attention as attention_lib
from specrl import config as config_lib
from specrl import model as model_lib
from specrl import prng, sampling
from specrl import sharding as shd
from specrl.drafters import catchup

SECTION = 'drafter.eagle'
FEATURE_EPS = 1e-6  # in 1 / g: the unit-scale feature of a final-norm weight g near 0 is 0
MODES = ('frozen', 'cotrain', 'spot')
TREE_CHILDREN = ('top', 'sampled')


@dataclasses.dataclass(frozen=True)
class EagleConfig:
  """Options of the ``eagle`` drafter (config ``drafter.eagle.*``)."""

  n_layers: int = 1  # decoder layers of the head
  reduced_vocab: int = 0  # N > 0: draft over the N most frequent tokens only (0 = all)
  # frozen | cotrain (head update fused into the GRPO step) | spot (TLT: updates on a buffer
  # of recent GRPO steps' hidden states in the rollout's long tail; eagle_spot.py)
  mode: str = 'frozen'
  lr: float = 1e-3  # head optimizer (adamw)
  lr_warmup: int = 20  # head updates of linear lr warm-up (0 = none)
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  hidden_weight: float = 0.5  # weight of SmoothL1(ĥ_{t+1}, h_{t+1})
  ce_weight: float = 0.5  # weight of the soft CE against the policy's next-token distribution
  catchup_chunk: int = 32  # positions per catch-up pass (after the prompt / plain phases)
  warmup_steps: int = 0  # head updates on the policy's own generations before RL
  warmup_budget_s: float = 600.0  # wall-clock cap of the warm-up (stops early, says so)
  target_topk: int = 64  # warm-up CE against the policy's top-k (cached per batch; 0 = full)
  spot_buffer_steps: int = 4  # spot: GRPO steps of (hidden, tokens, mask) kept (a ring)
  spot_bucket: int = 4  # spot: update once the adaptive engine's bucket is <= this
  spot_budget_s: float = 5.0  # spot: seconds of head updates per RL step (added to it)
  spot_max_updates: int = 0  # spot: head updates per RL step at most (0 = budget only)
  spot_minibatch: int = 0  # spot: rows per update, from one buffered step (0 = all)
  # spot: positions kept per buffered row (the first ones: prompt and the answer's start);
  # the ring is N x B x this x D, fixed in the train state, so it must not follow the
  # token budget (a 32k budget would hold GBs); 0 = the whole buffer (seq_len)
  spot_max_len: int = 2048
  head_path: str = ''  # a head saved by save_head (e.g. after a warm-up); '' = fresh init
  # draft trees (rollout.tree_nodes > 0): children per expanded node, the head's top ones
  tree_branch: int = 4
  # 'top': the head's top candidates, sample-and-compare (plain decoding's very tokens);
  # 'sampled' (T > 0): drawn from the head without replacement, recursive rejection sampling
  # (plain decoding's distribution, not its tokens). Module doc "Sampled trees".
  tree_children: str = 'top'

  def __post_init__(self):
    if self.n_layers < 1:
      raise ValueError(f'{SECTION}.n_layers must be >= 1, got {self.n_layers}')
    if self.reduced_vocab < 0:
      raise ValueError(f'{SECTION}.reduced_vocab must be >= 0 (0 = off), got {self.reduced_vocab}')
    if self.mode not in MODES:
      raise ValueError(f'{SECTION}.mode must be one of {MODES}, got {self.mode!r}')
    if self.tree_branch < 1:
      raise ValueError(
        f'{SECTION}.tree_branch must be >= 1 (children per expanded tree node; 1 = the '
        f"head's argmax chain), got {self.tree_branch}"
      )
    if self.tree_children not in TREE_CHILDREN:
      raise ValueError(
        f'{SECTION}.tree_children must be one of {TREE_CHILDREN}, got {self.tree_children!r}'
      )
    if self.spot_buffer_steps < 1 or self.spot_bucket < 1:
      raise ValueError(
        f'{SECTION}.spot_buffer_steps and spot_bucket must be >= 1, got '
        f'{self.spot_buffer_steps}, {self.spot_bucket}'
      )
    if not self.spot_budget_s > 0:
      raise ValueError(f'{SECTION}.spot_budget_s must be > 0 seconds, got {self.spot_budget_s}')
    if self.spot_max_len < 0 or self.spot_max_len == 1:
      raise ValueError(
        f'{SECTION}.spot_max_len must be 0 (the whole buffer) or >= 2 positions, got '
        f'{self.spot_max_len}'
      )
    if self.spot_max_updates < 0 or self.spot_minibatch < 0:
      raise ValueError(
        f'{SECTION}.spot_max_updates (0 = budget only) and spot_minibatch (0 = whole step) '
        f'must be >= 0, got {self.spot_max_updates}, {self.spot_minibatch}'
      )
    if (
      self.lr <= 0
      or self.catchup_chunk < 1
      or self.warmup_steps < 0
      or self.target_topk < 0
      or self.lr_warmup < 0
    ):
      raise ValueError(
        f'{SECTION}: lr and catchup_chunk must be > 0; warmup_steps, target_topk, lr_warmup >= 0'
      )

  @classmethod
  def from_config(cls, section) -> EagleConfig:
    return config_lib.from_config(cls, section, SECTION)


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


# ----------------------------------------------------------------------------- head math


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


# ----------------------------------------------------------------------------- drafter


def _at(x, idx):
  """x [B, S, ...] at idx [B, T] (clipped to the buffer) -> [B, T, ...]."""
  idx = jnp.clip(idx, 0, x.shape[1] - 1)
  if x.ndim == 2:
    return jnp.take_along_axis(x, idx, axis=1)
  return jnp.take_along_axis(x, idx[..., None], axis=1)


class EagleDrafter:
  """The ``eagle`` drafter (see the module docstring). ``head_params`` / ``vocab_ids`` are
  the current head (set by training, warm-up or a checkpoint restore); ``params_from_policy``
  pairs them with the live policy's embedding and LM head."""

  name = 'eagle'
  derived = False  # the head's params are its own: passed to jitted steps as arguments
  wants_hidden = True
  hidden_history = True

  def __init__(
    self, model_cfg: model_lib.ModelConfig, ecfg: EagleConfig, head_params, vocab_ids=None
  ):
    self.model_cfg, self.ecfg = model_cfg, ecfg
    self.hcfg = head_config(model_cfg, ecfg.n_layers)
    self.head_params = head_params
    if ecfg.reduced_vocab and vocab_ids is None:
      vocab_ids = jnp.arange(min(ecfg.reduced_vocab, model_cfg.vocab_size), dtype=jnp.int32)
    self.vocab_ids = vocab_ids

  @property
  def samples_tree_children(self) -> bool:
    """Tree rounds at T > 0 call :meth:`propose_sampled_tree` (``tree_children='sampled'``)."""
    return self.ecfg.tree_children == 'sampled'

  def params_from_policy(self, policy_params):
    return draft_params(policy_params, self.head_params, self.vocab_ids)

  def state_logical_axes(self):
    return {'cache': model_lib.cache_logical_axes(), 'fed': ('batch',)}

  def prefill(self, dp, prompt_tokens, prompt_len, buffer_len, mesh=None):
    """An empty head cache: the first proposal catches up on the prompt's features."""
    b = prompt_tokens.shape[0]
    cache = model_lib.init_cache(self.hcfg, b, buffer_len)
    return {'cache': cache, 'fed': jnp.zeros((b,), jnp.int32)}

  def _feed(self, dp, cache, seq_tokens, hist, hfrom, first, valid, mesh):
    """Feed head positions ``first[:, None] + arange(T)`` where ``valid`` [B, T] (true
    features from the policy's history); returns (outputs [B, T, D], cache)."""
    t = valid.shape[1]
    p = first[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    feats = _at(hist, p - hfrom[:, None])
    nxt = _at(seq_tokens, p + 1)
    write = jnp.where(valid, p, model_lib.cache_slots(cache))  # invalid: out of range, dropped
    x = head_input(dp, self.model_cfg, feats, nxt)
    y, cache = head_layers(
      dp['head']['layers'], self.hcfg, x, write, cache, mesh=mesh, rules=shd.DECODE_RULES
    )
    return head_output(dp, self.model_cfg, y), cache

  def _root(self, dp, state, seq_tokens, pos, w, ctx, mesh):
    """Catch the head up on the committed positions (in ``catchup_chunk`` passes, then one
    window of ``w`` ending at ``pos - 1``). Returns (ĥ_pos [B, D], head cache, fed)."""
    if ctx is None or ctx.hidden is None:
      raise ValueError('the eagle drafter needs the policy hidden states (ctx.hidden)')
    hist, hfrom = ctx.hidden, ctx.hidden_from

    def feed(cache, first, valid):
      return self._feed(dp, cache, seq_tokens, hist, hfrom, first, valid, mesh)[1]

    # head positions < pos - 1 in passes of catchup_chunk, until every row has at most one
    # window of them left (the window below feeds those and pos - 1)
    cache, fed = catchup.catch_up(
      feed, state['cache'], state['fed'], pos - 1, self.ecfg.catchup_chunk, slack=w - 1
    )
    valid = fed[:, None] + jnp.arange(w)[None, :] <= (pos - 1)[:, None]
    out, cache = self._feed(dp, cache, seq_tokens, hist, hfrom, fed, valid, mesh)
    return _at(out, (pos - 1 - fed)[:, None])[:, 0], cache, fed

  def propose(
    self, dp, state, seq_tokens, pos, k, seeds, sp, mesh=None, policy_cache=None, ctx=None
  ):
    cfg = self.model_cfg
    feat, cache, fed = self._root(dp, state, seq_tokens, pos, k + 1, ctx, mesh)  # ĥ_pos
    logit0 = head_logits(dp, cfg, feat)
    tok0 = sampling.sample_seeded(logit0, seeds, sp, row=0)

    def body(carry, i):
      cache, tok, feat = carry
      x = head_input(dp, cfg, feat[:, None], tok[:, None])
      x, cache = head_layers(
        dp['head']['layers'],
        self.hcfg,
        x,
        (pos - 1 + i)[:, None],
        cache,
        mesh=mesh,
        rules=shd.DECODE_RULES,
      )
      feat = head_output(dp, cfg, x[:, 0])
      lg = head_logits(dp, cfg, feat)
      nxt = sampling.sample_seeded(lg, seeds, sp, row=i)
      return (cache, nxt, feat), (nxt, lg)

    if k > 1:
      (cache, _, _), (toks, lgs) = jax.lax.scan(
        body, (cache, tok0, feat), jnp.arange(1, k, dtype=jnp.int32)
      )
      draft_tokens = jnp.concatenate([tok0[:, None], toks.T], axis=1)
      draft_logits = jnp.concatenate([logit0[:, None], jnp.swapaxes(lgs, 0, 1)], axis=1)
    else:
      draft_tokens, draft_logits = tok0[:, None], logit0[:, None]
    return draft_tokens, draft_logits, {'cache': cache, 'fed': jnp.maximum(fed, pos)}, policy_cache

  # --------------------------------------------------------------------------- trees

  def _top_children(self, dp, feat, sp, branch, keys=None):
    """The head's ``branch`` next tokens after predicted features feat [B, M, D]: (tokens
    int32 [B, M, b], scores f32 [B, M, b], compact logits f32 [B, M, R]).

    ``keys`` None: its likeliest tokens, best first (ties: the lower vocabulary index),
    scored by their log q (q: the head's temperature-scaled softmax, over its reduced
    vocabulary if any). ``keys`` int32 [B, M] (row keys, :mod:`specrl.prng`): b tokens drawn
    without replacement from the processed q (temperature, top-k, top-p: the distribution
    the verifier is given) by Gumbel-top-b, in draw order; slot j's score is the j-th
    largest log q -- not the drawn token's, so that whether a slot is kept never depends on
    what was drawn into it (:mod:`specrl.kernels.verify_sampled_tree_reference`)."""
    lg, ids = head_logits_compact(dp, self.model_cfg, feat)
    b = min(branch, lg.shape[-1])
    if keys is None:
      lq = jax.nn.log_softmax(sampling.scale_logits(lg, sp), axis=-1)
      val, idx = jax.lax.top_k(lq, b)
    else:
      pl = sampling.processed_logits(lg, sp)
      val = jax.lax.top_k(jax.nn.log_softmax(pl, axis=-1), b)[0]
      cols = jnp.arange(lg.shape[-1], dtype=jnp.int32)
      g = prng.gumbel_from_bits(prng.element_bits(keys[..., None], cols))
      idx = jax.lax.top_k(pl + g, b)[1]
    tok = idx if ids is None else jnp.take(ids, idx)
    return tok.astype(jnp.int32), val, lg

  def _tree_layers(self, dp, x, positions, slots, mask, cache, mesh):
    """The head's layers over tree nodes x [B, F, D] at RoPE ``positions`` [B, F]: their k/v
    written to head-cache ``slots`` [B, F] (past the cache: dropped) and query f attending to
    the slots ``mask[b, f]`` [B, F, S] allows. Returns (y [B, F, D], cache)."""
    bidx = jnp.arange(x.shape[0])[:, None]

    def body(carry, xs):
      x, ck, cv = carry
      lp, li = xs

      def kv_fn(k, v):
        nk = ck.at[li, bidx, :, slots].set(k.astype(ck.dtype), mode='drop')  # [L, B, K, S, Dh]
        nv = cv.at[li, bidx, :, slots].set(v.astype(cv.dtype), mode='drop')
        return nk[li].astype(x.dtype), nv[li].astype(x.dtype), mask, (nk, nv)

      attn = lambda q, k, v: attention_lib.attention(q, k, v, mask, heads_major=True)  # noqa: E731
      y, (nk, nv) = model_lib._layer(
        self.hcfg, lp, x, positions, kv_fn, mesh, shd.DECODE_RULES, attn
      )
      return (y, nk, nv), None

    init = (x, cache['k'], cache['v'])
    (x, ck, cv), _ = model_lib._over_layers(body, init, dp['head']['layers'], True)
    return x, {'k': ck, 'v': cv}

  def propose_tree(
    self, dp, state, seq_tokens, pos, n_nodes, depth_cap, seeds, sp, mesh=None, ctx=None,
    branch=None,
  ):  # fmt: skip
    """A draft tree of ``n_nodes`` grown from the head's top candidates (EAGLE-2's dynamic
    tree; module doc "Trees"). Deterministic given the head's outputs: ``seeds`` unused.
    ``branch``: children per expanded node (default ``drafter.eagle.tree_branch``).
    Returns (tokens, parents, depth) int32 [B, N] (node 0 the root, token -1) and the state."""
    tokens, parents, depth, _, state = self._grow_tree(
      dp, state, seq_tokens, pos, n_nodes, depth_cap, None, sp, mesh, ctx, branch
    )
    return tokens, parents, depth, state

  def propose_sampled_tree(
    self, dp, state, seq_tokens, pos, n_nodes, depth_cap, seeds, sp, mesh=None, ctx=None,
    branch=None,
  ):  # fmt: skip
    """A draft tree of ``n_nodes`` whose children are drawn from the head (module doc
    "Sampled trees"), for recursive rejection sampling. ``seeds`` [B]: the round's draft
    event seeds. Returns (tokens, parents, depth int32 [B, N], draft_logits f32 [B, N, R]:
    row u the head's logits node u was drawn from, the head's vocabulary ids [R] or None,
    the state)."""
    tokens, parents, depth, q, state = self._grow_tree(
      dp, state, seq_tokens, pos, n_nodes, depth_cap, seeds, sp, mesh, ctx, branch
    )
    return tokens, parents, depth, q, dp.get('vocab_ids'), state

  def _grow_tree(
    self, dp, state, seq_tokens, pos, n_nodes, depth_cap, seeds, sp, mesh, ctx, branch
  ):  # fmt: skip
    """The tree of :meth:`propose_tree` (``seeds`` None) or :meth:`propose_sampled_tree`
    (children drawn with row keys of ``seeds``: the root's row 0, the j-th node expanded at
    depth d row ``1 + (d - 1) b + j``). Returns (tokens, parents, depth, draft logits [B, N,
    R] or None, state)."""
    cfg = self.model_cfg
    b = int(branch or self.ecfg.tree_branch)
    k = n_nodes - 1
    dmax = max(1, min(int(depth_cap or k), k))
    sampled = seeds is not None

    def keys(rows):  # row keys [B, len(rows)] of the children draws (None: top candidates)
      if not sampled:
        return None
      return prng.row_key(prng.seeds_to_i32(seeds)[:, None], rows[None, :], prng.STREAM_SAMPLE)

    feat, cache, fed = self._root(dp, state, seq_tokens, pos, n_nodes, ctx, mesh)  # ĥ_pos
    bsz, s = pos.shape[0], model_lib.cache_slots(cache)
    root = self._top_children(dp, feat[:, None], sp, b, keys(jnp.zeros((1,), jnp.int32)))
    tok, score, lg = (a[:, 0] for a in root)  # depth 1
    b = tok.shape[1]  # (a vocabulary smaller than the branch)
    # The expanded nodes' K/V take head-cache scratch slots up to pos + (dmax - 1) b - 1,
    # past a length-bucket window (the loop carries the head cache cut to it): carry as
    # many more slots as the buffer has (its end drops the rest, on every path alike), so
    # the tree is the dense path's; cut back to the window after the tree.
    window = s
    s = min(window + (dmax - 1) * b, seq_tokens.shape[1])
    if s > window:
      pad = ((0, 0),) * model_lib.CACHE_SLOT_AXIS + ((0, s - window),) + ((0, 0),)
      cache = jax.tree.map(lambda c: jnp.pad(c, pad[: c.ndim]), cache)
    toks, scores, par_flat, depths = [tok], [score], [jnp.full((bsz, b), -1, jnp.int32)], [1]
    logits = [lg[:, None]]  # of every expanded node (the root first)
    src = [jnp.zeros((bsz, b), jnp.int32)]  # each candidate's expanded parent in `logits`
    par_feat = jnp.broadcast_to(feat[:, None], (bsz, b, feat.shape[-1]))  # of each candidate
    anc = jnp.zeros((bsz, b, 0), jnp.int32)  # head-cache slots of each candidate's ancestors
    offset = 0  # flat index of this level's first candidate
    slot_ids = jnp.arange(s, dtype=jnp.int32)
    for d in range(1, dmax):  # expand depth d's best b candidates: one head pass each level
      fval, fi = jax.lax.top_k(scores[-1], b)  # stable: ties to the earlier candidate
      take = lambda a, fi=fi: jnp.take_along_axis(a, fi.reshape(fi.shape + (1,) * (a.ndim - 2)), 1)  # noqa: E731
      ftok, fpar, fanc = take(toks[-1]), take(par_feat), take(anc)
      slots = pos[:, None] + (d - 1) * b + jnp.arange(b, dtype=jnp.int32)[None, :]
      fanc = jnp.concatenate([fanc, slots[..., None]], axis=2)  # [B, b, d]: with itself
      mask = (slot_ids[None, None, :] < pos[:, None, None]) | jnp.any(
        slot_ids[None, None, :, None] == fanc[:, :, None, :], axis=-1
      )
      x = head_input(dp, cfg, fpar, ftok)
      positions = jnp.broadcast_to((pos - 1 + d)[:, None], ftok.shape)
      y, cache = self._tree_layers(dp, x, positions, slots, mask, cache, mesh)
      out = head_output(dp, cfg, y)  # [B, b, D]: ĥ after each expanded node
      rows = 1 + (d - 1) * b + jnp.arange(b, dtype=jnp.int32)
      ctok, clq, clg = self._top_children(dp, out, sp, b, keys(rows))  # [B, b, b]
      toks.append(ctok.reshape(bsz, b * b))
      scores.append((fval[:, :, None] + clq).reshape(bsz, b * b))
      par_flat.append(jnp.repeat(offset + fi, b, axis=1).astype(jnp.int32))
      depths.append(d + 1)
      logits.append(clg)
      src.append(jnp.broadcast_to(jnp.repeat(rows, b)[None, :], (bsz, b * b)))
      par_feat = jnp.repeat(out, b, axis=1)
      anc = jnp.repeat(fanc, b, axis=1)
      offset += toks[-2].shape[1]
    tokens, parents, depth, sel_src = _best_first(toks, scores, par_flat, depths, k, src)
    q = None
    if sampled:  # row u: the logits of u's parent (the root's row: unused)
      q = jnp.take_along_axis(jnp.concatenate(logits, axis=1), sel_src[..., None], axis=1)
    if s > window:
      cache = jax.tree.map(lambda c: c[:, :, :, :window], cache)
    return tokens, parents, depth, q, {'cache': cache, 'fed': jnp.maximum(fed, pos)}


def _best_first(toks, scores, par_flat, depths, k: int, src):
  """The ``k`` best candidates of every level (lists of [B, C_d]: tokens, cumulative log q,
  parent's flat candidate index (-1: the root), the level's depth) as a tree of ``k + 1``
  nodes, parents before children. A child's score is its parent's plus a log q <= 0, and
  the candidates are flat in level order, so a stable sort by score puts every parent before
  its children and the best k are a subtree. A candidate of probability 0 (``NEG_INF``
  logits) is an empty node. ``src``: a list like ``toks`` of per-candidate ints, returned
  for the nodes too (the root's 0). Returns (tokens, parents, depth, src) int32 [B, k + 1]."""
  tok = jnp.concatenate(toks, axis=1)
  srcs = jnp.concatenate(src, axis=1)
  score = jnp.concatenate(scores, axis=1)
  pflat = jnp.concatenate(par_flat, axis=1)
  dep = jnp.concatenate(
    [jnp.full(t.shape, d, jnp.int32) for t, d in zip(toks, depths, strict=True)], axis=1
  )
  bsz, c = tok.shape
  if c < k:  # fewer candidates than nodes (a branch of 1: one per level)
    pad = lambda a, v: jnp.pad(a, ((0, 0), (0, k - c)), constant_values=v)  # noqa: E731
    tok, score, pflat, dep = pad(tok, -1), pad(score, -jnp.inf), pad(pflat, -1), pad(dep, 1)
    srcs = pad(srcs, 0)
  sel = jnp.argsort(-score, axis=1, stable=True)[:, :k]
  take = lambda a: jnp.take_along_axis(a, sel, axis=1)  # noqa: E731
  ntok, nscore, npf, ndep = take(tok), take(score), take(pflat), take(dep)
  live = nscore > 0.5 * sampling.NEG_INF
  hit = (sel[:, None, :] == npf[:, :, None]) & live[:, None, :]  # [B, node, candidate node]
  par = jnp.where(npf < 0, 0, jnp.where(jnp.any(hit, axis=2), jnp.argmax(hit, axis=2) + 1, -1))
  live &= par >= 0
  root = jnp.zeros((bsz, 1), jnp.int32)
  return (
    jnp.concatenate([root - 1, jnp.where(live, ntok, -1)], axis=1).astype(jnp.int32),
    jnp.concatenate([root - 1, jnp.where(live, par, 0)], axis=1).astype(jnp.int32),
    jnp.concatenate([root, jnp.where(live, ndep, 1)], axis=1).astype(jnp.int32),
    jnp.concatenate([root, take(srcs)], axis=1).astype(jnp.int32),
  )


# ----------------------------------------------------------------------------- head files

VOCAB_KEY = 'vocab_ids'


def _leaf_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def save_head(path: str, head_params, vocab_ids=None) -> None:
  """Write a head (and its reduced vocabulary, if any) to ``path`` (an ``.npz``): a head
  warmed up once (``bench/eagle_alpha.py --real-alpha --save_head``) is reused by benchmarks
  and runs (``drafter.eagle.head_path``) instead of re-training it each time. Training runs
  checkpoint the head with orbax (``TrainState.drafter``); this is the portable single file."""
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(head_params))[0]
  arrays = {_leaf_name(p): np.asarray(x) for p, x in leaves}
  if vocab_ids is not None:
    arrays[VOCAB_KEY] = np.asarray(vocab_ids, np.int32)
  with open(path, 'wb') as f:  # np.savez(path) would append '.npz' to other names
    np.savez(f, **arrays)


def load_head(path: str, model_cfg: model_lib.ModelConfig, n_layers: int):
  """(head params, vocab_ids or None) from a :func:`save_head` file, checked leaf by leaf
  against the head this model and ``n_layers`` would initialise: a head of another model,
  layer count or a file that is not a head is a ``ValueError`` naming what differs."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{SECTION}.head_path: no such file {path!r}')
  try:
    with np.load(path) as f:
      data = {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path}: not an eagle head file (.npz from eagle.save_head): {e}') from e
  template = jax.eval_shape(lambda: init_head(model_cfg, n_layers, jax.random.key(0)))
  flat, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = [_leaf_name(p) for p, _ in flat]
  missing = [n for n in names if n not in data]
  extra = sorted(set(data) - set(names) - {VOCAB_KEY})
  if missing or extra:
    raise ValueError(
      f'{path}: not a head of this model with n_layers={n_layers}: missing {missing}, '
      f'unexpected {extra}'
    )
  leaves = []
  for (_, spec), n in zip(flat, names, strict=True):
    if data[n].shape != spec.shape:
      raise ValueError(
        f'{path}: {n} has shape {data[n].shape}, this model with n_layers={n_layers} needs '
        f'{spec.shape} (a head of another model or layer count?)'
      )
    leaves.append(jnp.asarray(data[n], spec.dtype))
  vocab = data.get(VOCAB_KEY)
  if vocab is not None and (
    vocab.ndim != 1 or vocab.min() < 0 or vocab.max() >= model_cfg.vocab_size
  ):
    raise ValueError(f'{path}: vocab_ids must be ids < {model_cfg.vocab_size} in one row')
  return jax.tree.unflatten(treedef, leaves), None if vocab is None else jnp.asarray(vocab)


def saved_vocab_size(path: str) -> int:
  """The reduced vocabulary size a :func:`save_head` file was written with (0 = full),
  read without loading the head's weights."""
  with np.load(path) as f:
    return int(f[VOCAB_KEY].shape[0]) if VOCAB_KEY in f.files else 0


def make_eagle_drafter(
  section, model_cfg: model_lib.ModelConfig, rng, cls=EagleDrafter
) -> EagleDrafter:
  """The drafter from ``config.drafter.eagle``: its head loaded from ``head_path`` if set
  (its reduced vocabulary too; ``reduced_vocab`` must then equal its size), else initialised
  from ``rng``. ``cls``: :class:`EagleDrafter` or a subclass (a run's drafter is
  :class:`specrl.drafters.eagle_train.OnlineEagleDrafter`, which has a trainer)."""
  ecfg = EagleConfig.from_config(section)
  if not ecfg.head_path:
    return cls(model_cfg, ecfg, init_head(model_cfg, ecfg.n_layers, rng))
  head, vocab = load_head(ecfg.head_path, model_cfg, ecfg.n_layers)
  n = 0 if vocab is None else int(vocab.shape[0])
  if vocab is not None and ecfg.reduced_vocab != n:
    raise ValueError(
      f'{SECTION}.reduced_vocab={ecfg.reduced_vocab} but {ecfg.head_path} was saved with a '
      f'reduced vocabulary of {n} ids: set {SECTION}.reduced_vocab={n}'
    )
  return cls(model_cfg, ecfg, head, vocab)

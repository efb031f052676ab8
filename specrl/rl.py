"""GRPO: group-normalised advantages, PPO-clipped policy loss, optional k3 KL, and the
pure jitted ``train_step(state, batch) -> (state, metrics)``.

Logprob convention (shared with :mod:`specrl.sampling`): the logprob of token t is
``log_softmax(logits_{t-1} / T)[token_t]`` with T the rollout temperature (1 when greedy),
over the unfiltered vocabulary -- exactly what the rollout reports, so the PPO ratio is
1 at the first update when the rollout and train step see the same params.

Batch layout (B sequences, S = rollout buffer length), all by *position*:
  tokens int32 [B, S]          prompt + response (+ padding)
  response_mask f32 [B, S]     1 where position t holds a response token
  old_logprobs f32 [B, S]      behaviour logprob of token t (from the rollout)
  advantages f32 [B]           per sequence

Off-policy correction (``rl.offpolicy``; asynchronous RL, :mod:`specrl.async_rl`, trains on
rollouts of params s updates old). Per response token, with A the advantage,
pi_theta the policy being optimised, pi_behav the rollout's (``old_logprobs``), pi_prox the
params at the start of this train step (one extra no-grad forward, computed once per step),
clip(r) = clip(r, 1 - clip_eps, 1 + (clip_eps_high or clip_eps)) and C = ``rl.is_cap``:

  'none'       loss_t = -min(r A, clip(r) A),            r = pi_theta / pi_behav
               (plain PPO against the behaviour policy: today's synchronous loss)
  'tis'        loss_t = -min(w, C) * min(r A, clip(r) A),  r = pi_theta / pi_prox,
               w = pi_prox / pi_behav (stop-gradient): truncated importance sampling as in
               verl (the PPO ratio against the recomputed "old" logprobs, the sample
               reweighted by the truncated behaviour ratio)
  'decoupled'  loss_t = -1[w <= C] * w * min(r A, clip(r) A),  r, w as for 'tis': the
               decoupled PPO objective (Hilton et al. 2021) as AReaL implements it; a token
               whose behaviour weight exceeds C gets weight 0 but stays in the denominator
               (AReaL's ``behav_imp_weight_cap``). With pi_behav == pi_prox (w = 1) both
               reduce to PPO against pi_prox.

Logged with 'tis' / 'decoupled': ``is_weight_mean`` and ``is_weight_max`` (w over response
tokens), ``is_capped_frac`` (tokens with w > C) and ``behav_kl`` (k3 estimate of
KL(pi_behav || pi_prox) = E[w - 1 - log w]).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from specrl import attention as attention_lib
from specrl import faults
from specrl import model as model_lib
from specrl import sharding as shd

OFFPOLICY = ('none', 'tis', 'decoupled')


@dataclasses.dataclass(frozen=True)
class RLConfig:
  num_generations: int = 8  # G
  clip_eps: float = 0.2
  clip_eps_high: float = 0.0  # 0 = symmetric; > 0 gives DAPO-style clip-higher
  kl_coef: float = 0.0  # k3 KL to the frozen reference; 0 = no reference kept
  aggregation: str = 'sequence'  # 'token' | 'sequence'
  scale_advantages: bool = True  # divide by the group std (Dr.GRPO sets False)
  temperature: float = 1.0  # must equal the rollout temperature (1 for greedy)
  num_minibatches: int = 1
  num_epochs: int = 1
  offpolicy: str = 'none'  # 'none' | 'tis' | 'decoupled' (see the module docstring)
  is_cap: float = 2.0  # C: truncation ('tis') / drop threshold ('decoupled') of pi_prox/pi_behav
  # Rows per forward/backward inside one minibatch update (gradient accumulation in the
  # jitted step; the update equals the whole minibatch's). 0 = the whole minibatch at once.
  micro_batch: int = 0
  # Cut the train batch to the longest sequence in it (rounded up to a power of two, so at
  # most log2(seq_len) shapes compile) instead of the rollout buffer (:func:`trim_batch`).
  trim_length: bool = True
  # The loss forward's attention (model.run_layers): 'full' (the [B, S, S] reference),
  # 'blocked' (flash-style jnp, memory linear in S, any backend) or 'xla'
  # (jax.nn.dot_product_attention: cuDNN's fused kernel on GPU); block size of 'blocked'.
  attention_impl: str = 'full'
  attention_block: int = 512
  # Each layer of the loss forward under jax.checkpoint (recomputed in the backward pass).
  remat: bool = False

  def __post_init__(self):
    if self.num_generations < 2:
      raise ValueError(
        f'rl.num_generations must be >= 2 for group advantages, got {self.num_generations}'
      )
    if self.aggregation not in ('token', 'sequence'):
      raise ValueError(f"rl.aggregation must be 'token' or 'sequence', got {self.aggregation!r}")
    if not 0 < self.clip_eps < 1:
      raise ValueError(f'rl.clip_eps must be in (0, 1), got {self.clip_eps}')
    if self.kl_coef < 0:
      raise ValueError(f'rl.kl_coef must be >= 0, got {self.kl_coef}')
    if self.temperature <= 0:
      raise ValueError(f'rl.temperature must be > 0, got {self.temperature}')
    if self.num_minibatches < 1 or self.num_epochs < 1:
      raise ValueError('rl.num_minibatches and rl.num_epochs must be >= 1')
    if self.offpolicy not in OFFPOLICY:
      raise ValueError(f'rl.offpolicy must be one of {OFFPOLICY}, got {self.offpolicy!r}')
    if self.micro_batch < 0:
      raise ValueError(f'rl.micro_batch must be >= 0 (0 = whole minibatch), got {self.micro_batch}')
    if self.attention_impl not in attention_lib.ATTENTION_IMPLS:
      impls = attention_lib.ATTENTION_IMPLS
      raise ValueError(f'rl.attention_impl must be one of {impls}, got {self.attention_impl!r}')
    if self.attention_block < 1:
      raise ValueError(f'rl.attention_block must be >= 1, got {self.attention_block}')
    if not self.is_cap >= 1:
      raise ValueError(f'rl.is_cap must be >= 1 (it caps pi_prox / pi_behav), got {self.is_cap}')


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  ref_params: Any  # None unless rl.kl_coef > 0
  rng: jax.Array  # key: per-step randomness is fold_in(rng, step)
  # A trainable drafter's own state (the eagle head's params + optimizer state,
  # specrl.drafters.eagle_train.HeadState), so the orbax checkpoint holds it; None without.
  drafter: Any = None


def make_optimizer(lr_schedule, weight_decay: float, grad_clip: float, b2: float = 0.95):
  return optax.chain(
    optax.clip_by_global_norm(grad_clip),
    optax.adamw(lr_schedule, b1=0.9, b2=b2, weight_decay=weight_decay),
  )


def init_train_state(params, optimizer, rng, keep_reference: bool) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    ref_params=jax.tree.map(jnp.copy, params) if keep_reference else None,
    rng=rng,
  )


# ----------------------------------------------------------------------------- pieces


def grpo_advantages(
  rewards: jax.Array, group_size: int, scale: bool = True, eps: float = 1e-6
) -> jax.Array:
  """(r - mean_group) / (std_group + eps); rewards [N * G] grouped contiguously."""
  r = rewards.reshape(-1, group_size).astype(jnp.float32)
  adv = r - r.mean(axis=1, keepdims=True)
  if scale:
    adv = adv / (r.std(axis=1, keepdims=True) + eps)
  return adv.reshape(-1)


# Training's logprobs apply the LM head to chunks of the sequence, recomputed in the backward
# pass, so [B, S, V] logits (and their log-softmax and gradient) never exist at once: at
# SmolLM2's V = 49152, B = 16, S = 256 one f32 copy is 0.8 GB and the naive loss holds several.
LOGPROB_CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk (128 MB in f32)


def logprob_chunk(batch: int, seq: int, vocab: int) -> int:
  """Positions per chunk of :func:`sequence_logprobs`: ``batch * chunk * vocab`` at most
  :data:`LOGPROB_CHUNK_ELEMENTS` (at least 1 position, at most ``seq``)."""
  return max(1, min(seq, LOGPROB_CHUNK_ELEMENTS // max(batch * vocab, 1)))


def forward_options(rl: RLConfig) -> dict:
  """The loss forward's :func:`specrl.model.forward` options from ``rl``."""
  return {
    'attention_impl': rl.attention_impl,
    'attention_block': rl.attention_block,
    'remat': rl.remat,
  }


def trunk_hidden(params, cfg: model_lib.ModelConfig, tokens: jax.Array, mesh=None, **forward_opts):
  """The policy's final-norm hidden states at positions ``0..S-2`` of ``tokens`` [B, S]:
  [B, S-1, D], no LM head (the trunk of :func:`sequence_logprobs`; the eagle warm-up's
  features). ``forward_opts``: attention / remat (:func:`forward_options`)."""
  b, s = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(s - 1, dtype=jnp.int32), (b, s - 1))
  _, _, hidden = model_lib.forward(
    params, cfg, tokens[:, :-1], positions, mesh=mesh, rules=shd.TRAIN_RULES, head=False,
    **forward_opts,
  )  # fmt: skip
  return hidden


def sequence_logprobs(
  params,
  cfg: model_lib.ModelConfig,
  tokens: jax.Array,
  temperature: float,
  mesh=None,
  return_hidden: bool = False,
  **forward_opts,
):
  """Logprob of every token given its prefix. tokens [B, S] -> f32 [B, S] (0 at t = 0).

  The trunk runs once; the LM head + log-softmax run over chunks of positions
  (:func:`logprob_chunk`) under ``jax.checkpoint``, so peak memory holds one chunk's
  [B, C, V] logits, forward and backward. ``return_hidden``: also the trunk's final-norm
  hidden states at positions 0..S-2, [B, S-1, D] (what a drafter head trains on).
  ``forward_opts``: the trunk's attention / remat (:func:`forward_options`)."""
  b, s = tokens.shape
  hidden = trunk_hidden(params, cfg, tokens, mesh, **forward_opts)
  c = logprob_chunk(b, s - 1, cfg.vocab_size)
  n = -(-(s - 1) // c)
  pad = n * c - (s - 1)
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, -1).swapaxes(0, 1)
  tgt = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_logprobs(h_c, t_c):  # [B, C, D], [B, C] -> [B, C]
    logits = model_lib.lm_head(params, cfg, h_c, mesh=mesh, rules=shd.TRAIN_RULES)
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    return jnp.take_along_axis(logp, t_c[..., None], axis=-1)[..., 0]

  lp = jax.lax.map(lambda ht: chunk_logprobs(*ht), (h, tgt))  # [n, B, C]
  lp = lp.swapaxes(0, 1).reshape(b, n * c)[:, : s - 1]
  lp = jnp.pad(lp, ((0, 0), (1, 0)))
  return (lp, hidden) if return_hidden else lp


def loss_denominators(mask: jax.Array) -> dict:
  """The denominators of :func:`_aggregate` over a whole (mini)batch ``mask`` [B, S]:
  'token': its response-token count, 'sequence': its rows with a response token (both
  at least 1). Micro-batches pass these in so their partial losses sum to the batch's."""
  has = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
  return {'token': jnp.maximum(jnp.sum(mask), 1.0), 'sequence': jnp.maximum(jnp.sum(has), 1.0)}


def _aggregate(x: jax.Array, mask: jax.Array, how: str, denoms: dict | None = None) -> jax.Array:
  """Token- or sequence-mean of ``x`` over ``mask``. ``denoms`` (:func:`loss_denominators`
  of the whole batch): divide by those instead of this array's own, so a micro-batch's
  value is its share of the whole batch's mean (the shares sum to it)."""
  d = loss_denominators(mask) if denoms is None else denoms
  if how == 'token':
    return jnp.sum(x * mask) / d['token']
  per_seq = jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  has = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
  return jnp.sum(per_seq * has) / d['sequence']


def grpo_loss_from_logprobs(
  logprobs,
  old_logprobs,
  ref_logprobs,
  advantages,
  mask,
  rl: RLConfig,
  prox_logprobs=None,
  denoms: dict | None = None,
):
  """PPO-clipped GRPO loss from per-token logprobs (all [B, S]); returns (loss, metrics).

  ``old_logprobs``: the behaviour policy's; ``prox_logprobs``: the proximal policy's (the
  params at the start of the step), required by ``rl.offpolicy`` 'tis' and 'decoupled'
  (formulas in the module docstring). ``denoms``: the whole batch's
  :func:`loss_denominators` when these rows are one micro-batch of it: then the loss and
  every metric but ``is_weight_max`` (a max) are this micro-batch's additive share."""
  agg = functools.partial(_aggregate, denoms=denoms)
  adv = advantages[:, None]
  hi = rl.clip_eps_high or rl.clip_eps
  metrics = {}
  if rl.offpolicy == 'none':
    ratio = jnp.exp(logprobs - old_logprobs)
    weight = None
  else:
    if prox_logprobs is None:
      raise ValueError(f'rl.offpolicy={rl.offpolicy!r} needs the proximal logprobs')
    prox = jax.lax.stop_gradient(prox_logprobs)
    ratio = jnp.exp(logprobs - prox)
    log_w = (prox - old_logprobs) * mask  # 0 off the response: w = 1 there
    w = jnp.exp(log_w)
    capped = (w > rl.is_cap).astype(jnp.float32)
    weight = jnp.minimum(w, rl.is_cap) if rl.offpolicy == 'tis' else w * (1.0 - capped)
    metrics.update(
      {
        'is_weight_mean': agg(w, mask, 'token'),
        'is_weight_max': jnp.max(jnp.where(mask > 0, w, 0.0)),
        'is_capped_frac': agg(capped, mask, 'token'),
        'behav_kl': agg(w - 1.0 - log_w, mask, 'token'),
      }
    )
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - rl.clip_eps, 1.0 + hi) * adv
  pg = -jnp.minimum(unclipped, clipped)
  if weight is not None:
    pg = weight * pg
  loss = agg(pg, mask, rl.aggregation)
  metrics.update(
    {
      'pg_loss': loss,
      'clip_frac': agg((unclipped != clipped).astype(jnp.float32), mask, 'token'),
      'ratio_mean': agg(ratio, mask, 'token'),
    }
  )
  if ref_logprobs is not None and rl.kl_coef > 0:
    d = ref_logprobs - logprobs
    kl = jnp.exp(d) - d - 1.0  # k3 estimator, >= 0
    kl_mean = agg(kl, mask, rl.aggregation)
    loss = loss + rl.kl_coef * kl_mean
    metrics['kl'] = kl_mean
  metrics['loss'] = loss
  return loss, metrics


def grpo_loss(
  params,
  batch: dict,
  ref_params,
  cfg,
  rl: RLConfig,
  mesh=None,
  return_hidden: bool = False,
  denoms: dict | None = None,
):
  """(loss, metrics). ``batch`` as in the module docstring, plus ``prox_logprobs`` [B, S]
  when ``rl.offpolicy`` != 'none' (:func:`train_step` adds them). ``return_hidden``:
  (loss, (metrics, hidden)) with the policy's final-norm hidden states [B, S-1, D] of this
  forward, stop-gradient (for a drafter head). ``denoms``: as in
  :func:`grpo_loss_from_logprobs` (``batch`` a micro-batch)."""
  opts = forward_options(rl)
  lp, hidden = sequence_logprobs(params, cfg, batch['tokens'], rl.temperature, mesh, True, **opts)
  ref_lp = None
  if ref_params is not None and rl.kl_coef > 0:
    ref_lp = jax.lax.stop_gradient(
      sequence_logprobs(ref_params, cfg, batch['tokens'], rl.temperature, mesh, **opts)
    )
  loss, metrics = grpo_loss_from_logprobs(
    lp,
    batch['old_logprobs'],
    ref_lp,
    batch['advantages'],
    batch['response_mask'],
    rl,
    prox_logprobs=batch.get('prox_logprobs'),
    denoms=denoms,
  )
  return (loss, (metrics, jax.lax.stop_gradient(hidden))) if return_hidden else (loss, metrics)


def micro_batches(rows: int, rl: RLConfig) -> int:
  """Micro-batches per minibatch update: ``rows`` (a minibatch's) / ``rl.micro_batch``
  (1 when 0 or >= rows); refused unless it divides."""
  m = rl.micro_batch
  if m == 0 or m >= rows:
    return 1
  if rows % m:
    raise ValueError(
      f'a minibatch of {rows} sequences is not divisible by rl.micro_batch={m}: set '
      'rl.micro_batch to a divisor of num_prompts * num_generations / num_minibatches'
    )
  return rows // m


def proximal_logprobs(params, tokens, cfg, rl: RLConfig, mesh=None):
  """Logprobs [B, S] of ``tokens`` under ``params`` (no gradient), computed in chunks of
  one micro-batch (``rl.num_minibatches`` x :func:`micro_batches` chunks) so no forward
  exceeds a loss forward's rows."""
  if tokens.shape[0] % rl.num_minibatches:
    raise ValueError(
      f'batch of {tokens.shape[0]} sequences is not divisible by '
      f'rl.num_minibatches={rl.num_minibatches}'
    )
  n = rl.num_minibatches * micro_batches(tokens.shape[0] // rl.num_minibatches, rl)
  chunks = tokens.reshape((n, tokens.shape[0] // n) + tokens.shape[1:])
  opts = forward_options(rl)
  lp = jax.lax.map(
    lambda t: sequence_logprobs(params, cfg, t, rl.temperature, mesh, **opts), chunks
  )
  return jax.lax.stop_gradient(lp.reshape(tokens.shape))


def trimmed_length(mask, seq_len: int) -> int:
  """The train length of a batch whose response ``mask`` is [B, seq_len]: one past the
  last response position of any row, rounded up to a power of two (at least 2), at most
  ``seq_len``. Positions from there on hold no response token of any row and, under the
  causal mask, change no logprob before them: cutting them leaves the loss unchanged."""
  cols = np.flatnonzero(np.asarray(mask).any(axis=0))
  last = int(cols[-1]) + 1 if cols.size else 0
  return min(seq_len, 1 << max(1, last - 1).bit_length())


def trim_batch(batch: dict) -> dict:
  """``batch`` (host arrays, the module docstring's layout) with every [B, S] array cut to
  :func:`trimmed_length` positions. Host side, before the jitted step: the step compiles
  once per bucket (a power of two), and the forward, its activations and the attention
  scale with the batch's longest answer, not with the rollout budget."""
  s = batch['tokens'].shape[1]
  n = trimmed_length(batch['response_mask'], s)
  if n == s:
    return batch
  return {k: v[:, :n] if np.ndim(v) == 2 and v.shape[1] == s else v for k, v in batch.items()}


def _minibatches(batch: dict, n: int, rng) -> dict:
  """[B, ...] -> [n, B/n, ...] after a shuffle."""
  b = batch['tokens'].shape[0]
  if b % n:
    raise ValueError(f'batch of {b} sequences is not divisible by rl.num_minibatches={n}')
  perm = jax.random.permutation(rng, b)
  return jax.tree.map(lambda x: x[perm].reshape((n, b // n) + x.shape[1:]), batch)


def guarded_update(optimizer, loss, grads, params, opt_state, guard: bool = True):
  """One optimizer update that is skipped when anything in it is non-finite.

  A non-finite loss, gradient norm or updated params leaves ``params`` and ``opt_state``
  exactly as they were (a ``lax.cond`` between the new and the old buffers: measured
  cheaper than an elementwise select when the optimizer dominates the step, see
  ``bench/nonfinite_guard.py``), so a NaN never reaches them. Returns (params,
  opt_state, grad_norm f32 [], skipped f32 [] in {0, 1}). ``guard=False`` (benchmarks
  only: ``bench/nonfinite_guard.py``) applies every update unchecked.
  """
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if not guard:
    return new_params, new_opt_state, grad_norm, jnp.float32(0.0)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & faults.all_finite(new_params)
  params, opt_state = jax.lax.cond(
    ok, lambda: (new_params, new_opt_state), lambda: (params, opt_state)
  )
  return params, opt_state, grad_norm, 1.0 - ok.astype(jnp.float32)


def train_step(
  state: TrainState,
  batch: dict,
  *,
  cfg,
  rl: RLConfig,
  optimizer,
  mesh=None,
  guard: bool = True,
  return_hidden: bool = False,
):
  """``num_epochs`` x ``num_minibatches`` PPO updates on one rollout batch. Pure.

  Each minibatch update goes through :func:`guarded_update`; ``skipped_updates`` in the
  metrics counts the skipped ones (the other metrics are means over all updates).
  ``return_hidden``: returns (state, metrics, hidden) with the final-norm hidden states
  [B, S-1, D] (batch order, stop-gradient) of the first epoch's loss forwards -- at
  ``state.params`` when ``num_minibatches`` = 1, else minibatch i's after i updates -- so a
  drafter head trains on them without another policy forward; the update is unchanged.
  """

  def loss_and_grads(params, mb, keep_hidden):
    """(loss, aux), grads of one minibatch: at once, or as :func:`micro_batches` micro-batches
    whose gradients are summed (each micro-batch's loss uses the minibatch's denominators,
    so the sum is the minibatch's loss, gradient and metrics; ``is_weight_max`` a max)."""
    rows = mb['tokens'].shape[0]
    n_micro = micro_batches(rows, rl)
    vg = jax.value_and_grad(grpo_loss, has_aux=True)
    if n_micro == 1:
      return vg(params, mb, state.ref_params, cfg, rl, mesh, keep_hidden)
    denoms = loss_denominators(mb['response_mask'])
    micro = jax.tree.map(lambda x: x.reshape((n_micro, rows // n_micro) + x.shape[1:]), mb)

    def acc(g_sum, u):
      (loss, aux), g = vg(params, u, state.ref_params, cfg, rl, mesh, keep_hidden, denoms)
      g_sum = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_sum, g)
      return g_sum, (loss, aux)

    g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    g_sum, (losses, aux) = jax.lax.scan(acc, g0, micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), g_sum, params)
    metrics, hidden = aux if keep_hidden else (aux, None)
    metrics = {k: jnp.max(v) if k.endswith('_max') else jnp.sum(v) for k, v in metrics.items()}
    if keep_hidden:  # [n_micro, rows/n_micro, S-1, D] -> [rows, S-1, D]
      hidden = hidden.reshape((rows,) + hidden.shape[2:])
    aux = (metrics, hidden) if keep_hidden else metrics
    return (jnp.sum(losses), aux), grads

  def update(carry, mb, keep_hidden=False):
    params, opt_state = carry
    (loss, aux), grads = loss_and_grads(params, mb, keep_hidden)
    metrics, hidden = aux if keep_hidden else (aux, None)
    params, opt_state, metrics['grad_norm'], metrics[faults.SKIP_KEY] = guarded_update(
      optimizer, loss, grads, params, opt_state, guard
    )
    return (params, opt_state), (metrics, hidden)

  if rl.offpolicy != 'none':  # pi_prox: the params at the start of this step
    prox = proximal_logprobs(state.params, batch['tokens'], cfg, rl, mesh)
    batch = {**batch, 'prox_logprobs': prox}
  carry = (state.params, state.opt_state)
  all_metrics, hidden = [], None
  for epoch in range(rl.num_epochs):
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), epoch)
    mbs = _minibatches(batch, rl.num_minibatches, key)
    keep = return_hidden and epoch == 0
    carry, (metrics, h) = jax.lax.scan(functools.partial(update, keep_hidden=keep), carry, mbs)
    all_metrics.append(metrics)
    if keep:  # [n, B/n, S-1, D] in shuffled order -> [B, S-1, D] in batch order
      perm = jax.random.permutation(key, batch['tokens'].shape[0])  # as _minibatches
      hidden = h.reshape((-1,) + h.shape[2:])[jnp.argsort(perm)]
  skipped = sum(jnp.sum(m.pop(faults.SKIP_KEY)) for m in all_metrics)
  metrics = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *all_metrics)
  metrics[faults.SKIP_KEY] = skipped
  params, opt_state = carry
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return (new_state, metrics, hidden) if return_hidden else (new_state, metrics)


def sft_loss(params, tokens, loss_mask, cfg, mesh=None):
  """Mean next-token cross-entropy over masked positions (mask aligned to targets)."""
  lp = sequence_logprobs(params, cfg, tokens, 1.0, mesh)
  return -jnp.sum(lp * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0)


def sft_step(state: TrainState, tokens, loss_mask, *, cfg, optimizer, mesh=None):
  """Supervised warm-up step on worked solutions (a guarded update). Pure."""
  loss, grads = jax.value_and_grad(sft_loss)(state.params, tokens, loss_mask, cfg, mesh)
  params, opt_state, grad_norm, skipped = guarded_update(
    optimizer, loss, grads, state.params, state.opt_state
  )
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {
    'sft_loss': loss,
    'grad_norm': grad_norm,
    faults.SKIP_KEY: skipped,
  }

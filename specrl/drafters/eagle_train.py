"""Training the eagle head (:mod:`specrl.drafters.eagle`) on the policy's hidden states.

Loss (TLT / EAGLE), on response tokens, with a stop-gradient on everything of the policy:

  ``hidden_weight * SmoothL1(ĥ_{t+1}, h_{t+1}) + ce_weight * CE(p_{t+1}, q_{t+1})``

where the head at position ``t`` reads ``(h_t, x_{t+1})`` teacher-forced (true features),
``p_{t+1} = softmax(LM head(h_{t+1}))`` is the policy's next-token distribution (T = 1) and
``q_{t+1}`` the head's (over ``vocab_ids`` when the vocabulary is reduced). A position
counts when the token those distributions predict, ``x_{t+2}``, is a response token.

- :func:`head_update`: one pure optimizer step of the head (jit it with the static args).
- :func:`cotrain_step`: the GRPO step and a head update in *one* jitted function; the head
  reads the final-norm hidden states the GRPO loss's own forward computed (at the
  pre-update params, what the rollout used; no second policy forward) under a
  stop-gradient, so the policy's update is the plain step's computation (the same bits
  wherever XLA fuses the two programs' shared part alike; a few ulps apart otherwise).
- :func:`warmup`: head updates on the policy's own generations before RL, under a budget;
  the policy's hidden states and top-k next-token distributions (:func:`policy_targets`)
  are computed once per batch, and the head's logits only over its own vocabulary.
- :class:`HeadTrainer`: the head in a run: warm-up, reduced vocabulary from recent
  rollouts; :func:`wrap_grpo` fuses ``cotrain`` into the GRPO step, or (``spot``,
  :mod:`specrl.drafters.eagle_spot`) makes it fill the buffer the rollout's long tail
  trains on. The head's params and optimizer state (and ``spot``'s buffer) live in
  ``TrainState.drafter`` (so in the orbax checkpoint, shape-checked on restore); only
  small host things (token counts, vocabulary, warmed flag) are host state.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from specrl import multihost as mh
from specrl import rl as rl_lib
from specrl import sharding as shd
from specrl.drafters import eagle, eagle_spot

SPOT_KEY = 7  # fold_in constant of the drafter stream: spot's minibatch key


@flax.struct.dataclass
class HeadState:
  step: jax.Array  # int32 [] head updates so far
  params: Any  # eagle.init_head pytree
  opt_state: Any
  buffer: Any = None  # eagle_spot.SpotBuffer in mode 'spot' (no leaves otherwise)


def make_optimizer(ecfg: eagle.EagleConfig):
  """AdamW with a linear lr warm-up over the first ``ecfg.lr_warmup`` head updates. Why the
  warm-up: Adam's first steps move every entry of ``fc`` by ~lr at once; at lr 2e-3 that
  is a perturbation of the identity it starts from as large as the identity (D = 576), and
  on SmolLM2 the soft CE jumped from 12 to 27 nats before recovering."""
  lr = ecfg.lr
  if ecfg.lr_warmup:
    lr = optax.linear_schedule(ecfg.lr / ecfg.lr_warmup, ecfg.lr, ecfg.lr_warmup)
  return optax.chain(
    optax.clip_by_global_norm(ecfg.grad_clip),
    optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=ecfg.weight_decay),
  )


def init_head_state(head_params, optimizer) -> HeadState:
  return HeadState(jnp.zeros((), jnp.int32), head_params, optimizer.init(head_params))


def policy_hidden(policy_params, cfg, tokens, mesh=None, **forward_opts):
  """The policy's final-norm hidden states at positions ``0..S-2`` of ``tokens`` [B, S]
  (:func:`specrl.rl.trunk_hidden`, the forward the GRPO loss runs), stop-gradient:
  [B, S-1, D]. Only the warm-up needs it: ``cotrain`` reuses the GRPO loss's forward."""
  return jax.lax.stop_gradient(
    rl_lib.trunk_hidden(policy_params, cfg, tokens, mesh, **forward_opts)
  )


def policy_targets(policy_params, cfg, hidden, k: int):
  """The policy's next-token distribution (T = 1) at every position of ``hidden`` [B, S-1, D]
  as its top ``k``: (probs f32 [B, S-1, k], ids int32 [B, S-1, k]), one row at a time (no
  [B, S, V] array). Why: the warm-up reuses a batch for several updates; the full-vocabulary
  softmax of the target is then paid once per batch, not once per update (at V = 49152 it
  costs as much as the head's own logits). The mass outside the top k (a few % at k = 64 on
  SmolLM2's arith answers) is left out of the CE."""
  pp = {n: v for n, v in policy_params.items() if n != 'layers'}

  def row(h):
    p = jax.nn.softmax(eagle.head_logits(eagle.draft_params(pp, None), cfg, h), axis=-1)
    return jax.lax.top_k(p, min(k, cfg.vocab_size))

  probs, ids = jax.lax.map(row, jax.lax.stop_gradient(hidden))
  return jax.lax.stop_gradient(probs), ids.astype(jnp.int32)


def loss_options(rl: rl_lib.RLConfig) -> dict:
  """:func:`head_loss`'s memory options from the GRPO config: the loss forward's attention /
  remat (``specrl.rl.forward_options``) and ``rl.micro_batch`` rows per group, so the
  head's update stays within the policy step's memory bound."""
  return {**rl_lib.forward_options(rl), 'micro_batch': rl.micro_batch}


def head_loss(
  head_params,
  policy_params,
  vocab_ids,
  tokens,
  hidden,
  response_mask,
  targets=None,
  *,
  cfg,
  hcfg,
  ecfg,
  mesh=None,
  chunk: int | None = None,
  micro_batch: int = 0,
  **forward_opts,
):
  """Loss of the head on one batch. tokens [B, S]; hidden [B, S-1, D] (positions 0..S-2);
  response_mask [B, S] (1 where position t holds a response token); ``targets``: None (the
  policy's distribution from ``hidden``, full vocabulary) or :func:`policy_targets`'s
  top-k (probs, ids) [B, S-1, k]. The head's logits are computed over its own vocabulary
  only (``vocab_ids``; no [B, S, V] array when reduced). Returns (loss, metrics);
  ``head/accept_t1`` = mean ``sum_v min(p, q)``, draft 1's acceptance at T = 1 teacher-forced
  (a lower bound with top-k targets); ``head/vocab_mass`` = mean policy mass inside the
  head's vocabulary (of the top k with ``targets``), the ceiling of that acceptance.

  Memory stays linear in S (issue 27): the head's layers take the loss forward's
  ``forward_opts`` (``specrl.rl.forward_options``: blocked attention, remat), and the
  logits / softmax / CE run over chunks of ``chunk`` positions under ``jax.checkpoint``
  (default :func:`specrl.rl.logprob_chunk` of the widest vocabulary involved), so one
  chunk's [B, C, V] exists at a time, forward and backward, as in the policy's loss; with
  ``micro_batch`` (``rl.micro_batch``) rows go through in groups of that many (its gcd with
  B), each recomputed in the backward, so attention tiles hold one group's rows."""
  pp = jax.lax.stop_gradient({k: v for k, v in policy_params.items() if k != 'layers'})
  h = jax.lax.stop_gradient(hidden)
  s1 = h.shape[1]  # S - 1
  t2 = s1 - 1  # positions of the loss: ĥ_{t+1} for t = 0..S-3
  dp = eagle.draft_params(pp, head_params, vocab_ids)
  dp_full = eagle.draft_params(pp, None)
  b = tokens.shape[0]
  mask = response_mask[:, 2 : s1 + 1].astype(jnp.float32)
  inv = None
  if targets is not None and vocab_ids is not None:
    inv = (
      jnp.full((cfg.vocab_size,), -1, jnp.int32)
      .at[vocab_ids]
      .set(jnp.arange(vocab_ids.shape[0], dtype=jnp.int32))
    )
  if targets is not None:
    targets = tuple(jax.lax.stop_gradient(t[:, 1:]) for t in targets)
  rows = b if not micro_batch else math.gcd(b, micro_batch)
  width = cfg.vocab_size if targets is None else max(targets[0].shape[-1], 1)
  if vocab_ids is not None:
    width = max(width, vocab_ids.shape[0])
  c = rl_lib.logprob_chunk(rows, t2, width) if chunk is None else max(1, min(chunk, t2))
  n = -(-t2 // c)

  @jax.checkpoint
  def per_position(pred_c, target_c, targets_c):
    """[r, C, D] x2 (+ top-k [r, C, k] x2) -> per-position l1, ce, accept, agree, mass."""
    l1 = jnp.mean(optax.huber_loss(pred_c.astype(jnp.float32), target_c.astype(jnp.float32)), -1)
    q_small, ids = eagle.head_logits_compact(dp, cfg, pred_c)  # [r, C, N or V]
    logq = jax.nn.log_softmax(q_small, axis=-1)
    q_top = jnp.argmax(q_small, -1) if ids is None else ids[jnp.argmax(q_small, -1)]
    if targets_c is None:  # p over the head's columns (its vocabulary), from the full softmax
      p_full = jax.nn.softmax(eagle.head_logits(dp_full, cfg, target_c), -1)
      p = p_full if ids is None else jnp.take(p_full, ids, axis=-1)
      lq, p_top = logq, jnp.argmax(p_full, -1)
    else:  # p's top k; tokens outside the head's vocabulary count as q = 0 (left out)
      p, tid = targets_c
      if inv is None:
        col, valid = tid, jnp.ones(tid.shape, bool)
      else:
        col = inv[tid]
        valid = col >= 0
      lq = jnp.where(valid, jnp.take_along_axis(logq, jnp.maximum(col, 0), axis=-1), 0.0)
      p, p_top = jnp.where(valid, p, 0.0), tid[..., 0]
    ce = -jnp.sum(p * lq, axis=-1)
    accept = jnp.sum(jnp.minimum(p, jnp.exp(lq)), axis=-1)  # draft 1's acceptance at T = 1
    agree = (q_top == p_top).astype(jnp.float32)
    return jnp.stack([l1, ce, accept, agree, jnp.sum(p, axis=-1)])  # [5, r, C]

  @jax.checkpoint
  def row_group(h_g, tok_g, targets_g):  # [r, S-1, D], [r, S], top-k -> [5, r, T2]
    r = h_g.shape[0]
    positions = jnp.broadcast_to(jnp.arange(t2, dtype=jnp.int32), (r, t2))
    pred = eagle.predict_features(
      dp, cfg, hcfg, h_g[:, :-1], tok_g[:, 1:s1], positions, mesh=mesh,
      rules=shd.TRAIN_RULES, **forward_opts,
    )  # fmt: skip

    def chunked(x):  # [r, T2, ...] -> [n, r, C, ...] (zero-padded; padding is masked out)
      x = jnp.pad(x, ((0, 0), (0, n * c - t2)) + ((0, 0),) * (x.ndim - 2))
      return x.reshape(r, n, c, *x.shape[2:]).swapaxes(0, 1)

    tg = None if targets_g is None else tuple(map(chunked, targets_g))
    terms = jax.lax.map(lambda a: per_position(*a), (chunked(pred), chunked(h_g[:, 1:]), tg))
    return terms.transpose(1, 2, 0, 3).reshape(5, r, n * c)[:, :, :t2]

  def grouped(x):  # [B, ...] -> [B / rows, rows, ...]
    return x.reshape(b // rows, rows, *x.shape[1:])

  tg = None if targets is None else tuple(map(grouped, targets))
  terms = jax.lax.map(lambda a: row_group(*a), (grouped(h), grouped(tokens), tg))
  l1, ce, accept, agree, mass = terms.transpose(1, 0, 2, 3).reshape(5, b, t2)
  n_tok = jnp.maximum(jnp.sum(mask), 1.0)
  l1_mean, ce_mean = jnp.sum(l1 * mask) / n_tok, jnp.sum(ce * mask) / n_tok
  loss = ecfg.hidden_weight * l1_mean + ecfg.ce_weight * ce_mean
  return loss, {
    'head/loss': loss,
    'head/smooth_l1': l1_mean,
    'head/ce': ce_mean,
    'head/top1_agree': jnp.sum(agree * mask) / n_tok,
    'head/accept_t1': jnp.sum(accept * mask) / n_tok,
    'head/vocab_mass': jnp.sum(mass * mask) / n_tok,
  }


def head_update(
  hstate: HeadState,
  policy_params,
  vocab_ids,
  tokens,
  hidden,
  response_mask,
  targets=None,
  *,
  cfg,
  hcfg,
  ecfg,
  optimizer,
  mesh=None,
  **loss_opts,
):
  """One optimizer step of the head (``targets``, ``loss_opts``: see :func:`head_loss`).
  Pure: returns (HeadState, metrics)."""
  loss_fn = functools.partial(head_loss, cfg=cfg, hcfg=hcfg, ecfg=ecfg, mesh=mesh, **loss_opts)
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    hstate.params, policy_params, vocab_ids, tokens, hidden, response_mask, targets
  )
  updates, opt_state = optimizer.update(grads, hstate.opt_state, hstate.params)
  params = optax.apply_updates(hstate.params, updates)
  metrics['head/grad_norm'] = optax.tree.norm(grads)
  return HeadState(hstate.step + 1, params, opt_state), metrics


def cotrain_step(
  state,
  batch: dict,
  vocab_ids=None,
  *,
  step_fn,
  cfg,
  hcfg,
  ecfg,
  optimizer,
  mesh=None,
  **loss_opts,
):
  """The GRPO step with a head update fused in. ``state``: a ``specrl.rl.TrainState`` whose
  ``drafter`` is the :class:`HeadState`; ``step_fn(state, batch, return_hidden=True) ->
  (state, metrics, hidden [B, S-1, D])`` (``specrl.rl.train_step``): the head trains on
  the hidden states the GRPO loss's forward computed at ``state.params`` (the rollout's
  policy; stop-gradient, no second policy forward), so the policy's new state is exactly
  ``step_fn``'s. ``loss_opts``: :func:`head_loss`'s (the loss forward's attention / remat).
  Returns (state with the new head, metrics incl. ``head/*``)."""
  new_state, metrics, hidden = step_fn(state, batch, return_hidden=True)
  hstate, hm = head_update(
    state.drafter,
    state.params,
    vocab_ids,
    batch['tokens'],
    hidden,
    batch['response_mask'],
    cfg=cfg,
    hcfg=hcfg,
    ecfg=ecfg,
    optimizer=optimizer,
    mesh=mesh,
    **loss_opts,
  )
  return new_state.replace(drafter=hstate), {**metrics, **hm}


def token_counts(tokens, mask, vocab_size: int) -> np.ndarray:
  """Occurrences of every id [V] among ``tokens`` where ``mask`` > 0."""
  return np.bincount(np.asarray(tokens)[np.asarray(mask) > 0].ravel(), minlength=vocab_size)


def top_ids(counts, n: int) -> np.ndarray:
  """The ``n`` ids of highest ``counts`` [V] (ties: lower id), int32 [n] sorted: the reduced
  draft vocabulary (any choice is lossless; frequent ones keep acceptance)."""
  order = np.lexsort((np.arange(counts.shape[0]), -np.asarray(counts)))
  return np.sort(order[:n]).astype(np.int32)


def frequent_tokens(tokens, mask, n: int, vocab_size: int) -> np.ndarray:
  """The ``n`` most frequent token ids where ``mask`` (:func:`top_ids` of the counts)."""
  return top_ids(token_counts(tokens, mask, vocab_size), n)


def response_mask(out, seq_len: int) -> np.ndarray:
  """[B, seq_len] 1 where a rollout output's position holds a response token."""
  pos = np.arange(seq_len)[None, :]
  plen = np.asarray(out.prompt_len)[:, None]
  return ((pos >= plen) & (pos < plen + np.asarray(out.length)[:, None])).astype(np.float32)


def warmup(
  drafter: eagle.EagleDrafter,
  hstate: HeadState,
  policy_params,
  sample_batch,
  *,
  steps: int,
  budget_s: float,
  optimizer,
  mesh=None,
  log=None,
  loss_opts: dict | None = None,
):
  """Train the head before RL on the policy's own generations: ``sample_batch(i) ->
  (tokens [B, S], response_mask [B, S])`` (e.g. plain rollouts of the task's train prompts),
  ``steps`` updates or until ``budget_s`` seconds (the time spent is reported, never
  hidden; several processes: process 0's clock decides, :func:`specrl.multihost.decide`).
  The policy's hidden states and top-``ecfg.target_topk`` next-token distributions
  (:func:`policy_targets`; 0 = full softmax every update) are computed once per batch: a
  batch returned again (the same ``tokens`` object: several updates per generation) reuses
  them. ``loss_opts`` (:func:`loss_options`): the loss forward's attention / remat for the
  policy's and the head's forwards, and the head's row groups. Sets ``drafter.head_params``;
  returns (HeadState, metrics of the last update, seconds, updates done)."""
  cfg, hcfg, ecfg = drafter.model_cfg, drafter.hcfg, drafter.ecfg
  lo = dict(loss_opts or {})
  fo = {k: v for k, v in lo.items() if k != 'micro_batch'}
  hid = jax.jit(functools.partial(policy_hidden, cfg=cfg, mesh=mesh, **fo))
  top = jax.jit(functools.partial(policy_targets, cfg=cfg, k=ecfg.target_topk))
  upd = jax.jit(
    functools.partial(
      head_update, cfg=cfg, hcfg=hcfg, ecfg=ecfg, optimizer=optimizer, mesh=mesh, **lo
    )
  )
  # Several processes: ``sample_batch`` returns every row on every process (the same numpy
  # values), placed replicated on the mesh; one process: as before (jit places them).
  put = jnp.asarray
  if mh.is_multiprocess() and mesh is not None:
    put = lambda x: jax.device_put(x, shd.replicated(mesh))  # noqa: E731
  t0, m, done = time.perf_counter(), {}, 0
  last = None  # a batch returned again keeps its device arrays, hidden states and targets
  for i in range(steps):
    # wall-clock: process 0 decides, every process follows (no-op with one process)
    if mh.decide('the eagle warm-up budget', time.perf_counter() - t0 > budget_s):
      break
    tokens, mask = sample_batch(i)
    if tokens is not last:
      last, dtoks, dmask = tokens, put(tokens), put(mask)
      hidden = hid(policy_params, tokens=dtoks)
      targets = top(policy_params, hidden=hidden) if ecfg.target_topk else None
    hstate, m = upd(hstate, policy_params, drafter.vocab_ids, dtoks, hidden, dmask, targets)
    done += 1
    if log is not None:
      log(i, jax.device_get(m))
  drafter.head_params = hstate.params
  return hstate, jax.device_get(m), time.perf_counter() - t0, done


class HeadTrainer:
  """The head in a run (:mod:`specrl.train` hooks). ``hstate`` (:class:`HeadState`) is the
  initial one / a mirror of ``TrainState.drafter``, which owns it (checkpointed by orbax);
  :meth:`set_state` after every step points the drafter at the current head params. The
  decayed token counts that pick the reduced vocabulary and whether the warm-up ran are
  the checkpoint host state (:class:`specrl.checkpointing.HostState`): small."""

  COUNT_DECAY = 0.9  # per GRPO step: the reduced vocabulary follows recent rollouts
  name = 'eagle_head'  # its host state's item in checkpoints

  def __init__(self, drafter: eagle.EagleDrafter):
    self.drafter = drafter
    self.optimizer = make_optimizer(drafter.ecfg)
    self.hstate = init_head_state(drafter.head_params, self.optimizer)
    self.counts = np.zeros(drafter.model_cfg.vocab_size, np.float64)
    if drafter.vocab_ids is not None:  # e.g. a loaded head's: it seeds the counts, or the
      # first rollout's few hundred ids plus the lowest unseen ids would replace it at once.
      # Half a count: any token a rollout emits still ranks first (a fresh head's default
      # vocabulary, the lowest ids, fills the rest exactly as zero counts would).
      self.counts[np.asarray(drafter.vocab_ids)] = 0.5
    self.warmed = False
    self.spot: eagle_spot.SpotScheduler | None = None  # mode 'spot': attach_spot

  def attach_spot(self, exp) -> None:
    """Mode ``spot``: an empty buffer in ``hstate`` (so in the train state, before any
    restore), the scheduler, and its hook on the engine if it has one (adaptive)."""
    ecfg, cfg, c = self.drafter.ecfg, self.drafter.model_cfg, exp.config
    if exp.async_cfg.staleness:
      raise ValueError(
        f"drafter.eagle.mode='spot' needs rl.async_staleness=0 (got "
        f'{exp.async_cfg.staleness}): the pending head is handed over at the next GRPO step'
      )
    b = c.rl.num_prompts * exp.rl_cfg.num_generations
    rows = ecfg.spot_minibatch or b
    if rows > b:
      raise ValueError(f'drafter.eagle.spot_minibatch={rows} > the GRPO batch ({b} rows)')
    width = eagle_spot.buffer_len(exp.rollout_cfg.seq_len, ecfg.spot_max_len)
    buf = eagle_spot.init_buffer(ecfg.spot_buffer_steps, b, width, cfg.d_model, cfg.cdtype)
    self.hstate = self.hstate.replace(buffer=buf)
    update_fn = functools.partial(
      head_update, cfg=cfg, hcfg=self.drafter.hcfg, ecfg=ecfg, optimizer=self.optimizer,
      mesh=exp.mesh, **loss_options(exp.rl_cfg),
    )  # fmt: skip
    key = jax.random.fold_in(exp.rngs.drafter, SPOT_KEY)
    self.spot = eagle_spot.SpotScheduler(self, update_fn, key, rows)
    if hasattr(exp.engine, 'tail_hook'):
      exp.engine.tail_hook = self.spot.tail_hook

  def observe_tokens(self, tokens, mask) -> None:
    """Count response tokens; with a reduced vocabulary, re-pick its N most frequent."""
    n = self.drafter.ecfg.reduced_vocab
    if not n:
      return
    v = self.counts.shape[0]
    # every row of the global batch (all-gathered under several processes): the counts, and
    # so the reduced vocabulary, are the same on every process
    tokens, mask = mh.to_host((tokens, mask))
    self.counts = self.COUNT_DECAY * self.counts + token_counts(tokens, mask, v)
    self.drafter.vocab_ids = jnp.asarray(top_ids(self.counts, min(n, v)))

  def placed(self, mesh) -> HeadState:
    """``hstate`` on ``mesh`` for the train state: the head replicated; ``spot``'s buffer
    (N GRPO batches of activations) split over its batch axis where the mesh divides it."""
    hs = jax.device_put(self.hstate.replace(buffer=None), shd.replicated(mesh))
    if self.hstate.buffer is None:
      return hs
    axes = eagle_spot.SpotBuffer(
      hidden=(None, 'batch', None, None), tokens=(None, 'batch', None),
      mask=(None, 'batch', None), pushes=(),
    )  # fmt: skip
    buf = self.hstate.buffer
    return hs.replace(
      buffer=jax.device_put(buf, shd.tree_shardings(axes, buf, mesh, shd.TRAIN_RULES))
    )

  def set_state(self, hstate: HeadState) -> None:
    self.hstate = hstate
    self.drafter.head_params = hstate.params

  # -- the train loop's DrafterTrainer protocol (specrl.drafters.hooks)

  def init_state(self, mesh) -> HeadState:
    return self.placed(mesh)

  def wrap_grpo(self, exp, step_fn, grpo, state_sh, batch_sh):
    return wrap_grpo(exp, step_fn, grpo, state_sh, batch_sh)

  def after_step(self, state) -> None:
    self.set_state(state.drafter)  # the step donated the old head arrays

  def before_step(self, exp, state, step: int):
    """The warm-up, once, at the first GRPO step (after SFT): ``warmup_steps`` head updates
    on plain rollouts of the task's training prompts (prompts of steps past the run's
    end, so not the ones RL will draw) under ``warmup_budget_s``; logged, never hidden.
    Returns ``state`` with the warmed-up head in ``state.drafter``."""
    ecfg = self.drafter.ecfg
    self.set_state(state.drafter)
    if self.spot is not None and step >= exp.config.sft.steps:
      self.spot.arm()  # this step's GRPO rollout may update the head in its tail
    if self.warmed or step < exp.config.sft.steps or not ecfg.warmup_steps:
      return state
    params = state.params
    engine, c = exp.plain_engine(), exp.config
    total, n = c.sft.steps + c.rl.steps, c.rl.num_prompts * exp.rl_cfg.num_generations
    seq_len = exp.rollout_cfg.seq_len

    own = mh.process_rows(n)  # several processes: each rolls out its block of the rows

    def sample_batch(i):
      pr = exp.task.prompts_for_step(c.seed, total + i, n)
      out, _ = engine.generate(
        params,
        pr.tokens[own],
        pr.lengths[own],
        jax.random.fold_in(exp.rngs.drafter, i),
        group_ids=np.arange(n, dtype=np.int32)[own],  # global row ids, as with one process
      )
      out = mh.to_host(out)  # every row, on every process
      toks, mask = np.asarray(out.tokens)[:, :seq_len], response_mask(out, seq_len)
      self.observe_tokens(toks, mask)
      return toks, mask

    hs, m, secs, done = warmup(
      self.drafter,
      self.hstate.replace(buffer=None),
      params,
      sample_batch,
      steps=ecfg.warmup_steps,
      budget_s=ecfg.warmup_budget_s,
      optimizer=self.optimizer,
      mesh=exp.mesh,
      loss_opts=loss_options(exp.rl_cfg),
    )
    hs = hs.replace(buffer=self.hstate.buffer)
    hs = jax.device_put(hs, jax.tree.map(lambda x: x.sharding, state.drafter))
    self.set_state(hs)
    self.warmed = True
    logging.info(
      'eagle warm-up: %d updates in %.1fs (budget %.0fs), head loss %.4f, top-1 agreement %.3f',
      done,
      secs,
      ecfg.warmup_budget_s,
      m.get('head/loss', np.nan),
      m.get('head/top1_agree', np.nan),
    )
    return state.replace(drafter=hs)

  def host_state(self) -> dict:
    """Small host-side state only (the head's arrays are in ``TrainState.drafter``)."""
    d = {'counts': self.counts, 'warmed': self.warmed}
    if self.drafter.vocab_ids is not None:
      d['vocab_ids'] = np.asarray(self.drafter.vocab_ids)
    return d

  def load_host_state(self, d: dict) -> None:
    counts = np.asarray(d['counts'], np.float64)
    if counts.shape != self.counts.shape:
      raise ValueError(f'eagle token counts {counts.shape} != expected {self.counts.shape}')
    self.counts = counts
    self.warmed = bool(d['warmed'])
    if 'vocab_ids' in d:
      self.drafter.vocab_ids = jnp.asarray(d['vocab_ids'], jnp.int32)


class OnlineEagleDrafter(eagle.EagleDrafter):
  """The ``eagle`` drafter of a training run (the registry builds this one): an
  :class:`~specrl.drafters.eagle.EagleDrafter` that declares its trainer
  (:class:`specrl.drafters.hooks.TrainsOnline`)."""

  def make_trainer(self, exp) -> HeadTrainer:
    """The head's :class:`HeadTrainer` in the run ``exp`` (the same one every call)."""
    return trainer(self, exp)


def trainer(drafter, exp=None) -> HeadTrainer | None:
  """The drafter's :class:`HeadTrainer` (made on first use); None for other drafters.
  With ``exp`` (the run's :class:`specrl.experiment.Experiment`) in mode ``spot``: with its
  buffer and scheduler attached (:meth:`HeadTrainer.attach_spot`)."""
  if not isinstance(drafter, eagle.EagleDrafter):
    return None
  if getattr(drafter, '_trainer', None) is None:
    drafter._trainer = HeadTrainer(drafter)
  tr = drafter._trainer
  if exp is not None and drafter.ecfg.mode == 'spot' and tr.spot is None:
    tr.attach_spot(exp)
  return tr


def wrap_grpo(exp, step_fn, grpo, state_sh, batch_sh):
  """The train loop's GRPO function with the head fused in (``mode='cotrain'``): one jitted
  call does the policy's step and the head's update (in ``state.drafter``); the head's new
  params are the next rollout's. ``spot``: :func:`wrap_spot`. Any other drafter or mode:
  ``grpo`` unchanged (``frozen``: warm-up only; the loop's :meth:`HeadTrainer.set_state`
  follows the donated state)."""
  tr = trainer(exp.drafter, exp)
  if tr is not None and tr.drafter.ecfg.mode == 'spot':
    return wrap_spot(exp, tr, step_fn, state_sh, batch_sh)
  if tr is None or tr.drafter.ecfg.mode != 'cotrain':
    return grpo
  d = tr.drafter
  fused = jax.jit(
    functools.partial(
      cotrain_step,
      step_fn=step_fn,
      cfg=d.model_cfg,
      hcfg=d.hcfg,
      ecfg=d.ecfg,
      optimizer=tr.optimizer,
      mesh=exp.mesh,
      **loss_options(exp.rl_cfg),
    ),
    in_shardings=(state_sh, batch_sh, None),
    out_shardings=(state_sh, None),
    donate_argnums=(0,),
  )

  def fn(state, batch):
    state, metrics = fused(state, batch, d.vocab_ids)
    tr.set_state(state.drafter)
    tr.observe_tokens(batch['tokens'], batch['response_mask'])
    return state, metrics, None

  return fn


def wrap_spot(exp, tr: HeadTrainer, step_fn, state_sh, batch_sh):
  """The GRPO function of mode ``spot`` (:mod:`specrl.drafters.eagle_spot`): (static
  engine: the head updates of this step first, right after its rollout, on the rollout's
  params ``state.params``), the pending head (updated during / after this step's rollout)
  into ``state.drafter`` and the drafter -- the next rollout's head --, then one jitted
  call of the plain GRPO step that also pushes its loss forward's hidden states into the
  buffer. Metrics: the step's plus ``head/spot_updates``, ``time/head_spot_s`` (added to
  the step on one device), ``head/spot_buffer_bytes`` and the last update's ``head/*``."""
  fused = jax.jit(
    functools.partial(eagle_spot.spot_step, step_fn=step_fn),
    in_shardings=(state_sh, batch_sh),
    out_shardings=(state_sh, None),
    donate_argnums=(0,),
  )
  static = not hasattr(exp.engine, 'tail_hook')

  def fn(state, batch):
    if static:
      tr.spot.run(state.params)
    core, spot_metrics = tr.spot.consume()
    if core is not None:
      like = state.drafter.replace(buffer=None)
      core = jax.device_put(core, jax.tree.map(lambda x: x.sharding, like))
      state = state.replace(drafter=core.replace(buffer=state.drafter.buffer))
    state, metrics = fused(state, batch)
    tr.set_state(state.drafter)
    tr.observe_tokens(batch['tokens'], batch['response_mask'])
    return state, {**metrics, **spot_metrics}, None

  return fn

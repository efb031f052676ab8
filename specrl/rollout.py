"""Batched rollout: prefill + a ``lax.while_loop`` decode, plain or speculative.

Layout. A sequence's tokens live in a buffer ``tokens [B, S]`` indexed by position;
the prompt occupies ``0..L-1`` (right-padded prompt batch), generated tokens follow. The
state invariant, for plain and speculative decoding alike:

  ``pos[b]`` is the position of the last committed token ``tokens[b, pos[b]]``; the
  policy KV cache holds every slot ``< pos[b]``; that token is fed at the next step.

:func:`commit` appends ``count[b]`` new tokens per sequence after ``pos[b]``, cutting at
EOS, ``max_new_tokens`` and the cache end -- the one place finish rules live, so plain
decoding (1 token per step) and speculative decoding (``n + 1`` per verify pass) cannot
disagree about them.

Sharding. :class:`RolloutEngine` jits ``prefill`` and ``decode`` against a
``jax.sharding.Mesh``: params use ``sharding.PARAM_RULES`` (the same shardings as the
train step), the batch and KV cache use ``sharding.DECODE_RULES``. The state (KV caches
included) is built with ``jax.eval_shape`` + ``out_shardings`` and *donated* to the
decode step, so the cache is updated in place.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from specrl import model as model_lib
from specrl import sampling
from specrl import sharding as shd

FINISH_NONE, FINISH_EOS, FINISH_LENGTH, FINISH_CACHE = 0, 1, 2, 3
FINISH_NAMES = {
  FINISH_NONE: 'none',
  FINISH_EOS: 'eos',
  FINISH_LENGTH: 'length',
  FINISH_CACHE: 'cache',
}


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static rollout settings (hashable)."""

  max_new_tokens: int = 64
  max_prompt_len: int = 32
  cache_len: int = 0  # 0 = max_prompt_len + max_new_tokens (+ draft scratch)
  sampling: sampling.SamplingParams = sampling.SamplingParams()
  eos_id: int = 2
  pad_id: int = 0
  num_draft: int = 0  # k; 0 = plain decoding
  verify_impl: str = 'jnp'
  max_steps: int = 0  # safety cap on loop iterations; 0 = derived

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f'rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}')
    if self.max_prompt_len < 1:
      raise ValueError(f'rollout.max_prompt_len must be >= 1, got {self.max_prompt_len}')
    if self.num_draft < 0:
      raise ValueError(f'rollout.num_draft must be >= 0, got {self.num_draft}')
    if self.verify_impl not in ('jnp', 'pallas'):
      raise ValueError(f"rollout.verify_impl must be 'jnp' or 'pallas', got {self.verify_impl!r}")
    if self.cache_len and self.cache_len <= self.max_prompt_len:
      raise ValueError(
        f'rollout.cache_len ({self.cache_len}) must exceed rollout.max_prompt_len '
        f'({self.max_prompt_len}) to leave room for generation'
      )

  @property
  def seq_len(self) -> int:
    """Committed-token capacity per sequence (buffer positions that can be committed)."""
    return self.cache_len or (self.max_prompt_len + self.max_new_tokens)

  @property
  def buffer_len(self) -> int:
    """Cache/buffer slots: capacity plus scratch for the k + 1 speculative positions."""
    return self.seq_len + (self.num_draft + 1 if self.num_draft else 0)


@flax.struct.dataclass
class RolloutState:
  """Decode-loop carry. B = batch, S = buffer_len."""

  tokens: jax.Array  # int32 [B, S] prompt + committed tokens, by position
  logprobs: jax.Array  # f32 [B, S] reported logprob of the token at each position
  pos: jax.Array  # int32 [B] position of the last committed token
  prompt_len: jax.Array  # int32 [B]
  num_generated: jax.Array  # int32 [B]
  done: jax.Array  # bool [B]
  finish: jax.Array  # int32 [B] FINISH_*
  cache: dict  # policy KV cache {'k','v'}: [L, B, S, K, Dh]
  draft: Any  # drafter state pytree (None for plain decoding)
  rng: jax.Array  # key
  step: jax.Array  # int32 [] loop iterations so far
  # speculative statistics, per sequence
  num_rounds: jax.Array  # int32 [B] verify passes while active
  num_accepted: jax.Array  # int32 [B] accepted draft tokens


@flax.struct.dataclass
class RolloutOutput:
  """What a rollout returns. N = max_new_tokens.

  ``tokens`` is the full buffer (prompt + response, by position) for training;
  ``response``/``response_logprobs`` are right-padded per-sequence responses.
  """

  tokens: jax.Array  # int32 [B, S]
  logprobs: jax.Array  # f32 [B, S]
  prompt_len: jax.Array  # int32 [B]
  response: jax.Array  # int32 [B, N]
  response_logprobs: jax.Array  # f32 [B, N]
  length: jax.Array  # int32 [B]
  finish: jax.Array  # int32 [B]
  num_rounds: jax.Array  # int32 [B]
  num_accepted: jax.Array  # int32 [B]


def state_logical_axes(draft_axes=None) -> RolloutState:
  b, bs = ('batch',), ('batch', 'cache_seq')
  return RolloutState(
    tokens=bs,
    logprobs=bs,
    pos=b,
    prompt_len=b,
    num_generated=b,
    done=b,
    finish=b,
    cache=model_lib.cache_logical_axes(),
    draft=draft_axes,
    rng=(),
    step=(),
    num_rounds=b,
    num_accepted=b,
  )


# ----------------------------------------------------------------------------- commit


def commit(state: RolloutState, new_tokens, new_logprobs, count, rcfg: RolloutConfig):
  """Append up to ``count[b]`` tokens of ``new_tokens [B, M]`` after ``pos[b]``.

  Cuts at the first EOS (kept), at ``max_new_tokens`` and at the buffer capacity; done
  sequences take nothing. Returns the new state.
  """
  b, m = new_tokens.shape
  active = ~state.done
  room_new = rcfg.max_new_tokens - state.num_generated
  room_cache = rcfg.seq_len - 1 - state.pos
  take = jnp.minimum(jnp.minimum(count, room_new), room_cache)
  take = jnp.where(active, jnp.maximum(take, 0), 0)
  j = jnp.arange(m)[None, :]
  is_eos = (new_tokens == rcfg.eos_id) & (j < take[:, None])
  first_eos = jnp.argmax(is_eos, axis=1)
  has_eos = jnp.any(is_eos, axis=1)
  take = jnp.where(has_eos, first_eos + 1, take)
  valid = j < take[:, None]
  write_pos = jnp.where(valid, state.pos[:, None] + 1 + j, state.tokens.shape[1])  # OOB: dropped
  bidx = jnp.arange(b)[:, None]
  tokens = state.tokens.at[bidx, write_pos].set(new_tokens.astype(jnp.int32), mode='drop')
  logprobs = state.logprobs.at[bidx, write_pos].set(new_logprobs, mode='drop')
  num_generated = state.num_generated + take
  pos = state.pos + take
  hit_len = num_generated >= rcfg.max_new_tokens
  hit_cache = pos >= rcfg.seq_len - 1
  finish = jnp.where(
    active & has_eos,
    FINISH_EOS,
    jnp.where(
      active & hit_len, FINISH_LENGTH, jnp.where(active & hit_cache, FINISH_CACHE, state.finish)
    ),
  )
  done = state.done | (active & (has_eos | hit_len | hit_cache))
  return state.replace(
    tokens=tokens,
    logprobs=logprobs,
    pos=pos,
    num_generated=num_generated,
    done=done,
    finish=finish.astype(jnp.int32),
  )


def current_tokens(state: RolloutState) -> jax.Array:
  """The last committed token of each sequence, int32 [B]."""
  return jnp.take_along_axis(state.tokens, state.pos[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------- steps


def prefill(
  params,
  prompt_tokens,
  prompt_len,
  rng,
  *,
  cfg: model_lib.ModelConfig,
  rcfg: RolloutConfig,
  mesh=None,
  drafter=None,
  draft_params=None,
) -> RolloutState:
  """Prefill the policy (and drafter) caches and commit the first sampled token.

  prompt_tokens: int32 [B, P] right-padded (P = rcfg.max_prompt_len); prompt_len [B].
  """
  b, p = prompt_tokens.shape
  s = rcfg.buffer_len
  rules = shd.DECODE_RULES
  cache = model_lib.init_cache(cfg, b, s)
  cache = jax.tree.map(
    lambda x, ax: shd.constrain(x, ax, mesh, rules),
    cache,
    model_lib.cache_logical_axes(),
    is_leaf=lambda t: isinstance(t, tuple),
  )
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits, cache = model_lib.forward(
    params, cfg, prompt_tokens, positions, cache, mesh=mesh, rules=rules
  )
  last = jnp.take_along_axis(logits, (prompt_len - 1)[:, None, None], axis=1)[:, 0]
  rng, sub = jax.random.split(rng)
  tok = sampling.sample(last, sub, rcfg.sampling)
  lp = sampling.token_logprobs(last, tok, rcfg.sampling)
  tokens = jnp.full((b, s), rcfg.pad_id, jnp.int32).at[:, :p].set(prompt_tokens)
  draft_state = None
  if drafter is not None:
    draft_state = drafter.prefill(draft_params, prompt_tokens, prompt_len, s, mesh=mesh)
  zeros = jnp.zeros((b,), jnp.int32)
  state = RolloutState(
    tokens=tokens,
    logprobs=jnp.zeros((b, s), jnp.float32),
    pos=prompt_len - 1,
    prompt_len=prompt_len,
    num_generated=zeros,
    done=jnp.zeros((b,), bool),
    finish=zeros,
    cache=cache,
    draft=draft_state,
    rng=rng,
    step=jnp.zeros((), jnp.int32),
    num_rounds=zeros,
    num_accepted=zeros,
  )
  return commit(state, tok[:, None], lp[:, None], jnp.ones((b,), jnp.int32), rcfg)


def plain_step(params, state: RolloutState, *, cfg, rcfg: RolloutConfig, mesh=None):
  """One autoregressive step: feed the current token, sample the next."""
  cur = current_tokens(state)
  logits, cache = model_lib.forward(
    params, cfg, cur[:, None], state.pos[:, None], state.cache, mesh=mesh, rules=shd.DECODE_RULES
  )
  key = jax.random.fold_in(state.rng, state.step)
  tok = sampling.sample(logits[:, 0], key, rcfg.sampling)
  lp = sampling.token_logprobs(logits[:, 0], tok, rcfg.sampling)
  state = state.replace(cache=cache, step=state.step + 1)
  return commit(state, tok[:, None], lp[:, None], jnp.ones_like(state.pos), rcfg)


def max_loop_steps(rcfg: RolloutConfig) -> int:
  return rcfg.max_steps or rcfg.max_new_tokens + 1


def decode(
  params,
  state: RolloutState,
  *,
  cfg,
  rcfg: RolloutConfig,
  mesh=None,
  drafter=None,
  draft_params=None,
  min_active: int = 0,
) -> RolloutState:
  """Run decode steps in a ``lax.while_loop`` until all sequences are done (or until the
  number of active sequences drops to ``min_active``, for compaction)."""
  if rcfg.num_draft and drafter is not None:
    from specrl import speculative

    def step_fn(s):
      return speculative.speculative_step(
        params, draft_params, s, cfg=cfg, rcfg=rcfg, drafter=drafter, mesh=mesh
      )
  else:

    def step_fn(s):
      return plain_step(params, s, cfg=cfg, rcfg=rcfg, mesh=mesh)

  limit = max_loop_steps(rcfg)

  def cond(s):
    n_active = jnp.sum(~s.done)
    return (n_active > min_active) & (s.step < limit)

  return jax.lax.while_loop(cond, step_fn, state)


def finalize(state: RolloutState, rcfg: RolloutConfig) -> RolloutOutput:
  """Gather right-padded responses out of the position-indexed buffer."""
  n = rcfg.max_new_tokens
  idx = state.prompt_len[:, None] + jnp.arange(n)[None, :]
  valid = jnp.arange(n)[None, :] < state.num_generated[:, None]
  idx = jnp.minimum(idx, rcfg.buffer_len - 1)
  resp = jnp.where(valid, jnp.take_along_axis(state.tokens, idx, axis=1), rcfg.pad_id)
  resp_lp = jnp.where(valid, jnp.take_along_axis(state.logprobs, idx, axis=1), 0.0)
  return RolloutOutput(
    tokens=state.tokens,
    logprobs=state.logprobs,
    prompt_len=state.prompt_len,
    response=resp,
    response_logprobs=resp_lp,
    length=state.num_generated,
    finish=state.finish,
    num_rounds=state.num_rounds,
    num_accepted=state.num_accepted,
  )


# ----------------------------------------------------------------------------- engine


class RolloutEngine:
  """Jitted, sharded rollout for one model config, rollout config, mesh and drafter.

  ``generate(params, prompt_tokens, prompt_len, rng)`` returns a :class:`RolloutOutput`
  (device arrays) and a dict of host-side metrics.
  """

  def __init__(
    self, cfg: model_lib.ModelConfig, rcfg: RolloutConfig, mesh: Mesh | None = None, drafter=None
  ):
    self.cfg, self.rcfg, self.drafter = cfg, rcfg, drafter
    self.mesh = mesh if mesh is not None else shd.make_mesh((1, 1, 1), jax.devices()[:1])
    if rcfg.num_draft and drafter is None:
      raise ValueError('rollout.num_draft > 0 needs a drafter (rollout.drafter != "none")')
    self._fns: dict = {}

  # -- shardings
  def param_shardings(self, params):
    axes = model_lib.param_logical_axes(self.cfg)
    return shd.tree_shardings(axes, params, self.mesh, shd.PARAM_RULES)

  def _batch_sharding(self, ndim):
    spec = shd.logical_to_spec(
      ('batch',) + (None,) * (ndim - 1), (0,) * ndim, self.mesh, shd.DECODE_RULES
    )
    return NamedSharding(self.mesh, spec)

  def _state_shardings(self, abstract_state):
    draft_axes = self.drafter.state_logical_axes() if self.drafter is not None else None
    axes = state_logical_axes(draft_axes)
    return shd.tree_shardings(axes, abstract_state, self.mesh, shd.DECODE_RULES)

  def _compiled(self, batch: int, params, draft_params):
    key = batch
    if key in self._fns:
      return self._fns[key]
    cfg, rcfg, mesh, drafter = self.cfg, self.rcfg, self.mesh, self.drafter

    def prefill_fn(params, draft_params, toks, lens, rng):
      return prefill(
        params,
        toks,
        lens,
        rng,
        cfg=cfg,
        rcfg=rcfg,
        mesh=mesh,
        drafter=drafter,
        draft_params=draft_params,
      )

    def decode_fn(params, draft_params, state):
      return decode(
        params, state, cfg=cfg, rcfg=rcfg, mesh=mesh, drafter=drafter, draft_params=draft_params
      )

    p = rcfg.max_prompt_len
    abstract = jax.eval_shape(
      prefill_fn,
      params,
      draft_params,
      jax.ShapeDtypeStruct((batch, p), jnp.int32),
      jax.ShapeDtypeStruct((batch,), jnp.int32),
      jax.random.key(0),
    )
    st_sh = self._state_shardings(abstract)
    psh = self.param_shardings(params)
    dsh = None if draft_params is None else jax.tree.map(lambda x: x.sharding, draft_params)
    rep = shd.replicated(mesh)
    prefill_j = jax.jit(
      prefill_fn,
      in_shardings=(psh, dsh, self._batch_sharding(2), self._batch_sharding(1), rep),
      out_shardings=st_sh,
    )
    decode_j = jax.jit(
      decode_fn, in_shardings=(psh, dsh, st_sh), out_shardings=st_sh, donate_argnums=(2,)
    )
    finalize_j = jax.jit(lambda s: finalize(s, rcfg))
    self._fns[key] = (prefill_j, decode_j, finalize_j)
    return self._fns[key]

  def measure_step_costs(self, params, batch: int, draft_params=None, repeats: int = 5) -> dict:
    """Median wall time (s) of one plain decode step (T = 1), one verify pass (T = k + 1)
    and one drafter proposal of k tokens, at this batch size (jitted, warmed up).

    Steps run inside a ``while_loop`` can't be timed individually, so per-rollout drafter
    and verify times are estimated as (verify passes) x these costs. Cached per batch.
    """
    key = ('costs', batch)
    if key in self._fns:
      return self._fns[key]
    if self.drafter is not None and draft_params is None:
      draft_params = self.drafter.params_from_policy(params)
    cfg, rcfg, mesh, drafter = self.cfg, self.rcfg, self.mesh, self.drafter
    toks = np.full((batch, rcfg.max_prompt_len), 3, np.int32)
    lens = np.full((batch,), rcfg.max_prompt_len, np.int32)
    prefill_j = self._compiled(batch, params, draft_params)[0]
    state = prefill_j(params, draft_params, toks, lens, jax.random.key(0))

    def timed(fn, *args):
      jax.block_until_ready(fn(*args))
      ts = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
      return float(np.median(ts))

    def plain(p, s):
      return model_lib.forward(
        p, cfg, current_tokens(s)[:, None], s.pos[:, None], s.cache, mesh=mesh
      )[0]

    costs = {'plain_step_s': timed(jax.jit(plain), params, state)}
    k = rcfg.num_draft
    if k and drafter is not None:

      def verify_pass(p, s):
        t = jnp.broadcast_to(current_tokens(s)[:, None], (batch, k + 1))
        pos = s.pos[:, None] + jnp.arange(k + 1)[None]
        return model_lib.forward(p, cfg, t, pos, s.cache, mesh=mesh)[0]

      def propose(dp, s):
        return drafter.propose(
          dp, s.draft, s.tokens, s.pos, k, s.rng, rcfg.sampling, mesh=mesh, policy_cache=s.cache
        )[:2]

      costs['verify_pass_s'] = timed(jax.jit(verify_pass), params, state)
      costs['draft_k_s'] = timed(jax.jit(propose), draft_params, state)
    self._fns[key] = costs
    return costs

  def generate(
    self, params, prompt_tokens, prompt_len, rng, draft_params=None, estimate_costs: bool = False
  ):
    prompt_tokens, prompt_len = prepare_prompts(prompt_tokens, prompt_len, self.rcfg)
    b = prompt_tokens.shape[0]
    if self.drafter is not None and draft_params is None:
      draft_params = self.drafter.params_from_policy(params)
    prefill_j, decode_j, finalize_j = self._compiled(b, params, draft_params)
    t0 = time.perf_counter()
    state = prefill_j(params, draft_params, prompt_tokens, prompt_len, rng)
    state = decode_j(params, draft_params, state)
    out = finalize_j(state)
    out = jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    metrics = rollout_metrics(out, dt, self.rcfg)
    if estimate_costs and self.rcfg.num_draft:
      costs = self.measure_step_costs(params, b, draft_params)
      passes = int(np.asarray(out.num_rounds).max())
      metrics['spec/draft_time_est_s'] = passes * costs['draft_k_s']
      metrics['spec/verify_time_est_s'] = passes * costs['verify_pass_s']
      metrics['spec/draft_cost_ratio'] = costs['draft_k_s'] / (
        self.rcfg.num_draft * costs['plain_step_s']
      )
    return out, metrics


def prepare_prompts(prompt_tokens, prompt_len, rcfg: RolloutConfig):
  """Validate a prompt batch and right-pad it to ``rcfg.max_prompt_len``.

  Every engine goes through here, so bad input fails the same way everywhere: a batch
  wider than ``max_prompt_len``, an empty prompt, lengths that do not match the tokens
  given, or a prompt that leaves no room in the cache. Returns int32 numpy
  (tokens [B, max_prompt_len], lengths [B]).
  """
  prompt_tokens = np.asarray(prompt_tokens, np.int32)
  prompt_len = np.asarray(prompt_len, np.int32)
  b, p = prompt_tokens.shape
  if p > rcfg.max_prompt_len:
    raise ValueError(
      f'prompt batch is {p} tokens wide but rollout.max_prompt_len is '
      f'{rcfg.max_prompt_len} (the KV cache holds {rcfg.seq_len} '
      'positions): shorten the prompts or raise rollout.max_prompt_len'
    )
  if p < rcfg.max_prompt_len:
    prompt_tokens = np.pad(
      prompt_tokens, ((0, 0), (0, rcfg.max_prompt_len - p)), constant_values=rcfg.pad_id
    )
  if prompt_len.min() < 1:
    raise ValueError('every prompt needs at least one token')
  if prompt_len.shape != (b,) or prompt_len.max() > p:
    raise ValueError(
      f'prompt_len must be [{b}] lengths <= the {p} prompt tokens '
      f'given, got shape {prompt_len.shape}, max {int(prompt_len.max())}'
    )
  if prompt_len.max() >= rcfg.seq_len:
    raise ValueError(
      f'a prompt of {int(prompt_len.max())} tokens does not fit the cache '
      f'(rollout cache holds {rcfg.seq_len} positions)'
    )
  return prompt_tokens, prompt_len


def rollout_metrics(out: RolloutOutput, seconds: float, rcfg: RolloutConfig) -> dict:
  """Host-side summary of one rollout."""
  length = np.asarray(out.length)
  rounds = np.asarray(out.num_rounds)
  acc = np.asarray(out.num_accepted)
  m = {
    'rollout/time_s': seconds,
    'rollout/tokens': int(length.sum()),
    'rollout/tokens_per_s': float(length.sum() / max(seconds, 1e-9)),
    'rollout/len_mean': float(length.mean()),
    'rollout/len_max': int(length.max()),
  }
  if rcfg.num_draft:
    total_rounds = int(rounds.sum())
    m['spec/verify_passes'] = total_rounds
    m['spec/acceptance'] = float(acc.sum() / max(total_rounds * rcfg.num_draft, 1))
    m['spec/tokens_per_pass'] = float((length.sum() - len(length)) / max(total_rounds, 1))
  return m

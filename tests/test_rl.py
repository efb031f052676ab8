"""GRPO pieces on hand-computed cases, and a train_step that lowers the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import model as model_lib
from specrl import rl as rl_lib


def test_group_advantages_hand_computed():
  r = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
  adv = rl_lib.grpo_advantages(r, 4, scale=False)
  np.testing.assert_allclose(adv, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
  adv = rl_lib.grpo_advantages(r, 4, scale=True, eps=0.0 + 1e-12)
  np.testing.assert_allclose(adv[:4], [1, -1, -1, 1], atol=1e-5)  # std of {1,0,0,1} = 0.5
  np.testing.assert_allclose(adv[4:], 0.0)  # identical rewards: no signal, no NaN


def _rl(**kw):
  return rl_lib.RLConfig(**{'num_generations': 2, **kw})


def test_clipped_loss_hand_computed():
  # two sequences, 3 positions; mask picks positions 1, 2 of seq 0 and 1 of seq 1
  mask = jnp.array([[0, 1, 1], [0, 1, 0]], jnp.float32)
  old = jnp.zeros((2, 3))
  new = jnp.log(jnp.array([[1.0, 1.5, 0.5], [1.0, 0.9, 1.0]]))
  adv = jnp.array([1.0, -2.0])
  loss, m = rl_lib.grpo_loss_from_logprobs(
    new, old, None, adv, mask, _rl(clip_eps=0.2, aggregation='token')
  )
  # per token: -min(r*A, clip(r)*A): seq0 r=1.5 -> -1.2 ; r=0.5 -> -0.5 ; seq1 r=0.9,A=-2 -> 1.8
  np.testing.assert_allclose(loss, (-1.2 - 0.5 + 1.8) / 3, rtol=1e-6)
  np.testing.assert_allclose(m['clip_frac'], 2 / 3, rtol=1e-6)
  loss_s, _ = rl_lib.grpo_loss_from_logprobs(
    new, old, None, adv, mask, _rl(clip_eps=0.2, aggregation='sequence')
  )
  np.testing.assert_allclose(loss_s, ((-1.2 - 0.5) / 2 + 1.8) / 2, rtol=1e-6)


def test_k3_kl_term():
  mask = jnp.ones((1, 2))
  lp = jnp.log(jnp.array([[0.5, 0.25]]))
  ref = jnp.log(jnp.array([[0.25, 0.25]]))
  loss, m = rl_lib.grpo_loss_from_logprobs(lp, lp, ref, jnp.zeros(1), mask, _rl(kl_coef=0.5))
  d = np.log(0.5)  # ref - lp at position 0; 0 at position 1
  kl = (np.exp(d) - d - 1) / 2
  np.testing.assert_allclose(m['kl'], kl, rtol=1e-6)
  np.testing.assert_allclose(loss, 0.5 * kl, rtol=1e-6)


def test_bad_rl_config_values():
  with pytest.raises(ValueError, match='num_generations'):
    rl_lib.RLConfig(num_generations=1)
  with pytest.raises(ValueError, match='aggregation'):
    rl_lib.RLConfig(aggregation='mean')


def test_train_step_lowers_loss_on_fixed_batch():
  cfg = model_lib.ModelConfig(
    vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64
  )
  params = model_lib.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  b, s = 8, 10
  tokens = jnp.asarray(rng.integers(3, 16, (b, s)), jnp.int32)
  mask = jnp.asarray(np.arange(s)[None] >= 4, jnp.float32) * jnp.ones((b, 1))
  rl = rl_lib.RLConfig(num_generations=4, kl_coef=0.1)
  old = rl_lib.sequence_logprobs(params, cfg, tokens, 1.0) * mask
  batch = {
    'tokens': tokens,
    'response_mask': mask,
    'old_logprobs': old,
    'advantages': jnp.asarray(rng.normal(size=b), jnp.float32),
  }
  opt = rl_lib.make_optimizer(1e-2, 0.0, 1.0)
  state = rl_lib.init_train_state(params, opt, jax.random.key(1), keep_reference=True)
  step = jax.jit(lambda st, bt: rl_lib.train_step(st, bt, cfg=cfg, rl=rl, optimizer=opt))
  loss0 = None
  for _ in range(5):
    state, m = step(state, batch)
    loss0 = float(m['loss']) if loss0 is None else loss0
  # loss at the *current* params, same behaviour logprobs
  loss_end, _ = rl_lib.grpo_loss(state.params, batch, state.ref_params, cfg, rl)
  assert float(loss_end) < loss0 - 1e-3
  assert int(state.step) == 5


def test_grpo_loop_raises_reward_on_a_toy_task():
  """Rollout -> reward -> advantages -> train_step, end to end: reward = 'first token is 5'."""
  from specrl import rollout as rollout_lib
  from specrl.sampling import SamplingParams

  cfg = model_lib.ModelConfig(
    vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
  )
  params = model_lib.init_params(cfg, jax.random.key(0))
  rl = rl_lib.RLConfig(num_generations=8)
  opt = rl_lib.make_optimizer(3e-2, 0.0, 1.0)
  state = rl_lib.init_train_state(params, opt, jax.random.key(1), keep_reference=False)
  rcfg = rollout_lib.RolloutConfig(
    max_new_tokens=2, max_prompt_len=2, eos_id=-1, sampling=SamplingParams(1.0)
  )
  eng = rollout_lib.RolloutEngine(cfg, rcfg)
  step = jax.jit(lambda st, bt: rl_lib.train_step(st, bt, cfg=cfg, rl=rl, optimizer=opt))
  toks = np.tile(np.array([[1, 2]], np.int32), (32, 1))
  lens = np.full((32,), 2, np.int32)

  def p5(params):
    lg, _ = model_lib.forward(params, cfg, toks[:1], np.arange(2)[None])
    return float(jax.nn.softmax(lg[0, -1])[5])

  start = p5(state.params)
  for i in range(15):
    out, _ = eng.generate(state.params, toks, lens, jax.random.key(100 + i))
    reward = (np.asarray(out.response[:, 0]) == 5).astype(np.float32)
    pos = np.arange(rcfg.seq_len)[None]
    mask = ((pos >= 2) & (pos < 2 + np.asarray(out.length)[:, None])).astype(np.float32)
    batch = {
      'tokens': out.tokens[:, : rcfg.seq_len],
      'response_mask': mask,
      'old_logprobs': out.logprobs[:, : rcfg.seq_len] * mask,
      'advantages': rl_lib.grpo_advantages(jnp.asarray(reward), 8),
    }
    state, _ = step(state, batch)
  assert start < 0.3 and p5(state.params) > start + 0.3, (start, p5(state.params))


def _naive_logprobs(params, cfg, tokens, temperature):
  b, s = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(s - 1, dtype=jnp.int32), (b, s - 1))
  logits, _ = model_lib.forward(params, cfg, tokens[:, :-1], pos)
  logp = jax.nn.log_softmax(logits / temperature, axis=-1)
  lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(lp, ((0, 0), (1, 0)))


@pytest.mark.parametrize('elements', [3 * 5 * 40, 1 << 25])  # 5 chunks (last padded) / one
def test_chunked_sequence_logprobs_match_full_head(monkeypatch, elements):
  """Training's chunked LM head gives the full head's logprobs and gradients."""
  cfg = model_lib.ModelConfig(
    vocab_size=40, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64
  )
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 23), 0, 40)
  monkeypatch.setattr(rl_lib, 'LOGPROB_CHUNK_ELEMENTS', elements)
  assert rl_lib.logprob_chunk(3, 22, 40) == (5 if elements < 1000 else 22)
  got = rl_lib.sequence_logprobs(params, cfg, tokens, 0.7)
  want = _naive_logprobs(params, cfg, tokens, 0.7)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  g_got = jax.grad(lambda p: rl_lib.sequence_logprobs(p, cfg, tokens, 0.7).sum())(params)
  g_want = jax.grad(lambda p: _naive_logprobs(p, cfg, tokens, 0.7).sum())(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_got, g_want)

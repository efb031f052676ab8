import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import model as model_lib

fwd = jax.jit(model_lib.forward, static_argnums=1)

VARIANTS = {
  'llama': dict(),
  'qwen2': dict(qkv_bias=True, tie_embeddings=False),
  'qwen3': dict(qk_norm=True, n_kv_heads=1),
}


def _setup(variant, seed=0):
  base = dict(vocab_size=24, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
  cfg = model_lib.ModelConfig(**{**base, **VARIANTS[variant]})
  params = model_lib.init_params(cfg, jax.random.key(seed))
  # random biases / norms so those code paths matter
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(7), x.shape), params)
  return cfg, params


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_prefill_and_ragged_extension_match_full_sequence(variant):
  cfg, params = _setup(variant)
  b, t = 3, 14
  toks = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  full, _ = fwd(params, cfg, toks, pos)
  lens = jnp.array([3, 5, 1])
  cache = model_lib.init_cache(cfg, b, 20)
  # prefill a right-padded prompt batch of width 7 (garbage after each length)
  _, cache = fwd(params, cfg, toks[:, :7], pos[:, :7], cache)
  cur = lens
  for _ in range(3):  # T = 1 steps at ragged positions
    tk = jnp.take_along_axis(toks, cur[:, None], 1)
    lg, cache = fwd(params, cfg, tk, cur[:, None], cache)
    ref = jnp.take_along_axis(full, cur[:, None, None], 1)
    np.testing.assert_allclose(lg, ref, atol=2e-5, rtol=1e-5)
    cur = cur + 1
  for width in (4, 2):  # T > 1 extensions at ragged positions
    p = cur[:, None] + jnp.arange(width)[None]
    lg, cache = fwd(params, cfg, jnp.take_along_axis(toks, p, 1), p, cache)
    np.testing.assert_allclose(
      lg, jnp.take_along_axis(full, p[:, :, None], 1), atol=2e-5, rtol=1e-5
    )
    cur = cur + width


def test_rollback_by_position_overwrites_stale_slots():
  cfg, params = _setup('llama')
  b, t = 2, 10
  toks = jax.random.randint(jax.random.key(3), (b, t), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  full, _ = fwd(params, cfg, toks, pos)
  cache = model_lib.init_cache(cfg, b, 12)
  _, cache = fwd(params, cfg, toks[:, :4], pos[:, :4], cache)
  # speculative pass writes 4 wrong tokens at 4..7, then we "reject" them and continue at 4
  wrong = (toks[:, 4:8] + 1) % cfg.vocab_size
  _, cache = fwd(params, cfg, wrong, pos[:, 4:8], cache)
  lg, _ = fwd(params, cfg, toks[:, 4:7], pos[:, 4:7], cache)
  np.testing.assert_allclose(lg, full[:, 4:7], atol=2e-5, rtol=1e-5)


def test_bad_config_values_name_the_field():
  with pytest.raises(ValueError, match='n_kv_heads'):
    model_lib.ModelConfig(n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match='param_dtype'):
    model_lib.ModelConfig(param_dtype='float64x')
  with pytest.raises(ValueError, match=r'unknown key config\.model\.d_modle; valid keys: '):
    model_lib.ModelConfig.from_config({'d_modle': 3})


def test_bf16_params_run():
  cfg = model_lib.ModelConfig(
    vocab_size=16,
    d_model=32,
    n_layers=1,
    n_heads=2,
    n_kv_heads=1,
    head_dim=16,
    d_ff=64,
    param_dtype='bfloat16',
    compute_dtype='bfloat16',
  )
  params = model_lib.init_params(cfg, jax.random.key(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  toks = jnp.zeros((2, 5), jnp.int32)
  lg, _ = fwd(params, cfg, toks, jnp.broadcast_to(jnp.arange(5), (2, 5)))
  assert lg.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(lg)))


@pytest.mark.parametrize('variant', ['llama', 'qwen2'])
def test_logits_at_is_one_row_of_the_full_logits(variant):
  cfg, params = _setup(variant)
  b, t = 3, 6
  toks = jax.random.randint(jax.random.key(4), (b, t), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  cache = model_lib.init_cache(cfg, b, 8)
  full, cache_full = fwd(params, cfg, toks, pos, cache)
  at = jnp.array([5, 0, 2])
  f = jax.jit(model_lib.forward, static_argnums=1, static_argnames='return_hidden')
  one, cache_one, hidden = f(params, cfg, toks, pos, cache, logits_at=at, return_hidden=True)
  assert one.shape == (b, 1, cfg.vocab_size) and hidden.shape == (b, t, cfg.d_model)
  np.testing.assert_allclose(one[:, 0], full[jnp.arange(b), at], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(cache_one['k'], cache_full['k'])


def test_unstacked_layers_give_the_same_logits_and_cache():
  cfg, params = _setup('qwen3')
  b, t = 2, 5
  toks = jax.random.randint(jax.random.key(5), (b, t), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  per_layer = model_lib.unstack_layers(params)
  assert isinstance(per_layer['layers'], tuple) and len(per_layer['layers']) == cfg.n_layers
  for cache in (None, model_lib.init_cache(cfg, b, 7)):
    want, want_cache = fwd(params, cfg, toks, pos, cache)
    got, got_cache = fwd(per_layer, cfg, toks, pos, cache)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    if cache is not None:
      np.testing.assert_allclose(got_cache['v'], want_cache['v'], atol=1e-6, rtol=1e-6)

"""``rl.attention_impl='pallas'``: jax's Pallas flash kernels (TPU and GPU, run here in Pallas's
interpreter) equal the pure-jnp reference in values and gradients, with grouped-query heads and
a sequence that is not a multiple of the block; the reference equals the model's own masked
attention; the loss forward through ``run_layers`` equals full attention; a CPU run refuses it
with a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specrl import attention as attention_lib
from specrl import model as model_lib
from specrl.kernels import flash_attention as flash_lib
from specrl.kernels import flash_attention_reference as ref_lib


def _qkv(b=2, t=20, h=4, kh=2, dh=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, h, dh))
  k = jax.random.normal(ks[1], (b, t, kh, dh))
  v = jax.random.normal(ks[2], (b, t, kh, dh))
  return q, k, v


def _loss(attn):
  # a weighted sum: every output element's gradient differs
  w = jax.random.normal(jax.random.key(9), (2, 20, 4, 8))
  return lambda q, k, v: jnp.sum(attn(q, k, v) * w)


def test_the_reference_equals_the_models_masked_attention():
  q, k, v = _qkv()
  t = q.shape[1]
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (q.shape[0], t, t))
  np.testing.assert_allclose(
    ref_lib.causal_attention(q, k, v), attention_lib.attention(q, k, v, mask), rtol=1e-6, atol=1e-6
  )


@pytest.mark.parametrize('platform', ['gpu', 'tpu'])
def test_kernel_values_and_gradients_equal_the_reference(platform):
  """20 positions in blocks of 8 (GPU: padded to 24; TPU: one 128-lane block), 4 query
  heads over 2 kv heads."""
  q, k, v = _qkv()
  kern = lambda q, k, v: flash_lib.causal_flash_attention(  # noqa: E731
    q, k, v, platform=platform, interpret=True, block=8
  )
  np.testing.assert_allclose(kern(q, k, v), ref_lib.causal_attention(q, k, v), atol=2e-6)
  g_ref = jax.grad(_loss(ref_lib.causal_attention), argnums=(0, 1, 2))(q, k, v)
  with flash_lib.tpu_interpret(platform == 'tpu'):  # the TPU backward is traced here
    g = jax.grad(_loss(kern), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip('qkv', g, g_ref, strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f'd{name}')


def test_a_kernel_that_ignored_the_causal_mask_is_caught():
  """The comparison above can fail: the GPU kernel run non-causal differs from the
  reference by far more than the tolerance."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  q, k, v = _qkv(t=16)
  rep = lambda x: jnp.repeat(x, 2, axis=2)  # noqa: E731
  bs = gpu_attention.BlockSizes(block_q=8, block_k=8)
  wrong = gpu_attention.mha(
    q, rep(k), rep(v), None, sm_scale=1 / np.sqrt(8), causal=False, block_sizes=bs,
    interpret=True,
  )  # fmt: skip
  assert np.abs(wrong - ref_lib.causal_attention(q, k, v)).max() > 1e-2


def test_the_loss_forward_through_pallas_equals_full_attention():
  """``run_layers`` (the GRPO loss forward) with 'pallas' (the GPU kernel, interpreted on
  CPU) equals 'full': hidden states and the gradient w.r.t. the layers' params."""
  cfg = model_lib.ModelConfig(
    vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
  )
  params = model_lib.init_params(cfg, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 12, cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))

  def out(layers, impl):
    y, _ = model_lib.run_layers(layers, cfg, x, pos, attention_impl=impl)
    return y

  np.testing.assert_allclose(
    out(params['layers'], 'pallas'), out(params['layers'], 'full'), rtol=1e-5, atol=1e-5
  )
  g = {
    i: jax.grad(lambda p, i=i: jnp.sum(out(p, i) ** 2))(params['layers'])
    for i in ('full', 'pallas')
  }
  for a, b in zip(jax.tree.leaves(g['pallas']), jax.tree.leaves(g['full']), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_a_cpu_run_refuses_pallas_naming_the_field():
  from configs import default
  from specrl import run_config

  c = default.get_config()
  c.rl.attention_impl = 'pallas'
  with pytest.raises(ValueError, match=r"rl.attention_impl='pallas'.*'blocked'"):
    run_config.check_run_config(c)
  with pytest.raises(ValueError, match='not .cpu.'):
    flash_lib.causal_flash_attention(*_qkv())

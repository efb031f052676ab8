import jax
import jax.numpy as jnp
import numpy as np

from specrl import sampling


def test_argmax_is_jnp_argmax_on_ties_nans_and_infinities():
  x = np.array(
    [
      [0.0, 3.0, 3.0, -1.0, 2.0],  # tie: first index
      [np.nan, 1.0, np.nan, 5.0, 0.0],  # NaN counts as the max: first NaN
      [-np.inf] * 5,  # all -inf: index 0
      [1.0, np.inf, 2.0, np.inf, 0.0],  # +inf ties
      [-0.0, 0.0, -1.0, -2.0, -0.0],  # signed zeros compare equal
    ],
    np.float32,
  )
  want = np.asarray(jnp.argmax(x, axis=-1))
  np.testing.assert_array_equal(np.asarray(jax.jit(sampling.argmax)(x)), want)
  np.testing.assert_array_equal(want, [1, 0, 0, 1, 0])
  r = jax.random.normal(jax.random.key(0), (3, 4, 257))
  got = sampling.argmax(jnp.round(r * 4))  # many ties
  assert got.dtype == jnp.int32 and got.shape == (3, 4)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(jnp.round(r * 4), -1)))

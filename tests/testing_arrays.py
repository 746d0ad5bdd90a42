"""Array helpers shared by the numerical tests."""

import jax
import jax.numpy as jnp
import numpy as np


def normal(shape, seed: int = 0, loc: float = 0.0, scale: float = 1.0) -> jax.Array:
  """Seeded float32 normal draws."""
  return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), jnp.float32)


def assert_close(actual, desired, rtol: float = 1e-5) -> None:
  """Elementwise rtol plus an atol of rtol x the largest magnitude (float32 sums)."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * np.abs(desired).max())


def max_relative_error(actual, reference) -> float:
  """Largest |actual - reference| relative to the reference's largest magnitude (float64)."""
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(actual - reference).max() / np.abs(reference).max())


def value_and_grads(f, x, w, ct):
  """`<f(x, w), ct>` and its gradients with respect to `x` and `w`, jitted."""
  return jax.jit(jax.value_and_grad(lambda x, w: jnp.vdot(f(x, w), ct), (0, 1)))(x, w)

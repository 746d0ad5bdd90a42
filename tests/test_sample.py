"""Tests for the flow ODE integrator."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from latentfm import sample
from latentfm.flow import LatentStats
from latentfm.nn.vqgan import VQGAN

# Linear field v(z, t) = A z (channels mix): z(0) = expm(-A) z(1), a damped rotation.
A = np.array([[0.5, 2.0], [-2.0, 0.5]])
Z1 = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 4, 2)), jnp.float32)
EXACT = np.asarray(Z1) @ scipy.linalg.expm(-A).T
EVALS = []  # one entry per velocity evaluation at run time


def _count():
  EVALS.append(1)


def linear_field(z, t):
  jax.debug.callback(_count)
  return z @ jnp.asarray(A.T, z.dtype)


def _solve(solver, steps, **kw):
  """(relative max error, reported NFE, counted NFE) on the linear field."""
  EVALS.clear()
  z, nfe = sample.integrate(linear_field, Z1, solver=solver, steps=steps, **kw)
  z = np.asarray(z)
  jax.effects_barrier()
  err = np.abs(z - EXACT).max() / np.abs(EXACT).max()
  return float(err), int(nfe), len(EVALS)


def test_euler_is_thesis_algorithm_3():
  def v(z, t):  # nonlinear and time dependent, so that the time grid matters
    return jnp.sin(z) * (1.0 + t) - 0.3 * z * t**2

  n = 7
  z = Z1
  for i in range(n - 1, -1, -1):  # t_{n+1} = (n+1)/N -> t_n = n/N
    t_next, t_now = (i + 1) / n, i / n
    z = z + (t_now - t_next) * v(z, t_next)
  out, nfe = sample.integrate(v, Z1, solver="euler", steps=n)
  np.testing.assert_allclose(out, z, atol=1e-6)
  assert int(nfe) == n


@pytest.mark.parametrize(
  "solver, order, evals_per_step, bound",
  [("euler", 1, 1, 0.3), ("heun", 2, 2, 0.01), ("midpoint", 2, 2, 0.01)],
)
def test_fixed_step_convergence_order(solver, order, evals_per_step, bound):
  """Error at N = 20 within a loose bound; halving the step divides it by ~2^order."""
  e1, nfe1, counted1 = _solve(solver, 20)
  e2, nfe2, counted2 = _solve(solver, 40)
  assert (nfe1, nfe2) == (counted1, counted2) == (20 * evals_per_step, 40 * evals_per_step)
  assert e1 < bound
  assert 0.7 * 2**order < e1 / e2 < 1.4 * 2**order


@pytest.mark.parametrize("solver", ["tsit5", "dopri5"])
def test_adaptive_solvers_meet_tolerance_and_count_evaluations(solver):
  err, nfe, counted = _solve(solver, 50, rtol=1e-5, atol=1e-5)
  print(f"{solver}: relative error {err:.2e}, NFE {nfe}")
  assert err < 1e-4
  assert nfe == counted and (nfe - 1) % 6 == 0  # 7 stages, first same as last
  # A far too large initial step is rejected (each rejection costs 6 evaluations too).
  _, nfe_big, counted_big = _solve(solver, 1, rtol=1e-7, atol=1e-7)
  assert nfe_big == counted_big


def test_tsit5_beats_euler_100():
  e_euler, nfe_euler, _ = _solve("euler", 100)
  e_tsit, nfe_tsit, _ = _solve("tsit5", 50, rtol=1e-5, atol=1e-5)
  print(
    f"euler-100: error {e_euler:.2e}, NFE {nfe_euler}; tsit5: error {e_tsit:.2e}, NFE {nfe_tsit}"
  )
  assert nfe_tsit < nfe_euler == 100
  assert e_tsit <= e_euler


def test_no_recompilation_on_repeated_calls():
  traces = []

  def v(z, t):
    traces.append(1)  # Python side effect: runs only while tracing
    return -z * t

  z, _ = sample.integrate(v, Z1, solver="heun", steps=10)
  n = len(traces)
  assert n > 0
  for steps in (10, 12):
    sample.integrate(v, Z1 + 1.0, solver="heun", steps=steps)
  assert len(traces) == n

  # Model-backed fields: new parameter values reuse the compiled solve.
  def apply_fn(variables, z, t, train):
    traces.append(1)
    assert not train and t.shape == (z.shape[0],)
    return -variables["params"]["w"] * z * t[:, None, None, None, None]

  sample.integrate(sample.velocity_from_model(apply_fn, {"w": jnp.float32(1.0)}), Z1, steps=5)
  n = len(traces)
  out, _ = sample.integrate(
    sample.velocity_from_model(apply_fn, {"w": jnp.float32(2.0)}), Z1, steps=5
  )
  assert len(traces) == n
  # Euler on dz/dt = -w t z is a product of scalar factors.
  factor = np.prod([1 + 2.0 * (1 - i / 5) / 5 for i in range(5)])
  np.testing.assert_allclose(out, Z1 * factor, rtol=1e-5)


def test_unknown_solver_raises():
  with pytest.raises(ValueError, match="euler.*heun.*midpoint.*tsit5.*dopri5"):
    sample.integrate(linear_field, Z1, solver="rk4")


# ------------------------------------------------- sample() and decode() against their parts


@pytest.fixture(scope="module")
def tiny_models():
  """A tiny random VQ-GAN with per-channel latent statistics far from (0, 1)."""
  model = VQGAN(n_hiddens=4, downsample=(2, 2, 2), embedding_dim=4, n_codes=8)
  variables = jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, 8, 8, 8, 1)))
  stats = LatentStats(
    mean=np.array([0.8, -1.5, 0.3, 2.0], np.float32), std=np.array([0.5, 3.0, 1.5, 0.2], np.float32)
  )
  return sample.Models(
    velocity=None,
    vqgan=model,
    vqgan_variables=variables,
    stats=stats,
    latent_shape=(4, 4, 4, 4),
    flow_step=0,
    vqgan_step=0,
  )


def _decoded(models, z_normalised):
  """Volumes from normalised latents, written out: z * std + mean, decoder, [-1, 1] -> [0, 1]."""
  z = np.asarray(z_normalised) * models.stats.std + models.stats.mean
  decoder = jax.jit(lambda v, z: models.vqgan.apply(v, z, method=models.vqgan.decode))
  x = decoder(models.vqgan_variables, jnp.asarray(z))
  return np.clip((np.asarray(x)[..., 0] + 1.0) / 2.0, 0.0, 1.0)


def test_decode_denormalises_before_the_decoder(tiny_models):
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 4, 4)))
  want = _decoded(tiny_models, z)
  np.testing.assert_allclose(sample.decode(tiny_models, jnp.asarray(z)), want, atol=1e-5)
  unit = LatentStats(mean=np.zeros(4, np.float32), std=np.ones(4, np.float32))
  undone = _decoded(dataclasses.replace(tiny_models, stats=unit), z)
  assert np.abs(undone - want).max() > 100 * 1e-5  # the statistics matter at this tolerance


def test_sample_integrates_noise_at_t1_down_to_t0(tiny_models):
  """`sample` with a known time-dependent field equals Euler steps from t = 1 to 0 written
  out, from the same noise, then decoded."""

  def field(z, t):
    return -z * (1.0 + 2.0 * t)

  models = dataclasses.replace(tiny_models, velocity=field)
  key, n = jax.random.PRNGKey(7), 5
  z = np.asarray(jax.random.normal(jax.random.split(key, 1)[0], (2, 4, 4, 4, 4)))
  for i in range(n, 0, -1):  # t = i/n -> (i-1)/n
    z = z - field(z, i / n) / n
  volumes, nfe = sample.sample(key, models, 2, solver="euler", steps=n)
  assert nfe == n
  np.testing.assert_allclose(volumes, _decoded(models, z), atol=1e-5)

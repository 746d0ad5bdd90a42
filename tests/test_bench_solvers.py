"""bench.solvers: the tight tsit5 reference, the sweep against it, its equal-error line."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from bench import solvers

# v(z, t) = A z, so z(0) = expm(-A) z(1) exactly.
A = np.array([[0.5, 2.0], [-2.0, 0.5]])
Z1 = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 4, 2)), jnp.float32)


def test_sweep_errors_shrink_with_steps_and_tolerance():
  velocity = lambda z, t: z @ jnp.asarray(A.T, z.dtype)
  ref, ref_nfe = solvers.reference(velocity, Z1)
  exact = np.asarray(Z1) @ scipy.linalg.expm(-A).T
  scale = float(np.sqrt(np.mean(exact**2)))
  assert float(np.sqrt(np.mean((np.asarray(ref) - exact) ** 2))) < 1e-5 * scale
  rows = list(solvers.sweep(velocity, Z1, ref, tolerances=(1e-2, 1e-5)))
  by_name = {(r["solver"], r["setting"]): r for r in rows}
  euler = [by_name["euler", f"{n} steps"] for n in (10, 25, 50, 100)]
  assert [r["nfe"] for r in euler] == [10, 25, 50, 100]
  errors = [r["error"] for r in euler]
  for n, error in zip((10, 25, 50, 100), errors):  # Euler from t = 1 to 0: z <- (I - A/n) z
    euler_z0 = np.asarray(Z1) @ np.linalg.matrix_power(np.eye(2) - A / n, n).T
    assert error == pytest.approx(np.sqrt(np.mean((euler_z0 - np.asarray(ref)) ** 2)), rel=1e-3)
  assert 1.8 < errors[2] / errors[3] < 2.2  # first order: half the step, half the error
  assert by_name["heun", "25 steps"]["nfe"] == 50
  assert by_name["heun", "25 steps"]["error"] < errors[3]
  loose, tight = by_name["tsit5", "rtol=atol=0.01"], by_name["tsit5", "rtol=atol=1e-05"]
  assert tight["error"] < loose["error"] and tight["nfe"] > loose["nfe"]
  assert tight["error"] < 1e-4 * scale
  assert ref_nfe > tight["nfe"]


def test_equal_error_takes_the_cheapest_tsit5_within_euler_100s_error():
  row = lambda solver, nfe, error: {"solver": solver, "setting": "", "nfe": nfe, "error": error}
  rows = [
    row("euler", 50, 2e-3),
    row("euler", 100, 1e-3),
    row("tsit5", 20, 5e-3),
    row("tsit5", 40, 9e-4),
    row("tsit5", 60, 1e-5),
  ]
  assert solvers.equal_error(rows)[1]["nfe"] == 40
  assert solvers.equal_error(rows[:3])[1] is None
  assert solvers.equal_error(rows)[0] is rows[1]

"""Retrace guard for `integrate`: one compile for a run, whatever the values (parameters, noise,
step count) of later calls. The train steps' guards sit in their own tests, which already
compile them (`test_vqgan_step.py`, `test_train_loop.py`)."""

import jax
import jax.numpy as jnp

from latentfm import sample


def test_integrate_compiles_once_for_new_parameters_noise_and_steps():
  traces = []

  def apply(variables, z, t, train=False):  # a network's apply: (B, ...), (B,) -> (B, ...)
    traces.append(1)
    return -z * variables["params"]["rate"] * (1.0 + t[:, None, None, None, None])

  for seed, steps in ((0, 2), (1, 3), (2, 5)):
    params = {"rate": jnp.full((2,), 0.5 + seed)}
    noise = jax.random.normal(jax.random.PRNGKey(seed), (2, 4, 4, 4, 2))
    _, nfe = sample.integrate(sample.velocity_from_model(apply, params), noise, steps=steps)
    assert int(nfe) == steps
    if seed == 0:
      traced = len(traces)
  assert traced >= 1 and len(traces) == traced

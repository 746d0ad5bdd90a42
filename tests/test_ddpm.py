"""Tests for the DDPM objective: schedule, forward process, loss, and the DDPM and DDIM samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_arrays import normal as _normal

from latentfm import ddpm

T = 300


def test_cosine_schedule_matches_its_formula():
  s = ddpm.make_schedule(T, "cosine")
  f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
  t = np.arange(T)
  betas = np.minimum(1.0 - f(t + 1) / f(t), 0.9999)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  # Before the last step's clip, alpha_bar_t = f(t + 1) / f(0): the cosine itself.
  np.testing.assert_allclose(s.alphas_cumprod[:-1], f(t[:-1] + 1) / f(0), rtol=1e-5, atol=1e-7)
  assert float(s.betas[-1]) == pytest.approx(0.9999)  # f(T) = cos^2(pi / 2) ~ 0: clipped
  np.testing.assert_allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
  assert float(s.alphas_cumprod_prev[0]) == 1.0
  assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


def test_linear_schedule_and_bad_settings():
  s = ddpm.make_schedule(1000, "linear")
  assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)
  np.testing.assert_allclose(
    s.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-5
  )
  assert float(ddpm.make_schedule(250, "linear").betas[-1]) == pytest.approx(0.08)  # x 1000/T
  with pytest.raises(ValueError, match="cosine"):
    ddpm.make_schedule(T, "sigmoid")
  with pytest.raises(ValueError, match="num_timesteps"):
    ddpm.make_schedule(0)


def test_forward_process_posterior_and_z0_inversion():
  s = ddpm.make_schedule(T)
  z0, eps = _normal((3, 2, 2, 2, 4), 0), _normal((3, 2, 2, 2, 4), 1)
  t = jnp.array([0, 150, 299])
  zt = ddpm.q_sample(s, z0, t, eps)
  abar = np.asarray(s.alphas_cumprod)[np.asarray(t)][:, None, None, None, None]
  np.testing.assert_allclose(zt, np.sqrt(abar) * z0 + np.sqrt(1 - abar) * eps, rtol=1e-5)
  np.testing.assert_allclose(ddpm.predict_z0(s, zt[:2], t[:2], eps[:2]), z0[:2], atol=1e-4)
  # Posterior q(z_{t-1} | z_t, z0) by Bayes' rule per element: prior N(sqrt(abar') z0,
  # 1 - abar') times the likelihood N(z_t; sqrt(1 - beta) z_{t-1}, beta).
  tt = 150
  beta, abar_t, abar_p = (float(a[tt]) for a in (s.betas, s.alphas_cumprod, s.alphas_cumprod_prev))
  precision = 1 / (1 - abar_p) + (1 - beta) / beta
  mean_bayes = (np.sqrt(abar_p) * z0 / (1 - abar_p) + np.sqrt(1 - beta) * zt / beta) / precision
  mean, var = ddpm.posterior(s, z0, zt, tt)
  np.testing.assert_allclose(mean, mean_bayes, rtol=1e-4, atol=1e-5)
  assert np.asarray(var).item() == pytest.approx(1 / precision, rel=1e-4)
  assert np.asarray(ddpm.posterior(s, z0, zt, 0)[1]).item() == 0.0


def test_loss_is_l1_on_the_noise_and_vanishes_for_the_exact_predictor():
  s = ddpm.make_schedule(T)
  cfg = {"num_timesteps": T, "schedule": "cosine", "loss": "l1"}
  c = _normal((4, 4, 4, 2), 2)  # one-point data set {c}: eps = (z_t - sqrt(abar) c) / sqrt(1-abar)

  def exact(variables, z, t_net, train, rngs):
    assert train and "dropout" in rngs and t_net.shape == (z.shape[0],)
    t = jnp.round(t_net * T).astype(jnp.int32)
    abar = s.alphas_cumprod[t][:, None, None, None, None]
    return (z - jnp.sqrt(abar) * variables["params"]["c"]) / jnp.sqrt(1 - abar)

  loss_fn = jax.jit(ddpm.make_ddpm_loss_fn(exact, cfg))
  z0 = jnp.broadcast_to(c, (8,) + c.shape)
  loss, metrics = loss_fn({"c": c}, z0, jax.random.key(0))
  assert float(metrics["l2"]) < 1e-6 and float(loss) < 1e-3
  wrong, metrics = loss_fn({"c": c + 1.0}, z0, jax.random.key(0))
  assert float(wrong) > 0.05 and float(wrong) == pytest.approx(float(metrics["l1"]))
  with pytest.raises(ValueError, match="l2"):
    ddpm.make_ddpm_loss_fn(exact, dict(cfg, loss="huber"))


# Gaussian data: z0 ~ N(mu, sigma^2) per element. Then z_t ~ N(sqrt(abar) mu, abar sigma^2 +
# 1 - abar), and the exact noise predictor is E[eps | z_t] = sqrt(1 - abar) (z_t - sqrt(abar) mu)
# / (abar sigma^2 + 1 - abar).
MU = jnp.array([1.5, -0.5, 0.0, 2.0])
SIGMA = jnp.array([0.5, 1.0, 0.2, 1.5])
EVALS = []


def _gaussian_predictor(schedule, count=False):
  def eps(z, t_net):
    if count:
      jax.debug.callback(lambda: EVALS.append(1))
    abar = schedule.alphas_cumprod[jnp.round(t_net * schedule.num_timesteps).astype(jnp.int32)]
    return jnp.sqrt(1 - abar) * (z - jnp.sqrt(abar) * MU) / (abar * SIGMA**2 + 1 - abar)

  return eps


@pytest.mark.parametrize(
  "sampler, kwargs, tol",
  [
    ("ddpm", {}, 0.05),
    ("ddim", {"steps": 100, "eta": 0.0}, 0.05),
    ("ddim", {"steps": T, "eta": 0.0}, 0.025),
  ],
)
def test_samplers_recover_gaussian_mean_and_variance(sampler, kwargs, tol):
  """Moments within the samplers' discretisation bias (the standard deviation of the sharpest
  channel, sigma 0.2, comes out 3% low with 100 or 300 ancestral steps, 1% with DDIM-300)
  plus the sampling error of 16,384 draws (mean: sigma / 128; std: 0.6%)."""
  s = ddpm.make_schedule(T)
  z_last = jax.random.normal(jax.random.key(0), (16384, 1, 1, 1, 4))
  run = ddpm.sample_ddpm if sampler == "ddpm" else ddpm.sample_ddim
  z0, _ = run(_gaussian_predictor(s), z_last, jax.random.key(1), s, **kwargs)
  z0 = np.asarray(z0).reshape(-1, 4)
  np.testing.assert_allclose(z0.mean(0), MU, atol=0.03)
  np.testing.assert_allclose(z0.std(0), SIGMA, rtol=tol)


def test_nfe_counts_and_ddim_eta_1_over_all_steps_is_ancestral():
  s = ddpm.make_schedule(40)
  z_last = _normal((2, 2, 2, 2, 4), 3)
  for run, kwargs, expected in [
    (ddpm.sample_ddpm, {}, 40),
    (ddpm.sample_ddim, {"steps": 7}, 7),
    (ddpm.sample_ddim, {"steps": 1}, 1),
    (ddpm.sample_ddim, {"steps": 40, "eta": 1.0}, 40),
  ]:
    EVALS.clear()
    _, nfe = run(_gaussian_predictor(s, count=True), z_last, jax.random.key(2), s, **kwargs)
    jax.effects_barrier()
    assert int(nfe) == len(EVALS) == expected, kwargs
  ancestral, _ = ddpm.sample_ddpm(_gaussian_predictor(s), z_last, jax.random.key(2), s)
  ddim, _ = ddpm.sample_ddim(
    _gaussian_predictor(s), z_last, jax.random.key(2), s, steps=40, eta=1.0
  )
  np.testing.assert_allclose(ddim, ancestral, rtol=1e-4, atol=1e-4)
  deterministic, _ = ddpm.sample_ddim(
    _gaussian_predictor(s), z_last, jax.random.key(2), s, steps=40, eta=0.0
  )
  assert np.abs(np.asarray(deterministic) - np.asarray(ancestral)).max() > 0.1
  with pytest.raises(ValueError, match="steps"):
    ddpm.sample_ddim(_gaussian_predictor(s), z_last, jax.random.key(2), s, steps=41)


def test_clipping_bounds_the_predicted_z0():
  """A predictor that says "no noise" makes z0^ = z_t / sqrt(alpha_bar), ~2e4 z at t = T - 1;
  with clipping every sampler keeps z0^, and so its output, within the bound."""
  cfg = {"num_timesteps": T, "schedule": "cosine", "clip_denoised": True}
  z_last = _normal((2, 2, 2, 2, 4), 4)
  zero = lambda z, t: jnp.zeros_like(z)
  free = ddpm.schedule_from_config(dict(cfg, clip_denoised=False), latent_abs_max=3.0)
  clipped = ddpm.schedule_from_config(cfg, latent_abs_max=3.0)
  assert float(free.clip_z0) == 0.0 and float(clipped.clip_z0) == 3.0
  assert float(ddpm.schedule_from_config(cfg).clip_z0) == 0.0  # no range known: no clipping
  out, _ = ddpm.sample_ddim(zero, z_last, jax.random.key(0), free, steps=5)
  assert np.abs(np.asarray(out)).max() > 1e3
  for run, kwargs in [
    (ddpm.sample_ddim, {"steps": 5}),
    (ddpm.sample_ddim, {"steps": 5, "eta": 1}),
    (ddpm.sample_ddpm, {}),
  ]:
    out, _ = run(zero, z_last, jax.random.key(0), clipped, **kwargs)
    assert np.abs(np.asarray(out)).max() <= 3.0 + 1e-5, kwargs


def test_ddpm_config_is_medicaldiffusions_baseline():
  from experiments.configs.flow import get_config  # pylint: disable=import-outside-toplevel

  c = get_config("ddpm")
  assert (c.flow.objective, c.ddpm.num_timesteps, c.ddpm.schedule, c.ddpm.loss) == (
    "ddpm",
    300,
    "cosine",
    "l1",
  )
  assert c.model.time_scale * (T - 1) / T == T - 1  # the embedding sees the integer step
  assert (c.optim.lr, c.optim.ema_decay, c.ddpm.clip_denoised) == (1e-4, 0.995, True)
  assert get_config("thesis").flow.objective == "rectified_flow"


def test_eta_1_corrects_a_predictor_error_that_eta_0_carries_to_the_output():
  """An error of 0.05 in the predicted noise near t = T - 1, where the exact prediction is
  nearly z itself, makes z0^ = error / sqrt(alpha_bar) saturate the clip; the deterministic
  sampler keeps that +-bound pattern (here a shift of the mean), the stochastic one washes it out
  (the trained demo DDPM's failure at eta = 0, bench/RESULTS.md)."""
  s = ddpm.make_schedule(T, clip_z0=4.0)
  exact = _gaussian_predictor(s)
  pattern = 0.05 * jnp.sign(_normal((1, 1, 1, 1, 4), 5))
  noisy = lambda z, t_net: exact(z, t_net) + jnp.where(t_net > 0.9, pattern, 0.0)
  z_last = jax.random.normal(jax.random.key(0), (4096, 1, 1, 1, 4))
  shift = {}
  for eta in (0.0, 1.0):
    z0, _ = ddpm.sample_ddim(noisy, z_last, jax.random.key(1), s, steps=50, eta=eta)
    shift[eta] = np.abs(np.asarray(z0).reshape(-1, 4).mean(0) - MU).max()
  assert shift[0.0] > 0.3 and shift[1.0] < 0.12, shift

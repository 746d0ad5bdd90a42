"""Latent DDPM: the diffusion baseline beside rectified flow, for the same network and latents.

The baseline is the thesis' own, medicaldiffusion's latent DDPM (Khader et al.), matched in:
- a cosine noise schedule (Nichol & Dhariwal, offset s = 0.008, betas clipped to 0.9999);
- T = 300 timesteps (its `ddpm.yaml`);
- the network predicts the noise eps (its `p_losses` regresses the noise; the `objective:
  pred_x0` in its config is not passed to the model and has no effect);
- an L1 loss, the mean over all elements, with t uniform over {0, ..., T - 1};
- ancestral sampling over all T steps with the posterior variance beta~_t, no noise at t = 0.

Where we differ, and why:
- the network is this library's `UNet3D` (theirs: a video-diffusion UNet with temporal
  attention), so that both objectives train the same network;
- latents are standardised per channel (`flow.normalize`); they rescale by the codebook's
  global min and max to [-1, 1] and clip the predicted z0 to that range while sampling. We clip
  it to the training latents' range, +-max |z|, instead (`ddpm.clip_denoised`). Near t = T - 1,
  alpha_bar is ~3e-9 and an unclipped z0 = (z_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)
  multiplies the noise predictor's error by ~2e4;
- the network sees the time as t / T in [0, 1) (their integer t goes straight into the
  embedding); `model.time_scale = T` gives the embedding their integer t exactly;
- the EMA is updated every step from the start (theirs: every 10 steps after step 2,000), and
  gradients are clipped to norm 1 (theirs: no clipping), as the shared trainer does for the flow;
  the `flow.py:ddpm` config takes their learning rate (1e-4) and EMA decay (0.995) but the
  thesis' batch of 2 (theirs on ADNI: 10 with 2 accumulation steps), and AdamW without decay;
- DDIM(n, eta) is offered as well (their config names 250 DDIM steps, but their sampler runs
  only the ancestral loop). Sample a trained network with eta = 1 (or ancestrally), not eta = 0:
  the deterministic sampler carries every z0 estimate forward, and those from the low-SNR steps
  are the noise predictor's error times 1 / sqrt(alpha_bar) (2e4 at t = T - 1, 30 at the next
  DDIM-50 step), which the clip turns into a +-max |z| pattern, 9 of the data's standard
  deviations. The update matches Song et al. eq. 12 and is exact for an exact predictor (the
  Gaussian test); eta = 1 adds fresh noise at each step, so later steps correct the pattern
  (bench/RESULTS.md: demo latents at 4.9x the data's std with eta = 0, 1.0x with eta = 1).

Indices: t in {0, ..., T - 1}; alpha_bar_t = prod_{s <= t} (1 - beta_s); z_t = sqrt(alpha_bar_t)
z0 + sqrt(1 - alpha_bar_t) eps. Samplers start from z_{T-1} ~ N(0, I) and return z0 with the
number of network evaluations (NFE), an int32 scalar as `sample.integrate` reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from latentfm import flow
from latentfm.train import compiler

Array = jax.Array
NoiseFn = Callable[[Array, Array], Array]  # (z (B, ...), network time t / T scalar) -> eps
SCHEDULES = ("cosine", "linear")
SAMPLERS = ("ddpm", "ddim")


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.9999) -> np.ndarray:
  """`(T,)` float64 betas with alpha_bar(t) proportional to cos^2(((t / T) + s) / (1 + s) pi/2).

  beta_t = 1 - f(t + 1) / f(t) for f(t) = cos^2(...) at t = 0..T, clipped to [0, max_beta].
  """
  x = np.linspace(0.0, 1.0, num_timesteps + 1, dtype=np.float64)
  f = np.cos((x + s) / (1.0 + s) * np.pi * 0.5) ** 2
  return np.clip(1.0 - f[1:] / f[:-1], 0.0, max_beta)


def linear_betas(num_timesteps: int) -> np.ndarray:
  """`(T,)` float64 betas of Ho et al.: 1e-4 to 0.02 in T = 1000 steps, scaled by 1000 / T."""
  scale = 1000.0 / num_timesteps
  return np.linspace(1e-4 * scale, 0.02 * scale, num_timesteps, dtype=np.float64)


@flax.struct.dataclass
class Schedule:
  """The noise schedule's per-step values, each `(T,)` float32 (a JAX pytree), and the bound
  the samplers clip predicted z0 to (`clip_z0`, a float32 scalar; 0: no clipping).

  `alphas_cumprod_prev[t]` is alpha_bar_{t-1}, with alpha_bar_{-1} = 1.
  """

  betas: Array
  alphas_cumprod: Array
  alphas_cumprod_prev: Array
  clip_z0: Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def make_schedule(
  num_timesteps: int = 300,
  kind: str = "cosine",
  cosine_s: float = 0.008,
  max_beta: float = 0.9999,
  clip_z0: float = 0.0,
) -> Schedule:
  """The schedule named `kind` (`cosine` or `linear`) over `num_timesteps` steps.

  The products are taken in float64, then stored as float32. `clip_z0` > 0 makes the samplers
  clip predicted z0 to [-clip_z0, clip_z0].
  """
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
  if kind == "cosine":
    betas = cosine_betas(num_timesteps, cosine_s, max_beta)
  elif kind == "linear":
    betas = linear_betas(num_timesteps)
  else:
    raise ValueError(f"unknown noise schedule {kind!r}; choose one of {SCHEDULES}")
  cumprod = np.cumprod(1.0 - betas)
  prev = np.concatenate([[1.0], cumprod[:-1]])
  as32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(
    betas=as32(betas),
    alphas_cumprod=as32(cumprod),
    alphas_cumprod_prev=as32(prev),
    clip_z0=as32(max(clip_z0, 0.0)),
  )


def schedule_from_config(cfg: Mapping[str, Any], latent_abs_max: float | None = None) -> Schedule:
  """The schedule of a config's `ddpm` section (`num_timesteps`, `schedule`, `cosine_s`,
  `max_beta`, `clip_denoised`); with `clip_denoised`, samplers clip predicted z0 to
  +-`latent_abs_max` (the training latents' largest |value|; no clipping when None)."""
  clip = latent_abs_max if cfg.get("clip_denoised", False) and latent_abs_max else 0.0
  return make_schedule(
    int(cfg["num_timesteps"]),
    cfg.get("schedule", "cosine"),
    float(cfg.get("cosine_s", 0.008)),
    float(cfg.get("max_beta", 0.9999)),
    float(clip),
  )


def _at(values: Array, t: Array, like: Array) -> Array:
  """`values[t]` for a scalar or `(B,)` index, shaped to broadcast against `like` (B, ...)."""
  v = jnp.take(values, t).astype(like.dtype)
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def network_time(t: Array, num_timesteps: int) -> Array:
  """The network's time input for step index `t`: t / T in [0, 1), float32."""
  return jnp.asarray(t, jnp.float32) / num_timesteps


def q_sample(schedule: Schedule, z0: Array, t: Array, noise: Array) -> Array:
  """Forward process: sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) noise, `t` scalar or (B,)."""
  abar = _at(schedule.alphas_cumprod, t, z0)
  return jnp.sqrt(abar) * z0 + jnp.sqrt(1.0 - abar) * noise


def predict_z0(schedule: Schedule, z_t: Array, t: Array, eps: Array) -> Array:
  """The z0 that `q_sample` maps to `z_t` with noise `eps`."""
  abar = _at(schedule.alphas_cumprod, t, z_t)
  return (z_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def _denoised(schedule: Schedule, z_t: Array, t: Array, eps: Array) -> Array:
  """`predict_z0`, clipped to +-`schedule.clip_z0` when that is positive."""
  z0 = predict_z0(schedule, z_t, t, eps)
  bound = schedule.clip_z0.astype(z0.dtype)
  return jnp.where(bound > 0, jnp.clip(z0, -bound, bound), z0)


def posterior(schedule: Schedule, z0: Array, z_t: Array, t: Array) -> tuple[Array, Array]:
  """Mean and variance of q(z_{t-1} | z_t, z0) (DDPM eq. 7); the variance is 0 at t = 0."""
  beta = _at(schedule.betas, t, z_t)
  abar, abar_prev = _at(schedule.alphas_cumprod, t, z_t), _at(schedule.alphas_cumprod_prev, t, z_t)
  mean = (beta * jnp.sqrt(abar_prev) * z0 + (1.0 - abar_prev) * jnp.sqrt(1.0 - beta) * z_t) / (
    1.0 - abar
  )
  return mean, beta * (1.0 - abar_prev) / (1.0 - abar)


def make_ddpm_loss_fn(
  apply_fn: Callable[..., Array],
  ddpm_cfg: Mapping[str, Any],
  num_classes: int = 0,
  p_uncond: float = 0.0,
) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """Builds `loss_fn(params, z0, key, train=True, labels=None) -> (loss, metrics)`, as
  `flow.make_fm_loss_fn`.

  `apply_fn(variables, z, t_net, train=..., rngs=...[, label=...])` predicts the noise from
  `z_t` and the network time `t_net = t / T`. `ddpm_cfg` holds the schedule's fields and `loss`
  (`l2`, `l1` or `hybrid`, as `flow.fm_loss`). `z0` (B, ...) holds normalised latents. With
  `num_classes > 0`, `labels` int `(B,)` are required and each is replaced by the null class
  with probability `p_uncond` while training (classifier-free guidance, as the flow does).
  """
  schedule = schedule_from_config(ddpm_cfg)
  kind = ddpm_cfg["loss"]
  flow.fm_loss(jnp.zeros(()), jnp.zeros(()), kind)  # fail early on an unknown loss
  if not 0.0 <= p_uncond <= 1.0:
    raise ValueError(f"flow.p_uncond must be in [0, 1], got {p_uncond}")
  num_timesteps = schedule.num_timesteps

  def loss_fn(
    params: Any, z0: Array, key: Array, train: bool = True, labels: Array | None = None
  ) -> tuple[Array, dict[str, Array]]:
    noise_key, time_key, dropout_key = jax.random.split(key, 3)
    cond = flow.label_condition(key, labels, num_classes, p_uncond, train)
    # Drawn flat: XLA:CPU compiles rank-5 random draws slowly.
    noise = jax.random.normal(noise_key, (z0.size,), z0.dtype).reshape(z0.shape)
    t = jax.random.randint(time_key, (z0.shape[0],), 0, num_timesteps)
    pred = apply_fn(
      {"params": params},
      q_sample(schedule, z0, t, noise),
      network_time(t, num_timesteps),
      train=train,
      rngs={"dropout": dropout_key},
      **cond,
    )
    loss = flow.fm_loss(pred, noise, kind)
    diff = (pred - noise).astype(jnp.float32)
    return loss, {"loss": loss, "l1": jnp.mean(jnp.abs(diff)), "l2": jnp.mean(diff**2)}

  return loss_fn


def _normal_like(key: Array, z: Array) -> Array:
  return jax.random.normal(key, (z.size,), z.dtype).reshape(z.shape)


@compiler.filter_jit
def _ancestral(noise_fn, z_last, key, schedule):
  num_timesteps = schedule.num_timesteps

  def body(i, z):
    t = num_timesteps - 1 - i
    eps = noise_fn(z, network_time(t, num_timesteps))
    mean, var = posterior(schedule, _denoised(schedule, z, t, eps), z, t)
    return mean + jnp.sqrt(var) * _normal_like(jax.random.fold_in(key, t), z)

  z0 = jax.lax.fori_loop(0, num_timesteps, body, z_last)
  return z0, jnp.asarray(num_timesteps, jnp.int32)


def sample_ddpm(
  noise_fn: NoiseFn, z_last: Array, key: Array, schedule: Schedule
) -> tuple[Array, Array]:
  """Ancestral DDPM sampling over all T steps; returns `(z0, nfe)` with nfe = T.

  Args:
    noise_fn: `(z (B, ...), t_net scalar) -> eps (B, ...)`, e.g. `sample.velocity_from_model`
      of a noise-predicting network.
    z_last: `(B, ...)` noise z_{T-1} ~ N(0, I).
    key: the step noise; step t draws with `fold_in(key, t)`.
    schedule: the noise schedule the network was trained with.
  Returns:
    `(z0 (B, ...), nfe)`, nfe an int32 scalar.
  """
  return _ancestral(noise_fn, z_last, key, schedule)


@compiler.filter_jit
def _ddim(noise_fn, z_last, key, schedule, steps, eta):
  num_timesteps = schedule.num_timesteps
  abar_all = schedule.alphas_cumprod

  def timestep(i):  # i = 0 .. steps - 1, from T - 1 down to 0; evenly spaced, rounded
    frac = 1.0 - i / jnp.maximum(steps - 1, 1)
    return jnp.maximum(jnp.round(frac * (num_timesteps - 1)).astype(jnp.int32), 0)

  def body(i, z):
    t = timestep(i)
    eps = noise_fn(z, network_time(t, num_timesteps))
    z0 = _denoised(schedule, z, t, eps)
    abar = jnp.take(abar_all, t)
    # The noise that the (clipped) z0 implies, so that z0 and eps stay consistent with z_t.
    eps = jnp.where(schedule.clip_z0 > 0, (z - jnp.sqrt(abar) * z0) / jnp.sqrt(1.0 - abar), eps)
    abar_next = jnp.where(i + 1 < steps, jnp.take(abar_all, timestep(i + 1)), 1.0)
    var = eta**2 * (1.0 - abar_next) / (1.0 - abar) * (1.0 - abar / abar_next)
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_next - var, 0.0))
    noise = _normal_like(jax.random.fold_in(key, t), z)
    return jnp.sqrt(abar_next) * z0 + direction * eps + jnp.sqrt(var) * noise

  z0 = jax.lax.fori_loop(0, steps, body, z_last)
  return z0, jnp.asarray(steps, jnp.int32)


def sample_ddim(
  noise_fn: NoiseFn,
  z_last: Array,
  key: Array,
  schedule: Schedule,
  *,
  steps: int = 50,
  eta: float = 0.0,
) -> tuple[Array, Array]:
  """DDIM (Song et al.) with `steps` evenly spaced timesteps from T - 1 to 0; `(z0, nfe)`.

  The step from t to the next timestep s (alpha_bar_s = 1 after t = 0) is
  z_s = sqrt(abar_s) z0^ + sqrt(1 - abar_s - sigma^2) eps^ + sigma n, with
  sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s): eta = 0 is the
  deterministic sampler, and eta = 1 with steps = T is the ancestral DDPM (same noise draws,
  `fold_in(key, t)`). New `steps` and `eta` reuse the compiled loop.

  Args:
    noise_fn, z_last, key, schedule: as `sample_ddpm`.
    steps: number of network evaluations, in [1, T].
    eta: the noise level, >= 0.
  Returns:
    `(z0 (B, ...), nfe)`, nfe = steps as an int32 scalar.
  """
  if not 1 <= steps <= schedule.num_timesteps:
    raise ValueError(f"DDIM steps must be in [1, T={schedule.num_timesteps}], got {steps}")
  if eta < 0:
    raise ValueError(f"DDIM eta must be >= 0, got {eta}")
  return _ddim(
    noise_fn, z_last, key, schedule, jnp.asarray(steps, jnp.int32), jnp.asarray(eta, jnp.float32)
  )
